"""The user's own data (``task.name = "custom"``): classification and generation read from CSV, TSV, JSON and
JSON lines files by named columns; every fault named by file, line and column; a run from the command line."""

from __future__ import annotations

import csv
import json
import re

import pytest

from fed_plora.fl.cli import main
from fed_plora.fl.config import ConfigError, load_config
from fed_plora.fl.data import DataError, score, task_examples, task_from_config

#: (text, text pair, label) rows of a small paraphrase-like task with string labels.
ROWS = [(f"the first sentence {i}, with a comma", f'a second "quoted" text {i}', "same" if i % 3 else "other") for i in range(30)]


def write(path, rows, columns=("text", "pair", "label")):
    """``rows`` (tuples in the order of ``columns``) in the format of ``path``'s extension."""
    records = [dict(zip(columns, row)) for row in rows]
    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f, delimiter="," if path.suffix == ".csv" else "\t")
            writer.writerow(columns)
            writer.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def task(train, *overrides, eval_file=None):
    sets = ['task.name="custom"', f'task.train_file="{train}"', *overrides]
    if eval_file is not None:
        sets.append(f'task.eval_file="{eval_file}"')
    section = load_config(None, sets).task
    spec = task_from_config(section)
    return spec, task_examples(section, spec, "train"), task_examples(section, spec, "eval")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_every_format_reads_the_same_examples(tmp_path, suffix):
    train, evals = write(tmp_path / f"train{suffix}", ROWS[:20]), write(tmp_path / f"dev{suffix}", ROWS[20:])
    spec, got_train, got_eval = task(train, 'task.text_pair_column="pair"', "task.metric='f1'", eval_file=evals)
    assert (spec.name, spec.kind, spec.metric, spec.num_labels, spec.labels) == (
        "custom",
        "classification",
        "f1",
        2,
        ("other", "same"),
    )
    expected = [{"text": t, "text_pair": p, "label": int(y == "same")} for t, p, y in ROWS]
    assert got_train == expected[:20] and got_eval == expected[20:]
    _, single, _ = task(train, eval_file=evals)  # no text pair column: single texts
    assert single == [{**e, "text_pair": None} for e in expected[:20]]


def test_integer_labels_sort_by_value_and_digit_strings_read_as_integers(tmp_path):
    rows = [(f"text {i}", label) for i, label in enumerate([10, 2, 1, 2, 10, 1])]
    spec, train, _ = task(
        write(tmp_path / "t.jsonl", rows, ("text", "label")), eval_file=write(tmp_path / "e.csv", rows, ("text", "label"))
    )
    assert spec.labels == (1, 2, 10) and [e["label"] for e in train] == [2, 1, 0, 1, 2, 0]


def test_without_an_eval_file_a_seeded_share_of_train_is_the_eval_split(tmp_path):
    train = write(tmp_path / "train.csv", ROWS)
    _, rest, held = task(train, "task.eval_fraction=0.2")
    assert len(held) == 6 and len(rest) == 24
    assert {e["text"] for e in rest}.isdisjoint(e["text"] for e in held)
    assert task(train, "task.eval_fraction=0.2", "run.seed=7")[2] == held  # the same rows for every run seed
    with pytest.raises(DataError, match="too few to hold out task.eval_fraction"):
        task(write(tmp_path / "two.csv", [("a", "x"), ("b", "y")], ("text", "label")), "task.eval_fraction=0.9")


def test_a_generation_task(tmp_path):
    rows = [(f"Question {i}: what follows {i}?", f" {i + 1}") for i in range(10)]
    spec, train, _ = task(write(tmp_path / "qa.jsonl", rows, ("prompt", "target")), 'task.kind="generation"')
    assert (spec.kind, spec.metric, spec.max_new_tokens) == ("generation", "rouge_l", 64)
    assert train[0].keys() == {"prompt", "target", "reference"} and len(train) == 9
    renamed = write(tmp_path / "qa.csv", rows, ("question", "answer"))
    overrides = (
        'task.kind="generation"',
        'task.prompt_column="question"',
        'task.target_column="answer"',
        'task.metric="exact_match"',
    )
    spec, train, evals = task(renamed, *overrides)
    assert spec.metric == "exact_match" and len(train) + len(evals) == 10


def test_custom_scores():
    assert score("custom", [1, 0, 1, 1], [1, 0, 0, 1], "f1") == {"f1": 0.8, "accuracy": 0.75}
    assert score("custom", [2, 0, 1], [2, 0, 1], "matthews") == {"matthews": 1.0, "accuracy": 1.0}
    assert score("custom", [0, 1], [1, 1], "accuracy") == {"accuracy": 0.5}
    assert score("custom", [" 42 ", "4"], ["42", "5"], "exact_match") == {"exact_match": 0.5}
    assert score("custom", ["the cat sat"], ["the cat sat"], "rouge_l") == {"rouge_l": 1.0}


FAULTS = [
    # (file name, content, overrides, the message: file, line and column)
    (
        "t.csv",
        "sentence,label\na,x\nb,y\n",
        (),
        r"t\.csv, line 1 \(header\): no column 'text' \(task\.text_column\); the columns found are 'sentence', 'label'",
    ),
    (
        "t.csv",
        "text,label\na,x\n\nb,y\n,x\n",
        (),
        r"t\.csv, line 5, column 'text' \(task\.text_column\): expected a non-empty string, got an empty cell",
    ),
    ("t.tsv", "text\tlabel\na\tx\nb\ty\tz\n", (), r"t\.tsv, line 3: 3 field\(s\), expected 2"),
    ("t.csv", 'text,label\na,x\n"b,y\nc,x\n', (), r"t\.csv, lines 3-4: not a valid CSV row"),
    ("t.csv", "text,label\na,x\nb,  \n", (), r"t\.csv, line 3, column 'label' \(task\.label_column\): expected a label"),
    (
        "t.jsonl",
        '{"text": "a", "label": 0}\n\n{"text": "b", "label": 1,}\n',
        (),
        r"t\.jsonl, line 3, character \d+: not valid JSON",
    ),
    (
        "t.jsonl",
        '{"text": "a", "label": 0}\n{"text": null, "label": 1}\n',
        (),
        r"t\.jsonl, line 2, column 'text' \(task\.text_column\): .* got null",
    ),
    (
        "t.jsonl",
        '{"text": "a", "label": 0}\n{"txt": "b", "label": 1}\n',
        (),
        r"t\.jsonl, line 2: no column 'text' .* found are 'txt', 'label'",
    ),
    ("t.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1.5}\n', (), r"t\.jsonl, line 2, column 'label' .* got 1\.5"),
    ("t.json", '[{"text": "a", "label": 0},\n {"text": 7, "label": 1}]', (), r"t\.json, record 2, column 'text' .* got 7"),
    ("t.json", '{"text": "a", "label": 0}', (), r"t\.json: a JSON dict; expected a JSON array of objects"),
    ("t.txt", "text,label\na,x\n", (), r"t\.txt: unknown file type '\.txt'"),
    ("t.csv", "text,label\na,x\nb,x\n", (), r"t\.csv: column 'label' \(task\.label_column\) holds one label, 'x'; .* at least 2"),
    ("t.csv", "text,label\na,x\nb,y\nc,z\n", ("task.metric='f1'",), r"task\.metric = 'f1' .* needs 2 labels; .*t\.csv has 3"),
    ("t.csv", "", (), r"t\.csv: the file is empty"),
    ("t.csv", "text,label\n", (), r"t\.csv: no rows under the header"),
]


@pytest.mark.parametrize("name, content, overrides, message", FAULTS)
def test_faults_name_the_file_line_and_column(tmp_path, name, content, overrides, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        task(tmp_path / name, *overrides)


def test_an_eval_label_unseen_in_train_is_named(tmp_path):
    train = write(tmp_path / "train.csv", [("a", "neg"), ("b", "pos")], ("text", "label"))
    dev = write(tmp_path / "dev.jsonl", [("c", "pos"), ("d", "neutral")], ("text", "label"))
    with pytest.raises(
        DataError, match=r"dev\.jsonl, line 2, column 'label' .*: label 'neutral' is not among the labels .*'neg', 'pos'"
    ):
        task(train, eval_file=dev)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.csv does not exist"):
        task(tmp_path / "nothing.csv")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (['task.name="custom"'], r"task\.train_file: task\.name = 'custom' needs a train file"),
        (['task.text_column="s"'], r"task\.text_column = 's': only for task\.name = 'custom'"),
        (['task.train_file="a.csv"'], r"task\.train_file = 'a\.csv': only for task\.name = 'custom'"),
        (['task.kind="generation"'], r"task\.kind = 'generation': only for task\.name = 'custom'"),
        (
            ['task.name="custom"', 'task.train_file="a.csv"', 'task.prompt_column="q"'],
            r"task\.prompt_column = 'q': only for task\.kind = 'generation'",
        ),
        (
            ['task.name="custom"', 'task.train_file="a.csv"', 'task.metric="rouge_l"'],
            r"task\.metric = 'rouge_l': task\.kind = 'classification' is scored by",
        ),
        (
            ['task.name="custom"', 'task.train_file="a.csv"', 'task.eval_file="b.csv"', "task.eval_fraction=0.3"],
            r"task\.eval_fraction = 0\.3",
        ),
        (["task.eval_fraction=1.0"], r"task\.eval_fraction = 1\.0: must be a number in \(0, 1\)"),
        (['task.name="sst2"', 'task.metric="f1"'], r"task\.metric = 'f1': task\.name = 'sst2' is scored by accuracy$"),
        (['task.kind="regression"'], r"task\.kind = 'regression': must be one of classification, generation"),
    ],
)
def test_config_checks_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def _run_args(tmp_path, model, name, *extra):
    sets = ["model.rank=4", "federation.rank_choices=[2, 4]", "task.max_length=16", "train.local_steps=1", "train.batch_size=4"]
    sets += ['federation.partition="iid"', "task.max_eval_examples=4", "references.names=[]"]
    args = ["run", "--task", "custom", "--model", str(model), "--out-dir", str(tmp_path / "runs"), "--name", name]
    return (
        args
        + ["--methods", "fedplora", "--rounds", "1", "--clients", "2", "--no-progress", *extra]
        + [a for s in sets for a in ("--set", s)]
    )


def test_a_run_on_the_users_files_from_the_command_line(tiny_models, tmp_path, capsys):
    train, dev = write(tmp_path / "train.tsv", ROWS[:20]), write(tmp_path / "dev.jsonl", ROWS[20:])
    args = _run_args(tmp_path, tiny_models / "bert", "mine", "--train-file", str(train), "--eval-file", str(dev))
    assert main([*args, "--set", 'task.text_pair_column="pair"', "--set", 'task.metric="matthews"']) == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_matthews" in r and "eval_accuracy" in r for r in records)
    manifest = json.loads((tmp_path / "runs" / "mine" / "manifest.json").read_text())
    assert manifest["data"]["train_examples"] == 20 and manifest["data"]["eval_examples"] == 4
    assert "| fedplora |" in capsys.readouterr().out


def test_a_generation_run_on_the_users_file(tiny_models, tmp_path):
    qa = write(tmp_path / "qa.json", [(f"Q: {i} plus one?", f" A: {i + 1}") for i in range(12)], ("prompt", "target"))
    args = _run_args(tmp_path, tiny_models / "llama", "qa", "--train-file", str(qa))
    assert (
        main([*args, "--set", 'task.kind="generation"', "--set", "task.max_new_tokens=2", "--set", "task.eval_fraction=0.25"])
        == 0
    )
    records = [json.loads(line) for line in (tmp_path / "runs" / "qa" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_rouge_l" in r for r in records)


def test_a_bad_file_is_refused_before_anything_is_written(tiny_models, tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("text,label\na,x\nb,y\n\n,x\n")
    assert main(_run_args(tmp_path, tiny_models / "bert", "bad", "--train-file", str(tmp_path / "bad.csv"))) == 2
    err = capsys.readouterr().err
    assert re.search(r"bad\.csv, line 5, column 'text' \(task\.text_column\): expected a non-empty string", err), err
    assert not (tmp_path / "runs").exists()


def test_a_built_in_task_can_be_judged_by_another_of_its_metrics():
    """MRPC is scored by F1 and accuracy; ``task.metric = "accuracy"`` makes accuracy the headline (tables,
    studies, the majority row), the default stays F1."""
    assert task_from_config(load_config(None, ['task.name="mrpc"'])).metric == "f1"
    assert task_from_config(load_config(None, ['task.name="mrpc"', 'task.metric="accuracy"'])).metric == "accuracy"
    assert task_from_config(load_config(None, ['task.name="cola"', 'task.metric="accuracy"'])).metric == "accuracy"
