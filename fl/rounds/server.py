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
from ..privacy.mechanism import (
    PrivacyParams,
    aggregate_sums,
    apply_sums,
    check_secure_sums,
    denominators,
    noise_generator,
    unchanged,
)
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
    the aggregation (None when no update was accepted) and the seconds it took; ``seen``: whether the server saw
    each update (False under secure aggregation: an accepted result's update is then its plan unchanged,
    carrying the client's claims, ``Server.claimed_update``)."""

    planned: RoundPlan
    accepted: list[tuple[ClientPlan, ClientResult]]
    faults: list[dict]
    aggregated: RoundResult | None
    aggregate_seconds: float
    seen: bool = True

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
        #: The seed of the privacy noise: the run's, or None (secret, ``privacy.randomness``).
        self.noise_seed = None if private.randomness == "secret" else config.run.seed
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
        return self.record(done, private)

    def record(self, done: RoundOutcome, private: dict) -> dict:
        """The round's record (appended to ``records``): participation, ``measure``, privacy fields, faults."""
        record = {**self.participation(done.planned, done.accepted), **self.measure(done), **private, "faults": done.faults}
        record.update(round_info(done.aggregated))
        self.records.append(record)
        return record

    def finish_secure_round(
        self, planned: RoundPlan, results: list[ClientResult], sums: dict[str, torch.Tensor] | None, slack: float
    ) -> dict:
        """``finish_round`` for a round the server saw only as a sum (secure aggregation, with ``[privacy]``):
        ``results`` one per planned client, a contributor's with ``claimed_update`` and its stats, ``sums``
        the contributors' ``private_delta`` summed (None when none contributed), exact to ``slack`` per element.

        The claims and the sum are checked (``check_claims``; ``fl.privacy.mechanism.check_secure_sums``).
        No update can be taken out of a sum, so one fault there rejects the round: the global state stays as
        it was and every contributor is logged with the reason."""
        if self.privacy is None:
            raise ValueError("secure aggregation needs [privacy]: clip bounds what a client adds to a sum it cannot check")
        accepted, faults = self.screen(planned, results, seen=False)
        start = time.perf_counter()
        kept = {id(plan) for plan, _ in accepted}
        contributors = [i for i, plan in enumerate(planned.plans) if id(plan) in kept]
        counted = {n: d > 0 for n, d in denominators(self.strategy, planned.plans, self.privacy.min_holders).items()}
        try:
            if len(accepted) != sum(result.error is None for result in results):
                raise RejectedUpdate("a contributing client's claims were rejected, and its delta is inside the sum")
            if accepted:
                check_secure_sums(planned.plans, contributors, sums, counted, self.privacy.clip, slack)
        except ValueError as fault:
            reason = f"secure aggregate rejected: {fault}"
            faults += [self._fault(planned.rnd, plan.client, RejectedUpdate(reason)) for plan, _ in accepted]
            accepted = []
        aggregated, private = None, {}
        if accepted:
            generator = noise_generator(self.noise_seed, planned.rnd)
            aggregated, private = apply_sums(self.strategy, planned.rnd, planned.plans, sums, self.privacy, generator)
            self.on_aggregated(aggregated)
        private["dp_epsilon"] = self.epsilon_spent(planned.rnd)
        done = RoundOutcome(planned, accepted, faults, aggregated, time.perf_counter() - start, seen=False)
        return self.record(done, private)

    def measure(self, done: RoundOutcome) -> dict:
        """The fields a server adds to a round's record once it is aggregated (a subclass's hook); none here."""
        return {}

    def screen(
        self, planned: RoundPlan, results: list[ClientResult], *, seen: bool = True
    ) -> tuple[list[tuple[ClientPlan, ClientResult]], list[dict]]:
        """``(accepted, faults)``: the results whose update passed ``validate_update`` (when the server ``seen``
        it) and whose claims passed ``check_claims`` with their plans, and a log entry for each client that
        failed or was rejected."""
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
                    if seen:
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
        ``dp_clipped``, ``dp_norm_median``, ``dp_modules_kept`` and ``dp_epsilon`` (spent by the end of this
        round); none without."""
        if self.privacy is None:
            aggregated, fields = (self.strategy.aggregate(planned.rnd, updates) if updates else None), {}
        else:
            generator = noise_generator(self.noise_seed, planned.rnd)
            aggregated, fields = aggregate_sums(self.strategy, planned.rnd, planned.plans, updates, self.privacy, generator)
            fields["dp_epsilon"] = self.epsilon_spent(planned.rnd)
        if aggregated is not None:
            self.on_aggregated(aggregated)
        return aggregated, fields

    def on_aggregated(self, aggregated: RoundResult) -> None:
        """What a server does with a round's aggregation beyond its strategy (a subclass's hook); nothing here."""

    def epsilon_spent(self, rnd: int) -> float:
        """The ε (at ``privacy.delta``) spent by the end of round ``rnd`` (0-based)."""
        fed = self.config.federation
        return epsilon(self.privacy.noise_multiplier, sample_size(self.config), fed.clients, rnd + 1, self.config.privacy.delta)

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

    def claimed_update(self, plan: ClientPlan, num_examples) -> ClientUpdate:
        """The update of a client the server sees only through a secure sum: its plan unchanged, carrying the
        data size it claims (``check_claims`` judges it)."""
        update = unchanged(plan)
        update.num_examples = num_examples
        return update

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
