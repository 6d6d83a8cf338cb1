"""pytest-gradcheck: catch vanishing and exploding gradients in PyTorch models from your tests.

Importing this package does not import torch; ``probe`` loads it on first use.
"""

from __future__ import annotations

from pytest_gradcheck.bounds import Bounds
from pytest_gradcheck.checks import Finding
from pytest_gradcheck.errors import GradientHealthError, ProbeError
from pytest_gradcheck.profile import GradientProfile, LayerStats

__all__ = [
    "Bounds",
    "Finding",
    "GradientHealthError",
    "GradientProfile",
    "LayerStats",
    "ProbeError",
    "probe",
]
__version__ = "0.1.0"


def probe(model, inputs=None, *, loss_fn=None, seed=0) -> GradientProfile:
    """Run one forward and backward pass of ``model`` and return its GradientProfile.

    See :func:`pytest_gradcheck.probe.probe` for the full contract.
    """
    from pytest_gradcheck.probe import probe as run_probe

    return run_probe(model, inputs, loss_fn=loss_fn, seed=seed)
