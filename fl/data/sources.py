"""Raw rows of each task, from a local directory (the layout of ``shared/data``) or the Hugging Face Hub.

Both sources yield the same normalised rows per task, so everything downstream is source-agnostic:

- cola, sst2: ``{"sentence", "label"}``; mrpc, rte: ``{"sentence1", "sentence2", "label"}`` (int labels,
  as on the Hub: MRPC 1 = equivalent, RTE 0 = entailment);
- gsm8k: ``{"question", "answer"}``; dolly: ``{"instruction", "context", "response", "category"}``;
- pubmedqa: ``{"question", "contexts", "final_decision"}``.

Splits are ``"train"`` and ``"eval"`` (GLUE dev, GSM8K test, the official 500 PubMedQA test ids; Dolly
has one file, so every 20th row is held out for eval, in both sources).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

SPLITS = ("train", "eval")

_GLUE_FILES = {
    "cola": ("glue/CoLA/in_domain_train.tsv", "glue/CoLA/in_domain_dev.tsv"),
    "sst2": ("glue/SST-2/train.tsv", "glue/SST-2/dev.tsv"),
    "mrpc": ("glue/MRPC/train.tsv", "glue/MRPC/dev.tsv"),
    "rte": ("glue/RTE/train.tsv", "glue/RTE/dev.tsv"),
}
_RTE_LABELS = {"entailment": 0, "not_entailment": 1}
_DOLLY_EVAL_EVERY = 20
PUBMEDQA_DECISIONS = ("yes", "no", "maybe")


def _require(path: Path, task: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"task {task!r}: missing data file {path} (expected the layout of shared/data)")
    return path


def _tsv(path: Path, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dolly_split(rows: list[dict], split: str) -> list[dict]:
    keep_eval = split == "eval"
    return [r for i, r in enumerate(rows) if (i % _DOLLY_EVAL_EVERY == 0) == keep_eval]


def local_rows(task: str, split: str, data_dir: str | Path) -> list[dict]:
    """Normalised rows of ``task``/``split`` read from ``data_dir``."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} is not a directory (task {task!r})")
    if task in _GLUE_FILES:
        path = _require(root / _GLUE_FILES[task][SPLITS.index(split)], task)
        if task == "cola":
            return [{"sentence": r[3], "label": int(r[1])} for r in _tsv(path, header=False)]
        if task == "sst2":
            return [{"sentence": r[0], "label": int(r[1])} for r in _tsv(path, header=True)]
        if task == "mrpc":
            return [{"sentence1": r[3], "sentence2": r[4], "label": int(r[0])} for r in _tsv(path, header=True)]
        return [{"sentence1": r[1], "sentence2": r[2], "label": _RTE_LABELS[r[3]]} for r in _tsv(path, header=True)]
    if task == "gsm8k":
        name = "train.jsonl" if split == "train" else "test.jsonl"
        return [{"question": r["question"], "answer": r["answer"]} for r in _jsonl(_require(root / "gsm8k" / name, task))]
    if task == "dolly":
        rows = _jsonl(_require(root / "dolly" / "databricks-dolly-15k.jsonl", task))
        return _dolly_split([{k: r[k] for k in ("instruction", "context", "response", "category")} for r in rows], split)
    if task == "pubmedqa":
        with open(_require(root / "pubmedqa" / "ori_pqal.json", task), encoding="utf-8") as f:
            records = json.load(f)
        with open(_require(root / "pubmedqa" / "test_ground_truth.json", task), encoding="utf-8") as f:
            test_ids = set(json.load(f))
        return [
            {"question": r["QUESTION"], "contexts": list(r["CONTEXTS"]), "final_decision": r["final_decision"]}
            for pid, r in records.items()
            if (pid in test_ids) == (split == "eval")
        ]
    raise KeyError(f"unknown task {task!r}")


_HUB = {
    "cola": ("nyu-mll/glue", "cola"),
    "sst2": ("nyu-mll/glue", "sst2"),
    "mrpc": ("nyu-mll/glue", "mrpc"),
    "rte": ("nyu-mll/glue", "rte"),
    "gsm8k": ("openai/gsm8k", "main"),
    "dolly": ("databricks/databricks-dolly-15k", None),
    "pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled"),
}


def hub_rows(task: str, split: str) -> list[dict]:
    """Normalised rows of ``task``/``split`` from the Hugging Face Hub (needs network or the HF cache).

    PubMedQA's official test ids are not on the Hub: there every other row (by pubid order) is eval.
    """
    import datasets

    if task not in _HUB:
        raise KeyError(f"unknown task {task!r}")
    path, config = _HUB[task]
    if task in _GLUE_FILES:
        ds = datasets.load_dataset(path, config, split="train" if split == "train" else "validation")
        keys = ("sentence",) if task in ("cola", "sst2") else ("sentence1", "sentence2")
        return [{**{k: r[k] for k in keys}, "label": int(r["label"])} for r in ds]
    if task == "gsm8k":
        ds = datasets.load_dataset(path, config, split="train" if split == "train" else "test")
        return [{"question": r["question"], "answer": r["answer"]} for r in ds]
    if task == "dolly":
        ds = datasets.load_dataset(path, split="train")
        return _dolly_split([{k: r[k] for k in ("instruction", "context", "response", "category")} for r in ds], split)
    ds = sorted(datasets.load_dataset(path, config, split="train"), key=lambda r: int(r["pubid"]))
    return [
        {"question": r["question"], "contexts": list(r["context"]["contexts"]), "final_decision": r["final_decision"]}
        for i, r in enumerate(ds)
        if (i % 2 == 1) == (split == "eval")
    ]
