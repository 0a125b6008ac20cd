"""Run configuration: a TOML file of sections ``[run]``, ``[task]``, ``[model]``, ``[federation]``,
``[train]``, ``[methods]`` (with one table of options per method, ``[methods.fedit]``), each field
overridable as ``section.key=value`` or ``methods.<method>.key=value`` (values parsed as TOML).

Every field is checked when it is set and the whole config when it is loaded (``Config.validate``: types,
ranges and the fields that depend on each other; a method's table by its strategy's ``Options``): a bad
value raises ``ConfigError`` naming the field, its value and what is allowed. A bool is not an integer;
an integer is accepted (as a float) where a float is expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from .data.custom import METRICS as CUSTOM_METRICS
from .data.tasks import CUSTOM, TASKS
from .storage import NONFINITE, finite_json
from .strategies import STRATEGIES


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the field, its value and what is allowed."""


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
    eval_split: str = "dev"  # "dev": the task's eval split; "train_holdout": a seeded subset of train, kept out of training
    holdout_examples: int = 1000  # the size of the train_holdout subset (to choose hyperparameters without the dev set)
    # name = "custom": the user's own files (CSV, TSV, JSON, JSONL; fl.data.custom); refused for a built-in task
    kind: str = "classification"  # classification | generation
    train_file: str | None = None  # needed; a relative path is from the current directory
    eval_file: str | None = None  # None: a seeded eval_fraction of train_file is the eval split
    eval_fraction: float = 0.1
    text_column: str = "text"  # classification
    text_pair_column: str | None = None  # classification, a second text
    label_column: str = "label"  # classification: integers or strings
    prompt_column: str = "prompt"  # generation
    target_column: str = "target"  # generation
    metric: str | None = None  # classification: accuracy (default), f1, matthews; generation: rouge_l (default), exact_match


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
    group_by_length: bool = False  # batches of examples of similar length (less padding; fl.rounds.client.pass_order)
    lr: float = 1e-3  # peak learning rate (round 1, after warm-up)
    lr_schedule: str = "cosine"  # over rounds: constant | cosine (lr to lr_min by the last round, as FlowerTune)
    lr_min: float = 0.0  # the cosine schedule's last-round learning rate
    warmup_steps: int = 0  # linear warm-up over a client's first local steps, every round
    optimizer: str = "adamw"  # adamw | sgd (fresh every round, as clients hold no optimizer state)
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    logit_adjustment: bool = False  # classification: train on logits + log(client's label prior) (fl.rounds.client.log_prior)
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

#: The reference rows a run can add (``fl.run.references``).
REFERENCES = ("untrained", "majority", "centralised", "local")


@dataclass
class ReferencesSection:
    """``[references]``: the reference rows a run adds to its table (``fl.run.references``), in order; unset
    (None): every one that applies to the task (``majority`` only to classification)."""

    names: list[str] | None = None


#: Fields that moved: ``config.json`` of a run written before still reads (``Config.from_dict``).
MOVED = {
    "methods.fold_mode": "methods.fedplora.fold_mode",
    "methods.fedit_rank": "methods.fedit.client_rank",
    "methods.hetlora_prune_gamma": "methods.hetlora.prune_gamma",
}


#: Fields added since configs were first written, with the value that gives the behaviour from before them
#: (``Config.from_dict`` reads a ``config.json`` that lacks them so: a resumed run keeps its recipe).
ADDED = {
    "train.lr_schedule": "constant",
    "train.group_by_length": False,
    "train.warmup_steps": 0,
    "train.optimizer": "adamw",
    "references.names": [],
    "methods.hetlora.prune_lambda": 0.0,
    "methods.flexlora.scale": "common",
    "train.logit_adjustment": False,
}


def _absent(table: dict, path: list[str]) -> bool:
    for key in path:
        if not isinstance(table, dict) or key not in table:
            return True
        table = table[key]
    return False


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    task: TaskSection = field(default_factory=TaskSection)
    model: ModelSection = field(default_factory=ModelSection)
    federation: FederationSection = field(default_factory=FederationSection)
    train: TrainSection = field(default_factory=TrainSection)
    methods: MethodsSection = field(default_factory=MethodsSection)
    references: ReferencesSection = field(default_factory=ReferencesSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """The inverse of ``to_dict`` (unknown sections or keys raise, as in a config file; a float field
        also reads ``"Infinity"``, ``"-Infinity"`` and ``"NaN"``, as ``config.json`` writes them); the
        fields of ``MOVED`` are read at their new place, and a field of ``ADDED`` that ``data`` lacks (a
        config written before it existed) takes the value that meant what that config ran. Validated."""
        config = cls()
        if not isinstance(data, dict):
            raise ConfigError(f"config dict: expected a table of sections, got {type(data).__name__}")
        for dotted, before in ADDED.items():
            section, key = dotted.split(".", 1)
            if section not in data or (isinstance(data[section], dict) and _absent(data[section], key.split("."))):
                _apply(config, dotted.split("."), before, "config dict")
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"config dict: {section} must be a table of fields, got {table!r}")
            for key, value in table.items():
                dotted = MOVED.get(f"{section}.{key}", f"{section}.{key}")
                if isinstance(value, str) and value in NONFINITE and getattr(FIELDS.get(dotted), "number", False):
                    value = NONFINITE[value]
                _apply(config, dotted.split("."), value, "config dict")
        return config.validate("config dict")

    def validate(self, origin: str = "config") -> Config:
        """Check every field and the fields that depend on each other; ``ConfigError`` naming the first bad
        one (``origin``: where the config came from, for the message). Returns the config."""
        for dotted, check in FIELDS.items():
            section, key = dotted.split(".")
            setattr(getattr(self, section), key, _checked(check, dotted, getattr(getattr(self, section), key), origin))
        for name in STRATEGIES:
            _check_options(getattr(self.methods, name), f"methods.{name}", origin)
        for problem in _cross_checks(self):
            raise ConfigError(f"{origin}: {problem}")
        return self


@dataclass(frozen=True)
class Check:
    """A field's rule: ``test(value)`` is the value to keep (an int made a float where a float is expected)
    or raises ``ValueError``; ``allowed`` says what is allowed, for the message; ``number``: a float field."""

    test: Callable
    allowed: str
    number: bool = False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int | None = None, optional: bool = False) -> Check:
    def test(value):
        if value is None and optional:
            return None
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise ValueError
        return value

    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Check(test, allowed + (", or unset" if optional else ""))


def number(
    low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False, optional: bool = False, inf: bool = False
) -> Check:
    def test(value):
        if value is None and optional:
            return None
        if not (_is_int(value) or isinstance(value, float)) or math.isnan(value) or (math.isinf(value) and not inf):
            raise ValueError
        value = float(value)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise ValueError
        return value

    closed = not high_open and (high < math.inf or inf)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if closed else ')'}"
    allowed = f"a number in {interval}" + (", or unset" if optional else "")
    return Check(test, allowed, number=True)


def choice(options, optional: bool = False) -> Check:
    options = tuple(options)

    def test(value):
        if value is None and optional:
            return None
        if not isinstance(value, str) or value not in options:
            raise ValueError
        return value

    return Check(test, f"one of {', '.join(options)}" + (", or unset" if optional else ""))


def boolean() -> Check:
    def test(value):
        if not isinstance(value, bool):
            raise ValueError
        return value

    return Check(test, "true or false")


def text(optional: bool = False) -> Check:
    def test(value):
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value or "\0" in value:
            raise ValueError
        return value

    return Check(test, "a non-empty string" + (", or unset" if optional else ""))


def plain_name() -> Check:
    def test(value):
        if not isinstance(value, str) or not is_plain_name(value):
            raise ValueError
        return value

    return Check(test, "a plain directory name (not empty, not '.' or '..', no '/', '\\' or NUL)")


def is_plain_name(name: str) -> bool:
    """A file or directory name that stays in its directory: not empty, not ``.``/``..``, no separator."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and name.strip() == name


def strings(optional: bool = False, empty: bool = True) -> Check:
    def test(value):
        if value is None and optional:
            return None
        if not isinstance(value, list) or not (empty or value) or not all(isinstance(v, str) and v for v in value):
            raise ValueError
        return value

    allowed = ("a list" if empty else "a non-empty list") + " of non-empty strings" + (", or unset" if optional else "")
    return Check(test, allowed)


def integers(low: int) -> Check:
    def test(value):
        if not isinstance(value, list) or not value or not all(_is_int(v) and v >= low for v in value):
            raise ValueError
        return value

    return Check(test, f"a non-empty list of integers >= {low}")


def method_names() -> Check:
    def test(value):
        if not isinstance(value, list) or not value or len(set(value)) != len(value):
            raise ValueError
        if not all(isinstance(v, str) and v in STRATEGIES for v in value):
            raise ValueError
        return value

    return Check(test, f"a non-empty list of distinct methods from {', '.join(STRATEGIES)}")


def reference_names() -> Check:
    def test(value):
        if value is None:
            return None
        if not isinstance(value, list) or len(set(value)) != len(value):
            raise ValueError
        if not all(isinstance(v, str) and v in REFERENCES for v in value):
            raise ValueError
        return value

    return Check(test, f"a list of distinct references from {', '.join(REFERENCES)}, or unset (all that apply)")


#: The rule of every field of the sections (a method's table is checked by its strategy's ``Options``).
FIELDS: dict[str, Check] = {
    "run.name": plain_name(),
    "run.out_dir": text(),
    "run.seed": integer(0, 2**63 - 1),
    "run.device": choice(("auto", "cpu", "cuda")),
    "task.name": choice((*TASKS, CUSTOM)),
    "task.data_dir": text(optional=True),
    "task.max_train_examples": integer(1, optional=True),
    "task.max_eval_examples": integer(1, optional=True),
    "task.max_length": integer(1),
    "task.max_new_tokens": integer(1, optional=True),
    "task.eval_split": choice(("dev", "train_holdout")),
    "task.holdout_examples": integer(1),
    "task.kind": choice(("classification", "generation")),
    "task.train_file": text(optional=True),
    "task.eval_file": text(optional=True),
    "task.eval_fraction": number(0, 1, low_open=True, high_open=True),
    "task.text_column": text(),
    "task.text_pair_column": text(optional=True),
    "task.label_column": text(),
    "task.prompt_column": text(),
    "task.target_column": text(),
    "task.metric": choice([m for metrics in CUSTOM_METRICS.values() for m in metrics], optional=True),
    "model.name": text(),
    "model.rank": integer(1),
    "model.alpha": number(0, low_open=True),
    "model.target_modules": strings(optional=True, empty=False),
    "model.dropout": number(0, 1, high_open=True),
    "model.extra_trainable": strings(optional=True),
    "model.precision": choice(("auto", "fp32", "bf16")),
    "federation.clients": integer(1),
    "federation.fraction": number(0, 1, low_open=True),
    "federation.rounds": integer(1),
    "federation.partition": choice(("iid", "dirichlet", "category")),
    "federation.dirichlet_alpha": number(0, low_open=True),
    "federation.rank_scheme": choice(("uniform", "cycle", "heavy_tail", "fixed")),
    "federation.rank_choices": integers(1),
    "federation.weighting": choice(("data", "uniform")),
    "federation.update_norm_bound": number(0, low_open=True, inf=True),
    "train.local_steps": integer(0, optional=True),
    "train.local_epochs": number(0, low_open=True, optional=True),
    "train.batch_size": integer(1),
    "train.group_by_length": boolean(),
    "train.lr": number(0, low_open=True),
    "train.lr_schedule": choice(("constant", "cosine")),
    "train.lr_min": number(0),
    "train.warmup_steps": integer(0),
    "train.optimizer": choice(("adamw", "sgd")),
    "train.momentum": number(0, 1, high_open=True),
    "train.weight_decay": number(0),
    "train.logit_adjustment": boolean(),
    "train.eval_every": integer(1),
    "train.eval_batch_size": integer(1),
    "methods.names": method_names(),
    "references.names": reference_names(),
}


def _checked(check: Check, dotted: str, value, origin: str):
    try:
        return check.test(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{origin}: {dotted} = {value!r}: must be {check.allowed}") from None


def _check_options(options, dotted: str, origin: str) -> None:
    """A method's table, checked by its ``Options`` (``__post_init__``)."""
    validate = getattr(options, "__post_init__", None)
    if validate is not None:
        try:
            validate()
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{origin}: {dotted}: {error}") from None


def task_kind(config: Config) -> str:
    """ "classification" or "generation": the kind of the config's task."""
    return config.task.kind if config.task.name == "custom" else TASKS[config.task.name].kind


def reference_rows(config: Config) -> list[str]:
    """The reference rows of a run: ``references.names``, or unset, every one that applies to its task."""
    if config.references.names is not None:
        return list(config.references.names)
    return [r for r in REFERENCES if r != "majority" or task_kind(config) == "classification"]


def _cross_checks(config: Config):
    """The problems of fields that depend on each other (as messages naming the fields)."""
    fed, train, task, model = config.federation, config.train, config.task, config.model
    kind = task_kind(config)
    if "majority" in (config.references.names or ()) and kind != "classification":
        yield f"references.names = {config.references.names}: 'majority' needs a classification task ({task.name} is {kind})"
    bad = [r for r in fed.rank_choices if r > model.rank]
    if bad:
        yield f"federation.rank_choices = {fed.rank_choices}: every rank must lie in [1, model.rank = {model.rank}], not {bad}"
    if fed.rank_scheme == "fixed" and len(fed.rank_choices) != fed.clients:
        yield (
            f"federation.rank_choices = {fed.rank_choices}: rank_scheme 'fixed' needs one rank per client "
            f"(federation.clients = {fed.clients})"
        )
    if not train.local_steps and not train.local_epochs:
        steps, epochs = train.local_steps, train.local_epochs
        yield f"train.local_steps = {steps!r}, train.local_epochs = {epochs!r}: set local_steps >= 1 or local_epochs > 0"
    if train.local_steps and train.local_epochs:
        yield (
            f"train.local_epochs = {train.local_epochs!r} would be ignored while train.local_steps = {train.local_steps}: "
            "set train.local_steps = 0 to train by epochs, or leave local_epochs unset"
        )
    if train.lr_min > train.lr:
        yield f"train.lr_min = {train.lr_min}: must not exceed train.lr = {train.lr}"
    if train.logit_adjustment and kind != "classification":
        yield f"train.logit_adjustment = true: needs a classification task ({task.name} is {kind})"
    if train.momentum and train.optimizer != "sgd":
        yield f"train.momentum = {train.momentum}: only sgd uses it (train.optimizer = {train.optimizer!r})"
    yield from _task_checks(task)
    if task.max_train_examples is not None and task.max_train_examples < fed.clients:
        yield f"task.max_train_examples = {task.max_train_examples}: fewer than federation.clients = {fed.clients}"
    for name in STRATEGIES:
        try:
            getattr(config.methods, name).check_run(model.rank)
        except ValueError as error:
            yield f"methods.{name}.{error}"


#: The fields of a task of the user's own files (``task.name = "custom"``), by the kind that reads them (None: both).
CUSTOM_FIELDS = {
    "kind": None,
    "train_file": None,
    "eval_file": None,
    "eval_fraction": None,
    "metric": None,
    "text_column": "classification",
    "text_pair_column": "classification",
    "label_column": "classification",
    "prompt_column": "generation",
    "target_column": "generation",
}


def _task_checks(task: TaskSection):
    """A custom task needs its train file and only its kind's fields and metrics; a built-in task refuses them."""
    default = TaskSection()
    changed = [k for k in CUSTOM_FIELDS if getattr(task, k) != getattr(default, k)]
    if task.name != CUSTOM:
        for key in changed:
            yield f"task.{key} = {getattr(task, key)!r}: only for task.name = 'custom' (the user's own files), not {task.name!r}"
        return
    if task.train_file is None:
        yield "task.train_file: task.name = 'custom' needs a train file (.csv, .tsv, .json or .jsonl)"
    for key in changed:
        if CUSTOM_FIELDS[key] not in (None, task.kind):
            yield f"task.{key} = {getattr(task, key)!r}: only for task.kind = {CUSTOM_FIELDS[key]!r}, not {task.kind!r}"
    if task.eval_file is not None and task.eval_fraction != default.eval_fraction:
        yield f"task.eval_fraction = {task.eval_fraction}: the eval split is task.eval_file = {task.eval_file!r}; set one of them"
    if task.metric is not None and task.metric not in CUSTOM_METRICS[task.kind]:
        allowed = ", ".join(CUSTOM_METRICS[task.kind])
        yield f"task.metric = {task.metric!r}: task.kind = {task.kind!r} is scored by one of {allowed}"


def _apply(config: Config, path: list[str], value, origin: str) -> None:
    """Set the field at ``path`` (``["methods", "fedit", "client_rank"]``); a table (a dict) sets its
    keys one by one. Every value is checked as it is set (a method's options by its ``Options``)."""
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
    if dotted in FIELDS:
        value = _checked(FIELDS[dotted], dotted, value, origin)
    setattr(table, key, value)
    if path[0] == "methods" and len(path) == 3:
        _check_options(table, ".".join(path[:-1]), origin)


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
    """The defaults, then the TOML file at ``path``, then ``overrides`` (``"section.key=value"``); validated
    as a whole (``Config.validate``)."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"config {path}: not valid TOML ({error})") from None
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
    origin = "config" if path is None else f"config {path}" + (" with overrides" if overrides else "")
    return config.validate(origin)


def toml_literal(value) -> str:
    """The TOML literal of a value a config holds (what ``load_config``'s overrides parse back to it):
    strings as basic strings with every control character escaped, booleans lower-case, non-finite floats
    as ``nan``/``inf``, lists element-wise; ``ConfigError`` for anything else (a date, a table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    raise ConfigError(f"{value!r} ({type(value).__name__}): not a value a run config holds")


def flatten(table: dict, prefix: str = "") -> dict:
    """Nested tables as dotted keys: ``{"a": {"b": 1}, "c.d": 2}`` -> ``{"a.b": 1, "c.d": 2}``."""
    out = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


#: What ``config_differences`` reports for a field one side lacks.
ABSENT = "<absent>"


def config_differences(recorded: dict, given: dict, ignore: tuple[str, ...] = ()) -> list[tuple[str, object, object]]:
    """``(field, recorded value, given value)`` for every dotted field where two config contents differ (as
    ``config.json`` holds them: ``Config.to_dict`` in standard JSON, plus any top-level key of its own such as
    ``command``), both read as ``Config.from_dict`` reads them, so that a field added since reads as what the
    older config ran; a content that does not read is compared as it is. Fields in ``ignore`` are skipped."""
    ours, theirs = flatten(_as_read(recorded)), flatten(_as_read(given))
    keys = sorted(set(ours) | set(theirs))
    return [
        (k, ours.get(k, ABSENT), theirs.get(k, ABSENT))
        for k in keys
        if k not in ignore and ours.get(k, ABSENT) != theirs.get(k, ABSENT)
    ]


def _as_read(content: dict) -> dict:
    """A config content with every field, as ``Config.from_dict`` reads it (unchanged when it cannot)."""
    sections = {f.name for f in dataclasses.fields(Config)}
    try:
        config = Config.from_dict({k: v for k, v in content.items() if k in sections})
    except (ConfigError, KeyError, TypeError, ValueError):
        return content
    return {**finite_json(config.to_dict()), **{k: v for k, v in content.items() if k not in sections}}
