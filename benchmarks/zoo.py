"""Model zoo: probe many real models at their random init and print what gradcheck says.

Every model here is built at its default random initialisation (no weights or data are
downloaded) and probed once per loss through the same call the ``gradcheck`` command
makes (default bounds, ``detail=True``, seed 0). One row per (model, loss): the first/last
ratio, the verdict, the first and last layer, the top diagnosed cause and the seconds the
probe took, beside the ground truth ("trains": known to train from scratch with this
init; "fails": published results show it does not).

Sets (``--set``, one or more, or ``all``):
  torchvision  every classification model of torchvision.models, ``weights=None``
  timm         27 timm models of different families, ``pretrained=False``
  hf           Hugging Face families from config objects, a tiny and a base size each
  broken       networks known not to train, with their good twins

Losses (``--loss``): "default" is the project's own (a fixed random direction of the
output, no labels); "natural" is cross-entropy against fixed random labels (for Hugging Face
models: the model's own ``.loss`` with labels passed in the inputs).

Not part of CI. It needs its own virtual environment:

    python -m venv zoovenv
    zoovenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm transformers
    PYTHONPATH=. HF_HUB_OFFLINE=1 zoovenv/bin/python benchmarks/zoo.py --set broken
    PYTHONPATH=. zoovenv/bin/python benchmarks/zoo.py --set torchvision --models resnet18 --json rows.jsonl

Each model runs in a child process with a time limit (``--timeout``), so a crash, an
out-of-memory kill or a timeout costs one model's rows, not the run. Progress goes to
stderr, the Markdown table (and a summary) to stdout, one JSON object per row to ``--json``
(a non-finite ratio is written as NaN or Infinity, as Python's json module does). A row's
seconds are the assessment alone (the activation pass included when it runs); build time,
peak memory and the load average sit beside them in the JSON, since other work on the
machine slows them.

The docs' tables come from the JSON rows: ``python benchmarks/zoo_table.py b2=rows.jsonl
b32=rows-b32.jsonl`` puts the batch sizes side by side (see docs/models.md for the commands
of the published run and how long each set took).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing downloads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn

SETS = ("torchvision", "timm", "hf", "broken")
LOSSES = ("default", "natural")
SEED = 0  # weights (torch.manual_seed before building), inputs and the probe
LABEL_SEED = 1234  # the fixed random labels of the "natural" loss
SEQUENCE_LENGTH = 16
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Smallest input a torchvision model accepts in train mode (measured: inception_v3's
# auxiliary head needs a 17x17 Mixed_6e map, which 299 gives and 298 does not).
# Models that take only one input size, or none smaller than this: fixed position tables (ViT)
# and window partitions (MaxViT) at 224, Inception's stride at 299.
MIN_IMAGE_SIZE = {
    "inception_v3": 299, "maxvit_t": 224,
    **dict.fromkeys(("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"), 224),
}  # fmt: skip

TIMM_MODELS = (
    "resnet50",
    "resnet50d",
    "seresnext26d_32x4d",
    "regnety_016",
    "regnetz_b16",
    "repvgg_a2",
    "dla34",
    "hrnet_w18_small",
    "efficientnet_b0",
    "rexnet_100",
    "ghostnetv2_100",
    "convnext_tiny",
    "convmixer_768_32",
    "poolformer_s12",
    "nf_resnet50",
    "nfnet_l0",
    "dm_nfnet_f0",
    "vit_small_patch16_224",
    "deit_small_patch16_224",
    "cait_xxs24_224",
    "swin_tiny_patch4_window7_224",
    "coat_lite_tiny",
    "levit_128",
    "mobilevitv2_050",
    "efficientformer_l1",
    "mixer_b16_224",
    "resmlp_12_224",
)


# --------------------------------------------------------------------------- the adapter


def assess_model(model: Any, inputs: Any, loss_fn: Callable | None, seed: int) -> dict[str, Any]:
    """The one place that calls pytest_gradcheck: what ``gradcheck TARGET`` does, as a row's fields."""
    from pytest_gradcheck import assess

    result = assess(model, inputs, loss_fn=loss_fn, seed=seed, detail=True)
    profile = result.profile
    causes = [cause for finding in result.failing for cause in finding.causes]
    return {
        "ratio": profile.ratio,
        "verdict": result.verdict,
        "first": profile.first.name if profile.first else None,
        "last": profile.last.name if profile.last else None,
        "cause": causes[0].cause if causes else "",
        "cause_summary": causes[0].summary if causes else "",
        "findings": [finding.message for finding in result.findings],
        "layers": len(profile.layers),
        "first_grad": profile.first.grad_mean_abs if profile.first else None,
        "last_grad": profile.last.grad_mean_abs if profile.last else None,
        "loss_value": profile.loss,
        "profile": profile.to_dict(),
    }


# --------------------------------------------------------------------------- rows and specs


@dataclass
class Spec:
    """One model of the zoo, before it is built."""

    set: str
    name: str
    truth: str  # "trains" or "fails"


@dataclass
class Case:
    """A built model with its inputs and loss function per loss kind."""

    model: Any
    inputs: dict[str, Any]
    loss_fns: dict[str, Callable | None]
    note: str = ""


@dataclass
class Row:
    set: str
    model: str
    loss: str
    truth: str
    ratio: float | None = None
    verdict: str = ""
    first: str | None = None
    last: str | None = None
    cause: str = ""
    cause_summary: str = ""
    seconds: float | None = None
    build_seconds: float | None = None
    peak_rss_mb: float | None = None
    load1: float | None = None  # the 1-minute load average after the probe: other work on the machine
    layers: int | None = None
    first_grad: float | None = None  # mean |grad| of the first and last layer
    last_grad: float | None = None
    loss_value: float | None = None
    note: str = ""
    findings: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None  # the whole profile, for --json: what the rules read


def specs_for(name: str) -> list[Spec]:
    return {"torchvision": torchvision_specs, "timm": timm_specs, "hf": hf_specs, "broken": broken_specs}[name]()


def build(spec: Spec, args: argparse.Namespace) -> Case:
    builders = {"torchvision": build_torchvision, "timm": build_timm, "hf": build_hf, "broken": build_broken}
    return builders[spec.set](spec.name, args)


# --------------------------------------------------------------------------- shared inputs and losses


def generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, size: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=generator())


def token_ids(batch: int, vocab: int, seed: int = SEED) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, SEQUENCE_LENGTH), generator=generator(seed))


def labels(batch: int, classes: int) -> torch.Tensor:
    """The fixed random labels of the natural loss."""
    return torch.randint(0, classes, (batch,), generator=generator(LABEL_SEED))


def main_logits(output: Any) -> torch.Tensor:
    """The logits of a classifier's output; InceptionOutputs/GoogLeNetOutputs give their main head."""
    return output if isinstance(output, torch.Tensor) else output.logits


def cross_entropy(output: Any) -> torch.Tensor:
    """Cross-entropy of the main logits against fixed random labels over all their classes."""
    logits = main_logits(output).float()
    return F.cross_entropy(logits, labels(logits.shape[0], logits.shape[-1]))


def classifier_case(model: Any, inputs: Any, note: str = "") -> Case:
    return Case(model, {"default": inputs, "natural": inputs}, {"default": None, "natural": cross_entropy}, note)


# --------------------------------------------------------------------------- torchvision


def torchvision_specs() -> list[Spec]:
    import torchvision

    return [Spec("torchvision", name, "trains") for name in torchvision.models.list_models(module=torchvision.models)]


def build_torchvision(name: str, args: argparse.Namespace) -> Case:
    import torchvision

    kwargs: dict[str, Any] = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(init_weights=True, aux_logits=True)  # what weights=None picks, without the warning
    model = torchvision.models.get_model(name, **kwargs)
    size = max(args.image_size, MIN_IMAGE_SIZE.get(name, 0))
    note = f"input {size}x{size}: the smallest {name} takes" if size != args.image_size else ""
    return classifier_case(model, images(args.batch, size), note)


# --------------------------------------------------------------------------- timm


def timm_specs() -> list[Spec]:
    return [Spec("timm", name, "trains") for name in TIMM_MODELS]


def build_timm(name: str, args: argparse.Namespace) -> Case:
    import timm

    model = timm.create_model(name, pretrained=False)
    config = model.pretrained_cfg
    size, note = args.image_size, ""
    if config.get("fixed_input_size") and config["input_size"][-1] != args.image_size:
        size = config["input_size"][-1]
        note = f"input {size}x{size}: {name} takes only that size"
    return classifier_case(model, images(args.batch, size), note)


# --------------------------------------------------------------------------- Hugging Face

# family: (model class, config class, task, {size: config overrides}). "base" is the
# published base configuration; the tiny sizes are a few layers, a small width.
# Llama and Mistral share their tiny size: a 2-layer decoder with grouped-query attention.
TINY_DECODER = {
    "vocab_size": 32000,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
HF_FAMILIES = {
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        "lm",
        {
            "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
            "base": {},  # gpt2 (124M)
        },
    ),
    "bert-mlm": (
        "BertForMaskedLM",
        "BertConfig",
        "lm",
        {
            "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 256},
            "base": {},  # bert-base-uncased
        },
    ),
    "bert-cls": (
        "BertForSequenceClassification",
        "BertConfig",
        "classify",
        {
            "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 256},
            "base": {},
        },
    ),
    "t5": (
        "T5ForConditionalGeneration",
        "T5Config",
        "seq2seq",
        {
            "tiny": {
                "d_model": 64,
                "d_ff": 256,
                "d_kv": 16,
                "num_layers": 2,
                "num_heads": 4,
                "decoder_start_token_id": 0,
            },
            "base": {
                "d_model": 768,
                "d_ff": 3072,
                "d_kv": 64,
                "num_layers": 12,
                "num_heads": 12,
                "decoder_start_token_id": 0,
            },  # t5-base; as published, decoding starts at the pad id 0
        },
    ),
    "llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        "lm",
        {
            "tiny": TINY_DECODER,
            "base": {
                "vocab_size": 32000,
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_hidden_layers": 16,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
            },
        },
    ),
    "mistral": (
        "MistralForCausalLM",
        "MistralConfig",
        "lm",
        {
            "tiny": TINY_DECODER,
            "base": {
                "vocab_size": 32000,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 4,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
            },
        },
    ),
    "vit": (
        "ViTForImageClassification",
        "ViTConfig",
        "image",
        {
            "tiny": {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 256,
                "num_labels": 1000,
            },
            "base": {"num_labels": 1000},  # vit-base-patch16-224
        },
    ),
}

HF_NOTES = {
    "llama-base": "Llama-3.2-1B shape (16 layers, hidden 2048, MLP 8192, 32/8 heads), vocab 32000: "
    "Llama-7B (hidden 4096, 32 layers) with its gradients does not fit in 24 GiB",
    "mistral-base": "Mistral-7B width (hidden 4096, MLP 14336, 32/8 heads), vocab 32000, "
    "4 of its 32 layers: all 32 with gradients do not fit in 24 GiB",
}


def hf_specs() -> list[Spec]:
    return [Spec("hf", f"{family}-{size}", "trains") for family, entry in HF_FAMILIES.items() for size in entry[3]]


def build_hf(name: str, args: argparse.Namespace) -> Case:
    import transformers

    family, size = name.rsplit("-", 1)
    model_class, config_class, task, sizes = HF_FAMILIES[family]
    config = getattr(transformers, config_class)(**sizes[size])
    model = getattr(transformers, model_class)(config)
    plain, labelled = hf_inputs(task, config, args.batch)
    return Case(
        model, {"default": plain, "natural": labelled}, {"default": None, "natural": None}, HF_NOTES.get(name, "")
    )


def hf_inputs(task: str, config: Any, batch: int) -> tuple[dict, dict]:
    """(inputs without labels, inputs with labels): the model's own .loss is the natural loss."""
    if task == "image":
        pixels = images(batch, config.image_size)
        return {"pixel_values": pixels}, {"pixel_values": pixels, "labels": labels(batch, config.num_labels)}
    ids = token_ids(batch, config.vocab_size)
    if task == "lm":
        return {"input_ids": ids}, {"input_ids": ids, "labels": ids}
    if task == "classify":
        return {"input_ids": ids}, {"input_ids": ids, "labels": labels(batch, config.num_labels)}
    targets = token_ids(batch, config.vocab_size, seed=LABEL_SEED)  # seq2seq
    return {"input_ids": ids, "decoder_input_ids": targets}, {"input_ids": ids, "labels": targets}


# --------------------------------------------------------------------------- broken networks and twins


class Passthrough(nn.Module):
    """A norm_layer that normalises nothing: torchvision's ResNet without BatchNorm. (Not named
    ...Norm...: the probe takes a module whose class name says Norm for a normalisation layer.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SigmoidMLP(nn.Module):
    """784-1000x5-10 with sigmoids and U(+-1/sqrt(fan_in)) weights, zero biases."""

    def __init__(self, features: int = 784, width: int = 1000, depth: int = 5, classes: int = 10) -> None:
        super().__init__()
        sizes = [features] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.head = nn.Linear(width, classes)
        init_all(self, lambda w: nn.init.uniform_(w, -1 / math.sqrt(w.shape[1]), 1 / math.sqrt(w.shape[1])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = torch.sigmoid(layer(x))
        return self.head(x)


class PlainConvNet(nn.Module):
    """``depth`` weight layers: depth - 1 3x3 convs with ReLU, global average pooling, a linear head."""

    def __init__(self, depth: int, init: Callable, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        convs = [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1) for i in range(depth - 1)]
        self.features = nn.Sequential(*[part for conv in convs for part in (conv, nn.ReLU())])
        self.head = nn.Linear(width, classes)
        init_all(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """A stem, ``blocks`` residual blocks (pre-norm with ``norm``, then a final LayerNorm), a head; Kaiming."""

    def __init__(self, blocks: int, norm: bool, features: int = 64, width: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(features, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width, norm) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.head = nn.Linear(width, classes)
        init_all(self, KAIMING)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


class RecurrentNet(nn.Module):
    """(batch, steps, features) through nn.RNN/LSTM/GRU, a linear head on the last hidden state."""

    def __init__(self, kind: type, features: int = 32, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.rnn = kind(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class CellLoop(nn.Module):
    """An nn.RNNCell stepped by hand, with input at every step, a linear head on the last state."""

    def __init__(self, features: int = 32, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.cell = nn.RNNCell(features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for step in range(x.shape[1]):
            h = self.cell(x[:, step], h)
        return self.head(h)


def init_all(model: nn.Module, init: Callable) -> None:
    """init(weight) on every conv and linear layer; zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def KAIMING(weight: torch.Tensor) -> None:
    nn.init.kaiming_normal_(weight, nonlinearity="relu")


def no_norm_resnet(depth: int) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=Passthrough)


def vgg_small_init(depth: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, f"vgg{depth}")(weights=None)
    init_all(model, lambda w: nn.init.normal_(w, std=0.01))
    return model


def seed_network(name: str) -> nn.Module:
    sys.path.insert(0, str(EXAMPLES))
    import seed_networks

    return getattr(seed_networks, name)()


def resnet50_bn() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


# Input makers: batch -> inputs.
def vector(features: int) -> Callable:
    return lambda batch: torch.randn(batch, features, generator=generator())


def sequence(steps: int, features: int = 32) -> Callable:
    return lambda batch: torch.randn(batch, steps, features, generator=generator())


def image(size: int) -> Callable:
    return lambda batch: images(batch, size)


XAVIER = nn.init.xavier_normal_
# name: (truth, model maker, input maker, note)
BROKEN = {
    "sigmoid_mlp_5x1000": (
        "fails",
        SigmoidMLP,
        vector(784),
        "784-1000x5-10 sigmoid, U(+-1/sqrt(fan_in)) (Glorot & Bengio 2010)",
    ),
    "plain_conv30_xavier": (
        "fails",
        lambda: PlainConvNet(30, XAVIER),
        image(32),
        "29 3x3 convs x64 + linear, ReLU, no BN, Xavier, 32x32 input (He et al. 2015 Fig. 3)",
    ),
    "plain_conv30_kaiming": ("trains", lambda: PlainConvNet(30, KAIMING), image(32), "as above, Kaiming init"),
    "plain_conv22_xavier": (
        "trains",
        lambda: PlainConvNet(22, XAVIER),
        image(32),
        "21 convs + linear, Xavier: converges slowly (He et al. 2015)",
    ),
    "plain_conv22_kaiming": ("trains", lambda: PlainConvNet(22, KAIMING), image(32), "21 convs + linear, Kaiming"),
    "resnet50_no_norm": (
        "fails",
        lambda: no_norm_resnet(50),
        image(224),
        "torchvision resnet50, BN replaced by identity (Fixup, Zhang et al. 2019)",
    ),
    "resnet101_no_norm": ("fails", lambda: no_norm_resnet(101), image(224), "BN replaced by identity"),
    "resnet152_no_norm": ("fails", lambda: no_norm_resnet(152), image(224), "BN replaced by identity"),
    "resnet50_bn": ("trains", resnet50_bn, image(224), "torchvision resnet50 with BN"),
    "residual_mlp100_no_norm": (
        "fails",
        lambda: ResidualMLP(100, norm=False),
        vector(64),
        "x + fc2(relu(fc1(x))) x100, width 256, Kaiming, no normalisation",
    ),
    "residual_mlp100_prenorm": (
        "trains",
        lambda: ResidualMLP(100, norm=True),
        vector(64),
        "x + fc2(relu(fc1(LN(x)))) x100, final LN, width 256, Kaiming",
    ),
    "vgg16_n001": (
        "fails",
        lambda: vgg_small_init(16),
        image(224),
        "torchvision vgg16 (no BN), weights N(0, 0.01), zero biases (Simonyan & Zisserman 2015)",
    ),
    "vgg11_n001": ("trains", lambda: vgg_small_init(11), image(224), "vgg11 (no BN), weights N(0, 0.01), zero biases"),
    "rnn_tanh_200": ("fails", lambda: RecurrentNet(nn.RNN), sequence(200), "nn.RNN tanh 32->128, 200 steps"),
    "lstm_200": ("fails", lambda: RecurrentNet(nn.LSTM), sequence(200), "nn.LSTM 32->128, 200 steps"),
    "rnncell_loop_200": ("fails", CellLoop, sequence(200), "nn.RNNCell 32->128 loop, input every step, 200 steps"),
    "gru_20": ("trains", lambda: RecurrentNet(nn.GRU), sequence(20), "nn.GRU 32->128, 20 steps"),
    "lstm_20": ("trains", lambda: RecurrentNet(nn.LSTM), sequence(20), "nn.LSTM 32->128, 20 steps"),
    "seed_SigmoidNet": ("fails", lambda: seed_network("SigmoidNet"), vector(64), "examples/seed_networks.py"),
    "seed_SmallInitNet": ("fails", lambda: seed_network("SmallInitNet"), vector(64), "examples/seed_networks.py"),
    "seed_ReLUNet": ("trains", lambda: seed_network("ReLUNet"), vector(64), "examples/seed_networks.py"),
}


def broken_specs() -> list[Spec]:
    return [Spec("broken", name, truth) for name, (truth, _, _, _) in BROKEN.items()]


def build_broken(name: str, args: argparse.Namespace) -> Case:
    _, make, inputs, note = BROKEN[name]
    return classifier_case(make(), inputs(args.batch), note)


# --------------------------------------------------------------------------- one model (the child)


def probe_spec(spec: Spec, args: argparse.Namespace, emit: Callable[[Row], None]) -> None:
    """Build ``spec`` once at seed 0 and emit one row per loss; an exception costs only its row."""
    start = time.perf_counter()
    try:
        torch.manual_seed(SEED)
        case = build(spec, args)
    except Exception as error:
        for loss in args.losses:
            emit(Row(spec.set, spec.name, loss, spec.truth, verdict="error", note=f"build: {describe(error)}"))
        return
    built = time.perf_counter() - start
    for loss in args.losses:
        row = Row(spec.set, spec.name, loss, spec.truth, build_seconds=round(built, 2), note=case.note)
        start = time.perf_counter()
        try:
            fields = assess_model(case.model, case.inputs[loss], case.loss_fns[loss], SEED)
            row = dataclasses.replace(row, **fields)
        except Exception as error:
            row.verdict, row.note = "error", describe(error)
        row.seconds = round(time.perf_counter() - start, 2)
        row.peak_rss_mb = peak_rss_mb()
        row.load1 = round(os.getloadavg()[0], 2)
        emit(row)


def describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child_main(args: argparse.Namespace) -> int:
    """``--child SET NAME OUT``: probe one model, append its rows to OUT as JSON lines."""
    import warnings

    warnings.filterwarnings("ignore")
    set_name, name, out = args.child
    spec = next((s for s in specs_for(set_name) if s.name == name), Spec(set_name, name, "?"))
    with open(out, "a") as stream:

        def emit(row: Row) -> None:
            stream.write(json.dumps(dataclasses.asdict(row)) + "\n")
            stream.flush()

        probe_spec(spec, args, emit)
    return 0


# --------------------------------------------------------------------------- the run (the parent)


def run_in_child(spec: Spec, args: argparse.Namespace) -> list[Row]:
    """Probe ``spec`` in a child process; a crash, kill or timeout becomes rows that say so."""
    with tempfile.TemporaryDirectory() as scratch:
        out, err = Path(scratch) / "rows.jsonl", Path(scratch) / "stderr"
        command = [
            sys.executable,
            __file__,
            "--child",
            spec.set,
            spec.name,
            str(out),
            "--batch",
            str(args.batch),
            "--image-size",
            str(args.image_size),
            "--loss",
            args.loss,
        ]
        problem = ""
        with open(err, "w") as stderr:
            try:
                done = subprocess.run(
                    command, check=False, stdout=subprocess.DEVNULL, stderr=stderr, timeout=args.timeout or None
                )
                problem = exit_problem(done.returncode, err)
            except subprocess.TimeoutExpired:
                problem = f"skipped: over the {args.timeout:g} s time limit"
        rows = [Row(**json.loads(line)) for line in out.read_text().splitlines()] if out.exists() else []
    done_losses = {row.loss for row in rows}
    for loss in args.losses:
        if loss not in done_losses:
            verdict = "skipped" if problem.startswith("skipped") else "error"
            rows.append(Row(spec.set, spec.name, loss, spec.truth, verdict=verdict, note=problem or "no row"))
    return rows


def exit_problem(code: int, err: Path) -> str:
    if code == 0:
        return ""
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (likely out of memory)" if -code == signal.SIGKILL else ""
        return f"child killed by {name}{hint}"
    tail = [line for line in err.read_text(errors="replace").splitlines() if line.strip()][-1:]
    return f"child exit {code}: {tail[0][:300] if tail else ''}"


def run(specs: list[Spec], args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for index, spec in enumerate(specs, 1):
        start = time.perf_counter()
        if args.in_process:
            new: list[Row] = []
            probe_spec(spec, args, new.append)
        else:
            new = run_in_child(spec, args)
        rows += new
        write_json(args.json, new)
        progress(index, len(specs), spec, new, time.perf_counter() - start)
    return rows


def progress(index: int, total: int, spec: Spec, rows: list[Row], seconds: float) -> None:
    parts = [f"{row.loss} {row.verdict} {fmt_ratio(row.ratio)}" for row in rows]
    print(
        f"[{index}/{total}] {spec.set} {spec.name} ({spec.truth}): {'; '.join(parts)} [{seconds:.1f} s]",
        file=sys.stderr,
        flush=True,
    )


def write_json(path: str | None, rows: list[Row]) -> None:
    if path:
        with open(path, "a") as stream:
            stream.writelines(json.dumps(dataclasses.asdict(row)) + "\n" for row in rows)


# --------------------------------------------------------------------------- the tables


COLUMNS = ("set", "model", "loss", "truth", "ratio", "verdict", "first", "last", "top cause", "seconds", "note")


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3g}"


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = (
            row.set,
            row.model,
            row.loss,
            row.truth,
            fmt_ratio(row.ratio),
            row.verdict,
            row.first or "-",
            row.last or "-",
            row.cause or "-",
            "-" if row.seconds is None else f"{row.seconds:.1f}",
            row.note,
        )
        lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """Per set: rows probed, flagged, errored, and how the flags meet the ground truth."""
    header = (
        "set",
        "rows",
        "healthy",
        "flagged",
        "error/skipped",
        "trains but flagged",
        "fails and flagged",
        "fails but healthy",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in dict.fromkeys(row.set for row in rows):
        mine = [row for row in rows if row.set == name]
        broken = [row for row in mine if row.verdict in ("error", "skipped")]
        probed = [row for row in mine if row not in broken]
        flagged = [row for row in probed if row.verdict != "healthy"]
        counts = (
            len(mine),
            len(probed) - len(flagged),
            len(flagged),
            len(broken),
            sum(row.truth == "trains" for row in flagged),
            sum(row.truth == "fails" for row in flagged),
            sum(row.truth == "fails" and row.verdict == "healthy" for row in probed),
        )
        lines.append(f"| {name} | " + " | ".join(str(count) for count in counts) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", nargs="+", choices=(*SETS, "all"), help="model sets to probe")
    parser.add_argument("--models", nargs="+", metavar="TEXT", help="keep models whose name contains any TEXT")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--image-size", type=int, default=224, help="image height and width (default 224)")
    parser.add_argument("--loss", choices=("default", "natural", "both"), default="both")
    parser.add_argument("--json", metavar="PATH", help="append one JSON object per row to PATH")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model, all losses (default 300)")
    parser.add_argument("--in-process", action="store_true", help="no child processes (for debugging)")
    parser.add_argument("--list", action="store_true", help="list the selected models and exit")
    parser.add_argument("--child", nargs=3, metavar=("SET", "NAME", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.losses = LOSSES if args.loss == "both" else (args.loss,)
    if not args.child and not args.set:
        parser.error("choose --set (one or more of: " + ", ".join((*SETS, "all")) + ")")
    return args


def selected(args: argparse.Namespace) -> list[Spec]:
    names = SETS if "all" in args.set else tuple(dict.fromkeys(args.set))
    specs = [spec for name in names for spec in specs_for(name)]
    if args.models:
        specs = [spec for spec in specs if any(text in spec.name for text in args.models)]
    return specs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    specs = selected(args)
    if args.list:
        print("\n".join(f"{spec.set} {spec.name} {spec.truth}" for spec in specs))
        return 0
    # A terminated run still ends its child (subprocess.run kills it on the way out) and its scratch folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.json:
        Path(args.json).write_text("")
    start = time.perf_counter()
    rows = run(specs, args)
    print(markdown(rows))
    print()
    print(summary(rows))
    print(
        f"\n{len(specs)} models, {len(rows)} rows, batch {args.batch}, image size {args.image_size}, "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
