"""A whole run: the shared data, then each method on a freshly loaded backbone, written to a run directory.

What a run guarantees (docs/runs.md, "What a run guarantees"):

- everything is checked before anything is written: the config (``Config.validate``), the device, the run
  directory, the model (its tokenizer and config load), the task's data (every file read and checked,
  partitioned and tokenised); a run into a directory that holds files is refused unless ``overwrite``;
- the run directory is ``<run.out_dir>/<run.name>`` (a plain name) and every file is inside it; it is locked
  while a run or resume goes on (another one is refused), and a run that fails its checks leaves no trace;
- ``manifest.json`` records the run's id, its config, the sha256 of ``config.json`` and ``clients.json``,
  and a fingerprint of its data; checkpoints carry checksums (``fl.rounds.checkpoint``);
- a resume refuses a run directory whose files fail their checks and a config or data that differ from
  the run's (naming what differs); it never rewrites ``config.json``, ``clients.json`` or the manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, ConfigError, reference_rows
from ..device import pick_device, precision, precision_context
from ..federation import Federation, client_summary, federation_and_fingerprint
from ..model import inject_configured, load_model, load_tokenizer, resolve_model_path
from ..rounds.checkpoint import Checkpoint, capture_rng, load_checkpoint, save_checkpoint
from ..rounds.schedule import round_lr
from ..rounds.simulate import simulate
from ..storage import exclusive_lock
from .references import run_reference
from .report import RunWriter
from .rundir import (
    MANIFEST,
    MAY_DIFFER,
    RunDirectoryError,
    check_checkpoints,
    check_resumed_data,
    check_same_config,
    check_writable,
    config_json,
    existing_run_files,
    read_run_json,
    remove_run,
    start_run,
    verified_manifest,
)

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """A run whose every client failed in every round for some method: its results are the untrained
    model's. Raised after the run directory is complete; ``directory``, ``table`` and ``methods`` say which."""

    def __init__(self, message: str, directory: Path, table: str, methods: list[str]):
        super().__init__(message)
        self.directory, self.table, self.methods = directory, table, methods


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

    The run directory is locked while the run goes on: another run or resume of it is refused
    (``InUseError``) and changes nothing. Raises ``RunFailed`` (after the directory is complete) when, for
    some method, every client of every round failed or was rejected.
    """
    config.validate()
    directory = Path(config.run.out_dir) / config.run.name
    check_writable(directory)
    with exclusive_lock(directory, "fed-plora run"):
        return _run_locked(config, directory, command, progress, resume, rounds, overwrite)


def _run_locked(
    config: Config, directory: Path, command: str, progress: bool, resume: bool, rounds: Callable, overwrite: bool
) -> tuple[Path, str]:
    """``run_experiment``'s work once its run directory's lock is held."""
    device = pick_device(config.run.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda': no CUDA device is available (use 'auto' or 'cpu')")
    base_dtype, autocast_dtype = precision(config.model.precision, device)
    manifest, saved = None, {}
    if resume:
        manifest = verified_manifest(directory)
        if manifest is not None:
            check_same_config(manifest["config"], config_json(config, ""), "the config given", ignore=(*MAY_DIFFER, "command"))
    else:
        existing = existing_run_files(directory, overwrite)
    tokenizer = _tokenizer(config)
    fed, fingerprint = federation_and_fingerprint(config, tokenizer)
    _check_injection(config, fed.task)
    first_model = [_tried_model(config, fed, tokenizer, device, base_dtype, autocast_dtype)]
    clients = client_summary(fed)
    if resume:
        run_id = manifest["run"] if manifest is not None else None
        saved = {m: load_checkpoint(directory / "checkpoints", m, run_id) for m in _rows(config)}
        check_checkpoints(directory, config, manifest, saved)
        check_resumed_data(directory, manifest, fingerprint, clients)
    else:  # every check passed: now the run directory is written
        if existing:
            remove_run(directory, existing)
        run_id = start_run(directory, config, command, clients, fingerprint)
    writer = RunWriter(directory, [r for c in saved.values() if c is not None for r in c.records])
    task = fed.task
    model_args = (config.model.name, task, tokenizer.pad_token_id, config.run.seed, device, base_dtype)
    results = {}
    for method in config.methods.names:
        checkpoint = saved.get(method)
        if checkpoint is not None and checkpoint.rounds_done >= config.federation.rounds:
            results[method] = checkpoint.records
            continue
        model = first_model.pop() if first_model else load_model(*model_args)
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
        model = first_model.pop() if first_model else load_model(*model_args)
        if progress:
            tqdm.write(f"reference {name} ...")
        results[name] = run_reference(config, name, fed, model, tokenizer, autocast_dtype)
        save_checkpoint(writer.checkpoints, Checkpoint(name, len(results[name]), {}, {}, capture_rng(), results[name]), run_id)
        for record in results[name]:
            writer.append(record)
        del model
    table = writer.finish(results, task.metric, command)
    _raise_if_all_failed(config, {m: results[m] for m in config.methods.names}, writer.dir, table)
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
    if (directory / MANIFEST).is_file() and not path.exists():
        raise RunDirectoryError(
            f"{directory}: the run was killed while it was being created (no config.json; it never ran a round): "
            "start it again with `fed-plora run` and the same name (the files of a run that never started are replaced)"
        )
    if not path.is_file():
        raise RunDirectoryError(f"{directory} is not a run directory: no config.json")
    manifest = verified_manifest(directory)
    saved = read_run_json(path)
    if not isinstance(saved, dict):
        raise RunDirectoryError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    if manifest is not None:
        check_same_config(manifest["config"], saved, "config.json")
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


def _tried_model(config: Config, fed: Federation, tokenizer, device, base_dtype, autocast_dtype) -> torch.nn.Module:
    """The run's backbone, loaded as every method loads it and run once, without gradients, on an input as
    long as the run's longest (a training example, or an evaluation prompt with the tokens it may generate):
    a model that cannot load for the task or cannot take the run's lengths fails here, before anything is
    written. Returned unchanged, for the first method to use."""
    task = fed.task
    try:
        model = load_model(config.model.name, task, tokenizer.pad_token_id, config.run.seed, device, base_dtype)
    except Exception as error:
        raise ConfigError(f"model.name = {config.model.name!r}: cannot load it for task {task.name} ({error})") from None
    generated = (config.task.max_new_tokens or task.max_new_tokens) if task.kind == "generation" else 0
    length = max([len(f["input_ids"]) for f in fed.train] + [len(f["input_ids"]) + generated for f in fed.eval])
    ids = torch.full((1, length), tokenizer.pad_token_id, dtype=torch.long, device=device)
    try:
        with torch.no_grad(), precision_context(device, autocast_dtype):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as error:
        raise ConfigError(
            f"task.max_length = {config.task.max_length}: model {config.model.name!r} cannot take the run's longest input "
            f"({length} tokens{f', {generated} of them generated' if generated else ''}): {type(error).__name__}: {error}"
        ) from None
    return model


def _raise_if_all_failed(config: Config, results: dict[str, list[dict]], directory: Path, table: str) -> None:
    """``RunFailed`` when, for some method, no round that trained had an accepted client update (a round at
    learning rate 0, the last of a cosine schedule to 0, changes nothing: its accepted updates do not count)."""
    trained = {rnd + 1 for rnd in range(config.federation.rounds) if round_lr(config, rnd) > 0}

    def all_failed(records: list[dict]) -> bool:
        return all(not r.get("ranks") for r in records if r.get("round") in trained)

    failed = {m: records for m, records in results.items() if records and all_failed(records)}
    if not failed:
        return
    reasons = []
    for method, records in failed.items():
        faults = [(r.get("round"), f) for r in records for f in r.get("faults") or []]
        first = f"round {faults[0][0]}, client {faults[0][1].get('client')}: {faults[0][1].get('reason')}" if faults else "none"
        reasons.append(f"{method} ({len(faults)} failures; first: {first})")
    raise RunFailed(
        f"every client of every round failed for {', '.join(failed)} (rounds at learning rate 0 aside): its results are those "
        "of the untrained model "
        f"({'; '.join(reasons)}); see the faults in {directory / 'metrics.jsonl'}",
        directory,
        table,
        list(failed),
    )
