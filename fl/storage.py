"""Crash-safe files: whole files written atomically (temporary file, fsync, rename), JSON lines appended
whole and read back without a torn last line."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def atomic_write_json(path: Path, payload) -> None:
    atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode())


def append_jsonl(path: Path, record: dict) -> None:
    """Append ``record`` as one line in a single write, then fsync: earlier lines are never touched."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"{path}: short append ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of ``path``; a last line without its newline (a torn write) is ignored."""
    text = Path(path).read_text() if Path(path).exists() else ""
    lines = text.split("\n")[:-1]  # the part after the last newline is incomplete or empty
    return [json.loads(line) for line in lines if line]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace ``path`` atomically with ``records``, one per line."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
