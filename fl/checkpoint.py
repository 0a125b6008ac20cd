"""Per-round checkpoints of one method's simulation: strategy state, RNG states and the records so far.

A checkpoint is ``<method>.round<k>.safetensors`` (tensors) plus ``<method>.json`` (everything else,
naming that tensor file). Both are written atomically, tensors first: the JSON file is the commit
point, so a crash at any moment leaves the previous or the new checkpoint whole. No pickle.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .storage import atomic_write, atomic_write_json

FORMAT = 1


@dataclass
class Checkpoint:
    """The state of a method's run after ``rounds_done`` rounds."""

    method: str
    rounds_done: int
    tensors: dict[str, torch.Tensor]  # strategy tensors (see ``Strategy.state``)
    meta: dict  # strategy's JSON state
    rng: dict  # see ``capture_rng``
    records: list[dict]


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


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` under ``directory`` and delete the tensor file it supersedes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = directory / f"{checkpoint.method}.json"
    previous = json.loads(index.read_text())["tensors"] if index.exists() else None
    name = f"{checkpoint.method}.round{checkpoint.rounds_done}.safetensors"
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in checkpoint.tensors.items()}
    atomic_write(directory / name, save_tensors(tensors))
    atomic_write_json(
        index,
        {
            "format": FORMAT,
            "method": checkpoint.method,
            "rounds_done": checkpoint.rounds_done,
            "tensors": name,
            "strategy": checkpoint.meta,
            "rng": checkpoint.rng,
            "records": checkpoint.records,
        },
    )
    if previous is not None and previous != name:
        (directory / previous).unlink(missing_ok=True)


def load_checkpoint(directory: Path, method: str) -> Checkpoint | None:
    """The latest checkpoint of ``method`` under ``directory``, or None when there is none."""
    index = Path(directory) / f"{method}.json"
    if not index.exists():
        return None
    payload = json.loads(index.read_text())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{index}: checkpoint format {payload.get('format')!r}, this version reads {FORMAT}")
    tensors = load_tensors((Path(directory) / payload["tensors"]).read_bytes())
    return Checkpoint(method, payload["rounds_done"], tensors, payload["strategy"], payload["rng"], payload["records"])


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _python_state() -> list:
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]
