"""The baseline file format, its loading errors, atomic writes and the pure comparison."""

from __future__ import annotations

import json
import math
import os

import pytest
from helpers.profiles import make_layer, make_profile

from pytest_gradcheck.core import baseline as baseline_mod
from pytest_gradcheck.core.baseline import (
    SCHEMA_VERSION,
    baseline_path,
    compare_baseline,
    dumps_baseline,
    load_baseline,
    loads_baseline,
    parse_tolerance,
    save_baseline,
)
from pytest_gradcheck.errors import BaselineFileError
from pytest_gradcheck.report.baseline_text import problem_lines, render_baseline_diff, render_baseline_failure

# -- file format --------------------------------------------------------------------


def test_dump_sorts_keys_and_rounds_floats_to_fixed_significant_digits():
    text = dumps_baseline(make_profile(1.23456789e-3, 9.87654321e-2, loss=1.234567891))
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, indent=2) + "\n"
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["layers"][0]["grad_mean_abs"] == 1.235e-3
    assert data["layers"][1]["grad_mean_abs"] == 0.09877
    assert data["loss"] == 1.235
    assert data["layers"][0]["numel"] == 4160 and isinstance(data["layers"][0]["numel"], int)
    assert data["layers"][0]["finite"] is True
    assert "activations" not in data  # diagnosis data is not part of a gradient baseline
    # Nor are the detail statistics: they are there only when a report asked for them.
    assert not {"grad_max_abs", "grad_norm", "weight_norm", "zero_fraction"} & set(data["layers"][0])


def test_a_baseline_does_not_change_with_the_detail_of_the_probe():
    fast = make_profile(1e-3, 1e-2, detail=False)
    assert dumps_baseline(fast) == dumps_baseline(make_profile(1e-3, 1e-2))


def test_a_baseline_written_with_the_detail_statistics_still_loads(tmp_path):
    data = json.loads(dumps_baseline(make_profile(1e-3, 1e-2)))
    data["layers"][0].update(grad_max_abs="Infinity", grad_norm=0.5, weight_norm=4.5, zero_fraction=0.0)
    loaded = loads_baseline(json.dumps(data))
    assert loaded.layers[0].grad_max_abs == math.inf and loaded.layers[0].grad_norm == 0.5
    assert loaded.layers[1].grad_max_abs is None


def test_dump_is_strict_json_even_for_non_finite_values():
    profile = make_profile(1e-3, 1e-2)
    profile.layers[0].grad_mean_abs = math.inf
    profile.layers[1].grad_mean_abs = math.nan
    text = dumps_baseline(profile)
    json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    loaded = loads_baseline(text)
    assert loaded.layers[0].grad_mean_abs == math.inf
    assert math.isnan(loaded.layers[1].grad_mean_abs)


def test_round_trip_keeps_layers_order_and_ratio(tmp_path):
    profile = make_profile(2e-3, 5e-3, 1e-2, input_shapes=["x: float32[8, 64]"])
    path = tmp_path / "deep" / "er" / "net.json"
    save_baseline(path, profile)
    loaded = load_baseline(path)
    assert [layer.name for layer in loaded.layers] == ["fc1", "fc2", "fc3"]
    assert loaded.ratio == pytest.approx(profile.ratio, rel=1e-3)
    assert loaded.input_shapes == ["x: float32[8, 64]"]
    assert compare_baseline(loaded, profile, 1.0 + 1e-3).passed


def test_dump_is_byte_identical_for_values_that_differ_below_the_rounding():
    noisy = make_profile(1.2345601e-3, 4.5e-2)
    assert dumps_baseline(make_profile(1.2345e-3, 4.5e-2)) != dumps_baseline(make_profile(1.2355e-3, 4.5e-2))
    assert dumps_baseline(make_profile(1.23456e-3, 4.5e-2)) == dumps_baseline(noisy)


# -- loading errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"schema_version": 1, "layers": [', "not valid JSON"),
        ("[1, 2, 3]", "no schema_version"),
        ('{"schema_version": "one", "layers": []}', "not a positive integer"),
        ('{"schema_version": 1, "model": "Net"}', "the baseline has no 'layers'"),
        (
            '{"schema_version": 1, "model": "Net", "loss": 1.0, "seed": 0, "device": "cpu", "dtype": "float32", '
            '"layers": [{"name": "fc1"}]}',
            "layer 0 has no 'kind'",
        ),
        (
            '{"schema_version": 1, "model": "Net", "layers": [], "loss": true}',
            "'loss' of the baseline is true, not a number",
        ),
    ],
)
def test_corrupt_files_raise_an_error_naming_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "test_net.json"
    path.write_text(text)
    with pytest.raises(BaselineFileError) as caught:
        load_baseline(path)
    message = str(caught.value)
    assert str(path) in message and "is corrupt" in message and problem in message
    assert "--grad-baseline-update" in message


def test_newer_schema_version_says_to_upgrade(tmp_path):
    path = tmp_path / "test_net.json"
    data = json.loads(dumps_baseline(make_profile(1e-3, 1e-2)))
    data["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineFileError, match=r"schema_version 2, newer than .* reads \(1\); upgrade") as caught:
        load_baseline(path)
    assert str(path) in str(caught.value)


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    with pytest.raises(BaselineFileError, match="does not exist"):
        load_baseline(tmp_path / "absent.json")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BaselineFileError, match=r"binary\.json is unreadable"):
        load_baseline(binary)
    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(BaselineFileError, match=r"folder\.json is unreadable"):
        load_baseline(folder)


# -- atomic writes ------------------------------------------------------------------


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "test_net.json"
    save_baseline(path, make_profile(1e-3, 1e-2))
    old = path.read_text()

    def interrupted(source, target):
        raise KeyboardInterrupt  # the moment between writing the temporary and the rename

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_baseline(path, make_profile(5e-3, 1e-2))
    monkeypatch.undo()
    assert path.read_text() == old
    assert os.listdir(tmp_path) == ["test_net.json"]


def test_completed_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "test_net.json"
    save_baseline(path, make_profile(*([1e-3] * 30)))
    save_baseline(path, make_profile(5e-3, 1e-2))
    assert len(load_baseline(path).layers) == 2
    assert os.listdir(tmp_path) == ["test_net.json"]


# -- file names ---------------------------------------------------------------------


def test_baseline_path_is_derived_from_the_node_id_and_name(tmp_path):
    module = tmp_path / "tests" / "test_models.py"
    folder = tmp_path / "tests" / "__gradcheck__" / "test_models"
    assert baseline_path(module, "tests/test_models.py::test_fit") == folder / "test_fit.json"
    assert baseline_path(module, "tests/test_models.py::TestNet::test_fit[cpu-2]", "encoder") == (
        folder / "TestNet.test_fit[cpu-2].encoder.json"
    )


def test_unsafe_parametrize_ids_become_distinct_portable_names(tmp_path):
    module = tmp_path / "test_models.py"
    slash = baseline_path(module, "test_models.py::test_fit[a/b]").name
    underscore = baseline_path(module, "test_models.py::test_fit[a_b]").name
    quoted = baseline_path(module, 'test_models.py::test_fit[x:"*?<>|\\]', name="enc/dec").name
    assert slash != underscore and underscore == "test_fit[a_b].json"
    for name in (slash, quoted):
        assert all(char.isalnum() or char in "_.,=+-[]" for char in name), name
    very_long = baseline_path(module, "test_models.py::test_fit[" + "x" * 500 + "]").name
    assert len(very_long) < 160


# -- comparison ---------------------------------------------------------------------


def test_equal_profiles_pass_with_no_problems():
    profile = make_profile(1e-3, 2e-3, 4e-3)
    comparison = compare_baseline(profile, profile)
    assert comparison.passed and problem_lines(comparison) == []
    assert [delta.factor for delta in comparison.layers] == [1.0, 1.0, 1.0]
    assert comparison.ratio_factor == 1.0


@pytest.mark.parametrize("factor, passes", [(1.99, True), (0.51, True), (2.01, False), (0.49, False)])
def test_a_layer_fails_only_beyond_the_tolerance_either_way(factor, passes):
    before = make_profile(1e-3, 2e-3, 4e-3)
    now = make_profile(1e-3, 2e-3 * factor, 4e-3)
    comparison = compare_baseline(before, now, tolerance=2.0)
    assert comparison.passed is passes
    assert [delta.name for delta in comparison.moved] == ([] if passes else ["fc2"])


def test_first_layer_drop_fails_on_the_layer_and_on_the_ratio():
    before = make_profile(1e-3, 2e-3, 4e-3)
    now = make_profile(1e-4, 2e-3, 4e-3)
    comparison = compare_baseline(before, now, tolerance=2.0)
    assert not comparison.passed
    assert comparison.ratio_moved and comparison.ratio_factor == pytest.approx(0.1)
    problems = "\n".join(problem_lines(comparison))
    assert "fc1 0.1x" in problems
    assert "first/last ratio moved 0.1x (baseline 0.25, now 0.025), beyond 2x" in problems


def test_ratio_alone_can_fail_when_each_layer_stays_within_tolerance():
    before = make_profile(1e-3, 2e-3, 4e-3)
    now = make_profile(1.9e-3, 2e-3, 2.1e-3)  # first x1.9, last x0.525: ratio x3.6
    comparison = compare_baseline(before, now, tolerance=2.0)
    assert comparison.moved == [] and comparison.ratio_moved and not comparison.passed


def test_layer_set_changes_name_added_removed_and_renamed_layers():
    before = make_profile(1e-3, 2e-3, 4e-3, names=["encoder.fc", "mid", "head"])
    now = make_profile(
        make_layer("enc.fc", 1e-3), make_layer("mid", 2e-3), make_layer("norm", 1e-3, kind="LayerNorm", numel=128)
    )
    now.layers.append(make_layer("head", 4e-3))
    before.layers.insert(2, make_layer("dropped", 1e-3, kind="Conv2d", numel=99))
    comparison = compare_baseline(before, now)
    assert comparison.renamed == [("encoder.fc", "enc.fc")]
    assert comparison.added == ["norm"]
    assert comparison.removed == ["dropped"]
    assert not comparison.passed
    problems = problem_lines(comparison)
    assert "layers added: norm" in problems
    assert "layers removed: dropped" in problems
    assert "layers renamed: encoder.fc -> enc.fc" in problems


def test_zero_and_non_finite_gradients_compare_sensibly():
    before = make_profile(0.0, 2e-3, 4e-3)
    assert compare_baseline(before, make_profile(0.0, 2e-3, 4e-3)).passed
    woke = compare_baseline(before, make_profile(1e-6, 2e-3, 4e-3))
    assert woke.layers[0].factor == math.inf and woke.layers[0].status == "moved"
    broken = compare_baseline(make_profile(1e-3, 2e-3, 4e-3), make_profile(1e-3, math.nan, 4e-3))
    assert [delta.name for delta in broken.moved] == ["fc2"]


def test_tolerance_must_be_a_factor_of_at_least_one():
    assert parse_tolerance("1.5") == 1.5
    with pytest.raises(ValueError, match=r"for a 10% tolerance use 1\.1"):
        parse_tolerance(0.1)
    with pytest.raises(ValueError, match="must be a number"):
        parse_tolerance("lots")
    with pytest.raises(ValueError, match="at least 1"):
        compare_baseline(make_profile(1e-3, 2e-3), make_profile(1e-3, 2e-3), tolerance=0.5)


def test_comparison_to_dict_is_json_ready():
    comparison = compare_baseline(make_profile(1e-3, 2e-3), make_profile(1e-4, 2e-3, 5e-3))
    data = json.loads(json.dumps(comparison.to_dict()))
    assert data["passed"] is False
    assert data["added"] == ["fc3"]
    assert data["layers"][0]["factor"] == pytest.approx(0.1)


# -- rendering ----------------------------------------------------------------------


def test_diff_table_shows_baseline_now_factor_and_marks_only_layers_out_of_tolerance():
    comparison = compare_baseline(make_profile(1e-3, 2e-3, 4e-3), make_profile(1e-4, 2.5e-3, 4e-3), tolerance=2.0)
    table = render_baseline_diff(comparison)
    lines = table.splitlines()
    assert "tolerance 2x either way" in lines[0]
    assert lines[1].split() == ["layer", "kind", "baseline", "now", "factor"]
    row = {line.split()[0]: line for line in lines[3:]}
    assert row["fc1"].split()[2:5] == ["1.000e-03", "1.000e-04", "0.1x"] and "<< out of tolerance" in row["fc1"]
    assert row["fc2"].split()[4] == "1.25x" and "<<" not in row["fc2"]
    assert "<<" not in row["fc3"]
    assert "<< out of tolerance" in row["first/last"]


def test_failure_message_names_the_file_and_the_next_step():
    comparison = compare_baseline(make_profile(1e-3, 2e-3), make_profile(1e-3, 2e-3, 1e-3))
    message = render_baseline_failure(
        comparison, "tests/__gradcheck__/m/test_x.json", "pytest --grad-baseline-update X"
    )
    assert message.startswith("gradient baseline check failed for Net against tests/__gradcheck__/m/test_x.json:")
    assert "layers added: fc3" in message and "<< added" in message
    assert message.endswith("refresh the baseline: pytest --grad-baseline-update X")


def test_baseline_module_does_not_import_torch():
    assert "torch" not in vars(baseline_mod)
    with open(baseline_mod.__file__, encoding="utf-8") as handle:
        source = handle.read()
    assert "import torch" not in source and "pickle" not in source
