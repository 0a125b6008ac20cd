"""One method's rounds, wherever its clients train.

- ``server``: ``Server``, a strategy's rounds (sampling, plans, screening of every update and claim,
  aggregation, the round's record), with a hook for what a server measures;
- ``run_server``: ``RunServer``, the server of a ``fed-plora`` run (the global model, its evaluation, each
  round's costs, noise, timings and memory);
- ``client``: what a client does in a round (``fit``: load, fold, train, read back, unfold);
- ``schedule``: the round plan every method and reference shares (sampled clients, local steps, learning
  rate, seeds, evaluated rounds);
- ``validate``: the checks on a client's update and claims;
- ``checkpoint``: the state after a round, on disk;
- ``simulate``: the clients in this process, one after another on one model.
"""

from .client import TrainStats, fit
from .run_server import RunServer
from .server import ClientResult, RoundOutcome, RoundPlan, Server
from .simulate import simulate

__all__ = ["ClientResult", "RoundOutcome", "RoundPlan", "RunServer", "Server", "TrainStats", "fit", "simulate"]
