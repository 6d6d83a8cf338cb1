"""Test helper: a bit-exact snapshot of everything a probe promises to leave untouched."""

from __future__ import annotations

import random

import torch
from torch import nn

# Every per-module hook registry a probe could leave behind (names as in torch.nn.Module).
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


def _bits(tensor: torch.Tensor) -> tuple:
    """dtype, shape and raw bytes: NaN == NaN and -0.0 != 0.0, unlike torch.equal."""
    if tensor.is_meta:  # no bytes to compare
        return str(tensor.dtype), tuple(tensor.shape), "meta"
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return str(tensor.dtype), tuple(tensor.shape), bytes(flat.view(torch.uint8).numpy())


def snapshot(model: nn.Module) -> dict:
    """Parameters, buffers, grads, flags, modes, hooks and RNG states of ``model``, as plain data."""
    params = list(model.named_parameters(remove_duplicate=False))
    return {
        "state_dict": {name: _bits(value) for name, value in model.state_dict(keep_vars=True).items()},
        "parameter_objects": [(name, id(param)) for name, param in params],
        "requires_grad": [(name, param.requires_grad) for name, param in params],
        "grads": [(name, None if param.grad is None else _bits(param.grad)) for name, param in params],
        "grad_objects": [(name, id(param.grad)) for name, param in params],
        "buffer_objects": [(name, id(buf)) for name, buf in model.named_buffers(remove_duplicate=False)],
        "modes": [(name, module.training) for name, module in model.named_modules(remove_duplicate=False)],
        "hooks": [
            (name, attr, [(key, id(hook)) for key, hook in getattr(module, attr, {}).items()])
            for name, module in model.named_modules(remove_duplicate=False)
            for attr in HOOK_DICTS
        ],
        "torch_rng": _bits(torch.get_rng_state()),
        "python_rng": random.getstate(),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    """Fail naming the first aspect of ``model`` that differs from the ``before`` snapshot."""
    __tracebackhide__ = True
    after = snapshot(model)
    for aspect, value in before.items():
        assert after[aspect] == value, f"probe changed the model's {aspect}"


def trainable_numel(model: nn.Module) -> int:
    """Number of distinct trainable parameter elements (a tied tensor counts once)."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)
