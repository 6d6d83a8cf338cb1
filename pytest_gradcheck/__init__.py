"""pytest-gradcheck: catch vanishing and exploding gradients in PyTorch models from your tests.

The public API is what this module exports; everything else may change. Importing it
costs almost nothing: pytest loads the plugin in every run, so the public names are
loaded on first use, and torch only when a probe runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pytest_gradcheck._version import __version__

# Public name -> the module that defines it.
_EXPORTS = {
    # Probing and judging a model.
    "probe": "pytest_gradcheck.probing.runner",
    "assess": "pytest_gradcheck.health",
    "Assessment": "pytest_gradcheck.health",
    "check": "pytest_gradcheck.core.checks",
    "diagnose": "pytest_gradcheck.core.diagnosis",
    "Bounds": "pytest_gradcheck.core.bounds",
    # What they return: plain data.
    "GradientProfile": "pytest_gradcheck.core.profile",
    "LayerStats": "pytest_gradcheck.core.profile",
    "ActivationProfile": "pytest_gradcheck.core.profile",
    "Finding": "pytest_gradcheck.core.findings",
    "Cause": "pytest_gradcheck.core.findings",
    # Baseline files.
    "load_baseline": "pytest_gradcheck.core.baseline",
    "save_baseline": "pytest_gradcheck.core.baseline",
    "compare_baseline": "pytest_gradcheck.core.baseline",
    "BaselineComparison": "pytest_gradcheck.core.baseline",
    # Errors.
    "GradientHealthError": "pytest_gradcheck.errors",
    "ProbeError": "pytest_gradcheck.errors",
    "BaselineFileError": "pytest_gradcheck.errors",
    "SettingError": "pytest_gradcheck.errors",
}
__all__ = [
    "ActivationProfile",
    "Assessment",
    "BaselineComparison",
    "BaselineFileError",
    "Bounds",
    "Cause",
    "Finding",
    "GradientHealthError",
    "GradientProfile",
    "LayerStats",
    "ProbeError",
    "SettingError",
    "__version__",
    "assess",
    "check",
    "compare_baseline",
    "diagnose",
    "load_baseline",
    "probe",
    "save_baseline",
]

if TYPE_CHECKING:
    from pytest_gradcheck.core.baseline import BaselineComparison, compare_baseline, load_baseline, save_baseline
    from pytest_gradcheck.core.bounds import Bounds
    from pytest_gradcheck.core.checks import check
    from pytest_gradcheck.core.diagnosis import diagnose
    from pytest_gradcheck.core.findings import Cause, Finding
    from pytest_gradcheck.core.profile import ActivationProfile, GradientProfile, LayerStats
    from pytest_gradcheck.errors import BaselineFileError, GradientHealthError, ProbeError, SettingError
    from pytest_gradcheck.health import Assessment, assess
    from pytest_gradcheck.probing.runner import probe


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pytest_gradcheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
