"""One health assessment: probe, then check. Shared by the fixture and the command line."""

from __future__ import annotations

from typing import Any, Callable

from pytest_gradcheck.bounds import Bounds
from pytest_gradcheck.checks import Finding, check
from pytest_gradcheck.profile import GradientProfile


def assess(
    model: Any,
    inputs: Any = None,
    *,
    bounds: Bounds,
    loss_fn: Callable | None = None,
    seed: int = 0,
) -> tuple[GradientProfile, list[Finding]]:
    """Probe ``model`` once and check the profile against ``bounds``."""
    from pytest_gradcheck.probe import probe  # torch is imported here, never at plugin load

    profile = probe(model, inputs, loss_fn=loss_fn, seed=seed)
    return profile, check(profile, bounds)
