"""Healthy verdicts on CI-sized replicas of the zoo's false alarms (torchvision, timm, Hugging Face).

Each replica rebuilds, at a few dozen channels, the mechanism that made a real model look
unhealthy at init, and is judged under the probe's default loss and under cross-entropy on
fixed random labels. Where the mechanism shows in the profile, the test asserts it too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.models import default_loss, fresh, token_batch
from torch import nn

from pytest_gradcheck import check, probe
from pytest_gradcheck.core.fairness import is_scale_invariant
from pytest_gradcheck.core.findings import verdict

CLASSES = 10
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
FEATURES = torch.randn(2, 48, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, CLASSES, (2,), generator=torch.Generator().manual_seed(1))
SIGNAL_RULES = {"vanishing_signal", "exploding_signal", "loss_at_init", "vanishing_in_time", "exploding_in_time"}
LOSSES = ["default", "cross_entropy"]


def loss_for(loss: str, labels: torch.Tensor = LABELS):
    """None (the probe's default loss) or cross-entropy of the output against ``labels``."""
    if loss == "default":
        return None
    return lambda output: F.cross_entropy(output, labels)


def described(profile, findings) -> str:
    first = profile.first.name if profile.first else None
    last = profile.last.name if profile.last else None
    lines = [f"ratio {profile.ratio}, first {first}, last {last}"]
    lines += [f"{finding.rule} (failing={finding.failing}): {finding.message}" for finding in findings]
    return "\n".join(lines)


def healthy(model: nn.Module, inputs, loss_fn=None):
    """The model's profile and findings, after asserting the healthy verdict and silent signal rules."""
    profile = probe(model, inputs, loss_fn=loss_fn)
    findings = check(profile)
    assert verdict(findings) == "healthy", described(profile, findings)
    assert not [finding for finding in findings if finding.rule in SIGNAL_RULES], described(profile, findings)
    return profile, findings


def only(findings, rule: str):
    """The one finding of ``rule``."""
    matching = [finding for finding in findings if finding.rule == rule]
    assert len(matching) == 1, [(finding.rule, finding.message) for finding in findings]
    return matching[0]


def ratio_finding(findings):
    matching = [finding for finding in findings if finding.rule in ("vanishing", "exploding")]
    return matching[0] if matching else None


# ---------------------------------------------------------------- ResNets


def conv_bn(width_in: int, width_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width_in, width_out, 1, stride, bias=False), nn.BatchNorm2d(width_out))


class SqueezeExcite(nn.Module):
    """timm's SE: pool, reduce, expand, sigmoid, rescale the channels."""

    def __init__(self, width: int, reduced: int = 8):
        super().__init__()
        self.fc1 = nn.Conv2d(width, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, width, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Bottleneck(nn.Module):
    """torchvision's bottleneck: 1x1, 3x3, 1x1 conv-BN(-ReLU), identity or projection skip, SE after bn3."""

    def __init__(self, width_in: int, mid: int, width_out: int, stride: int = 1, se: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, width_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width_out)
        self.se = SqueezeExcite(width_out) if se else None
        self.downsample = conv_bn(width_in, width_out, stride) if stride != 1 or width_in != width_out else None

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return F.relu(out + skip)


class BottleneckResNet(nn.Module):
    """A bottleneck ResNet of 16 -> 64 channel blocks: a stride-2 conv-BN stem, four stages, global pool, Linear."""

    def __init__(self, layout=(3, 4, 23, 3), zero_init_residual: bool = False, se: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, width = [], 16
        for stage, depth in enumerate(layout):
            for index in range(depth):
                blocks.append(Bottleneck(width, 16, 64, 2 if index == 0 and stage > 0 else 1, se))
                width = 64
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, CLASSES)
        if zero_init_residual:
            for block in self.blocks:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class BasicBlock(nn.Module):
    """torchvision's basic block: two 3x3 conv-BNs, identity or projection skip."""

    def __init__(self, width_in: int, width_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width_out)
        self.conv2 = nn.Conv2d(width_out, width_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width_out)
        self.downsample = conv_bn(width_in, width_out, stride) if stride != 1 or width_in != width_out else None

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + skip)


class BasicResNet(nn.Module):
    """A ResNet-18-like net at widths 16-64, with torchvision's zero_init_residual: every bn2 gamma is zero."""

    def __init__(self, widths=(16, 32, 64), per_stage: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, width_in = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(per_stage):
                blocks.append(BasicBlock(width_in, width, 2 if index == 0 and stage > 0 else 1))
                width_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width_in, CLASSES)
        for block in self.blocks:
            nn.init.zeros_(block.bn2.weight)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("loss", LOSSES)
def test_deep_batchnorm_resnet_is_exempt_by_its_scale_invariant_stem(loss):
    profile, findings = healthy(fresh(BottleneckResNet), IMAGES, loss_for(loss))
    # 33 bottleneck blocks (ResNet-101's layout): the stem's gradient is far above the last layer's.
    assert profile.ratio > 50, described(profile, findings)
    finding = only(findings, "exploding")
    assert not finding.failing and finding.message.endswith("not failing")
    assert "conv1's weights are scale-invariant" in finding.message
    # A bias-free conv followed by BN: the loss ignores its scale.
    assert profile.first.name == "conv1"
    assert profile.first.normalised and profile.first.scale_invariance < 1e-2
    assert is_scale_invariant(profile.first)


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_init_residual_branches_are_behind_their_gates_not_dead(loss):
    profile, findings = healthy(fresh(BasicResNet), IMAGES, loss_for(loss))
    gated = only(findings, "zero_init")
    assert not gated.failing and "not failing" in gated.message
    branches = [f"blocks.{index}.{layer}" for index in range(6) for layer in ("conv1", "bn1", "conv2")]
    assert gated.layers == branches
    assert all(profile.layer(name).dead for name in branches)
    assert [layer.name for layer in profile.layers if layer.gate == 0.0] == [f"blocks.{i}.bn2" for i in range(6)]
    assert "blocks.0.bn2" in gated.message
    # The stem, the projections and the head still get gradients, and the ratio is formed between them.
    assert profile.first.name == "conv1"
    assert profile.ratio is not None


@pytest.mark.parametrize("loss", LOSSES)
def test_squeeze_excite_after_a_zero_gamma_is_behind_the_gate_not_dead(loss):
    model = fresh(BottleneckResNet, layout=(1, 1, 1, 1), zero_init_residual=True, se=True)
    profile, findings = healthy(model, IMAGES, loss_for(loss))
    gated = only(findings, "zero_init")
    squeeze = [f"blocks.{index}.se.{layer}" for index in range(4) for layer in ("fc1", "fc2")]
    # The SE reads only the zero gamma's output (its beta, zero): no gradient reaches its weights.
    assert all(profile.layer(name).dead for name in squeeze)
    assert set(squeeze) <= set(gated.layers)
    # The last block's SE runs after the last gate: only the gate's own block excuses it.
    assert "blocks.3.se.fc2" in gated.layers
    assert "dead" not in [finding.rule for finding in findings]


# ---------------------------------------------------------------- ConvMixer


class ConvMixer(nn.Module):
    """timm's ConvMixer: a patch conv -> GELU -> BN stem, then depthwise (residual) and pointwise conv-GELU-BNs."""

    def __init__(self, width: int = 32, depth: int = 32, kernel: int = 5, patch: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, patch, patch)
        self.stem_norm = nn.BatchNorm2d(width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "depthwise": nn.Conv2d(width, width, kernel, groups=width, padding=kernel // 2),
                    "norm1": nn.BatchNorm2d(width),
                    "pointwise": nn.Conv2d(width, width, 1),
                    "norm2": nn.BatchNorm2d(width),
                }
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        x = self.stem_norm(F.gelu(self.stem(x)))
        for block in self.blocks:
            x = x + block["norm1"](F.gelu(block["depthwise"](x)))
            x = block["norm2"](F.gelu(block["pointwise"](x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("loss", LOSSES)
def test_convmixer_gelu_bn_stem_is_exempt_from_the_exploding_ratio(loss):
    profile, findings = healthy(fresh(ConvMixer), IMAGES, loss_for(loss))
    # 32 pointwise conv-GELU-BNs without a skip (ConvMixer-768/32's depth): the raw ratio is far above 50.
    assert profile.ratio > 50, described(profile, findings)
    assert profile.first.name == "stem" and profile.first.normalised
    finding = only(findings, "exploding")
    assert not finding.failing and finding.message.endswith("not failing")
    # Through GELU the stem is invariant only nearly: well under half the chance level, not 0.
    assert 0.0 < profile.first.scale_invariance < 0.5
    assert is_scale_invariant(profile.first)


# ---------------------------------------------------------------- ViTs: drop path, zero head, root tokens, LayerScale


class DropPath(nn.Module):
    """timm's DropPath: in training mode, zero the whole branch of each sample with probability p."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class LayerScale(nn.Module):
    """timm's LayerScale: a per-channel gain on a residual branch, held at ``init`` until training grows it."""

    def __init__(self, width: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, width: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    """A pre-norm transformer block, optionally with LayerScale gains and drop-path on both branches."""

    def __init__(self, width: int, layer_scale: float | None = None, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.ls1 = LayerScale(width, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.ls2 = LayerScale(width, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.fc2(F.gelu(self.fc1(self.norm2(x))))))


class ViT(nn.Module):
    """A ViT on 32x32 images in 8x8 patches; the root owns the class token and the positional table."""

    def __init__(
        self,
        depth: int = 2,
        width: int = 32,
        zero_head: bool = False,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 1e-6)  # timm's init
        self.pos_embed = nn.Parameter(torch.randn(1, 17, width) * 0.02)
        self.blocks = nn.Sequential(*(Block(width, layer_scale, drop_path) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, CLASSES)
        if zero_head:
            nn.init.zeros_(self.head.weight)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@pytest.mark.parametrize("loss", LOSSES)
def test_drop_path_is_off_for_the_probe_and_left_in_training_mode(loss):
    model = fresh(ViT, depth=8, drop_path=0.5)
    profile, findings = healthy(model, IMAGES, loss_for(loss))
    assert not [layer.name for layer in profile.layers if layer.dead]
    assert "dead" not in [finding.rule for finding in findings]
    # Every branch ran for every sample: the probe's loss is the model's with drop-path off.
    with torch.no_grad():
        output = copy.deepcopy(model).eval()(IMAGES)
    expected = default_loss(output) if loss == "default" else F.cross_entropy(output, LABELS)
    assert profile.loss == pytest.approx(expected.item(), rel=1e-5)
    drop_paths = [module for module in model.modules() if isinstance(module, DropPath)]
    assert len(drop_paths) == 16 and all(module.training for module in drop_paths)


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_init_head_is_reported_as_a_gate_not_dead(loss):
    profile, findings = healthy(fresh(ViT, zero_head=True), IMAGES, loss_for(loss))
    assert profile.layer("head").gate == 0.0
    gated = only(findings, "zero_init")
    assert not gated.failing and gated.message.startswith("zero-initialised gates: head hold")
    # Everything before the head gets no gradient yet, the root's tokens included.
    behind = [layer.name for layer in profile.layers if layer.name != "head"]
    assert gated.layers == behind
    assert all(profile.layer(name).dead for name in behind)
    assert "dead" not in [finding.rule for finding in findings]


@pytest.mark.parametrize("loss", LOSSES)
def test_root_owned_class_token_and_positions_are_never_the_first_layer(loss):
    profile, _ = healthy(fresh(ViT), IMAGES, loss_for(loss))
    root = profile.layer("")
    assert root.role == "container" and not root.pickable
    assert root.received_grad and root.grad_mean_abs > 0.0
    assert profile.first.name == "patch_embed"


@pytest.mark.parametrize("loss, gated_ratio", [("default", True), ("cross_entropy", False)])
def test_layer_scale_gates_explain_a_low_ratio(loss, gated_ratio):
    # CaiT: 12 blocks, every branch times a per-channel gain of 1e-5.
    profile, findings = healthy(fresh(ViT, depth=12, layer_scale=1e-5), IMAGES, loss_for(loss))
    assert profile.first.name == "patch_embed"
    gates = [layer.name for layer in profile.layers if layer.gate is not None]
    assert gates == [f"blocks.{index}.{scale}" for index in range(12) for scale in ("ls1", "ls2")]
    finding = ratio_finding(findings)
    if gated_ratio:
        # The head's gradient is not behind a gate; the patch embedding's is behind twelve.
        assert profile.last.name == "head" and profile.ratio < 0.02
        assert finding is not None and finding.rule == "vanishing" and not finding.failing
        assert "LayerScale, ReZero or SkipInit gates" in finding.message and "1e-05" in finding.message
    else:
        # Under cross-entropy the head is skipped: the last block's fc2 is behind a gate as well.
        assert profile.last.name == "blocks.11.fc2" and 0.02 <= profile.ratio <= 50
        assert finding is None


# ---------------------------------------------------------------- heads: a norm, embeddings, a large vocabulary


class NormBeforeHead(nn.Module):
    """An MLP whose features pass a BatchNorm1d right before the classifier (a BNNeck)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(48, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.head(self.norm(self.fc3(x)))


@pytest.mark.parametrize("loss", LOSSES)
def test_batchnorm_right_before_the_head_is_healthy(loss):
    profile, _ = healthy(fresh(NormBeforeHead), FEATURES, loss_for(loss))
    assert profile.layer("norm").is_norm and profile.layer("fc3").normalised
    assert profile.first.name == "fc1"
    assert profile.last.name == ("head" if loss == "default" else "fc3")


@pytest.mark.parametrize("scale", [0.01, 0.05])
def test_normalisation_that_lifts_a_small_input_to_unit_scale_is_not_an_exploding_signal(scale):
    # The norm brings the head's input to std 1, far above the small input's std.
    profile, _ = healthy(fresh(NormBeforeHead), FEATURES * scale, loss_for("default"))
    head_input = profile.layer("head").input_std / profile.layer("fc1").input_std
    assert head_input > 10.0  # relative to the input alone: above max_signal


class BagOfEmbeddings(nn.Module):
    def __init__(self, vocab: int, width: int = 32):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, ids):
        return self.head(F.relu(self.fc(self.embedding(ids).mean(1))))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("vocab", [100, 5_000, 50_000])
def test_bag_of_embeddings_never_starts_the_ratio_at_its_table(vocab, loss):
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    profile, _ = healthy(fresh(BagOfEmbeddings, vocab), ids, loss_for(loss))
    assert profile.layer("embedding").role == "lookup" and not profile.layer("embedding").pickable
    assert profile.first.name == "fc"


class TinyLM(nn.Module):
    """A causal two-block transformer LM with an untied 32,000-word head on a 32-wide stream."""

    def __init__(self, vocab: int = 32_000, width: int = 32, length: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(length, width)
        layer = nn.TransformerEncoderLayer(width, 2, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        length = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(length))
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        return self.lm_head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


LM_IDS = torch.randint(0, 32_000, (2, 16), generator=torch.Generator().manual_seed(1))


def next_token_loss(logits):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), LM_IDS[:, 1:].reshape(-1))


@pytest.mark.parametrize("loss", LOSSES)
def test_large_vocabulary_lm_head_is_not_the_last_layer_under_cross_entropy(loss):
    model = fresh(TinyLM)
    profile, _ = healthy(model, LM_IDS, None if loss == "default" else next_token_loss)
    assert profile.output_layer == "lm_head"
    assert profile.first.name == "blocks.layers.0.self_attn"
    if loss == "default":
        assert profile.last.name == "lm_head"
    else:
        # Its gradient p - y is spread over 32,000 classes: the ratio ends at the layer before.
        assert profile.under_softmax_loss and profile.output_classes == 32_000
        assert profile.last.name == "blocks.layers.1.linear2"
        # Measured against the head, the ratio would be out of bounds.
        assert profile.first.grad_mean_abs / profile.layer("lm_head").grad_mean_abs > 50


# ---------------------------------------------------------------- Hugging Face: post-LayerNorm BERT


@pytest.mark.parametrize("loss", ["default", "model"])
def test_post_layernorm_bert_classifier_is_exempt_by_its_repeated_blocks(loss):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=256, vocab_size=1000
    )
    model = fresh(transformers.BertForSequenceClassification, config)
    ids = token_batch()
    inputs = {"input_ids": ids} if loss == "default" else {"input_ids": ids, "labels": torch.tensor([0, 1])}
    profile, findings = healthy(model, inputs)
    assert profile.loss_kind == ("random" if loss == "default" else "model")
    assert profile.first.name == "bert.encoder.layer.0.attention.self.value"
    finding = only(findings, "vanishing")
    assert not finding.failing
    assert "bert.encoder.layer.1.attention.self.value" in finding.message
    assert "of 2 repeated blocks" in finding.message
