"""Clear errors, never a raw torch traceback: each case gets a profile or a ProbeError that says what to do."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from helpers.models import default_loss
from helpers.state import assert_untouched, attempt, snapshot
from torch import nn
from torch.nn.utils import parametrizations

from pytest_gradcheck import GradientProfile, ProbeError, check, probe

# ---------------------------------------------- 14. reentrant activation checkpointing


class ReentrantCheckpoint(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        hidden = torch.relu(self.fc1(x))
        hidden = checkpoint.checkpoint(lambda t: torch.relu(self.fc2(t)), hidden, use_reentrant=True)
        return self.head(hidden)


def test_reentrant_checkpoint_gives_a_profile_or_a_probe_error_that_says_what_to_change():
    model = ReentrantCheckpoint()
    before = snapshot(model)
    profile, error = attempt(probe, model)
    if error is not None:
        assert isinstance(error, ProbeError), f"raw {type(error).__name__}: {error}"
        assert "use_reentrant=False" in str(error)
    else:
        assert [layer.name for layer in profile.layers] == ["fc1", "fc2", "head"]
    assert_untouched(model, before)


# ------------------------------------------------------------- 15. complex parameters


class ComplexWeight(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head((x.to(torch.cfloat) @ self.mix).abs())  # a real loss


@pytest.mark.parametrize("detail", [False, True], ids=["fast", "detail"])
def test_complex_parameter_is_measured_as_mean_abs_or_refused_clearly(detail):
    model, x = ComplexWeight(), torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    profile, error = attempt(probe, model, x, detail=detail)
    if error is not None:
        assert isinstance(error, ProbeError), f"raw {type(error).__name__}: {error}"
        assert "complex" in str(error).lower() and "mix" in str(error)
        return
    twin = copy.deepcopy(model).train()
    default_loss(twin(x)).backward()
    (stats,) = [layer for layer in profile.layers if layer.kind == "ComplexWeight"]  # the root owns `mix`
    assert stats.finite
    assert stats.grad_mean_abs == pytest.approx(twin.mix.grad.abs().mean().item(), rel=1e-5)


# -------------------------------------------------- 16. sparse embeddings, with and without detail


class TwoSparseEmbeddings(nn.Module):
    """Two sparse tables of the same dimension (and different sizes)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(50, 8, sparse=True)
        self.tags = nn.Embedding(60, 8, sparse=True)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.words(ids) + self.tags(ids))


def _verdict(profile: GradientProfile) -> list[str]:
    return sorted(finding.rule for finding in check(profile) if finding.failing)


@pytest.mark.parametrize("detail", [False, True], ids=["fast", "detail"])
def test_two_sparse_embeddings_of_one_dimension_probe(detail):
    profile = probe(TwoSparseEmbeddings(), detail=detail)
    assert [layer.name for layer in profile.layers] == ["words", "tags", "head"]


def test_two_sparse_embeddings_get_the_same_verdict_with_and_without_detail():
    fast = probe(TwoSparseEmbeddings())
    detailed = probe(TwoSparseEmbeddings(), detail=True)
    assert _verdict(detailed) == _verdict(fast)
    assert detailed.ratio == fast.ratio
    means = [[layer.grad_mean_abs for layer in profile.layers] for profile in (fast, detailed)]
    assert means[1] == pytest.approx(means[0], rel=1e-6)


# The same class, written into the pytester project from its source.
SPARSE_TEST = (
    "import torch\nfrom torch import nn\n\n\n"
    + inspect.getsource(TwoSparseEmbeddings)
    + "\n\ndef test_sparse(gradient_health):\n    gradient_health(TwoSparseEmbeddings(), min_ratio=0.001)\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("options", [(), ("--grad-report",)], ids=["plain", "grad-report"])
def test_sparse_embeddings_pass_through_the_fixture_with_and_without_grad_report(pytester, options):
    pytester.makepyfile(test_sparse=SPARSE_TEST)
    result = pytester.runpytest_subprocess(*options)
    result.assert_outcomes(passed=1)


# -------------------------------------------------------------------- 17. inference mode


def test_probe_under_inference_mode_says_inference_mode_is_the_reason():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = snapshot(model)
    with torch.inference_mode():
        _, error = attempt(probe, model)
    assert isinstance(error, ProbeError), f"expected a ProbeError, got {error!r}"
    assert "inference" in str(error).lower(), str(error)
    assert_untouched(model, before)


# ---------------------------------------------------------------- 18. bad arguments


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("seed", [2**70, 1.5, "0", None], ids=["2**70", "1.5", "str", "None"])
def test_bad_seed_is_a_clear_error_naming_seed(seed):
    model = small_model()
    before = snapshot(model)
    _, error = attempt(probe, model, seed=seed)
    assert isinstance(error, (ProbeError, TypeError)), f"raw {type(error).__name__}: {error}"
    assert "seed" in str(error), str(error)
    assert_untouched(model, before)


@pytest.mark.parametrize("seed", [0, 7, 2**63 - 1])
def test_ordinary_int_seeds_still_work(seed):
    profile = probe(small_model(), seed=seed)
    assert profile.seed == seed


def test_non_callable_loss_fn_is_a_clear_error_naming_loss_fn():
    model = small_model()
    before = snapshot(model)
    _, error = attempt(probe, model, loss_fn=3)
    assert isinstance(error, (ProbeError, TypeError)), f"raw {type(error).__name__}: {error}"
    assert "loss_fn" in str(error), str(error)
    assert_untouched(model, before)


# ------------------------------------------------- 19. parametrized first layers


@pytest.mark.parametrize(
    "parametrize",
    [parametrizations.weight_norm, parametrizations.spectral_norm, parametrizations.orthogonal],
    ids=["weight_norm", "spectral_norm", "orthogonal"],
)
def test_parametrized_first_layer_does_not_stop_input_inference(parametrize):
    torch.manual_seed(0)
    model = nn.Sequential(parametrize(nn.Linear(8, 4, bias=False)), nn.ReLU(), nn.Linear(4, 2))
    before = snapshot(model)
    profile = probe(model)
    assert profile.input_shapes == ["float32[8, 8]"]
    assert_untouched(model, before)


# ---------------------------------------------- advice that fits the first layer


class _NeedsTwoInputs(nn.Module):
    def __init__(self, first: nn.Module):
        super().__init__()
        self.first = first
        self.head = nn.Linear(5, 1)

    def forward(self, x, mask):  # the inferred single input cannot fit this forward()
        return self.head(self.first(x)[0] * mask)


@pytest.mark.parametrize(
    ("first", "example"),
    [
        (nn.LSTM(6, 5), "torch.randn(16, 8, 6)"),  # steps, batch, features
        (nn.LSTM(6, 5, batch_first=True), "torch.randn(8, 16, 6)"),
    ],
)
def test_a_rejected_input_gets_an_example_shaped_for_the_first_layer(first, example):
    with pytest.raises(ProbeError) as caught:
        probe(_NeedsTwoInputs(first))
    assert caught.value.problem in str(caught.value)
    assert f"inputs={example}" in str(caught.value)
    assert "224" not in str(caught.value)  # never an image shape for a sequence model
