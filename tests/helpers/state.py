"""A bit-exact snapshot of everything a probe promises to leave untouched, and probes that check it."""

from __future__ import annotations

import random
import sys

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_mod
from torch.nn.parameter import UninitializedTensorMixin

from pytest_gradcheck import ProbeError, probe

# Every per-module hook registry a probe could leave behind (names as in torch.nn.Module). Written out
# here, not imported from the package: the tests' list checks the package's, so it must not be it.
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# The registries of torch.nn.modules.module.register_module_*_hook, shared by every module.
GLOBAL_HOOK_DICTS = tuple(name for name in dir(module_mod) if name.startswith("_global_") and name.endswith("hooks"))


class Same:
    """Compares equal only to a ``Same`` of the very same object, which it keeps alive.

    Holding the object means its id cannot be reused: a replacement created after the
    original was freed can never pass for it.
    """

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)

    def __repr__(self):
        return f"<{type(self.obj).__name__} at {id(self.obj):#x}>"


def bits(tensor: torch.Tensor | None):
    """dtype, layout, shape and raw bytes (NaN == NaN, -0.0 != 0.0), or a marker for tensors without data."""
    if tensor is None:
        return None
    if isinstance(tensor, UninitializedTensorMixin):  # a lazy module's parameter or buffer
        return ("uninitialized", type(tensor).__name__)
    if tensor.is_meta:  # no bytes to compare
        return (str(tensor.dtype), str(tensor.layout), tuple(tensor.shape), "meta")
    data = tensor.detach()
    if data.layout != torch.strided:  # sparse COO, CSR, CSC, ...: compare the values they stand for
        data = data.to_dense()
    flat = data.cpu().contiguous().reshape(-1)
    return (str(tensor.dtype), str(tensor.layout), tuple(tensor.shape), bytes(flat.view(torch.uint8).numpy()))


def _value(value):
    """A state_dict entry as comparable data: a tensor's bits, anything else (extra state) by repr."""
    return bits(value) if isinstance(value, torch.Tensor) else repr(value)


def _numpy_state():
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    name, keys, pos, has_gauss, cached = numpy.random.get_state()
    return (name, keys.tobytes(), pos, has_gauss, cached)


def _script_training(module: nn.Module):
    """The training flag TorchScript keeps on its C++ side, for script modules."""
    c_module = getattr(module, "_c", None)
    if c_module is None:
        return None
    try:
        return c_module.getattr("training")
    except RuntimeError:
        return None


def _hooks(registry) -> list:
    return [(key, Same(hook)) for key, hook in (registry or {}).items()]


def snapshot(model: nn.Module) -> dict:
    """Everything a probe must leave as it was, as plain, comparable data (aspect -> value).

    Values, grads, flags, modes and hooks, but also the NAMES of parameters, buffers and
    submodules (nothing may be added or removed), the class of every module and tensor (a
    LazyLinear that became a Linear), TorchScript's own training flags, non-tensor extra
    state, the global hook registries, and the torch, Python, numpy (and CUDA) RNG states.
    Parameters, buffers, grads and hooks are compared as the very same objects.
    """
    params = list(model.named_parameters(remove_duplicate=False))
    buffers = list(model.named_buffers(remove_duplicate=False))
    modules = list(model.named_modules(remove_duplicate=False))
    state_dict = model.state_dict(keep_vars=True)
    tensor_names = {name for name, _ in params} | {name for name, _ in buffers}
    state = {
        "submodule names": [name for name, _ in modules],
        "module classes": {name: type(module).__qualname__ for name, module in modules},
        "parameter names": [name for name, _ in params],
        "buffer names": [name for name, _ in buffers],
        "state_dict keys": list(state_dict),
        "extra state": {key: _value(value) for key, value in state_dict.items() if key not in tensor_names},
        "parameters": {name: bits(param) for name, param in params},
        "parameter classes": {name: type(param).__qualname__ for name, param in params},
        "parameter objects": {name: Same(param) for name, param in params},
        "requires_grad": {name: param.requires_grad for name, param in params},
        "grads": {name: bits(param.grad) for name, param in params},
        "grad objects": {name: Same(param.grad) for name, param in params},
        "buffers": {name: bits(buf) for name, buf in buffers},
        "buffer classes": {name: type(buf).__qualname__ for name, buf in buffers},
        "buffer objects": {name: Same(buf) for name, buf in buffers},
        "modes": {name: module.training for name, module in modules},
        "script modes": {name: _script_training(module) for name, module in modules},
        "hooks": {(name, attr): _hooks(getattr(module, attr, None)) for name, module in modules for attr in HOOK_DICTS},
        "global hooks": {attr: _hooks(getattr(module_mod, attr)) for attr in GLOBAL_HOOK_DICTS},
        "torch rng": bits(torch.get_rng_state()),
        "python rng": random.getstate(),
        "numpy rng": _numpy_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda rng"] = [bits(s) for s in torch.cuda.get_rng_state_all()]
    return state


def differences(before: dict, after: dict) -> dict[str, list]:
    """Aspect -> the names (or a marker) whose value differs between two snapshots."""
    changed = {}
    for aspect, value in before.items():
        now = after.get(aspect)
        if now == value:
            continue
        if isinstance(value, dict) and isinstance(now, dict):
            keys = [key for key in {**value, **now} if value.get(key, "<absent>") != now.get(key, "<absent>")]
            changed[aspect] = keys
        elif isinstance(value, list) and isinstance(now, list) and all(isinstance(v, str) for v in value + now):
            changed[aspect] = [f"+{n}" for n in now if n not in value] + [f"-{n}" for n in value if n not in now]
        else:
            changed[aspect] = ["<changed>"]
    return changed


def assert_untouched(model: nn.Module, before: dict, *, ignore: dict[str, set] | None = None) -> None:
    """Fail naming every aspect (and the names within it) that differs from ``before``.

    ``ignore`` maps an aspect to names whose change is accepted (reported by a ProbeError).
    """
    __tracebackhide__ = True
    ignore = ignore or {}
    changed = differences(before, snapshot(model))
    changed = {a: [n for n in names if n not in ignore.get(a, ())] for a, names in changed.items()}
    changed = {a: names for a, names in changed.items() if names}
    assert not changed, "the probe changed the model: " + "; ".join(
        f"{aspect}: {', '.join(map(str, names[:6]))}{' ...' if len(names) > 6 else ''}"
        for aspect, names in changed.items()
    )


def probe_untouched(model: nn.Module, inputs=None, **kwargs):
    """Probe ``model`` and assert that the probe left it exactly as it was."""
    before = snapshot(model)
    profile = probe(model, inputs, **kwargs)
    assert_untouched(model, before)
    return profile


def probe_error(model: nn.Module, inputs=None, **kwargs) -> str:
    """The ProbeError message for ``model``, asserting the model survived the failed probe."""
    before = snapshot(model)
    with pytest.raises(ProbeError) as raised:
        probe(model, inputs, **kwargs)
    assert_untouched(model, before)
    return str(raised.value)


def attempt(function, *args, **kwargs):
    """(result, None) or (None, exception): lets a test check the model whatever happened."""
    try:
        return function(*args, **kwargs), None
    except Exception as error:  # the test decides what is acceptable
        return None, error


def names_object(message: str, qualified: str) -> bool:
    """Whether ``message`` names ``qualified`` ('embed.weight'), fully or as attribute plus module."""
    owner, _, attr = qualified.rpartition(".")
    return qualified in message or (attr in message and (not owner or owner in message))


def trainable_numel(model: nn.Module) -> int:
    """Number of distinct trainable parameter elements (a tied tensor counts once)."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)
