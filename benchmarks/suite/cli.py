"""The command line of benchmarks/run.py (and of the per-family scripts, which call it with some
options fixed). No torch import here: PyTorch's huge-page knob (thp.py) must be set before torch
loads, and the options say how."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import thp

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


class UsageError(Exception):
    """Bad command line: printed as one message, exit status 2."""


def parse_args(argv: Sequence[str], doc: str, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", metavar="OP",
                   help="op families to run (default: all but smooth_l1); 'none': no op case")
    p.add_argument("--sizes", nargs="+", metavar="SIZE", help="size names or explicit sizes, see above")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="model cases to run (default: all, unless --ops or --sizes narrow the run); 'none': no model")
    p.add_argument("--baseline-thp", default="on", metavar="on|off",
                   help="THP_MEM_ALLOC_ENABLE for every process of the run: on (default, PyTorch's best CPU "
                        "configuration) or off (PyTorch's default; results named with _nothp)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, float64")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true",
                   help="the quick sizes, 3 rounds, small models, no torch.compile candidates: a check that "
                        "everything runs")
    p.add_argument("--rounds", type=int, help="most timing rounds per case (default 10; 3 with --quick)")
    p.add_argument("--case-seconds", type=float, help="timing budget per op case, which sets its rounds between 3 "
                   "and --rounds (default 10; 1.5 with --quick)")
    p.add_argument("--model-seconds", type=float, help="timing budget per model case, as --case-seconds "
                   "(default 3; 1.5 with --quick)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidates")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="folder for the results (default benchmarks/results)")
    p.add_argument("--name", help="file name of the results, without extension (default: the device, with _quick, "
                   "_<dtype>, _custom or _nothp appended for such runs)")
    args = p.parse_args(list(argv))
    if args.dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {args.dtype!r}; use {', '.join(DTYPE_NAMES)}")
    if args.baseline_thp not in thp.SETTINGS:
        raise UsageError(f"--baseline-thp: expected {' or '.join(thp.SETTINGS)}, got {args.baseline_thp!r}")
    if args.rounds is not None and args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    for flag in ("case_seconds", "model_seconds"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    return args


def default_name(args: argparse.Namespace, device: str, baseline_thp: Optional[str] = None) -> str:
    """The results' file name without --name; baseline_thp: that of another run than `args`."""
    name = device.split(":")[0]
    if args.quick:
        name += "_quick"
    if args.dtype != "float32":
        name += f"_{args.dtype}"
    if args.ops or args.sizes or args.models or args.no_compile or args.no_memory:
        name += "_custom"
    if (baseline_thp or args.baseline_thp) == "off":
        name += "_nothp"
    return name


def cli(argv: Optional[Sequence[str]] = None, *, doc: str = "", prog: str = "benchmarks/run.py",
        fixed: Sequence[str] = ()) -> int:
    """Run the suite; bad input ends in one message and exit status 2, never a traceback.
    `fixed`: options placed before the user's (the per-family scripts' --ops)."""
    argv = list(fixed) + list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv, doc, prog)
        thp_record = thp.apply(args.baseline_thp)  # before torch loads, here and in every process started later
        from . import main  # noqa: PLC0415 (imports torch)

        return main.main(args, argv, thp_record)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
