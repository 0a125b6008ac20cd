"""``bench/gpu_suite.py``, the one-shot GPU script, in its smoke mode (tiny shapes through the Triton
interpreter on the CPU), so that it cannot rot between GPU runs."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_dispatches_every_part(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))  # bench/ is not installed
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    env.pop("OUT", None)
    out, no_data = tmp_path / "out", tmp_path / "no-data"
    command = [sys.executable, "-m", "bench.gpu_suite", "--smoke", "--out", str(out), "--fl-data", str(no_data)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((out / "gpu_suite.json").read_text())
    parts = report["parts"]
    assert {key: part["status"] for key, part in parts.items()} == {
        "a": "ok", "b": "ok", "c": "ok", "d": "ok", "e": "ok", "f": "skipped",
    }  # fmt: skip
    assert str(no_data) in parts["f"]["reason"]  # the FL run needs task files: a recorded skip, not an error
    tests = parts["a"]["kernel_tests"]
    assert tests["passed_all"] and tests["tests"] >= 1 and not tests["failed"]
    assert set(parts["a"]["sync_free_steps"]) >= {"plora_stack", "plora_llama"}
    for key in "bcde":
        assert parts[key]["rows"] and parts[key]["targets"], key
        assert all(t["value"] is not None for t in parts[key]["targets"] if "memory" not in t["name"]), key
    assert parts["b"]["rows"][0]["grad_rel_error_unsloth_vs_fused"] < 1e-5  # fp32 in the smoke run
    assert parts["d"]["rows"][0]["rel_error_fused_vs_temporary"] < 1e-2
    log = (out / "gpu_suite.log").read_text()
    assert "=== part f: skipped" in log and "(smoke)" in log
    targets = importlib.import_module("bench.targets")
    table = {t.name: t for t in vars(targets).values() if isinstance(t, targets.Target)}
    for key in "bcde":
        for t in parts[key]["targets"]:  # each limit is the table's, and the closing table prints it
            assert t["target"] == table[t["name"]].text(t["bound"]), t
            assert f"{t['name']:<40} {t['where']:<32}" in log and f"target {t['target']:<7} (smoke)" in log


def test_a_failing_part_is_recorded_and_the_next_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))  # bench/ is not installed
    gpu_suite = importlib.import_module("bench.gpu_suite")

    def broken(plan, args):
        raise ValueError("broken on purpose")

    def unavailable(plan, args):
        raise gpu_suite.Skip("needs something absent")

    monkeypatch.setitem(gpu_suite.PARTS, "b", broken)
    monkeypatch.setitem(gpu_suite.PARTS, "c", unavailable)
    failed = gpu_suite.run_part("b", gpu_suite.SMOKE_PLAN, None)
    assert failed["status"] == "error" and "ValueError: broken on purpose" in failed["error"]
    skipped = gpu_suite.run_part("c", gpu_suite.SMOKE_PLAN, None)
    assert skipped == {"status": "skipped", "reason": "needs something absent", "seconds": skipped["seconds"]}
