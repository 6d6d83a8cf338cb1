import sys

# torch must be imported before any in-process pytester run: pytester unloads the
# modules a run imported, and torch cannot be imported twice in one process.
# Hypothesis's pytest plugin imports the whole package at every session's end, and pytest
# rewrites the asserts of each of its modules; importing it here once keeps that out of
# every in-process pytester run (several seconds each otherwise).
import hypothesis  # noqa: F401
import pytest
import torch  # noqa: F401

# pytest put this folder on sys.path before importing this file: the test modules import
# their shared helpers as `helpers.*` (with pytest's assert messages), and the notebook's
# seed networks from examples/.
pytest.register_assert_rewrite("helpers")

from helpers import EXAMPLES  # noqa: E402

if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
