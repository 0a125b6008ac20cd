"""One run directory, ``<run.out_dir>/<run.name>``: what is in it and whether it may be used.

A new run writes ``manifest.json`` (the run's id, its config, the sha256 of ``config.json`` and
``clients.json``, a fingerprint of its data), then ``config.json`` and ``clients.json``; a directory that
holds files is refused unless ``--overwrite``, which deletes only the files a run writes. A resume checks the
manifest and the files it covers, and refuses a config or data that differ from the run's, naming what differs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from pathlib import Path

from ..config import REFERENCES, Config, config_differences
from ..rounds.checkpoint import LEGACY_FORMAT
from ..storage import (
    LOCK_FILE,
    FileFormatError,
    atomic_write,
    digest_json,
    dumps,
    ensure_directory,
    finite_json,
    read_json,
    sha256_bytes,
    sha256_file,
)
from ..strategies import STRATEGIES

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
#: The files a run writes at the top of its directory (besides ``checkpoints/``); ``overwrite`` removes
#: these (and their temporary files) and the checkpoints, and refuses a directory that holds anything else.
RUN_FILES = (MANIFEST, "config.json", "clients.json", "metrics.jsonl", "summary.md", "summary.json", "curves.png")
#: What a new run writes before its first round (``start_run``): a directory holding only these is a run
#: killed while it started, which a new run replaces without ``overwrite``.
START_FILES = RUN_FILES[:3]
_CHECKPOINT_FILE = re.compile(r"\.?(" + "|".join((*STRATEGIES, *REFERENCES)) + r")(\.json|\.round\d+\.safetensors)(\.tmp)?")
#: Fields a resume may change: where the run lies and where its data lies (the data must be the same).
MAY_DIFFER = ("run.out_dir", "run.name", "task.data_dir", "task.train_file", "task.eval_file")


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked (it holds another run, was changed, is damaged)."""


def existing_run_files(directory: Path, overwrite: bool) -> list[Path]:
    """What a new run would replace in ``directory``: nothing (absent or empty), or, with ``overwrite``,
    the files of an earlier run; ``RunDirectoryError`` otherwise (and for a directory that cannot be written:
    ``check_writable``)."""
    check_writable(directory)
    if not directory.exists():
        return []
    entries = sorted(p for p in directory.iterdir() if p.name != LOCK_FILE)  # the lock: the run's own, held
    if all(_is_run_file(p, START_FILES) for p in entries):
        return entries  # nothing, or the start of a run killed before its first round: nothing is lost
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


def check_writable(directory: Path) -> None:
    """``RunDirectoryError`` unless a run can be written at ``directory``: not a link (a run's files never
    go through one), a directory where it exists, and else under an existing directory, the one to write in
    being writable."""
    if directory.is_symlink():
        raise RunDirectoryError(f"run directory {directory} is a link: a run directory is never one (name the directory itself)")
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "the run directory" if existing == directory else f"its parent {existing}"
        raise RunDirectoryError(f"run directory {directory}: {what} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirectoryError(f"run directory {directory}: {existing} is not writable (permission denied)")


def _is_run_file(path: Path, names: tuple[str, ...] = RUN_FILES) -> bool:
    """A file or folder a run writes: one of ``names`` (or its temporary file) as a plain file, or
    ``checkpoints/`` when ``names`` are ``RUN_FILES``."""
    if path.is_symlink():
        return False
    if path.name == "checkpoints":
        return names == RUN_FILES and path.is_dir()
    temporary = path.name.startswith(".") and path.name.endswith(".tmp") and path.name[1:-4] in names
    return path.is_file() and (path.name in names or temporary)


def remove_run(directory: Path, entries: list[Path]) -> None:
    """Delete an earlier run's files (``existing_run_files``' list, each checked there), checkpoints first."""
    for path in entries:
        if path.name == "checkpoints":
            for item in path.iterdir():
                item.unlink()
            path.rmdir()
    for path in entries:
        if path.name != "checkpoints":
            path.unlink()


def config_json(config: Config, command: str) -> dict:
    """``config.json``'s content (standard JSON: non-finite floats as strings)."""
    return finite_json({**config.to_dict(), "command": command})


def start_run(directory: Path, config: Config, command: str, clients: list[dict], fingerprint: dict) -> str:
    """Write a new run's ``manifest.json``, ``config.json`` and ``clients.json``; the run's id."""
    ensure_directory(directory)
    content = config_json(config, command)
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


def read_run_json(path: Path):
    try:
        return read_json(path)
    except FileFormatError as error:
        raise RunDirectoryError(str(error)) from None


def verified_manifest(directory: Path) -> dict | None:
    """The run's manifest, its checksum and the files it covers checked; None for a run written before
    manifests (a warning: such a run cannot be verified)."""
    path = directory / MANIFEST
    if not path.exists():
        if not (directory / "config.json").is_file():
            raise RunDirectoryError(f"{directory} is not a run directory: no config.json")
        log.warning("%s has no %s (written before checksums): its files cannot be verified", directory, MANIFEST)
        return None
    manifest = read_run_json(path)
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


def check_same_config(recorded: dict, given: dict, what: str, ignore: tuple[str, ...] = ()) -> None:
    """``RunDirectoryError`` listing every field where ``given`` differs from the run's recorded config
    (``config_differences``: a field added since reads as what the run ran)."""
    differ = config_differences(recorded, given, ignore)
    if differ:
        changes = "; ".join(f"{k}: {was!r} (run) -> {now!r}" for k, was, now in differ[:8])
        raise RunDirectoryError(
            f"{what} differs from the config the run was started with ({changes}{'; ...' if len(differ) > 8 else ''}): "
            "a resume continues a run only under its own config; start a new run for another"
        )


def check_resumed_data(directory: Path, manifest: dict | None, fingerprint: dict, clients: list[dict]) -> None:
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
        recorded = read_run_json(path)
        if recorded != _read_back(clients):
            raise RunDirectoryError(
                f"{path}: the data and config give another partition of the clients than the run's; "
                "resume with the run's data, or start a new run"
            )
    else:  # a run written before manifests, killed before clients.json
        atomic_write(path, (dumps(clients, indent=2) + "\n").encode())


def _read_back(value):
    return json.loads(dumps(value))


def check_checkpoints(directory: Path, config: Config, manifest: dict | None, saved: dict) -> None:
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
