"""The one model runner: a model in its sandbox, its inputs interpreted once, then its passes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn

from pytest_gradcheck.core.profile import ActivationProfile, GradientProfile
from pytest_gradcheck.errors import ProbeError
from pytest_gradcheck.probing import activations, model_io, sharded
from pytest_gradcheck.probing.layers import (
    Layer,
    assign_owners,
    parameter_owners,
    record_execution,
    tied_embedding_weights,
)
from pytest_gradcheck.probing.sandbox import Sandbox, call_model, paused_cycle_collector, unwrap
from pytest_gradcheck.probing.statistics import gradient_statistics, gradients, layer_stats

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

    The model is left exactly as it was: parameters, buffers, ``.grad`` tensors,
    ``requires_grad`` flags, train/eval modes, hooks and the global RNG state.
    """
    __tracebackhide__ = True
    with ModelRun(model, inputs, seed=seed) as run:
        return run.gradient_profile(loss_fn=loss_fn, detail=detail)


class ModelRun:
    """One model in its sandbox, with its inputs interpreted once, for one or two passes.

    ``gradient_profile`` runs the forward and backward pass the profile comes from;
    ``activation_profile`` runs the instrumented forward pass behind the diagnosis,
    on the same inputs, from the same RNG state and buffers.
    """

    def __init__(self, model: nn.Module, inputs: Any = None, *, seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise ProbeError(
                f"probe() needs a torch.nn.Module, got {type(model).__name__}; "
                "pass the model instance, e.g. gradient_health(MyModel())"
            )
        self.model = unwrap(model)
        self.model_name = type(self.model).__name__
        self.seed = seed
        self.inputs = inputs
        self.named_modules = list(self.model.named_modules())
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()
        self._sandbox: Sandbox | None = None

    def __enter__(self) -> ModelRun:
        __tracebackhide__ = True
        with self._stack as stack:
            stack.enter_context(paused_cycle_collector())
            self._sandbox = stack.enter_context(Sandbox(self.model, [m for _, m in self.named_modules], self.seed))
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
        self._stack.close()

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

    def gradient_profile(self, *, loss_fn: LossFn | None = None, detail: bool = False) -> GradientProfile:
        """One forward and backward pass; per-layer gradient statistics in execution order."""
        __tracebackhide__ = True
        model = self.model
        fully_sharded = sharded.is_fully_sharded(model)
        with record_execution(model, self.named_modules, self.candidates) as record:
            output = call_model(model, self.args, self.kwargs)
        loss = model_io.loss_of(output, loss_fn, self.model_name)
        layers = assign_owners(self.candidates, record)
        params = [param for layer in layers for _, param in layer.params]
        if not loss.requires_grad:
            raise ProbeError(
                f"the loss of {self.model_name} does not depend on any trainable parameter; "
                "check that forward() uses the parameters and that no torch.no_grad() hides them"
            )
        if fully_sharded:  # every rank must probe: FSDP2 all-gathers and reduce-scatters
            detail = True  # its all-reduced rows hold every statistic anyway
            grads = sharded.gradients(loss, params)
            per_param, rows, loss_value = sharded.statistics(params, grads, record.embedding_rows, loss)
        else:
            grads = gradients(loss, params)
            tied = tied_embedding_weights(layers, record)
            per_param, rows, loss_value = gradient_statistics(params, grads, tied, record, loss, detail)
        return GradientProfile(
            model=self.model_name,
            layers=layer_stats(layers, per_param, rows, record, detail),
            loss=loss_value,
            seed=self.seed,
            device=str(params[0].device),
            dtype=str(params[0].dtype).replace("torch.", ""),
            input_shapes=model_io.describe(self.args, self.kwargs),
        )

    def activation_profile(self) -> ActivationProfile:
        """The instrumented forward pass, from the buffers and RNG state the gradient pass started with."""
        __tracebackhide__ = True
        assert self._sandbox is not None, "activation_profile() runs inside `with ModelRun(...)`"
        self._sandbox.rewind()
        return activations.measure(self.model, self.args, self.kwargs)
