"""The ``gradient_health`` fixture: probe a model, check it, and fail the test when it is unhealthy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pytest_gradcheck.core import bounds as bounds_mod
from pytest_gradcheck.plugin.baselines import baseline_settings, check_baseline
from pytest_gradcheck.plugin.options import SETTINGS_KEY, marker_settings
from pytest_gradcheck.plugin.transport import remember_result


@pytest.fixture
def gradient_health(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Probe a model, check its gradients, and fail the test when they are unhealthy.

    Call it as ``gradient_health(model, inputs=None, *, loss_fn=None, seed=0,
    name=None, baseline=None, tolerance=None, **bounds)``; it returns the GradientProfile.
    ``model`` is a model, or its class or a zero-argument factory, which the probe then
    builds under ``seed`` (the same initial weights in every run).
    """
    settings = request.config.stash[SETTINGS_KEY]
    item = request.node
    marker_bounds, marker_baseline = marker_settings(item)

    def gradient_health(
        model: Any,
        inputs: Any = None,
        *,
        loss_fn: Callable[[Any], Any] | None = None,
        seed: int = 0,
        name: str | None = None,
        baseline: bool | None = None,
        tolerance: float | None = None,
        **overrides: Any,
    ) -> Any:
        __tracebackhide__ = True
        # Imported here, not at plugin load: every pytest run in the environment loads the plugin.
        from pytest_gradcheck.errors import BaselineFileError, ProbeError, SettingError

        try:
            return _run(model, inputs, loss_fn, seed, name, baseline, tolerance, overrides)
        except (ProbeError, SettingError, BaselineFileError) as error:
            # Raised deep in the package: the traceback starts at the test's own line.
            raise error.with_traceback(None) from None

    def _run(
        model: Any,
        inputs: Any,
        loss_fn: Callable[[Any], Any] | None,
        seed: int,
        name: str | None,
        baseline: bool | None,
        tolerance: float | None,
        overrides: dict[str, Any],
    ) -> Any:
        __tracebackhide__ = True
        from pytest_gradcheck.core.findings import CheckResult
        from pytest_gradcheck.errors import GradientHealthError
        from pytest_gradcheck.health import assess
        from pytest_gradcheck.probing.model_io import is_factory, model_from
        from pytest_gradcheck.report.format import junit_properties
        from pytest_gradcheck.report.table import render_failure

        bounds = bounds_mod.resolve(settings.ini_bounds, settings.cli_bounds, marker_bounds, overrides)
        use_baseline, factor = baseline_settings(settings, marker_baseline, baseline, tolerance)
        built_here = is_factory(model)
        model = model_from(model, seed)
        if inputs is None:
            # item.ihook, not config.hook: a conftest.py answers for its own directory only.
            inputs = item.ihook.pytest_gradcheck_make_inputs(model=model)
        assessment = assess(model, inputs, bounds=bounds, loss_fn=loss_fn, seed=seed, detail=settings.detail)
        profile, findings = assessment
        item.ihook.pytest_gradcheck_profile(item=item, profile=profile)
        result = CheckResult(item.nodeid, name, profile, bounds, findings)
        remember_result(item, result)
        item.user_properties.extend(junit_properties(result))
        if assessment.failing:
            raise GradientHealthError(render_failure(profile, findings, settings.max_rows), profile, findings)
        if use_baseline:
            check_baseline(request, settings, profile, name, factor, seeded=built_here)
        return profile

    return gradient_health
