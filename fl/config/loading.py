"""The run configuration: a TOML file of sections ``[run]``, ``[task]``, ``[model]``, ``[federation]``,
``[train]``, ``[methods]`` (with one table of options per method, ``[methods.fedit]``) and ``[references]``,
each field overridable as ``section.key=value`` or ``methods.<method>.key=value`` (values parsed as TOML).

Every field is checked when it is set and the whole config when it is loaded (``Config.validate``: each
field's rule, beside it in ``sections``; a method's table by its strategy's ``Options``; then the fields that
depend on each other): a bad value raises ``ConfigError`` naming the field, its value and what is allowed.
A bool is not an integer; an integer is accepted (as a float) where a float is expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from ..data.custom import METRICS as CUSTOM_METRICS
from ..data.tasks import CUSTOM, TASKS
from ..storage import NONFINITE
from ..strategies import STRATEGIES
from .privacy import PrivacySection, privacy_checks
from .rules import Check, ConfigError
from .sections import (
    FIELDS,
    REFERENCES,
    FederationSection,
    MethodsSection,
    ModelSection,
    ReferencesSection,
    RunSection,
    TaskSection,
    TrainSection,
)

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
    "methods.fedplora.selection": "random",
    "methods.fedplora.untrained": "fold",
    "privacy.clip": None,
    "privacy.noise_multiplier": None,
    "privacy.target_epsilon": None,
    "privacy.delta": None,
    "privacy.min_holders": 1,
    "privacy.randomness": "seeded",
    "federation.partition_args": [],
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
    privacy: PrivacySection = field(default_factory=PrivacySection)

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
    yield from privacy_checks(config)
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
    """A custom task needs its train file and only its kind's fields and metrics; a built-in task refuses them,
    but for a headline metric among those it is scored by."""
    default = TaskSection()
    changed = [k for k in CUSTOM_FIELDS if getattr(task, k) != getattr(default, k)]
    if task.name != CUSTOM:
        spec = TASKS.get(task.name)
        for key in changed:
            if key == "metric" and spec is not None:
                if task.metric not in (spec.metric, *spec.also):
                    allowed = ", ".join((spec.metric, *spec.also))
                    yield f"task.metric = {task.metric!r}: task.name = {task.name!r} is scored by {allowed}"
            elif key != "metric":
                value = getattr(task, key)
                yield f"task.{key} = {value!r}: only for task.name = 'custom' (the user's own files), not {task.name!r}"
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
