"""The instrumented forward pass behind the diagnosis: activation statistics, weight scales and depth."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pytest_gradcheck.core.init_scale import DYING, RECTIFIERS, init_scale
from pytest_gradcheck.core.profile import ActivationProfile, ActivationStats
from pytest_gradcheck.probing import model_io
from pytest_gradcheck.probing.depth import Depths
from pytest_gradcheck.probing.layers import is_norm_layer
from pytest_gradcheck.probing.sandbox import call_model
from pytest_gradcheck.probing.statistics import float32_norms, to_host

# DeepDiagnosis (Wardat et al., ICSE 2022) counts a sigmoid/tanh input with |x| >= 5 as saturated.
SATURATION_INPUT = 5.0
# Largest value of each function's derivative.
DERIVATIVE_BOUNDS = {"sigmoid": 0.25, "tanh": 1.0}
_FUNCTIONS = set(DERIVATIVE_BOUNDS) | RECTIFIERS
# Activation modules measured at module level; a function they call inside is not counted twice.
_MODULE_FUNCTIONS = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.SELU: "selu",
    nn.CELU: "celu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Softplus: "softplus",
    nn.Hardswish: "hardswish",
}
# Activation modules from other libraries (transformers' GELUActivation, NewGELUActivation,
# a hand-written Swish) build their function from tanh or sigmoid; matched by class name.
_NAMED_FUNCTIONS = (("gelu", "gelu"), ("swish", "silu"), ("silu", "silu"), ("mish", "mish"))
_RNN_CELLS = {"rnn_tanh_cell": "tanh"}
_NORM_FUNCTIONS = {"layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "local_response_norm"}


def measure(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], count_hooks: Callable[[int], None]
) -> ActivationProfile:
    """Run one instrumented forward pass of ``model(*args, **kwargs)`` and return plain data.

    The caller (``ModelRun``) sets the pass up as the probe's: the same inputs, seed, train
    mode and grad mode, so dropout masks match the probe the numbers explain. ``count_hooks``
    is told how many hooks the pass registers (and removes again).
    """
    __tracebackhide__ = True
    tracker = _Tracker()
    for tensor in model_io.tensors_in((args, kwargs), max_depth=4):
        tracker.depths.tag(tensor, 0, 0)
    with tracker.hooks(model, count_hooks), tracker:
        output = call_model(model, args, kwargs)
    chain = tracker.depths.chain(output)
    del output
    return tracker.profile(model, chain)


class _Place:
    """Where in the model the pass is: the last layer that started, its calls, the norms seen."""

    def __init__(self) -> None:
        self.after: str | None = None
        self.weight_layer: str | None = None
        self.calls: dict[str, int] = {}
        self.norms: list[str] = []
        self.inside_norm = 0

    def layer_started(self, name: str, module: nn.Module) -> Any:
        is_norm = is_norm_layer(module)

        def hook(module: nn.Module, args: Any) -> None:
            self.after = name
            self.calls[name] = self.calls.get(name, 0) + 1
            if not is_norm:
                self.weight_layer = name

        return hook

    def norm_started(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self.inside_norm += 1
            if name not in self.norms:
                self.norms.append(name)

        return hook

    def norm_done(self, module: nn.Module, args: Any, output: Any) -> None:
        self.inside_norm -= 1

    def saw_norm_function(self, name: str) -> None:
        """A normalisation called as a function (F.layer_norm), outside any norm module."""
        if not self.inside_norm and f"F.{name}" not in self.norms:
            self.norms.append(f"F.{name}")


class _Site:
    """Accumulates one activation site's per-call statistics as device tensors (no host sync)."""

    def __init__(self, function: str, call: str, after: str | None) -> None:
        self.function, self.call, self.after = function, call, after
        self.rows: list[torch.Tensor] = []
        # Counts known on the host: output elements, units judged dead or alive, input elements.
        self.numel = self.units = self.input_numel = 0


# Columns of a site's per-call row, all computed on the device.
_SATURATED, _DEAD, _DERIVATIVE, _OUT_SUM, _OUT_SQUARES, _IN_SUM, _IN_SQUARES = range(7)
_COLUMNS = 7


def _row(site: _Site, before: torch.Tensor | None, after: torch.Tensor) -> torch.Tensor:
    """One call's statistics from the function's input (``before``) and output (``after``)."""
    function = site.function
    out = after.detach().float()
    zero = out.new_zeros(())
    site.numel += out.numel()
    saturated = dead = derivative = in_sum = in_squares = zero
    x = before.detach().float() if before is not None else None
    if x is not None:
        in_sum, in_squares = x.sum(), (x * x).sum()
        site.input_numel += x.numel()
    if function in DERIVATIVE_BOUNDS:
        if x is not None:
            saturated = (x.abs() >= SATURATION_INPUT).sum()
            y = torch.sigmoid(x) if function == "sigmoid" else torch.tanh(x)
        else:  # an RNN cell: only the output is visible; tanh(5) is the same saturation point
            y = out
            saturated = (y.abs() >= math.tanh(SATURATION_INPUT)).sum()
        derivative = (y * (1 - y)).sum() if function == "sigmoid" else (1 - y * y).sum()
    elif function in DYING and x is not None:
        # A unit is one position in a sample; it is dead when no sample in the batch activates it.
        silent = (x <= 0).all(dim=0) if x.dim() >= 2 else (x <= 0)
        dead = silent.sum().float()
        site.units += silent.numel()
        derivative = (x > 0).sum().float()
    return torch.stack([saturated.float(), dead, derivative.float(), out.sum(), (out * out).sum(), in_sum, in_squares])


class _Sites:
    """The activation sites: one per function, preceding layer and call style, with their rows."""

    def __init__(self, place: _Place) -> None:
        self.place = place
        self.sites: dict[tuple[str, str | None, str], _Site] = {}
        self.gain_of: dict[str, str] = {}
        self.inside_activation = 0
        self.activation_inputs: list[torch.Tensor | None] = []

    def record(self, function: str, call: str, before: torch.Tensor | None, after: torch.Tensor) -> None:
        key = (function, self.place.after, call)
        site = self.sites.get(key)
        if site is None:
            site = self.sites[key] = _Site(function, call, self.place.after)
        if self.place.weight_layer is not None:
            self.gain_of.setdefault(self.place.weight_layer, function)
        with torch.no_grad():
            site.rows.append(_row(site, before, after))

    def module_started(self, module: nn.Module, args: Any) -> None:
        self.inside_activation += 1
        value = args[0] if args else None
        # Copied because an in-place activation (nn.ReLU(inplace=True)) overwrites its input.
        usable = isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0
        self.activation_inputs.append(value.detach().clone() if usable and value is not None else None)

    def module_done(self, function: str, label: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.inside_activation -= 1
            before = self.activation_inputs.pop()
            if before is not None and isinstance(output, torch.Tensor) and output.is_floating_point():
                self.record(function, label, before, output)

        return hook


class _Tracker(TorchFunctionMode):
    """Sees every torch function the model calls and hands it to the depth, place and site records."""

    def __init__(self) -> None:
        super().__init__()
        self.depths = Depths()
        self.place = _Place()
        self.sites = _Sites(self.place)
        # Our own statistics, computed in module hooks, must not be seen as the model's calls.
        self.busy = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.busy:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        function = _function_of(name)
        before = _first_tensor(args, kwargs) if function and not self.sites.inside_activation else None
        if before is not None and _in_place(name, args, kwargs):
            before = before.detach().clone()  # statistics come from the input, which the call overwrites
        output = func(*args, **kwargs)
        if before is not None or name in _RNN_CELLS:
            result = output[0] if isinstance(output, tuple) else output
            if isinstance(result, torch.Tensor) and result.is_floating_point():
                with self._own_work():
                    self.sites.record(function or _RNN_CELLS[name], _call_label(func), before, result)
        elif name in _NORM_FUNCTIONS:
            self.place.saw_norm_function(name)
        self.depths.propagate(name, args, kwargs, output)
        return output

    @contextlib.contextmanager
    def _own_work(self) -> Iterator[None]:
        self.busy = True
        try:
            yield
        finally:
            self.busy = False

    @contextlib.contextmanager
    def hooks(self, model: nn.Module, count_hooks: Callable[[int], None]) -> Iterator[None]:
        handles = []
        try:
            for name, module in model.named_modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    handles.append(module.register_forward_pre_hook(self.place.layer_started(name, module)))
                if is_norm_layer(module):
                    handles.append(module.register_forward_pre_hook(self.place.norm_started(name)))
                    handles.append(module.register_forward_hook(self.place.norm_done))
                function = _module_function(module)
                if function is not None:
                    label = f"nn.{type(module).__name__} {name!r}"
                    handles.append(module.register_forward_pre_hook(self._activation_started))
                    handles.append(module.register_forward_hook(self._activation_done(function, label)))
            count_hooks(len(handles))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _activation_started(self, module: nn.Module, args: Any) -> None:
        with self._own_work():
            self.sites.module_started(module, args)

    def _activation_done(self, function: str, label: str) -> Any:
        done = self.sites.module_done(function, label)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            with self._own_work():
                done(module, args, output)

        return hook

    def profile(self, model: nn.Module, chain: tuple[int, int]) -> ActivationProfile:
        """Everything as floats, with one host sync per device."""
        weights = _weights(model, self.place.calls)
        sites = list(self.sites.sites.values())
        rows = [row for site in sites for row in site.rows]
        # One fused L2 pass and one sum per matrix: half the time of Tensor.std on large models.
        matrices = [param.detach() for _, _, param in weights]
        norms = float32_norms(matrices, 2) if matrices else []
        sums = [matrix.sum(dtype=torch.float32) for matrix in matrices]
        values = to_host(rows + norms + sums)
        stats, position = [], 0
        for site in sites:
            count = len(site.rows)
            total = [sum(values[position + i][col] for i in range(count)) for col in range(_COLUMNS)]
            position += count
            stats.append(_site_stats(site, count, total))
        count = len(weights)
        init_scales = []
        for i, (layer, parameter, param) in enumerate(weights):
            norm, weight_sum = values[position + i][0], values[position + count + i][0]
            _, std = _mean_std(weight_sum, norm**2, param.numel())
            function = self.sites.gain_of.get(layer, "linear")
            init_scales.append(init_scale(layer, parameter, tuple(param.shape), std or 0.0, function))
        return ActivationProfile(
            sites=stats,
            init_scales=init_scales,
            shortest_chain=chain[0],
            longest_chain=chain[1],
            normalisation=list(self.place.norms),
            repeated={name: calls for name, calls in self.place.calls.items() if calls > 1},
        )


def _weights(model: nn.Module, calls: dict[str, int]) -> list[tuple[str, str, nn.Parameter]]:
    """Weight matrices of the layers that ran (embeddings and norms have no fan-in reference)."""
    weights, seen = [], set()
    for name, module in model.named_modules():
        if name not in calls or is_norm_layer(module) or isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            continue
        for parameter, param in module.named_parameters(recurse=False):
            if param.requires_grad and param.dim() >= 2 and param.numel() and id(param) not in seen:
                seen.add(id(param))
                weights.append((name, parameter, param))
    return weights


def _mean_std(total: float, squares: float, count: float) -> tuple[float | None, float | None]:
    if not count:
        return None, None
    mean = total / count
    return mean, math.sqrt(max(0.0, squares / count - mean * mean))


def _site_stats(site: _Site, count: int, total: list[float]) -> ActivationStats:
    numel = site.numel
    _, output_std = _mean_std(total[_OUT_SUM], total[_OUT_SQUARES], numel)
    input_mean, input_std = _mean_std(total[_IN_SUM], total[_IN_SQUARES], site.input_numel)
    saturating = site.function in DERIVATIVE_BOUNDS
    dying = site.function in DYING and site.units > 0
    measured_derivative = saturating or dying
    return ActivationStats(
        function=site.function,
        call=site.call,
        after=site.after,
        calls=count,
        numel=int(numel),
        output_std=output_std or 0.0,
        saturated_share=total[_SATURATED] / numel if saturating and numel else None,
        dead_share=total[_DEAD] / site.units if dying else None,
        mean_derivative=total[_DERIVATIVE] / numel if measured_derivative and numel else None,
        derivative_bound=DERIVATIVE_BOUNDS.get(site.function, 1.0 if site.function in DYING else None),
        input_mean=input_mean,
        input_std=input_std,
    )


def _function_of(name: str) -> str | None:
    base = name[:-1] if name.endswith("_") else name
    return base if base in _FUNCTIONS else None


def _module_function(module: nn.Module) -> str | None:
    """The activation a module computes, or None when it is not an activation module."""
    if type(module) in _MODULE_FUNCTIONS:
        return _MODULE_FUNCTIONS[type(module)]
    if next(module.parameters(recurse=False), None) is not None or next(module.children(), None) is not None:
        return None
    lowered = type(module).__name__.lower()
    return next((function for word, function in _NAMED_FUNCTIONS if word in lowered), None)


def _in_place(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """relu_, sigmoid_, or F.relu(x, inplace=True) (also passed positionally)."""
    return name.endswith("_") or kwargs.get("inplace") is True or any(arg is True for arg in args[1:])


def _call_label(func: Any) -> str:
    """How the model called a function: 'torch.sigmoid', 'Tensor.relu' or 'F.gelu'."""
    name = func.__name__
    if getattr(func, "__qualname__", "").startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    if getattr(func, "__module__", None) in ("torch.nn.functional", "torch._C._nn"):
        return f"F.{name}"
    return f"torch.{name}"


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    value = args[0] if args else kwargs.get("input")
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        return value
    return None
