"""A task of the user's own files (``[task] name = "custom"``): classification or generation examples read
from CSV, TSV, JSON (an array of objects) or JSON lines files by named columns.

- Classification: ``text_column``, optional ``text_pair_column``, ``label_column``. A label is an integer
  or a string (a string of digits, as every CSV cell is, reads as its integer); the label set is the sorted
  set of the train file's labels (integers first, by value, then strings); class id = position in it.
- Generation: ``prompt_column`` and ``target_column``; the model learns to continue the prompt with the
  target (joined as written) and is scored against it.
- ``eval_file`` unset: a seeded ``eval_fraction`` of the train file is the eval split, the same rows for
  every run seed (``split_off``).

Every file is read with the standard library and checked as it is read: an error (``DataError``) names the
file, where in it (CSV/TSV: the line where the row starts, the header being line 1; JSON lines: the line;
a JSON array: the record, from 1), the column and what was expected. Blank lines are skipped.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from .partition import split_off
from .sources import DataError, _json, _lines, json_lines
from .tasks import CUSTOM, TaskSpec

#: File type by extension: the delimiter of a delimited file, or "json" / "jsonl".
FORMATS = {".csv": ",", ".tsv": "\t", ".json": "json", ".jsonl": "jsonl"}
#: The metrics of each kind; the first is the default.
METRICS = {"classification": ("accuracy", "f1", "matthews"), "generation": ("rouge_l", "exact_match")}
#: ``max_new_tokens`` of a generation task unless ``task.max_new_tokens`` says otherwise.
MAX_NEW_TOKENS = 64
#: The seed of the eval split carved from the train file (not the run seed: every run is scored on the same rows).
EVAL_SEED = (0, 15)
_INTEGER = re.compile(r"[+-]?\d+")


def custom_task(section) -> TaskSpec:
    """The ``TaskSpec`` of ``[task]`` ``section`` (``name = "custom"``); classification reads the train file for
    its label set (at least 2 labels)."""
    kind, metric = section.kind, section.metric or METRICS[section.kind][0]
    if kind == "generation":
        return TaskSpec(CUSTOM, kind, metric, dict, max_new_tokens=MAX_NEW_TOKENS)
    path, column = Path(section.train_file), section.label_column
    found = {_label(record[column], where, column) for where, record in _records(path, {column: "task.label_column"})}
    labels = tuple(sorted(found, key=lambda v: (isinstance(v, str), v)))
    if len(labels) < 2:
        raise DataError(
            f"{path}: column {column!r} (task.label_column) holds one label, {labels[0]!r}; a classification task "
            "needs at least 2"
        )
    if metric == "f1" and len(labels) != 2:
        raise DataError(
            f"task.metric = 'f1' (binary F1 of the second label) needs 2 labels; {path} has {len(labels)}: "
            f"{_shown(labels)} (use accuracy or matthews)"
        )
    return TaskSpec(CUSTOM, kind, metric, dict, num_labels=len(labels), labels=labels)


def custom_examples(section, task: TaskSpec, split: str) -> list[dict]:
    """The examples of ``split`` ("train" or "eval"): the train file's (less the eval rows when there is no
    eval file), or the eval file's."""
    if split == "eval" and section.eval_file is not None:
        return _examples(Path(section.eval_file), section, task)
    path = Path(section.train_file)
    examples = _examples(path, section, task)
    if section.eval_file is not None:
        return examples
    count = max(1, round(section.eval_fraction * len(examples)))
    if count >= len(examples):
        raise DataError(
            f"{path}: {len(examples)} example(s), too few to hold out task.eval_fraction = {section.eval_fraction} "
            "as the eval split (set task.eval_file)"
        )
    rest, held = split_off(examples, count, np.random.default_rng(EVAL_SEED))
    return rest if split == "train" else held


def _examples(path: Path, section, task: TaskSpec) -> list[dict]:
    if task.kind == "generation":
        prompt, target = section.prompt_column, section.target_column
        records = _records(path, {prompt: "task.prompt_column", target: "task.target_column"})
        out = []
        for where, record in records:
            text = _text(record, where, target, "task.target_column")
            out.append({"prompt": _text(record, where, prompt, "task.prompt_column"), "target": text, "reference": text})
        return out
    text, pair, label = section.text_column, section.text_pair_column, section.label_column
    columns = {text: "task.text_column", label: "task.label_column"} | ({pair: "task.text_pair_column"} if pair else {})
    ids = {value: i for i, value in enumerate(task.labels)}
    out = []
    for where, record in _records(path, columns):
        value = _label(record[label], where, label)
        if value not in ids:
            raise DataError(
                f"{where}, column {label!r} (task.label_column): label {value!r} is not among the labels of the train file "
                f"{section.train_file} ({_shown(task.labels)})"
            )
        out.append(
            {
                "text": _text(record, where, text, "task.text_column"),
                "text_pair": None if pair is None else _text(record, where, pair, "task.text_pair_column"),
                "label": ids[value],
            }
        )
    return out


def _shown(labels) -> str:
    return ", ".join(repr(v) for v in labels[:10]) + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")


def _found(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty cell" if value == "" else "blank text"
    return f"{value!r:.60}"


def _text(record: dict, where: str, column: str, field: str) -> str:
    value = record[column]
    if isinstance(value, str) and value.strip():
        return value
    raise DataError(f"{where}, column {column!r} ({field}): expected a non-empty string, got {_found(value)}")


def _label(value, where: str, column: str):
    if isinstance(value, str) and value.strip():
        value = value.strip()
        return int(value) if _INTEGER.fullmatch(value) else value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DataError(
        f"{where}, column {column!r} (task.label_column): expected a label (an integer or a string), got {_found(value)}"
    )


def _missing(where: str, columns: dict[str, str], found) -> None:
    """``DataError`` for the first of ``columns`` (column -> its config field) not among ``found``."""
    for column, field in columns.items():
        if column not in found:
            raise DataError(
                f"{where}: no column {column!r} ({field}); the columns found are {', '.join(map(repr, found)) or 'none'}"
            )


def file_format(path: Path) -> str:
    """The delimiter of a CSV/TSV file, or "json" / "jsonl", from the extension; ``DataError`` for another."""
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"{path}: unknown file type {path.suffix!r}; expected the extension .csv, .tsv, .json or .jsonl"
        ) from None


def _records(path: Path, columns: dict[str, str]) -> list[tuple[str, dict]]:
    """``(where, record)`` of every row of ``path`` (``where``: the file and line or record, for messages),
    each holding ``columns`` (column -> its config field, for messages)."""
    fmt = file_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"task data file {path} does not exist (a relative path is from the current directory)")
    if fmt in ("json", "jsonl"):
        records = _jsonl_records(path) if fmt == "jsonl" else _json_records(path)
        for where, record in records:
            _missing(where, columns, record)
        return records
    return _delimited_records(path, fmt, columns)


def _delimited_records(path: Path, delimiter: str, columns: dict[str, str]) -> list[tuple[str, dict]]:
    name = "CSV" if delimiter == "," else "TSV"
    expected = f"a {name} file with a header row"
    lines = _lines(path, expected)  # empty, not UTF-8, NUL: named with the line
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long texts
    reader = csv.reader(io.StringIO("\n".join(line for _, line in lines)), delimiter=delimiter, strict=True)
    header, end, records = None, 0, []
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            span = f"line {start}" if reader.line_num <= start else f"lines {start}-{reader.line_num}"
            raise DataError(
                f"{path}, {span}: not a valid {name} row ({error}); a field that starts with a double quote must end with "
                f'one, and a quote inside a quoted field is doubled ("")'
            ) from None
        end = reader.line_num
        if not cells:
            continue  # a blank line
        if header is None:
            header, header_line = cells, start
            twice = sorted({c for c in cells if cells.count(c) > 1})
            if twice:
                raise DataError(f"{path}, line {start} (header): the column(s) {', '.join(map(repr, twice))} appear twice")
            _missing(f"{path}, line {start} (header)", columns, header)
            continue
        if len(cells) != len(header):
            raise DataError(
                f"{path}, line {start}: {len(cells)} field(s), expected {len(header)} (the columns of the header, "
                f"line {header_line}: {', '.join(map(repr, header))}); a {'comma' if delimiter == ',' else 'tab'} "
                "inside a text must be quoted"
            )
        records.append((f"{path}, line {start}", dict(zip(header, cells))))
    if not records:
        raise DataError(f"{path}: no rows under the header (expected {expected} and one row per example)")
    return records


def _jsonl_records(path: Path) -> list[tuple[str, dict]]:
    expected = "one JSON object per line"
    records = [(f"{path}, line {number}", record) for number, record in json_lines(path, expected, offset="character")]
    if not records:
        raise DataError(f"{path}: no records (expected {expected})")
    return records


def _json_records(path: Path) -> list[tuple[str, dict]]:
    expected = "a JSON array of objects, one per example (or a .jsonl file: one object per line)"
    data = _json(path, expected)
    if not isinstance(data, list) or not data:
        found = "an empty array" if isinstance(data, list) else f"a JSON {type(data).__name__}"
        raise DataError(f"{path}: {found}; expected {expected}")
    records = []
    for i, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path}, record {i}: a JSON {type(record).__name__}; expected {expected}")
        records.append((f"{path}, record {i}", record))
    return records
