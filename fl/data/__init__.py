"""Tasks, their data (local directory or Hugging Face Hub), tokenisation and metrics."""

from __future__ import annotations

import os
from pathlib import Path

from .metrics import score
from .sources import DATA_DIR_ENV, SPLITS, DataError, hub_rows, local_rows
from .tasks import TASKS, TaskSpec, get_task


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """``data_dir``, else ``$FED_PLORA_DATA``, else None (read the Hub)."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen) if chosen else None


def load_examples(task: str, split: str, data_dir: str | Path | None = None) -> list[dict]:
    """Examples of ``task``/``split`` ("train" or "eval"): local when a data dir is given or set in
    ``$FED_PLORA_DATA``, else from the Hugging Face Hub."""
    spec = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = resolve_data_dir(data_dir)
    rows = local_rows(task, split, root) if root is not None else hub_rows(task, split)
    if not rows:
        raise DataError(f"task {task!r}: no {split} examples in {root or 'the Hub dataset'}")
    return [spec.to_example(r) for r in rows]


__all__ = ["DATA_DIR_ENV", "TASKS", "DataError", "TaskSpec", "get_task", "load_examples", "resolve_data_dir", "score"]
