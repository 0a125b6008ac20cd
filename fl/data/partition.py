"""Splitting a training set over clients, and giving each client a rank budget.

Every function takes a ``numpy.random.Generator`` so that a run seed fixes the split, and returns
one sorted list of example indices per client (or one rank per client).
"""

from __future__ import annotations

import numpy as np

from .flower_datasets import PREFIX, flower_partition, flower_partitioner, partitioner_arguments


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """A random permutation cut into ``num_clients`` near-equal shards."""
    _check_clients(num_clients, num_examples)
    return [sorted(s.tolist()) for s in np.array_split(rng.permutation(num_examples), num_clients)]


def dirichlet(
    labels: list[int], num_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 2, max_tries: int = 100
) -> list[list[int]]:
    """Label skew: for each class, client shares drawn from Dirichlet(alpha · 1); smaller alpha, more skew.

    Redraws (up to ``max_tries``) until every client holds at least ``min_size`` examples.
    """
    _check_clients(num_clients, len(labels))
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(members)).astype(int)[:-1]
            for shard, part in zip(shards, np.split(members, cuts)):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [sorted(s) for s in shards]
    raise RuntimeError(
        f"dirichlet(alpha={alpha}) left a client with fewer than {min_size} examples after {max_tries} draws; "
        "raise alpha or lower the client count"
    )


def by_category(categories: list[str], num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """Category skew (dolly, dolly_category): category k (sorted by name) goes to clients c with c ≡ k (mod #categories),
    split evenly among them; with fewer clients than categories, client c gets every k ≡ c (mod clients)."""
    _check_clients(num_clients, len(categories))
    names = sorted(set(categories))
    cats = np.asarray([names.index(c) for c in categories])
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for k in range(len(names)):
        owners = [c for c in range(num_clients) if c % len(names) == k] or [k % num_clients]
        members = rng.permutation(np.flatnonzero(cats == k))
        for owner, part in zip(owners, np.array_split(members, len(owners))):
            shards[owner].extend(part.tolist())
    return [sorted(s) for s in shards]


def partition(
    examples: list[dict],
    scheme: str,
    num_clients: int,
    rng: np.random.Generator,
    alpha: float = 0.5,
    arguments: list[str] = (),
) -> list[list[int]]:
    """Dispatch on ``scheme``: "iid", "dirichlet" (needs ``label``), "category" (needs ``category``), or
    "flwr-datasets:<Partitioner>", a partitioner of Flower Datasets with ``arguments`` (``"name=value"``
    items; ``fl.data.flower_datasets``)."""
    name = flower_partitioner(scheme)
    if name is not None:
        return flower_partition(examples, name, partitioner_arguments(list(arguments)), num_clients, rng)
    if arguments:
        raise ValueError(f"the arguments {list(arguments)} are for a {PREFIX}<Partitioner> scheme, not {scheme!r}")
    if scheme == "iid":
        return iid(len(examples), num_clients, rng)
    if scheme == "dirichlet":
        if "label" not in examples[0]:
            raise ValueError("partition 'dirichlet' needs examples with a 'label' (this task has none: use 'iid')")
        return dirichlet([e["label"] for e in examples], num_clients, alpha, rng)
    if scheme == "category":
        if "category" not in examples[0]:
            raise ValueError("partition 'category' needs examples with a 'category' (dolly and dolly_category have one)")
        return by_category([e["category"] for e in examples], num_clients, rng)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose iid, dirichlet, category or {PREFIX}<Partitioner>")


def assign_ranks(scheme: str, num_clients: int, rng: np.random.Generator, choices: list[int], global_rank: int) -> list[int]:
    """One rank budget per client, each in ``[1, global_rank]``.

    - "uniform": drawn uniformly from ``choices``;
    - "cycle": ``choices`` in turn (client c gets ``choices[c % len]``), a fixed balanced mix;
    - "heavy_tail": drawn from ``choices`` with probability ∝ 1/rank (most clients small, a few large);
    - "fixed": ``choices`` is the per-client list itself.
    """
    if not choices:
        raise ValueError("rank choices must be a non-empty list")
    if any(not 1 <= r <= global_rank for r in choices):
        raise ValueError(f"every rank in choices {choices} must lie in [1, global rank {global_rank}]")
    if scheme == "uniform":
        ranks = rng.choice(choices, size=num_clients)
    elif scheme == "cycle":
        ranks = [choices[c % len(choices)] for c in range(num_clients)]
    elif scheme == "heavy_tail":
        weights = 1.0 / np.asarray(choices, dtype=float)
        ranks = rng.choice(choices, size=num_clients, p=weights / weights.sum())
    elif scheme == "fixed":
        if len(choices) != num_clients:
            raise ValueError(f"rank scheme 'fixed' needs one rank per client ({num_clients}), got {len(choices)}")
        ranks = choices
    else:
        raise ValueError(f"unknown rank scheme {scheme!r}; choose uniform, cycle, heavy_tail or fixed")
    return [int(r) for r in ranks]


def sample_clients(num_clients: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """The clients of one round: ``max(1, round(fraction · num_clients))`` drawn without replacement, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"client fraction must lie in (0, 1], got {fraction}")
    count = max(1, round(fraction * num_clients))
    return sorted(rng.choice(num_clients, size=count, replace=False).tolist())


def _check_clients(num_clients: int, num_examples: int) -> None:
    if num_clients < 1 or num_clients > num_examples:
        raise ValueError(f"num_clients must lie in [1, {num_examples}] (the example count), got {num_clients}")


def split_off(examples: list, count: int, rng: np.random.Generator) -> tuple[list, list]:
    """``(rest, held)``: ``count`` examples drawn by ``rng`` (without replacement) and the others, both in
    their original order. The one way a split is carved out of another (``task.eval_split = "train_holdout"``,
    the eval split of a user's train file without an eval file)."""
    if not 1 <= count < len(examples):
        raise ValueError(f"cannot hold out {count} of {len(examples)} examples")
    held = set(rng.choice(len(examples), size=count, replace=False).tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
