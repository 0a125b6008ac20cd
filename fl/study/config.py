"""A study's config (``[study]``, ``[common]``, ``[settings.<name>]``) and its cells: one run config per
(setting, seed), all built and validated when the study is loaded, before any cell runs.

A setting is a table of overrides of the base run config, as dotted keys (``"federation.rounds" = 5``) or
nested tables (``[settings.x.federation] rounds = 5``); ``[common]`` holds overrides for every setting
(applied first). The study sets ``run.seed``, ``run.name`` and ``run.out_dir`` of each cell itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from ..config import Config, ConfigError, flatten, is_plain_name, load_config, toml_literal

#: Fields the study sets for every cell (a setting may not).
STUDY_FIELDS = ("run.seed", "run.name", "run.out_dir")
_STUDY_KEYS = {"name", "base", "seeds", "workers", "out_dir", "methods", "baseline"}


class StudyError(ConfigError):
    """A study that cannot run as asked: a bad study file, a setting whose config is invalid, a cell whose
    run directory holds a run under another config. The message names the setting or cell."""


@dataclass(frozen=True)
class Cell:
    """One (setting, seed): its run config and run directory ``<out_dir>/<study>/<setting>/seed<k>``."""

    setting: str
    seed: int
    config: Config

    @property
    def name(self) -> str:
        return f"{self.setting}/seed{self.seed}"

    @property
    def directory(self) -> Path:
        return Path(self.config.run.out_dir) / self.config.run.name


@dataclass
class Study:
    """A loaded study: ``cells`` in order (settings as in the file, then seeds), every config valid."""

    name: str
    path: Path
    directory: Path  # <out_dir>/<name>: the cells, results.jsonl, report.md, summary.json, the plots
    seeds: list[int]
    settings: dict[str, dict]  # name -> its own overrides (dotted key -> value), applied after ``common``
    common: dict = field(default_factory=dict)  # overrides of every setting ([common], [study] methods)
    base: Path | None = None  # the base run config (None: the defaults)
    workers: int = 1
    baseline: str = "fedplora"
    cells: list[Cell] = field(default_factory=list)

    def cell(self, setting: str, seed: int) -> Cell:
        return next(c for c in self.cells if c.setting == setting and c.seed == seed)


#: The files a study writes at the top of its directory (``write_report``): no setting takes one's name.
STUDY_FILES = ("results.jsonl", "summary.json", "report.md", "metric.png", "curves.png", "traffic.png")
#: The longest setting name (a file system allows 255 bytes per name; a cell's directory is ``<setting>/seed<k>``).
MAX_SETTING_NAME = 100


def _problem(message: str, path: Path) -> StudyError:
    return StudyError(f"study {path}: {message}")


def _int_list(value, what: str, path: Path) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise _problem(f"{what} = {value!r}: must be a non-empty list of integers >= 0", path)
    if len(set(value)) != len(value):
        raise _problem(f"{what} = {value!r}: a seed is listed twice", path)
    return value


def load_study(path: str | Path) -> Study:
    """Read the study file at ``path`` and build and validate every cell's config; ``StudyError`` naming the
    setting (and the key) at the first problem. Nothing is written."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise _problem(f"not valid TOML ({error})", path) from None
    unknown = set(data) - {"study", "common", "settings"}
    if unknown:
        raise _problem(f"unknown top-level keys {sorted(unknown)}; a study has [study], [common] and [settings.<name>]", path)
    study = _head(data.get("study"), path)
    common = data.get("common", {})
    if not isinstance(common, dict):
        raise _problem("[common] must be a table of overrides", path)
    study.common.update(flatten(common))
    settings = data.get("settings", {"default": {}})
    if not isinstance(settings, dict) or not settings or not all(isinstance(t, dict) for t in settings.values()):
        raise _problem("[settings] must hold one table per setting: [settings.<name>]", path)
    for setting, table in settings.items():
        if not is_setting_name(setting):
            raise _problem(
                f"setting name {setting!r}: must be a plain directory name of at most {MAX_SETTING_NAME} characters, "
                f"not starting with '.' and not one of the study's own files ({', '.join(STUDY_FILES)})",
                path,
            )
        study.settings[setting] = flatten(table)
        overrides = {**study.common, **study.settings[setting]}
        fixed = [k for k in overrides if k in STUDY_FIELDS]
        if fixed:
            raise _problem(f"setting {setting!r}: {', '.join(fixed)} are set by the study (seeds, out_dir), not a setting", path)
        study.cells += [Cell(setting, seed, _cell_config(study, setting, seed, overrides)) for seed in study.seeds]
    for cell in study.cells:
        if study.baseline not in cell.config.methods.names:
            methods = ", ".join(cell.config.methods.names)
            raise _problem(f"study.baseline = {study.baseline!r}: not a method of setting {cell.setting!r} ({methods})", path)
    return study


def is_setting_name(name: str) -> bool:
    """A setting's name, the directory of its cells: a plain name, not hidden, not a file of the study's own
    (``STUDY_FILES``), short enough for its cells' paths."""
    return is_plain_name(name) and not name.startswith(".") and name not in STUDY_FILES and len(name) <= MAX_SETTING_NAME


def _head(head, path: Path) -> Study:
    """The study of the ``[study]`` table, without settings or cells (``methods`` in its ``common``)."""
    if not isinstance(head, dict):
        raise _problem("no [study] table (name, base, seeds, ...)", path)
    if set(head) - _STUDY_KEYS:
        raise _problem(f"unknown keys {sorted(set(head) - _STUDY_KEYS)} in [study]; allowed: {sorted(_STUDY_KEYS)}", path)
    name = head.get("name")
    if not isinstance(name, str) or not is_plain_name(name):
        raise _problem(f"study.name = {name!r}: must be a plain directory name", path)
    seeds = _int_list(head.get("seeds", [0]), "study.seeds", path)
    workers = head.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise _problem(f"study.workers = {workers!r}: must be an integer >= 1", path)
    out_dir, baseline = head.get("out_dir", "runs/studies"), head.get("baseline", "fedplora")
    for key, value in (("out_dir", out_dir), ("baseline", baseline)):
        if not isinstance(value, str) or not value:
            raise _problem(f"study.{key} = {value!r}: must be a non-empty string", path)
    base = head.get("base")
    if base is not None:
        if not isinstance(base, str) or not base:
            raise _problem(f"study.base = {base!r}: must be a path to a run config", path)
        base = path.parent / base
        if not base.is_file():
            raise _problem(f"study.base = {head['base']!r}: {base} does not exist", path)
    common = {"methods.names": head["methods"]} if "methods" in head else {}
    return Study(name, path, Path(out_dir) / name, seeds, {}, common, base, workers, baseline)


def _cell_config(study: Study, setting: str, seed: int, overrides: dict) -> Config:
    try:
        items = [f"{key}={toml_literal(value)}" for key, value in overrides.items()]
        items += [
            f"run.seed={seed}",
            f"run.name={toml_literal(f'seed{seed}')}",
            f"run.out_dir={toml_literal(str(study.directory / setting))}",
        ]
        return load_config(study.base, items)
    except (ConfigError, KeyError, TypeError, ValueError) as error:
        message = error.args[0] if error.args else str(error)
        raise _problem(f"setting {setting!r}: {message}", study.path) from None
