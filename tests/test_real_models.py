"""The probe on the models people actually test: Hugging Face, attention, RNNs, BatchNorm, compile, bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import VOCAB, SequenceClassifier, fresh, mlp, tiny_bert_config, tiny_gpt2, token_batch
from helpers.state import probe_untouched, trainable_numel
from torch import nn

from pytest_gradcheck import Bounds, assess, probe
from pytest_gradcheck.core.checks import check

transformers = pytest.importorskip("transformers")


def assert_counted_once(profile, model: nn.Module) -> None:
    """Every trainable element is reported by exactly one layer, tied ones included."""
    assert sum(layer.numel for layer in profile.layers) == trainable_numel(model)
    assert len({layer.name for layer in profile.layers}) == len(profile.layers)


# Hugging Face transformers, built offline from small configs (no downloads).


def test_gpt2_tied_embeddings_count_once_under_wte():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # the config ties them
    ids = token_batch()
    profile = probe_untouched(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})

    block = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    expected = ["transformer.wte", "transformer.wpe"]
    expected += [f"transformer.h.{i}.{part}" for i in range(2) for part in block]
    assert [layer.name for layer in profile.layers] == expected + ["transformer.ln_f"]
    assert profile.layer("transformer.wte").shared_with == ["lm_head"]
    assert_counted_once(profile, model)
    # The embedding table is a lookup, never the ratio's first layer; the tied head counts under it.
    assert (profile.first.name, profile.last.name) == ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj")
    assert profile.layer("transformer.wte").role == "lookup"
    assert all(layer.received_grad and layer.finite for layer in profile.layers)
    assert profile.input_shapes == ["input_ids=int64[2, 16]", "attention_mask=int64[2, 16]", "labels=int64[2, 16]"]


def test_gpt2_loss_from_model_output_when_labels_are_given():
    model = tiny_gpt2()
    ids = token_batch()
    profile = probe_untouched(model, {"input_ids": ids, "labels": ids})
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    # The ModelOutput's own cross-entropy, not a sum over its logits.
    assert profile.loss == pytest.approx(expected, rel=1e-5)
    assert 0.0 < profile.loss < 2 * torch.log(torch.tensor(float(VOCAB))).item()


def test_bert_masked_lm_ties_the_decoder_to_word_embeddings():
    model = transformers.BertForMaskedLM(tiny_bert_config())
    ids = token_batch()
    profile = probe_untouched(model, {"input_ids": ids, "labels": ids})

    embeddings = profile.layer("bert.embeddings.word_embeddings")
    assert embeddings.shared_with == ["cls.predictions.decoder"]
    assert "cls.predictions.decoder" not in [layer.name for layer in profile.layers]
    assert_counted_once(profile, model)
    # query, key and value read the same input; the largest gradient of the three stands for
    # that depth (query and key gradients are scaled by each other's near-zero products at init).
    assert profile.layer("bert.encoder.layer.0.attention.self.query").shares_input_with == [
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.value",
    ]
    assert (profile.first.name, profile.last.name) == (
        "bert.encoder.layer.0.attention.self.value",
        "cls.predictions.transform.dense",
    )
    with torch.no_grad():
        assert profile.loss == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)


def test_bert_pooler_outside_the_loss_is_reported_unused():
    model = transformers.BertModel(tiny_bert_config())  # with its pooler
    ids = token_batch()
    profile = probe_untouched(model, {"input_ids": ids}, loss_fn=lambda output: output.last_hidden_state.pow(2).mean())

    pooler = profile.layer("pooler.dense")
    assert pooler.executed and not pooler.received_grad
    assert pooler.unused_parameters == ["pooler.dense.weight", "pooler.dense.bias"]
    assert [layer.name for layer in profile.layers if not layer.received_grad] == ["pooler.dense"]
    assert (profile.first.name, profile.last.name) == (
        "encoder.layer.0.attention.self.value",
        "encoder.layer.1.output.dense",
    )
    assert_counted_once(profile, model)
    findings = check(profile, Bounds(fail_on_unused=True))
    unused = [finding for finding in findings if finding.rule == "unused"]
    assert len(unused) == 1 and unused[0].failing and unused[0].layers == ["pooler.dense"]


# torch.nn building blocks.


@pytest.mark.parametrize(
    "norm_first, block",
    [
        (False, ["self_attn", "self_attn.out_proj", "norm1", "linear1", "linear2", "norm2"]),
        (True, ["norm1", "self_attn", "self_attn.out_proj", "norm2", "linear1", "linear2"]),
    ],
    ids=["post-norm", "pre-norm"],
)
def test_transformer_encoder_layers_in_execution_order(norm_first, block):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, batch_first=True, norm_first=norm_first)
    final_norm = nn.LayerNorm(32) if norm_first else None  # pre-norm stacks end with one
    model = nn.TransformerEncoder(layer, num_layers=2, norm=final_norm, enable_nested_tensor=False)
    profile = probe_untouched(model, torch.randn(4, 10, 32))

    expected = [f"layers.{i}.{part}" for i in range(2) for part in block]
    assert [layer.name for layer in profile.layers] == expected + (["norm"] if norm_first else [])
    # MultiheadAttention uses out_proj's weight directly instead of calling the module, so
    # out_proj is placed right after its parent and still gets its gradient.
    out_proj = profile.layer("layers.0.self_attn.out_proj")
    assert out_proj.received_grad and out_proj.grad_mean_abs > 0
    assert profile.layer("layers.0.self_attn").numel == 3 * 32 * 32 + 3 * 32  # in_proj weight + bias
    assert (profile.first.name, profile.last.name) == ("layers.0.self_attn", "layers.1.linear2")
    assert_counted_once(profile, model)


# The LSTM's backward over 256 steps takes seconds on a CPU.
@pytest.mark.parametrize("rnn_type", [pytest.param(nn.LSTM, marks=pytest.mark.slow), nn.GRU], ids=["LSTM", "GRU"])
def test_recurrent_net_over_a_long_sequence(rnn_type):
    torch.manual_seed(0)
    model = SequenceClassifier(rnn_type)
    ids = torch.randint(0, 50, (4, 256))
    profile = probe_untouched(model, ids)

    assert [(layer.name, layer.kind) for layer in profile.layers] == [
        ("embed", "Embedding"),
        ("rnn", rnn_type.__name__),
        ("head", "Linear"),
    ]
    # One layer for the whole stack: the module owns weight_ih_l0 ... bias_hh_l1.
    assert profile.layer("rnn").numel == sum(p.numel() for p in model.rnn.parameters())
    assert (profile.first.name, profile.last.name) == ("rnn", "head")  # the embedding is a lookup
    assert all(layer.finite and layer.grad_mean_abs > 0 for layer in profile.layers)
    assert profile.ratio is not None and 0 < profile.ratio < float("inf")
    assert_counted_once(profile, model)


def test_conv_net_with_batchnorm_keeps_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    with torch.no_grad():  # running statistics that a probe in train mode would move
        model(torch.randn(16, 3, 16, 16) * 3 + 1)
    model.eval()
    running_mean = model[1].running_mean.clone()
    profile = probe_untouched(model, torch.randn(4, 3, 16, 16))  # state dict holds the running stats

    assert [layer.name for layer in profile.layers] == ["0", "1", "3", "4", "8"]
    assert [layer.is_norm for layer in profile.layers] == [False, True, False, True, False]
    assert (profile.first.name, profile.last.name) == ("0", "8")
    assert not model.training and torch.equal(model[1].running_mean, running_mean)
    assert model[1].num_batches_tracked.item() == 1
    assert_counted_once(profile, model)


def small_mlp() -> nn.Module:
    return fresh(mlp, 16, 32, 32, 4, activation=nn.Tanh)


# torch.compile's default backend imports inductor, which warns about torch.jit internals.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_model_is_probed_as_the_original_module():
    model = small_mlp()
    # Compilation is lazy and the probe unwraps to model._orig_mod, so nothing is compiled
    # here and this stays fast with the default inductor backend.
    compiled = torch.compile(model)
    x = torch.randn(8, 16)
    profile = probe_untouched(compiled, x)

    assert [layer.name for layer in profile.layers] == ["0", "2", "4"]
    assert profile.model == "Sequential"
    assert profile.to_dict() == probe(model, x).to_dict()


def test_compiled_model_keeps_its_graph_after_the_probe():
    graphs = []

    def recording_backend(graph_module, example_inputs):  # runs the traced graph eagerly
        graphs.append(graph_module)
        return graph_module.forward

    model = small_mlp()
    compiled = torch.compile(model, backend=recording_backend)
    x = torch.randn(8, 16)
    before = compiled(x)
    probe_untouched(compiled, x)
    after = compiled(x)

    assert len(graphs) == 1, "the probe's hooks made torch.compile recompile the model"
    assert torch.equal(before, after)


def test_compiled_submodule_names_lack_orig_mod():
    model = small_mlp()
    model[2] = torch.compile(model[2], backend="eager")
    profile = probe_untouched(model, torch.randn(8, 16))

    assert [layer.name for layer in profile.layers] == ["0", "2", "4"]
    assert (profile.first.name, profile.last.name) == ("0", "4")


def test_bfloat16_model_matches_its_float32_twin():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8))
    twin = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.randn(8, 32)
    profile = probe_untouched(twin, x.to(torch.bfloat16))
    reference = probe(model, x)

    assert (profile.dtype, profile.input_shapes) == ("bfloat16", ["bfloat16[8, 32]"])
    assert [layer.name for layer in profile.layers] == ["0", "2", "3"]
    assert (profile.first.name, profile.last.name) == ("0", "3")
    assert all(layer.finite and layer.grad_mean_abs > 0 for layer in profile.layers)
    # bfloat16 keeps ~3 significant digits; the statistics are summed in float32.
    assert profile.ratio == pytest.approx(reference.ratio, rel=0.05)
    assert_counted_once(profile, twin)


def test_bfloat16_model_gets_bfloat16_default_inputs():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)).to(torch.bfloat16)
    profile = probe_untouched(model)
    assert profile.input_shapes == ["bfloat16[8, 32]"]
    assert profile.dtype == "bfloat16"


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_a_documented_init_scheme_is_never_blamed_even_when_a_tight_bound_fails(family):
    # BERT's N(0, 0.02) is 6x under the Kaiming/Xavier reference at width 64, and T5 scales its
    # queries by (d_model d_kv)^-1/2 on purpose; the LayerNorms rescale the signal after them.
    ids = token_batch()
    if family == "bert":
        model = transformers.BertForSequenceClassification(tiny_bert_config())
        inputs = {"input_ids": ids}
    else:
        config = transformers.T5Config(
            vocab_size=VOCAB, d_model=64, d_ff=256, d_kv=16, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
        model = transformers.T5ForConditionalGeneration(config)
        inputs = {"input_ids": ids, "decoder_input_ids": ids}
    assessment = assess(model, inputs, min_ratio=50.0, max_ratio=100.0)  # bounds no model meets
    ratio_finding = next(finding for finding in assessment.findings if finding.rule == "vanishing")
    assert ratio_finding.failing
    assert "initialisation" not in [cause.cause for cause in ratio_finding.causes]
