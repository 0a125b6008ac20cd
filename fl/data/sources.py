"""Raw rows of each task, from a local directory (the layout of ``shared/data``) or the Hugging Face Hub.

Both sources yield the same normalised rows per task, so everything downstream is source-agnostic:

- cola, sst2: ``{"sentence", "label"}``; mrpc, rte: ``{"sentence1", "sentence2", "label"}`` (int labels,
  as on the Hub: MRPC 1 = equivalent, RTE 0 = entailment);
- gsm8k: ``{"question", "answer"}``; dolly and dolly_category (the same file): ``{"instruction", "context",
  "response", "category"}``, dolly_category's category one of ``DOLLY_CATEGORIES``;
- pubmedqa: ``{"question", "contexts", "final_decision"}``.

Splits are ``"train"`` and ``"eval"`` (GLUE dev, GSM8K test, the official 500 PubMedQA test ids; Dolly
has one file, so every 20th row is held out for eval, in both sources).

Every local file is checked as it is read: an error (``DataError``) names the file, the line (and the
column or field where one applies) and what was expected; a label outside the task's label set is refused
here, not later by a client. Blank lines are an error in a TSV file (a row is never blank) and skipped in a
JSON lines file.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..storage import json_value

SPLITS = ("train", "eval")

#: Environment variable naming the local data directory (the layout of ``shared/data``).
DATA_DIR_ENV = "FED_PLORA_DATA"

_GLUE_FILES = {
    "cola": ("glue/CoLA/in_domain_train.tsv", "glue/CoLA/in_domain_dev.tsv"),
    "sst2": ("glue/SST-2/train.tsv", "glue/SST-2/dev.tsv"),
    "mrpc": ("glue/MRPC/train.tsv", "glue/MRPC/dev.tsv"),
    "rte": ("glue/RTE/train.tsv", "glue/RTE/dev.tsv"),
}
#: Per GLUE task: the header row (None: the file has none) or the columns, then the columns read
#: (label, first sentence, second sentence or None), 0-based.
_GLUE_LAYOUT = {
    "cola": (None, ("source", "label", "original label", "sentence"), (1, 3, None)),
    "sst2": (("sentence", "label"), None, (1, 0, None)),
    "mrpc": (("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), None, (0, 3, 4)),
    "rte": (("index", "sentence1", "sentence2", "label"), None, (3, 1, 2)),
}
_BINARY_LABELS = {"0": 0, "1": 1}
_RTE_LABELS = {"entailment": 0, "not_entailment": 1}
_DOLLY_EVAL_EVERY = 20
PUBMEDQA_DECISIONS = ("yes", "no", "maybe")
#: Dolly's eight instruction categories, the class ids of ``dolly_category`` in this order.
DOLLY_CATEGORIES = (
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
)
_DOLLY_FIELDS = ("instruction", "context", "response", "category")


class DataError(ValueError):
    """A task's data that is not what the task expects; the message names the file (or dataset), the line
    or record, and what was expected."""


def _require(path: Path, task: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"task {task!r}: missing data file {path} (expected the layout of shared/data)")
    return path


def _lines(path: Path, expected: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of every line of a UTF-8 file (a leading BOM, the last newline and ``\r``
    line ends dropped); ``DataError`` for an empty file, bytes that are not UTF-8 and NUL characters."""
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: the file is empty (expected {expected})")
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}, byte {column}: not UTF-8 text (0x{data[error.start]:02x}); expected {expected}"
        ) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    out = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if "\0" in line:
            raise DataError(f"{path}, line {number}: a NUL character (binary data?); expected {expected}")
        out.append((number, line))
    return out


def _glue_rows(task: str, path: Path) -> list[dict]:
    """The normalised rows of a GLUE TSV file (tab-separated, no quoting), every line checked."""
    header, columns, (label_col, first, second) = _GLUE_LAYOUT[task]
    columns = columns or header
    layout = f"{len(columns)} tab-separated columns ({', '.join(columns)})"
    lines = _lines(path, f"a GLUE {task} file of {layout}")
    if header is not None:
        number, line = lines.pop(0)
        if tuple(line.split("\t")) != header:
            raise DataError(f"{path}, line {number} (header): expected the columns {', '.join(header)}, got {line!r}")
    labels = _RTE_LABELS if task == "rte" else _BINARY_LABELS
    rows = []
    for number, line in lines:
        if not line.strip():
            raise DataError(f"{path}, line {number}: a blank line; expected {layout}")
        cells = line.split("\t")
        if len(cells) != len(columns):
            raise DataError(f"{path}, line {number}: expected {layout}, got {len(cells)} column(s)")
        raw = cells[label_col]
        if raw not in labels:
            raise DataError(
                f"{path}, line {number}, column {label_col + 1} ({columns[label_col]}): "
                f"expected a label in {{{', '.join(labels)}}}, got {raw!r}"
            )
        if second is None:
            rows.append({"sentence": cells[first], "label": labels[raw]})
        else:
            rows.append({"sentence1": cells[first], "sentence2": cells[second], "label": labels[raw]})
    if not rows:
        raise DataError(f"{path}: no rows (expected {layout})")
    return rows


def json_lines(path: Path, expected: str, offset: str = "column") -> list[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line of a JSON lines file; ``DataError`` naming the line
    (and the ``offset`` within it: "column", or "character" where columns are a table's fields) of a line that
    is not a JSON object, or for a file with none."""
    objects = []
    for number, line in _lines(path, expected):
        if not line.strip():
            continue
        try:
            row = json_value(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {number}, {offset} {error.colno}: not valid JSON ({error.msg}); expected {expected}"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: a JSON {type(row).__name__}; expected {expected}")
        objects.append((number, row))
    return objects


def _jsonl(path: Path, fields: tuple[str, ...], choices: dict[str, tuple[str, ...]] | None = None) -> list[dict]:
    """The rows of a JSON lines file, each an object with the string ``fields`` (others ignored); a field
    named in ``choices`` must hold one of its values."""
    expected = f"one JSON object per line with the string fields {', '.join(fields)}"
    rows = []
    for number, row in json_lines(path, expected):
        for name in fields:
            if not isinstance(row.get(name), str):
                found = "missing" if name not in row else f"{row[name]!r}"
                raise DataError(f"{path}, line {number}, field {name!r}: expected a string, got {found}")
        for name, allowed in (choices or {}).items():
            if row[name] not in allowed:
                raise DataError(f"{path}, line {number}, field {name!r}: expected one of {', '.join(allowed)}, got {row[name]!r}")
        rows.append({name: row[name] for name in fields})
    if not rows:
        raise DataError(f"{path}: no rows (expected {expected})")
    return rows


def _json(path: Path, expected: str):
    lines = _lines(path, expected)  # empty, binary and NUL checks, with lines
    try:
        return json_value("\n".join(line for _, line in lines))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg}); expected {expected}"
        ) from None


def _pubmedqa_rows(root: Path, split: str) -> list[dict]:
    """PubMedQA's labelled set (``ori_pqal.json``: id -> record) split by the official test ids."""
    path = _require(root / "pubmedqa" / "ori_pqal.json", "pubmedqa")
    expected = "a JSON object of PubMedQA records by id (QUESTION, CONTEXTS, final_decision)"
    records = _json(path, expected)
    if not isinstance(records, dict) or not records:
        raise DataError(f"{path}: expected {expected}, got {type(records).__name__}")
    truth = _require(root / "pubmedqa" / "test_ground_truth.json", "pubmedqa")
    ids = _json(truth, "a JSON object of decisions by test id, or a list of test ids")
    if not isinstance(ids, (dict, list)) or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{truth}: expected a JSON object of decisions by test id, or a list of test ids (strings)")
    test_ids = set(ids)
    rows = []
    for pid, r in records.items():
        if (pid in test_ids) != (split == "eval"):
            continue
        where = f"{path}, record {pid!r}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected an object (QUESTION, CONTEXTS, final_decision), got {type(r).__name__}")
        if not isinstance(r.get("QUESTION"), str):
            raise DataError(f"{where}, field 'QUESTION': expected a string, got {r.get('QUESTION', 'nothing')!r}")
        contexts = r.get("CONTEXTS")
        if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
            raise DataError(f"{where}, field 'CONTEXTS': expected a list of strings, got {contexts!r:.80}")
        if r.get("final_decision") not in PUBMEDQA_DECISIONS:
            found = r.get("final_decision", "nothing")
            raise DataError(f"{where}, field 'final_decision': expected one of {', '.join(PUBMEDQA_DECISIONS)}, got {found!r}")
        rows.append({"question": r["QUESTION"], "contexts": list(contexts), "final_decision": r["final_decision"]})
    if not rows:
        raise DataError(f"{path}: no {split} records (test ids from {truth})")
    return rows


def _dolly_split(rows: list[dict], split: str) -> list[dict]:
    keep_eval = split == "eval"
    return [r for i, r in enumerate(rows) if (i % _DOLLY_EVAL_EVERY == 0) == keep_eval]


def local_rows(task: str, split: str, data_dir: str | Path) -> list[dict]:
    """Normalised rows of ``task``/``split`` read from ``data_dir``, every line checked (``DataError``)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} is not a directory (task {task!r})")
    if task in _GLUE_FILES:
        return _glue_rows(task, _require(root / _GLUE_FILES[task][SPLITS.index(split)], task))
    if task == "gsm8k":
        name = "train.jsonl" if split == "train" else "test.jsonl"
        return _jsonl(_require(root / "gsm8k" / name, task), ("question", "answer"))
    if task in ("dolly", "dolly_category"):
        choices = {"category": DOLLY_CATEGORIES} if task == "dolly_category" else None
        rows = _jsonl(_require(root / "dolly" / "databricks-dolly-15k.jsonl", task), _DOLLY_FIELDS, choices)
        return _dolly_split(rows, split)
    if task == "pubmedqa":
        return _pubmedqa_rows(root, split)
    raise KeyError(f"unknown task {task!r}")


_HUB = {
    "cola": ("nyu-mll/glue", "cola"),
    "sst2": ("nyu-mll/glue", "sst2"),
    "mrpc": ("nyu-mll/glue", "mrpc"),
    "rte": ("nyu-mll/glue", "rte"),
    "gsm8k": ("openai/gsm8k", "main"),
    "dolly": ("databricks/databricks-dolly-15k", None),
    "dolly_category": ("databricks/databricks-dolly-15k", None),
    "pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled"),
}


def hub_rows(task: str, split: str) -> list[dict]:
    """Normalised rows of ``task``/``split`` from the Hugging Face Hub (needs network or the HF cache); a
    Hub that cannot be reached raises ``DataError`` pointing to ``--data-dir`` / ``$FED_PLORA_DATA``.

    PubMedQA's official test ids are not on the Hub: there every other row (by pubid order) is eval.
    """
    if task not in _HUB:
        raise KeyError(f"unknown task {task!r}")
    path, config = _HUB[task]
    if task in _GLUE_FILES:
        hub_split = "train" if split == "train" else "validation"
        keys = ("sentence",) if task in ("cola", "sst2") else ("sentence1", "sentence2")
        rows = [{**{k: r[k] for k in keys}, "label": r["label"]} for r in _hub_load(task, path, config, hub_split)]
        for i, row in enumerate(rows):
            if row["label"] not in (0, 1) or isinstance(row["label"], bool):
                raise DataError(
                    f"Hub dataset {path} ({config}, {hub_split}), row {i}: expected a label in {{0, 1}}, got {row['label']!r}"
                )
        return rows
    if task == "gsm8k":
        ds = _hub_load(task, path, config, "train" if split == "train" else "test")
        return [{"question": r["question"], "answer": r["answer"]} for r in ds]
    if task in ("dolly", "dolly_category"):
        rows = [{k: r[k] for k in _DOLLY_FIELDS} for r in _hub_load(task, path, config, "train")]
        unknown = (i for i, row in enumerate(rows) if row["category"] not in DOLLY_CATEGORIES)
        if task == "dolly_category" and (i := next(unknown, None)) is not None:
            raise DataError(
                f"Hub dataset {path}, row {i}: category {rows[i]['category']!r}, expected one of {', '.join(DOLLY_CATEGORIES)}"
            )
        return _dolly_split(rows, split)
    ds = sorted(_hub_load(task, path, config, "train"), key=lambda r: int(r["pubid"]))
    rows = [
        {"question": r["question"], "contexts": list(r["context"]["contexts"]), "final_decision": r["final_decision"]}
        for i, r in enumerate(ds)
        if (i % 2 == 1) == (split == "eval")
    ]
    for row in rows:
        if row["final_decision"] not in PUBMEDQA_DECISIONS:
            raise DataError(f"Hub dataset {path} ({config}): final_decision {row['final_decision']!r}, expected yes, no or maybe")
    return rows


def _hub_load(task: str, path: str, config: str | None, split: str):
    """``datasets.load_dataset``; any failure (no network, offline mode, no cache) as a ``DataError`` that
    says how to read local files instead."""
    try:
        import datasets

        return datasets.load_dataset(path, config, split=split) if config else datasets.load_dataset(path, split=split)
    except Exception as error:
        raise DataError(
            f"task {task!r}: cannot read the Hugging Face Hub dataset {path} ({type(error).__name__}: {error}). "
            f"To read local files instead, pass --data-dir DIR or set ${DATA_DIR_ENV} "
            "(task.data_dir in a config; the layout of shared/data)"
        ) from error
