"""Where the plugin's files go, and writing them atomically so no reader ever sees half a file."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and os.replace.

    Missing parent folders are created. On any error the temporary file is removed
    and an existing ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


BASELINE_DIR = "__gradcheck__"


def baseline_dir(test_module: Path) -> Path:
    """The folder that holds the baselines of one test module: ``__gradcheck__/<module>/``."""
    test_module = Path(test_module)
    return test_module.parent / BASELINE_DIR / test_module.stem


# What a file name may hold as is; anything else becomes "_" plus a hash of the original.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.,=+\-\[\]]")
_MAX_STEM = 120


def safe_name(text: str) -> str:
    """``text`` as a portable file-name part; altered or long names get a hash so they stay unique."""
    cleaned = _UNSAFE.sub("_", text).strip(".")
    if cleaned == text and len(text) <= _MAX_STEM:
        return text
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[:_MAX_STEM]}-{digest}"


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

