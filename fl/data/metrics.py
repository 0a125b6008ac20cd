"""Task metrics, written out (no extra dependency): Matthews correlation, accuracy, binary F1,
exact match of the final number, Rouge-L (LCS F-measure) and yes/no/maybe accuracy; a custom task's metric
by name (``CUSTOM_METRICS``)."""

from __future__ import annotations

import math
import re
from collections import Counter

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"\w+")


def accuracy(preds: list, labels: list) -> float:
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"preds and labels must be non-empty and of equal length, got {len(preds)} and {len(labels)}")
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def matthews_corrcoef(preds: list[int], labels: list[int]) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K); 0 when either marginal is constant."""
    accuracy(preds, labels)  # length checks
    n = len(labels)
    correct = sum(p == y for p, y in zip(preds, labels))
    p_count, t_count = Counter(preds), Counter(labels)
    classes = set(p_count) | set(t_count)
    cov_pt = correct * n - sum(p_count[c] * t_count[c] for c in classes)
    cov_pp = n * n - sum(v * v for v in p_count.values())
    cov_tt = n * n - sum(v * v for v in t_count.values())
    return 0.0 if cov_pp == 0 or cov_tt == 0 else cov_pt / math.sqrt(cov_pp * cov_tt)


def f1_binary(preds: list[int], labels: list[int], positive: int = 1) -> float:
    accuracy(preds, labels)
    tp = sum(p == positive and y == positive for p, y in zip(preds, labels))
    fp = sum(p == positive and y != positive for p, y in zip(preds, labels))
    fn = sum(p != positive and y == positive for p, y in zip(preds, labels))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def final_number(text: str) -> str | None:
    """The number an answer gives: the first after ``####`` / ``The answer is`` if present, else the last.

    Commas go and integral values lose their decimals, so ``1,000.00`` and ``1000`` compare equal.
    """
    tail = None
    for marker in ("####", "The answer is"):
        if marker in text:
            tail = text.split(marker, 1)[1]
            break
    found = _NUMBER.findall(text if tail is None else tail)
    if not found:
        return None
    value = float((found[0] if tail is not None else found[-1]).replace(",", ""))
    return str(int(value)) if value.is_integer() else str(value)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of token lists (O(len a · len b), one row of memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            cur = row[j]
            row[j] = prev + 1 if x == y else max(row[j], row[j - 1])
            prev = cur
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure on lower-cased word tokens (β = 1)."""
    pred, ref = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_decision(text: str, choices=("yes", "no", "maybe")) -> str | None:
    """The first of ``choices`` that appears as a word in ``text`` (case-insensitive)."""
    for word in _WORD.findall(text.lower()):
        if word in choices:
            return word
    return None


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:
    if len(predictions) != len(references) or not references:
        raise ValueError("predictions and references must be non-empty and of equal length")
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(references)


def exact_match(predictions: list[str], references: list[str]) -> float:
    """The share of predictions equal to their reference, leading and trailing spaces aside."""
    return accuracy([p.strip() for p in predictions], [r.strip() for r in references])


#: The metrics a task of the user's own files may choose (``task.metric``), by name.
CUSTOM_METRICS = {
    "accuracy": accuracy,
    "f1": f1_binary,  # of class id 1, the second label
    "matthews": matthews_corrcoef,
    "rouge_l": mean_rouge_l,
    "exact_match": exact_match,
}


def score(task: str, predictions: list, references: list, metric: str | None = None) -> dict[str, float]:
    """All metrics of ``task`` for model outputs (class ids or generated strings) against references; a task
    of the user's own files (``"custom"``) is scored by its ``metric`` (and accuracy, for classification)."""
    if task == "custom":
        if metric not in CUSTOM_METRICS:
            raise ValueError(
                f"a custom task is scored by its metric (TaskSpec.metric), one of {', '.join(CUSTOM_METRICS)}; got {metric!r}"
            )
        out = {metric: CUSTOM_METRICS[metric](predictions, references)}
        if metric in ("f1", "matthews"):
            out["accuracy"] = accuracy(predictions, references)
        return out
    if task == "cola":
        return {"matthews": matthews_corrcoef(predictions, references), "accuracy": accuracy(predictions, references)}
    if task in ("sst2", "rte", "dolly_category"):
        return {"accuracy": accuracy(predictions, references)}
    if task == "mrpc":
        return {"f1": f1_binary(predictions, references), "accuracy": accuracy(predictions, references)}
    if task == "gsm8k":
        return {"exact_match": accuracy([final_number(p) for p in predictions], references)}
    if task == "dolly":
        return {"rouge_l": mean_rouge_l(predictions, references)}
    if task == "pubmedqa":
        return {"accuracy": accuracy([first_decision(p) for p in predictions], references)}
    raise KeyError(f"unknown task {task!r}")
