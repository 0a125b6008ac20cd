"""Shared pieces of the benchmarks: environment record, CUDA-synchronised timing, JSON results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def bench_device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


def commit() -> str | None:
    """The checkout's HEAD commit, or None outside a git checkout (a copied tree, no git)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS_DIR.parent, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def environment() -> dict:
    """Device and versions, recorded with every result."""
    import triton

    info = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "commit": commit(),
    }
    if on_gpu():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        info["device"] = "cpu"
    return info


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation: what pytest-benchmark should time."""

    def call() -> None:
        fn()
        synchronize()

    return call


def median_ms(fn: Callable[[], object], warmup: int = 3, repeat: int = 10) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU (``do_bench``), host clock otherwise."""
    if on_gpu():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def entry_ms(entry: dict | None) -> float | None:
    """A pytest-benchmark entry's time in ms: the CUDA-event median where measured (GPU), else pytest-benchmark's
    synchronised median; None without an entry."""
    if entry is None:
        return None
    events = entry["extra_info"].get("median_ms_events")
    return events if events is not None else entry["stats"]["median"] * 1e3


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, None where either is missing."""
    return None if num is None or den is None else num / den


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """``torch.cuda.max_memory_allocated`` over one call of ``fn`` above what was allocated before."""
    if not on_gpu():
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated() - before


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` plus the environment to ``bench/results/<name>-<device>.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment()
    device_tag = env["device"].replace(" ", "-").lower()
    path = RESULTS_DIR / f"{name}-{device_tag}.json"
    path.write_text(json.dumps({"environment": env, **payload}, indent=2) + "\n")
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table of ``rows`` restricted to ``columns`` (floats to 3 significant digits)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "-" if value is None else str(value)

    grid = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_suite(suite: Path, pytest_args: list[str]) -> dict | None:
    """Run a pytest-benchmark ``suite`` file and return its JSON record (None, with a message, if it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        code = pytest.main([str(suite), "-q", "-p", "no:cacheprovider", f"--benchmark-json={raw_path}", *pytest_args])
        if code != 0 or not raw_path.exists():
            print(f"benchmark run failed (pytest exit code {code})", file=sys.stderr)
            return None
        return json.loads(raw_path.read_text())


#: What a benchmark prints after its table when it ran on the CPU.
CPU_SMOKE = "\n(CPU smoke run through the Triton interpreter: the ratios say nothing about GPU speed.)"


def run_and_record(
    name: str, suite: Path, pytest_args: list[str], summarise: Callable[[list[dict]], list[dict]], columns: list[str]
) -> int:
    """Run the pytest-benchmark ``suite``, summarise its entries into rows, print them (``columns``) and write
    ``bench/results/<name>-<device>.json`` with the raw record; the exit status (1 when the suite failed)."""
    raw = run_suite(suite, pytest_args)
    if raw is None:
        return 1
    rows = summarise(raw["benchmarks"])
    print()
    print(format_table(rows, columns))
    if not on_gpu():
        print(CPU_SMOKE)
    path = write_result(name, {"rows": rows, "pytest_benchmark": raw})
    print(f"\nwrote {path}")
    return 0
