"""Task loaders (real files in shared/data), metrics, partitions, rank schemes and tokenisation."""

from pathlib import Path

import numpy as np
import pytest
from helpers import DATA, needs_data

from fed_plora.fl.data import DATA_DIR_ENV, TASKS, DataError, load_examples, resolve_data_dir
from fed_plora.fl.data.metrics import f1_binary, final_number, lcs_length, matthews_corrcoef, rouge_l, score
from fed_plora.fl.data.partition import assign_ranks, by_category, dirichlet, iid, partition, sample_clients
from fed_plora.fl.data.sources import DOLLY_CATEGORIES
from fed_plora.fl.data.tokenize import collate, encode_generation_eval, encode_generation_train

EXPECTED = {  # (train rows, eval rows) of the offline copies
    "cola": (8551, 527),
    "sst2": (67349, 872),
    "mrpc": (3668, 408),
    "rte": (2490, 277),
    "gsm8k": (7473, 1319),
    "dolly": (14260, 751),
    "pubmedqa": (500, 500),
    "dolly_category": (14260, 751),
}


@needs_data
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_loads_offline(task):
    train, evals = load_examples(task, "train", DATA), load_examples(task, "eval", DATA)
    assert (len(train), len(evals)) == EXPECTED[task]
    spec = TASKS[task]
    if spec.kind == "classification":
        assert {e["label"] for e in train} == set(range(spec.num_labels))
        assert all(isinstance(e["text"], str) and e["text"] for e in train[:50])
    else:
        assert all(e["prompt"] and e["target"] and e["reference"] is not None for e in train[:50])


@needs_data
def test_task_specific_fields():
    assert load_examples("gsm8k", "train", DATA)[0]["reference"] == "72"
    assert load_examples("rte", "train", DATA)[0]["label"] == 1  # not_entailment, as on the Hub
    assert load_examples("mrpc", "train", DATA)[0]["text"].startswith("Amrozi")  # BOM stripped
    assert {e["reference"] for e in load_examples("pubmedqa", "eval", DATA)} == {"yes", "no", "maybe"}
    assert len({e["category"] for e in load_examples("dolly", "train", DATA)}) == 8
    classified = load_examples("dolly_category", "eval", DATA)
    generated = load_examples("dolly", "eval", DATA)
    assert [DOLLY_CATEGORIES[e["label"]] for e in classified] == [e["category"] for e in generated]  # the same rows
    assert all((e["text_pair"] is None) == ("Context:" not in g["prompt"]) for e, g in zip(classified, generated))


def test_errors_name_the_missing_file_or_task(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"task 'cola': missing data file .*in_domain_train.tsv"):
        load_examples("cola", "train", tmp_path)
    with pytest.raises(KeyError, match="unknown task 'colla'"):
        load_examples("colla", "train", tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("elsewhere") == Path("elsewhere")


GLUE_GOOD = {  # one good row of each GLUE file (after the header, where there is one)
    "cola": ("glue/CoLA/in_domain_train.tsv", "", "gj04\t1\t\tA sentence.\n"),
    "sst2": ("glue/SST-2/train.tsv", "sentence\tlabel\n", "a fine film \t1\n"),
    "mrpc": ("glue/MRPC/train.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n", "1\t1\t2\tOne.\tTwo.\n"),
    "rte": ("glue/RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n", "0\tOne.\tTwo.\tentailment\n"),
}

#: (task, file, content, expected message): every local loader error names the file, the line (and the
#: column or field) and what was expected.
BAD_FILES = [
    (
        "cola",
        None,
        "gj04\t1\t\tA sentence.\ngj04\t1\tno sentence\n",
        r"in_domain_train.tsv, line 2: expected 4 tab-separated columns \(source, label, original label, sentence\), got 3",
    ),
    (
        "cola",
        None,
        "gj04\t1\t\tOne.\ngj04\t7\t\tTwo.\n",
        r"in_domain_train.tsv, line 2, column 2 \(label\): expected a label in \{0, 1\}, got '7'",
    ),
    ("cola", None, "gj04\t-1\t\tOne.\n", r"line 1, column 2 \(label\): expected a label in \{0, 1\}, got '-1'"),
    (
        "sst2",
        None,
        "sentence\tlabel\nfine\tpositive\n",
        r"train.tsv, line 2, column 2 \(label\): expected a label in \{0, 1\}, got 'positive'",
    ),
    ("sst2", None, "text\tlabel\nfine\t1\n", r"train.tsv, line 1 \(header\): expected the columns sentence, label"),
    (
        "sst2",
        None,
        "sentence\tlabel\nfine\t1\n\nworse\t0\n",
        r"train.tsv, line 3: a blank line; expected 2 tab-separated columns",
    ),
    ("sst2", None, "sentence\tlabel\n", r"train.tsv: no rows"),
    (
        "mrpc",
        None,
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n2\t1\t2\tOne.\tTwo.\n",
        r"MRPC/train.tsv, line 2, column 1 \(Quality\): expected a label in \{0, 1\}, got '2'",
    ),
    (
        "rte",
        None,
        "index\tsentence1\tsentence2\tlabel\n0\tOne.\tTwo.\tcontradiction\n",
        r"RTE/train.tsv, line 2, column 4 \(label\): expected a label in \{entailment, not_entailment\}",
    ),
    (
        "cola",
        None,
        b"gj04\t1\t\tOne.\n\x89PNG\r\n\x1a\n\x00\xff\xfe",
        r"in_domain_train.tsv, line 2, byte 1: not UTF-8 text \(0x89\)",
    ),
    ("cola", None, b"gj04\t1\t\tOne.\n\x00\x00\x00", r"in_domain_train.tsv, line 2: a NUL character"),
    ("cola", None, "", r"in_domain_train.tsv: the file is empty \(expected a GLUE cola file of 4 tab-separated columns"),
    (
        "gsm8k",
        "gsm8k/train.jsonl",
        '{"question": "q", "answer": "a"}\n{"question": "q", "answer": \n',
        r"gsm8k/train.jsonl, line 2, column \d+: not valid JSON",
    ),
    (
        "gsm8k",
        "gsm8k/train.jsonl",
        '{"question": "q", "answer": 4}\n',
        r"gsm8k/train.jsonl, line 1, field 'answer': expected a string, got 4",
    ),
    ("gsm8k", "gsm8k/train.jsonl", '["q", "a"]\n', r"gsm8k/train.jsonl, line 1: a JSON list; expected one JSON object per line"),
    (
        "dolly",
        "dolly/databricks-dolly-15k.jsonl",
        '{"instruction": "i", "context": "", "response": "r"}\n',
        r"line 1, field 'category': expected a string, got missing",
    ),
    (
        "dolly_category",
        "dolly/databricks-dolly-15k.jsonl",
        '{"instruction": "i", "context": "", "response": "r", "category": "open_qa"}\n'
        '{"instruction": "i", "context": "", "response": "r", "category": "poetry"}\n',
        r"line 2, field 'category': expected one of brainstorming, classification, .*summarization, got 'poetry'",
    ),
    (
        "pubmedqa",
        "pubmedqa/ori_pqal.json",
        '{"1": {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "perhaps"}}',
        r"ori_pqal.json, record '1', field 'final_decision': expected one of yes, no, maybe, got 'perhaps'",
    ),
    (
        "pubmedqa",
        "pubmedqa/ori_pqal.json",
        '{"1": {"QUESTION": "q",\n "CONTEXTS": ["c"]',
        r"ori_pqal.json, line 2, column \d+: not valid JSON",
    ),
]


@pytest.mark.parametrize(("task", "name", "content", "message"), BAD_FILES)
def test_local_loader_errors_name_the_file_and_line(tmp_path, task, name, content, message):
    name = name or GLUE_GOOD[task][0]
    path = tmp_path / name
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if task == "pubmedqa":
        (tmp_path / "pubmedqa" / "test_ground_truth.json").write_text('{"2": "yes"}')
    with pytest.raises(DataError, match=message):
        load_examples(task, "train", tmp_path)


@pytest.mark.parametrize("task", list(GLUE_GOOD))
def test_good_glue_rows_load(tmp_path, task):
    name, header, row = GLUE_GOOD[task]
    (tmp_path / name).parent.mkdir(parents=True)
    (tmp_path / name).write_text(header + row + row.replace("\t1\t", "\t0\t").replace("1\t1\t2", "0\t1\t2"))
    examples = load_examples(task, "train", tmp_path)
    assert len(examples) == 2 and {e["label"] for e in examples} <= {0, 1}


def test_the_hub_unreachable_points_to_data_dir(monkeypatch):
    """Without --data-dir and without the Hub, the error says how to read local files."""
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(
        DataError, match=r"cannot read the Hugging Face Hub dataset nyu-mll/glue .*pass --data-dir DIR or set \$FED_PLORA_DATA"
    ):
        load_examples("cola", "train")


def test_hub_labels_outside_the_label_set_are_refused(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"sentence": "s", "label": 0}, {"sentence": "t", "label": -1}])
    with pytest.raises(DataError, match=r"nyu-mll/glue \(cola, train\), row 1: expected a label in \{0, 1\}, got -1"):
        load_examples("cola", "train")


def test_metrics_by_hand():
    assert matthews_corrcoef([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx(1 / np.sqrt(3))
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # constant predictions
    assert matthews_corrcoef([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)
    assert f1_binary([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert final_number("3 + 4 = 7\n#### 1,000") == "1000"
    assert final_number("so 12 then 15.00") == "15"
    assert final_number("The answer is 42. Question: 7") == "42"
    assert final_number("no digits") is None
    assert lcs_length(["a", "b", "c", "d"], ["a", "c", "d", "e"]) == 3
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(2 * (5 / 6) * (5 / 6) / (5 / 3))
    assert rouge_l("", "x") == 0.0
    assert score("pubmedqa", ["Yes, it does", "maybe.", "unclear"], ["yes", "no", "no"]) == {"accuracy": pytest.approx(1 / 3)}
    assert score("gsm8k", ["The answer is 5", "#### 6"], ["5", "7"]) == {"exact_match": 0.5}
    assert set(score("mrpc", [1, 0], [1, 1])) == {"f1", "accuracy"}


def test_partitions_cover_every_example_once():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 500).tolist()
    for shards in (iid(500, 7, rng), dirichlet(labels, 7, 0.3, rng), by_category([str(x) for x in labels], 7, rng)):
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(500)) and len(shards) == 7
    skewed = dirichlet(labels, 5, 0.05, np.random.default_rng(1))
    shares = [np.bincount(np.asarray(labels)[s], minlength=3) / len(s) for s in skewed]
    assert max(max(s) for s in shares) > 0.8  # small alpha: some client dominated by one label
    cats = by_category(["a"] * 10 + ["b"] * 10, 4, rng)
    assert {labels_of for labels_of in map(lambda s: frozenset("a" if i < 10 else "b" for i in s), cats)} == {
        frozenset("a"),
        frozenset("b"),
    }
    with pytest.raises(ValueError, match="needs examples with a 'label'"):
        partition([{"prompt": "x"}] * 4, "dirichlet", 2, rng)
    with pytest.raises(ValueError, match="num_clients"):
        iid(3, 5, rng)


def test_rank_schemes_and_client_sampling():
    rng = np.random.default_rng(0)
    assert assign_ranks("cycle", 5, rng, [2, 4, 8, 16], 16) == [2, 4, 8, 16, 2]
    uniform = assign_ranks("uniform", 400, rng, [2, 4, 8, 16], 16)
    assert set(uniform) == {2, 4, 8, 16}
    heavy = assign_ranks("heavy_tail", 400, rng, [2, 4, 8, 16], 16)
    assert heavy.count(2) > heavy.count(16) * 3
    assert assign_ranks("fixed", 2, rng, [3, 5], 8) == [3, 5]
    with pytest.raises(ValueError, match=r"lie in \[1, global rank 8\]"):
        assign_ranks("uniform", 3, rng, [16], 8)
    picked = sample_clients(10, 0.3, np.random.default_rng(5))
    assert len(picked) == 3 and picked == sample_clients(10, 0.3, np.random.default_rng(5))


class _WordTokenizer:
    """Whitespace tokenizer: enough to check masking and truncation."""

    eos_token_id = 99

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(w) for w in text.split()]}


def test_generation_encoding_masks_the_prompt_and_pads_left_for_eval():
    ex = [{"prompt": "aa bbb cccc", "target": " d ee", "reference": "x"}]
    (train,) = encode_generation_train(ex, _WordTokenizer(), max_length=4)
    assert train["input_ids"] == [4, 1, 2, 99] and train["labels"] == [-100, 1, 2, 99]  # prompt cut from the left
    (prompt,) = encode_generation_eval(ex, _WordTokenizer(), max_length=2)
    assert prompt["input_ids"] == [3, 4]
    batch = collate([prompt, {"input_ids": [7], "reference": "y"}], pad_id=0, left=True)
    assert batch["input_ids"].tolist() == [[3, 4], [0, 7]] and batch["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_hub_rows_are_normalised_like_local_rows(monkeypatch):
    """The online path, with ``datasets.load_dataset`` replaced by canned Hub rows (no network)."""
    import datasets

    from fed_plora.fl.data.sources import hub_rows

    canned = {
        ("nyu-mll/glue", "rte", "validation"): [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}],
        ("openai/gsm8k", "main", "test"): [{"question": "q", "answer": "x\n#### 5"}],
        ("databricks/databricks-dolly-15k", None, "train"): [
            {"instruction": f"i{i}", "context": "c" if i else "", "response": "r", "category": "summarization"} for i in range(21)
        ],
        ("qiaojin/PubMedQA", "pqa_labeled", "train"): [
            {"pubid": 2, "question": "q2", "context": {"contexts": ["c2"]}, "final_decision": "no"},
            {"pubid": 1, "question": "q1", "context": {"contexts": ["c1"]}, "final_decision": "yes"},
        ],
    }
    calls = []

    def fake_load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        return canned[(path, config, split)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert hub_rows("rte", "eval") == [{"sentence1": "a", "sentence2": "b", "label": 1}]
    assert hub_rows("gsm8k", "eval") == [{"question": "q", "answer": "x\n#### 5"}]
    assert hub_rows("pubmedqa", "eval") == [{"question": "q2", "contexts": ["c2"], "final_decision": "no"}]
    assert [r["instruction"] for r in hub_rows("dolly_category", "eval")] == ["i0", "i20"]  # every 20th row, as local
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert load_examples("dolly_category", "eval")[0] == {
        "text": "i0",
        "text_pair": None,
        "label": DOLLY_CATEGORIES.index("summarization"),
        "category": "summarization",
    }
    canned[("databricks/databricks-dolly-15k", None, "train")][3]["category"] = "poetry"
    with pytest.raises(DataError, match=r"databricks-dolly-15k, row 3: category 'poetry', expected one of brainstorming"):
        hub_rows("dolly_category", "train")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert load_examples("gsm8k", "eval")[0]["reference"] == "5"  # no data dir: the Hub
    assert calls[-1] == ("openai/gsm8k", "main", "test")
