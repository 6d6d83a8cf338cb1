"""Synthetic plain-data profiles (no torch): layers and profiles built by hand for the pure tests."""

from __future__ import annotations

import math

from pytest_gradcheck.core.profile import GradientProfile, LayerStats


def make_layer(name: str, mean: float = 1.0, *, detail: bool = True, **fields) -> LayerStats:
    """A Linear layer of 4160 parameters with mean |grad| ``mean``; ``fields`` override any statistic.

    ``finite`` and ``all_zero`` follow from ``mean``; the detail statistics (largest |grad|,
    gradient and weight norms, zero fraction) scale with it, or are None without ``detail``.
    """
    values = {
        "name": name,
        "kind": "Linear",
        "numel": 4160,
        "grad_mean_abs": mean,
        "finite": math.isfinite(mean),
        "all_zero": mean == 0.0,
    }
    if detail:
        values.update(grad_max_abs=mean * 8, grad_norm=mean * 64, weight_norm=4.6, zero_fraction=0.0)
    values.update(fields)
    return LayerStats(**values)


def make_profile(
    *layers: LayerStats | float, names: list[str] | None = None, detail: bool = True, **fields
) -> GradientProfile:
    """A profile of model "Net" with loss 1.0 (``fields`` override these and the other attributes).

    Each of ``layers`` is a LayerStats, or a mean |grad| that becomes a make_layer() named
    from ``names``, one name per position (default fc1, fc2, ...).
    """
    names = names or [f"fc{index + 1}" for index in range(len(layers))]
    built = [
        item if isinstance(item, LayerStats) else make_layer(name, item, detail=detail)
        for name, item in zip(names, layers, strict=True)
    ]
    return GradientProfile(**{"model": "Net", "layers": built, "loss": 1.0, **fields})


def rising(count: int, first: float = 1e-4, last: float = 1e-1) -> list[float]:
    """``count`` means rising geometrically from ``first`` to ``last``."""
    return [first * (last / first) ** (index / max(1, count - 1)) for index in range(count)]
