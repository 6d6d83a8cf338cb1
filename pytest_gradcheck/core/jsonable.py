"""Plain data made ready for strict JSON, which has no NaN or Infinity."""

from __future__ import annotations

import math
from typing import Any


def strict_json(value: Any, significant_digits: int | None = None) -> Any:
    """``value`` ready for strict JSON: NaN and infinities as strings, floats optionally rounded.

    JSON has no NaN or Infinity, and strict readers (jq, browsers) reject Python's tokens;
    the strings "NaN", "Infinity" and "-Infinity" are what float() and Number() read back.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return float(f"{value:.{significant_digits}g}") if significant_digits else value
    if isinstance(value, dict):
        return {key: strict_json(item, significant_digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item, significant_digits) for item in value]
    return value
