"""Diagnosis: rank the likely causes of a failing finding, from the profile alone (no torch)."""

from __future__ import annotations

import dataclasses

from pytest_gradcheck.core.bounds import Bounds
from pytest_gradcheck.core.findings import Cause, Finding
from pytest_gradcheck.core.profile import GradientProfile
from pytest_gradcheck.core.ratio_causes import dead_causes, ratio_causes
from pytest_gradcheck.core.signal_causes import signal_causes, time_causes
from pytest_gradcheck.errors import SettingError

CAUSES = ("saturation", "dead_relu", "initialisation", "depth", "recurrence", "residual")
DIAGNOSED_RULES = (
    "vanishing",
    "exploding",
    "dead",
    "vanishing_signal",
    "exploding_signal",
    "vanishing_in_time",
    "exploding_in_time",
)


def explain(profile: GradientProfile, findings: list[Finding], bounds: Bounds | None = None) -> list[Finding]:
    """``findings`` with the ranked causes of each one a cause can be found for, best explanation first.

    Returns new findings; the ones given are left as they are.
    """
    return [
        dataclasses.replace(finding, causes=tuple(diagnose(profile, finding.rule, bounds, finding.layers)))
        if finding.rule in DIAGNOSED_RULES and finding.failing
        else finding
        for finding in findings
    ]


def diagnose(
    profile: GradientProfile, rule: str, bounds: Bounds | None = None, layers: list[str] | None = None
) -> list[Cause]:
    """Ranked causes of ``rule`` (one of DIAGNOSED_RULES); [] when nothing stands out.

    ``layers`` narrows a finding through time to the recurrent layers it names.

    Each :class:`Cause` has a ``cause`` (one of CAUSES), a one-line ``summary``, the
    ``evidence`` (the numbers, with ``log10_factor``: how many decades of what failed it
    accounts for) and a ``fix``. Most causes need ``profile.activations``, which
    ``pytest_gradcheck.assess`` measures whenever a finding needs explaining.
    """
    if rule not in DIAGNOSED_RULES:
        raise SettingError("rule", f"diagnose() explains {', '.join(DIAGNOSED_RULES)}; not {rule!r}")
    bounds = bounds or Bounds()
    data = profile.activations
    if rule in ("vanishing_in_time", "exploding_in_time"):
        bound = bounds.min_time_ratio if rule == "vanishing_in_time" else bounds.max_time_ratio
        causes = time_causes(profile, rule, layers or [steps.layer for steps in profile.time], bound)
    elif rule in ("vanishing_signal", "exploding_signal"):
        causes = signal_causes(profile, data, rule)
    elif data is None:
        return []
    elif rule == "dead":
        causes = dead_causes(profile, data, bounds)
    else:
        causes = ratio_causes(profile, data, rule, bounds)
    return sorted(causes, key=lambda cause: -cause.log10_factor)
