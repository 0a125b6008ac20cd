"""Run configuration: a TOML file of sections ``[run]``, ``[task]``, ``[model]``, ``[federation]``,
``[train]``, ``[methods]``, each field overridable as ``section.key=value`` (values parsed as TOML)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import tomllib


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


@dataclass
class MethodsSection:
    names: list[str] = field(default_factory=lambda: ["fedplora", "fedit", "flora", "hetlora", "flexlora"])
    fold_mode: str = "merge"  # Fed-PLoRA's client fold: merge | exact
    fedit_rank: int | None = None  # FedIT's homogeneous rank; None: the smallest client budget
    hetlora_prune_gamma: float | None = None  # HetLoRA rank self-pruning; None: off


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
        """The inverse of ``to_dict`` (unknown sections or keys raise, as in a config file)."""
        config = cls()
        for section, table in data.items():
            for key, value in table.items():
                _apply(config, section, key, value, "config dict")
        return config


def _apply(config: Config, section: str, key: str, value, origin: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    if section not in sections:
        raise KeyError(f"{origin}: unknown section [{section}]; sections are {sorted(sections)}")
    target = getattr(config, section)
    keys = {f.name for f in dataclasses.fields(target)}
    if key not in keys:
        raise KeyError(f"{origin}: unknown key {section}.{key}; keys of [{section}] are {sorted(keys)}")
    setattr(target, key, value)


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
            for key, value in table.items():
                _apply(config, section, key, value, f"config {path}")
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override {item!r} must read section.key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word: a string
        _apply(config, section, key, value, f"override {item!r}")
    return config
