"""Where the bounds are resolved: defaults, then ini, command line, marker and keyword."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_gradcheck.errors import SettingError

# Measured by benchmarks/measure_bounds.py; the table is in the docs ("Default bounds").
DEFAULT_MIN_RATIO = 0.02
DEFAULT_MAX_RATIO = 50.0
# The forward signal: the std of a layer's input over the first layer's, anywhere in the
# network (benchmarks/zoo.py measures the zoo and the untrainable networks; docs, "Rules").
DEFAULT_MIN_SIGNAL = 1e-5
DEFAULT_MAX_SIGNAL = 10.0
# The initial cross-entropy of a classifier over the chance level ln(classes).
DEFAULT_MAX_INITIAL_LOSS = 10.0
# Through time: the gradient at the earliest step over the latest's. A contribution below
# 2**-24 of the largest one is lost when float32 sums them into the weight's gradient.
DEFAULT_MIN_TIME_RATIO = 2.0**-24
DEFAULT_MAX_TIME_RATIO = 2.0**24

_OFF_WORDS = {"off", "none", "no", "false", ""}

# The opt-in activation rules switch on at the thresholds of DeepDiagnosis (Wardat et al.,
# ICSE 2022): 70% dead ReLU units, 50% of sigmoid/tanh inputs saturated (|x| >= 5).
DEFAULT_DEAD_RELU = 0.7
DEFAULT_SATURATION = 0.5
SHARE_DEFAULTS = {"dead_relu": DEFAULT_DEAD_RELU, "saturation": DEFAULT_SATURATION}
_ON_WORDS = {"on", "true", "yes", "default"}


@dataclass(frozen=True)
class Bounds:
    """The thresholds the checks apply. ``None`` switches a bound off."""

    min_ratio: float | None = DEFAULT_MIN_RATIO
    max_ratio: float | None = DEFAULT_MAX_RATIO
    max_grad: float | None = None
    fail_on_unused: bool = False
    dead_relu: float | None = None
    saturation: float | None = None
    min_signal: float | None = DEFAULT_MIN_SIGNAL
    max_signal: float | None = DEFAULT_MAX_SIGNAL
    max_initial_loss: float | None = DEFAULT_MAX_INITIAL_LOSS
    min_time_ratio: float | None = DEFAULT_MIN_TIME_RATIO
    max_time_ratio: float | None = DEFAULT_MAX_TIME_RATIO

    def __post_init__(self) -> None:
        # Bounds(dead_relu=True) from Python means "on at the published default", as in ini.
        for name in SHARE_DEFAULTS:
            object.__setattr__(self, name, parse_share(name, getattr(self, name)))

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
    if name in SHARE_DEFAULTS:
        return parse_share(name, raw)
    field_type = {f.name: f.type for f in dataclasses.fields(Bounds)}[name]
    if not isinstance(raw, str):
        # A marker or keyword value: a number gets the same checks as a parsed string.
        if raw is None or "bool" in str(field_type):
            return raw
        return _non_negative(name, raw)
    if "bool" in str(field_type):
        return parse_switch(name, raw)
    text = raw.strip().lower()
    if text in _OFF_WORDS:
        return None
    try:
        value = float(text)
    except ValueError:
        raise SettingError(name, f"{name} must be a number or 'off', got {raw!r}") from None
    return _non_negative(name, value, raw)


def parse_switch(name: str, raw: str) -> bool:
    """An on/off setting from an ini or command-line string: true/false, yes/no, on/off or 1/0."""
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise SettingError(name, f"{name} must be true or false, got {raw!r}")


def _non_negative(name: str, value: Any, raw: Any = None) -> float:
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number) or number < 0:
        shown = value if raw is None else raw
        raise SettingError(name, f"{name} must be a non-negative number or 'off', got {shown!r}")
    return number


def parse_share(name: str, raw: Any) -> float | None:
    """A share rule's threshold: 'on' or True gives the published default, 'off' None, else 0 < share <= 1."""
    default = SHARE_DEFAULTS[name]
    if raw is None or raw is False:
        return None
    if raw is True:
        return default
    value = raw
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _ON_WORDS:
            return default
        if text in _OFF_WORDS:
            return None
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            value = math.nan
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise SettingError(
            name,
            f"{name} must be a share between 0 and 1 (e.g. 0.7 or 70%), "
            f"'on' for the published default {default:g}, or 'off'; got {raw!r}",
        )
    return float(value)


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
                raise TypeError(f"unknown bound {name!r}; known bounds: {known}")
            values[name] = parse_bound(name, raw)
    bounds = Bounds(**values)
    _validate(bounds)
    return bounds


def _validate(bounds: Bounds) -> None:
    for low_name, high_name in (
        ("min_ratio", "max_ratio"),
        ("min_signal", "max_signal"),
        ("min_time_ratio", "max_time_ratio"),
    ):
        low, high = getattr(bounds, low_name), getattr(bounds, high_name)
        if low is not None and high is not None and low > high:
            raise SettingError(
                low_name,
                f"{low_name}={low} is above {high_name}={high}; no model could pass. "
                f"Lower {low_name} or raise {high_name}.",
            )


# The pytest option (--grad-*, ini grad_*) of each bound, with its help: (bound, flag, help).
# The command line uses the same table, without the "grad-" prefix.
BOUND_OPTIONS = (
    ("min_ratio", "--grad-min-ratio", "fail when first/last mean |grad| falls below this (or 'off')"),
    ("max_ratio", "--grad-max-ratio", "fail when first/last mean |grad| rises above this (or 'off')"),
    ("max_grad", "--grad-max-grad", "fail when any |grad| exceeds this absolute value (default: off)"),
    ("fail_on_unused", "--grad-fail-on-unused", "fail when trainable parameters get no gradient (true/false)"),
    ("dead_relu", "--grad-dead-relu", "fail when this share of a ReLU's units is dead ('on' = 0.7, default: off)"),
    (
        "saturation",
        "--grad-saturation",
        "fail when this share of sigmoid/tanh inputs has |x| >= 5 ('on' = 0.5, default: off)",
    ),
    ("min_signal", "--grad-min-signal", "fail when a layer's input std falls below this times the first's (or 'off')"),
    (
        "max_signal",
        "--grad-max-signal",
        "fail when a layer's input or the output std rises above this times the first's",
    ),
    (
        "max_initial_loss",
        "--grad-max-initial-loss",
        "fail when a classifier's initial cross-entropy exceeds this times ln(classes) (or 'off')",
    ),
    (
        "min_time_ratio",
        "--grad-min-time-ratio",
        "fail when the earliest step's gradient falls below this times the latest's",
    ),
    (
        "max_time_ratio",
        "--grad-max-time-ratio",
        "fail when the earliest step's gradient rises above this times the latest's",
    ),
)
