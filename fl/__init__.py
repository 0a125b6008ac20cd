"""Federated simulation of Fed-PLoRA and its baselines: data, partitions, strategies, costs, runs.

- ``run_experiment`` / ``resume_experiment``: a whole run from a ``Config`` (``load_config``), as
  ``fed-plora run`` / ``fed-plora resume`` do it;
- ``simulate``: one method's rounds with the clients in this process;
- ``Server``: any strategy's rounds wherever its clients train (``FederatedServer``: a run's, with
  evaluation and costs); ``initial_adapter``: a run's starting adapter, for a strategy of one's own;
- ``fl.strategies``: the methods (``FedPLoRA``, ``FedIT``, ``FLoRA``, ``HetLoRA``, ``FlexLoRA``);
  ``fl.flower``: the same on Flower.
"""

from .config import Config, load_config
from .experiment import resume_experiment, run_experiment
from .model import initial_adapter
from .rounds import Server
from .server import FederatedServer
from .simulator import simulate

__all__ = [
    "Config",
    "FederatedServer",
    "Server",
    "initial_adapter",
    "load_config",
    "resume_experiment",
    "run_experiment",
    "simulate",
]
