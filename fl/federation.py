"""The federation of a run, shared by every method and by every transport (in-process, Flower): the task's
data loaded, subsampled, partitioned over the clients and tokenised, each client's rank budget, and the
fingerprint of the examples used (what a resume checks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import Config, ConfigError
from .data import TaskSpec, split_off, task_examples, task_from_config
from .data.partition import assign_ranks, partition
from .data.tokenize import encode_classification, encode_generation_eval, encode_generation_train
from .storage import digest_json


@dataclass
class Federation:
    """The data side of a run, shared by every method: tokenised features, client shards and ranks."""

    task: TaskSpec
    train: list[dict]
    eval: list[dict]
    shards: list[list[int]]
    ranks: list[int]

    def client_features(self, client: int) -> list[dict]:
        return [self.train[i] for i in self.shards[client]]


def _subset(items: list, limit: int | None, rng: np.random.Generator) -> list:
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(rng.choice(len(items), size=limit, replace=False))]


def build_federation(config: Config, tokenizer) -> Federation:
    """Load, subsample, partition and tokenise the task's data; draw the client ranks."""
    return federation_and_fingerprint(config, tokenizer)[0]


def federation_and_fingerprint(config: Config, tokenizer) -> tuple[Federation, dict]:
    """``build_federation`` and the data's fingerprint (example counts and sha256 of the examples used).

    ``task.eval_split = "train_holdout"``: ``task.holdout_examples`` training examples, drawn by the run seed,
    are the eval split and are not trained on; the task's eval split is not read. Then the subsets of
    ``task.max_train_examples`` and ``task.max_eval_examples``."""
    tcfg, seed, fcfg = config.task, config.run.seed, config.federation
    task = task_from_config(tcfg)
    train = task_examples(tcfg, task, "train")
    if tcfg.eval_split == "train_holdout":
        if len(train) - tcfg.holdout_examples < fcfg.clients:
            raise ConfigError(
                f"task.holdout_examples = {tcfg.holdout_examples}: too many for the {len(train)} training examples of "
                f"{task.name} (at least federation.clients = {fcfg.clients} must stay for training)"
            )
        train, evals = split_off(train, tcfg.holdout_examples, np.random.default_rng([seed, 14]))
    else:
        evals = task_examples(tcfg, task, "eval")
    train = _subset(train, tcfg.max_train_examples, np.random.default_rng([seed, 10]))
    evals = _subset(evals, tcfg.max_eval_examples, np.random.default_rng([seed, 11]))
    if fcfg.clients > len(train):
        raise ConfigError(f"federation.clients = {fcfg.clients}: more than the {len(train)} training examples of {task.name}")
    rng = np.random.default_rng([seed, 12])
    try:
        shards = partition(train, fcfg.partition, fcfg.clients, rng, fcfg.dirichlet_alpha, fcfg.partition_args)
    except (ValueError, RuntimeError) as error:
        given = f"federation.partition = {fcfg.partition!r}"
        given += f", federation.partition_args = {fcfg.partition_args}" if fcfg.partition_args else ""
        raise ConfigError(f"{given} on task {task.name}: {error}") from None
    length = config.task.max_length
    if task.kind == "classification":
        pair = train[0]["text_pair"] is not None
        needed = tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)  # a token of every text
        if length < needed:  # (a tokenizer does not truncate below its special tokens)
            raise ConfigError(
                f"task.max_length = {length}: too short for the tokenizer of {config.model.name} (at least {needed}: "
                "its special tokens and a token of text)"
            )
        train_f, eval_f = encode_classification(train, tokenizer, length), encode_classification(evals, tokenizer, length)
    else:
        train_f, eval_f = encode_generation_train(train, tokenizer, length), encode_generation_eval(evals, tokenizer, length)
    fingerprint = {
        "train_examples": len(train),
        "train_sha256": digest_json(train),
        "eval_examples": len(evals),
        "eval_sha256": digest_json(evals),
    }
    if tcfg.eval_split != "dev":  # (only then: the fingerprints of earlier runs stay valid)
        fingerprint["eval_split"] = tcfg.eval_split
    return Federation(task, train_f, eval_f, shards, client_ranks(config)), fingerprint


def client_ranks(config: Config) -> list[int]:
    """Every client's rank budget, drawn by ``federation.rank_scheme`` from the run seed."""
    fcfg = config.federation
    return assign_ranks(
        fcfg.rank_scheme, fcfg.clients, np.random.default_rng([config.run.seed, 13]), list(fcfg.rank_choices), config.model.rank
    )


def client_summary(fed: Federation) -> list[dict]:
    """Per client: data size, rank budget and label counts (where labels exist)."""
    out = []
    for c, shard in enumerate(fed.shards):
        row = {"client": c, "examples": len(shard), "rank": fed.ranks[c]}
        labels = [fed.train[i]["labels"] for i in shard if isinstance(fed.train[i].get("labels"), int)]
        if labels:
            row["label_counts"] = {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
        out.append(row)
    return out
