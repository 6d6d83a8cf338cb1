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
    diagnose: bool | None = None,
    detail: bool = False,
) -> tuple[GradientProfile, list[Finding]]:
    """Probe ``model`` once and check the profile against ``bounds``.

    ``diagnose`` decides whether the instrumented activation pass runs as well: None (the
    default) runs it only when it is needed, that is when a vanishing or exploding finding
    fires or the dead_relu or saturation rule is on; True always; False never. When it runs,
    ``profile.activations`` holds its numbers and those findings carry ranked ``causes``.
    ``detail`` asks the probe for the statistics beyond mean |grad| (a report or plot
    shows them); the ``max_grad`` bound asks for them by itself.
    """
    __tracebackhide__ = True
    from pytest_gradcheck.probing import probe  # torch is imported here, never at plugin load

    detail = detail or bounds.max_grad is not None
    profile = probe(model, inputs, loss_fn=loss_fn, seed=seed, detail=detail)
    findings = check(profile, bounds)
    if diagnose is None:
        diagnose = needs_activations(bounds) or any(
            finding.failing and finding.rule in ("vanishing", "exploding") for finding in findings
        )
    if diagnose:
        # A second forward pass with the same seed and inputs, so its numbers describe the probe's.
        from pytest_gradcheck.activations import measure
        from pytest_gradcheck.diagnosis import attach

        profile.activations = measure(model, inputs, seed=seed)
        findings = check(profile, bounds)
        attach(profile, findings, bounds)
    return profile, findings


def needs_activations(bounds: Bounds) -> bool:
    """Whether a rule that reads activation statistics is on."""
    return bounds.dead_relu is not None or bounds.saturation is not None
