"""Writing the plugin's files safely: atomically, under names every filesystem accepts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and os.replace.

    Missing parent folders are created. On any error the temporary file is removed
    and an existing ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name is short whatever the target's: a long file name plus a suffix could pass the limit.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:60]}.", suffix=".tmp")
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
