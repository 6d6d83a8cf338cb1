"""The one model runner: a model in its sandbox, its inputs interpreted once, then its passes."""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn

from pytest_gradcheck.core.profile import ActivationProfile, GradientProfile, LayerStats, TimeProfile
from pytest_gradcheck.errors import ProbeError
from pytest_gradcheck.probing import activations, model_io, sharded, signals
from pytest_gradcheck.probing.layers import (
    ExecutionRecord,
    Layer,
    assign_owners,
    parameter_owners,
    place_by_use,
    public_name,
    record_execution,
    tied_embedding_weights,
)
from pytest_gradcheck.probing.sandbox import Sandbox, call_model, paused_cycle_collector, refuse_unprobeable, unwrap
from pytest_gradcheck.probing.statistics import (
    ParamStats,
    gradient_statistics,
    gradients,
    gradients_by_backward,
    layer_stats,
    to_host,
)

LossFn = Callable[[Any], torch.Tensor]


def probe(
    model: nn.Module, inputs: Any = None, *, loss_fn: LossFn | None = None, seed: int = 0, detail: bool = False
) -> GradientProfile:
    """Run one forward and backward pass of ``model`` and return its gradient profile.

    Every layer gets its mean |grad|, finiteness and all-zero flag, all three from one
    L1 norm per gradient. ``detail=True`` also measures the largest |grad|, the
    gradient and weight L2 norms and the share of exact zeros: four more reads of the
    gradients and one of the weights, which the report table, the plots and the
    ``max_grad`` bound need.

    The model is handed back exactly as it was (see :class:`Sandbox`), and the caller's
    inputs are never written to: the model runs on copies of them.
    """
    __tracebackhide__ = True
    with ModelRun(model, inputs, seed=seed) as run:
        return run.gradient_profile(loss_fn=loss_fn, detail=detail)


class _ReentrantCheckpoint(Exception):
    """The graph holds a reentrant torch.utils.checkpoint, which only a plain backward() can take."""


class ModelRun:
    """One model in its sandbox, with its inputs interpreted once, for one or two passes.

    ``gradient_profile`` runs the forward and backward pass the profile comes from;
    ``activation_profile`` runs the instrumented forward pass behind the diagnosis,
    on the same inputs, from the same RNG state and model state.
    """

    def __init__(self, model: nn.Module, inputs: Any = None, *, seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise ProbeError(
                f"probe() needs a torch.nn.Module, got {type(model).__name__}; "
                "pass the model instance, e.g. gradient_health(MyModel())"
            )
        self.seed = _checked_seed(seed)
        self.model = unwrap(model)
        self.model_name = type(self.model).__name__
        self.inputs = inputs
        self.named_modules = list(self.model.named_modules())
        self.fully_sharded = sharded.is_fully_sharded(self.model)  # refuses FSDP1
        refuse_unprobeable(self.model, self.named_modules)
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.candidates: list[Layer] = []
        self._stack = contextlib.ExitStack()
        self._sandbox: Sandbox | None = None

    def __enter__(self) -> ModelRun:
        __tracebackhide__ = True
        with self._stack as stack:
            stack.enter_context(paused_cycle_collector())
            modules = [module for _, module in self.named_modules]
            # FSDP2 swaps its parameters' storage itself while it runs; it keeps them, not the probe.
            sandbox = Sandbox(self.model, modules, self.seed, watch_parameters=not self.fully_sharded)
            self._sandbox = stack.enter_context(sandbox)
            stack.enter_context(torch.enable_grad())
            # Collected in train mode: a model's own train() may freeze or unfreeze parameters.
            self.candidates = self._trainable_layers()
            inputs = model_io.infer_inputs(self.model) if self.inputs is None else self.inputs
            self.args, self.kwargs = model_io.as_call_arguments(inputs)
            self._sandbox.mark()
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stack.__exit__(kind, error, trace)

    def _trainable_layers(self) -> list[Layer]:
        candidates = parameter_owners(self.named_modules)
        if not candidates:
            raise ProbeError(
                f"{self.model_name} has no trainable parameters (none with requires_grad=True); "
                "there are no gradients to check"
            )
        # Meta tensors run forward and backward happily but hold no numbers to report.
        on_meta = [layer.qualified(key) for layer in candidates for key, param in layer.params if param.is_meta]
        if on_meta:
            raise ProbeError(
                f"{self.model_name} has {len(on_meta)} trainable parameter(s) on the meta device, which hold "
                f"no values (first: {on_meta[0]}); materialize the model before probing, e.g. "
                "model.to_empty(device='cpu') and then initialise or load the weights"
            )
        return candidates

    def _forward(self) -> Any:
        """The model called on fresh copies of the inputs, its parameters watched."""
        __tracebackhide__ = True
        assert self._sandbox is not None, "a pass runs inside `with ModelRun(...)`"
        args, kwargs = model_io.fresh_copies(self.args, self.kwargs)
        with self._sandbox.watching():
            return call_model(self.model, args, kwargs)

    def gradient_profile(self, *, loss_fn: LossFn | None = None, detail: bool = False) -> GradientProfile:
        """One forward and backward pass; per-layer gradient statistics in execution order."""
        __tracebackhide__ = True
        if loss_fn is not None and not callable(loss_fn):
            raise ProbeError(
                f"loss_fn must be a callable that takes the output of {self.model_name} and returns a scalar "
                f"tensor, got {type(loss_fn).__name__}"
            )
        try:
            return self._gradient_pass(loss_fn, detail, plain_backward=False)
        except _ReentrantCheckpoint:
            assert self._sandbox is not None
            self._sandbox.rewind()
            return self._gradient_pass(loss_fn, detail, plain_backward=True)

    def _gradient_pass(self, loss_fn: LossFn | None, detail: bool, plain_backward: bool) -> GradientProfile:
        __tracebackhide__ = True
        assert self._sandbox is not None
        with record_execution(self.model, self.named_modules, self.candidates) as record:
            self._sandbox.own_hooks(record.hooks_registered)
            output = self._forward()
        loss, loss_kind = model_io.loss_of(output, loss_fn, self.model_name, self.seed)
        layers = assign_owners(self.candidates, record)
        params = [param for layer in layers for _, param in layer.params]
        if not loss.requires_grad:
            raise ProbeError(
                f"the loss of {self.model_name} does not depend on any trainable parameter; "
                "check that forward() uses the parameters and that no torch.no_grad() hides them"
            )
        scales = signals.input_scales(layers, record)
        normalised = signals.normalised_layers(layers, record)
        sharing = signals.siblings(layers, record)
        record.first_args.clear()  # the inputs' scales are taken: backward may free them
        measures = _Measures(scales, normalised, sharing)
        if self.fully_sharded:  # every rank must probe: FSDP2 all-gathers and reduce-scatters
            grads = gradients_by_backward(loss, params)
            per_param, rows, loss_value = sharded.statistics(params, grads, record.embedding_rows, loss)
            detail = True  # its all-reduced rows hold every statistic anyway
        else:
            # The output and the recurrent layers' steps are differentiated with the parameters.
            main = signals.main_output(output) if not plain_backward else None
            sources = signals.time_sources(layers, record) if not plain_backward else []
            # The output's gradient shows a softmax cross-entropy; the default loss is none.
            softmax_possible = loss_kind != "random"
            watched = ([main] if main is not None and main.requires_grad and softmax_possible else []) + [
                tensor for source in sources for tensor in source.tensors
            ]
            all_grads = self._gradients(loss, [*params, *watched], layers, record, plain_backward)
            grads, watched_grads = all_grads[: len(params)], all_grads[len(params) :]
            measures.add_gradient_pass(layers, params, grads, main, sources, watched_grads, softmax_possible)
            tied = tied_embedding_weights(layers, record)
            per_param, rows, loss_value, measured = gradient_statistics(
                params, grads, tied, record, loss, detail, measures.tensors()
            )
            measures.read(measured)
        if record.used_after:
            layers, per_param = _in_order_of_use(layers, per_param, record)
        stats = layer_stats(layers, per_param, rows, record, detail)
        measures.describe_layers(layers, stats)
        if any(row.received_grad and row.all_zero for row in stats):
            _mark_zero_weights(layers, stats)
        return GradientProfile(
            model=self.model_name,
            layers=stats,
            loss=loss_value,
            seed=self.seed,
            device=str(params[0].device),
            dtype=str(params[0].dtype).replace("torch.", ""),
            input_shapes=model_io.describe(self.args, self.kwargs),
            loss_kind=loss_kind,
            time=measures.time,
            **measures.output,
        )

    def _gradients(
        self,
        loss: torch.Tensor,
        inputs: list[torch.Tensor],
        layers: list[Layer],
        record: ExecutionRecord,
        plain_backward: bool,
    ) -> list[torch.Tensor | None]:
        """The gradients of ``inputs`` (the parameters, then any other tensor watched); where some
        layer was never called, the order they arrive in too."""
        arrivals: list[int] = []
        handles = []
        # A layer whose parameters another module uses (F.linear(h, self.head.weight)) was never
        # called; gradients arrive in reverse order of use, which places it where it was used.
        if any(id(layer.module) not in record.order for layer in layers):
            for index, layer in enumerate(layers):
                hook = _arrival(arrivals, index)
                handles.append(layer.params[0][1].register_hook(hook))
            assert self._sandbox is not None
            self._sandbox.own_hooks(len(handles))
        try:
            if plain_backward:
                return gradients_by_backward(loss, inputs)
            try:
                return gradients(loss, inputs)
            except RuntimeError as error:
                if "use_reentrant=True" not in str(error):
                    raise
                raise _ReentrantCheckpoint from None
        finally:
            for handle in handles:
                handle.remove()
            if arrivals:
                place_by_use(layers, record, list(dict.fromkeys(arrivals)))

    def activation_profile(self) -> ActivationProfile:
        """The instrumented forward pass, from the model state and RNG state the gradient pass started with."""
        __tracebackhide__ = True
        assert self._sandbox is not None, "activation_profile() runs inside `with ModelRun(...)`"
        self._sandbox.rewind()
        args, kwargs = model_io.fresh_copies(self.args, self.kwargs)
        with self._sandbox.watching():
            return activations.measure(self.model, args, kwargs, self._sandbox.own_hooks)


class _Measures:
    """The gradient pass's measurements beyond the gradients: device tensors first, numbers after the sync."""

    def __init__(
        self,
        scales: list[tuple[list[int], torch.Tensor]],
        normalised: dict[int, int],
        sharing: dict[int, list[str]],
    ) -> None:
        self.scales = scales
        self.normalised = normalised
        self.sharing = sharing
        self.invariance: dict[int, torch.Tensor] = {}
        self.output_tensors: list[torch.Tensor] = []
        self.steps: list[tuple[signals.TimeSource, torch.Tensor]] = []
        self.gates: dict[int, torch.Tensor] = {}
        self.values: dict[int, float] = {}
        self.invariance_values: dict[int, float] = {}
        self.gate_values: dict[int, float] = {}
        self.output: dict[str, Any] = {}
        self.time: list[TimeProfile] = []

    def add_gradient_pass(
        self,
        layers: list[Layer],
        params: list[nn.Parameter],
        grads: list[torch.Tensor | None],
        main: torch.Tensor | None,
        sources: list[signals.TimeSource],
        watched_grads: list[torch.Tensor | None],
        softmax_possible: bool,
    ) -> None:
        grad_of = {id(param): grad for param, grad in zip(params, grads)}
        self.gates = signals.gate_values(layers)
        for layer in signals.invariance_candidates(layers, grad_of):
            self.invariance[id(layer.module)] = signals.scale_invariance(layer, grad_of)
        position = 0
        if main is not None:
            # The output is watched (its gradient comes first) only where it can show a softmax.
            output_watched = main.requires_grad and softmax_possible
            output_grad = watched_grads[0] if output_watched else None
            position = 1 if output_watched else 0
            self.output_tensors = signals.output_measures(main, output_grad, softmax_possible)
            producer = signals.output_layer(main, layers)
            self.output["output_layer"] = public_name(producer) if producer is not None else None
        for source in sources:
            count = len(source.tensors)
            steps = signals.step_gradients(source, watched_grads[position : position + count])
            position += count
            if steps is not None:
                self.steps.append((source, steps))

    def tensors(self) -> list[torch.Tensor]:
        """Everything to copy to the host with the gradients' statistics, in one order."""
        return [
            *(stds for _, stds in self.scales),
            *self.invariance.values(),
            *self.output_tensors,
            *(steps for _, steps in self.steps),
            *self.gates.values(),
        ]

    def read(self, values: list[list[float]]) -> None:
        """The host values of :meth:`tensors`, in the same order."""
        flat = iter(values)
        self.values = {key: value for keys, _ in self.scales for key, value in zip(keys, next(flat))}
        self.invariance_values = {key: next(flat)[0] for key in self.invariance}
        if self.output_tensors:
            std, share, expected, classes = (next(flat)[0] for _ in range(4))
            self.output |= {
                "output_std": std,
                "output_softmax_share": share,
                "expected_loss": None if math.isnan(expected) else expected,
                "output_classes": int(classes),
            }
        self.time = [TimeProfile(public_name(source.layer), source.kind, next(flat)) for source, _ in self.steps]
        self.gate_values = {key: next(flat)[0] for key in self.gates}

    def describe_layers(self, layers: list[Layer], stats: list[LayerStats]) -> None:
        """Each layer's role, input scale and scale invariance, onto its LayerStats."""
        by_name = {layer.name: layer for layer in stats}
        for layer in layers:
            row = by_name.get(public_name(layer.name))
            if row is None:
                continue
            key = id(layer.module)
            row.role = signals.classify(layer.module)
            row.input_std = self.values.get(key)
            row.scale_invariance = self.invariance_values.get(key)
            row.normalised = key in self.normalised
            row.shares_input_with = [public_name(name) for name in self.sharing.get(key, [])]
            if key in self.normalised:  # the std of what it feeds the normalisation: that layer's input
                row.output_std = self.values.get(self.normalised[key])
            gate = self.gate_values.get(key, math.inf)
            row.gate = gate if math.isfinite(gate) else None


def _mark_zero_weights(layers: list[Layer], stats: list[LayerStats]) -> None:
    """Which layers hold an exactly-zero weight matrix: read only when some layer got no gradient at all."""
    by_name = {row.name: row for row in stats}
    order, tensors = signals.zero_weights(layers)
    values = [value for values in to_host(tensors) for value in values]  # a second sync, on this rare path
    zero = {key for key, value in zip(order, values) if value == 0.0}
    for layer in layers:
        row = by_name.get(public_name(layer.name))
        if row is not None and any(id(param) in zero for _, param in layer.params):
            row.gate = 0.0


def _arrival(arrivals: list[int], index: int) -> Callable[[torch.Tensor], None]:
    def hook(grad: torch.Tensor) -> None:
        arrivals.append(index)

    return hook


def _in_order_of_use(
    layers: list[Layer], per_param: list[ParamStats], record: ExecutionRecord
) -> tuple[list[Layer], list[ParamStats]]:
    """``layers`` sorted by where they ran or were used, with their parameters' statistics along."""
    chunks, start = [], 0
    for layer in layers:
        chunks.append(per_param[start : start + len(layer.params)])
        start += len(layer.params)
    order = sorted(range(len(layers)), key=lambda index: record.position(layers[index]))
    return [layers[index] for index in order], [stat for index in order for stat in chunks[index]]


def _checked_seed(seed: Any) -> int:
    """``seed`` as an int torch, Python and numpy all accept, or a ProbeError that says what is wrong."""
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if value is None or isinstance(seed, bool) or not 0 <= value < 2**64:
        raise ProbeError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r} ({type(seed).__name__})")
    return value
