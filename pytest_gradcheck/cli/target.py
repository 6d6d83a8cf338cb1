"""Loading the model a command-line TARGET names: ``package.module:attr`` or ``path/to/file.py:attr``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from pytest_gradcheck.errors import TargetError

USAGE = "TARGET must look like package.module:attr or path/to/file.py:attr"


def load_model(target: str, seed: int = 0) -> nn.Module:
    """The nn.Module that ``target`` names: an instance, or one a no-argument subclass or
    factory builds under ``seed``."""
    module_part, attr_part = split_target(target)
    module = load_module(module_part)
    obj = lookup_attribute(module, module_part, attr_part)
    return instantiate(obj, f"{module_part}:{attr_part}", seed)


def split_target(target: str) -> tuple[str, str]:
    # rpartition keeps a Windows drive letter ("C:\\models.py:Net") in the module part.
    module_part, colon, attr_part = target.rpartition(":")
    if not colon or not module_part or not attr_part:
        raise TargetError(f"{USAGE}; got {target!r}")
    return module_part, attr_part


def is_file_path(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def load_module(module_part: str) -> ModuleType:
    if is_file_path(module_part):
        return _load_file(Path(module_part))
    # A console script's sys.path[0] is its bin/ folder; `python -m` puts the working
    # directory first. Both should find the user's own packages the same way.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as error:
        if error.name and _is_parent_or_self(error.name, module_part):
            raise TargetError(
                f"module not found: {module_part!r} (no module named {error.name!r}); "
                "check the spelling, install the package, or give a file path such as models.py:Net"
            ) from None
        raise TargetError(_import_failure(module_part, error)) from None
    except Exception as error:  # the user's module raised while importing
        raise TargetError(_import_failure(module_part, error)) from None


def _is_parent_or_self(missing: str, module_part: str) -> bool:
    return module_part == missing or module_part.startswith(missing + ".")


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise TargetError(f"file not found: {str(path)!r} (looked in {os.getcwd()})")
    if path.suffix != ".py":
        raise TargetError(f"not a Python file: {str(path)!r}; {USAGE}")
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None:
        existing_file = getattr(existing, "__file__", None)
        if existing_file and Path(existing_file).resolve() == path.resolve():
            return existing
        name = f"{name}__gradcheck_target"  # never shadow an unrelated module (a file called torch.py)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot import {str(path)!r} as a Python module; {USAGE}")
    module = importlib.util.module_from_spec(spec)
    # The file's own folder goes first, so it can import its siblings as it would when run
    # as a script; registering the module first lets dataclasses and pickling find it.
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise TargetError(_import_failure(str(path), error)) from None
    return module


def _import_failure(where: str, error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    location = f" at {frame.filename}:{frame.lineno}" if frame else ""
    return f"importing {where!r} failed{location}: {type(error).__name__}: {error}"


def lookup_attribute(module: ModuleType, module_part: str, attr_part: str) -> Any:
    obj = module
    for piece in attr_part.split("."):
        if not hasattr(obj, piece):
            raise TargetError(
                f"attribute missing: {module_part!r} has no attribute {attr_part!r}; "
                f"models it defines: {', '.join(_candidates(module)) or 'none'}"
            )
        obj = getattr(obj, piece)
    return obj


def _candidates(module: ModuleType) -> list[str]:
    """Names in ``module`` that could be a TARGET's attr, to suggest on a typo."""
    names = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        is_model_class = inspect.isclass(value) and issubclass(value, nn.Module)
        if isinstance(value, nn.Module) or (is_model_class and value.__module__ == module.__name__):
            names.append(name)
    return names


def instantiate(obj: Any, where: str, seed: int = 0) -> nn.Module:
    """The model ``obj`` is, or builds under ``seed``."""
    from pytest_gradcheck.probing.model_io import model_from

    return model_from(obj, seed, where, TargetError)
