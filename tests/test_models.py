"""Whole-model tests: small models of three families built from PyTorch's own
modules (the reference) and the same models on torch_ext's fused ops, trained side by side.

Families (each model's ``forward(inputs, targets)`` returns ``(logits, loss)``; a model whose
fused loss never forms the logits returns ``(None, loss)``):

* CNN classifier: conv -> ReLU -> maxpool (2 blocks) -> flatten -> Linear+ReLU -> Linear,
  cross-entropy (also with label smoothing). Fused: ``FusedLinear(activation="relu")`` and
  ``torch_ext.CrossEntropyLoss``.
* RNN language model: Embedding -> LSTM -> Linear+Tanh -> head Linear, cross-entropy over every
  position (also with padding ignored through ignore_index, and label smoothing). Fused:
  ``FusedLinear(activation="tanh")`` and the head + loss as ``torch_ext.linear_cross_entropy``
  with a chunk size below the row count (several chunks); and ``torch_ext.LinearCrossEntropyLoss``
  in place of ``torch.nn.LinearCrossEntropyLoss`` (the reference there), loading its state_dict.
* Transformer encoder classifier: Embedding -> 2-layer ``nn.TransformerEncoder`` (GELU or ReLU
  feed-forward, dropout 0, batch_first) -> mean pool -> MLP head (Linear -> GELU -> Linear),
  cross-entropy. Fused: ``torch_ext.FusedMLP`` head (with and without recompute) and
  ``torch_ext.CrossEntropyLoss``.

Checked, every reference being PyTorch's own modules from the same initial weights
(``load_state_dict``, strict, so the fused models have the same state_dict keys):

* one batch: equal losses and every parameter's gradient (float32, rtol = atol = 1e-5, atol
  relative to the gradient's largest magnitude);
* 20 SGD steps (momentum 0.9) on the same data sequence: every step's loss within 1e-4 relative of the
  reference's, the final parameters close, and the loss going down (so the curve check compares
  a model that learns);
* ``torch_ext.fuse(model)`` on each reference model: it replaced the Linear+activation pairs and
  the loss modules (report and module types), kept the state_dict keys, left the original model
  alone, and gives the same logits and loss in train and eval mode (and under no_grad); the fused
  copy also trains along the reference's loss curve;
* ``torch.compile(torch_ext.fuse(model), fullgraph=True)`` on the CNN and the Transformer:
  training forward + backward and eval forward equal to eager.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_ext
from utils import assert_close

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

# float32 tolerances required of the fused models: one batch's loss and gradients within 1e-5
# (rtol, and atol relative to the largest magnitude of the expected tensor: assert_close's default
# scale); each training step's loss within 1e-4 relative of the reference's.
RTOL = ATOL = 1e-5
CURVE_RTOL = 1e-4
# SGD with momentum, so that 20 steps over a cycle of 3 batches lower the loss clearly (at least
# LOSS_DROP relative) and any difference in the gradients is carried into later steps. Learning
# rates per family (the case name's prefix): the Transformer's loss spikes at 0.2.
STEPS = 20
LR = {"cnn": 0.2, "lstm": 0.2, "transformer": 0.05}
MOMENTUM = 0.9
LOSS_DROP = 0.03


# ------------------------------------------------------------------------------------------------
# Models. `fused=False` builds the reference from torch.nn only; `fused=True` the same architecture
# (same parameter names) on torch_ext's fused ops.
# ------------------------------------------------------------------------------------------------
class CNNClassifier(nn.Module):
    """conv -> ReLU -> maxpool, twice -> flatten -> Linear + ReLU -> Linear; cross-entropy."""

    IMAGE = (3, 12, 12)
    CLASSES = 10

    def __init__(self, fused: bool = False, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        if fused:
            hidden: nn.Module = torch_ext.FusedLinear(16 * 3 * 3, 32, activation="relu")
            act: nn.Module = nn.Identity()
            self.criterion: nn.Module = torch_ext.CrossEntropyLoss(label_smoothing=label_smoothing)
        else:
            hidden, act = nn.Linear(16 * 3 * 3, 32), nn.ReLU()
            self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.classifier = nn.Sequential(hidden, act, nn.Linear(32, self.CLASSES))

    def forward(self, images: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        logits = self.classifier(self.features(images))
        return logits, self.criterion(logits, labels)


class _LinearThenCrossEntropy(nn.Module):
    """torch.nn.LinearCrossEntropyLoss (PyTorch >= 2.13) for older PyTorch, from nn.Linear and
    F.cross_entropy: the same constructor arguments used here, state_dict keys and forward."""

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = False, ignore_index=None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.label_smoothing = label_smoothing
        self.linear = nn.Linear(in_features, num_classes, bias=bias)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.linear(input), target, ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing)


TorchLinearCrossEntropyLoss = getattr(nn, "LinearCrossEntropyLoss", _LinearThenCrossEntropy)


class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> Linear + Tanh -> head Linear; cross-entropy over every position.

    head: "logits" (reference: nn.Linear then nn.CrossEntropyLoss on the (B*T, V) logits),
    "functional" (torch_ext.linear_cross_entropy on the head Linear's weight and bias),
    "torch-module" (reference: torch.nn.LinearCrossEntropyLoss, which holds the head Linear as
    head.linear; a stand-in of nn.Linear + F.cross_entropy with the same keys before PyTorch 2.13)
    or "module" (torch_ext.LinearCrossEntropyLoss, the drop-in for it: the same state_dict keys).
    """

    VOCAB = 50
    PAD = 0  # a valid class index, ignored as a target when `pad` is set
    EMBED = 16
    HIDDEN = 32

    def __init__(self, head: str = "logits", ignore_index: int = -100, label_smoothing: float = 0.0,
                 chunk_size: int = 7) -> None:
        super().__init__()
        self.head_kind = head
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.embed = nn.Embedding(self.VOCAB, self.EMBED)
        self.lstm = nn.LSTM(self.EMBED, self.HIDDEN, batch_first=True)
        if head in ("logits", "torch-module"):
            self.proj = nn.Sequential(nn.Linear(self.HIDDEN, self.HIDDEN), nn.Tanh())
        else:
            self.proj = nn.Sequential(torch_ext.FusedLinear(self.HIDDEN, self.HIDDEN, activation="tanh"), nn.Identity())
        if head == "torch-module":
            self.head: nn.Module = TorchLinearCrossEntropyLoss(
                self.HIDDEN, self.VOCAB, bias=True, ignore_index=ignore_index, label_smoothing=label_smoothing
            )
        elif head == "module":
            self.head = torch_ext.LinearCrossEntropyLoss(self.HIDDEN, self.VOCAB, bias=True, ignore_index=ignore_index,
                                                         label_smoothing=label_smoothing, chunk_size=chunk_size)
        else:
            if head == "logits":
                self.criterion = nn.CrossEntropyLoss(ignore_index=ignore_index, label_smoothing=label_smoothing)
            self.head = nn.Linear(self.HIDDEN, self.VOCAB)

    def forward(self, tokens: Tensor, targets: Tensor):
        hidden = self.proj(self.lstm(self.embed(tokens))[0])
        if self.head_kind == "logits":
            logits = self.head(hidden)
            return logits, self.criterion(logits.reshape(-1, self.VOCAB), targets.reshape(-1))
        if self.head_kind == "functional":
            loss = torch_ext.linear_cross_entropy(
                hidden, self.head.weight, targets, linear_bias=self.head.bias, ignore_index=self.ignore_index,
                label_smoothing=self.label_smoothing, chunk_size=self.chunk_size)
        elif self.head_kind == "torch-module":  # PyTorch's module takes (N, in_features)
            loss = self.head(hidden.reshape(-1, self.HIDDEN), targets.reshape(-1))
        else:  # ours also takes (*, in_features)
            loss = self.head(hidden, targets)
        return None, loss


class MLPHead(nn.Module):
    """Linear -> GELU -> Linear, with FusedMLP's parameter names (fc1, fc2)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerClassifier(nn.Module):
    """Embedding -> 2-layer TransformerEncoder -> mean over positions -> MLP head; cross-entropy."""

    VOCAB = 40
    D_MODEL = 32
    HEADS = 4
    FFN = 64
    CLASSES = 5
    SEQ = 10

    def __init__(self, activation: str = "gelu", fused: bool = False, recompute: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.VOCAB, self.D_MODEL)
        layer = nn.TransformerEncoderLayer(self.D_MODEL, self.HEADS, self.FFN, dropout=0.0,
                                           activation=activation, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        if fused:
            self.head: nn.Module = torch_ext.FusedMLP(self.D_MODEL, self.FFN, self.CLASSES, activation="gelu",
                                                      recompute=recompute)
            self.criterion: nn.Module = torch_ext.CrossEntropyLoss()
        else:
            self.head = MLPHead(self.D_MODEL, self.FFN, self.CLASSES)
            self.criterion = nn.CrossEntropyLoss()

    def forward(self, tokens: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        pooled = self.encoder(self.embed(tokens)).mean(dim=1)
        logits = self.head(pooled)
        return logits, self.criterion(logits, labels)


# ------------------------------------------------------------------------------------------------
# Data: a fixed cycle of a few batches (so that 20 SGD steps visibly lower the loss).
# ------------------------------------------------------------------------------------------------
def cnn_batch(gen: torch.Generator, n: int = 16) -> Tuple[Tensor, Tensor]:
    images = torch.randn(n, *CNNClassifier.IMAGE, generator=gen, device="cpu")
    return images, torch.randint(0, CNNClassifier.CLASSES, (n,), generator=gen, device="cpu")


def lm_batch(gen: torch.Generator, pad: bool, n: int = 4, length: int = 12) -> Tuple[Tensor, Tensor]:
    """Token sequences (next-token targets); with `pad`, each sequence but the first ends in padding."""
    seq = torch.randint(1, LSTMLanguageModel.VOCAB, (n, length + 1), generator=gen, device="cpu")
    if pad:
        for i in range(1, n):
            seq[i, length + 1 - 2 * i:] = LSTMLanguageModel.PAD
    return seq[:, :-1].clone(), seq[:, 1:].clone()


def transformer_batch(gen: torch.Generator, n: int = 8) -> Tuple[Tensor, Tensor]:
    tokens = torch.randint(0, TransformerClassifier.VOCAB, (n, TransformerClassifier.SEQ), generator=gen, device="cpu")
    return tokens, torch.randint(0, TransformerClassifier.CLASSES, (n,), generator=gen, device="cpu")


Batch = Tuple[Tensor, Tensor]


def batches(make: Callable[[torch.Generator], Batch], count: int = 3, seed: int = 1) -> List[Batch]:
    """`count` batches drawn on the CPU from `seed` (the same numbers on every device), on the test's device."""
    gen = torch.Generator().manual_seed(seed)
    device = torch.get_default_device()
    return [tuple(t.to(device) for t in make(gen)) for _ in range(count)]


# Each case: (reference builder, hand-fused builder, batch maker). Builders seed their own
# initialization; the fused model then loads the reference's weights.
CASES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[], nn.Module], Callable]] = {
    "cnn": (lambda: CNNClassifier(), lambda: CNNClassifier(fused=True), cnn_batch),
    "cnn-label_smoothing": (
        lambda: CNNClassifier(label_smoothing=0.1), lambda: CNNClassifier(fused=True, label_smoothing=0.1), cnn_batch),
    "lstm-functional": (lambda: LSTMLanguageModel(), lambda: LSTMLanguageModel("functional"),
                        lambda g: lm_batch(g, pad=False)),
    "lstm-functional-padding": (
        lambda: LSTMLanguageModel(ignore_index=LSTMLanguageModel.PAD),
        lambda: LSTMLanguageModel("functional", ignore_index=LSTMLanguageModel.PAD),
        lambda g: lm_batch(g, pad=True)),
    # torch_ext.LinearCrossEntropyLoss as a drop-in for torch.nn.LinearCrossEntropyLoss: it loads the
    # latter's state_dict (strict) and gives the same loss, gradients and training curve.
    "lstm-module-padding-smoothing": (
        lambda: LSTMLanguageModel("torch-module", ignore_index=LSTMLanguageModel.PAD, label_smoothing=0.1),
        lambda: LSTMLanguageModel("module", ignore_index=LSTMLanguageModel.PAD, label_smoothing=0.1),
        lambda g: lm_batch(g, pad=True)),
    "lstm-functional-padding-smoothing": (
        lambda: LSTMLanguageModel(ignore_index=LSTMLanguageModel.PAD, label_smoothing=0.1),
        lambda: LSTMLanguageModel("functional", ignore_index=LSTMLanguageModel.PAD, label_smoothing=0.1),
        lambda g: lm_batch(g, pad=True)),
    "transformer-gelu": (lambda: TransformerClassifier("gelu"), lambda: TransformerClassifier("gelu", fused=True),
                         transformer_batch),
    "transformer-relu": (lambda: TransformerClassifier("relu"), lambda: TransformerClassifier("relu", fused=True),
                         transformer_batch),
    "transformer-gelu-no_recompute": (
        lambda: TransformerClassifier("gelu"), lambda: TransformerClassifier("gelu", fused=True, recompute=False),
        transformer_batch),
}
# fuse() is applied to one reference model per family (and activation, for the Transformer).
FUSE_CASES = ("cnn-label_smoothing", "lstm-functional-padding", "transformer-gelu", "transformer-relu")


def reference_model(case: str) -> nn.Module:
    torch.manual_seed(1234)
    return CASES[case][0]()


def hand_fused_model(case: str, reference: nn.Module) -> nn.Module:
    model = CASES[case][1]()
    model.load_state_dict(reference.state_dict())  # strict: the same keys
    return model


def case_batches(case: str, count: int = 3) -> List[Tuple[Tensor, Tensor]]:
    return batches(CASES[case][2], count)


def loss_and_grads(model: nn.Module, batch, parameters_of: nn.Module = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The loss of model(*batch) and the gradient of each parameter of `parameters_of` (default:
    model; the module under a torch.compile wrapper, so that the names match the eager model's)."""
    parameters_of = model if parameters_of is None else parameters_of
    parameters_of.zero_grad(set_to_none=True)
    loss = model(*batch)[1]
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in parameters_of.named_parameters()}
    return loss.detach(), grads


def assert_same_loss_and_grads(model: nn.Module, reference: nn.Module, batch, what: str) -> None:
    loss, grads = loss_and_grads(model, batch)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL, msg=f"{what}: loss")
    assert grads.keys() == ref_grads.keys(), f"{what}: parameters {sorted(grads)} vs {sorted(ref_grads)}"
    for name, ref_grad in ref_grads.items():
        assert ref_grad.abs().max() > 0, f"{what}: the reference gradient of {name} is zero; the batch checks nothing"
        assert_close(grads[name], ref_grad, rtol=RTOL, atol=ATOL, msg=f"{what}: gradient of {name}")


def train(model: nn.Module, data, lr: float, steps: int = STEPS) -> List[float]:
    """SGD over the batches of `data`, cycled; returns each step's loss."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(*data[step % len(data)])[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_tracks_reference_curve(model: nn.Module, reference: nn.Module, data, case: str, what: str) -> None:
    lr = LR[case.split("-")[0]]
    losses = train(model, data, lr)
    ref_losses = train(reference, data, lr)
    for step, (loss, ref) in enumerate(zip(losses, ref_losses)):
        assert abs(loss - ref) <= CURVE_RTOL * abs(ref), (
            f"{what}: step {step} loss {loss!r} vs reference {ref!r} (relative difference "
            f"{abs(loss - ref) / abs(ref):.3g} > {CURVE_RTOL}); losses {losses} vs reference {ref_losses}")
    # The same batches come back every len(data) steps: compare a batch's first and last loss.
    cycle = len(data)
    first, last = sum(ref_losses[:cycle]) / cycle, sum(ref_losses[-cycle:]) / cycle
    assert last < (1 - LOSS_DROP) * first, (
        f"{what}: the reference loss did not go down by {LOSS_DROP:.0%} in {STEPS} steps ({ref_losses})")
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.detach(), ref_params[name].detach(), rtol=CURVE_RTOL, atol=CURVE_RTOL,
                     msg=f"{what}: parameter {name} after {STEPS} steps")


# ------------------------------------------------------------------------------------------------
# Hand-fused models against the references.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_fused_model_same_loss_and_gradients(case):
    reference = reference_model(case)
    model = hand_fused_model(case, reference)
    assert_same_loss_and_grads(model, reference, case_batches(case, 1)[0], case)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_model_tracks_reference_training(case):
    reference = reference_model(case)
    model = hand_fused_model(case, reference)
    assert_tracks_reference_curve(model, reference, case_batches(case), case, case)


def test_lstm_head_runs_several_chunks():
    """The language-model cases only test chunking if their rows outnumber chunk_size."""
    tokens, _ = case_batches("lstm-functional", 1)[0]
    model = LSTMLanguageModel("functional")
    assert tokens.numel() > 3 * model.chunk_size, f"{tokens.numel()} rows, chunk_size {model.chunk_size}"


def test_padding_case_ignores_targets():
    """The padding batches hold ignored targets, and both models' losses are the mean over the others."""
    tokens, targets = case_batches("lstm-functional-padding", 1)[0]
    ignored = (targets == LSTMLanguageModel.PAD).sum().item()
    assert 0 < ignored < targets.numel() // 2, f"{ignored} padded targets of {targets.numel()}"
    reference = reference_model("lstm-functional-padding")
    logits, loss = reference(tokens, targets)
    keep = targets.reshape(-1) != LSTMLanguageModel.PAD
    expected = F.cross_entropy(logits.reshape(-1, LSTMLanguageModel.VOCAB)[keep], targets.reshape(-1)[keep])
    assert_close(loss, expected, rtol=RTOL, atol=ATOL, msg="reference loss over the unpadded targets")
    fused = hand_fused_model("lstm-functional-padding", reference)
    assert_close(fused(tokens, targets)[1], expected, rtol=RTOL, atol=ATOL, msg="fused loss over the unpadded targets")


# ------------------------------------------------------------------------------------------------
# torch_ext.fuse on the reference models.
# ------------------------------------------------------------------------------------------------
def fused_linear_activations(model: nn.Module) -> List[str]:
    return sorted(m.activation for m in model.modules() if isinstance(m, torch_ext.FusedLinear))


def torch_ext_losses(model: nn.Module) -> List[str]:
    return sorted(type(m).__name__ for m in model.modules()
                  if type(m).__module__.startswith("torch_ext") and type(m).__name__.endswith("Loss"))


# What fuse() must replace in each reference model: FusedLinear activations, torch_ext loss modules.
EXPECTED_FUSION = {
    "cnn-label_smoothing": (["relu"], ["CrossEntropyLoss"]),
    "lstm-functional-padding": (["tanh"], ["CrossEntropyLoss"]),
    "transformer-gelu": (["gelu", "gelu", "gelu"], ["CrossEntropyLoss"]),  # 2 encoder layers + head
    "transformer-relu": (["gelu", "relu", "relu"], ["CrossEntropyLoss"]),
}


def assert_same_outputs(model: nn.Module, reference: nn.Module, batch, what: str) -> None:
    logits, loss = model(*batch)
    ref_logits, ref_loss = reference(*batch)
    assert_close(logits, ref_logits, rtol=RTOL, atol=ATOL, msg=f"{what}: logits")
    assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL, msg=f"{what}: loss")


@pytest.mark.parametrize("case", FUSE_CASES)
def test_fuse_replaces_and_leaves_outputs_equal(case):
    reference = reference_model(case)
    original_state = copy.deepcopy(reference.state_dict())
    fused, report = torch_ext.fuse(reference, return_report=True)
    assert fused is not reference, "fuse(model) (inplace=False) must return a copy"

    activations, losses = EXPECTED_FUSION[case]
    assert fused_linear_activations(fused) == activations, (
        f"FusedLinear activations {fused_linear_activations(fused)}, expected {activations}; report {report}")
    assert torch_ext_losses(fused) == losses, f"torch_ext losses {torch_ext_losses(fused)}, expected {losses}"
    assert len(report.replaced) == len(activations) + len(losses), (
        f"report.replaced has {len(report.replaced)} entries for {len(activations)} linear layers and "
        f"{len(losses)} losses: {report.replaced}")
    assert not any(isinstance(m, torch_ext.FusedLinear) for m in reference.modules()), "fuse() changed the original"
    assert torch_ext_losses(reference) == [], "fuse() changed the original's loss module"

    state = fused.state_dict()
    assert list(state) == list(original_state), f"state_dict keys {list(state)} vs {list(original_state)}"
    for key, value in original_state.items():
        assert torch.equal(state[key], value), f"fuse() changed {key}"

    batch = case_batches(case, 1)[0]
    for training in (True, False):
        reference.train(training)
        fused.train(training)
        assert_same_outputs(fused, reference, batch, f"{case}, {'train' if training else 'eval'} mode")
    with torch.no_grad():
        assert_same_outputs(fused, reference, batch, f"{case}, eval mode under no_grad")


@pytest.mark.parametrize("case", FUSE_CASES)
def test_fused_copy_same_gradients_and_training(case):
    reference = reference_model(case)
    fused = torch_ext.fuse(reference)
    data = case_batches(case)
    assert_same_loss_and_grads(fused, reference, data[0], f"fuse({case})")
    assert_tracks_reference_curve(fused, reference, data, case, f"fuse({case})")


# ------------------------------------------------------------------------------------------------
# torch.compile(fuse(model), fullgraph=True).
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["cnn", "transformer-gelu"])
def test_compile_fullgraph_of_fused_model(case, dynamo_reset):
    reference = reference_model(case)
    eager = torch_ext.fuse(reference)
    compiled_fused = torch_ext.fuse(reference)
    compiled = torch.compile(compiled_fused, fullgraph=True)
    batch = case_batches(case, 1)[0]

    # Training: forward + backward.
    loss, grads = loss_and_grads(compiled, batch, parameters_of=compiled_fused)
    ref_loss, ref_grads = loss_and_grads(eager, batch)
    assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL, msg=f"compiled {case}: training loss")
    for name, ref_grad in ref_grads.items():
        assert_close(grads[name], ref_grad, rtol=RTOL, atol=ATOL, msg=f"compiled {case}: gradient of {name}")

    # Evaluation forward.
    compiled.eval()
    eager.eval()
    with torch.no_grad():
        assert_same_outputs(compiled, eager, batch, f"compiled {case}, eval mode")
