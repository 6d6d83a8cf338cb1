"""Weight-chain depth: how many weight matrices lie between the model's inputs and each tensor."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from pytest_gradcheck.probing import model_io

# Functions that apply a weight matrix: each one on a path adds one to the depth. Elementwise
# ops with a parameter (a bias, a positional embedding added to x) do not.
_WEIGHT_APPLICATIONS = {
    "linear", "bilinear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "addbmm", "baddbmm",
    "mv", "addmv", "einsum", "tensordot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "_convolution", "embedding", "embedding_bag", "rnn_tanh", "rnn_relu",
    "rnn_tanh_cell", "rnn_relu_cell", "lstm", "lstm_cell", "gru", "gru_cell", "multi_head_attention_forward",
}  # fmt: skip


class Depths:
    """Weight-chain depth of every tensor: the fewest and the most weight matrices between it and the inputs.

    Only tensors that carry gradient count, so masks do not shorten paths.
    """

    def __init__(self) -> None:
        self._depths: dict[int, tuple[weakref.ref[torch.Tensor], int, int]] = {}

    def tag(self, tensor: torch.Tensor, shortest: int, longest: int) -> None:
        self._depths[id(tensor)] = (weakref.ref(tensor), shortest, longest)

    def of(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        entry = self._depths.get(id(tensor))
        if entry is None or entry[0]() is not tensor:  # ids are reused once a tensor is freed
            return None
        return entry[1], entry[2]

    def propagate(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        tracked, grad_tracked, weighted = [], [], False
        applies_weight = name in _WEIGHT_APPLICATIONS
        for tensor in model_io.tensors_in((args, kwargs), max_depth=4):
            depth = self.of(tensor)
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
        """(shortest, longest) weight chain from the inputs to the output."""
        found = [self.of(t) for t in model_io.tensors_in(output, max_depth=3) if t.requires_grad]
        depths = [d for d in found if d is not None]
        if not depths:
            return 0, 0
        return min(d[0] for d in depths), max(d[1] for d in depths)
