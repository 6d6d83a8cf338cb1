"""Gradient-flow charts: files, formats and sizes, layer labels, and pytest --grad-plot."""

from __future__ import annotations

import pathlib
import re
import struct
import sys

import pytest
from helpers import SEED_NETWORKS
from helpers.profiles import make_profile, rising

pytest.importorskip("matplotlib")

from pytest_gradcheck.cli.command import EXIT_FAILING, EXIT_USAGE, main
from pytest_gradcheck.core.bounds import Bounds
from pytest_gradcheck.core.checks import check
from pytest_gradcheck.core.files import safe_name
from pytest_gradcheck.core.profile import GradientProfile
from pytest_gradcheck.report.plot import (
    DPI,
    LABEL_LIMIT,
    figure_size,
    plot_filename,
    plot_profile,
    short_label,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def expected_pixels(profile: GradientProfile) -> tuple[int, int]:
    width, height = figure_size([short_label(layer.name) for layer in profile.layers])
    return round(width * DPI), round(height * DPI)


def test_png_has_the_figure_size(tmp_path):
    profile = make_profile(*rising(4))
    path = plot_profile(profile, check(profile, Bounds()), Bounds(), tmp_path / "net.png")
    assert path == tmp_path / "net.png"
    assert png_size(path) == expected_pixels(profile)


def test_svg_is_written_as_svg(tmp_path):
    profile = make_profile(*rising(2))
    path = plot_profile(profile, [], Bounds(), tmp_path / "sub" / "net.svg")
    text = path.read_text()
    assert text.startswith("<?xml") and "<svg" in text
    width_pt = float(re.search(r'<svg[^>]*\swidth="([\d.]+)pt"', text).group(1))
    assert width_pt == pytest.approx(figure_size(["fc1", "fc2"])[0] * 72)


def test_other_suffixes_are_refused(tmp_path):
    profile = make_profile(*rising(2))
    with pytest.raises(ValueError, match=r"must end in \.png or \.svg, got '\.pdf'"):
        plot_profile(profile, [], Bounds(), tmp_path / "net.pdf")
    assert not (tmp_path / "net.pdf").exists()


def test_many_long_layer_names_get_a_wider_taller_chart(tmp_path):
    names = [f"model.encoder.layers.{i}.self_attention.output_projection" for i in range(40)]
    many = make_profile(*rising(len(names)), names=names)
    few = make_profile(*rising(4))
    many_size = png_size(plot_profile(many, [], Bounds(), tmp_path / "many.png"))
    few_size = png_size(plot_profile(few, [], Bounds(), tmp_path / "few.png"))
    assert many_size == expected_pixels(many)
    assert many_size[0] > few_size[0] and many_size[1] > few_size[1]


def test_hundreds_of_layers_stay_a_viewable_size(tmp_path):
    profile = make_profile(*rising(300), names=[f"blocks.{i}.fc" for i in range(300)])
    width, height = png_size(plot_profile(profile, [], Bounds(), tmp_path / "deep.png"))
    assert width <= 2200 and height <= 1000


def test_dead_nonfinite_and_unused_layers_still_plot(tmp_path):
    profile = make_profile(*rising(4))
    profile.layers[1].grad_mean_abs = profile.layers[1].grad_max_abs = 0.0
    profile.layers[1].zero_fraction = 1.0
    profile.layers[1].all_zero = True
    profile.layers[2].grad_mean_abs = float("nan")
    profile.layers[2].finite = False
    profile.layers[3].received_grad = False
    findings = check(profile, Bounds())
    assert {finding.rule for finding in findings} >= {"dead", "nonfinite"}
    assert png_size(plot_profile(profile, findings, Bounds(), tmp_path / "bad.png")) == expected_pixels(profile)


def test_short_label_keeps_the_head_and_the_most_specific_tail():
    name = "transformer.encoder.layers.11.self_attention.out_proj"
    label = short_label(name)
    assert len(label) <= LABEL_LIMIT
    assert label == "trans…11.self_attention.out_proj"
    assert short_label("fc1") == "fc1"
    assert short_label("") == "(root)"
    assert len(short_label("x" * 100)) <= LABEL_LIMIT


def test_plot_filename_is_filesystem_safe_and_follows_the_node_id():
    assert (
        plot_filename("tests/test_net.py::TestNet::test_fit[cpu-a-b]")
        == "tests.test_net--TestNet--test_fit[cpu-a-b].png"
    )
    # Ids that differ only in characters a file name cannot hold still get their own files.
    unsafe = [plot_filename(f"t.py::test[a{sep}b]") for sep in "/: "]
    assert len(set(unsafe)) == 3
    assert all(re.fullmatch(r"t--test\[a_b\]-[0-9a-f]{8}\.png", name) for name in unsafe)
    assert (
        plot_filename("test_net.py::test_fit", name="encoder", index=1, suffix=".svg")
        == "test_net--test_fit--encoder-2.svg"
    )
    long_ids = [f"tests/test_x.py::test_y[{'p' * 300}{i}]" for i in range(2)]
    names = [plot_filename(nodeid) for nodeid in long_ids]
    assert names[0] != names[1]
    assert all(len(name) < 200 and re.fullmatch(r"[A-Za-z0-9._,=+\-\[\]~]+", name) for name in names)


def test_cli_plot_writes_the_chart_and_keeps_the_exit_code(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    target = f"{SEED_NETWORKS}:SigmoidNet"
    code = main([target, "--input-shape", "1,64", "--plot", str(tmp_path / "sig.png")])
    _, err = capsys.readouterr()
    assert code == EXIT_FAILING
    assert f"wrote gradient-flow plot to {tmp_path / 'sig.png'}" in err
    width, height = png_size(tmp_path / "sig.png")
    assert (width, height) == (round(figure_size(["fc1"] * 4)[0] * DPI), round(figure_size(["fc1"] * 4)[1] * DPI))


def test_cli_refuses_a_plot_suffix_before_running_the_model(capsys):
    code = main(["no_such_package_xyz:Net", "--plot", "chart.pdf"])
    _, err = capsys.readouterr()
    assert code == EXIT_USAGE
    assert "must end in .png or .svg" in err and "no_such_package_xyz" not in err


PROBED_TESTS = """
import pytest
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def test_healthy(gradient_health):
    gradient_health(make())


@pytest.mark.parametrize("tag", ["a/b"])
def test_twice(gradient_health, tag):
    gradient_health(make(), name="encoder")
    gradient_health(make())
    gradient_health(make())


def test_not_probed():
    assert True
"""
TWICE = safe_name("test_twice[a/b]")  # the "/" is replaced, so the name carries a hash
EXPECTED_PLOTS = {
    "test_probed--test_healthy.png",
    f"test_probed--{TWICE}--encoder.png",
    f"test_probed--{TWICE}.png",
    f"test_probed--{TWICE}-2.png",
}


@pytest.mark.slow  # an in-process pytest run that draws four charts: about 3 s
def test_grad_plot_writes_one_file_per_probed_model(pytester):
    pytester.makepyfile(test_probed=PROBED_TESTS)
    result = pytester.runpytest("--grad-plot", "plots")
    result.assert_outcomes(passed=3)
    written = {path.name for path in (pytester.path / "plots").iterdir()}
    assert written == EXPECTED_PLOTS
    assert all(png_size(pytester.path / "plots" / name)[0] > 0 for name in written)
    result.stdout.fnmatch_lines(["gradcheck: wrote 4 gradient-flow plot(s) to *plots"])


@pytest.mark.slow
def test_grad_plot_under_xdist(pytester):
    # Two probed tests on two workers; the controller draws both from the reports it receives.
    tests = PROBED_TESTS.replace("    gradient_health(make())\n    gradient_health(make())\n", "")
    pytester.makepyfile(test_probed=tests)
    result = pytester.runpytest_subprocess("-n", "2", "--grad-plot", "plots", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    written = {path.name for path in (pytester.path / "plots").iterdir()}
    assert written == {"test_probed--test_healthy.png", f"test_probed--{TWICE}--encoder.png"}
    result.stdout.fnmatch_lines(["gradcheck: wrote 2 gradient-flow plot(s) to *plots"])


def test_grad_plot_naming_a_file_is_a_usage_error(pytester):
    pytester.makepyfile(test_nothing="def test_nothing(): pass")
    (pytester.path / "charts").write_text("not a folder")

    result = pytester.runpytest("--grad-plot", "charts")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--grad-plot: *charts exists and is not a folder*"])


def test_a_profile_probed_without_detail_plots_its_means(tmp_path):
    profile = make_profile(*rising(3), detail=False)
    assert not profile.detailed

    path = plot_profile(profile, check(profile, Bounds()), Bounds(), tmp_path / "fast.png")

    assert png_size(path) == expected_pixels(profile)
