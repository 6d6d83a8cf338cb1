"""The command line: TARGET loading, inputs, formats, baselines and exit codes."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT, SEED_NETWORKS

from pytest_gradcheck.cli.command import EXIT_FAILING, EXIT_HEALTHY, EXIT_USAGE, main

SEED = str(SEED_NETWORKS)

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class NeedsWidth(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(width, width)

        def forward(self, x):
            return self.fc(x)


    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, ids, scale):
            return self.head(self.embed(ids)) * scale.mean()


    class Sequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(6, 5, batch_first=True)
            self.head = nn.Linear(5, 1)

        def forward(self, x):
            return self.head(self.rnn(x.flatten(1))[0])


    instance = NeedsWidth(4)


    def build():
        return NeedsWidth(4)


    def not_a_model():
        return 42


    number = 3
    """
)


@pytest.fixture(autouse=True)
def _restore_import_state(monkeypatch):
    # Loading a TARGET file puts its folder on sys.path and registers the module; undo
    # both so each test (and the rest of the suite) starts from the same import state.
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("models", "seed_networks")):
            del sys.modules[name]


@pytest.fixture
def models_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return str(path)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_relu_net_is_healthy(capsys):
    code, out, err = run_cli(capsys, f"{SEED}:ReLUNet", "--input-shape", "1,64")
    assert code == EXIT_HEALTHY, err
    assert "ReLUNet: first/last ratio" in out and "verdict: healthy" in out
    assert err == ""


def test_sigmoid_net_fails_with_the_table(capsys):
    code, out, _ = run_cli(capsys, f"{SEED}:SigmoidNet", "--input-shape", "1,64")
    assert code == EXIT_FAILING
    assert "verdict: vanishing" in out
    assert "FAIL vanishing" in out and "fc1" in out and "fc4" in out


def test_bounds_options_go_through_resolve(capsys):
    code, out, _ = run_cli(capsys, f"{SEED}:SigmoidNet", "--input-shape", "1,64", "--min-ratio", "off")
    assert code == EXIT_HEALTHY
    assert "verdict: healthy" in out


def test_inputs_are_inferred_without_input_shape(capsys):
    code, out, _ = run_cli(capsys, f"{SEED}:ReLUNet", "--format", "json")
    assert code == EXIT_HEALTHY
    profile = json.loads(out)["results"][0]["profile"]
    assert profile["input_shapes"] == ["float32[8, 64]"]


@pytest.mark.parametrize("attr", ["instance", "build"])
def test_instance_and_factory_targets(capsys, models_file, attr):
    code, out, err = run_cli(capsys, f"{models_file}:{attr}", "--input-shape", "2,4", "--min-ratio", "off")
    assert code == EXIT_HEALTHY, err
    assert "NeedsWidth" in out


def test_a_rejected_input_gets_advice_in_the_command_lines_terms(capsys, models_file):
    code, _, err = run_cli(capsys, f"{models_file}:Sequence")
    assert code == EXIT_USAGE
    # The shape fits the first layer (batch-first LSTM: batch, steps, features), in CLI options.
    assert "--input-shape 8,16,6" in err
    assert "inputs=" not in err


def test_integer_and_float_inputs_per_shape(capsys, models_file):
    argv = [
        f"{models_file}:Tokens",
        "--input-shape",
        "2,5",
        "--input-shape",
        "1",
        "--input-dtype",
        "int64",
        "--input-dtype",
        "float32",
        "--format",
        "json",
        "--seed",
        "3",
    ]
    code, out, err = run_cli(capsys, *argv)
    assert code == EXIT_HEALTHY, err
    result = json.loads(out)["results"][0]
    assert result["profile"]["input_shapes"] == ["int64[2, 5]", "float32[1]"]
    assert result["profile"]["seed"] == 3
    assert [layer["name"] for layer in result["profile"]["layers"]] == ["embed", "head"]


def test_markdown_format(capsys):
    code, out, _ = run_cli(capsys, f"{SEED}:SigmoidNet", "--input-shape", "1,64", "--format", "markdown")
    assert code == EXIT_FAILING
    assert out.startswith("## Gradient report")
    assert "| `fc1`" in out and "vanishing" in out


def test_json_format_is_one_strict_document(capsys):
    code, out, _ = run_cli(capsys, f"{SEED}:SigmoidNet", "--input-shape", "1,64", "--format", "json")
    assert code == EXIT_FAILING
    document = json.loads(out)
    (result,) = document["results"]
    assert result["verdict"] == "vanishing"
    assert result["nodeid"] == f"{SEED}:SigmoidNet"
    assert result["ratio"] < 0.05


@pytest.mark.parametrize(
    "target, expected",
    [
        ("no_such_package_xyz.models:Net", "module not found: 'no_such_package_xyz.models'"),
        ("{seed}:NoSuchNet", "attribute missing"),
        ("{models}:NeedsWidth", "constructor needs arguments: {models}:NeedsWidth(width)"),
        ("{models}:not_a_model", "not_a_model() returned a value of type int, not an nn.Module"),
        ("{models}:number", "is of type int, not an nn.Module instance"),
        ("missing_dir/models.py:Net", "file not found: 'missing_dir/models.py'"),
        ("just_a_module", "TARGET must look like package.module:attr"),
    ],
)
def test_load_errors_name_the_failing_part(capsys, models_file, target, expected):
    target = target.format(seed=SEED, models=models_file)
    code, out, err = run_cli(capsys, target)
    assert code == EXIT_USAGE
    assert expected.format(models=models_file) in err
    assert err.startswith("gradcheck: error: ") and err.count("\n") == 1
    assert "Traceback" not in err and out == ""


def test_attribute_missing_lists_the_models_defined(capsys):
    _, _, err = run_cli(capsys, f"{SEED}:SigmoidNt")
    assert "models it defines: SigmoidNet, SmallInitNet, ReLUNet" in err


def test_module_that_fails_to_import_is_reported_with_its_location(capsys, tmp_path):
    (tmp_path / "models_broken.py").write_text("import torch\nraise RuntimeError('no GPU here')\n")
    code, _, err = run_cli(capsys, f"{tmp_path / 'models_broken.py'}:Net")
    assert code == EXIT_USAGE
    assert "RuntimeError: no GPU here" in err and "models_broken.py:2" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--input-shape", "1,x"], "'1,x' is not a shape"),
        (["--input-shape", "1,0"], "every size must be a positive integer"),
        (["--input-dtype", "int64"], "--input-dtype needs --input-shape"),
        (
            [
                "--input-shape",
                "1,64",
                "--input-shape",
                "1,64",
                "--input-dtype",
                "float32",
                "--input-dtype",
                "int64",
                "--input-dtype",
                "bool",
            ],
            "got 3 --input-dtype for 2 --input-shape",
        ),
        (["--min-ratio", "5", "--max-ratio", "1"], "min_ratio=5.0 is above max_ratio=1.0"),
        (["--min-ratio", "lots"], "min_ratio must be a number or 'off'"),
        (["--fail-on-unused", "maybe"], "fail_on_unused must be true or false"),
        (["--plot", "chart.jpg"], "must end in .png or .svg"),
        (["--tolerance", "3"], "--tolerance applies to --baseline"),
        (["--input-shape", "1,3"], "cannot probe"),
        (["--device", "nonsense"], "cannot use device 'nonsense'"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, expected):
    code, _, err = run_cli(capsys, f"{SEED}:ReLUNet", *argv)
    assert code == EXIT_USAGE
    assert expected in err
    assert "Traceback" not in err


def test_help_shows_an_example(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "example:" in out
    assert "gradcheck examples/seed_networks.py:SigmoidNet --input-shape 1,64 --plot sig.png" in out
    assert "exit status: 0 healthy, 1 a failing finding" in out


def test_plot_without_matplotlib_is_a_one_line_usage_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an uninstalled package looks like to find_spec
    code, _, err = run_cli(capsys, f"{SEED}:ReLUNet", "--plot", "chart.png")
    assert code == EXIT_USAGE
    assert err.count("\n") == 1
    assert 'pip install "pytest-gradcheck[plot]"' in err
    assert 'pip install -e ".[plot]"' in err  # what works from a clone, before the package is published


def test_pytest_grad_plot_without_matplotlib_is_a_usage_error(pytester, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--grad-plot", "plots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "ERROR: --grad-plot: gradient-flow plots need matplotlib, which is not installed; "
        'run: pip install "pytest-gradcheck[plot]" (from a clone of the repository: pip install -e ".[plot]"; '
        "or just pip install matplotlib)" in result.stderr.lines
    )


def test_baseline_round_trip_and_regression(capsys, tmp_path):
    baseline = tmp_path / "relu.json"
    relu = [f"{SEED}:ReLUNet", "--input-shape", "1,64"]
    code, _, err = run_cli(capsys, *relu, "--save-baseline", str(baseline))
    assert code == EXIT_HEALTHY and f"wrote baseline to {baseline}" in err
    assert json.loads(baseline.read_text())["model"] == "ReLUNet"

    code, out, _ = run_cli(capsys, *relu, "--baseline", str(baseline))
    assert code == EXIT_HEALTHY
    assert f"baseline {baseline}: within tolerance" in out

    # Pretend fc2 used to get 3x the gradient it gets now: out of the default 2x tolerance.
    data = json.loads(baseline.read_text())
    data["layers"][1]["grad_mean_abs"] *= 3
    baseline.write_text(json.dumps(data))
    code, out, _ = run_cli(capsys, *relu, "--baseline", str(baseline))
    assert code == EXIT_FAILING
    assert "REGRESSED" in out and "fc2" in out and "out of tolerance" in out

    code, out, _ = run_cli(capsys, *relu, "--baseline", str(baseline), "--tolerance", "4")
    assert code == EXIT_HEALTHY


def test_baseline_diff_goes_to_stderr_with_json(capsys, tmp_path):
    baseline = tmp_path / "relu.json"
    relu = [f"{SEED}:ReLUNet", "--input-shape", "1,64"]
    run_cli(capsys, *relu, "--save-baseline", str(baseline))
    code, out, err = run_cli(capsys, *relu, "--baseline", str(baseline), "--format", "json")
    assert code == EXIT_HEALTHY
    assert json.loads(out)["results"][0]["verdict"] == "healthy"
    assert "within tolerance" in err


def test_missing_baseline_says_how_to_create_it(capsys, tmp_path):
    missing = tmp_path / "none.json"
    code, _, err = run_cli(capsys, f"{SEED}:ReLUNet", "--baseline", str(missing))
    assert code == EXIT_USAGE
    assert "does not exist" in err and f"--save-baseline {missing}" in err


def _run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_help_and_option_errors_do_not_import_torch_or_matplotlib():
    code = (
        "import sys, pytest_gradcheck.cli, pytest_gradcheck.report.plot; "
        "print(sorted({'torch', 'matplotlib'} & set(sys.modules)))"
    )
    done = _run(sys.executable, "-c", code)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.slow
def test_python_dash_m_exits_1_on_the_sigmoid_net():
    done = _run(
        sys.executable, "-m", "pytest_gradcheck", "examples/seed_networks.py:SigmoidNet", "--input-shape", "1,64"
    )
    assert done.returncode == EXIT_FAILING, done.stderr
    assert "verdict: vanishing" in done.stdout


@pytest.mark.slow
def test_console_script_load_error_has_no_traceback():
    script = shutil.which("gradcheck", path=str(pathlib.Path(sys.executable).parent))
    if script is None:
        pytest.skip("the gradcheck console script is not installed (pip install -e . creates it)")
    done = _run(script, "no_such_package_xyz:Net")
    assert done.returncode == EXIT_USAGE
    assert "module not found: 'no_such_package_xyz'" in done.stderr
    assert "Traceback" not in done.stderr
