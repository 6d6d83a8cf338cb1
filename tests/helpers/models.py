"""Small models the tests probe, each one built to exercise one thing the probe must get right."""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    import transformers

VOCAB = 1000  # the vocabulary of the tiny Hugging Face models and of token_batch()


def default_loss(output: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The probe's default loss, written out: the output projected on N(0, 1) drawn under the seed."""
    generator = torch.Generator(device=output.device).manual_seed(seed)
    direction = torch.randn(output.shape, generator=generator, device=output.device)
    return (output.float() * direction).sum()


def fresh(build, *args, **kwargs):
    """``build(*args, **kwargs)`` right after torch.manual_seed(0): the same weights every time."""
    torch.manual_seed(0)
    return build(*args, **kwargs)


# ---------------------------------------------------------------- plain stacks


def mlp(*widths: int, activation=nn.ReLU) -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(widths):
        layers += [nn.Linear(width_in, width_out), activation()]
    return nn.Sequential(*layers[:-1])


class PlainReLU(nn.Module):
    """A plain 10-layer ReLU MLP with PyTorch's default init."""

    def __init__(self, depth=10, width=64):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


class ResidualReLU(PlainReLU):
    """The same layers with a skip connection around each one."""

    def forward(self, x):
        x = self.layers[0](x)
        for layer in self.layers[1:]:
            x = x + F.relu(layer(x))
        return x


class MaskedResidual(nn.Module):
    """Five residual ReLU blocks whose output is multiplied by a mask, which carries no gradient."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))

    def forward(self, x, mask):
        for block in self.blocks:
            x = x + F.relu(block(x))
        return x * mask  # a mask carries no gradient: it must not shorten the path


class NegativeBiasNet(nn.Module):
    """ReLU MLP whose second layer's bias was pushed far negative (as a bad update can do)."""

    def __init__(self, bias=-1.0, dead_units=64):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(64, 64) for _ in range(4))
        with torch.no_grad():
            self.fc2.bias[:dead_units] = bias

    def forward(self, x):
        for fc in (self.fc1, self.fc2, self.fc3):
            x = F.relu(fc(x))
        return self.fc4(x)


class SaturatedTanh(nn.Module):
    """A tanh between two layers, the first scaled up 40x so that its inputs lie far beyond |x| = 5."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 1)
        with torch.no_grad():
            self.fc1.weight.mul_(40.0)  # pre-activations far beyond |x| = 5

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


# Forms: a Linear with zero weights outputs its bias for every sample, whatever the input.
DEAD_HALF = [-1.0, -2.0, 2.0, 3.0]  # two of four ReLU units are dead
SATURATED_HALF = [-6.0, 6.0, 0.0, 0.0]  # two of four sigmoid inputs have |x| >= 5


def fixed(bias) -> nn.Linear:
    """A 4-to-4 Linear with zero weights: its output is ``bias`` for every input."""
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(bias))
    return layer


class Forms(nn.Module):
    """The same two activations written every way a model can call them.

    Exactly half of its ReLU units are dead and half of its sigmoid inputs saturated.
    """

    def __init__(self, form):
        super().__init__()
        self.pre_relu = fixed(DEAD_HALF)
        self.pre_sigmoid = fixed(SATURATED_HALF)
        self.head = nn.Linear(4, 1)
        self.form = form
        self.relu_module = nn.ReLU(inplace=form == "inplace")

    def forward(self, x):
        a = self.pre_relu(x)
        if self.form == "functional":
            a = F.relu(a)
        elif self.form == "torch":
            a = torch.relu(a)
        elif self.form == "method":
            a = a.relu()
        elif self.form == "inplace":
            a = F.relu(a, inplace=True)
        else:
            a = self.relu_module(a)
        s = self.pre_sigmoid(x + a.sum(dim=1, keepdim=True))
        s = s.sigmoid_() if self.form == "inplace" else torch.sigmoid(s)
        return self.head(s)


# ---------------------------------------------------------------- order, sharing and reuse


class RegisteredBackwards(nn.Module):
    """Registers its layers in the reverse of the order forward() runs them."""

    def __init__(self):
        super().__init__()
        self.third = nn.Linear(4, 2)
        self.second = nn.Linear(6, 4)
        self.first = nn.Linear(8, 6)

    def forward(self, x):
        return self.third(torch.relu(self.second(torch.relu(self.first(x)))))


class TiedLM(nn.Module):
    """A language model whose output head reuses the embedding matrix."""

    def __init__(self, vocab: int = 50, width: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


class TiedEmbeddingHead(nn.Module):
    """An embedding and a bias-free head that reuses it, nothing between: the head reaches every row."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 8)
        self.head = nn.Linear(8, 1000, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


class WideTiedLM(nn.Module):
    """Large gradients (read in several chunks) and a tied embedding, next to small ones."""

    def __init__(self, vocab: int = 1000, width: int = 300):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.wide = nn.Linear(width, 4 * width)  # 360,000 weights: two chunks
        self.narrow = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.narrow(torch.relu(self.wide(self.embed(ids)))))


class UsesWeightTwice(nn.Module):
    """fc.weight enters the graph through fc() and again directly, in one forward pass."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        hidden = self.fc(x) + torch.tanh(x @ self.fc.weight.t())
        return self.head(hidden)


class SharedAcrossTimeSteps(nn.Module):
    """One cell applied at every step, like an unrolled RNN."""

    def __init__(self, steps: int = 12):
        super().__init__()
        self.steps = steps
        self.encode = nn.Linear(4, 8)
        self.cell = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        hidden = self.encode(x)
        for _ in range(self.steps):
            hidden = torch.tanh(self.cell(hidden))
        return self.head(hidden)


class UnrolledTanhRNN(nn.Module):
    """A tanh RNN unrolled from an encoded state: the first layer is reached only through every step."""

    def __init__(self, steps=50, width=64):
        super().__init__()
        self.encode = nn.Linear(width, width)
        self.rec = nn.Linear(width, width)
        self.out = nn.Linear(width, 1)
        self.steps = steps

    def forward(self, x):
        h = torch.tanh(self.encode(x))
        for _ in range(self.steps):
            h = torch.tanh(self.rec(h))
        return self.out(h)


class UnrolledRNNCell(nn.Module):
    """One nn.RNNCell run for seven steps between an encoder and a head: a chain nine layers deep."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.cell = nn.RNNCell(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = self.enc(x)
        for _ in range(7):
            h = self.cell(torch.zeros_like(h), h)
        return self.out(h)


class SequenceClassifier(nn.Module):
    """Embedding, a two-layer recurrent net, and a head on the last time step."""

    def __init__(self, rnn_type):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.rnn = rnn_type(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, ids):
        hidden, _ = self.rnn(self.embed(ids))
        return self.head(hidden[:, -1])


# ---------------------------------------------------------------- inputs and outputs


class TwoInputs(nn.Module):
    """Two inputs and an optional scale, for positional, keyword and callable inputs."""

    def __init__(self):
        super().__init__()
        self.left = nn.Linear(3, 4)
        self.right = nn.Linear(5, 4)

    def forward(self, x, y, scale=1.0):
        return self.left(x) * self.right(y) * scale


class Classifier(nn.Module):
    """A linear classifier whose forward() takes features and a mask."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 2)

    def forward(self, x, mask):
        return self.fc(x) * mask


class Recurrent(nn.Module):
    """A GRU before a head: the inputs are inferred from the recurrent first module."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


@dataclasses.dataclass
class Output:
    """A model output as a dataclass, with or without its own loss."""

    logits: torch.Tensor
    hidden: torch.Tensor
    loss: torch.Tensor | None = None


class Branches(nn.Module):
    """Two branches; ``kind`` chooses the shape of what forward() returns."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.kind == "tuple":
            return a, (b, x.argmax(1))
        if self.kind == "dict":
            return {"a": a, "b": b, "count": torch.tensor(3)}
        if self.kind == "dict-loss":
            return {"a": a, "loss": b.pow(2).mean()}
        if self.kind == "dataclass":
            return Output(a, b)
        if self.kind == "dataclass-loss":
            return Output(a, b, loss=(a * b).mean())
        if self.kind == "integers":
            return (a + b).argmax(1)
        raise AssertionError(self.kind)


class WithPooler(nn.Module):
    """Norm and bias-only modules, and a pooler whose output the loss ignores."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Module()
        self.shift.bias = nn.Parameter(torch.zeros(4))
        self.norm_in = nn.LayerNorm(4)
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.norm_out = nn.LayerNorm(4)
        self.pooler = nn.Linear(4, 4)

    def forward(self, x):
        hidden = self.norm_out(self.fc2(torch.relu(self.fc1(self.norm_in(x + self.shift.bias)))))
        return {"hidden": hidden, "pooled": self.pooler(hidden.mean(0))}


class Detached(nn.Module):
    """Returns its output detached: the loss depends on no trainable parameter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x).detach()


# ---------------------------------------------------------------- side effects and failures


class Everything(nn.Module):
    """BatchNorm, dropout, a frozen layer and an eval-mode submodule in one model; forward can fail late."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x, fail=False):
        hidden = self.drop(self.bn(self.fc1(x)))
        if fail:  # after BatchNorm has updated its stats and dropout has drawn random numbers
            raise RuntimeError("late failure")
        return self.fc2(self.frozen(hidden))


class Raises(nn.Module):
    """A trainable layer and a forward() that always raises RuntimeError("broken")."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        raise RuntimeError("broken")


# ---------------------------------------------------------------- Hugging Face, offline


def token_batch(batch: int = 2, length: int = 16) -> torch.Tensor:
    """Token ids below VOCAB, the same on every call."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def tiny_gpt2(n_layer: int = 2) -> nn.Module:
    """A seeded two-block GPT-2 LM head model built from a small config (no downloads), without dropout."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=64,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        # No dropout, so the probe's loss can be compared with a plain forward pass.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_bert_config() -> transformers.BertConfig:
    """A two-layer BERT config without dropout, for BertModel and BertForMaskedLM."""
    import transformers

    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
