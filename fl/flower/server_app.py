"""The Flower ``ServerApp``: ``fed-plora run`` with the clients on Flower SuperNodes.

The run config (``[tool.flwr.app.config]`` of ``flower_app/pyproject.toml``, overridable with ``flwr run
--run-config``) holds the run's config fields as ``"section.key"`` (or ``"methods.<method>.key"``) keys, the
way the TOML config and ``--set`` name them (a list is given as a TOML string, e.g. ``"[2, 4, 8, 16]"``; an
empty string leaves a field at its default), plus the seconds the server waits (``TIMEOUTS``):
``flower.node-timeout`` for a node of every client before the first round, ``flower.round-timeout`` at most
for a round's replies, ``flower.reply-timeout`` for the other replies of a round once one has come;
``flower.secure-aggregation`` (a private run) aggregates under SecAgg+ (``fl.flower.secure``) with
``flower.secagg-shares`` and ``flower.secagg-threshold`` (``SECURE``). Every method of ``methods.names`` runs
in turn (they share what the server knows of the nodes: ``strategy.Nodes``); the run directory
(``run.out_dir``/``run.name`` on the SuperLink's machine) gets the same ``metrics.jsonl``, checkpoints, plots
and summary as a simulated run, each record with ``bytes_down_flower``/``bytes_up_flower``: the mean bytes per
client of the Flower messages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..config import Config, load_config, toml_literal
from ..rounds.run_server import RunServer
from ..run.experiment import run_experiment
from .secure import SecAggSettings, SecureStrategy, run_secure
from .strategy import REPLY_TIMEOUT, BoundedGrid, FlowerStrategy, Nodes

log = logging.getLogger(__name__)

#: Run-config keys of the Flower transport itself (the rest are run config fields), with their defaults.
TIMEOUTS = {"flower.node-timeout": 600.0, "flower.round-timeout": 3600.0, "flower.reply-timeout": REPLY_TIMEOUT}
#: Run-config keys of secure aggregation (``secure``), with their defaults: off; SecAgg+'s key shares per
#: client and reconstruction threshold (``SecAggSettings``).
SECURE = {"flower.secure-aggregation": False, "flower.secagg-shares": 1.0, "flower.secagg-threshold": 0.5}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    node, round_, reply = (float(run_config.pop(key, default)) for key, default in TIMEOUTS.items())
    on, shares, threshold = (run_config.pop(key, default) for key, default in SECURE.items())
    secure = SecAggSettings(shares, threshold) if on else None
    config = config_from_run_config(run_config)
    command = f"flwr run (run config {context.run_config})"
    directory, table = run_on_flower(grid, config, node, round_, command, reply_timeout=reply, secure=secure)
    log.info("run directory: %s\n%s", directory, table)


def config_from_run_config(run_config: dict) -> Config:
    """The run's ``Config`` from flat ``"section.key": value`` entries (lists as TOML strings; an empty
    string leaves the field at its default)."""
    overrides = []
    for key, value in run_config.items():
        if value == "":
            continue
        literal = value if isinstance(value, str) and value.lstrip().startswith("[") else toml_literal(value)
        overrides.append(f"{key}={literal}")
    return load_config(None, overrides)


def run_on_flower(
    grid: Grid,
    config: Config,
    node_timeout: float = 600.0,
    round_timeout: float = 3600.0,
    command: str = "",
    *,
    reply_timeout: float = REPLY_TIMEOUT,
    secure: SecAggSettings | None = None,
):
    """Every method of ``config`` over ``grid``'s nodes; returns ``(run directory, summary table)``.
    Timeouts in seconds, as ``TIMEOUTS`` describes them; ``secure``: aggregate under SecAgg+
    (``fl.flower.secure``; a private run only)."""
    if secure is not None and config.privacy.clip is None:  # [privacy]'s own checks refuse a method not in sum form
        raise ValueError("flower.secure-aggregation: needs [privacy] (privacy.clip bounds what a client adds to the sum)")
    rounds = flower_rounds(grid, node_timeout, round_timeout, reply_timeout, secure)
    return run_experiment(config, command, progress=False, rounds=rounds)


def flower_rounds(
    grid: Grid,
    node_timeout: float,
    round_timeout: float,
    reply_timeout: float = REPLY_TIMEOUT,
    secure: SecAggSettings | None = None,
) -> Callable:
    """A ``rounds`` driver for ``run_experiment`` (the signature of ``fl.rounds.simulate``) whose
    clients train on ``grid``'s nodes (under SecAgg+ with ``secure``); its methods share one ``Nodes``."""
    run_nodes: list[Nodes] = []  # the run's nodes, made for its first method

    def rounds(config, method, fed, model, tokenizer, autocast_dtype, on_round, *, resume=None, on_checkpoint=lambda c: None):
        server = RunServer(config, method, fed, model, tokenizer, autocast_dtype, resume)
        if not run_nodes:
            run_nodes.append(Nodes(config.federation.clients))
        remaining = config.federation.rounds - server.rounds_done
        if secure is not None:
            bounded = BoundedGrid(grid, reply_timeout)
            strategy = SecureStrategy(
                server, bounded, run_nodes[0], secure, node_timeout=node_timeout, on_round=on_round, on_checkpoint=on_checkpoint
            )
            if remaining > 0:
                run_secure(bounded, strategy, remaining, round_timeout)
            return server.records
        strategy = FlowerStrategy(
            server,
            on_round=on_round,
            on_checkpoint=on_checkpoint,
            node_timeout=node_timeout,
            reply_timeout=reply_timeout,
            nodes=run_nodes[0],
        )
        if remaining > 0:
            strategy.start(grid, strategy.global_arrays(), num_rounds=remaining, timeout=round_timeout)
        return server.records

    return rounds
