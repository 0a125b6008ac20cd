"""``fed-plora run``: one command for any method on any task, from a config file and flags;
``fed-plora resume <run_dir>``: continue a killed run; ``fed-plora study --config <study.toml>``: a grid of
settings × seeds × methods, resumable, with its report (``fl.study``); ``fed-plora config [section]``: every
config field with its type, default, what it allows and what it does.

Exit status: 0 on success; 1 when the run finished but, for some method, every client of every round
failed (its results are the untrained model's); 2 when the run was refused before it started (a bad
config, a run directory in the way or changed, unreadable data): nothing was written then.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .config import SECTIONS, ConfigError, field_rows, load_config, toml_literal
from .data import TASKS, DataError
from .rounds.checkpoint import CheckpointError
from .storage import FileFormatError, InUseError, UnsafePathError, exclusive_lock
from .strategies import STRATEGIES

#: Errors that stop a run with a message and exit status 2 (no traceback): a bad config, a run directory
#: that cannot be used (``run.rundir.RunDirectoryError``), data or files that cannot be read.
REFUSALS = (ConfigError, DataError, CheckpointError, FileFormatError, UnsafePathError, InUseError, FileNotFoundError)

#: Flags that are shortcuts for ``--set section.key=value``.
SHORTCUTS = {
    "task": "task.name",
    "data_dir": "task.data_dir",
    "train_file": "task.train_file",
    "eval_file": "task.eval_file",
    "model": "model.name",
    "rounds": "federation.rounds",
    "clients": "federation.clients",
    "seed": "run.seed",
    "name": "run.name",
    "out_dir": "run.out_dir",
    "device": "run.device",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fed-plora", description="Heterogeneous federated fine-tuning: Fed-PLoRA and baselines.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="simulate one or more methods and write a run directory")
    run.add_argument("--config", help="TOML config file (sections run, task, model, federation, train, methods)")
    run.add_argument("--methods", help=f"comma-separated, from: {', '.join(STRATEGIES)}")
    run.add_argument("--task", help=f"one of: {', '.join(TASKS)}, or custom (your own files: --train-file)")
    run.add_argument("--data-dir", help="local data directory (layout of shared/data); default $FED_PLORA_DATA, else the Hub")
    run.add_argument("--train-file", help="task custom: your training data (.csv, .tsv, .json, .jsonl; docs/fl.md)")
    run.add_argument("--eval-file", help="task custom: your eval data (default: a seeded share of the train file)")
    run.add_argument("--model", help="'minilm', a local model directory or a Hub id")
    run.add_argument("--rounds", type=int)
    run.add_argument("--clients", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--name", help="run directory name under run.out_dir")
    run.add_argument("--out-dir")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config field (repeatable), a method's option as methods.<method>.key=value",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace the run already in the run directory (its logs and checkpoints)"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    resume = sub.add_parser("resume", help="continue a killed run from its last per-round checkpoint")
    resume.add_argument("run_dir", help="the run directory (holds config.json and checkpoints/)")
    resume.add_argument("--data-dir", help="where the run's data now lies, if it moved")
    resume.add_argument("--no-progress", action="store_true", help="no progress bars")
    listing = sub.add_parser("config", help="list every config field: type, default, what it allows, what it does")
    listing.add_argument(
        "section", nargs="?", help="only this section (run, task, model, federation, train, methods, references)"
    )
    listing.add_argument("--markdown", action="store_true", help="as a Markdown table (docs/config.md is this)")
    study = sub.add_parser("study", help="run a grid of settings × seeds × methods (resumable) and report it (docs/study.md)")
    study.add_argument("--config", required=True, help="the study's TOML file ([study], [common], [settings.<name>])")
    study.add_argument("--workers", type=int, help="processes of one thread each (default: the study's workers; 1: here)")
    study.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the cells as Ray tasks of one thread: a cluster's address (host:port, ray://host:port), auto (the "
        "cluster this machine joined with `ray start`), or local (a Ray instance here with --workers CPUs)",
    )
    study.add_argument("--seeds", help="comma-separated: run only these of the study's seeds")
    study.add_argument("--only", help="comma-separated: run only these settings")
    study.add_argument("--data-dir", help="local data directory for every cell (as run's --data-dir; may change between reruns)")
    study.add_argument("--report-only", action="store_true", help="run nothing: report the finished cells")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    from .run.experiment import RunFailed
    from .run.rundir import RunDirectoryError

    try:
        return _run(args, argv)
    except RunFailed as failed:
        print(f"\n{failed.table}\n\nrun directory: {failed.directory}", flush=True)
        print(f"fed-plora: error: {failed}", file=sys.stderr)
        return 1
    except (RunDirectoryError, *REFUSALS) as error:
        print(f"fed-plora: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "config":
        try:
            print(config_listing(args.section, args.markdown), flush=True)
        except BrokenPipeError:  # piped into `head`: stop quietly (stdout to devnull, so exit does not flush again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    _quiet_transformers()
    command = "fed-plora " + " ".join(shlex.quote(a) for a in argv)
    if args.command == "study":
        return _study(args)
    if args.command == "resume":
        from .run.experiment import resume_experiment

        directory, table = resume_experiment(args.run_dir, progress=not args.no_progress, data_dir=args.data_dir)
        print(f"\n{table}\n\nrun directory: {directory} (resumed)")
        return 0
    overrides = [
        f"{key}={toml_literal(getattr(args, flag))}" for flag, key in SHORTCUTS.items() if getattr(args, flag) is not None
    ]
    if args.methods:
        overrides.append(f"methods.names={toml_literal([m.strip() for m in args.methods.split(',') if m.strip()])}")
    try:
        config = load_config(args.config, overrides + args.set)
    except (KeyError, TypeError, ValueError) as error:  # unknown keys, a value for a table, a bad value
        raise ConfigError(error.args[0] if error.args else str(error)) from None
    from .run.experiment import run_experiment  # heavy imports only when running

    directory, table = run_experiment(config, command, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"\n{table}\n\nrun directory: {directory} (metrics.jsonl, curves.png, summary.md)")
    return 0


def config_listing(section: str | None = None, markdown: bool = False) -> str:
    """Every config field (of ``section`` only, when given): its type, default, what it allows, what it does;
    as plain text, or as a Markdown table."""
    if section is not None and section not in SECTIONS:
        raise ConfigError(f"config {section!r}: not a section; the sections are {', '.join(SECTIONS)}")
    rows = [r for r in field_rows() if section is None or r["field"].split(".")[0] == section]
    if not markdown:
        return "\n".join(f"{r['field']}: {r['type']} = {r['default']}\n    {r['help']} ({r['allowed']})" for r in rows)

    def cell(text: str, code: bool = False) -> str:
        text = text.replace("\\", "\\\\").replace("|", "\\|")
        return f"`{text}`" if code else text.replace("<", "&lt;")

    lines = ["| field | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for r in rows:
        code = [cell(r[k], code=True) for k in ("field", "type", "default")]
        lines.append("| " + " | ".join([*code, cell(r["allowed"]), cell(r["help"])]) + " |")
    return "\n".join(lines)


def _study(args: argparse.Namespace) -> int:
    """``fed-plora study``: 0 when every cell run now finished, 1 when some failed (the report marks them)."""
    from .study.cells import check_recorded
    from .study.config import StudyError, load_study
    from .study.report import write_report
    from .study.runner import run_study

    def listed(text: str | None, kind):
        try:
            return None if text is None else [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise StudyError(f"not a comma-separated list of {kind.__name__}: {text!r}") from None

    if args.workers is not None and args.workers < 1:
        raise StudyError(f"--workers {args.workers}: must be >= 1")
    study = load_study(args.config)
    if args.data_dir is not None:
        for cell in study.cells:
            cell.config.task.data_dir = args.data_dir
    if args.report_only:
        with exclusive_lock(study.directory, "fed-plora study"):
            check_recorded(study.cells)
            print(f"report: {write_report(study)}")
        return 0
    try:
        outcome = run_study(
            study, args.workers, listed(args.seeds, int), listed(args.only, str), progress=not args.no_progress, ray=args.ray
        )
    except KeyboardInterrupt:
        again = f"fed-plora study --config {shlex.quote(args.config)}"
        print(f"\nfed-plora: interrupted; every cell is resumable: run `{again}` again", file=sys.stderr)
        return 130
    print(
        f"\ncells: {len(outcome.ran)} run, {len(outcome.skipped)} already finished, {len(outcome.failed)} failed\n"
        f"results: {outcome.directory / 'results.jsonl'}\nreport: {outcome.report}"
    )
    for name, error in outcome.failed.items():
        print(f"fed-plora: error: cell {name}: {error.splitlines()[0]}", file=sys.stderr)
    return 1 if outcome.failed else 0


def _quiet_transformers() -> None:
    """No load reports (a fresh head is expected) and no download bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
