"""The instrumented forward pass: activation statistics, weight scale and depth, as plain data."""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pytest_gradcheck import inputs as model_io
from pytest_gradcheck.errors import ProbeError
from pytest_gradcheck.probing import float32_norms, is_norm_layer, isolated, run_forward, unwrap
from pytest_gradcheck.profile import ActivationProfile, ActivationStats, InitScale

# DeepDiagnosis (Wardat et al., ICSE 2022) counts a sigmoid/tanh input with |x| >= 5 as saturated.
SATURATION_INPUT = 5.0

# Largest value of each function's derivative.
DERIVATIVE_BOUNDS = {"sigmoid": 0.25, "tanh": 1.0}
# Functions whose gradient is exactly zero for x <= 0: only these units can die.
_DYING = {"relu", "relu6"}
_RECTIFIERS = _DYING | {"leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "softplus", "hardswish"}
_FUNCTIONS = set(DERIVATIVE_BOUNDS) | _RECTIFIERS
# torch.nn.init.calculate_gain, extended to the smooth rectifiers (they are ReLU-like at scale).
GAINS = {"linear": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3.0, "selu": 0.75, "leaky_relu": math.sqrt(2.0 / (1 + 0.01**2))}
_RECTIFIER_GAIN = math.sqrt(2.0)

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
# Functions that apply a weight matrix: each one on a path adds one to the depth. Elementwise
# ops with a parameter (a bias, a positional embedding added to x) do not.
_WEIGHT_APPLICATIONS = {
    "linear", "bilinear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "addbmm", "baddbmm",
    "mv", "addmv", "einsum", "tensordot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "_convolution", "embedding", "embedding_bag", "rnn_tanh", "rnn_relu",
    "rnn_tanh_cell", "rnn_relu_cell", "lstm", "lstm_cell", "gru", "gru_cell", "multi_head_attention_forward",
}


def gain(function: str) -> float:
    """The init gain for a layer followed by ``function`` ('linear' when nothing follows)."""
    if function in GAINS:
        return GAINS[function]
    return _RECTIFIER_GAIN if function in _RECTIFIERS else 1.0


def measure(model: nn.Module, inputs: Any = None, *, seed: int = 0) -> ActivationProfile:
    """Run one instrumented forward pass, set up exactly as the probe's, and return plain data.

    The inputs, seed, train mode and grad mode match :func:`pytest_gradcheck.probing.probe`,
    so dropout masks and inferred inputs are the same as in the probe the numbers explain.
    """
    if not isinstance(model, nn.Module):
        raise ProbeError(f"measure() needs a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    tracker = _Tracker(model)
    with isolated(model, seed), torch.enable_grad():
        if inputs is None:
            inputs = model_io.infer_inputs(model)
        args, kwargs = model_io.as_call_arguments(inputs)
        for tensor in model_io.tensors_in((args, kwargs), max_depth=4):
            tracker.tag(tensor, 0, 0)
        with tracker.hooks(), tracker:
            output = run_forward(model, args, kwargs)
        chain = tracker.chain(output)
        del output
        return tracker.profile(chain)


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
    elif function in _DYING and x is not None:
        # A unit is one position in a sample; it is dead when no sample in the batch activates it.
        silent = (x <= 0).all(dim=0) if x.dim() >= 2 else (x <= 0)
        dead = silent.sum().float()
        site.units += silent.numel()
        derivative = (x > 0).sum().float()
    return torch.stack([saturated.float(), dead, derivative.float(), out.sum(), (out * out).sum(), in_sum, in_squares])


class _Tracker(TorchFunctionMode):
    """Sees every torch function the model calls: records activations and weight-chain depth.

    A tensor's depth is the number of weight matrices on the shortest and longest path from
    the inputs to it; only tensors that carry gradient count, so masks do not shorten paths.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sites: dict[tuple, _Site] = {}
        self.depths: dict[int, tuple[weakref.ref, int, int]] = {}
        self.after: str | None = None
        self.weight_layer: str | None = None
        self.gain_of: dict[str, str] = {}
        self.calls: dict[str, int] = {}
        self.norms: list[str] = []
        self.inside_activation = 0
        self.inside_norm = 0
        self.activation_inputs: list[torch.Tensor | None] = []
        # Our own statistics, computed in module hooks, must not be seen as the model's calls.
        self.busy = False

    # -- depth bookkeeping -------------------------------------------------------------
    def tag(self, tensor: torch.Tensor, shortest: int, longest: int) -> None:
        self.depths[id(tensor)] = (weakref.ref(tensor), shortest, longest)

    def depth(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        entry = self.depths.get(id(tensor))
        if entry is None or entry[0]() is not tensor:  # ids are reused once a tensor is freed
            return None
        return entry[1], entry[2]

    def _propagate(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        tracked, grad_tracked, weighted = [], [], False
        applies_weight = name in _WEIGHT_APPLICATIONS
        for tensor in model_io.tensors_in((args, kwargs), max_depth=4):
            depth = self.depth(tensor)
            if depth is not None:
                tracked.append(depth)
                if tensor.requires_grad:
                    grad_tracked.append(depth)
            elif applies_weight and tensor.requires_grad and tensor.dim() >= 2 and tensor.is_floating_point():
                weighted = True  # a weight matrix, or a tensor made from weights alone
        base = grad_tracked or tracked
        if not base:
            return
        step = 1 if weighted else 0
        shortest = min(d[0] for d in base) + step
        longest = max(d[1] for d in base) + step
        for tensor in model_io.tensors_in(output, max_depth=3):
            self.tag(tensor, shortest, longest)

    def chain(self, output: Any) -> tuple[int, int]:
        depths = [self.depth(t) for t in model_io.tensors_in(output, max_depth=3) if t.requires_grad]
        depths = [d for d in depths if d is not None]
        if not depths:
            return 0, 0
        return min(d[0] for d in depths), max(d[1] for d in depths)

    # -- the mode ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.busy:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        function = _function_of(name)
        before = _first_tensor(args, kwargs) if function and not self.inside_activation else None
        if before is not None and _in_place(name, args, kwargs):
            before = before.detach().clone()  # statistics come from the input, which the call overwrites
        output = func(*args, **kwargs)
        if before is not None or name in _RNN_CELLS:
            result = output[0] if isinstance(output, tuple) else output
            if isinstance(result, torch.Tensor) and result.is_floating_point():
                self.record(function or _RNN_CELLS[name], _call_label(func), before, result)
        elif name in _NORM_FUNCTIONS and not self.inside_norm and f"F.{name}" not in self.norms:
            self.norms.append(f"F.{name}")
        self._propagate(name, args, kwargs, output)
        return output

    def record(self, function: str, call: str, before: torch.Tensor | None, after: torch.Tensor) -> None:
        key = (function, self.after, call)
        site = self.sites.get(key)
        if site is None:
            site = self.sites[key] = _Site(function, call, self.after)
        if self.weight_layer is not None:
            self.gain_of.setdefault(self.weight_layer, function)
        self.busy = True
        try:
            with torch.no_grad():
                site.rows.append(_row(site, before, after))
        finally:
            self.busy = False

    # -- module hooks ------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self):
        handles = []
        try:
            for name, module in self.model.named_modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    handles.append(module.register_forward_pre_hook(self._layer_started(name, module)))
                if is_norm_layer(module):
                    handles.append(module.register_forward_pre_hook(self._norm_started(name)))
                    handles.append(module.register_forward_hook(self._norm_done))
                function = _module_function(module)
                if function is not None:
                    label = f"nn.{type(module).__name__} {name!r}"
                    handles.append(module.register_forward_pre_hook(self._activation_started))
                    handles.append(module.register_forward_hook(self._activation_done(function, label)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _layer_started(self, name: str, module: nn.Module):
        is_norm = is_norm_layer(module)

        def hook(module, args):
            self.after = name
            self.calls[name] = self.calls.get(name, 0) + 1
            if not is_norm:
                self.weight_layer = name

        return hook

    def _norm_started(self, name: str):
        def hook(module, args):
            self.inside_norm += 1
            if name not in self.norms:
                self.norms.append(name)

        return hook

    def _norm_done(self, module, args, output):
        self.inside_norm -= 1

    def _activation_started(self, module, args):
        self.inside_activation += 1
        value = args[0] if args else None
        # Copied because an in-place activation (nn.ReLU(inplace=True)) overwrites its input.
        usable = isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()
        self.busy = True
        try:
            self.activation_inputs.append(value.detach().clone() if usable else None)
        finally:
            self.busy = False

    def _activation_done(self, function: str, label: str):
        def hook(module, args, output):
            self.inside_activation -= 1
            before = self.activation_inputs.pop()
            if before is not None and isinstance(output, torch.Tensor) and output.is_floating_point():
                self.record(function, label, before, output)

        return hook

    # -- plain data --------------------------------------------------------------------
    def profile(self, chain: tuple[int, int]) -> ActivationProfile:
        """Everything as floats, with one host sync per device."""
        weights = self._weights()
        rows = [row for site in self.sites.values() for row in site.rows]
        # One fused L2 pass and one sum per matrix: half the time of Tensor.std on large models.
        matrices = [param.detach() for _, _, param in weights]
        squares = float32_norms(matrices, 2) if matrices else []
        sums = [matrix.sum(dtype=torch.float32) for matrix in matrices]
        values = _to_host(rows + squares + sums)
        sites, position = [], 0
        for site in self.sites.values():
            count = len(site.rows)
            total = [sum(values[position + i][col] for i in range(count)) for col in range(_COLUMNS)]
            position += count
            sites.append(_site_stats(site, count, total))
        count = len(weights)
        init_scales = []
        for i, (layer, pname, param) in enumerate(weights):
            _, std = _mean_std(values[position + count + i], values[position + i] ** 2, param.numel())
            init_scales.append(_init_scale(layer, pname, param, std, self.gain_of.get(layer, "linear")))
        return ActivationProfile(
            sites=sites,
            init_scales=init_scales,
            shortest_chain=chain[0],
            longest_chain=chain[1],
            normalisation=list(self.norms),
            repeated={name: calls for name, calls in self.calls.items() if calls > 1},
        )

    def _weights(self) -> list[tuple[str, str, nn.Parameter]]:
        """Weight matrices of the layers that ran (embeddings and norms have no fan-in reference)."""
        weights, seen = [], set()
        for name, module in self.model.named_modules():
            if name not in self.calls or is_norm_layer(module) or isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                continue
            for pname, param in module.named_parameters(recurse=False):
                if param.requires_grad and param.dim() >= 2 and id(param) not in seen:
                    seen.add(id(param))
                    weights.append((name, pname, param))
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
    dying = site.function in _DYING and site.units > 0
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
        derivative_bound=DERIVATIVE_BOUNDS.get(site.function, 1.0 if site.function in _DYING else None),
        input_mean=input_mean,
        input_std=input_std,
    )


def _init_scale(layer: str, pname: str, param: torch.Tensor, std: float, function: str) -> InitScale:
    receptive = param[0][0].numel() if param.dim() > 2 else 1
    fan_in, fan_out = param.shape[1] * receptive, param.shape[0] * receptive
    layer_gain = gain(function)
    return InitScale(
        layer=layer,
        parameter=pname,
        fan_in=fan_in,
        fan_out=fan_out,
        std=std,
        activation=function,
        gain=layer_gain,
        kaiming_std=layer_gain / math.sqrt(fan_in),
        xavier_std=layer_gain * math.sqrt(2.0 / (fan_in + fan_out)),
    )


def _to_host(tensors: list[torch.Tensor]) -> list:
    """Every tensor's values as Python lists/floats, one sync per device, in input order."""
    values: list = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).float() for i in indices]).tolist()
        position = 0
        for i in indices:
            size = tensors[i].numel()
            values[i] = flat[position : position + size] if tensors[i].dim() else flat[position]
            position += size
    return values


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


def _in_place(name: str, args: tuple, kwargs: dict) -> bool:
    """relu_, sigmoid_, or F.relu(x, inplace=True) (also passed positionally)."""
    return name.endswith("_") or kwargs.get("inplace") is True or any(arg is True for arg in args[1:])


def _call_label(func) -> str:
    """How the model called a function: 'torch.sigmoid', 'Tensor.relu' or 'F.gelu'."""
    name = func.__name__
    if getattr(func, "__qualname__", "").startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    if getattr(func, "__module__", None) in ("torch.nn.functional", "torch._C._nn"):
        return f"F.{name}"
    return f"torch.{name}"


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    value = args[0] if args else kwargs.get("input")
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        return value
    return None


