"""``fed-plora study``: run a study's cells (one run directory per setting and seed, every method in it), one
after another, in worker processes of one thread each, or as Ray tasks of one thread each (on a cluster), then
write its results and report.

Resumable: a finished cell is skipped, a started one continues from its checkpoints (``run_experiment``
with ``resume``), and a cell whose run was started under another config than the study now gives is refused
before any cell runs. A cell that fails is reported and the others go on.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from ..config import Config, ConfigError
from ..storage import exclusive_lock
from .cells import cell_state, check_recorded
from .config import Cell, Study, StudyError

#: Thread settings of a worker process, in its environment before it imports torch.
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
#: How often Ray runs a cell's task again when its worker process or node died (each time resuming the cell).
RAY_RETRIES = 3


@dataclass
class StudyOutcome:
    """What a study command did: cells skipped (finished before), run now, failed now (name -> error)."""

    directory: Path
    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: Path | None = None


def select(study: Study, seeds: list[int] | None = None, only: list[str] | None = None) -> list[Cell]:
    """The study's cells of ``only`` (setting names) and ``seeds`` (both: all by default); ``StudyError``
    for a name or seed the study does not have."""
    unknown = [s for s in only or () if s not in study.settings]
    if unknown:
        raise StudyError(f"study {study.path}: no setting {', '.join(map(repr, unknown))}; settings: {', '.join(study.settings)}")
    missing = [s for s in seeds or () if s not in study.seeds]
    if missing:
        raise StudyError(f"study {study.path}: seeds {missing} are not the study's {study.seeds} (add them to [study] seeds)")
    return [c for c in study.cells if (not only or c.setting in only) and (seeds is None or c.seed in seeds)]


def run_study(
    study: Study,
    workers: int | None = None,
    seeds: list[int] | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    report: bool = True,
    ray: str | None = None,
) -> StudyOutcome:
    """Run the selected cells not yet finished, then (``report``) write the whole study's ``results.jsonl``,
    ``report.md``, ``summary.json`` and plots. ``workers`` (default the study's): 1 runs the cells in this
    process, with its threads; more runs them in that many processes of one thread each (even a single cell,
    so that a cell's numbers do not depend on what else runs). ``ray``: run them as Ray tasks of one CPU and
    one thread each instead, on the cluster at that address (``"auto"``: the one this machine joined) or, for
    ``"local"``, on a Ray instance started here with ``workers`` CPUs. Every recorded config is checked first
    (``check_recorded``); a KeyboardInterrupt stops the study with every cell resumable. The study's directory
    is locked meanwhile: a second command on it is refused (``InUseError``)."""
    if ray is not None and ray != "local" and workers is not None:
        raise StudyError(
            f"--workers {workers} with --ray {ray}: a Ray cluster runs as many cells at once as it has CPUs (one each); "
            "--workers sizes only a local Ray instance (--ray local)"
        )
    if ray == "":
        raise StudyError("--ray: expected a Ray cluster's address (host:port), auto, or local")
    cells = select(study, seeds, only)
    with exclusive_lock(study.directory, "fed-plora study"):
        return _run_cells(study, cells, workers, progress, report, ray)


def _run_cells(
    study: Study, cells: list[Cell], workers: int | None, progress: bool, report: bool, ray: str | None
) -> StudyOutcome:
    check_recorded(study.cells)
    outcome = StudyOutcome(study.directory)
    states = {c.name: cell_state(c) for c in cells}
    outcome.skipped = [c.name for c in cells if states[c.name] == "finished"]
    pending = [c for c in cells if states[c.name] != "finished"]
    workers = workers or study.workers
    bar = tqdm(total=len(cells), initial=len(outcome.skipped), desc=study.name, unit="cell", disable=not progress)
    command = f"fed-plora study --config {shlex.quote(str(study.path))}"

    def done(result: dict) -> None:
        name = f"{result['setting']}/seed{result['seed']}"
        if result["error"] is None:
            outcome.ran.append(name)
            tqdm.write(f"cell {name}: finished in {result['seconds']:.0f} s")
        else:
            outcome.failed[name] = result["error"]
            tqdm.write(f"cell {name}: FAILED: {result['error']}")
        bar.update()

    try:
        if ray is not None and pending:
            _run_on_ray(pending, command, ray, workers, done)
        elif workers == 1 or not pending:
            for cell in pending:
                bar.set_postfix_str(f"{cell.name} ({states[cell.name]}), {len(outcome.failed)} failed")
                done(run_cell(cell.setting, cell.seed, cell.config.to_dict(), command, states[cell.name], progress))
        else:
            _run_parallel(pending, states, command, min(workers, len(pending)), done)
    finally:
        bar.close()
    if report:
        from .report import write_report  # matplotlib only when reporting

        outcome.report = write_report(study, outcome.failed)
    return outcome


def _run_parallel(pending: list[Cell], states: dict, command: str, workers: int, done) -> None:
    """The cells in ``workers`` spawned processes of one thread each; ``done(result)`` as each ends. On
    Ctrl-C or SIGTERM the workers are terminated (every cell stays resumable: a run's files are written
    atomically) and KeyboardInterrupt is raised."""
    with _environment(_ONE_THREAD), _sigterm_interrupts():
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_worker_process)
        try:
            futures = {
                pool.submit(run_cell, c.setting, c.seed, c.config.to_dict(), command, states[c.name], False): c for c in pending
            }
            for future in as_completed(futures):
                cell = futures[future]
                try:
                    done(future.result())
                except Exception as error:  # the worker process died (killed, out of memory)
                    done({"setting": cell.setting, "seed": cell.seed, "error": f"{type(error).__name__}: {error}"})
        except BaseException:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


def run_cell(setting: str, seed: int, config: dict, command: str, state: str, progress: bool) -> dict:
    """Run (``state`` "new") or resume (``state`` "started") one cell from its config dict; the outcome as a
    plain dict (``error``: None or the exception's type and message) so that it crosses processes."""
    from ..run.experiment import RunFailed, run_experiment  # heavy imports only when running

    started = time.monotonic()
    error = None
    try:
        run_experiment(Config.from_dict(config), f"{command}  # cell {setting}/seed{seed}", progress, resume=state == "started")
    except Exception as exc:  # reported with the cell; the other cells go on
        error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, (ConfigError, ValueError, OSError, RunFailed)):
            error += "\n" + traceback.format_exc(limit=-3)
    return {"setting": setting, "seed": seed, "error": error, "seconds": time.monotonic() - started}


def _run_on_ray(pending: list[Cell], command: str, address: str, workers: int, done) -> None:
    """The cells as Ray tasks of one CPU and one thread each, in this command's working directory on whichever
    node runs them; ``done(result)`` as each ends. A task whose worker or node dies is run again by Ray (up to
    ``RAY_RETRIES`` times) and resumes the cell from its checkpoints. Ray is left (a local instance shut down)
    at the end; on Ctrl-C or SIGTERM the tasks are cancelled first and KeyboardInterrupt is raised."""
    import ray

    local = address == "local"
    with warnings.catch_warnings():  # a notice of a future change of Ray's about GPUs, for tasks that ask none
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
        try:
            where = {"num_cpus": workers, "include_dashboard": False} if local else {"address": address}
            ray.init(**where, logging_level=logging.WARNING)  # no notice of the start or the connection
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise StudyError(f"--ray {address}: no Ray cluster to join ({error})") from None
    try:
        task = ray.remote(_ray_cell).options(num_cpus=1, max_retries=RAY_RETRIES, runtime_env={"env_vars": _ONE_THREAD})
        here = os.getcwd()
        running = {task.remote(c.setting, c.seed, c.config.to_dict(), command, here): c for c in pending}
        try:
            with _sigterm_interrupts():
                while running:
                    (ref,), _ = ray.wait(list(running), num_returns=1)
                    cell = running.pop(ref)
                    try:
                        done(ray.get(ref))
                    except ray.exceptions.RayError as error:  # every try's worker died, or the task could not start
                        done({"setting": cell.setting, "seed": cell.seed, "error": f"{type(error).__name__}: {error}"})
        except BaseException:
            for ref in running:
                ray.cancel(ref, force=True)
            raise
    finally:
        ray.shutdown()


def _ray_cell(setting: str, seed: int, config: dict, command: str, directory: str) -> dict:
    """One cell as a Ray task: in ``directory`` (the command's working directory, where the study's relative
    paths lead), one thread, the cell's state read from its run directory here, so that a try after a dead
    worker or node resumes what the earlier try left."""
    os.chdir(directory)
    _one_thread()
    state = cell_state(Cell(setting, seed, Config.from_dict(config)))
    return run_cell(setting, seed, config, command, "new" if state == "new" else "started", False)


def _worker_process() -> None:
    """A worker process's set-up: Ctrl-C left to the parent (which stops the workers), then ``_one_thread``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _one_thread()


def _one_thread() -> None:
    """One torch thread, no transformers load reports or download bars."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    with suppress(RuntimeError):  # already set, or inter-op work already ran
        torch.set_num_interop_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while inside (in the main thread), so that the workers are stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _environment(values: dict) -> Iterator[None]:
    """``os.environ`` with ``values`` (where not set already) while inside; as before afterwards."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
