"""The schedule of a run's rounds, the same for every method, every reference row and every transport: which
clients a round samples, how many local steps a client takes, at which learning rate and seed, and which
rounds are evaluated."""

from __future__ import annotations

import math
import secrets

import numpy as np

from ..config import Config
from ..data.partition import sample_clients


def round_clients(config: Config, rnd: int) -> list[int]:
    """The clients sampled in round ``rnd`` (0-based): ``federation.fraction`` of them, drawn by the run seed,
    or under ``privacy.randomness = "secret"`` from the operating system's entropy (the privacy accounting
    takes the sample to be unknown)."""
    fcfg = config.federation
    secret = config.privacy.randomness == "secret"
    rng = np.random.default_rng(secrets.randbits(128) if secret else [config.run.seed, rnd])
    return sample_clients(fcfg.clients, fcfg.fraction, rng)


def is_evaluated(config: Config, rnd: int) -> bool:
    """Whether round ``rnd`` (0-based) ends with an evaluation: every ``train.eval_every`` rounds, and the last."""
    return (rnd + 1) % config.train.eval_every == 0 or rnd + 1 == config.federation.rounds


def client_seed(seed: int, rnd: int, client: int, stream: int) -> int:
    """A seed for ``stream`` (0: training) of ``client`` in round ``rnd``."""
    return int(np.random.SeedSequence([seed, rnd, client, stream]).generate_state(1)[0])


def local_steps(config: Config, shard_size: int) -> int:
    """Local steps of a client: ``train.local_steps``, or ``local_epochs`` passes over its shard."""
    train = config.train
    if train.local_steps:
        return train.local_steps
    if not train.local_epochs:
        raise ValueError("set train.local_steps > 0 or train.local_epochs > 0")
    return max(1, math.ceil(train.local_epochs * shard_size / train.batch_size))


def round_lr(config: Config, rnd: int) -> float:
    """The learning rate of round ``rnd`` (0-based): ``train.lr``, or with ``lr_schedule = "cosine"`` annealed
    from ``lr`` in the first round to ``lr_min`` in the last, ``lr_min + (lr - lr_min) · (1 + cos(π t)) / 2``
    with ``t = rnd / (rounds - 1)``."""
    tcfg, rounds = config.train, config.federation.rounds
    if tcfg.lr_schedule == "constant" or rounds == 1:
        return tcfg.lr
    return tcfg.lr_min + (tcfg.lr - tcfg.lr_min) * (1 + math.cos(math.pi * rnd / (rounds - 1))) / 2
