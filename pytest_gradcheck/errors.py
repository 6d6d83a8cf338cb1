"""Exceptions raised to users: a failed health check and a probe that could not run."""

from __future__ import annotations


class ProbeError(ValueError):
    """The model could not be probed: bad model, bad inputs or an unusable output."""


class GradientHealthError(AssertionError):
    """A gradient check failed; carries the profile and the findings behind it."""

    def __init__(self, message: str, profile=None, findings=()):
        super().__init__(message)
        self.profile = profile
        self.findings = list(findings)


class BaselineFileError(ValueError):
    """A gradient baseline file is missing, unreadable, corrupt or written by a newer version."""

    def __init__(self, path: str, problem: str, hint: bool = True):
        message = f"gradient baseline {path} {problem}"
        if hint:
            # The file is never overwritten behind the user's back, so say how to replace it.
            message += "; fix or delete it, or rewrite it with pytest --grad-baseline-update"
        super().__init__(message)
        self.path = path
        self.problem = problem
        self.hint = hint
