"""One health assessment: probe, check, and explain what failed. Shared by the fixture, the CLI and scripts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from pytest_gradcheck.core.bounds import Bounds, resolve
from pytest_gradcheck.core.checks import check
from pytest_gradcheck.core.diagnosis import DIAGNOSED_RULES, explain
from pytest_gradcheck.core.findings import Finding, failing, verdict
from pytest_gradcheck.core.profile import GradientProfile

if TYPE_CHECKING:
    import torch
    from torch import nn


class Assessment(NamedTuple):
    """A probed model's profile and its findings; unpacks as ``profile, findings``."""

    profile: GradientProfile
    findings: list[Finding]

    @property
    def verdict(self) -> str:
        """'healthy', or the failing rules joined by '+' (e.g. 'vanishing+dead')."""
        return verdict(self.findings)

    @property
    def failing(self) -> list[Finding]:
        """The findings that fail."""
        return failing(self.findings)


def assess(
    model: nn.Module,
    inputs: Any = None,
    *,
    bounds: Bounds | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    seed: int = 0,
    diagnose: bool | None = None,
    detail: bool = False,
    **overrides: Any,
) -> Assessment:
    """Probe ``model`` once, check its profile against ``bounds`` and explain what failed.

    ``diagnose`` decides whether the instrumented activation pass runs as well: None (the
    default) runs it only when it is needed, that is when a vanishing or exploding finding
    fails or the dead_relu or saturation rule is on; True always; False never. When it runs,
    ``profile.activations`` holds its numbers and the vanishing and exploding findings carry
    ranked ``causes``. ``detail`` asks the probe for the statistics beyond mean |grad| (a
    report or plot shows them); the ``max_grad`` bound asks for them by itself.

    Keyword bounds (``min_ratio=0.05``, ``max_ratio="off"``, ...) override ``bounds``, or
    the defaults when it is None. ``model`` may also be a model class or a zero-argument
    factory: it is built under ``seed``, so its initial weights are the same in every run.
    """
    __tracebackhide__ = True
    from pytest_gradcheck.probing.model_io import model_from  # torch is imported here, never at plugin load
    from pytest_gradcheck.probing.runner import ModelRun

    model = model_from(model, seed)

    if bounds is None or overrides:
        bounds = resolve(bounds.to_dict() if bounds else {}, overrides)
    with ModelRun(model, inputs, seed=seed) as run:
        profile = run.gradient_profile(loss_fn=loss_fn, detail=detail or bounds.max_grad is not None)
        if diagnose or (diagnose is None and needs_activations(bounds)):
            profile = dataclasses.replace(profile, activations=run.activation_profile())
        findings = check(profile, bounds)
        if profile.activations is None and diagnose is None and _needs_explaining(findings):
            # The activation rules are off, so their findings do not change with these numbers.
            profile = dataclasses.replace(profile, activations=run.activation_profile())
    if profile.activations is not None:
        findings = explain(profile, findings, bounds)
    return Assessment(profile, findings)


def needs_activations(bounds: Bounds) -> bool:
    """Whether a rule that reads activation statistics is on."""
    return bounds.dead_relu is not None or bounds.saturation is not None


def _needs_explaining(findings: list[Finding]) -> bool:
    return any(finding.failing and finding.rule in DIAGNOSED_RULES for finding in findings)
