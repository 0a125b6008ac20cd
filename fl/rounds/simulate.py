"""The federated simulation of one method: one base model in memory, the clients in turn on it.

Per round the server (``RunServer``) samples and configures the clients; each client then loads
its plan's adapter into the shared model, Select-N-Folds (``pristine``, so that ``unfold`` restores
the base bit-exactly before the next client), trains locally and reads back; the server validates,
aggregates, evaluates and hands out a checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..config import Config
from ..federation import Federation
from .checkpoint import Checkpoint
from .client import fit, fit_settings
from .run_server import RunServer
from .server import ClientResult


def simulate(
    config: Config,
    method: str,
    fed: Federation,
    model: torch.nn.Module,
    tokenizer,
    autocast_dtype: torch.dtype | None,
    on_round: Callable[[dict], None] = lambda record: None,
    *,
    resume: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] = lambda checkpoint: None,
    client_fit: Callable = fit,
) -> list[dict]:
    """Run ``method`` for ``config.federation.rounds`` rounds on ``model`` (a freshly loaded backbone,
    injected here). Returns one record per round (see the README section for the fields).

    ``resume``: continue from that checkpoint (the same config); ``on_checkpoint`` receives one after
    every round, before ``on_round`` sees its record. ``client_fit`` runs one client's round (``fit``).
    A client whose fit raises is dropped from the round, an update that fails validation is rejected;
    both are listed in the record's ``faults``.
    """
    server = RunServer(config, method, fed, model, tokenizer, autocast_dtype, resume)
    while server.rounds_done < config.federation.rounds:
        planned = server.plan_round()
        results = []
        for plan in planned.plans:
            features = fed.client_features(plan.client)
            settings = fit_settings(config, planned.rnd, plan.client, len(features), tokenizer.pad_token_id, autocast_dtype)
            start = time.perf_counter()
            try:
                update, stats = client_fit(model, plan, features, **settings)
            except Exception as error:  # a failing client is dropped from the round, never the run
                results.append(ClientResult(error=error))
                continue
            results.append(ClientResult(update, stats, seconds=time.perf_counter() - start))
        record = server.finish_round(planned, results)
        on_checkpoint(server.checkpoint())
        on_round(record)
    return server.records
