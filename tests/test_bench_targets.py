"""``bench/targets.py``: every target is read by a benchmark, and each benchmark prints the table's limit."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("fold", "gpu_suite")


def table(monkeypatch) -> dict:
    monkeypatch.syspath_prepend(str(REPO_ROOT))  # bench/ is not installed
    targets = importlib.import_module("bench.targets")
    return {name: value for name, value in vars(targets).items() if isinstance(value, targets.Target)}


def test_every_target_is_read_by_a_benchmark(monkeypatch):
    read = set()
    for module in BENCHMARKS:
        tree = ast.parse((REPO_ROOT / "bench" / f"{module}.py").read_text())
        read |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    entries = table(monkeypatch)
    assert sorted(set(entries) - read) == []
    assert len({t.name for t in entries.values()}) == len(entries)  # a printed name says which target it is


def test_fold_summary_prints_the_table_limits(monkeypatch):
    entries = table(monkeypatch)
    fold = importlib.import_module("bench.fold")
    for name in ("FOLD_BANDWIDTH", "NF4_FOLD_GAIN", "NF4_FORWARD"):
        monkeypatch.setattr(fold, name, dataclasses.replace(entries[name], limit=7.25))
    folds = [{"N": 8, "K": 16, "fold/copy_bandwidth": 0.5, "peft_merge/fold_nf4": 2.0}]
    forwards = [{"M": 4096, "K": 16, "N": 8, "nf4_temporary/bf16": 1.5, "nf4_fused/bf16": None}]
    lines = fold.targets(folds, forwards)
    assert [line.rsplit("(target ", 1)[1] for line in lines] == [">= 7.25)", ">= 7.25)", "<= 7.25 at M = 4096)"]
