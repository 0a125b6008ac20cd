"""Tasks, their data (local directory or Hugging Face Hub; the user's own files), tokenisation and metrics."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .custom import custom_examples, custom_task
from .metrics import score
from .partition import split_off
from .sources import DATA_DIR_ENV, SPLITS, DataError, hub_rows, local_rows
from .tasks import CUSTOM, TASKS, TaskSpec, get_task


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


def task_from_config(config) -> TaskSpec:
    """The task of a run's config (or of its ``[task]`` section): a built-in task by name (its headline metric
    ``task.metric`` when set, one of the task's), or for ``name = "custom"`` the spec of the user's files
    (``fl.data.custom``: kind, metric, the train file's label set)."""
    section = getattr(config, "task", config)
    if section.name == CUSTOM:
        return custom_task(section)
    spec = get_task(section.name)
    return replace(spec, metric=section.metric) if section.metric is not None else spec


def task_examples(section, task: TaskSpec, split: str) -> list[dict]:
    """The examples of a run's task (``task_from_config(section)``) and ``split`` ("train" or "eval"): a
    built-in task's from ``section.data_dir`` (``load_examples``), a custom task's from its files."""
    if task.name == CUSTOM:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return custom_examples(section, task, split)
    return load_examples(task.name, split, section.data_dir)


__all__ = [
    "CUSTOM",
    "DATA_DIR_ENV",
    "TASKS",
    "DataError",
    "TaskSpec",
    "get_task",
    "load_examples",
    "resolve_data_dir",
    "score",
    "split_off",
    "task_examples",
    "task_from_config",
]
