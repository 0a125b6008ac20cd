"""The rounds of one strategy, wherever its clients train (in this process, on Flower, anywhere else).

A ``Server`` samples each round's clients and asks its strategy for their plans (``plan_round``), then takes
back one ``ClientResult`` per planned client (``finish_round``): it checks every update against its plan
and every claim of the client against its own records (identity, data size, local steps), lets the
strategy aggregate the valid ones and keeps the round's record. Everything random is seeded from the run
seed, the round and the client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import Config
from ..config.privacy import noise_multiplier, sample_size
from ..privacy.accounting import epsilon
from ..privacy.mechanism import PrivacyParams, aggregate_sums, noise_generator
from ..strategies import Adapter, ClientPlan, ClientUpdate, RoundResult, Strategy
from .checkpoint import Checkpoint, capture_rng, restore_rng
from .client import TrainStats
from .schedule import local_steps, round_clients
from .validate import RejectedUpdate, check_claims, validate_update

log = logging.getLogger(__name__)


@dataclass
class RoundPlan:
    """A round as configured: the sampled clients and their plans (same order); ``global_update``: the
    global update ``ΔW`` per layer before the round (unscaled, as factors), where a server measures
    initialisation noise against it."""

    rnd: int
    clients: list[int]
    plans: list[ClientPlan]
    global_update: Adapter | None = None


@dataclass
class ClientResult:
    """What came of one planned client: its update and training stats, or the error that dropped it.

    seconds: wall time of the client's whole round (preparation and training) where it ran;
    wire: extra per-client cost fields averaged into the record like the others (Flower's bytes).
    """

    update: ClientUpdate | None = None
    stats: TrainStats | None = None
    error: Exception | None = None
    seconds: float = 0.0
    wire: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    """A round once aggregated: its plan, the accepted ``(plan, result)`` pairs, the faults' log entries,
    the aggregation (None when no update was accepted) and the seconds it took."""

    planned: RoundPlan
    accepted: list[tuple[ClientPlan, ClientResult]]
    faults: list[dict]
    aggregated: RoundResult | None
    aggregate_seconds: float

    @property
    def updates(self) -> list[ClientUpdate]:
        return [result.update for _, result in self.accepted]


class Server:
    """``strategy``'s rounds under ``config`` (``run.seed``; ``federation.clients``, ``fraction`` and
    ``update_norm_bound``; ``train``: the local steps a client takes), ``client_ranks[c]`` being client
    ``c``'s rank budget and ``client_sizes[c]`` the size of its data partition, as the server knows them.

    A client's claims are checked, never trusted: an update that names another client, claims another
    data size or another number of local steps is rejected (``fl.rounds.validate.check_claims``), so that
    data-size weights are the server's own.

    With ``[privacy]`` on, every round aggregates in sum form (``fl.privacy.mechanism.aggregate_sums``: each
    planned client's update clipped, noise on every sum, a dropped or rejected client counted as unchanged) and
    its record adds the ε spent so far.

    ``resume``: continue from that checkpoint of the same run (strategy state, records and RNGs restored).
    """

    def __init__(
        self,
        strategy: Strategy,
        config: Config,
        client_ranks: Sequence[int],
        resume: Checkpoint | None = None,
        *,
        client_sizes: Sequence[int],
    ):
        clients = config.federation.clients
        for name, values in (("client_ranks", client_ranks), ("client_sizes", client_sizes)):
            if len(values) != clients:
                raise ValueError(f"{name}: expected one per client ({clients}), got {len(values)}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in client_sizes):
            raise ValueError(f"client_sizes: expected positive integers, got {list(client_sizes)}")
        self.strategy, self.config, self.client_ranks = strategy, config, list(client_ranks)
        self.client_sizes = list(client_sizes)
        self.records: list[dict] = []
        private = config.privacy
        self.privacy = None
        if private.clip is not None:
            self.privacy = PrivacyParams(private.clip, noise_multiplier(config), private.min_holders)
        if resume is not None:
            strategy.load_state(resume.tensors, resume.meta)
            self.records = list(resume.records)
            restore_rng(resume.rng)

    @property
    def method(self) -> str:
        return self.strategy.name

    @property
    def rounds_done(self) -> int:
        return len(self.records)

    def plan_round(self) -> RoundPlan:
        """Sample the next round's clients and configure each."""
        rnd = self.rounds_done
        clients = round_clients(self.config, rnd)
        plans = [self.strategy.configure_client(rnd, c, self.client_ranks[c]) for c in clients]
        return RoundPlan(rnd, clients, plans)

    def finish_round(self, planned: RoundPlan, results: list[ClientResult]) -> dict:
        """Validate the results (one per planned client, same order), aggregate the valid ones and return
        the round's record (also appended to ``records``): its participation, what ``measure`` adds, the
        faults and the aggregation's info. A round left with no valid update keeps the global state unchanged."""
        accepted, faults = self.screen(planned, results)
        start = time.perf_counter()
        aggregated, private = self.aggregate(planned, [result.update for _, result in accepted])
        done = RoundOutcome(planned, accepted, faults, aggregated, time.perf_counter() - start)
        record = {**self.participation(planned, accepted), **self.measure(done), **private, "faults": faults}
        record.update(round_info(aggregated))
        self.records.append(record)
        return record

    def measure(self, done: RoundOutcome) -> dict:
        """The fields a server adds to a round's record once it is aggregated (a subclass's hook); none here."""
        return {}

    def screen(self, planned: RoundPlan, results: list[ClientResult]) -> tuple[list[tuple[ClientPlan, ClientResult]], list[dict]]:
        """``(accepted, faults)``: the results whose update passed ``validate_update`` and whose claims
        passed ``check_claims`` with their plans, and a log entry for each client that failed or was rejected."""
        if len(results) != len(planned.plans):
            raise ValueError(f"results: expected one per planned client ({len(planned.plans)}), got {len(results)}")
        accepted, faults = [], []
        for plan, result in zip(planned.plans, results):
            error = result.error
            if error is None:
                size = self.client_sizes[plan.client]
                steps = local_steps(self.config, size)
                try:
                    check_claims(plan, result.update, result.stats, size, steps)
                    validate_update(plan, result.update, self.config.federation.update_norm_bound)
                except Exception as rejected:  # a bad update is rejected, never the run
                    error = rejected
            if error is None:
                accepted.append((plan, result))
            else:
                faults.append(self._fault(planned.rnd, plan.client, error))
        return accepted, faults

    def aggregate(self, planned: RoundPlan, updates: list[ClientUpdate]) -> tuple[RoundResult | None, dict]:
        """The strategy's aggregation of the round's valid ``updates`` (None when there is none), and the
        record's privacy fields: with privacy, the private sum form over every planned client, its
        ``dp_clipped``, ``dp_modules_kept`` and ``dp_epsilon`` (spent by the end of this round); none without."""
        if self.privacy is None:
            return (self.strategy.aggregate(planned.rnd, updates) if updates else None), {}
        generator = noise_generator(self.config.run.seed, planned.rnd)
        aggregated, fields = aggregate_sums(self.strategy, planned.rnd, planned.plans, updates, self.privacy, generator)
        fed = self.config.federation
        spent = epsilon(
            self.privacy.noise_multiplier, sample_size(self.config), fed.clients, planned.rnd + 1, self.config.privacy.delta
        )
        return aggregated, {**fields, "dp_epsilon": spent}

    def participation(self, planned: RoundPlan, accepted: list[tuple[ClientPlan, ClientResult]]) -> dict:
        """The head of a round's record: method, round, sampled clients, the ranks trained and the mean
        training loss (weighted by data size) of the accepted clients."""
        updates = [result.update for _, result in accepted]
        losses = [result.stats.loss for _, result in accepted]
        return {
            "method": self.method,
            "round": planned.rnd + 1,
            "clients": planned.clients,
            "ranks": [len(next(iter(u.trained.values()))) for u in updates],
            "train_loss": float(np.average(losses, weights=[u.num_examples for u in updates])) if updates else None,
        }

    def checkpoint(self) -> Checkpoint:
        """The state after the rounds done so far (strategy, RNGs, records)."""
        tensors, meta = self.strategy.state()
        return Checkpoint(self.method, self.rounds_done, tensors, meta, capture_rng(), self.records)

    def _fault(self, rnd: int, client: int, error: Exception) -> dict:
        """The log entry of a dropped client (its fit raised) or a rejected update (validation failed)."""
        stage = "validate" if isinstance(error, RejectedUpdate) else "fit"
        reason = str(error) if stage == "validate" else f"{type(error).__name__}: {error}"
        what = "update rejected" if stage == "validate" else "dropped"
        log.warning("%s round %d: client %d %s: %s", self.method, rnd + 1, client, what, reason)
        if isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return {"client": client, "stage": stage, "reason": reason}


def round_info(aggregated: RoundResult | None) -> dict:
    """``{"info": …}`` when the aggregation reported anything, else nothing."""
    return {"info": aggregated.info} if aggregated is not None and aggregated.info else {}
