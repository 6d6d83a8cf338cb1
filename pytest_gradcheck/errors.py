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
