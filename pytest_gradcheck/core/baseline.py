"""Gradient-profile baselines: where they live, the JSON file format, and the comparison."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_gradcheck.core.files import safe_name, write_atomically
from pytest_gradcheck.core.jsonable import strict_json
from pytest_gradcheck.core.profile import GradientProfile, LayerStats
from pytest_gradcheck.errors import BaselineFileError, SettingError

SCHEMA_VERSION = 1
# Enough to see a 10% drift, few enough that thread-count noise rarely changes the file.
SIGNIFICANT_DIGITS = 4
# Far above the thread and rounding noise that benchmarks/measure_baseline_noise.py
# measures (docs/baselines.md): it is meant for regressions, not noise.
DEFAULT_TOLERANCE = 2.0

# Measured only when a report or plot asks for them (probe(..., detail=True)), and not
# compared: kept out of the file, it does not change with the options of the run.
_DETAIL_LAYER_FIELDS = ("grad_max_abs", "grad_norm", "weight_norm", "zero_fraction")
# The forward signal, the output's scale and the steps in time: checked on every run from the
# profile itself, never compared with a baseline, so kept out of the file too. What decides
# the ratio's first and last layers (roles, gates, siblings, the output layer) stays in.
_SIGNAL_LAYER_FIELDS = ("input_std", "scale_invariance", "normalised", "output_std")
_SIGNAL_FIELDS = ("output_std", "expected_loss", "time")


# -- where baselines live ----------------------------------------------------------

BASELINE_DIR = "__gradcheck__"
_MAX_STEM = 200


def baseline_dir(test_module: str | os.PathLike[str]) -> Path:
    """The folder that holds the baselines of one test module: ``__gradcheck__/<module>/``."""
    test_module = Path(test_module)
    return test_module.parent / BASELINE_DIR / test_module.stem


def baseline_path(test_module: Path, nodeid: str, name: str | None = None) -> Path:
    """The baseline file of one test (and one named fixture call) of ``test_module``.

    ``tests/test_m.py::TestNet::test_fit[cpu-2]`` with ``name="encoder"`` gives
    ``tests/__gradcheck__/test_m/TestNet.test_fit[cpu-2].encoder.json``.
    """
    return baseline_dir(test_module) / f"{baseline_stem(nodeid, name, Path(test_module).stem)}.json"


def baseline_stem(nodeid: str, name: str | None = None, module_stem: str = "") -> str:
    """The file name of a test's baseline, without ``.json``; long ones are cut and get a hash, so they stay unique."""
    stem = safe_name(".".join(nodeid.split("::")[1:]) or module_stem)
    if name:
        stem += "." + safe_name(str(name))
    if len(stem) > _MAX_STEM:  # each part fits, both may not: most filesystems take 255 bytes
        stem = f"{stem[: _MAX_STEM - 9]}-{hashlib.sha1(stem.encode('utf-8')).hexdigest()[:8]}"
    return stem


# -- the file format ---------------------------------------------------------------


def dumps_baseline(profile: GradientProfile) -> str:
    """The baseline text of ``profile``: sorted keys, rounded floats, one trailing newline."""
    data = strict_json(profile.to_dict(), SIGNIFICANT_DIGITS)
    # Only mean |grad| is compared; diagnosis data and the detail statistics would only make the file churn.
    for key in ("activations", *_SIGNAL_FIELDS):
        data.pop(key, None)
    for layer in data["layers"]:
        for key in (*_DETAIL_LAYER_FIELDS, *_SIGNAL_LAYER_FIELDS):
            layer.pop(key, None)
    data["schema_version"] = SCHEMA_VERSION
    return json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n"


def loads_baseline(text: str, source: str = "<string>") -> GradientProfile:
    """Parse baseline text; every problem is a BaselineFileError naming ``source``."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise BaselineFileError(source, f"is corrupt: not valid JSON ({error})") from None
    except RecursionError:
        raise BaselineFileError(source, "is corrupt: not a gradient baseline (nested too deeply to read)") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise BaselineFileError(source, "is corrupt: not a gradient baseline (no schema_version)")
    version = data["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BaselineFileError(source, f"is corrupt: schema_version {version!r} is not a positive integer")
    if version > SCHEMA_VERSION:
        raise BaselineFileError(
            source,
            f"has schema_version {version}, newer than this pytest-gradcheck reads ({SCHEMA_VERSION}); "
            "upgrade pytest-gradcheck",
            hint=False,
        )
    problem = _schema_problem(data)
    if problem:
        raise BaselineFileError(source, f"is corrupt: {problem}")
    return _profile_from(data)


# The fields of a baseline and of each of its layers, with the JSON types they must have.
_NUMBER, _OPTIONAL_NUMBER, _STRINGS = "number", "number or null", "list of strings"
_OPTIONAL_STRING, _OPTIONAL_INT = "string or null", "integer or null"
_TOP_FIELDS = {"model": str, "layers": list, "loss": _NUMBER, "seed": int, "device": str, "dtype": str}
_TOP_OPTIONAL = {
    "input_shapes": _STRINGS, "loss_kind": str, "output_layer": _OPTIONAL_STRING,
    "output_softmax_share": _OPTIONAL_NUMBER, "output_classes": _OPTIONAL_INT,
}  # fmt: skip
_LAYER_FIELDS = {
    "name": str, "kind": str, "numel": int, "grad_mean_abs": _NUMBER, "finite": bool, "executed": bool,
    "received_grad": bool, "has_matrix": bool, "is_norm": bool, "shared_with": _STRINGS, "unused_parameters": _STRINGS,
}  # fmt: skip
_LAYER_OPTIONAL = {
    "all_zero": bool, "role": _OPTIONAL_STRING, "gate": _OPTIONAL_NUMBER, "shares_input_with": _STRINGS,
    **dict.fromkeys(_DETAIL_LAYER_FIELDS, _OPTIONAL_NUMBER),
}  # fmt: skip
# How strict JSON (and this package's files) spell the floats JSON has no literal for.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _schema_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with a baseline's fields, or None: each field must have its own JSON type."""
    problem = _fields_problem(data, _TOP_FIELDS, _TOP_OPTIONAL, "the baseline")
    if problem:
        return problem
    for index, layer in enumerate(data["layers"]):
        if not isinstance(layer, dict):
            return f"layer {index} is {_article(type(layer).__name__)}, not an object"
        problem = _fields_problem(layer, _LAYER_FIELDS, _LAYER_OPTIONAL, f"layer {index}")
        if problem:
            return problem
    return None


def _fields_problem(data: dict[str, Any], required: dict[str, Any], optional: dict[str, Any], where: str) -> str | None:
    for key, kind in [*required.items(), *optional.items()]:
        if key not in data:
            if key in required:
                return f"{where} has no {key!r}"
            continue
        if not _is(data[key], kind):
            return (
                f"{key!r} of {where} is {json.dumps(data[key])[:40]}, not {_article(getattr(kind, '__name__', kind))}"
            )
    return None


def _article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeio' else 'a'} {noun}"


def _is(value: Any, kind: Any) -> bool:
    if kind is _OPTIONAL_NUMBER:
        return value is None or _is(value, _NUMBER)
    if kind is _OPTIONAL_STRING:
        return value is None or isinstance(value, str)
    if kind is _OPTIONAL_INT:
        return value is None or _is(value, int)
    if kind is _NUMBER:
        return value in _NON_FINITE or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if kind is _STRINGS:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _profile_from(data: dict[str, Any]) -> GradientProfile:
    for layer in data["layers"]:
        layer["grad_mean_abs"] = _number(layer["grad_mean_abs"])
        for key in _DETAIL_LAYER_FIELDS:  # files written before they were left out
            if layer.get(key) is not None:
                layer[key] = _number(layer[key])
        if layer.get("gate") is not None:
            layer["gate"] = _number(layer["gate"])
    data["loss"] = _number(data["loss"])
    for key in _SIGNAL_FIELDS:  # a hand-edited file's extras: not compared
        data.pop(key, None)
    return GradientProfile.from_dict(data)


def _number(value: Any) -> float:
    return _NON_FINITE[value] if isinstance(value, str) else float(value)


def load_baseline(path: str | os.PathLike) -> GradientProfile:
    """Read the baseline at ``path``; a missing, unreadable, corrupt or too new file raises BaselineFileError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BaselineFileError(str(path), "does not exist", hint=False) from None
    except (OSError, UnicodeDecodeError) as error:
        raise BaselineFileError(str(path), f"is unreadable: {error}") from None
    return loads_baseline(text, str(path))


def save_baseline(path: str | os.PathLike, profile: GradientProfile) -> None:
    """Write ``profile`` as the baseline at ``path`` atomically: readers see the old file or the new one."""
    path = Path(path)
    try:
        write_atomically(path, dumps_baseline(profile))
    except OSError as error:
        raise BaselineFileError(
            str(path), f"cannot be written in {path.parent}: {error.strerror or error}", hint=False
        ) from None


# -- the comparison ----------------------------------------------------------------


def parse_tolerance(raw: Any) -> float:
    """A tolerance factor from a number or an ini string; at least 1 (2.0 allows half to double)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise SettingError("tolerance", f"baseline tolerance must be a number such as 2.0, got {raw!r}") from None
    if math.isnan(value) or value < 1.0:
        raise SettingError(
            "tolerance",
            f"baseline tolerance is a factor of at least 1 (2.0 allows half to double), got {raw!r}; "
            "for a 10% tolerance use 1.1",
        )
    return value


@dataclass
class LayerDelta:
    """One row of the comparison: a layer's mean |grad| in the baseline and now."""

    name: str
    kind: str
    baseline: float | None
    now: float | None
    status: str  # "ok", "moved", "added", "removed" or "renamed"
    renamed_from: str | None = None

    @property
    def factor(self) -> float | None:
        """now / baseline; None when the layer is missing on one side."""
        return _factor(self.baseline, self.now)

    @property
    def out_of_tolerance(self) -> bool:
        return self.status != "ok"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["factor"] = self.factor
        return data


@dataclass
class BaselineComparison:
    """How a profile differs from its baseline, and whether that is within ``tolerance``."""

    model: str
    tolerance: float
    layers: list[LayerDelta]
    baseline_ratio: float | None
    ratio: float | None
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    baseline_model: str | None = None  # the model's name (its class) when the baseline was recorded
    baseline_loss_kind: str | None = None
    loss_kind: str | None = None

    @property
    def model_changed(self) -> bool:
        """Whether the baseline was recorded from a model of another name (another class)."""
        return self.baseline_model is not None and self.baseline_model != self.model

    @property
    def loss_changed(self) -> bool:
        """Whether the baseline's gradients came from another kind of loss: then nothing compares."""
        return (
            self.baseline_loss_kind is not None
            and self.loss_kind is not None
            and self.baseline_loss_kind != self.loss_kind
        )

    @property
    def ratio_factor(self) -> float | None:
        return _factor(self.baseline_ratio, self.ratio)

    @property
    def ratio_moved(self) -> bool:
        if self.baseline_ratio is None and self.ratio is None:
            return False
        return not _within(self.ratio_factor, self.tolerance)

    @property
    def moved(self) -> list[LayerDelta]:
        """Layers present on both sides whose mean |grad| moved beyond the tolerance."""
        return [delta for delta in self.layers if delta.status == "moved"]

    @property
    def passed(self) -> bool:
        return not (self.loss_changed or self.moved or self.ratio_moved or self.added or self.removed or self.renamed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "layers": [delta.to_dict() for delta in self.layers],
            "baseline_ratio": self.baseline_ratio,
            "ratio": self.ratio,
            "ratio_factor": self.ratio_factor,
            "added": list(self.added),
            "removed": list(self.removed),
            "renamed": [list(pair) for pair in self.renamed],
            "baseline_model": self.baseline_model,
            "baseline_loss_kind": self.baseline_loss_kind,
            "loss_kind": self.loss_kind,
        }


def compare_baseline(
    baseline: GradientProfile, profile: GradientProfile, tolerance: float = DEFAULT_TOLERANCE
) -> BaselineComparison:
    """Compare ``profile`` with ``baseline`` layer by layer (matched by name) and by first/last ratio.

    A layer fails when its mean |grad| moved by more than ``tolerance`` either way;
    a removed and an added layer of the same kind and size count as one renamed layer.
    """
    tolerance = parse_tolerance(tolerance)
    before = {layer.name: layer for layer in baseline.layers}
    now_names = {layer.name for layer in profile.layers}
    removed = [layer for layer in baseline.layers if layer.name not in now_names]
    renamed_from = _pair_renames(removed, [layer for layer in profile.layers if layer.name not in before])
    deltas = []
    for layer in profile.layers:
        old = before.get(layer.name)
        if old is not None:
            factor = _factor(old.grad_mean_abs, layer.grad_mean_abs)
            status = "ok" if _within(factor, tolerance) else "moved"
            deltas.append(LayerDelta(layer.name, layer.kind, old.grad_mean_abs, layer.grad_mean_abs, status))
        elif layer.name in renamed_from:
            old = renamed_from[layer.name]
            deltas.append(
                LayerDelta(layer.name, layer.kind, old.grad_mean_abs, layer.grad_mean_abs, "renamed", old.name)
            )
        else:
            deltas.append(LayerDelta(layer.name, layer.kind, None, layer.grad_mean_abs, "added"))
    paired = {old.name for old in renamed_from.values()}
    for old in removed:
        if old.name not in paired:
            deltas.append(LayerDelta(old.name, old.kind, old.grad_mean_abs, None, "removed"))
    return BaselineComparison(
        model=profile.model,
        tolerance=tolerance,
        layers=deltas,
        baseline_ratio=baseline.ratio,
        ratio=profile.ratio,
        added=[d.name for d in deltas if d.status == "added"],
        removed=[d.name for d in deltas if d.status == "removed"],
        renamed=[(d.renamed_from or "", d.name) for d in deltas if d.status == "renamed"],
        baseline_model=baseline.model,
        baseline_loss_kind=baseline.loss_kind,
        loss_kind=profile.loss_kind,
    )


def _pair_renames(removed: list[LayerStats], added: list[LayerStats]) -> dict[str, LayerStats]:
    """Match each added layer to the first unmatched removed layer of the same kind and size."""
    pairs: dict[str, LayerStats] = {}
    free = list(removed)
    for layer in added:
        for old in free:
            if (old.kind, old.numel) == (layer.kind, layer.numel):
                pairs[layer.name] = old
                free.remove(old)
                break
    return pairs


def _factor(before: float | None, now: float | None) -> float | None:
    if before is None or now is None:
        return None
    if before == 0.0:
        return 1.0 if now == 0.0 else math.inf
    return now / before


def _within(factor: float | None, tolerance: float) -> bool:
    # NaN and None fail: a layer whose gradient became NaN has certainly moved.
    if factor is None or math.isnan(factor):
        return False
    return 1.0 / tolerance <= factor <= tolerance
