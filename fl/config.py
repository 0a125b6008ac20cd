"""Run configuration: a TOML file of sections ``[run]``, ``[task]``, ``[model]``, ``[federation]``,
``[train]``, ``[methods]`` (with one table of options per method, ``[methods.fedit]``), each field
overridable as ``section.key=value`` or ``methods.<method>.key=value`` (values parsed as TOML)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from .strategies import STRATEGIES


@dataclass
class RunSection:
    name: str = "run"  # run directory: <out_dir>/<name>
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda"


@dataclass
class TaskSection:
    name: str = "cola"
    data_dir: str | None = None  # local data (layout of shared/data); else $FED_PLORA_DATA; else the Hub
    max_train_examples: int | None = None  # a seeded subset of the training split
    max_eval_examples: int | None = None  # a seeded subset of the eval split
    max_length: int = 128  # tokens per example (prompt cut from the left for generation)
    max_new_tokens: int | None = None  # generation; None: the task's default


@dataclass
class ModelSection:
    name: str = "minilm"  # "minilm" (offline package), a local directory or a Hub id
    rank: int = 16  # global rank R
    alpha: float = 32.0  # scale s = alpha / R for every module and method
    target_modules: list[str] | None = None  # None: by model type (BERT: query, value)
    dropout: float = 0.0
    extra_trainable: list[str] | None = None  # modules trained and FedAvg'd besides adapters; None: the head
    precision: str = "auto"  # "auto": bf16 on a GPU, fp32 on CPU; or "fp32", "bf16"


@dataclass
class FederationSection:
    clients: int = 10
    fraction: float = 0.5  # clients sampled per round
    rounds: int = 10
    partition: str = "dirichlet"  # iid | dirichlet | category
    dirichlet_alpha: float = 0.5
    rank_scheme: str = "uniform"  # uniform | cycle | heavy_tail | fixed
    rank_choices: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    weighting: str = "data"  # data | uniform
    update_norm_bound: float = 1000.0  # reject a client update whose change (L2, all tensors) exceeds it; inf: off


@dataclass
class TrainSection:
    local_steps: int | None = 10  # local steps per client and round ...
    local_epochs: float | None = None  # ... or epochs over the client's data (set local_steps = 0)
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    eval_every: int = 1  # rounds; the last round is always evaluated
    eval_batch_size: int = 64


#: ``[methods]``: ``names``, the methods to run in order, and a table per method of its own options, the
#: strategy's ``Options`` dataclass (``[methods.fedplora] fold_mode``, ``[methods.fedit] client_rank``,
#: ``[methods.hetlora] prune_gamma``; see ``fl.strategies``).
MethodsSection = dataclasses.make_dataclass(
    "MethodsSection",
    [
        ("names", list[str], field(default_factory=lambda: list(STRATEGIES))),
        *[(name, cls.Options, field(default_factory=cls.Options)) for name, cls in STRATEGIES.items()],
    ],
)

#: Fields that moved: ``config.json`` of a run written before still reads (``Config.from_dict``).
MOVED = {
    "methods.fold_mode": "methods.fedplora.fold_mode",
    "methods.fedit_rank": "methods.fedit.client_rank",
    "methods.hetlora_prune_gamma": "methods.hetlora.prune_gamma",
}


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    task: TaskSection = field(default_factory=TaskSection)
    model: ModelSection = field(default_factory=ModelSection)
    federation: FederationSection = field(default_factory=FederationSection)
    train: TrainSection = field(default_factory=TrainSection)
    methods: MethodsSection = field(default_factory=MethodsSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """The inverse of ``to_dict`` (unknown sections or keys raise, as in a config file); the fields of
        ``MOVED`` are read at their new place."""
        config = cls()
        for section, table in data.items():
            for key, value in table.items():
                path = MOVED.get(f"{section}.{key}", f"{section}.{key}").split(".")
                _apply(config, path, value, "config dict")
        return config


def _apply(config: Config, path: list[str], value, origin: str) -> None:
    """Set the field at ``path`` (``["methods", "fedit", "client_rank"]``); a table (a dict) sets its
    keys one by one. A method's options are validated as they are set."""
    dotted = ".".join(path)
    if dotted in MOVED:
        raise KeyError(f"{origin}: {dotted} is now {MOVED[dotted]}")
    table, key = _table(config, path, origin), path[-1]
    if dataclasses.is_dataclass(getattr(table, key)):
        if not isinstance(value, dict):
            raise TypeError(f"{origin}: {dotted} is a table, got {value!r}")
        for name, item in value.items():
            _apply(config, [*path, name], item, origin)
        return
    setattr(table, key, value)
    validate = getattr(table, "__post_init__", None)  # a method's options check themselves
    if validate is not None:
        try:
            validate()
        except ValueError as error:
            raise ValueError(f"{origin}: {'.'.join(path[:-1])}: {error}") from None


def _table(config: Config, path: list[str], origin: str):
    """The section or table that holds the field at ``path``; ``KeyError`` naming what is unknown."""
    table = config
    for depth, key in enumerate(path):
        if not dataclasses.is_dataclass(table):
            raise KeyError(f"{origin}: {'.'.join(path[:depth])} is a value, not a table")
        keys = sorted(f.name for f in dataclasses.fields(table))
        if key not in keys:
            where = f"keys of [{'.'.join(path[:depth])}] are" if depth else "sections are"
            raise KeyError(f"{origin}: unknown {'key' if depth else 'section'} {'.'.join(path[: depth + 1])}; {where} {keys}")
        if depth < len(path) - 1:
            table = getattr(table, key)
    return table


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The defaults, then the TOML file at ``path``, then ``overrides`` (``"section.key=value"``)."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path, "rb") as f:
            data = tomllib.load(f)
        for section, table in data.items():
            if not isinstance(table, dict):
                raise KeyError(f"config {path}: top-level key {section!r} must be a [section]")
            _apply(config, [section], table, f"config {path}")
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        keys = dotted.strip().split(".")
        if not sep or len(keys) < 2:
            raise ValueError(f"override {item!r} must read section.key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word: a string
        _apply(config, keys, value, f"override {item!r}")
    return config


def toml_literal(value) -> str:
    """A TOML literal for a value (strings quoted, lists element-wise)."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return str(value)
