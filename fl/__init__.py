"""Federated simulation of Fed-PLoRA and its baselines: data, partitions, strategies, costs, runs.

- ``run_experiment`` / ``resume_experiment``: a whole run from a ``Config`` (``load_config``), as
  ``fed-plora run`` / ``fed-plora resume`` do it;
- ``load_study`` / ``run_study`` / ``write_report``: a grid of settings × seeds (``fed-plora study``);
- ``run_reference``: a reference row (untrained, majority, centralised, local-only);
- ``simulate``: one method's rounds with the clients in this process;
- ``Server``: any strategy's rounds wherever its clients train (``FederatedServer``: a run's, with
  evaluation and costs); ``initial_adapter``: a run's starting adapter, for a strategy of one's own;
- ``fl.strategies``: the methods (``FedPLoRA``, ``FedIT``, ``FLoRA``, ``HetLoRA``, ``FlexLoRA``);
  ``fl.flower``: the same on Flower.
"""

from .config import Config, ConfigError, load_config
from .experiment import RunDirectoryError, RunFailed, resume_experiment, run_experiment
from .model import initial_adapter
from .references import run_reference
from .rounds import Server
from .server import FederatedServer
from .simulator import simulate
from .study import run_study
from .study_config import StudyError, load_study
from .study_report import write_report

__all__ = [
    "Config",
    "ConfigError",
    "FederatedServer",
    "RunDirectoryError",
    "RunFailed",
    "Server",
    "StudyError",
    "initial_adapter",
    "load_config",
    "load_study",
    "resume_experiment",
    "run_experiment",
    "run_reference",
    "run_study",
    "simulate",
    "write_report",
]
