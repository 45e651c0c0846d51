"""A Transformer encoder classifier written with plain torch.nn and then passed through
torch_ext.fuse(), which turns each encoder layer's Linear + GELU into one torch_ext.FusedLinear;
the classifier head is a torch_ext.FusedMLP and the loss torch_ext.cross_entropy.

Data: sequences of 32 tokens over a 64-token vocabulary. Tokens 1-8 are keywords, scattered
among random filler tokens; the class is the keyword that occurs most often (always by exactly one
occurrence). The task ignores order, so the model has no position embedding. Fresh sequences
are drawn every step; nothing is downloaded.

    python examples/transformer_classifier.py                     # ~15 s on 2 CPU cores
    python examples/transformer_classifier.py --plot encoder.png  # also write the loss curve
"""
from __future__ import annotations

from _common import LossLog, parser, setup  # first: it sets OMP_WAIT_POLICY before torch loads

import torch
from torch import nn

import torch_ext

VOCAB, LENGTH, KEYWORDS = 64, 32, 8  # keyword tokens are 1..KEYWORDS; 0 is unused
FILLER = KEYWORDS + 1  # first filler token


def make_batch(n: int, gen: torch.Generator):
    """Sequences in which keyword `label + 1` occurs exactly once more than any other keyword."""
    label = torch.randint(KEYWORDS, (n,), generator=gen)
    counts = torch.randint(0, 3, (n, KEYWORDS), generator=gen)
    counts[torch.arange(n), label] = counts.scatter(1, label[:, None], -1).amax(1) + 1
    # Row r holds counts[r, 0] ones, counts[r, 1] twos, ..., then filler; shuffled within the row.
    slot = torch.arange(LENGTH).expand(n, LENGTH).contiguous()
    keyword = torch.searchsorted(counts.cumsum(1), slot, right=True) + 1
    filler = torch.randint(FILLER, VOCAB, (n, LENGTH), generator=gen)
    tokens = torch.where(keyword <= KEYWORDS, keyword, filler)
    shuffle = torch.rand(n, LENGTH, generator=gen).argsort(1)
    return tokens.gather(1, shuffle), label


class EncoderClassifier(nn.Module):
    def __init__(self, d_model: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # Already fused: fc1 -> GELU -> fc2 as one module.
        self.head = torch_ext.FusedMLP(d_model, 2 * d_model, out_features=KEYWORDS, activation="gelu")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens))  # (batch, LENGTH, d_model)
        return self.head(hidden.mean(1))  # mean-pooled -> (batch, KEYWORDS) logits


def main(argv=None) -> None:
    args = parser(__doc__, steps=200, batch_size=64, lr=5e-4, log_every=20).parse_args(argv)
    gen = setup(args)
    test_tokens, test_labels = make_batch(1000, gen)

    # fuse() returns a copy whose encoder layers run linear1 + GELU as one FusedLinear; the
    # report lists what it replaced (and anything it left alone, with the reason).
    model, report = torch_ext.fuse(EncoderClassifier(), return_report=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print("Transformer encoder classifier: encoder layers through torch_ext.fuse(), FusedMLP head, "
          f"torch_ext.cross_entropy; {KEYWORDS} classes, chance accuracy {1 / KEYWORDS:.0%}", flush=True)
    print(report, flush=True)

    log = LossLog(args.steps, args.log_every)
    for step in range(1, args.steps + 1):
        tokens, labels = make_batch(args.batch_size, gen)
        loss = torch_ext.cross_entropy(model(tokens), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log(step, loss)
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_tokens).argmax(1) == test_labels).float().mean().item()
    log.summary(f"held-out accuracy {accuracy:.1%}")
    log.plot(args.plot, "Transformer classifier (torch_ext.fuse, FusedMLP head)")


if __name__ == "__main__":
    main()
