"""The plugin's own hooks, for a project's conftest.py to implement."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_gradcheck.core.profile import GradientProfile


@pytest.hookspec(firstresult=True)
def pytest_gradcheck_make_inputs(model: Any) -> Any:
    """Default inputs for ``model`` when a test calls ``gradient_health(model)`` without inputs.

    Return anything ``inputs=`` accepts: a tensor, a tuple or list of positional
    arguments, a dict of keyword arguments, or a zero-argument callable returning
    one of these (called under the probe's seed, so random inputs repeat exactly).
    Return ``None`` to leave the model to the next implementation and, last, to
    the built-in inference. The first non-``None`` result wins; a conftest.py
    applies to the tests in its own directory and below.
    """


@pytest.hookspec
def pytest_gradcheck_profile(item: pytest.Item, profile: GradientProfile) -> None:
    """Called with the test item and the ``GradientProfile`` of every model it probes.

    For observers, such as logging profiles to an experiment tracker. It runs
    before the checks can fail the test, so failing profiles are seen too. Under
    pytest-xdist it runs in the worker that ran the test. The return value is ignored.
    """
