"""Metric learning with torch_ext.TripletMarginLoss: an MLP of torch_ext.FusedLinear layers
(Linear + activation in one op) learns an embedding in which points of the same cluster are near
each other and points of different clusters are at least a margin apart.

Data: 40 clusters in a 16-dimensional subspace, hidden in 64 dimensions among 48 dimensions of
larger nuisance noise, the whole rotated at random. Nearest-neighbour retrieval in the raw input
space finds the right cluster about 1 time in 6; in the learned embedding, about 9 in 10. Each
step draws fresh triplets: anchor and positive from one cluster, negative from another. Nothing
is downloaded.

    python examples/triplet_metric_learning.py                     # ~10 s on 2 CPU cores
    python examples/triplet_metric_learning.py --plot triplet.png  # also write the loss curve
"""
from __future__ import annotations

from _common import LossLog, parser, setup  # first: it sets OMP_WAIT_POLICY before torch loads

import torch
from torch import nn

import torch_ext

CLUSTERS, SIGNAL, NUISANCE = 40, 16, 48
DIM = SIGNAL + NUISANCE


class ClusteredPoints:
    def __init__(self, gen: torch.Generator) -> None:
        self.centers = torch.randn(CLUSTERS, SIGNAL, generator=gen)
        self.rotation = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))[0]

    def sample(self, cluster: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        signal = self.centers[cluster] + 0.6 * torch.randn(len(cluster), SIGNAL, generator=gen)
        nuisance = 2.0 * torch.randn(len(cluster), NUISANCE, generator=gen)
        return torch.cat([signal, nuisance], 1) @ self.rotation

    def triplets(self, n: int, gen: torch.Generator):
        same = torch.randint(CLUSTERS, (n,), generator=gen)
        other = (same + torch.randint(1, CLUSTERS, (n,), generator=gen)) % CLUSTERS  # any other cluster
        return self.sample(same, gen), self.sample(same, gen), self.sample(other, gen)


def build_model(embedding: int = 32) -> nn.Module:
    return nn.Sequential(
        torch_ext.FusedLinear(DIM, 256, activation="gelu"),
        torch_ext.FusedLinear(256, 256, activation="gelu"),
        torch_ext.FusedLinear(256, embedding),  # activation="none": a plain Linear
    )


def retrieval_accuracy(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of points whose nearest other point (Euclidean) is in the same cluster."""
    dist = torch.cdist(points, points)
    dist.fill_diagonal_(float("inf"))
    return (labels[dist.argmin(1)] == labels).float().mean().item()


def main(argv=None) -> None:
    args = parser(__doc__, steps=1000, batch_size=256, lr=1e-3, log_every=50).parse_args(argv)
    gen = setup(args)
    data = ClusteredPoints(gen)
    test_labels = torch.arange(2000) % CLUSTERS
    test_points = data.sample(test_labels, gen)

    model = build_model()
    criterion = torch_ext.TripletMarginLoss(margin=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    raw_accuracy = retrieval_accuracy(test_points, test_labels)
    print("Triplet metric learning: embedding MLP of torch_ext.FusedLinear (gelu, gelu, none), "
          f"loss torch_ext.TripletMarginLoss(margin=1.0); {CLUSTERS} clusters, "
          f"raw-input 1-NN retrieval accuracy {raw_accuracy:.1%}", flush=True)

    log = LossLog(args.steps, args.log_every)
    for step in range(1, args.steps + 1):
        anchor, positive, negative = data.triplets(args.batch_size, gen)
        loss = criterion(model(anchor), model(positive), model(negative))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log(step, loss)
    with torch.no_grad():
        accuracy = retrieval_accuracy(model(test_points), test_labels)
    log.summary(f"embedding 1-NN retrieval accuracy {accuracy:.1%} (chance {1 / CLUSTERS:.0%})")
    log.plot(args.plot, "Triplet metric learning (torch_ext.TripletMarginLoss)")


if __name__ == "__main__":
    main()
