"""pytest-gradcheck: catch vanishing and exploding gradients in PyTorch models from your tests.

Importing this package costs almost nothing: pytest loads the plugin in every run, so
the public names are loaded on first use, and torch only when a probe runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Bounds": "pytest_gradcheck.bounds",
    "Finding": "pytest_gradcheck.checks",
    "GradientHealthError": "pytest_gradcheck.errors",
    "ProbeError": "pytest_gradcheck.errors",
    "BaselineFileError": "pytest_gradcheck.errors",
    "GradientProfile": "pytest_gradcheck.profile",
    "LayerStats": "pytest_gradcheck.profile",
}
__all__ = sorted([*_EXPORTS, "probe"])

if TYPE_CHECKING:
    from pytest_gradcheck.bounds import Bounds
    from pytest_gradcheck.checks import Finding
    from pytest_gradcheck.errors import BaselineFileError, GradientHealthError, ProbeError
    from pytest_gradcheck.profile import GradientProfile, LayerStats


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pytest_gradcheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


def probe(model, inputs=None, *, loss_fn=None, seed=0, detail=False) -> GradientProfile:
    """Run one forward and one backward pass of ``model`` and return its GradientProfile.

    ``inputs`` is a tensor, a tuple or list (positional), a dict (keyword
    arguments), a zero-argument callable returning one of these, or None to infer
    them from the first layer. ``loss_fn(output)`` returns the scalar to
    differentiate (default: the output's sum, or its ``loss`` entry). ``detail=True``
    adds each layer's largest |grad|, gradient and weight L2 norms and share of exact
    zeros, at the cost of more reads of every gradient. The model is left exactly as
    it was. See README, "What the probe measures".
    """
    from pytest_gradcheck.probing import probe as run_probe

    return run_probe(model, inputs, loss_fn=loss_fn, seed=seed, detail=detail)
