"""An LSTM language model whose output layer and loss are one fused op,
torch_ext.LinearCrossEntropyLoss: the (tokens x vocabulary) logits are never materialized, in the
forward pass or the backward pass.

Data: token sequences from a random Markov chain over a 4096-token vocabulary in which each token
is followed by one of 4 successors with fixed probabilities. A model that knows the chain reaches
its entropy rate (printed: about 0.9 nats per token) against ln(4096) = 8.3 for a uniform guess.
Fresh sequences are sampled every step; nothing is downloaded.

    python examples/lstm_language_model.py                 # ~25 s on 2 CPU cores
    python examples/lstm_language_model.py --plot lm.png   # also write the loss curve
"""
from __future__ import annotations

import math

from _common import LossLog, parser, setup  # first: it sets OMP_WAIT_POLICY before torch loads

import torch
from torch import nn

import torch_ext

VOCAB = 4096
SUCCESSORS = 4


class MarkovChain:
    """Each token has SUCCESSORS random successors with random (fixed) probabilities."""

    def __init__(self, gen: torch.Generator) -> None:
        self.next = torch.randint(VOCAB, (VOCAB, SUCCESSORS), generator=gen)
        self.prob = torch.softmax(1.5 * torch.randn(VOCAB, SUCCESSORS, generator=gen), dim=1)
        self.cdf = self.prob.cumsum(1)

    def sample(self, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
        tokens = torch.empty(batch, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(VOCAB, (batch,), generator=gen)
        for t in range(1, length):
            prev = tokens[:, t - 1]
            u = torch.rand(batch, 1, generator=gen)
            pick = (u > self.cdf[prev]).sum(1).clamp_max(SUCCESSORS - 1)
            tokens[:, t] = self.next[prev, pick]
        return tokens

    def nll(self, tokens: torch.Tensor) -> float:
        """Mean -log p(next | current) under the chain itself: the best loss any model can reach."""
        prev, nxt = tokens[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)
        p = (self.prob[prev] * (self.next[prev] == nxt[:, None])).sum(1)  # successors may repeat
        return float(-p.log().mean())


class LSTMLanguageModel(nn.Module):
    def __init__(self, embed: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        # The head and the loss are one module, a drop-in for torch.nn.LinearCrossEntropyLoss: it
        # holds the head's nn.Linear (self.head.linear(h) gives logits when they are wanted, e.g.
        # for sampling) and self.head(h, targets) is the loss, without forming the logits.
        self.head = torch_ext.LinearCrossEntropyLoss(hidden, VOCAB)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.embed(tokens))[0]  # (batch, time, hidden)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy: hidden state at t predicts token t + 1."""
        h = self.hidden_states(tokens[:, :-1])
        return self.head(h, tokens[:, 1:])  # h (batch, time, hidden); logits never formed


def main(argv=None) -> None:
    p = parser(__doc__, steps=200, batch_size=32, lr=3e-3, log_every=20)
    p.add_argument("--seq-len", type=int, default=48, help="tokens per sequence (default %(default)s)")
    args = p.parse_args(argv)
    gen = setup(args)
    chain = MarkovChain(gen)
    held_out = chain.sample(64, args.seq_len + 1, gen)

    model = LSTMLanguageModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"LSTM language model: head + loss fused in torch_ext.LinearCrossEntropyLoss "
          f"(no {args.batch_size * args.seq_len}x{VOCAB} logits); vocabulary {VOCAB}, "
          f"uniform guess {math.log(VOCAB):.2f}, chain entropy {chain.nll(held_out):.2f} nats/token", flush=True)

    log = LossLog(args.steps, args.log_every)
    for step in range(1, args.steps + 1):
        loss = model.loss(chain.sample(args.batch_size, args.seq_len + 1, gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log(step, loss)
    with torch.no_grad():
        held_out_loss = model.loss(held_out).item()
    log.summary(f"held-out loss {held_out_loss:.4f} (perplexity {math.exp(held_out_loss):.1f})")
    log.plot(args.plot, "LSTM LM (torch_ext.LinearCrossEntropyLoss head)")


if __name__ == "__main__":
    main()
