"""The privacy a run spends: Rényi-DP accounting of its rounds by Google's ``dp-accounting``.

A round samples ``sample_size`` of the ``population`` clients uniformly without replacement (a fixed number,
as ``fl.data.partition.sample_clients`` draws them) and releases sums of their updates, each update clipped to
L2 norm ``C``, with Gaussian noise of standard deviation ``z · C`` on every sum. Neighbouring federations
differ by one client's data replaced (the replace-one relation, under which the analysis of sampling without
replacement holds; the number of clients is public). Replacing one client's update moves the sums by at most
``2 C`` in L2 norm, so the library's noise multiplier (noise over sensitivity) is ``z / 2``.
"""

from __future__ import annotations

#: The bracket's relative width when a noise multiplier is searched for (``noise_for_epsilon``).
TOLERANCE = 1e-4


def _library():
    try:
        import dp_accounting
    except ImportError:
        raise ImportError(
            'privacy accounting needs Google\'s dp-accounting: pip install -e ".[privacy]" (or pip install dp-accounting)'
        ) from None
    return dp_accounting


def rounds_event(noise_multiplier: float, sample_size: int, population: int, rounds: int):
    """The ``DpEvent`` of ``rounds`` rounds: each samples ``sample_size`` of ``population`` clients without
    replacement and adds noise ``noise_multiplier · C`` to sums of updates clipped to ``C``."""
    dpa = _library()
    if not 1 <= sample_size <= population:
        raise ValueError(f"sample_size must lie in [1, population = {population}], got {sample_size}")
    step = dpa.SampledWithoutReplacementDpEvent(population, sample_size, dpa.GaussianDpEvent(noise_multiplier / 2))
    return dpa.SelfComposedDpEvent(step, rounds)


def _accountant():
    dpa = _library()
    return dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)


def epsilon(noise_multiplier: float, sample_size: int, population: int, rounds: int, delta: float) -> float:
    """ε(δ) after ``rounds`` rounds (see ``rounds_event``); ``rounds = 0`` spends nothing."""
    if rounds == 0:
        return 0.0
    return float(_accountant().compose(rounds_event(noise_multiplier, sample_size, population, rounds)).get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, delta: float, sample_size: int, population: int, rounds: int) -> float:
    """The smallest noise multiplier (to ``TOLERANCE``, rounded up) whose ``rounds`` rounds spend at most
    ``target_epsilon`` at ``delta``, searched by the library (``calibrate_dp_mechanism``)."""
    dpa = _library()
    found = dpa.calibrate_dp_mechanism(
        _accountant,
        lambda z: rounds_event(z, sample_size, population, rounds),
        target_epsilon,
        delta,
        bracket_interval=dpa.LowerEndpointAndGuess(1e-3, 1.0),
        tol=TOLERANCE,
    )
    z = float(found) + TOLERANCE
    while epsilon(z, sample_size, population, rounds, delta) > target_epsilon:  # brentq's root may sit a hair low
        z += TOLERANCE
    return z
