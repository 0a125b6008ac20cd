"""The sections of a run config, each field with its default, its rule and its help side by side; the table
of rules (``FIELDS``) and the listing ``fed-plora config`` prints are read from them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..data.custom import METRICS as CUSTOM_METRICS
from ..data.flower_datasets import PREFIX as FLOWER_PREFIX
from ..data.flower_datasets import flower_partitioner, partitioner_arguments
from ..data.tasks import CUSTOM, TASKS
from ..strategies import STRATEGIES
from .privacy import PrivacySection
from .rules import (
    Check,
    boolean,
    choice,
    distinct_names,
    integer,
    integers,
    number,
    plain_name,
    setting,
    strings,
    text,
)


@dataclass
class RunSection:
    """``[run]``: where the run is written, its seed and its device."""

    name: str = setting("run", plain_name(), "the run directory: <out_dir>/<name>")
    out_dir: str = setting("runs", text(), "the directory that holds run directories")
    seed: int = setting(0, integer(0, 2**63 - 1), "the run seed: partition, ranks, sampling, initialisation, local training")
    device: str = setting("auto", choice(("auto", "cpu", "cuda")), '"auto": CUDA when present, else the CPU')


@dataclass
class TaskSection:
    """``[task]``: the task and its data; the fields from ``kind`` on are for ``name = "custom"`` (the user's
    own CSV, TSV, JSON or JSON lines files) and refused for a built-in task."""

    name: str = setting("cola", choice((*TASKS, CUSTOM)), 'a built-in task, or "custom" (your own files)')
    data_dir: str | None = setting(
        None, text(optional=True), "local data (the layout of shared/data); unset: $FED_PLORA_DATA, else the Hub"
    )
    max_train_examples: int | None = setting(None, integer(1, optional=True), "a seeded subset of the training split")
    max_eval_examples: int | None = setting(None, integer(1, optional=True), "a seeded subset of the eval split")
    max_length: int = setting(128, integer(1), "tokens per example (a generation prompt is cut from the left)")
    max_new_tokens: int | None = setting(None, integer(1, optional=True), "generation; unset: the task's default")
    eval_split: str = setting(
        "dev",
        choice(("dev", "train_holdout")),
        '"dev": the task\'s eval split; "train_holdout": a seeded subset of train, kept out of training',
    )
    holdout_examples: int = setting(1000, integer(1), "the size of the train_holdout subset")
    kind: str = setting("classification", choice(("classification", "generation")), "custom: the kind of task")
    train_file: str | None = setting(
        None, text(optional=True), "custom, needed: the training file (relative to the current directory)"
    )
    eval_file: str | None = setting(
        None, text(optional=True), "custom: the eval file; unset: a seeded eval_fraction of train_file"
    )
    eval_fraction: float = setting(0.1, number(0, 1, low_open=True, high_open=True), "custom: the share of train_file held out")
    text_column: str = setting("text", text(), "custom classification: the text")
    text_pair_column: str | None = setting(None, text(optional=True), "custom classification: a second text")
    label_column: str = setting("label", text(), "custom classification: the label (integers or strings)")
    prompt_column: str = setting("prompt", text(), "custom generation: the prompt")
    target_column: str = setting("target", text(), "custom generation: the target")
    metric: str | None = setting(
        None,
        choice([m for metrics in CUSTOM_METRICS.values() for m in metrics], optional=True),
        "the headline metric: custom classification accuracy (default), f1, matthews; custom generation rouge_l"
        " (default), exact_match; a built-in task's own or one it also reports (mrpc, cola: accuracy)",
    )


@dataclass
class ModelSection:
    """``[model]``: the backbone and its adapters."""

    name: str = setting("minilm", text(), '"minilm" (the offline package), a local directory or a Hub id')
    rank: int = setting(16, integer(1), "the global rank R: PLoRA modules per adapted layer")
    alpha: float = setting(32.0, number(0, low_open=True), "the scale s = alpha / R of every module, for every method")
    target_modules: list[str] | None = setting(
        None, strings(optional=True, empty=False), "the adapted layers; unset: by model type (BERT: query, value)"
    )
    dropout: float = setting(0.0, number(0, 1, high_open=True), "adapter dropout")
    extra_trainable: list[str] | None = setting(
        None, strings(optional=True), "modules trained in full and averaged besides the adapters; unset: the head"
    )
    precision: str = setting("auto", choice(("auto", "fp32", "bf16")), '"auto": bf16 on a GPU, fp32 on the CPU')


def _partition() -> Check:
    """``federation.partition``: a scheme of ours, or ``flwr-datasets:<Partitioner>``."""
    ours = choice(("iid", "dirichlet", "category"))

    def test(value):
        if isinstance(value, str) and flower_partitioner(value):
            return value
        return ours.test(value)

    return Check(test, f"{ours.allowed}, or {FLOWER_PREFIX}<a partitioner class of flwr_datasets.partitioner>")


def _partition_args() -> Check:
    """``federation.partition_args``: ``"name=value"`` items, values in TOML, no ``num_partitions``."""

    def test(value):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError
        partitioner_arguments(value)
        return value

    return Check(test, "a list of distinct 'name=value' strings (values in TOML, strings quoted; not num_partitions)")


@dataclass
class FederationSection:
    """``[federation]``: the clients, their data and rank budgets, and the server's sampling and checks."""

    clients: int = setting(10, integer(1), "the number of clients")
    fraction: float = setting(0.5, number(0, 1, low_open=True), "the share of clients sampled per round")
    rounds: int = setting(10, integer(1), "communication rounds")
    partition: str = setting("dirichlet", _partition(), "how the training data is split: ours, or Flower Datasets' by name")
    partition_args: list[str] = setting(
        [],
        _partition_args(),
        'a flwr-datasets partitioner\'s arguments, e.g. ["alpha=0.5"]; num_partitions is clients; unless given, '
        "partition_by is 'label' and seed is drawn from the run seed",
    )
    dirichlet_alpha: float = setting(0.5, number(0, low_open=True), "label skew of the dirichlet partition (smaller: more)")
    rank_scheme: str = setting(
        "uniform", choice(("uniform", "cycle", "heavy_tail", "fixed")), "how client rank budgets are drawn from rank_choices"
    )
    rank_choices: list[int] = setting([2, 4, 8, 16], integers(1), "the rank budgets (fixed: one per client)")
    weighting: str = setting("data", choice(("data", "uniform")), "client weights in every average: by data size, or equal")
    update_norm_bound: float = setting(
        1000.0, number(0, low_open=True, inf=True), "reject an update whose change (L2, all tensors) exceeds it; inf: off"
    )


@dataclass
class TrainSection:
    """``[train]``: local training, every client and method alike, and evaluation."""

    local_steps: int | None = setting(10, integer(0, optional=True), "local steps per client and round (0: by epochs)")
    local_epochs: float | None = setting(
        None, number(0, low_open=True, optional=True), "or epochs over the client's data (with local_steps = 0)"
    )
    batch_size: int = setting(16, integer(1), "examples per local step")
    group_by_length: bool = setting(False, boolean(), "batches of examples of similar length (less padding)")
    lr: float = setting(1e-3, number(0, low_open=True), "the peak learning rate (round 1, after warm-up)")
    lr_schedule: str = setting(
        "cosine", choice(("constant", "cosine")), "over rounds: cosine takes lr to lr_min by the last round (as FlowerTune)"
    )
    lr_min: float = setting(0.0, number(0), "the cosine schedule's last-round learning rate")
    warmup_steps: int = setting(0, integer(0), "linear warm-up over a client's first local steps, every round")
    optimizer: str = setting("adamw", choice(("adamw", "sgd")), "fresh every round (clients keep no optimizer state)")
    momentum: float = setting(0.0, number(0, 1, high_open=True), "sgd only")
    weight_decay: float = setting(0.0, number(0), "decoupled (adamw) or L2 (sgd)")
    logit_adjustment: bool = setting(
        False, boolean(), "classification: train on logits + log(the client's label prior); evaluate on plain logits"
    )
    eval_every: int = setting(1, integer(1), "rounds between evaluations; the last round is always evaluated")
    eval_batch_size: int = setting(64, integer(1), "examples per evaluation batch")


#: ``[methods]``: ``names``, the methods to run in order, and a table per method of its own options (the
#: strategy's ``Options``, checked there: ``[methods.fedplora] fold_mode``, ``[methods.fedit] client_rank``).
MethodsSection = dataclasses.make_dataclass(
    "MethodsSection",
    [
        ("names", list[str], setting(list(STRATEGIES), distinct_names(STRATEGIES, "methods"), "the methods to run, in order")),
        *[(name, cls.Options, field(default_factory=cls.Options)) for name, cls in STRATEGIES.items()],
    ],
)

#: The reference rows a run can add (``fl.run.references``).
REFERENCES = ("untrained", "majority", "centralised", "local")


@dataclass
class ReferencesSection:
    """``[references]``: the reference rows a run adds to its table (``fl.run.references``)."""

    names: list[str] | None = setting(
        None, distinct_names(REFERENCES, "references", empty=True, unset="all that apply"), "in order; unset: all that apply"
    )


#: The sections of a run config by name, in order.
SECTIONS: dict[str, type] = {
    "run": RunSection,
    "task": TaskSection,
    "model": ModelSection,
    "federation": FederationSection,
    "train": TrainSection,
    "methods": MethodsSection,
    "references": ReferencesSection,
    "privacy": PrivacySection,
}

#: The rule of every field with one (a method's table is checked by its strategy's ``Options``).
FIELDS: dict[str, Check] = {
    f"{section}.{f.name}": f.metadata["rule"]
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    if "rule" in f.metadata
}


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _shown(value) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return "unset" if value is None else repr(value)


def field_rows() -> list[dict]:
    """Every field a config file can set: ``{"field", "type", "default", "allowed", "help"}``, in order; a
    method's options as ``methods.<method>.<option>``, their rule stated by the method's ``Options``."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "rule" in f.metadata:
                rule, help_text = f.metadata["rule"].allowed, f.metadata["help"]
                rows.append(
                    dict(field=f"{section}.{f.name}", type=str(f.type), default=_shown(_default(f)), allowed=rule, help=help_text)
                )
                continue
            options = f.default_factory
            for option in dataclasses.fields(options):
                rows.append(
                    dict(
                        field=f"{section}.{f.name}.{option.name}",
                        type=str(option.type),
                        default=_shown(_default(option)),
                        allowed=option.metadata.get("allowed", ""),
                        help=option.metadata.get("help", ""),
                    )
                )
    return rows
