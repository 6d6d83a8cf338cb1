"""The sandbox a model runs in: train mode, seeded RNGs and grad mode inside; the model handed back as it was."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import torch
from torch import nn

from pytest_gradcheck.errors import ProbeError
from pytest_gradcheck.probing import model_io
from pytest_gradcheck.probing.layers import is_norm_layer
from pytest_gradcheck.probing.model_state import ModelState, attempt

# One probe at a time in a process: the RNGs it seeds and the grad-mode watch it sets up are
# process-wide. Reentrant, so a model whose forward probes another model does not deadlock.
_PROBE_LOCK = threading.RLock()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, DataParallel or torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(compiled := getattr(model, "_orig_mod", None), nn.Module):
            model = compiled
        else:
            return model


@contextlib.contextmanager
def paused_cycle_collector() -> Iterator[None]:
    """Python's cycle collector paused while the model runs, and resumed as it was.

    A probe of a 1,000-layer model allocates tens of thousands of small objects, nearly
    all freed by reference counting before it returns; left on, the collector traverses
    them, and every object of the model, several times a probe: about 10 ms a probe,
    next to a 60 ms forward and backward pass.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def refuse_unprobeable(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> None:
    """A ProbeError, before anything is touched, for a model the probe would change or misread."""
    name = type(model).__name__
    if torch.is_inference_mode_enabled():
        raise ProbeError(
            f"the probe of {name} was called under torch.inference_mode(), which records no gradients; "
            "call it outside inference_mode (torch.no_grad() around it is fine: the probe turns gradients on)"
        )
    for path, module in modules:
        label = f"{type(module).__name__} {path!r}" if path else type(module).__name__
        if isinstance(module, torch.jit.ScriptModule):
            raise ProbeError(
                f"{name} is or contains a TorchScript module ({label}), which takes no Python hooks; "
                "probe the Python module before torch.jit.script, or use torch.compile, which the probe supports"
            )
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ProbeError(
                f"{name} has an uninitialised lazy module ({label}), whose parameters and class its first "
                "forward pass would change; run one forward pass on a real batch first, then probe it "
                "(or probe a copy: probe(copy.deepcopy(model), inputs))"
            )


class Sandbox:
    """Where a model runs for a probe; on exit it is handed back exactly as it was.

    Inside: train mode (the model's own ``train()`` has its say) with random regularisation
    (dropout, drop-path) off, seeded torch, Python and numpy RNGs, and the model's existing
    ``.grad`` tensors set aside. On exit, each of these comes back on its own, so one that
    cannot does not keep the others from it: parameters and buffers changed in place,
    buffers, parameters, submodules and hooks added, ``.grad`` tensors, ``requires_grad``
    flags, modes and the RNG states (see :class:`ModelState`). What could not be restored is
    named in a ProbeError.

    ``modules`` is ``list(model.modules())``, which the caller has already. Between two
    passes, :meth:`rewind` puts the model and the RNGs back where the first pass found them.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module], seed: int, *, watch_parameters: bool = True) -> None:
        self.model = model
        self.modules = modules
        self.seed = seed
        self.state = ModelState(model, modules, watch_parameters)
        self._stack = contextlib.ExitStack()
        self._modes: list[bool] = []
        self._cuda_devices: list[int] = []
        self._marked: tuple[Any, ...] | None = None
        self._thread = threading.get_ident()

    def __enter__(self) -> Sandbox:
        _PROBE_LOCK.acquire()
        try:
            self._modes = [module.training for module in self.modules]
            self.state.save()
            self._stack.enter_context(self.state.registrations_recorded())
            self._enter_train_mode()
            self._seed()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _enter_train_mode(self) -> None:
        own_train = any(type(module).train is not nn.Module.train for module in self.modules)
        if own_train:
            self.model.train()  # a model's own train() (one that keeps BatchNorm frozen, say) has its say
            modes = [module.training for module in self.modules]
        else:
            modes = [True] * len(self.modules)
        # Random regularisation is not part of the verdict: a module that owns no parameters and
        # no submodules and does not normalise computes a fixed function in eval mode, where
        # dropout, drop-path, stochastic depth and RReLU are the identity or deterministic.
        for index, module in enumerate(self.modules):
            if modes[index] and not module._modules and not module._parameters and not is_norm_layer(module):
                modes[index] = False
        _set_modes(self.modules, modes)

    def _seed(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda_devices = list(range(torch.cuda.device_count()))
        self._stack.enter_context(torch.random.fork_rng(devices=self._cuda_devices))
        # Only the CUDA devices in use are seeded: torch.manual_seed would also queue
        # a lazy seeding of CUDA, changing its RNG after the probe has returned.
        torch.random.default_generator.manual_seed(self.seed)
        for index in self._cuda_devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(self.seed)
        self._stack.callback(random.setstate, random.getstate())
        random.seed(self.seed)
        numpy = sys.modules.get("numpy")  # seeded only where the model could already use it
        if numpy is not None:
            self._stack.callback(numpy.random.set_state, numpy.random.get_state())
            numpy.random.seed(self.seed % 2**32)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """While the model's code runs: snapshot every parameter the first time it turns gradients off.

        A parameter that requires grad can only be written in place where autograd does not
        record, under ``torch.no_grad()`` (``nn.Embedding(max_norm=...)``'s renormalisation, a
        hand-written ``weight.mul_()``): gradients are turned off before any such write.
        """
        setter = getattr(torch._C, "_set_grad_enabled", None)
        if not self.state.watch_parameters or setter is None:
            yield
            return
        params, snapshot, thread = self.state.params, self.state.snapshot, self._thread

        def set_grad_enabled(mode: bool) -> None:
            if not mode and threading.get_ident() == thread and torch.is_grad_enabled():
                snapshot(params)
            setter(mode)

        torch._C._set_grad_enabled = set_grad_enabled  # type: ignore[assignment]
        try:
            yield
        finally:
            torch._C._set_grad_enabled = setter

    def own_hooks(self, count: int) -> None:
        """Count hooks the probe itself registers, so that only the model's own are looked for."""
        self.state.own_hooks(count)

    def mark(self) -> None:
        """Remember the RNG states here (after the inputs were drawn): :meth:`rewind` returns to them."""
        numpy = sys.modules.get("numpy")
        self._marked = (
            torch.get_rng_state(),
            [torch.cuda.get_rng_state(index) for index in self._cuda_devices],
            random.getstate(),
            numpy.random.get_state() if numpy is not None else None,
        )

    def rewind(self) -> None:
        """The model as it was on entry, in train mode, and the RNG states of the last :meth:`mark`."""
        problems = self.state.restore(keep_grads_aside=True)
        if problems:
            raise ProbeError(_cannot_restore(self.model, problems))
        if self._marked is not None:
            cpu, cuda, python, numpy_state = self._marked
            torch.set_rng_state(cpu)
            for index, state in zip(self._cuda_devices, cuda):
                torch.cuda.set_rng_state(state, index)
            random.setstate(python)
            numpy = sys.modules.get("numpy")
            if numpy is not None and numpy_state is not None:
                numpy.random.set_state(numpy_state)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            problems = self.state.restore()
            problems += attempt("train/eval modes", lambda: _set_modes(self.modules, self._modes))
            problems += attempt("requires_grad flags", self.state.restore_flags)
            problems += attempt("RNG states", self._stack.close)
        finally:
            _PROBE_LOCK.release()
        if not problems:
            return
        message = _cannot_restore(self.model, problems)
        if error is not None:  # the first failure is the one to see; this one is said on the side
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return
        raise ProbeError(message)


def _cannot_restore(model: nn.Module, problems: list[str]) -> str:
    return (
        f"the probe could not hand {type(model).__name__} back exactly as it was: "
        + "; ".join(problems)
        + ". Everything else was restored; probe a copy of the model (copy.deepcopy) to keep the original safe"
    )


def _set_modes(modules: list[nn.Module], modes: list[bool]) -> None:
    # What Module.train() does, minus its recursion and Module.__setattr__'s
    # lookups, which cost more than the rest of a probe on a 1,000-layer model.
    for module, training in zip(modules, modes):
        module.__dict__["training"] = training


def call_model(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``model(*args, **kwargs)``; a failure is a ProbeError that names the user's line."""
    __tracebackhide__ = True  # pytest shows the test's line, not this frame
    try:
        return model(*args, **kwargs)
    except Exception as error:
        shapes = ", ".join(model_io.describe(args, kwargs)) or "no arguments"
        # Said in one message, without torch's internal frames: the place in the user's
        # code where it broke is named, and the chained traceback is left out.
        raise ProbeError(
            f"{type(model).__name__}.forward failed on the probe inputs ({shapes}){_user_frame(error)}: "
            f"{type(error).__name__}: {error}",
            inputs_shape=model_io.example_shape(_first_layer(model)),
        ) from None


def _first_layer(model: nn.Module) -> nn.Module | None:
    """The first module (in registration order) that owns a parameter: where the input goes first."""
    return next((module for module in model.modules() if next(module.parameters(False), None) is not None), None)


def _user_frame(error: BaseException) -> str:
    """' at file:line (function)' of the innermost frame in the user's code, or ''."""
    package = os.path.dirname(os.path.dirname(__file__))
    skipped = (os.path.dirname(torch.__file__) + os.sep, package + os.sep)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(skipped)]
    if not frames:  # it broke inside torch's own modules: the message says enough
        return ""
    frame = frames[-1]
    return f" at {os.path.basename(frame.filename)}:{frame.lineno} ({frame.name})"
