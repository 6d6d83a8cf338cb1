# torch must be imported before any in-process pytester run: pytester unloads the
# modules a run imported, and torch cannot be imported twice in one process.
# Hypothesis's pytest plugin imports the whole package at every session's end, and pytest
# rewrites the asserts of each of its modules; importing it here once keeps that out of
# every in-process pytester run (several seconds each otherwise).
import hypothesis  # noqa: F401
import torch  # noqa: F401
