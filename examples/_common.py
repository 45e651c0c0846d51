"""What every example shares: its command-line options, seeding, the loss log it prints, and the
optional PNG of the loss curve (``--plot``). Not an example itself.

The examples import this module before torch, so that the setting below reaches the OpenMP
runtime torch loads: by default its worker threads busy-wait for work, and when other processes
keep the cores busy a training step can take 10x longer (seen on a loaded 2-core VM). Passive
waiting costs little here and keeps the runs short on a busy machine; set OMP_WAIT_POLICY
yourself to override it.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import List, Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)


def parser(doc: str, *, steps: int, batch_size: int, lr: float, log_every: int) -> argparse.ArgumentParser:
    """The options of every example; ``doc`` (the script's docstring) becomes the --help text."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="default %(default)s")
    p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the model (default %(default)s)")
    p.add_argument("--log-every", type=int, default=log_every, help="print every N steps (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's choice)")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG of the loss curve to PATH")
    return p


def setup(args: argparse.Namespace) -> torch.Generator:
    """Apply --threads and --seed; returns the generator that makes the example's data."""
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # model initialization
    return torch.Generator().manual_seed(args.seed)  # data


class LossLog:
    """Records the loss of every step and prints ``step   20  loss 1.2345``: the mean loss of the
    steps since the previous line, at step 1, every ``every`` steps and at the last step."""

    def __init__(self, steps: int, every: int) -> None:
        self.steps, self.every = steps, max(1, every)
        self.losses: List[float] = []
        self._pending: List[float] = []
        self.start = time.perf_counter()

    def __call__(self, step: int, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}")
        self.losses.append(value)
        self._pending.append(value)
        if step == 1 or step % self.every == 0 or step == self.steps:
            print(f"step {step:4d}  loss {sum(self._pending) / len(self._pending):.4f}", flush=True)
            self._pending.clear()

    def summary(self, extra: str = "") -> None:
        seconds = time.perf_counter() - self.start
        print(f"done: {len(self.losses)} steps in {seconds:.1f} s, {torch.get_num_threads()} threads; "
              f"loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}{'; ' + extra if extra else ''}", flush=True)

    def plot(self, path: Optional[str], title: str) -> None:
        """Write the loss curve (every step, and a moving average) to ``path`` when it is given."""
        if not path:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = range(1, len(self.losses) + 1)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, self.losses, lw=0.8, alpha=0.4, label="loss per step")
        ax.plot(steps, moving_average(self.losses, self.every), lw=1.8, label=f"mean of last {self.every}")
        ax.set(title=title, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        print(f"wrote {path}", flush=True)


def moving_average(values: Sequence[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
