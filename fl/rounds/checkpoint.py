"""Per-round checkpoints of one method's simulation: strategy state, RNG states and the records so far.

A checkpoint is ``<method>.round<k>.safetensors`` (tensors) plus ``<method>.json`` (everything else,
naming that tensor file). Both are written atomically, tensors first: the JSON file is the commit
point, so a crash at any moment leaves the previous or the new checkpoint whole. No pickle.

The JSON file carries the sha256 of the tensor file (``tensors_sha256``), its own sha256 (``sha256``, of
its other fields in canonical form) and the id of its run (``run``). ``load_checkpoint`` refuses
(``CheckpointError``, naming the file) a checkpoint that fails a checksum, belongs to another run, names
any tensor file but its own (``<method>.round<rounds_done>.safetensors``, in its directory), holds
non-finite tensors, or whose records are not exactly rounds ``1..rounds_done`` of its method, once each.
Checksums catch corruption and mistakes, not someone who rewrites the files and their checksums.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..storage import (
    FileFormatError,
    atomic_write,
    atomic_write_json,
    digest_json,
    ensure_directory,
    read_json,
    restore_floats,
    sha256_bytes,
)

#: The checkpoint format written; ``LEGACY_FORMAT`` (before checksums) is still read, unverified.
FORMAT = 2
LEGACY_FORMAT = 1


class CheckpointError(FileFormatError):
    """A checkpoint that is damaged, changed or not this run's; the message names the file and what is wrong."""


@dataclass
class Checkpoint:
    """The state of a method's run after ``rounds_done`` rounds."""

    method: str
    rounds_done: int
    tensors: dict[str, torch.Tensor]  # strategy tensors (see ``Strategy.state``)
    meta: dict  # strategy's JSON state
    rng: dict  # see ``capture_rng``
    records: list[dict]
    format: int = FORMAT  # as read: ``LEGACY_FORMAT`` for a checkpoint written before checksums


def capture_rng() -> dict:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as JSON-able values."""
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def tensor_file(method: str, rounds_done: int) -> str:
    """The name of ``method``'s tensor file after ``rounds_done`` rounds (in the checkpoint directory)."""
    return f"{method}.round{rounds_done}.safetensors"


def save_checkpoint(directory: Path, checkpoint: Checkpoint, run: str | None = None) -> None:
    """Write ``checkpoint`` under ``directory`` (``run``: the run's id, checked on load) and delete the
    tensor files it supersedes (only ``<method>.round<k>.safetensors`` files of that directory)."""
    directory = Path(directory)
    ensure_directory(directory)
    name = tensor_file(checkpoint.method, checkpoint.rounds_done)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in checkpoint.tensors.items()}
    data = save_tensors(tensors)
    atomic_write(directory / name, data)
    body = {
        "format": FORMAT,
        "method": checkpoint.method,
        "run": run,
        "rounds_done": checkpoint.rounds_done,
        "tensors": name,
        "tensors_sha256": sha256_bytes(data),
        "strategy": checkpoint.meta,
        "rng": checkpoint.rng,
        "records": checkpoint.records,
    }
    atomic_write_json(directory / f"{checkpoint.method}.json", {**body, "sha256": digest_json(body)})
    superseded = re.compile(re.escape(checkpoint.method) + r"\.round\d+\.safetensors")
    for path in directory.iterdir():
        if path.name != name and superseded.fullmatch(path.name):
            path.unlink(missing_ok=True)


def load_checkpoint(directory: Path, method: str, run: str | None = None) -> Checkpoint | None:
    """The latest checkpoint of ``method`` under ``directory``, or None when there is none; checked as the
    module says (``run``: the run's id, when known: its checkpoints carry checksums, and one without is
    refused). ``CheckpointError`` names the file and the problem."""
    directory = Path(directory)
    index = directory / f"{method}.json"
    if not index.exists() and not index.is_symlink():
        return None
    if index.is_symlink() or not index.is_file():
        raise CheckpointError(f"{index}: not a plain file (a checkpoint is never a link)")
    try:
        payload = read_json(index)
    except FileFormatError as error:
        raise CheckpointError(f"checkpoint {error}; the checkpoint is damaged") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{index}: expected a JSON object, got {type(payload).__name__}")
    fmt = payload.get("format")
    if fmt not in (FORMAT, LEGACY_FORMAT):
        raise CheckpointError(f"{index}: checkpoint format {fmt!r}, this version reads {FORMAT} (and {LEGACY_FORMAT})")
    if fmt == LEGACY_FORMAT and run is not None:
        raise CheckpointError(
            f"{index}: format {LEGACY_FORMAT} (no checksums) in run {run!r}, whose checkpoints all carry them: "
            "changed or damaged since it was written"
        )
    if fmt == FORMAT:
        body = {k: v for k, v in payload.items() if k != "sha256"}
        if payload.get("sha256") != digest_json(body):
            raise CheckpointError(f"{index}: its content does not match its checksum (changed or damaged since it was written)")
        if run is not None and payload.get("run") != run:
            raise CheckpointError(f"{index}: written by another run ({payload.get('run')!r}, this run is {run!r})")
    rounds = payload.get("rounds_done")
    if payload.get("method") != method:
        raise CheckpointError(f"{index}: the checkpoint of method {payload.get('method')!r}, expected {method!r}")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise CheckpointError(f"{index}: rounds_done = {rounds!r}, expected an integer >= 1")
    name = tensor_file(method, rounds)
    if payload.get("tensors") != name:
        raise CheckpointError(
            f"{index}: names the tensor file {payload.get('tensors')!r}, expected {name!r} (rounds_done = {rounds})"
        )
    path = directory / name
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{index}: its tensor file {path} is missing or not a plain file")
    data = path.read_bytes()
    if fmt == FORMAT and sha256_bytes(data) != payload.get("tensors_sha256"):
        raise CheckpointError(f"{path}: does not match the checksum in {index.name} (changed or damaged since it was written)")
    try:
        tensors = load_tensors(data)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {key!r} holds non-finite values (a saved global state never does)")
    records = payload.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CheckpointError(f"{index}: records must be a list of objects")
    found = [(r.get("method"), r.get("round")) for r in records]
    if found != [(method, k) for k in range(1, rounds + 1)]:
        raise CheckpointError(
            f"{index}: rounds_done = {rounds} but its records are rounds {[k for _, k in found]} "
            f"(expected rounds 1..{rounds} of {method}, once each)"
        )
    if not isinstance(payload.get("strategy"), dict) or not isinstance(payload.get("rng"), dict):
        raise CheckpointError(f"{index}: strategy and rng must be JSON objects")
    if set(payload["rng"]) - {"cuda"} != {"torch", "numpy", "python"}:
        raise CheckpointError(f"{index}: rng must hold the torch, numpy and python states, got {sorted(payload['rng'])}")
    records = [restore_floats(r) for r in records]
    return Checkpoint(method, rounds, tensors, payload["strategy"], payload["rng"], records, fmt)


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _python_state() -> list:
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]
