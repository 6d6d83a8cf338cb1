"""Right verdicts on unusual wiring: functional calls, keyword calls, zero-width layers."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_gradcheck import check, probe

# ------------------------------------------------- 11. execution order follows parameter use


class SigmoidStackFunctionalHead(nn.Module):
    """The seed SigmoidNet (4 layers of 64, sigmoid between), its head applied with F.linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 64)

    def forward(self, x):
        for fc in (self.fc1, self.fc2, self.fc3):
            x = torch.sigmoid(fc(x))
        return torch.sigmoid(F.linear(x, self.head.weight, self.head.bias))


def test_head_applied_with_f_linear_is_the_last_layer():
    profile = probe(SigmoidStackFunctionalHead())
    assert [layer.name for layer in profile.layers] == ["fc1", "fc2", "fc3", "head"]
    assert profile.last.name == "head"


def test_sigmoid_stack_with_a_functional_head_is_judged_vanishing():
    profile = probe(SigmoidStackFunctionalHead())
    assert profile.ratio < 0.02, f"ratio {profile.ratio:.3g} ({profile.first.name} / {profile.last.name})"
    assert "vanishing" in [finding.rule for finding in check(profile) if finding.failing]


# ------------------------------------------------- 12. embeddings called with keywords


class EmbeddingCall(nn.Module):
    def __init__(self, keyword: bool):
        super().__init__()
        torch.manual_seed(0)
        self.keyword = keyword
        self.emb = nn.Embedding(30_000, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, ids):
        return self.head(self.emb(input=ids) if self.keyword else self.emb(ids))


def test_embedding_called_with_a_keyword_is_measured_over_its_looked_up_rows():
    ids = torch.randint(0, 30_000, (8, 16), generator=torch.Generator().manual_seed(1))
    positional = probe(EmbeddingCall(keyword=False), ids).layer("emb").grad_mean_abs
    keyword = probe(EmbeddingCall(keyword=True), ids).layer("emb").grad_mean_abs
    assert keyword == pytest.approx(positional, rel=1e-6)


# ------------------------------------------------- 13. zero-element layers are not dead


class ZeroWidthBranch(nn.Module):
    """A width-0 branch concatenated to a real one (a configurable head with no extra features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
            self.extra = nn.Linear(4, 0)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.cat([self.fc(x), self.extra(x)], dim=-1))


def test_layer_with_zero_elements_is_not_reported_dead():
    profile = probe(ZeroWidthBranch())
    assert [layer.name for layer in profile.layers if layer.dead] == []


def test_layer_with_zero_elements_does_not_fail_the_dead_rule():
    profile = probe(ZeroWidthBranch())
    assert "dead" not in [finding.rule for finding in check(profile) if finding.failing]
