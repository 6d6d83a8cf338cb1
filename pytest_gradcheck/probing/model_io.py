"""Model I/O for the probe: default inputs, calling conventions and the loss."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from pytest_gradcheck.errors import ProbeError

DEFAULT_BATCH_SIZE = 8
DEFAULT_SPATIAL_SIZE = 32
DEFAULT_SEQUENCE_LENGTH = 16
_PARAMETRIZATIONS = "parametrizations"


def is_factory(model: Any) -> bool:
    """Whether ``model`` is something that builds a model (a class or a function), not a model."""
    return callable(model) and not isinstance(model, nn.Module)


def model_from(model: Any, seed: int, where: str | None = None, error: type[Exception] = ProbeError) -> nn.Module:
    """``model`` itself, or the model its class or zero-argument factory builds under ``seed``.

    Built under the seed, the initial weights are the same in every run whatever RNG state
    earlier code left (torch's RNGs are forked, so the caller's are untouched), which is what
    makes a baseline of a freshly built model reproducible.
    """
    if isinstance(model, nn.Module):
        return model
    where = where or getattr(model, "__qualname__", None) or type(model).__name__
    if inspect.isclass(model) and not issubclass(model, nn.Module):
        raise error(f"{where} is the class {model.__name__}, which is not an nn.Module subclass")
    if not callable(model):
        raise error(
            f"{where} is of type {type(model).__name__}, not an nn.Module instance, "
            "an nn.Module subclass or a zero-argument factory"
        )
    _require_no_arguments(model, where, error)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            built = model()
        except Exception as failure:
            raise error(f"calling {where}() failed: {type(failure).__name__}: {failure}") from None
    if not isinstance(built, nn.Module):
        raise error(f"{where}() returned a value of type {type(built).__name__}, not an nn.Module")
    return built


def _require_no_arguments(factory: Any, where: str, error: type[Exception]) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: just try the call
        return
    try:
        signature.bind()
    except TypeError:
        needed = [
            name
            for name, param in signature.parameters.items()
            if param.default is param.empty
            and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
        ]
        kind = "constructor" if inspect.isclass(factory) else "factory"
        short = where.rpartition(":")[2]
        raise error(
            f"{kind} needs arguments: {where}({', '.join(needed)}); pass a model instance or a "
            f"zero-argument function that builds it, e.g. def make(): return {short}(...)"
        ) from None


def infer_inputs(model: nn.Module, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Random inputs shaped for the first parameterised module (registration order)."""
    for name, module in model.named_modules():
        if _PARAMETRIZATIONS in name.split("."):  # the insides of weight_norm, spectral_norm, ...
            continue
        # Frozen or not: a frozen first layer (a fine-tuned backbone) still takes the input.
        param = next(module.parameters(recurse=False), None)
        if param is None and parametrize.is_parametrized(module):
            param = next(module.parameters(), None)
        if param is None:
            continue
        label = f"{type(module).__name__} {name!r}" if name else type(module).__name__
        float_dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        if isinstance(module, nn.RNNBase):
            steps = (
                (batch_size, DEFAULT_SEQUENCE_LENGTH) if module.batch_first else (DEFAULT_SEQUENCE_LENGTH, batch_size)
            )
            return torch.randn(*steps, module.input_size, device=param.device, dtype=float_dtype)
        if isinstance(module, nn.Linear):
            return torch.randn(batch_size, module.in_features, device=param.device, dtype=float_dtype)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = (DEFAULT_SPATIAL_SIZE,) * (module.weight.dim() - 2)
            shape = (batch_size, module.in_channels, *spatial)
            return torch.randn(shape, device=param.device, dtype=float_dtype)
        if isinstance(module, nn.Embedding):
            shape = (batch_size, DEFAULT_SEQUENCE_LENGTH)
            return torch.randint(0, module.num_embeddings, shape, device=param.device)
        raise ProbeError(
            f"cannot infer inputs for {type(model).__name__}: its first parameterised module, "
            f"{label}, is not a Linear, Conv1d/2d/3d, Embedding, RNN, LSTM or GRU",
            inputs_shape=example_shape(module),
        )
    raise ProbeError(f"cannot infer inputs for {type(model).__name__}: it has no parameters", inputs_shape=(8, "..."))


def example_shape(module: nn.Module | None) -> tuple[int | str, ...]:
    """An input shape for ``module``, as far as its weights show what it takes ('...' where not)."""
    batch = DEFAULT_BATCH_SIZE
    if isinstance(module, nn.MultiheadAttention):
        return (batch, DEFAULT_SEQUENCE_LENGTH, module.embed_dim)
    if isinstance(module, nn.RNNBase):
        if module.batch_first:
            return (batch, DEFAULT_SEQUENCE_LENGTH, module.input_size)
        return (DEFAULT_SEQUENCE_LENGTH, batch, module.input_size)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return (batch, weight.shape[1])
    if isinstance(weight, torch.Tensor) and weight.dim() > 2:
        return (batch, weight.shape[1], *[DEFAULT_SPATIAL_SIZE] * (weight.dim() - 2))
    return (batch, "...")


def as_call_arguments(inputs: Any) -> tuple[tuple, dict]:
    """Map the accepted input forms to (args, kwargs) for ``model(*args, **kwargs)``."""
    if callable(inputs) and not isinstance(inputs, (torch.Tensor, nn.Module)):
        inputs = inputs()
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, dict):
        bad = [key for key in inputs if not isinstance(key, str)]
        if bad:
            raise ProbeError(f"dict inputs must have string keys (keyword arguments); got keys {bad!r}")
        return (), dict(inputs)
    raise ProbeError(
        f"inputs must be a tensor, a tuple or list of positional arguments, a dict of keyword "
        f"arguments, or a zero-argument callable returning one of these; got {type(inputs).__name__}"
    )


def fresh_copies(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call arguments with every tensor in them copied: a forward that edits its inputs in place
    edits the probe's copies, never the caller's, and each pass sees the same numbers.

    A copy of an input that requires grad carries gradient too (as the sum of the copy and a
    zero that requires it: not a leaf, so a forward may still edit it in place).
    """
    return _copied(args), {key: _copied(value) for key, value in kwargs.items()}


def _copied(value: Any, depth: int = 0) -> Any:
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        if copy.is_floating_point() and value.requires_grad:
            zero = torch.zeros((), dtype=copy.dtype, device=copy.device, requires_grad=True)
            return copy + zero
        return copy
    if depth > 4:
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_copied(item, depth + 1) for item in value)
    if isinstance(value, list):
        return [_copied(item, depth + 1) for item in value]
    if type(value) is dict:
        return {key: _copied(item, depth + 1) for key, item in value.items()}
    return value


def describe(args: tuple, kwargs: dict) -> list[str]:
    """Readable shapes of the call arguments, e.g. ['float32[8, 64]', 'mask=bool[8, 16]']."""

    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).replace("torch.", "")
            device = "" if value.device.type == "cpu" else f"@{value.device}"
            return f"{dtype}{list(value.shape)}{device}"
        return type(value).__name__

    return [one(value) for value in args] + [f"{key}={one(value)}" for key, value in kwargs.items()]


# How the probe's loss came about: the user's loss_fn, the output's own loss entry, or the
# default, a fixed random direction.
LOSS_KINDS = ("loss_fn", "model", "random")


def loss_of(
    output: Any, loss_fn: Callable[[Any], torch.Tensor] | None, model_name: str, seed: int
) -> tuple[torch.Tensor, str]:
    """The scalar the probe differentiates and its kind: loss_fn(output), a 'loss' entry, or a random direction.

    The default is <y, r> over the output's floating-point tensors y, with r drawn from
    N(0, 1) under the probe's seed. Unlike the sum of y, it is not a constant when y is
    normalised (the batch sum of a batch-normalised output is), and every output element
    gets a gradient of the same size, as in signal-propagation analyses.
    """
    if loss_fn is not None:
        loss = loss_fn(output)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.dtype.is_floating_point:
            raise ProbeError(
                f"loss_fn must return a scalar floating-point tensor; for {model_name} it returned {_kind_of(loss)}"
            )
        return loss.reshape(()).float(), "loss_fn"
    explicit = _loss_entry(output)
    if explicit is not None:
        return explicit.reshape(()).float(), "model"
    tensors = [t for t in tensors_in(output) if t.dtype.is_floating_point or t.dtype.is_complex]
    if not tensors:
        raise ProbeError(
            f"{model_name} returned {_kind_of(output)}, which holds no floating-point tensor to "
            "differentiate; pass loss_fn=lambda output: ... returning a scalar tensor"
        )
    generators: dict[torch.device, torch.Generator] = {}
    total: torch.Tensor | None = None
    for tensor in tensors:
        values = tensor.real if tensor.is_complex() else tensor
        generator = generators.get(values.device)
        if generator is None:
            generator = generators[values.device] = torch.Generator(device=values.device).manual_seed(seed)
        direction = torch.randn(values.shape, generator=generator, device=values.device, dtype=torch.float32)
        term = torch.dot(values.float().reshape(-1), direction.reshape(-1))  # no product tensor: one pass
        total = term if total is None else total + term
    assert total is not None
    return total, "random"


def _loss_entry(output: Any) -> torch.Tensor | None:
    if isinstance(output, dict):
        loss = output.get("loss")
    else:
        loss = getattr(output, "loss", None) if not isinstance(output, torch.Tensor) else None
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.dtype.is_floating_point:
        return loss
    return None


def tensors_in(value: Any, max_depth: int = 8, depth: int = 0) -> list[torch.Tensor]:
    """Tensors in a nested structure of tuples, lists, dicts and dataclasses."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > max_depth:
        return []
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (tuple, list)):
        items = list(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name) for f in dataclasses.fields(value)]
    else:
        return []
    return [t for item in items for t in tensors_in(item, max_depth, depth + 1)]


def _kind_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return _article(f"{str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)}")
    return _article(type(value).__name__)


def _article(noun: str) -> str:
    """'an int', 'a float32 tensor': the indefinite article by the first letter's sound."""
    return f"{'an' if noun[:1].lower() in 'aeio' else 'a'} {noun}"


def random_inputs(model: nn.Module, shapes: list[tuple[int, ...]], dtypes: list[str], device: Any) -> tuple:
    """One random positional input per shape, for the command line's --input-shape/--input-dtype.

    Floating dtypes draw from N(0, 1). Integer dtypes draw from [0, n), where n is the
    smallest ``num_embeddings`` among the model's nn.Embedding layers, so the ids are valid
    for any of them; without an embedding n is 2 (0/1 values: a valid mask or class index).
    ``bool`` draws 0/1 as well.
    """
    high = min((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), default=2)
    tensors = []
    for shape, dtype_name in zip(shapes, dtypes):
        dtype = getattr(torch, dtype_name)
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, dtype=dtype, device=device))
        elif dtype == torch.bool:
            tensors.append(torch.randint(0, 2, shape, device=device).bool())
        else:
            top = min(high, torch.iinfo(dtype).max + 1)
            tensors.append(torch.randint(0, top, shape, dtype=dtype, device=device))
    return tuple(tensors)
