"""The eight built-in tasks: what kind each is, how a raw row becomes an example, and which metric scores it
(a task of the user's own files, ``CUSTOM``, is built from the config: ``fl.data.custom``).

An example is a dict. Classification: ``text``, ``text_pair`` (or None), ``label`` (int).
Generation: ``prompt``, ``target`` (what the model learns to continue with), ``reference`` (what the
metric compares against), plus ``label`` (PubMedQA) or ``category`` (Dolly) for partitioning. Dolly's
instructions classified into their eight categories (``dolly_category``) keep ``category`` too, so they can be
partitioned by category as well as by label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .metrics import final_number
from .sources import DOLLY_CATEGORIES, PUBMEDQA_DECISIONS


@dataclass(frozen=True)
class TaskSpec:
    """One task. ``metric``: the headline metric key; ``also``: the other metrics it is scored by, any of which
    a config may make the headline (``task.metric``); ``num_labels``: classes (classification only);
    ``labels``: a custom task's label of each class id (``fl.data.custom``)."""

    name: str
    kind: str  # "classification" | "generation"
    metric: str
    to_example: Callable[[dict], dict]
    num_labels: int | None = None
    max_new_tokens: int = 0
    labels: tuple = ()
    also: tuple = ()


def _single(row: dict) -> dict:
    return {"text": row["sentence"], "text_pair": None, "label": row["label"]}


def _pair(row: dict) -> dict:
    return {"text": row["sentence1"], "text_pair": row["sentence2"], "label": row["label"]}


def _gsm8k(row: dict) -> dict:
    return {
        "prompt": f"Question: {row['question']}\nAnswer:",
        "target": " " + row["answer"].replace("####", "The answer is"),
        "reference": final_number(row["answer"].split("####")[-1]),
    }


def _dolly(row: dict) -> dict:
    context = f"Context: {row['context']}\n" if row["context"] else ""
    return {
        "prompt": f"Instruction: {row['instruction']}\n{context}Response:",
        "target": " " + row["response"],
        "reference": row["response"],
        "category": row["category"],
    }


def _dolly_category(row: dict) -> dict:
    """The instruction, with its context (often empty) as the second segment; the category is the class."""
    return {
        "text": row["instruction"],
        "text_pair": row["context"] or None,
        "label": DOLLY_CATEGORIES.index(row["category"]),
        "category": row["category"],
    }


def _pubmedqa(row: dict) -> dict:
    return {
        "prompt": f"Context: {' '.join(row['contexts'])}\nQuestion: {row['question']}\nAnswer (yes, no or maybe):",
        "target": " " + row["final_decision"],
        "reference": row["final_decision"],
        "label": PUBMEDQA_DECISIONS.index(row["final_decision"]),
    }


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", "classification", "matthews", _single, num_labels=2, also=("accuracy",)),
    "sst2": TaskSpec("sst2", "classification", "accuracy", _single, num_labels=2),
    "mrpc": TaskSpec("mrpc", "classification", "f1", _pair, num_labels=2, also=("accuracy",)),
    "rte": TaskSpec("rte", "classification", "accuracy", _pair, num_labels=2),
    "dolly_category": TaskSpec("dolly_category", "classification", "accuracy", _dolly_category, num_labels=len(DOLLY_CATEGORIES)),
    "gsm8k": TaskSpec("gsm8k", "generation", "exact_match", _gsm8k, max_new_tokens=256),
    "dolly": TaskSpec("dolly", "generation", "rouge_l", _dolly, max_new_tokens=128),
    "pubmedqa": TaskSpec("pubmedqa", "generation", "accuracy", _pubmedqa, max_new_tokens=4),
}

#: ``task.name`` of a task of the user's own files (``fl.data.custom``, its spec built from the config).
CUSTOM = "custom"


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
