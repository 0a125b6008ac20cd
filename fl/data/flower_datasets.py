"""Flower Datasets' partitioners as partition schemes: ``"flwr-datasets:<Partitioner>"`` with the
partitioner's arguments as ``"name=value"`` items (values in TOML), so that a run splits its data as a Flower
baseline does.

A partitioner works on a Hugging Face ``datasets.Dataset``: it gets one built from the examples' ``label`` and
``category`` (whichever they have) and their indices, so that each partition names the examples it holds.
``num_partitions`` is the client count, ``partition_by`` defaults to ``"label"`` and ``seed`` to one drawn
from the run's partition generator, where the partitioner takes them. Flower Datasets is imported only here.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import tomllib

#: The prefix of a Flower Datasets partitioner's scheme name.
PREFIX = "flwr-datasets:"
#: The columns of the dataset a partitioner sees, where the examples have them (besides ``_index``).
COLUMNS = ("label", "category")


def flower_partitioner(scheme: str) -> str | None:
    """The partitioner's class name of ``scheme`` (``"flwr-datasets:DirichletPartitioner"``), or None for a
    scheme of ours; ``ValueError`` when the name after the prefix is not a Python identifier."""
    if not scheme.startswith(PREFIX):
        return None
    name = scheme[len(PREFIX) :]
    if not name.isidentifier():
        raise ValueError(f"{scheme!r}: expected {PREFIX}<a partitioner class of flwr_datasets.partitioner>")
    return name


def partitioner_arguments(items: list[str]) -> dict:
    """``["alpha=0.5", "partition_by='label'"]`` as keyword arguments, each value read as TOML; ``ValueError``
    for an item that is not ``name=value``, a name given twice, or ``num_partitions`` (the client count)."""
    arguments = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ValueError(f"{item!r}: expected name=value (a TOML value)")
        if name in arguments or name == "num_partitions":
            raise ValueError(f"{item!r}: " + ("given twice" if name in arguments else "num_partitions is federation.clients"))
        try:
            arguments[name] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"{item!r}: the value is not TOML (a string needs quotes: name='text')") from None
    return arguments


def flower_partition(
    examples: list[dict], name: str, arguments: dict, num_clients: int, rng: np.random.Generator
) -> list[list[int]]:
    """The examples split by Flower Datasets' partitioner ``name`` with ``arguments``: one sorted list of
    example indices per client. ``ValueError`` naming what is wrong: Flower Datasets missing, no such
    partitioner, arguments it does not take or lacks, a column the examples lack, a partition count other
    than ``num_clients``, a client left without examples, or the partitioner's own refusal."""
    try:
        from flwr_datasets import partitioner as partitioners
    except ImportError:
        raise ValueError(
            "needs Flower Datasets, which is not installed: pip install --no-deps flwr-datasets==0.6.1 seaborn "
            "(or the flwr-datasets extra; docs/fl.md)"
        ) from None
    from datasets import Dataset

    cls = getattr(partitioners, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, partitioners.Partitioner)) or inspect.isabstract(cls):
        known = sorted(n for n in dir(partitioners) if n.endswith("Partitioner") and n != "Partitioner")
        raise ValueError(f"flwr_datasets.partitioner has no partitioner {name!r}; it has {', '.join(known)}")
    parameters = inspect.signature(cls).parameters
    unknown = sorted(set(arguments) - set(parameters))
    if unknown:
        raise ValueError(f"{name} takes no argument {', '.join(unknown)}; its arguments: {', '.join(parameters)}")
    defaults = {"num_partitions": num_clients, "partition_by": "label", "seed": int(rng.integers(2**32))}
    arguments = {**{k: v for k, v in defaults.items() if k in parameters}, **arguments}
    missing = [k for k, p in parameters.items() if p.default is inspect.Parameter.empty and k not in arguments]
    if missing:
        raise ValueError(f"{name} needs the arguments {', '.join(missing)} (as name=value items)")
    columns = {c: [e[c] for e in examples] for c in COLUMNS if c in examples[0]}
    by = arguments.get("partition_by")
    if by is not None and by not in columns:
        have = ", ".join(columns) or "none"
        raise ValueError(f"{name}: partition_by = {by!r}, a column these examples lack (they have {have})")
    try:
        with warnings.catch_warnings():  # a notice for each of Dirichlet's redraws (ours redraws silently)
            warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
            partitioner = cls(**arguments)
            partitioner.dataset = Dataset.from_dict({**columns, "_index": list(range(len(examples)))})
            count = partitioner.num_partitions
            shards = [sorted(partitioner.load_partition(c)["_index"]) for c in range(min(count, num_clients))]
    except (TypeError, ValueError, KeyError) as error:  # the partitioner's own refusal
        raise ValueError(f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())}): {error}") from None
    if count != num_clients:
        raise ValueError(f"{name} makes {count} partitions, not one per client ({num_clients})")
    empty = [c for c, shard in enumerate(shards) if not shard]
    if empty:
        raise ValueError(f"{name} leaves clients {empty} without examples")
    return shards
