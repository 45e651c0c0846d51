"""Progress on stderr: a tqdm bar over the cases when tqdm is installed and stderr is a terminal,
else one line per stage."""
from __future__ import annotations

import sys


class Progress:
    """A tqdm bar over the cases when tqdm is installed and stderr is a terminal, else one line per stage."""

    def __init__(self, total: int):
        self.total, self.done, self.case = total, 0, ""
        self.bar = None
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", file=sys.stderr, disable=None, dynamic_ncols=True)
            if self.bar.disable:
                self.bar = None
        except ImportError:
            pass
        self.last_line = 0.0

    def start(self, case: str) -> None:
        self.case = case
        if self.bar is not None:
            self.bar.set_description(case)
        else:
            print(f"[{self.done + 1}/{self.total}] {case}", file=sys.stderr, flush=True)

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def finish_case(self, summary: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.write(summary)
            self.bar.update(1)
        else:
            print(f"    {summary}", file=sys.stderr, flush=True)

    def begin_memory(self, jobs: int) -> None:
        """Switch to counting the peak-memory processes."""
        if self.bar is not None:
            self.bar.close()
            from tqdm import tqdm

            self.bar = tqdm(total=jobs, unit="process", file=sys.stderr, dynamic_ncols=True, desc="peak memory")
        else:
            print(f"peak memory: {jobs} fresh processes", file=sys.stderr, flush=True)

    def memory_done(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
