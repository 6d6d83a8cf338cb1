"""The sandbox a model runs in: train mode, a seeded RNG and grad mode inside, everything restored after."""

from __future__ import annotations

import contextlib
import gc
import os
import traceback
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import torch
from torch import nn

from pytest_gradcheck.errors import ProbeError
from pytest_gradcheck.probing import model_io


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


class Sandbox:
    """Train mode and a seeded RNG inside; modes, buffers and RNG states restored on exit.

    ``modules`` is ``list(model.modules())``, which the caller has already. Between two
    passes, :meth:`rewind` puts the buffers and the RNG back where the first pass found
    them, so that the second pass sees what the first one saw.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module], seed: int) -> None:
        self.model = model
        self.modules = modules
        self.seed = seed
        self._modes: list[bool] = []
        self._buffers: list[tuple[nn.Module, dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]]] = []
        self._rng = contextlib.ExitStack()
        self._cuda_devices: list[int] = []
        self._marked: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def __enter__(self) -> Sandbox:
        own_train = False
        for module in self.modules:
            self._modes.append(module.training)
            own_train = own_train or type(module).train is not nn.Module.train
            if module._buffers:
                saved = {
                    name: (buf, None if buf is None else buf.detach().clone()) for name, buf in module._buffers.items()
                }
                self._buffers.append((module, saved))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda_devices = list(range(torch.cuda.device_count()))
        try:
            if own_train:
                self.model.train()  # a model's own train() (one that keeps BatchNorm frozen, say) has its say
            else:
                _set_modes(self.modules, [True] * len(self.modules))
            self._rng.enter_context(torch.random.fork_rng(devices=self._cuda_devices))
            # Only the CUDA devices in use are seeded: torch.manual_seed would also queue
            # a lazy seeding of CUDA, changing its RNG after the probe has returned.
            torch.random.default_generator.manual_seed(self.seed)
            for index in self._cuda_devices:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(self.seed)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def mark(self) -> None:
        """Remember the RNG state here (after the inputs were drawn): :meth:`rewind` returns to it."""
        cuda = [torch.cuda.get_rng_state(index) for index in self._cuda_devices]
        self._marked = (torch.get_rng_state(), cuda)

    def rewind(self) -> None:
        """Buffers as they were on entry, and the RNG state of the last :meth:`mark`."""
        self._restore_buffers()
        if self._marked is not None:
            cpu, cuda = self._marked
            torch.set_rng_state(cpu)
            for index, state in zip(self._cuda_devices, cuda):
                torch.cuda.set_rng_state(state, index)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            self._restore_buffers()
        finally:
            _set_modes(self.modules, self._modes)
            self._rng.close()

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for module, saved in self._buffers:
                module._buffers.clear()
                for name, (buf, copy) in saved.items():
                    if buf is not None and copy is not None:
                        buf.copy_(copy)
                    module._buffers[name] = buf


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
            f"{type(error).__name__}: {error}. Pass inputs= that fit the model's forward()"
        ) from None


def _user_frame(error: BaseException) -> str:
    """' at file:line (function)' of the innermost frame in the user's code, or ''."""
    package = os.path.dirname(os.path.dirname(__file__))
    skipped = (os.path.dirname(torch.__file__) + os.sep, package + os.sep)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(skipped)]
    if not frames:  # it broke inside torch's own modules: the message says enough
        return ""
    frame = frames[-1]
    return f" at {os.path.basename(frame.filename)}:{frame.lineno} ({frame.name})"
