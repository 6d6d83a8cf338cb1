"""Every exception pytest-gradcheck raises to its users, in one place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_gradcheck.core.findings import Finding
    from pytest_gradcheck.core.profile import GradientProfile


class ProbeError(ValueError):
    """The model could not be probed: bad model, bad inputs or an unusable output.

    ``problem`` is what went wrong; where the fix is other inputs, ``inputs_shape`` is a shape
    that fits the model's first layer as far as its weights show (``...`` where they do not),
    and the message ends with advice in Python terms. The command line words that advice
    for its own options instead.
    """

    def __init__(self, problem: str, *, inputs_shape: Sequence[int | str] | None = None) -> None:
        self.problem = problem
        self.inputs_shape = tuple(inputs_shape) if inputs_shape is not None else None
        advice = ""
        if self.inputs_shape is not None:
            example = f"torch.randn({', '.join(str(size) for size in self.inputs_shape)})"
            advice = (
                f"; pass inputs= that fit its forward(), e.g. gradient_health(model, inputs={example}) or "
                "probe(model, inputs={'input_ids': ids}); a zero-argument callable that returns them works too"
            )
        super().__init__(problem + advice)


class GradientHealthError(AssertionError):
    """A gradient check failed; carries the profile and the findings behind it."""

    def __init__(self, message: str, profile: GradientProfile | None = None, findings: Sequence[Finding] = ()) -> None:
        super().__init__(message)
        self.profile = profile
        self.findings = list(findings)


class BaselineFileError(ValueError):
    """A gradient baseline file is missing, unreadable, corrupt or written by a newer version."""

    def __init__(self, path: str, problem: str, hint: bool = True) -> None:
        message = f"gradient baseline {path} {problem}"
        if hint:
            # The file is never overwritten behind the user's back, so say how to replace it.
            message += "; fix or delete it, or rewrite it with pytest --grad-baseline-update"
        super().__init__(message)
        self.path = path
        self.problem = problem
        self.hint = hint


class SettingError(ValueError):
    """A bound or setting has a value it cannot take; ``setting`` names it as Python spells it.

    The message says what the value must be. Where the value came from (an ini key, a
    command-line flag, a keyword) is added by whoever read it.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


class TargetError(Exception):
    """The command line's TARGET could not be turned into a model; the message names the part that failed."""


class PlotUnavailable(RuntimeError):
    """A plot was asked for, but matplotlib is not installed; the message says what to install."""


class CommandLineError(Exception):
    """The ``gradcheck`` command cannot go on: a bad option, or a TARGET that cannot be loaded or probed.

    The command prints the message on one line and exits with status 2.
    """
