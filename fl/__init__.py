"""Federated fine-tuning of Fed-PLoRA and its baselines: runs, studies, and the parts they are built from.

The run and study API (``fed-plora run`` / ``resume`` / ``study`` do exactly this):

- ``load_config`` → ``Config``; ``run_experiment`` / ``resume_experiment``: a whole run directory;
- ``load_study`` → ``run_study`` → ``write_report``: a grid of settings × seeds.

The map, from the bottom up (a module imports only from the rows above it or its own package):

- ``storage``: crash-safe files and checksums; ``device``: device and precision;
- ``data``: tasks, their files or Hub datasets, partitions over clients, tokenisation, metrics;
- ``strategies``: the methods on plain tensors, one file each, and their registry;
- ``privacy``: client-level differential privacy (a round's clipped, noised sums; their accounting);
- ``config``: the run configuration, each field with its rule;
- ``model``: the backbone, PLoRA injected, adapter values in and out;
- ``measures``: traffic, FLOPs, noise, evaluation, memory;
- ``federation``: a run's data, client shards and rank budgets (what every transport shares);
- ``rounds``: one method's rounds wherever clients train (``Server``, ``RunServer``, client ``fit``,
  the schedule, checks, checkpoints, ``simulate``);
- ``run``: one run directory (``run_experiment``, the directory's checks, reference rows, report);
- ``study``: a grid of runs and its report;
- ``flower``: the same rounds with clients on Flower nodes; ``cli``: the ``fed-plora`` command.
"""

from .config import Config, ConfigError, load_config
from .run.experiment import RunFailed, resume_experiment, run_experiment
from .run.rundir import RunDirectoryError
from .study.config import StudyError, load_study
from .study.report import write_report
from .study.runner import run_study

__all__ = [
    "Config",
    "ConfigError",
    "RunDirectoryError",
    "RunFailed",
    "StudyError",
    "load_config",
    "load_study",
    "resume_experiment",
    "run_experiment",
    "run_study",
    "write_report",
]
