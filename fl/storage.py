"""Crash-safe files: whole files written atomically (temporary file, fsync, rename), JSON lines appended
whole and read back without a torn last line; standard JSON only, and checksums.

JSON has no NaN or infinity: a non-finite float is written as the string ``"NaN"``, ``"Infinity"`` or
``"-Infinity"`` (``float()`` of each gives the value back; ``restore_floats`` does it for a record). Every
JSON error names its file (and line, for JSON lines). Files are created without following a symbolic
link planted at their place.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: How a non-finite float is written (JSON has no such numbers).
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class UnsafePathError(ValueError):
    """A path a run or study would write through that is a link, or a directory's place taken by a file."""


class InUseError(RuntimeError):
    """A directory another process is writing (it holds the directory's lock)."""


class FileFormatError(ValueError):
    """A file of a run that cannot be read as what it should be; the message names the file."""


def finite_json(value):
    """``value`` with every non-finite float replaced by its string (``NONFINITE``), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps(payload, indent: int | None = None) -> str:
    """Standard JSON (non-finite floats as strings; anything else non-standard raises)."""
    return json.dumps(finite_json(payload), indent=indent, allow_nan=False)


def restore_floats(record: dict, keep: tuple[str, ...] = ("method",)) -> dict:
    """``record`` with its top-level ``"NaN"``/``"Infinity"``/``"-Infinity"`` strings back as floats (except
    the fields ``keep``, which are strings)."""
    return {k: NONFINITE[v] if k not in keep and isinstance(v, str) and v in NONFINITE else v for k, v in record.items()}


def json_value(text: str):
    """``json.loads(text)``, with a value nested deeper than the parser can follow raised as a
    ``json.JSONDecodeError`` at its deepest point (not a ``RecursionError`` that names nothing)."""
    try:
        return json.loads(text)
    except RecursionError:
        depth, deepest, where, in_string, escaped = 0, 0, 0, False, False
        for i, ch in enumerate(text):
            if in_string:
                escaped, in_string = (False, in_string) if escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                in_string = True
            elif ch in "[{":
                depth += 1
                if depth > deepest:
                    deepest, where = depth, i
            elif ch in "]}":
                depth -= 1
        raise json.JSONDecodeError(f"nested {deepest} levels deep, deeper than the JSON reader follows", text, where) from None


def loads(text: str | bytes, path: Path, line: int | None = None):
    """The JSON value of ``text`` read from ``path`` (``line``: the line of a JSON lines file it is);
    ``FileFormatError`` naming the file, line and column."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json_value(text)
    except UnicodeDecodeError as error:
        where = f"{path}, line {line}" if line else str(path)
        raise FileFormatError(f"{where}: not UTF-8 text (byte {error.start}); the file is damaged") from None
    except json.JSONDecodeError as error:
        where = f"{path}, line {line or error.lineno}, column {error.colno}"
        raise FileFormatError(f"{where}: not valid JSON ({error.msg})") from None


def read_json(path: Path):
    """The JSON value of the file ``path`` (see ``loads``)."""
    return loads(Path(path).read_bytes(), path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_json(payload) -> str:
    """sha256 of a JSON value's canonical form (sorted keys, no spaces): the same after a write and read."""
    return sha256_bytes(json.dumps(finite_json(payload), sort_keys=True, separators=(",", ":"), allow_nan=False).encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never a part. The temporary
    file is created anew (never through a link planted at its place); ``path`` itself is replaced, so a
    link there is replaced, not followed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a crash's leftover
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def ensure_directory(path: Path) -> Path:
    """``path`` as a directory to write into, made (with its parents) where missing; ``UnsafePathError``
    when it is a link or not a directory (files are never written through a link)."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafePathError(f"{path} is a link: files are written into a directory, never through a link")
    if path.exists() and not path.is_dir():
        raise UnsafePathError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


#: The file a directory's lock is held on (``exclusive_lock``).
LOCK_FILE = ".lock"


@contextmanager
def exclusive_lock(directory: Path, user: str) -> Iterator[None]:
    """Hold ``directory``'s lock while the block runs: an advisory ``flock`` on its file ``.lock``, opened for
    writing (so that it also excludes across machines on NFS) and released by the system when the process
    ends, even killed. ``InUseError`` naming ``user`` (what takes it, e.g. "fed-plora study") when another
    process holds it. The directory (and its parents) is made where missing; if the block leaves what was
    made holding nothing but the lock file, both are removed: a refused or failed command leaves no trace."""
    directory = Path(directory)
    made = [p for p in (directory, *directory.parents) if not p.exists()]
    directory = ensure_directory(directory)
    lock = directory / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InUseError(f"{directory} is in use by another {user}: wait for it to end, or stop it") from None
    try:
        yield
    finally:
        if made and [p.name for p in directory.iterdir()] == [LOCK_FILE]:  # removed while the lock is held
            lock.unlink()
            for path in made:  # the directory, then the parents made for it
                if any(path.iterdir()):
                    break
                path.rmdir()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_figure(path: Path, figure) -> Path:
    """A matplotlib ``figure`` as PNG at ``path``, written with ``atomic_write`` (never through a link)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def atomic_write_json(path: Path, payload) -> None:
    atomic_write(path, (dumps(payload, indent=2) + "\n").encode())


def append_jsonl(path: Path, record: dict) -> None:
    """Append ``record`` as one line in a single write, then fsync: earlier lines are never touched."""
    line = (dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"{path}: short append ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of ``path``; a last line without its newline (a torn write) is ignored. A line
    that is not JSON raises ``FileFormatError`` naming the file and line."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")[:-1]  # the part after the last newline is incomplete or empty
    out = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            out.append(loads(line, path, number))
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace ``path`` atomically with ``records``, one per line."""
    atomic_write(path, "".join(dumps(r) + "\n" for r in records).encode())


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
