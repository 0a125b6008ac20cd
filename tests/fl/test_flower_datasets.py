"""Flower Datasets' partitioners by name (``federation.partition = "flwr-datasets:<Partitioner>"``): the
config's rules, clear errors naming the fields before anything is written, a split of a task's examples, and
Flower's Dirichlet partitioner agreeing with ours in distribution.

"Agree in distribution": for the same alpha both draw, per class, the clients' shares from Dirichlet(alpha),
so the label proportions of a client spread alike over clients and seeds; the splits themselves differ (each
draws in its own order). Measured by the spread (std over clients) of each label's proportion in a client's
data, averaged over labels, over 40 seeds of each."""

import sys

import numpy as np
import pytest
from helpers import DATA, needs_data

from fed_plora.fl.cli import main
from fed_plora.fl.config import ConfigError, load_config
from fed_plora.fl.data.partition import partition
from fed_plora.fl.federation import federation_and_fingerprint

FLOWER_DIRICHLET = "flwr-datasets:DirichletPartitioner"


def test_the_fields_rules_name_the_field():
    config = load_config(None, [f'federation.partition="{FLOWER_DIRICHLET}"', 'federation.partition_args=["alpha=0.5"]'])
    assert (config.federation.partition, config.federation.partition_args) == (FLOWER_DIRICHLET, ["alpha=0.5"])
    for override, message in (
        ('federation.partition="flwr-datasets:"', "federation.partition = 'flwr-datasets:': must be one of iid"),
        ('federation.partition="flwr-datasets:Dirichlet Partitioner"', "flwr-datasets:<a partitioner class"),
        ('federation.partition_args=["alpha"]', "federation.partition_args = ['alpha']: must be a list of distinct 'name=value'"),
        ('federation.partition_args=["num_partitions=3"]', "not num_partitions"),
        ('federation.partition_args=["alpha=0.5", "alpha=1"]', "federation.partition_args"),
        ('federation.partition_args=["partition_by=label"]', "strings quoted"),  # a bare word is not TOML
    ):
        with pytest.raises(ConfigError, match="override") as error:
            load_config(None, [override])
        assert message in str(error.value)


def _label_spread(shards: list[list[int]], labels: np.ndarray) -> float:
    """The std over clients of each label's share of a client's data, averaged over labels."""
    shares = np.array([np.bincount(labels[s], minlength=labels.max() + 1) / len(s) for s in shards])
    return float(shares.std(axis=0).mean())


def _spreads(labels: np.ndarray, scheme: str, alpha: float, seeds: range) -> np.ndarray:
    examples = [{"label": int(v)} for v in labels]
    args = [f"alpha={alpha}", "min_partition_size=2"] if scheme == FLOWER_DIRICHLET else []  # ours: at least 2 too
    spreads = []
    for seed in seeds:
        shards = partition(examples, scheme, 10, np.random.default_rng(seed), alpha, args)
        assert sorted(i for s in shards for i in s) == list(range(len(labels)))  # every example once
        spreads.append(_label_spread(shards, labels))
    return np.array(spreads)


def test_flower_dirichlet_agrees_with_ours_in_distribution():
    pytest.importorskip("flwr_datasets")
    labels = np.repeat([0, 1, 2], [300, 200, 100])
    seeds = range(40)
    ours, theirs = _spreads(labels, "dirichlet", 0.5, seeds), _spreads(labels, FLOWER_DIRICHLET, 0.5, seeds)
    error = np.sqrt(ours.var(ddof=1) / len(ours) + theirs.var(ddof=1) / len(theirs))
    assert abs(ours.mean() - theirs.mean()) < 4 * error, (ours.mean(), theirs.mean(), error)
    milder = _spreads(labels, FLOWER_DIRICHLET, 5.0, seeds)  # the measure tells alphas apart: the test can fail
    assert ours.mean() - milder.mean() > 10 * error, (ours.mean(), milder.mean(), error)
    examples = [{"label": int(v)} for v in labels]
    split = partition(examples, FLOWER_DIRICHLET, 10, np.random.default_rng(0), 0.5, ["alpha=0.5"])
    assert split != partition(examples, "dirichlet", 10, np.random.default_rng(0), 0.5)  # alike, not the same split


def test_partitioner_errors_are_clear():
    pytest.importorskip("flwr_datasets")
    examples = [{"label": i % 2, "category": "abc"[i % 3]} for i in range(60)]
    rng = np.random.default_rng(0)
    for scheme, args, message in (
        ("flwr-datasets:Dirichlet", [], "has no partitioner 'Dirichlet'; it has ContinuousPartitioner"),
        (FLOWER_DIRICHLET, [], "DirichletPartitioner needs the arguments alpha"),
        (FLOWER_DIRICHLET, ["alpha=1", "beta=2"], "takes no argument beta; its arguments: num_partitions"),
        (FLOWER_DIRICHLET, ["alpha=1", "partition_by='topic'"], "'topic', a column these examples lack (they have label"),
        (FLOWER_DIRICHLET, ["alpha=-1"], "DirichletPartitioner(num_partitions=3, partition_by='label', seed="),
        (FLOWER_DIRICHLET, ["alpha=0.01", "min_partition_size=0"], "leaves clients [0] without examples"),
        ("flwr-datasets:SizePartitioner", ["partition_sizes=[30, 30]"], "makes 2 partitions, not one per client (3)"),
        ("iid", ["alpha=1"], "the arguments ['alpha=1'] are for a flwr-datasets:<Partitioner> scheme, not 'iid'"),
    ):
        with pytest.raises(ValueError) as error:
            partition(examples, scheme, 3, rng, 0.5, args)
        assert message in str(error.value), str(error.value)
    by_category = partition(examples, "flwr-datasets:NaturalIdPartitioner", 3, rng, 0.5, ["partition_by='category'"])
    assert sorted(len({examples[i]["category"] for i in s}) for s in by_category) == [1, 1, 1]


@needs_data
def test_a_run_splits_a_task_with_flower_s_partitioner_or_refuses_before_writing(tiny_models, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    pytest.importorskip("flwr_datasets")
    base = ["task.name='sst2'", f"task.data_dir='{DATA}'", "task.max_train_examples=60", "federation.clients=4"]
    flower = [f"federation.partition='{FLOWER_DIRICHLET}'", "federation.partition_args=['alpha=0.5', 'min_partition_size=5']"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "bert")
    fed, _ = federation_and_fingerprint(load_config(None, base + flower), tokenizer)
    assert sorted(i for s in fed.shards for i in s) == list(range(60)) and min(map(len, fed.shards)) >= 5
    again, _ = federation_and_fingerprint(load_config(None, base + flower), tokenizer)
    other, _ = federation_and_fingerprint(load_config(None, [*base, *flower, "run.seed=1"]), tokenizer)
    assert again.shards == fed.shards != other.shards  # the run seed fixes the split
    run = ["run", "--model", str(tiny_models / "bert"), "--out-dir", str(tmp_path), "--name", "r", "--no-progress"]
    overrides = [a for item in base for a in ("--set", item)]
    assert main([*run, *overrides, "--set", "federation.partition_args=['alpha=0.5', 'beta=1']"]) == 2
    assert "federation.partition = 'dirichlet', federation.partition_args = ['alpha=0.5', 'beta=1'] on task sst2: " in (
        capsys.readouterr().err
    )
    monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # as if not installed
    assert main([*run, *overrides, *(a for item in flower for a in ("--set", item))]) == 2
    err = capsys.readouterr().err
    assert f"federation.partition = '{FLOWER_DIRICHLET}'" in err and "needs Flower Datasets, which is not installed" in err
    assert not (tmp_path / "r").exists()
