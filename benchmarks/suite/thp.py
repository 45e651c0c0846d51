"""PyTorch's transparent-huge-page knob, set for every process the suite starts (no torch import).

THP_MEM_ALLOC_ENABLE=1 makes PyTorch's CPU allocator (c10's alloc_cpu) give every tensor of
2 MiB or more a 2 MiB-aligned block advised with madvise(MADV_HUGEPAGE), so that Linux maps it
in 2 MiB pages: 512x fewer page faults when fresh memory is first touched, which is most of
what a memory-bound op costs eager PyTorch on a VM. PyTorch reads the variable once, at its first
CPU allocation, so it must be in the environment before `import torch`: apply() runs before the
suite imports torch, and every process the suite starts (the forkserver and its memory-measuring
children, spawned processes) inherits the environment.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

ENV = "THP_MEM_ALLOC_ENABLE"
SETTINGS = {"on": "1", "off": "0"}
SYSTEM_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def apply(setting: str) -> dict:
    """Set THP_MEM_ALLOC_ENABLE for `setting` ("on" or "off"); the record for the results."""
    before_torch = "torch" not in sys.modules  # else this process keeps the value torch read
    os.environ[ENV] = SETTINGS[setting]
    return {"setting": setting, ENV: SETTINGS[setting], "set_before_torch_import": before_torch,
            "system_mode": system_mode()}


def system_mode() -> Optional[str]:
    """The kernel's THP mode ('always', 'madvise' or 'never'; madvise(HUGEPAGE) needs one of the
    first two), None where it cannot be read."""
    try:
        with open(SYSTEM_MODE) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def notes(record: dict, other_name: Optional[str]) -> List[str]:
    """What the setting does to each side, for the notes of NAME.txt; `other_name`: the results
    of the same run with the other setting, where known."""
    on = record["setting"] == "on"
    other = f", written to {other_name}" if other_name else ""
    lines = [
        f"Baseline THP: {ENV}={record[ENV]} for every candidate (--baseline-thp {record['setting']}: "
        + (f"the default, PyTorch's best CPU configuration; --baseline-thp off gives PyTorch's default{other})."
           if on else
           f"PyTorch's default; the default, --baseline-thp on, gives PyTorch's best CPU configuration{other}).")
        + f" {ENV}=1 makes PyTorch's CPU allocator give each tensor of 2 MiB or more a 2 MiB-aligned block "
        "advised with madvise(MADV_HUGEPAGE): Linux then maps it in 2 MiB pages, 512x fewer page faults when "
        "fresh memory is touched, a large part of what eager's memory-bound losses pay on every step (each "
        "step's large gradients and activations come fresh from the system). It applies to everything PyTorch "
        "allocates: "
        "the eager, compile and peer candidates, and ours' inputs, parameters and the tensors ours gets "
        "from ATen. torch_ext's own large outputs (16 MiB or more) use huge pages and a cache of freed blocks "
        "whatever the setting: in the op cases the knob moves the PyTorch candidates, hardly ours; in the whole "
        "models it moves both sides, since most of a fused model's tensors are still PyTorch's.",
        "For users of plain PyTorch on Linux CPUs: set THP_MEM_ALLOC_ENABLE=1 in the environment before "
        "Python starts (PyTorch reads it once); it costs nothing to try and speeds up memory-bound training "
        "steps (compare the eager figures of the two result files).",
    ]
    if record.get("system_mode") not in (None, "always", "madvise"):
        lines.append(f"This system's transparent huge pages are '{record['system_mode']}' ({SYSTEM_MODE}): "
                     "madvise(HUGEPAGE) does nothing here, on either side.")
    if not record.get("set_before_torch_import"):
        lines.append(f"torch was imported before the suite set {ENV}: this process kept the value it had then "
                     "(the memory-measuring processes have the setting above).")
    return lines
