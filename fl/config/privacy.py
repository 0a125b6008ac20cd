"""``[privacy]``: client-level differential privacy of every round (``fl.privacy``), its fields and the checks
of the fields it depends on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.partition import sample_clients
from ..privacy.accounting import epsilon, noise_for_epsilon
from ..strategies import strategy_class
from .rules import choice, integer, number, setting


@dataclass
class PrivacySection:
    """``[privacy]``: off unless ``clip`` is set. Each round's server clips every client's whole update to
    ``clip`` and adds Gaussian noise of standard deviation ``noise_multiplier · clip`` to each sum
    (docs/privacy.md)."""

    clip: float | None = setting(
        None, number(0, low_open=True, optional=True), "the L2 bound C of a client's whole update; unset: privacy off"
    )
    noise_multiplier: float | None = setting(
        None, number(0, low_open=True, optional=True), "z: noise of std z·C on each sum; unset: found for target_epsilon"
    )
    target_epsilon: float | None = setting(
        None, number(0, low_open=True, optional=True), "the ε at delta the run may spend by its last round"
    )
    delta: float | None = setting(None, number(0, 1, low_open=True, high_open=True, optional=True), "the δ of ε(δ)")
    min_holders: int = setting(1, integer(1), "a module trained by fewer of a round's clients keeps its value")
    randomness: str = setting(
        "seeded",
        choice(("seeded", "secret")),
        'where the noise and each round\'s client sample come from: "seeded", the run seed (reproducible, for '
        'experiments: anyone with the config can subtract the noise); "secret", the operating system\'s entropy '
        "(a deployment; a run does not reproduce)",
    )


def sample_size(config) -> int:
    """The number of clients a round samples (``sample_clients`` draws a fixed number, whatever the seed)."""
    fed = config.federation
    return len(sample_clients(fed.clients, fed.fraction, np.random.default_rng(0)))


def noise_multiplier(config) -> float:
    """``privacy.noise_multiplier``, or unset, the smallest one that spends at most ``target_epsilon`` by the
    last round (``fl.privacy.accounting.noise_for_epsilon``)."""
    privacy, fed = config.privacy, config.federation
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    return noise_for_epsilon(privacy.target_epsilon, privacy.delta, sample_size(config), fed.clients, fed.rounds)


def privacy_checks(config):
    """The problems of ``[privacy]`` with the fields it depends on (messages naming the fields)."""
    privacy, fed = config.privacy, config.federation
    if privacy.clip is None:
        for key in ("noise_multiplier", "target_epsilon", "delta"):
            if getattr(privacy, key) is not None:
                yield f"privacy.{key} = {getattr(privacy, key)!r}: privacy is off (privacy.clip is unset)"
        if privacy.min_holders != 1:
            yield f"privacy.min_holders = {privacy.min_holders}: privacy is off (privacy.clip is unset)"
        if privacy.randomness != "seeded":
            yield f"privacy.randomness = {privacy.randomness!r}: privacy is off (privacy.clip is unset)"
        return
    if fed.weighting != "uniform":
        yield f"federation.weighting = {fed.weighting!r}: privacy needs 'uniform' (a data-size weight is the client's own data)"
    for name in config.methods.names:
        why = strategy_class(name).not_a_sum
        if why is not None:
            yield f"methods.names: {name!r} cannot run with privacy: {why}"
    sampled = sample_size(config)
    if privacy.min_holders > sampled:
        yield f"privacy.min_holders = {privacy.min_holders}: exceeds the {sampled} clients a round samples (federation.fraction)"
    if privacy.delta is None:
        yield "privacy.delta: needed with privacy.clip set (ε is reported at it)"
    elif privacy.noise_multiplier is None and privacy.target_epsilon is None:
        yield "privacy.noise_multiplier, privacy.target_epsilon: set one (privacy.clip is set)"
    elif privacy.noise_multiplier is not None and privacy.target_epsilon is not None:
        spent = epsilon(privacy.noise_multiplier, sampled, fed.clients, fed.rounds, privacy.delta)
        if spent > privacy.target_epsilon:
            yield (
                f"privacy.target_epsilon = {privacy.target_epsilon}: privacy.noise_multiplier = {privacy.noise_multiplier} "
                f"spends ε = {spent:.4g} by round {fed.rounds} (federation.rounds); raise it or leave it unset"
            )
