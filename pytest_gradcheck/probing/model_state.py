"""What a model's own code could change while it runs, saved before and put back after, each on its own."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# The per-module hook registries a model could add to while it runs (names as in nn.Module).
_MODULE_HOOK_DICTS = (
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
_TENSOR_HOOK_DICTS = ("_backward_hooks", "_post_accumulate_grad_hooks")
_MISSING = object()
SavedBuffers = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]


class ModelState:
    """A model's parameters, buffers, ``.grad`` tensors, flags, registries and hooks, kept to be put back.

    Parameters are watched through their version counters, which every in-place write
    bumps: only the few that a pass wrote are copied back, from copies taken before the
    write (see :meth:`snapshot`). Buffers are copied back whole, as batch norm updates its
    running statistics inside its kernel without bumping their versions.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module], watch_parameters: bool) -> None:
        self.model = model
        self.modules = modules
        self.watch_parameters = watch_parameters
        self.params: list[nn.Parameter] = []
        self._flags: list[bool] = []
        self._versions: list[int] = []
        self._grads: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._buffers: list[tuple[nn.Module, SavedBuffers]] = []
        self._snapshots: dict[int, torch.Tensor] = {}
        self._snapshotting = False
        self._added: dict[tuple[int, str, str], tuple[nn.Module, str, str, Any]] = {}
        self._first_hook_id = RemovableHandle.next_id
        self._own_hooks = 0
        self._thread = threading.get_ident()

    def save(self) -> None:
        """Note everything that can be put back, and set the model's ``.grad`` tensors aside."""
        renormalised: list[nn.Parameter | None] = []
        for module in self.modules:
            if module._buffers:
                self._buffers.append((module, {name: _saved_buffer(buf) for name, buf in module._buffers.items()}))
            if module._parameters:
                self.params += [param for param in module._parameters.values() if param is not None]
                # torch documents that an embedding with max_norm renormalises its rows in place.
                if getattr(module, "max_norm", None) is not None:
                    renormalised += module._parameters.values()
        params = self.params
        self._flags = [param.requires_grad for param in params]
        self._versions = _versions(params)
        self._grads = [(param, param.grad) for param in params if param.grad is not None]
        for param, _ in self._grads:  # set aside: a backward() inside forward must not add to them
            param.grad = None
        if self.watch_parameters:
            # Frozen parameters may be written with gradients on. Copies on write: free until written.
            self.snapshot(renormalised + [param for param, flag in zip(params, self._flags) if not flag])
        self._first_hook_id = RemovableHandle.next_id

    def snapshot(self, params: list[Any]) -> None:
        """Keep the values of ``params`` so that they can be put back; a copy on write where torch has one."""
        if self._snapshotting:  # taking the copies may itself switch grad mode
            return
        self._snapshotting = True
        try:
            for param in params:
                if param is None or id(param) in self._snapshots or param.is_meta or param.is_inference():
                    continue
                self._snapshots[id(param)] = _copy_on_write(param.detach())
        finally:
            self._snapshotting = False

    def own_hooks(self, count: int) -> None:
        """Count the hooks the probe registers itself, so that only the model's own are looked for."""
        self._own_hooks += count

    @contextlib.contextmanager
    def registrations_recorded(self) -> Iterator[None]:
        """Global registration hooks note the buffers, parameters and submodules the model adds or replaces."""
        module_hooks = torch.nn.modules.module
        kinds = (
            ("_buffers", getattr(module_hooks, "register_module_buffer_registration_hook", None)),
            ("_parameters", getattr(module_hooks, "register_module_parameter_registration_hook", None)),
            ("_modules", getattr(module_hooks, "register_module_module_registration_hook", None)),
        )
        handles = [register(self._registration_note(registry)) for registry, register in kinds if register]
        self.own_hooks(len(handles))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _registration_note(self, registry: str) -> Callable[[nn.Module, str, Any], None]:
        def note(module: nn.Module, name: str, value: Any) -> None:
            if threading.get_ident() != self._thread:  # another thread's model
                return
            key = (id(module), registry, name)
            if key not in self._added:
                self._added[key] = (module, registry, name, getattr(module, registry).get(name, _MISSING))

        return note

    # -- putting back --------------------------------------------------------------------

    def restore(self, keep_grads_aside: bool = False) -> list[str]:
        """Everything the model's code could have changed, each on its own; what could not be, by name."""
        problems: list[str] = []
        for param in _changed(self.params, self._versions):
            problems += attempt(_namer(self.model, param), self._parameter_restorer(param))
        for module, saved in self._buffers:
            problems += _put_buffers_back(module, saved, self.model)
        problems += attempt("modules added during forward", self._undo_registrations)
        problems += attempt("hooks added during forward", self._remove_new_hooks)
        problems += attempt(".grad tensors", lambda: self._restore_grads(keep_grads_aside))
        return problems

    def restore_flags(self) -> None:
        """``requires_grad`` as it was: a model's own ``train()`` may have toggled it."""
        for param, requires_grad in zip(self.params, self._flags):
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)

    def _parameter_restorer(self, param: nn.Parameter) -> Callable[[], None]:
        saved = self._snapshots.get(id(param))
        if saved is None:

            def cannot() -> None:
                raise RuntimeError(
                    "the model's forward wrote it in place while gradients were on (through .detach() or "
                    "under an enabled grad mode) and the probe kept no copy; write it under torch.no_grad()"
                )

            return cannot
        return _restorer(param, saved)

    def _restore_grads(self, keep_aside: bool) -> None:
        for param in self.params:
            if param.grad is not None:  # made by a backward() inside forward
                param.grad = None
        if not keep_aside:
            for param, grad in self._grads:
                param.grad = grad

    def _undo_registrations(self) -> None:
        for module, registry, name, previous in reversed(list(self._added.values())):
            entries = getattr(module, registry)
            if previous is _MISSING:
                entries.pop(name, None)
            else:
                entries[name] = previous
        self._added.clear()

    def _remove_new_hooks(self) -> None:
        """Hooks registered while the model ran, found by their ids, which only ever grow."""
        newest = RemovableHandle.next_id
        if newest - self._first_hook_id <= self._own_hooks:
            return  # only the probe's own, which it removed itself
        new = range(self._first_hook_id, newest)
        registries = [getattr(module, name) for module in self.modules for name in _MODULE_HOOK_DICTS]
        registries += [getattr(param, name, None) for param in self.params for name in _TENSOR_HOOK_DICTS]
        # And the registries every module shares (nn.modules.module.register_module_forward_hook, ...).
        shared = vars(torch.nn.modules.module)
        registries += [value for key, value in shared.items() if key.startswith("_global_") and key.endswith("hooks")]
        for registry in registries:
            if registry:
                for key in [key for key in registry if key in new]:
                    del registry[key]


def attempt(what: str | Callable[[], str], restore: Callable[[], Any]) -> list[str]:
    """Run ``restore``; on failure, one line naming ``what`` (a callable: named only then) and the error."""
    try:
        restore()
    except Exception as error:
        return [f"{what if isinstance(what, str) else what()} ({type(error).__name__}: {error})"]
    return []


def _saved_buffer(buf: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the buffer, a copy of its values); inference tensors cannot change here and are not copied."""
    if buf is None or buf.is_inference() or buf.is_meta:
        return buf, None
    return buf, buf.detach().clone()


def _put_buffers_back(module: nn.Module, saved: SavedBuffers, model: nn.Module) -> list[str]:
    """``module``'s buffer dict as it was, and every value, each on its own."""
    problems = []
    entries = module._buffers
    entries.clear()
    for name, (buf, copy) in saved.items():
        entries[name] = buf
        if buf is not None and copy is not None:
            problems += attempt(_namer(model, buf, name, module), _restorer(buf, copy))
    return problems


def _namer(
    model: nn.Module, tensor: torch.Tensor, name: str | None = None, owner: nn.Module | None = None
) -> Callable[[], str]:
    return lambda: _name_of(model, tensor, name, owner)


def _restorer(tensor: torch.Tensor, saved: torch.Tensor) -> Callable[[], None]:
    return lambda: _put_back(tensor, saved)


def _put_back(tensor: torch.Tensor, saved: torch.Tensor) -> None:
    """``saved``'s values into ``tensor``, whose shape may have changed (``resize_``)."""
    with torch.no_grad():
        if tensor.shape != saved.shape:
            tensor.resize_(saved.shape)
        tensor.copy_(saved)


def _name_of(model: nn.Module, tensor: torch.Tensor, name: str | None = None, owner: nn.Module | None = None) -> str:
    """'parameter fc.weight of Linear 'fc'' or 'buffer bn.running_mean of BatchNorm1d 'bn'', for messages."""
    for path, module in model.named_modules():
        for key, value in [*module._parameters.items(), *module._buffers.items()]:
            if value is tensor and (owner is None or module is owner):
                kind = "parameter" if key in module._parameters else "buffer"
                full = f"{path}.{key}" if path else key
                where = f"{type(module).__name__} {path!r}" if path else type(module).__name__
                return f"{kind} {full} of {where}"
    return f"tensor {name or '?'}"


def _changed(tensors: list[nn.Parameter], versions: list[int]) -> list[nn.Parameter]:
    """The tensors written in place since their ``versions`` were read."""
    try:
        return [tensor for tensor, version in zip(tensors, versions) if tensor._version != version]
    except RuntimeError:  # an inference tensor has no version counter, and cannot be written here
        return [t for t, v in zip(tensors, versions) if not t.is_inference() and t._version != v]


def _versions(tensors: list[nn.Parameter]) -> list[int]:
    """Each tensor's version counter, which every in-place write bumps; -1 for inference tensors."""
    try:
        return [tensor._version for tensor in tensors]
    except RuntimeError:
        return [-1 if tensor.is_inference() else tensor._version for tensor in tensors]


def _copy_on_write(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` that costs nothing until one of the two is written (torch >= 2.2), else a clone."""
    lazy_clone = getattr(torch, "_lazy_clone", None)
    if lazy_clone is not None and tensor.layout == torch.strided:
        with contextlib.suppress(RuntimeError):
            return lazy_clone(tensor)
    return tensor.clone()
