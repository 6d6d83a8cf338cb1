"""Baseline files: validated field by field, safe names, clear write errors, careful pruning, shell-safe hints."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

MODEL_MODULE = """
import pytest
import torch
from torch import nn


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def batch():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def test_net(gradient_health):
    gradient_health(make_model(), batch(), baseline=True)
"""


def baseline_of(pytester: pytest.Pytester, test: str, module: str = "test_model"):
    return pytester.path / "__gradcheck__" / module / f"{test}.json"


def committed_baseline(pytester: pytest.Pytester) -> dict:
    """Write the module and its baseline (as --grad-baseline-update does) and return the baseline's data."""
    pytester.makepyfile(test_model=MODEL_MODULE)
    pytester.runpytest("--grad-baseline-update").assert_outcomes(passed=1)
    return json.loads(baseline_of(pytester, "test_net").read_text())


# ------------------------------------------------------------ 21. field-by-field validation


def _bool_mean(data):
    data["layers"][0]["grad_mean_abs"] = True


def _string_finite(data):
    data["layers"][0]["finite"] = "false"


def _list_name(data):
    data["layers"][0]["name"] = ["0"]


MALFORMED = {
    "grad_mean_abs-true": lambda data: json.dumps(_bool_mean(data) or data),
    "finite-string": lambda data: json.dumps(_string_finite(data) or data),
    "name-list": lambda data: json.dumps(_list_name(data) or data),
    "deeply-nested": lambda data: '{"schema_version": 1, "layers": ' + "[" * 100_000 + "]" * 100_000 + "}",
}


@pytest.mark.parametrize("malformed", list(MALFORMED))
def test_malformed_baseline_is_a_kept_corrupt_file_error_in_pytest(pytester, malformed):
    data = committed_baseline(pytester)
    path = baseline_of(pytester, "test_net")
    text = MALFORMED[malformed](data)
    path.write_text(text)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["E   *BaselineFileError: gradient baseline __gradcheck__/test_model/test_net.json is corrupt*"]
    )
    assert path.read_text() == text, "the malformed file was changed on disk"


@pytest.fixture(scope="module")
def cli_baseline(tmp_path_factory):
    """A valid baseline from `gradcheck --save-baseline`, and the argv that probes the same model."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn


            def build():
                torch.manual_seed(0)
                return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
            """
        )
    )
    argv = [f"{folder / 'models.py'}:build", "--input-shape", "4,8"]
    saved = folder / "saved.json"
    done = run_gradcheck(folder, *argv, "--save-baseline", str(saved))
    assert done.returncode == 0, done.stderr
    return folder, argv, json.loads(saved.read_text())


def run_gradcheck(cwd, *argv):
    # cwd is a temporary folder: `python -m` puts the working directory first on sys.path.
    return subprocess.run(
        [sys.executable, "-m", "pytest_gradcheck", *argv], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
@pytest.mark.parametrize("malformed", list(MALFORMED))
def test_malformed_baseline_is_a_one_line_corrupt_file_error_in_the_cli(cli_baseline, malformed):
    folder, argv, data = cli_baseline
    path = folder / f"{malformed}.json"
    text = MALFORMED[malformed](json.loads(json.dumps(data)))
    path.write_text(text)
    done = run_gradcheck(folder, *argv, "--baseline", str(path))
    assert done.returncode == 2, f"exit {done.returncode}; stderr:\n{done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert str(path) in done.stderr and "corrupt" in done.stderr
    assert path.read_text() == text


# ------------------------------------------------------------ 22. long test ids and names


LONG_ID = "variant-" + "x" * 130
LONG_NAME = "encoder-" + "n" * 130


def test_long_parametrize_ids_and_names_do_not_make_file_names_too_long(pytester):
    pytester.makepyfile(
        test_model=MODEL_MODULE
        + f"""

@pytest.mark.parametrize("width", [16], ids=[{LONG_ID!r}])
def test_long(gradient_health, width):
    gradient_health(make_model(), batch(), baseline=True, name={LONG_NAME!r})
"""
    )
    updated = pytester.runpytest("--grad-baseline-update", "-k", "test_long")
    updated.assert_outcomes(passed=1)
    files = list((pytester.path / "__gradcheck__" / "test_model").iterdir())
    assert len(files) == 1 and len(files[0].name) <= 255
    pytester.runpytest("-k", "test_long").assert_outcomes(passed=1)  # and it is found again


# ------------------------------------------------------------ 23. read-only baseline folder


def test_read_only_baseline_folder_error_names_the_baseline_and_the_folder(pytester):
    committed_baseline(pytester)
    folder = pytester.path / "__gradcheck__" / "test_model"
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (running as root?)")
        result = pytester.runpytest("--grad-baseline-update")
    finally:
        folder.chmod(stat.S_IRWXU)
    result.assert_outcomes(failed=1)
    errors = "\n".join(line for line in result.outlines if line.startswith("E "))
    assert "test_net.json" in errors and "__gradcheck__/test_model" in errors, errors
    assert ".tmp" not in errors, errors


# ------------------------------------------------------------ 24. pruning keeps what did not run


DEVICE_MODULE = """
import pytest
import torch
from torch import nn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_net(gradient_health, device):
    gradient_health(make_model().to(device), torch.ones(4, 8, device=device), baseline=True)
"""

SKIPPING_MODULE = (
    DEVICE_MODULE
    + """

@pytest.mark.skipif(True, reason="needs hardware this machine lacks")
def test_skipped(gradient_health):
    gradient_health(make_model(), torch.ones(4, 8), baseline=True)


def test_skips_itself(gradient_health):
    pytest.skip("needs a dataset this machine lacks")
"""
)


def prune_with_committed_files(pytester, source: str, skipped: int, committed: list[str]) -> list[str]:
    """Write the module, its baselines and files committed from a GPU machine; prune; return the files lost."""
    pytester.makepyfile(test_devices=source)
    pytester.runpytest("--grad-baseline-update").assert_outcomes(passed=1, skipped=skipped)
    folder = pytester.path / "__gradcheck__" / "test_devices"
    cpu = (folder / "test_net[cpu].json").read_text()
    for name in committed:
        (folder / name).write_text(cpu)
    result = pytester.runpytest("--grad-baseline-prune")
    assert result.ret == 0
    return [name for name in committed if not (folder / name).exists()]


@pytest.fixture
def cpu_only():
    if torch.cuda.is_available():
        pytest.skip("the [cuda] test runs here; these tests are about a CPU-only machine")


def test_prune_keeps_the_baseline_of_a_device_the_parametrization_left_out(pytester, cpu_only):
    lost = prune_with_committed_files(pytester, DEVICE_MODULE, 0, ["test_net[cuda].json"])
    assert lost == [], f"--grad-baseline-prune deleted {lost}"


def test_prune_keeps_the_baselines_of_skipped_tests(pytester, cpu_only):
    committed = ["test_net[cuda].json", "test_skipped.json", "test_skips_itself.json"]
    lost = prune_with_committed_files(pytester, SKIPPING_MODULE, 2, committed)
    assert lost == [], f"--grad-baseline-prune deleted {lost}"


# ------------------------------------------------------------ 25. shell-safe rerun hints


QUOTE_MODULE = """
import pytest
import torch
from torch import nn

INIT = {init}


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nn.init.normal_(model[0].weight, std=INIT)
    return model


@pytest.mark.parametrize("case", [1], ids=["it's"])
def test_net(gradient_health, case):
    gradient_health(make_model(), torch.ones(4, 8), baseline=True)
"""
NODEID = "test_quote.py::test_net[it's]"


def suggested_command(result: pytest.RunResult) -> str:
    text = "\n".join(line.removeprefix("E").strip() for line in result.outlines if line.startswith("E "))
    match = re.search(r"(pytest --grad-baseline-update .*?)(?: \(then commit the file\))?$", text, re.M)
    assert match, f"no rerun command in:\n{text}"
    return match.group(1)


def shell_words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError as error:  # what a shell says: unterminated quote
        pytest.fail(f"the suggested command is not valid shell ({error}): {command}")


def test_missing_baseline_hint_quotes_a_node_id_with_a_quote_for_the_shell(pytester):
    pytester.makepyfile(test_quote=QUOTE_MODULE.format(init=0.1))
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    command = suggested_command(result)
    assert shell_words(command) == ["pytest", "--grad-baseline-update", NODEID], command


def test_moved_baseline_hint_quotes_a_node_id_with_a_quote_for_the_shell(pytester):
    pytester.makepyfile(test_quote=QUOTE_MODULE.format(init=0.1))
    pytester.runpytest("--grad-baseline-update").assert_outcomes(passed=1)
    pytester.makepyfile(test_quote=QUOTE_MODULE.format(init=1.0))  # the first layer's gradient moves
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    command = suggested_command(result)
    assert shell_words(command) == ["pytest", "--grad-baseline-update", NODEID], command
