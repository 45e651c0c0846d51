"""summary.txt of scripts/gpu_check.sh: one screen with the result and time of each step, the
tests' counts and the headline benchmark figures, from what the steps have left so far (so it is
rewritten after every step, and a run cut short still says what it did).

    python scripts/gpu_check_summary.py --mode run --work WORK --out OUT > OUT/summary.txt

WORK: steps.tsv (name, result, seconds, note per line), environment.log, tests.log, tests.xml,
bench_compile/*.json; OUT: cuda_goals_eager.json. Standard library only.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import xml.etree.ElementTree as ET


def read_steps(work):
    steps = []
    try:
        with open(os.path.join(work, "steps.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                steps.append((parts + ["", "", "", ""])[:4])
    except FileNotFoundError:
        pass
    return steps


def test_counts(work):
    """'N passed, M failed, ...' from the JUnit XML, else pytest's last line in tests.log."""
    try:
        root = ET.parse(os.path.join(work, "tests.xml")).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        text = f"{total - failures - errors - skipped} passed, {failures} failed, {errors} errors, {skipped} skipped"
        failed = [f"{case.get('name')}" for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        return text, failed
    except (FileNotFoundError, ET.ParseError, AttributeError):
        pass
    try:
        with open(os.path.join(work, "tests.log")) as f:
            lines = [line.strip() for line in f if line.strip()]
        last = next((line for line in reversed(lines) if re.search(r"\b(passed|failed|collected|error)", line)), "")
        return last.strip("= "), []
    except FileNotFoundError:
        return "", []


def records(path):
    try:
        with open(path) as f:
            return json.load(f).get("results", [])
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def fmt_ratio(value):
    return f"x{value:.2f}" if isinstance(value, (int, float)) else "-"


def headline(eager, compiled):
    """One line per case: ours' fwd+bwd time, the speed-ups, share of the floor, memory, check."""
    by_case = {(r["op"], r.get("case")): r for r in eager}
    compile_by_case = {(r["op"], r.get("case")): r for r in compiled}
    lines = []
    for key in list(by_case) + [k for k in compile_by_case if k not in by_case]:
        r = by_case.get(key) or compile_by_case[key]
        c = compile_by_case.get(key, {})
        name = f"{key[0]} {key[1] or ''}"[:46]
        if "error" in r:
            lines.append(f"  {name:46s} ERROR {r['error'][:60]}")
            continue
        ours = r.get("time_ms", {}).get("ours", {}).get("fwd+bwd", {}).get("median")
        vs_eager = r.get("speedup", {}).get("vs_eager", {}).get("fwd+bwd")
        vs_compile = c.get("speedup", {}).get("vs_compile", {}).get("fwd+bwd") if "error" not in c else None
        floor = r.get("floor_fraction", {}).get("fwd+bwd")
        peak = r.get("peak_bytes", {})
        mem = peak["ours"] / peak["eager"] if peak.get("ours") and peak.get("eager") else None
        check = r.get("check", "?") if not c else f"{r.get('check', '?')}/{c.get('check', '?')}"
        lines.append(
            f"  {name:46s} {ours if ours is not None else float('nan'):8.3f} {fmt_ratio(vs_eager):>7s} "
            f"{fmt_ratio(vs_compile):>7s} {floor if floor is not None else float('nan'):6.2f} "
            f"{mem if mem is not None else float('nan'):6.2f} {check}"
        )
    return lines


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="run")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    steps = read_steps(args.work)
    out = [f"torch_ext GPU check ({args.mode})"]
    try:
        with open(os.path.join(args.work, "environment.log")) as f:
            env = [line.rstrip() for line in f]
        out += [line for line in env if line.startswith(("mode:", "torch ", "cores:"))]
        gpu = next((line for line in env if "H200" in line or "NVIDIA" in line and "MiB" in line), None)
        if gpu:
            out.append("gpu: " + " ".join(gpu.strip("| ").split())[:90])
    except FileNotFoundError:
        pass
    out += ["", f"{'step':28s} {'result':20s} {'time':>6s}  note"]
    failed = incomplete = False
    for name, result, seconds, note in steps:
        out.append(f"{name:28s} {result:20s} {seconds:>5s}s  {note}")
        failed |= result.startswith(("FAILED", "timed out")) or name == "interrupted"
        incomplete |= result.startswith("cut") or (result == "skipped" and "deadline" in note)
    counts, failed_tests = test_counts(args.work)
    if counts:
        out += ["", f"tests: {counts}"]
        out += [f"  failed: {name}" for name in failed_tests[:8]]
        if len(failed_tests) > 8:
            out.append(f"  ... and {len(failed_tests) - 8} more (logs.tar.gz: tests.log)")
    eager = records(os.path.join(args.out, "cuda_goals_eager.json"))
    compiled = [r for path in sorted(glob.glob(os.path.join(args.work, "bench_compile", "*.json")))
                for r in records(path)]
    if eager or compiled:
        out += ["", "bfloat16 goals, fwd+bwd: ours (ms), speed-up vs eager and vs torch.compile, floor time / ours,",
                "peak memory ours / eager, check against eager (/ in the compile run)"]
        out += headline(eager, compiled)
    verdict = "FAIL" if failed else "INCOMPLETE" if incomplete or not steps else "PASS"
    out += ["", f"result: {verdict}"]
    # This summary and logs.tar.gz are being written as this runs.
    files = {f for f in os.listdir(args.out) if not f.endswith(".tmp")} | {"summary.txt", "logs.tar.gz"}
    out.append(f"files: {' '.join(sorted(files))}  (logs.tar.gz: every log and result)")
    print("\n".join(out))


if __name__ == "__main__":
    main()
