"""A whole run: the shared data, then each method on a freshly loaded backbone, written to a run directory.

What a run guarantees (docs/runs.md, "What a run guarantees"):

- everything is checked before anything is written: the config (``Config.validate``), the device, the run
  directory, the model (its tokenizer and config load), the task's data (every file read and checked,
  partitioned and tokenised); a run into a directory that holds files is refused unless ``overwrite``;
- the run directory is ``<run.out_dir>/<run.name>`` (a plain name) and every file is inside it;
- ``manifest.json`` records the run's id, its config, the sha256 of ``config.json`` and ``clients.json``,
  and a fingerprint of its data; checkpoints carry checksums (``fl.checkpoint``);
- a resume refuses a run directory whose files fail their checks and a config or data that differ from
  the run's (naming what differs); it never rewrites ``config.json``, ``clients.json`` or the manifest.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import LEGACY_FORMAT, Checkpoint, capture_rng, load_checkpoint, save_checkpoint
from .config import REFERENCES, Config, ConfigError, reference_rows
from .data import split_off, task_examples, task_from_config
from .data.tokenize import encode_classification, encode_generation_eval, encode_generation_train
from .device import pick_device, precision
from .model import inject_configured, load_model, load_tokenizer, resolve_model_path
from .partition import assign_ranks, partition
from .references import run_reference
from .report import RunWriter
from .simulator import Federation, simulate
from .storage import FileFormatError, atomic_write, digest_json, dumps, finite_json, read_json, sha256_bytes, sha256_file
from .strategies import STRATEGIES

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
#: The files a run writes at the top of its directory (besides ``checkpoints/``); ``overwrite`` removes
#: these (and their temporary files) and the checkpoints, and refuses a directory that holds anything else.
RUN_FILES = (MANIFEST, "config.json", "clients.json", "metrics.jsonl", "summary.md", "summary.json", "curves.png")
_CHECKPOINT_FILE = re.compile(r"\.?(" + "|".join((*STRATEGIES, *REFERENCES)) + r")(\.json|\.round\d+\.safetensors)(\.tmp)?")
#: Fields a resume may change: where the run lies and where its data lies (the data must be the same).
MAY_DIFFER = ("run.out_dir", "run.name", "task.data_dir", "task.train_file", "task.eval_file")


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked (it holds another run, was changed, is damaged)."""


class RunFailed(RuntimeError):
    """A run whose every client failed in every round for some method: its results are the untrained
    model's. Raised after the run directory is complete; ``directory``, ``table`` and ``methods`` say which."""

    def __init__(self, message: str, directory: Path, table: str, methods: list[str]):
        super().__init__(message)
        self.directory, self.table, self.methods = directory, table, methods


def _subset(items: list, limit: int | None, rng: np.random.Generator) -> list:
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(rng.choice(len(items), size=limit, replace=False))]


def build_federation(config: Config, tokenizer) -> Federation:
    """Load, subsample, partition and tokenise the task's data; draw the client ranks."""
    return _federation(config, tokenizer)[0]


def _federation(config: Config, tokenizer) -> tuple[Federation, dict]:
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
    try:
        shards = partition(train, fcfg.partition, fcfg.clients, np.random.default_rng([seed, 12]), fcfg.dirichlet_alpha)
    except (ValueError, RuntimeError) as error:
        raise ConfigError(f"federation.partition = {fcfg.partition!r} on task {task.name}: {error}") from None
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


def run_experiment(
    config: Config,
    command: str = "",
    progress: bool = True,
    resume: bool = False,
    rounds: Callable = simulate,
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Run every method of ``config`` and write the run directory; returns ``(directory, table)``.

    Everything is checked before anything is written (see the module). A directory that already holds
    files is refused (``RunDirectoryError``) unless ``overwrite``, which then deletes the earlier run's
    files and checkpoints (only files a run writes: anything else there is refused). A checkpoint is
    written after every round. ``resume``: continue the run already in the directory from its checkpoints
    (``metrics.jsonl`` is cut back to them, finished methods are not re-run); refused when its files fail
    their checks or ``config`` or the data differ from the run's. ``rounds``: what runs one method's rounds,
    with the signature of ``simulate`` (the default: clients in this process; ``fl.flower.server_app``
    passes clients on Flower nodes).

    Raises ``RunFailed`` (after the directory is complete) when, for some method, every client of every
    round failed or was rejected.
    """
    config.validate()
    device = pick_device(config.run.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda': no CUDA device is available (use 'auto' or 'cpu')")
    base_dtype, autocast_dtype = precision(config.model.precision, device)
    directory = Path(config.run.out_dir) / config.run.name
    manifest, saved = None, {}
    if resume:
        manifest = _verified_manifest(directory)
        if manifest is not None:
            _same_config(manifest["config"], _config_json(config, ""), "the config given", ignore=(*MAY_DIFFER, "command"))
    else:
        existing = _existing_run_files(directory, overwrite)
    tokenizer = _tokenizer(config)
    fed, fingerprint = _federation(config, tokenizer)
    _check_injection(config, fed.task)
    clients = client_summary(fed)
    if resume:
        run_id = manifest["run"] if manifest is not None else None
        saved = {m: load_checkpoint(directory / "checkpoints", m, run_id) for m in _rows(config)}
        _check_checkpoints(directory, config, manifest, saved)
        _check_resumed_data(directory, manifest, fingerprint, clients)
    else:  # every check passed: now the run directory is written
        if existing and overwrite:
            _remove_run(directory, existing)
        run_id = _start_run(directory, config, command, clients, fingerprint)
    writer = RunWriter(directory, [r for c in saved.values() if c is not None for r in c.records])
    task = fed.task
    results = {}
    for method in config.methods.names:
        checkpoint = saved.get(method)
        if checkpoint is not None and checkpoint.rounds_done >= config.federation.rounds:
            results[method] = checkpoint.records
            continue
        model = load_model(config.model.name, task, tokenizer.pad_token_id, config.run.seed, device, base_dtype)
        done = checkpoint.rounds_done if checkpoint else 0
        bar = tqdm(total=config.federation.rounds, initial=done, desc=f"{method:>9}", disable=not progress, leave=True)

        def on_round(record: dict, bar: tqdm = bar) -> None:
            writer.append(record)
            shown = {"loss": record["train_loss"], task.metric: record.get(f"eval_{task.metric}")}
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None})  # None: no update, no eval
            bar.update()

        results[method] = rounds(
            config,
            method,
            fed,
            model,
            tokenizer,
            autocast_dtype,
            on_round,
            resume=checkpoint,
            on_checkpoint=lambda c: save_checkpoint(writer.checkpoints, c, run_id),
        )
        bar.close()
        del model
    for name in reference_rows(config):  # all or nothing: a reference is checkpointed when it is done
        checkpoint = saved.get(name)
        if checkpoint is not None and checkpoint.rounds_done >= config.federation.rounds:
            results[name] = checkpoint.records
            continue
        model = load_model(config.model.name, task, tokenizer.pad_token_id, config.run.seed, device, base_dtype)
        if progress:
            tqdm.write(f"reference {name} ...")
        results[name] = run_reference(config, name, fed, model, tokenizer, autocast_dtype)
        save_checkpoint(writer.checkpoints, Checkpoint(name, len(results[name]), {}, {}, capture_rng(), results[name]), run_id)
        for record in results[name]:
            writer.append(record)
        del model
    table = writer.finish(results, task.metric, command)
    _raise_if_all_failed({m: results[m] for m in config.methods.names}, writer.dir, table)
    return writer.dir, table


def _rows(config: Config) -> list[str]:
    """The rows of a run's table: its methods, then its references."""
    return [*config.methods.names, *reference_rows(config)]


def resume_experiment(directory: Path, progress: bool = True, data_dir: str | None = None) -> tuple[Path, str]:
    """Continue the run in ``directory`` (killed or finished) with its own ``config.json``; the results
    equal those of an uninterrupted run. ``data_dir`` replaces the recorded data directory: the data found
    there must be the run's (same examples), else the resume is refused."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise RunDirectoryError(f"{directory} is not a run directory: no config.json")
    manifest = _verified_manifest(directory)
    saved = _read(path)
    if not isinstance(saved, dict):
        raise RunDirectoryError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    if manifest is not None:
        _same_config(manifest["config"], saved, "config.json")
    saved = dict(saved)
    command = saved.pop("command", "")
    try:
        config = Config.from_dict(saved)
    except (ConfigError, KeyError, TypeError) as error:
        raise RunDirectoryError(f"{path}: {error.args[0] if error.args else error}") from None
    config.run.out_dir, config.run.name = str(directory.parent), directory.name
    if data_dir is not None:
        config.task.data_dir = data_dir
    return run_experiment(config, command, progress, resume=True)


def _tokenizer(config: Config):
    """The model's tokenizer, its config loaded too: a model name that does not resolve fails here."""
    from transformers import AutoConfig

    name = config.model.name
    try:
        AutoConfig.from_pretrained(resolve_model_path(name))
        return load_tokenizer(name)
    except Exception as error:
        raise ConfigError(f"model.name = {name!r}: cannot load it ({type(error).__name__}: {error})") from None


def _check_injection(config: Config, task) -> None:
    """Inject PLoRA as every method will, into the model built without weights (on the meta device):
    targets that match nothing, or match a module trained in full (``model.extra_trainable``), fail here."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    extra = {"num_labels": task.num_labels} if task.kind == "classification" else {}
    model_config = AutoConfig.from_pretrained(resolve_model_path(config.model.name), **extra)
    build = AutoModelForSequenceClassification if task.kind == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = build.from_config(model_config)
    try:
        inject_configured(model, config)
    except ValueError as error:
        raise ConfigError(f"model.target_modules / model.extra_trainable: {error}") from None


def _existing_run_files(directory: Path, overwrite: bool) -> list[Path]:
    """What a new run would replace in ``directory``: nothing (absent or empty), or, with ``overwrite``,
    the files of an earlier run; ``RunDirectoryError`` otherwise."""
    if not directory.exists() and not directory.is_symlink():
        return []
    if not directory.is_dir():
        raise RunDirectoryError(f"{directory} exists and is not a directory")
    entries = sorted(directory.iterdir())
    if not entries:
        return []
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:6]) + (", ..." if len(entries) > 6 else "")
    if not overwrite:
        raise RunDirectoryError(
            f"run directory {directory} already holds files ({names}). Continue that run with "
            f"`fed-plora resume {directory}`, choose another name (--name), or pass --overwrite to replace it "
            "(its logs and checkpoints are deleted)"
        )
    foreign = [p for p in entries if not _is_run_file(p)]
    checkpoints = directory / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        foreign += [
            p for p in checkpoints.iterdir() if p.is_symlink() or not p.is_file() or not _CHECKPOINT_FILE.fullmatch(p.name)
        ]
    if foreign:
        raise RunDirectoryError(
            f"--overwrite: {directory} holds files a run does not write ({', '.join(str(p) for p in foreign[:6])}); "
            "nothing was deleted: move them away or choose another name"
        )
    return entries


def _is_run_file(path: Path) -> bool:
    if path.name == "checkpoints":
        return path.is_dir() and not path.is_symlink()
    return path.name in RUN_FILES or (path.name.startswith(".") and path.name.endswith(".tmp") and path.name[1:-4] in RUN_FILES)


def _remove_run(directory: Path, entries: list[Path]) -> None:
    """Delete an earlier run's files (checked by ``_existing_run_files``), checkpoints first."""
    for path in entries:
        if path.name == "checkpoints":
            for item in path.iterdir():
                item.unlink()
            path.rmdir()
    for path in entries:
        if path.name != "checkpoints":
            path.unlink()


def _config_json(config: Config, command: str) -> dict:
    """``config.json``'s content (standard JSON: non-finite floats as strings)."""
    return finite_json({**config.to_dict(), "command": command})


def _start_run(directory: Path, config: Config, command: str, clients: list[dict], fingerprint: dict) -> str:
    """Write a new run's ``manifest.json``, ``config.json`` and ``clients.json``; the run's id."""
    directory.mkdir(parents=True, exist_ok=True)
    content = _config_json(config, command)
    files = {
        "config.json": (dumps(content, indent=2) + "\n").encode(),
        "clients.json": (dumps(clients, indent=2) + "\n").encode(),
    }
    body = {
        "format": MANIFEST_FORMAT,
        "run": secrets.token_hex(16),
        "files": {name: sha256_bytes(data) for name, data in files.items()},
        "config": content,
        "data": fingerprint,
    }
    atomic_write(directory / MANIFEST, (dumps({**body, "sha256": digest_json(body)}, indent=2) + "\n").encode())
    for name, data in files.items():
        atomic_write(directory / name, data)
    return body["run"]


def _read(path: Path):
    try:
        return read_json(path)
    except FileFormatError as error:
        raise RunDirectoryError(str(error)) from None


def _verified_manifest(directory: Path) -> dict | None:
    """The run's manifest, its checksum and the files it covers checked; None for a run written before
    manifests (a warning: such a run cannot be verified)."""
    path = directory / MANIFEST
    if not path.exists():
        if not (directory / "config.json").is_file():
            raise RunDirectoryError(f"{directory} is not a run directory: no config.json")
        log.warning("%s has no %s (written before checksums): its files cannot be verified", directory, MANIFEST)
        return None
    manifest = _read(path)
    body = {k: v for k, v in manifest.items() if k != "sha256"} if isinstance(manifest, dict) else None
    if body is None or manifest.get("sha256") != digest_json(body):
        raise RunDirectoryError(f"{path}: its content does not match its checksum (changed or damaged since it was written)")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise RunDirectoryError(f"{path}: manifest format {manifest.get('format')!r}, this version reads {MANIFEST_FORMAT}")
    for name, digest in manifest["files"].items():
        file = directory / name
        if file.is_symlink() or not file.is_file():
            raise RunDirectoryError(f"{file}: missing (the manifest records it); the run directory is incomplete")
        if name != "config.json" and sha256_file(file) != digest:  # config.json: compared field by field
            raise RunDirectoryError(
                f"{file}: changed since the run was written (its sha256 differs from {MANIFEST}'s); it is the record of the "
                "run's partition: restore it, or start a new run"
            )
    return manifest


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def _same_config(recorded: dict, given: dict, what: str, ignore: tuple[str, ...] = ()) -> None:
    """``RunDirectoryError`` listing every field where ``given`` differs from the run's recorded config (both
    read as ``Config.from_dict`` reads them: a field added since reads as what the run ran)."""
    ours, theirs = _flat(_as_read(recorded)), _flat(_as_read(given))
    differ = [
        k for k in sorted(set(ours) | set(theirs)) if k not in ignore and ours.get(k, "<absent>") != theirs.get(k, "<absent>")
    ]
    if differ:
        changes = "; ".join(f"{k}: {ours.get(k, '<absent>')!r} (run) -> {theirs.get(k, '<absent>')!r}" for k in differ[:8])
        raise RunDirectoryError(
            f"{what} differs from the config the run was started with ({changes}{'; ...' if len(differ) > 8 else ''}): "
            "a resume continues a run only under its own config; start a new run for another"
        )


def _as_read(content: dict) -> dict:
    """A ``config.json`` content with every field, as ``Config.from_dict`` reads it (unchanged when it cannot)."""
    try:
        config = Config.from_dict({k: v for k, v in content.items() if k != "command"})
    except (ConfigError, KeyError, TypeError, ValueError):
        return content
    return {**finite_json(config.to_dict()), **({"command": content["command"]} if "command" in content else {})}


def _check_resumed_data(directory: Path, manifest: dict | None, fingerprint: dict, clients: list[dict]) -> None:
    """The data found now must be the run's: the same examples (manifest) and the same partition
    (``clients.json``, never rewritten on resume; written only for a run from before manifests that
    was killed before it)."""
    if manifest is not None and manifest["data"] != fingerprint:
        was, now = manifest["data"], fingerprint
        differ = ", ".join(f"{k} {was.get(k)!r} (run) -> {now[k]!r}" for k in now if was.get(k) != now[k])
        raise RunDirectoryError(
            f"the data found now are not the run's ({differ}): resume with the run's data (--data-dir where it lies now)"
        )
    path = directory / "clients.json"
    if path.is_file():
        recorded = _read(path)
        if recorded != _read_back(clients):
            raise RunDirectoryError(
                f"{path}: the data and config give another partition of the clients than the run's; "
                "resume with the run's data, or start a new run"
            )
    else:  # a run written before manifests, killed before clients.json
        atomic_write(path, (dumps(clients, indent=2) + "\n").encode())


def _read_back(value):
    return json.loads(dumps(value))


def _check_checkpoints(directory: Path, config: Config, manifest: dict | None, saved: dict) -> None:
    for method, checkpoint in saved.items():
        if checkpoint is None:
            continue
        where = directory / "checkpoints" / f"{method}.json"
        if manifest is None and checkpoint.format != LEGACY_FORMAT:
            raise RunDirectoryError(
                f"{directory / MANIFEST} is missing but {where} was written with checksums: the run directory is damaged"
            )
        if checkpoint.rounds_done > config.federation.rounds:
            raise RunDirectoryError(
                f"{where}: {checkpoint.rounds_done} rounds done, more than federation.rounds = {config.federation.rounds}"
            )


def _raise_if_all_failed(results: dict[str, list[dict]], directory: Path, table: str) -> None:
    """``RunFailed`` when, for some method, no round had an accepted client update."""
    failed = {m: records for m, records in results.items() if records and all(not r.get("ranks") for r in records)}
    if not failed:
        return
    reasons = []
    for method, records in failed.items():
        faults = [(r.get("round"), f) for r in records for f in r.get("faults") or []]
        first = f"round {faults[0][0]}, client {faults[0][1].get('client')}: {faults[0][1].get('reason')}" if faults else "none"
        reasons.append(f"{method} ({len(faults)} failures; first: {first})")
    raise RunFailed(
        f"every client of every round failed for {', '.join(failed)}: its results are those of the untrained model "
        f"({'; '.join(reasons)}); see the faults in {directory / 'metrics.jsonl'}",
        directory,
        table,
        list(failed),
    )
