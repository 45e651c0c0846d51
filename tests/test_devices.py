"""The every-device harness itself (tests/devices.py, conftest.py).

The CUDA case of an every_device test makes CUDA torch's default device. Two things that pass on
the CPU would fail there, and a machine without a GPU never runs that case, so they are checked
here in the source of every such module:
* a seeded draw (`generator=`) that does not name its device: a CPU generator drawing onto the
  default device raises on CUDA ("Expected a 'cuda' device type for generator");
* an autocast on a device named "cpu": it would leave the CUDA case's ops unautocast.
And TORCH_EXT_TEST_SHARD (conftest.py): its shards split the tests between them.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _every_device_modules():
    modules = []
    for name in sorted(os.listdir(TESTS_DIR)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(TESTS_DIR, name)) as f:
                source = f.read()
            if "\npytestmark = pytest.mark.every_device\n" in source:
                modules.append((name, source))
    return modules


EVERY_DEVICE_MODULES = _every_device_modules()


def test_the_op_family_files_run_on_every_device():
    names = {name for name, _ in EVERY_DEVICE_MODULES}
    families = ("cross_entropy", "linear_act", "mlp", "regression_loss", "triplet_margin_loss", "linear_cross_entropy")
    assert {f"test_{f}.py" for f in families} <= names, sorted(names)


def _calls(source: str):
    return [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)]


@pytest.mark.parametrize("name,source", EVERY_DEVICE_MODULES, ids=[n for n, _ in EVERY_DEVICE_MODULES])
def test_seeded_draws_name_their_device(name, source):
    bad = [
        f"line {call.lineno}: {ast.unparse(call)[:100]}"
        for call in _calls(source)
        if {"generator"} <= {k.arg for k in call.keywords} and "device" not in {k.arg for k in call.keywords}
    ]
    assert not bad, f"{name}: draw on the CPU (device='cpu'), then move to the test's device:\n" + "\n".join(bad)


def _names_cpu(call: ast.Call) -> bool:
    values = [*call.args, *[k.value for k in call.keywords]]
    return any(isinstance(a, ast.Constant) and a.value == "cpu" for a in values)


@pytest.mark.parametrize("name,source", EVERY_DEVICE_MODULES, ids=[n for n, _ in EVERY_DEVICE_MODULES])
def test_autocast_follows_the_tests_device(name, source):
    bad = [
        f"line {call.lineno}: {ast.unparse(call)[:100]}"
        for call in _calls(source)
        if ast.unparse(call.func).endswith("autocast") and _names_cpu(call)
    ]
    assert not bad, f"{name}: use utils.default_device_type():\n" + "\n".join(bad)


def _collected(env_shard=None):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXT_TEST_SHARD"}
    if env_shard is not None:
        env["TORCH_EXT_TEST_SHARD"] = env_shard
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
         os.path.join(TESTS_DIR, "test_num_items_in_batch.py")],
        capture_output=True, text=True, env=env, cwd=os.path.dirname(TESTS_DIR), timeout=300,
    )
    return proc.returncode, {line for line in proc.stdout.splitlines() if "::" in line}, proc.stdout + proc.stderr


def test_shards_split_the_suite_between_them():
    rc, every, out = _collected()
    assert rc == 0 and len(every) > 100, out
    shards = []
    for k in range(3):
        rc, ids, out = _collected(f"{k}/3")
        assert rc == 0 and 0 < len(ids) < len(every), out
        shards.append(ids)
    assert set().union(*shards) == every
    assert sum(len(s) for s in shards) == len(every)  # no test in two shards
    rc, _, out = _collected("3/3")
    assert rc != 0 and "TORCH_EXT_TEST_SHARD must be k/n" in out, out
