"""A small CNN image classifier whose dense head is torch_ext.FusedLinear (Linear + ReLU in one op)
and whose loss is torch_ext.CrossEntropyLoss with label smoothing.

Data: 32x32 grey images of sine gratings (stripes) in noise; the class is the stripes' orientation,
one of 10 angles 18 degrees apart, with random frequency, phase and contrast. A fresh batch is
made every step (nothing is downloaded), and the accuracy is measured on a held-out set at the end.

    python examples/cnn_classifier.py                 # ~15 s on 2 CPU cores
    python examples/cnn_classifier.py --plot cnn.png  # also write the loss curve
"""
from __future__ import annotations

import math

from _common import LossLog, parser, setup  # first: it sets OMP_WAIT_POLICY before torch loads

import torch
from torch import nn

import torch_ext

CLASSES = 10
SIZE = 32


def make_batch(n: int, gen: torch.Generator):
    """n noisy gratings and their orientation classes."""
    label = torch.randint(CLASSES, (n,), generator=gen)
    jitter = (torch.rand(n, generator=gen) - 0.5) * (math.pi / CLASSES) * 0.5  # within +-1/4 of the gap
    angle = label * (math.pi / CLASSES) + jitter
    period = 4.0 + 4.0 * torch.rand(n, generator=gen)  # pixels per stripe cycle
    phase = 2 * math.pi * torch.rand(n, generator=gen)
    contrast = 0.5 + 0.5 * torch.rand(n, generator=gen)
    coords = torch.arange(SIZE, dtype=torch.float32) - SIZE / 2
    y, x = coords[:, None], coords[None, :]
    along = x * angle.cos()[:, None, None] + y * angle.sin()[:, None, None]  # (n, SIZE, SIZE)
    image = contrast[:, None, None] * torch.sin(2 * math.pi * along / period[:, None, None] + phase[:, None, None])
    image = image + 1.5 * torch.randn(image.shape, generator=gen)  # noise stronger than the stripes
    return image.unsqueeze(1), label


def build_model() -> nn.Module:
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(1, 16),  # 32x32 -> 16x16
        block(16, 32),  # -> 8x8
        nn.Flatten(),
        torch_ext.FusedLinear(32 * 8 * 8, 128, activation="relu"),  # the fused dense head
        nn.Linear(128, CLASSES),
    )


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = (model(images).argmax(1) == labels).float().mean().item()
    model.train()
    return correct


def main(argv=None) -> None:
    args = parser(__doc__, steps=500, batch_size=64, lr=2e-3, log_every=25).parse_args(argv)
    gen = setup(args)
    test_images, test_labels = make_batch(1000, gen)

    model = build_model()
    criterion = torch_ext.CrossEntropyLoss(label_smoothing=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"CNN classifier: fused dense head {model[3]}, loss torch_ext.CrossEntropyLoss(label_smoothing=0.1); "
          f"{CLASSES} grating orientations, chance accuracy {1 / CLASSES:.0%}", flush=True)

    log = LossLog(args.steps, args.log_every)
    for step in range(1, args.steps + 1):
        images, labels = make_batch(args.batch_size, gen)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log(step, loss)
    log.summary(f"held-out accuracy {accuracy(model, test_images, test_labels):.1%}")
    log.plot(args.plot, "CNN classifier (torch_ext.FusedLinear head, CrossEntropyLoss)")


if __name__ == "__main__":
    main()
