"""A private run's rounds under Flower's SecAgg+: the server sees each round only as the sum of its clients'
clipped deltas.

Flower's ``SecAggPlusWorkflow`` drives a legacy Flower strategy; ``SecureStrategy`` is ours in that form, and
``run_secure`` runs the workflow once per round. Each round it plans the clients
(``fl.rounds.Server.plan_round``) and hands every plan to its node as a legacy ``FitIns``
(``wire.secure_fit_ins``); the node trains, clips its whole delta to ``privacy.clip`` and returns it zero-filled
to all ``R`` modules of every layer with weight 1 (``client_app.secure_train``); the protocol masks, sums and
unmasks, and hands back the mean over the clients whose vectors it summed. The server multiplies by their count,
checks the sum as far as a sum can be checked and applies it with the round's noise
(``Server.finish_secure_round``): the same step as the in-process private run up to SecAgg+'s quantisation.

What the server no longer sees: any one client's update. So the per-update checks (planned modules only, finite
values, norm bound) become checks of the sum (``fl.privacy.mechanism.check_secure_sums``), a client's clip is
its own to apply, and one fault rejects the whole round. The claims (data size, steps, loss) still travel in the
clear and are checked. Records carry no aggregation noise (it needs each update) and no Flower byte counts (the
workflow owns the messages); ``bytes_up_sum_bf16`` is what a client sends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import flwr.compat.common.recorddict_compat as compat
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from ..privacy.mechanism import denominators, sum_names
from ..rounds.checkpoint import Checkpoint
from ..rounds.server import ClientResult, RoundPlan, Server
from .strategy import Nodes
from .wire import read_claims, secure_fit_ins

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+'s own settings: ``shares``, the key shares per client (a fraction of the round's clients, or a
    count), ``threshold``, the shares that rebuild a key (a fraction of ``shares``, or a count), and
    ``quantization``, the integer levels over ``[-clip, clip]`` an element is rounded to (stochastically)."""

    shares: float | int = 1.0
    threshold: float | int = 0.5
    quantization: int = 2**22

    def workflow(self, clip: float, timeout: float | None) -> SecAggPlusWorkflow:
        """Flower's SecAgg+ workflow for deltas clipped to L2 norm ``clip`` (so every element is within ±clip)."""
        return SecAggPlusWorkflow(
            self.shares,
            self.threshold,
            max_weight=1.0,
            clipping_range=clip,
            quantization_range=self.quantization,
            timeout=timeout,
        )

    def slack(self, clip: float, contributors: int) -> float:
        """How far a sum of ``contributors`` quantised elements may stray from the true sum: one level each
        (stochastic rounding moves an element by less than a level), doubled for float rounding."""
        return 2.0 * contributors * 2.0 * clip / self.quantization


class SecureStrategy(LegacyStrategy):
    """``server``'s rounds (a private run: ``[privacy]`` set) as a legacy Flower strategy for SecAgg+.

    ``grid`` and ``nodes`` find each client's node as ``FlowerStrategy`` does; ``on_round`` and
    ``on_checkpoint`` receive each round's record and a checkpoint after it. A round the protocol halts
    (too few clients answered a stage) is recorded with every client dropped and the model unchanged.
    """

    def __init__(
        self,
        server: Server,
        grid,
        nodes: Nodes,
        settings: SecAggSettings,
        *,
        node_timeout: float = 600.0,
        on_round: Callable[[dict], None] = lambda record: None,
        on_checkpoint: Callable[[Checkpoint], None] = lambda checkpoint: None,
    ):
        if server.privacy is None:
            raise ValueError("secure aggregation needs [privacy] (privacy.clip bounds what a client adds to the sum)")
        self.server, self.grid, self.nodes, self.settings = server, grid, nodes, settings
        self.node_timeout, self.on_round, self.on_checkpoint = node_timeout, on_round, on_checkpoint
        self.pending: RoundPlan | None = None
        self.client_of: dict[int, int] = {}  # node -> the client it trains this round

    def initialize_parameters(self, client_manager) -> Parameters:
        return ndarrays_to_parameters([])  # the global state is the server's own, never sent whole

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        self.nodes.discover(self.grid, self.node_timeout)
        server = self.server
        self.pending = planned = server.plan_round()
        counted = {n: d > 0 for n, d in denominators(server.strategy, planned.plans, server.privacy.min_holders).items()}
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        self.client_of, instructions = {}, []
        for plan in planned.plans:
            node = self.nodes.responsive_node(plan.client)
            if node is None or node not in proxies:
                continue
            self.client_of[node] = plan.client
            instructions.append((proxies[node], secure_fit_ins(server.config, server.method, planned.rnd, plan, counted)))
        return instructions

    def aggregate_fit(self, server_round: int, results, failures):
        planned = self.pending
        by_client = {self.client_of[proxy.node_id]: fit_res for proxy, fit_res in results if proxy.node_id in self.client_of}
        sums = None
        if by_client:
            names = sum_names(planned.plans[0])
            mean = parameters_to_ndarrays(next(iter(by_client.values())).parameters)
            if len(mean) != len(names):  # SecAgg+ sums tensor lists pairwise, cut to the shortest
                self.finish_halted(f"SecAgg+ returned {len(mean)} tensors for the {len(names)} summed: a node sent another shape")
                return ndarrays_to_parameters([]), {}
            sums = {name: torch.from_numpy(array).double() * len(results) for name, array in zip(names, mean)}
        outcome = [self._result(plan, by_client.get(plan.client)) for plan in planned.plans]
        slack = self.settings.slack(self.server.privacy.clip, len(results))
        record = self.server.finish_secure_round(planned, outcome, sums, slack)
        self.pending = None
        self._finish(record)
        return ndarrays_to_parameters([]), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager):
        return []  # a run evaluates on the server (``RunServer``)

    def aggregate_evaluate(self, server_round: int, results, failures):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None

    def finish_halted(self, reason: str = "secure aggregation halted: too few clients answered a stage of SecAgg+") -> None:
        """Record a planned round whose aggregation never came (the protocol halted or failed, ``reason``):
        every client dropped, the model unchanged."""
        if self.pending is None:
            return
        planned, self.pending = self.pending, None
        halted = RuntimeError(reason)
        record = self.server.finish_secure_round(planned, [ClientResult(error=halted) for _ in planned.plans], None, 0.0)
        self._finish(record)

    def _finish(self, record: dict) -> None:
        self.on_checkpoint(self.server.checkpoint())
        self.on_round(record)

    def _result(self, plan, fit_res) -> ClientResult:
        """A planned client's result: its claims as sent when its vector is in the sum (a missing or malformed
        claim fails ``check_claims``, which rejects the round), else why it is not in the sum."""
        if fit_res is None:
            return ClientResult(error=LookupError("its masked vector is not in the secure sum (not asked, or dropped out)"))
        num_examples, stats, seconds = read_claims(fit_res.metrics)
        return ClientResult(self.server.claimed_update(plan, num_examples), stats, seconds=seconds)


def run_secure(grid, strategy: SecureStrategy, rounds: int, timeout: float | None) -> None:
    """``rounds`` rounds of ``strategy`` over ``grid``, each one run of Flower's SecAgg+ workflow (what its
    ``DefaultWorkflow`` does per round, without the centralised evaluation, which ``RunServer`` does). A round
    whose protocol raises (a node's masked vector of another shape, say) is recorded with every planned
    client dropped and the reason, and the run goes on."""
    workflow = strategy.settings.workflow(strategy.server.privacy.clip, timeout)
    for rnd in range(1, rounds + 1):
        context = LegacyContext(
            Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=rounds),
            strategy=strategy,
        )
        for node in grid.get_node_ids():
            context.client_manager.register(GridClientProxy(node, grid, grid.run.run_id))
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters([]), True)
        try:
            workflow(grid, context)
        except Exception as error:
            if strategy.pending is None:
                raise  # before the round was planned (no node at all, say): the run's own failure
            log.warning("SecAgg+ failed in round %d: %s: %s", rnd, type(error).__name__, error)
            strategy.finish_halted(f"SecAgg+ failed: {type(error).__name__}: {error}")  # the round is lost, not the run
        strategy.finish_halted()
