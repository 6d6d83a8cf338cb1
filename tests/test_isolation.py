"""The README's promise: a probe leaves the model EXACTLY as it was, whatever the model does.

Each test takes a bit-exact snapshot (state.py), probes, and compares. Where the issue
allows a refusal instead of a profile, the refusal must be a ProbeError that names the
object, and the model must still be untouched.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
from helpers.state import assert_untouched, attempt, differences, names_object, snapshot
from torch import nn

from pytest_gradcheck import ProbeError, probe

# ---------------------------------------------------------------- 1. in-place parameter edits


class MaxNormEmbedding(nn.Module):
    """Stock nn.Embedding with max_norm renormalises the looked-up rows of its weight in place."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 8, max_norm=1.0)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.embed(ids))


class HalvesItsWeight(nn.Module):
    """A hand-written in-place edit of a parameter under no_grad inside forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.scaled = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            self.scaled.weight.mul_(0.5)
        return self.head(self.scaled(x))


@pytest.mark.parametrize(
    "make, parameter",
    [(MaxNormEmbedding, "embed.weight"), (HalvesItsWeight, "scaled.weight")],
    ids=["embedding-max_norm", "weight.mul_-in-forward"],
)
def test_parameters_changed_in_place_during_forward_come_back_bit_identical(make, parameter):
    model = make()
    before = snapshot(model)
    _, error = attempt(probe, model)  # inputs inferred: the default probe
    if error is not None:
        assert isinstance(error, ProbeError), f"raw {type(error).__name__}: {error}"
        assert names_object(str(error), parameter), f"the refusal does not name {parameter}: {error}"
    assert_untouched(model, before)


# ---------------------------------------------------- 2. restoring never crashes nor stops halfway


def qat_model() -> nn.Module:
    """Per-channel QAT: the weight observers resize_() their empty min/max buffers in forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    return tq.prepare_qat(model).eval()


class InferenceBuffers(nn.Module):
    """A buffer created under torch.inference_mode() (only read), next to a BatchNorm whose stats move in train mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)
        with torch.inference_mode():
            self.register_buffer("offset", torch.full((8,), 2.0))

    def forward(self, x):
        return self.head(self.bn(self.fc(x)) + self.offset)  # an add saves nothing for backward


def _restore_case(make):
    model = make().eval()  # a model under evaluation: the probe must hand it back in eval mode
    before = snapshot(model)
    _, error = attempt(probe, model, torch.randn(8, 4, generator=torch.Generator().manual_seed(1)))
    return model, before, error


# torch.ao.quantization warns that it is deprecated (in favour of torchao); the models still run.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Please use quant_min and quant_max:UserWarning")
@pytest.mark.parametrize("make", [qat_model, InferenceBuffers], ids=["qat-per-channel", "inference-tensor-buffer"])
def test_eval_mode_model_comes_back_in_eval_mode_even_when_a_buffer_cannot_be_restored(make):
    model, before, _ = _restore_case(make)
    changed = differences(before, snapshot(model)).get("modes", [])
    assert not changed, f"modules left in training mode: {changed}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Please use quant_min and quant_max:UserWarning")
@pytest.mark.parametrize("make", [qat_model, InferenceBuffers], ids=["qat-per-channel", "inference-tensor-buffer"])
def test_every_buffer_is_restored_or_named_in_a_probe_error(make):
    model, before, error = _restore_case(make)
    if error is None:
        assert_untouched(model, before)
        return
    assert isinstance(error, ProbeError), f"raw {type(error).__name__} from the restore: {error}"
    # What could not be restored is reported; everything else came back.
    changed = set(differences(before, snapshot(model)).get("buffers", []))
    unreported = [name for name in changed if not names_object(str(error), name)]
    assert not unreported, f"buffers changed without being reported: {unreported}"
    assert_untouched(model, before, ignore={"buffers": changed})


# ------------------------------------------------------------------ 3. custom train() methods


class FreezesStemInEval(nn.Module):
    """train(mode) toggles requires_grad: the stem trains in train mode, is frozen in eval mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def train(self, mode: bool = True):
        super().train(mode)
        self.stem.requires_grad_(mode)
        return self

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)))


class FreezesStagesInTrain(nn.Module):
    """mmdetection style: train() calls super().train(mode), then freezes stage 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stage1 = nn.Linear(4, 8)
        self.stage2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.stage1.requires_grad_(False)
        return self

    def forward(self, x):
        return self.head(torch.relu(self.stage2(torch.relu(self.stage1(x)))))


def test_train_that_toggles_requires_grad_leaves_the_flags_as_they_were():
    model = FreezesStemInEval().eval()
    assert not model.stem.weight.requires_grad
    before = snapshot(model)
    probe(model)
    assert_untouched(model, before)


def test_train_that_freezes_stages_probes_and_leaves_the_flags_as_they_were():
    model = FreezesStagesInTrain().eval()  # loaded weights, all trainable, in eval mode
    before = snapshot(model)
    profile, error = attempt(probe, model)
    assert error is None, f"{type(error).__name__}: {error}"
    assert profile.layers, "the profile holds no layer"
    assert_untouched(model, before)


# ------------------------------------------------------------------------ 4. existing .grad


class BackwardInForward(nn.Module):
    """An auxiliary loss backward()'d inside forward, as some training code does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        hidden = self.fc(x)
        (hidden.pow(2).mean() * 0.1).backward(retain_graph=True)
        return self.head(torch.relu(hidden))


def test_existing_grads_stay_the_same_objects_and_bytes_when_forward_calls_backward():
    model = BackwardInForward()
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.25)
    before = snapshot(model)
    probe(model)
    assert_untouched(model, before)


def test_missing_grads_stay_missing_when_forward_calls_backward():
    model = BackwardInForward()
    probe(model)
    assert [name for name, p in model.named_parameters() if p.grad is not None] == []


# ------------------------------------------------------------------- 5. nothing is added


class LazyPositionTable(nn.Module):
    """Builds its positional table on the first forward, with register_buffer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if "positions" not in self._buffers:
            self.register_buffer("positions", torch.linspace(0, 1, 4))
        return self.fc(x) + self.positions


class AddsInForward(nn.Module):
    """Registers a parameter, a submodule or a forward hook the first time it runs."""

    def __init__(self, what: str):
        super().__init__()
        torch.manual_seed(0)
        self.what = what
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        hidden = self.fc(x)
        if self.what == "parameter":
            if "gain" not in self._parameters:
                self.gain = nn.Parameter(torch.ones(4))
            hidden = hidden * self.gain
        elif self.what == "submodule":
            if "adapter" not in self._modules:
                self.adapter = nn.Linear(4, 4)
            hidden = self.adapter(hidden)
        elif self.what == "hook" and not self.head._forward_hooks:
            self.head.register_forward_hook(lambda module, args, output: None)
        return self.head(hidden)


def test_buffer_registered_on_the_first_forward_does_not_stay():
    model = LazyPositionTable()
    before = snapshot(model)
    probe(model)
    assert "positions" not in dict(model.named_buffers())
    assert_untouched(model, before)


@pytest.mark.parametrize("what", ["parameter", "submodule", "hook"])
def test_parameters_submodules_and_hooks_registered_during_forward_do_not_stay(what):
    model = AddsInForward(what)
    before = snapshot(model)
    _, error = attempt(probe, model)
    assert error is None or isinstance(error, ProbeError), f"raw {type(error).__name__}: {error}"
    assert_untouched(model, before)


# ----------------------------------------------------------------------- 6. lazy modules


def lazy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))


def _lazy_refusal(model, inputs):
    before = snapshot(model)
    _, error = attempt(probe, model, inputs)
    return before, error


def test_lazy_module_is_not_materialised_by_a_probe_with_explicit_inputs():
    model = lazy_model()
    before, _ = _lazy_refusal(model, torch.randn(8, 5))
    assert type(model[0]) is nn.LazyLinear
    assert_untouched(model, before)


def test_lazy_module_is_not_turned_into_a_zero_width_linear_by_inferred_inputs():
    # Today it becomes Linear(in_features=0, ...): inference read LazyLinear's placeholder in_features.
    model = lazy_model()
    before, _ = _lazy_refusal(model, None)
    assert type(model[0]) is nn.LazyLinear, f"the lazy module became {model[0]!r}"
    assert_untouched(model, before)


@pytest.mark.parametrize("inputs", [None, "explicit"], ids=["inferred", "explicit"])
def test_uninitialised_lazy_modules_get_a_probe_error_that_says_run_one_forward_first(inputs):
    model = lazy_model()
    _, error = _lazy_refusal(model, torch.randn(8, 5) if inputs else None)
    assert isinstance(error, ProbeError), f"expected a ProbeError, got {error!r}"
    message = str(error).lower()
    assert "lazy" in message or "uninitiali" in message
    assert "forward" in message  # says what to do: run one forward pass first


# ------------------------------------------------------------------------- 7. TorchScript


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torchscript_model_is_probed_or_refused_naming_torchscript_and_never_changed(training):
    torch.manual_seed(0)
    model = torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)))
    model.train(training)
    inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    before = snapshot(model)
    _, error = attempt(probe, model, inputs)
    if error is not None:
        assert isinstance(error, ProbeError), f"raw {type(error).__name__}: {error}"
        assert "torchscript" in str(error).lower()
    assert model.training is training
    assert_untouched(model, before)


# ----------------------------------------------------------------------------- 8. threads


class DropoutNet(nn.Module):
    """Dropout twice, with a pause between: another thread runs while this one is in forward."""

    def __init__(self, pause=None):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 2)
        self.drop = nn.Dropout(0.5)
        self.pause = pause or (lambda: time.sleep(0.002))

    def forward(self, x):
        hidden = self.drop(torch.relu(self.fc1(x)))
        self.pause()
        return self.fc2(self.drop(hidden))


INPUTS = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))


def test_two_threads_probing_at_once_give_the_profiles_of_a_serial_run():
    seeds = (3, 4)
    models = [DropoutNet(), DropoutNet()]
    serial = {seed: [probe(models[0], INPUTS, seed=seed).to_dict() for _ in range(10)] for seed in seeds}
    concurrent: dict[int, list] = {seed: [] for seed in seeds}
    start = threading.Barrier(2)

    def worker(model, seed):
        start.wait()
        for _ in range(10):
            concurrent[seed].append(probe(model, INPUTS, seed=seed).to_dict())

    threads = [threading.Thread(target=worker, args=pair) for pair in zip(models, seeds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    differing = sum(a != b for seed in seeds for a, b in zip(serial[seed], concurrent[seed]))
    assert len(concurrent[3]) == len(concurrent[4]) == 10, "a thread failed"
    assert differing == 0, f"{differing} of 20 concurrent profiles differ from the serial run"


def test_overlapping_probes_in_two_threads_leave_the_global_rng_where_it_was():
    # The pauses make the second probe start and end inside the first one's forward pass,
    # whatever the scheduler does; a probe that serialises itself only waits for the timeouts.
    a_in_forward, b_in_forward, a_done = threading.Event(), threading.Event(), threading.Event()
    first = DropoutNet(lambda: (a_in_forward.set(), b_in_forward.wait(1.0)))
    second = DropoutNet(lambda: (b_in_forward.set(), a_done.wait(1.0)))
    alone = DropoutNet(lambda: None)  # the same weights, probed one at a time
    expected = {3: probe(alone, INPUTS, seed=3).to_dict(), 4: probe(alone, INPUTS, seed=4).to_dict()}
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    results = {}

    def run_first():
        results[3] = probe(first, INPUTS, seed=3).to_dict()
        a_done.set()

    def run_second():
        a_in_forward.wait(5.0)
        results[4] = probe(second, INPUTS, seed=4).to_dict()

    threads = [threading.Thread(target=run_first), threading.Thread(target=run_second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global torch RNG state moved"
    assert results == expected, "overlapping probes gave other profiles than one at a time"


# -------------------------------------------------------------- 9. randomness beyond torch


class DrawsFrom(nn.Module):
    """Draws a scale from Python's random or numpy's global RNG in forward."""

    def __init__(self, source: str):
        super().__init__()
        torch.manual_seed(0)
        self.source = source
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        scale = random.random() if self.source == "python" else float(np.random.rand())
        return self.fc2(torch.relu(self.fc1(x)) * (0.5 + scale))


@pytest.mark.parametrize("source", ["python", "numpy"])
def test_a_model_drawing_from_global_rngs_gives_the_same_profile_on_every_probe(source):
    model = DrawsFrom(source)
    first = probe(model, seed=5).to_dict()
    random.random(), np.random.rand()  # other code moves the global RNGs between probes
    assert probe(model, seed=5).to_dict() == first


@pytest.mark.parametrize("source", ["python", "numpy"])
def test_python_and_numpy_rng_states_are_left_as_they_were(source):
    model = DrawsFrom(source)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    probe(model)
    assert random.getstate() == python_state, "Python's random state moved"
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:], (
        "numpy's global RNG state moved"
    )


# --------------------------------------------------------------------- 10. the caller's inputs


class CentresInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x.sub_(x.mean())
        return self.head(self.fc(x))


@pytest.mark.parametrize(
    "wrap",
    [lambda x: x, lambda x: (x,), lambda x: [x], lambda x: {"x": x}, lambda x: lambda: x],
    ids=["tensor", "tuple", "list", "dict", "callable"],
)
def test_a_forward_that_edits_its_input_in_place_leaves_the_callers_tensor_alone(wrap):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) + 3.0
    original = x.clone()
    probe(CentresInPlace(), wrap(x))
    assert torch.equal(x, original), "the probe let forward() overwrite the caller's input tensor"
