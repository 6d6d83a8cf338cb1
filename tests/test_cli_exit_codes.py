"""The gradcheck command's exit codes: 1 means an unhealthy model and nothing else."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

# Module-level factory of a model whose probe fails in a way no message was written for:
# gradients can only come from autograd, and here every way into it raises a KeyError,
# as a bug inside the probe machinery would.
BROKEN_MACHINERY = textwrap.dedent(
    """
    import torch
    from torch import nn


    def _boom(*args, **kwargs):
        raise KeyError("simulated bug inside the probe")


    def build():
        torch.manual_seed(0)
        torch.autograd.grad = _boom
        torch.autograd.backward = _boom
        torch.Tensor.backward = _boom
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    """
)

# Many parallel branches: a healthy model whose JSON report is far larger than a pipe's buffer.
WIDE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList(nn.Linear(4, 4) for _ in range(400))

        def forward(self, x):
            return sum(branch(x) for branch in self.branches)
    """
)


def gradcheck(cwd, *argv, **kwargs):
    # cwd is a temporary folder: `python -m` puts the working directory first on sys.path.
    return subprocess.run(
        [sys.executable, "-m", "pytest_gradcheck", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


@pytest.fixture
def broken(tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN_MACHINERY)
    return tmp_path, f"{tmp_path / 'broken.py'}:build"


def test_internal_error_exits_2_not_1(broken):
    cwd, target = broken
    done = gradcheck(cwd, target)
    assert done.returncode == 2, f"exit {done.returncode}; stderr:\n{done.stderr}"


def test_internal_error_is_one_line_on_stderr_with_a_hint_to_rerun_with_traceback(broken):
    cwd, target = broken
    done = gradcheck(cwd, target)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr
    assert "simulated bug inside the probe" in lines[0]
    assert "--traceback" in lines[0]


def test_traceback_option_shows_the_traceback_of_an_internal_error(broken):
    cwd, target = broken
    done = gradcheck(cwd, target, "--traceback")
    assert done.returncode == 2, f"exit {done.returncode}; stderr:\n{done.stderr}"
    assert "Traceback (most recent call last)" in done.stderr
    assert "KeyError" in done.stderr and "simulated bug inside the probe" in done.stderr


def test_closed_stdout_neither_prints_a_broken_pipe_traceback_nor_exits_1(tmp_path):
    (tmp_path / "wide.py").write_text(WIDE)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest_gradcheck",
            f"{tmp_path / 'wide.py'}:Wide",
            "--format",
            "json",
            "--min-ratio",
            "off",
            "--max-ratio",
            "off",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = process.stdout.readline()  # `gradcheck ... | head -1`
    process.stdout.close()
    stderr = process.stderr.read().decode()
    code = process.wait(timeout=120)
    assert first.strip() == b"{"
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr
    assert code in (0, 141, -signal.SIGPIPE), f"exit {code} for a healthy model whose reader went away"
