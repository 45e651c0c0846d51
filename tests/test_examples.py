"""Smoke test of examples/: each script runs a few steps as a subprocess (as a user would run it),
prints finite losses and a summary, and writes its --plot PNG."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ["cnn_classifier.py", "lstm_language_model.py", "transformer_classifier.py", "triplet_metric_learning.py"]
STEPS = 3
LOSS_LINE = re.compile(r"^step\s+(\d+)\s+loss\s+(\S+)$", re.MULTILINE)


def test_every_example_is_tested():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
    assert scripts == sorted(SCRIPTS + ["hf_causal_lm.py"])


@pytest.mark.parametrize("script", SCRIPTS + ["hf_causal_lm.py"])
def test_example_runs(script, tmp_path):
    png = tmp_path / "curve.png"
    cmd = [sys.executable, str(EXAMPLES / script), "--steps", str(STEPS), "--log-every", "1",
           "--batch-size", "16", "--threads", "1", "--plot", str(png)]
    if script == "hf_causal_lm.py":
        pytest.importorskip("transformers", reason="the example trains a transformers Llama")
        cmd[cmd.index("16")] = "2"
        cmd += ["--seq-len", "32", "--vocab", "500"]
    # Run from tmp_path: nothing a script might write lands in the checkout.
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"

    losses = [(int(step), float(loss)) for step, loss in LOSS_LINE.findall(proc.stdout)]
    assert [step for step, _ in losses] == list(range(1, STEPS + 1)), proc.stdout
    assert all(math.isfinite(loss) for _, loss in losses), proc.stdout
    assert re.search(rf"^done: {STEPS} steps in [\d.]+ s", proc.stdout, re.MULTILINE), proc.stdout

    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
