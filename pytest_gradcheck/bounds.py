"""Where the bounds are resolved: defaults, then ini, command line, marker and keyword."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

# Measured by benchmarks/measure_bounds.py; the table is in README ("Default bounds").
DEFAULT_MIN_RATIO = 0.05
DEFAULT_MAX_RATIO = 20.0

_OFF_WORDS = {"off", "none", "no", "false", ""}


@dataclass(frozen=True)
class Bounds:
    """The thresholds the checks apply. ``None`` switches a bound off."""

    min_ratio: float | None = DEFAULT_MIN_RATIO
    max_ratio: float | None = DEFAULT_MAX_RATIO
    max_grad: float | None = None
    fail_on_unused: bool = False

    def describe(self) -> str:
        """One line naming every active bound, for headers and reports."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts.append(f"{f.name}={'off' if value is None else value}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


BOUND_NAMES = tuple(f.name for f in dataclasses.fields(Bounds))


def parse_bound(name: str, raw: Any) -> Any:
    """Turn an ini or command-line string into a bound's value, with a clear error."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip().lower()
    field_type = {f.name: f.type for f in dataclasses.fields(Bounds)}[name]
    if "bool" in str(field_type):
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"gradcheck: {name} must be true or false, got {raw!r}")
    if text in _OFF_WORDS:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"gradcheck: {name} must be a number or 'off', got {raw!r}"
        ) from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"gradcheck: {name} must be a non-negative number, got {raw!r}")
    return value


def resolve(*layers: Mapping[str, Any]) -> Bounds:
    """Merge bound layers, later ones overriding earlier ones, onto the defaults.

    Each layer maps bound names to values; a key that is absent leaves the
    value from the layer below, while an explicit ``None`` switches the bound off.
    """
    values: dict[str, Any] = {}
    for layer in layers:
        for name, raw in layer.items():
            if name not in BOUND_NAMES:
                known = ", ".join(BOUND_NAMES)
                raise TypeError(f"gradcheck: unknown bound {name!r}; known bounds: {known}")
            values[name] = parse_bound(name, raw)
    bounds = Bounds(**values)
    _validate(bounds)
    return bounds


def _validate(bounds: Bounds) -> None:
    low, high = bounds.min_ratio, bounds.max_ratio
    if low is not None and high is not None and low > high:
        raise ValueError(
            f"gradcheck: min_ratio={low} is above max_ratio={high}; no model could pass. "
            "Lower min_ratio or raise max_ratio."
        )
