"""FuseReport: what fuse() replaced and what it left alone, and why."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class FuseReport:
    """What ``fuse`` replaced and what it left alone (one line each, by module path).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> fused, report = torch_ext.fuse(model, return_report=True)
        >>> report.replaced
        ['0 (Linear 8->16) + relu -> FusedLinear']
        >>> report.skipped
        ['2 (Linear 16->2): last in its nn.Sequential']
    """

    replaced: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"torch_ext.fuse: replaced {len(self.replaced)}, left alone {len(self.skipped)}"]
        lines += [f"  replaced  {r}" for r in self.replaced]
        lines += [f"  left      {s}" for s in self.skipped]
        return "\n".join(lines)

