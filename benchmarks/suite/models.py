"""The model cases: whole models written with plain torch.nn (or taken from transformers), whose
training step is timed as the model is and through torch_ext.fuse() (measure_model.py).

Each case builds its model (after torch.manual_seed, so every candidate starts from the same
weights) and one batch (from its own seeded generator), at a size: "full" for the default run,
"quick" for --quick. The loss is part of the model's forward, as a loss module where torch.nn
has one, so that fuse() sees it. Adding a model: a build function and one entry in MODELS.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn


@dataclasses.dataclass
class ModelCase:
    """build(**size) -> (model, batch); loss(model, batch) -> the loss of a training step;
    units(size): samples or tokens per step (`unit` says which); describe(size): for the tables;
    requires: the package it needs (the case is skipped, saying so, where it is missing);
    preload: modules the memory-measuring processes import once, in their forkserver."""

    name: str
    unit: str
    sizes: Dict[str, dict]
    build: Callable[..., Tuple[nn.Module, object]]
    units: Callable[[dict], int]
    describe: Callable[[dict], str]
    loss: Callable[[nn.Module, object], torch.Tensor] = lambda model, batch: model(*batch)
    requires: Optional[str] = None
    preload: Tuple[str, ...] = ()

    def available(self) -> Optional[str]:
        """None where the case can run, else why not."""
        if self.requires is None:
            return None
        try:
            __import__(self.requires)
        except ImportError:
            return f"needs {self.requires} (pip install {self.requires})"
        return None


def _data(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# CNN: VGG-style (3x3 convolutions + ReLU, max-pooling halving the image), then a Linear + ReLU
# head and a classifier layer; nn.CrossEntropyLoss. fuse(): the head's Linear + ReLU become one
# FusedLinear and the loss torch_ext's CrossEntropyLoss (the convolutions stay PyTorch's).


class Classifier(nn.Module):
    """net(inputs) -> logits, then the loss module; forward(inputs, labels) -> loss."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.loss = nn.CrossEntropyLoss()

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.net(inputs), labels)


def build_cnn(batch: int, image: int, channels: Tuple[int, ...], hidden: int, classes: int):
    layers, c_in = [], 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    side = image >> len(channels)
    layers += [nn.Flatten(), nn.Linear(c_in * side * side, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
    gen = _data()
    images = torch.randn(batch, 3, image, image, generator=gen)
    labels = torch.randint(classes, (batch,), generator=gen)
    return Classifier(nn.Sequential(*layers)), (images, labels)


# --------------------------------------------------------------------------------------------
# RNN: LSTM language model, next-token loss through nn.LinearCrossEntropyLoss (the head's Linear
# and the loss in one module; PyTorch's own computes the full logits without options). fuse():
# that module becomes torch_ext's LinearCrossEntropyLoss (no logits); the LSTM stays PyTorch's.


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.LinearCrossEntropyLoss(hidden, vocab)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.lstm(self.embed(tokens))[0]
        return self.head(h.reshape(-1, h.shape[-1]), targets.reshape(-1))


def build_rnn(batch: int, length: int, vocab: int, hidden: int):
    ids = torch.randint(vocab, (batch, length + 1), generator=_data())
    return LSTMLanguageModel(vocab, hidden), (ids[:, :-1], ids[:, 1:])


# --------------------------------------------------------------------------------------------
# Transformer: an encoder classifier of nn.TransformerEncoderLayers (GELU feed-forward), mean-
# pooled, a Linear classifier, nn.CrossEntropyLoss. fuse(): each layer's linear1 + GELU becomes a
# FusedLinear, and the loss torch_ext's CrossEntropyLoss.


class EncoderClassifier(nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, layers: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classify = nn.Linear(width, classes)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.classify(self.encoder(self.embed(tokens)).mean(1)), labels)


def build_transformer(batch: int, length: int, vocab: int, width: int, heads: int, layers: int, classes: int):
    gen = _data()
    tokens = torch.randint(vocab, (batch, length), generator=gen)
    labels = torch.randint(classes, (batch,), generator=gen)
    return EncoderClassifier(vocab, width, heads, layers, classes), (tokens, labels)


# --------------------------------------------------------------------------------------------
# Llama: transformers' LlamaForCausalLM from a config (random init, nothing downloaded), labels =
# the inputs (HF shifts them). fuse(): each LlamaMLP runs one gated fused_mlp, and the loss comes
# from the hidden states through linear_cross_entropy instead of the tokens x vocabulary logits.


def build_llama(batch: int, length: int, vocab: int, hidden: int, intermediate: int, layers: int, heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=length, attention_dropout=0.0, tie_word_embeddings=False)
    ids = torch.randint(vocab, (batch, length), generator=_data())
    return LlamaForCausalLM(config).train(), {"input_ids": ids, "labels": ids}


MODELS: Dict[str, ModelCase] = {
    "cnn": ModelCase(
        "cnn", "samples",
        sizes={"full": dict(batch=256, image=32, channels=(32, 64, 128), hidden=512, classes=10),
               "quick": dict(batch=32, image=32, channels=(8, 16, 32), hidden=64, classes=10)},
        build=build_cnn, units=lambda s: s["batch"],
        describe=lambda s: (f"VGG-style, convs {'-'.join(map(str, s['channels']))}, head {s['hidden']}, "
                            f"batch {s['batch']} x 3x{s['image']}x{s['image']}"),
    ),
    "rnn": ModelCase(
        "rnn", "tokens",
        sizes={"full": dict(batch=32, length=64, vocab=32000, hidden=512),
               "quick": dict(batch=8, length=32, vocab=4000, hidden=128)},
        build=build_rnn, units=lambda s: s["batch"] * s["length"],
        describe=lambda s: f"LSTM LM, hidden {s['hidden']}, vocab {s['vocab']}, {s['batch']}x{s['length']} tokens",
    ),
    "transformer": ModelCase(
        "transformer", "samples",
        sizes={"full": dict(batch=32, length=64, vocab=1000, width=256, heads=4, layers=2, classes=10),
               "quick": dict(batch=8, length=32, vocab=1000, width=64, heads=4, layers=1, classes=10)},
        build=build_transformer, units=lambda s: s["batch"],
        describe=lambda s: (f"encoder classifier, {s['layers']} layers, width {s['width']}, "
                            f"batch {s['batch']}x{s['length']} tokens"),
    ),
    "llama": ModelCase(
        "llama", "tokens",
        sizes={"full": dict(batch=4, length=512, vocab=32000, hidden=256, intermediate=688, layers=2, heads=4),
               "quick": dict(batch=2, length=128, vocab=4000, hidden=64, intermediate=172, layers=1, heads=4)},
        build=build_llama, units=lambda s: s["batch"] * s["length"],
        describe=lambda s: (f"HF Llama causal LM, {s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}, "
                            f"{s['batch']}x{s['length']} tokens"),
        loss=lambda model, batch: model(**batch).loss,
        requires="transformers", preload=("transformers.models.llama.modeling_llama",),
    ),
}
