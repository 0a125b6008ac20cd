"""Traffic, FLOP estimates and the two noise measures, on hand-made tensors and factors."""

import math

import pytest
import torch

from fed_plora.fl.measures.costs import fold_flops, payload_bytes, training_flops
from fed_plora.fl.measures.noise import aggregation_noise, initialisation_noise
from fed_plora.fl.strategies import Factors
from fed_plora.fl.strategies.lowrank import gram_flops, qr_flops, svd_flops


def test_payload_bytes_count_the_tensors_sent():
    sent = {"a": torch.zeros(3, 5), "b": torch.zeros(7, 3, dtype=torch.bfloat16)}
    assert payload_bytes(sent) == {"bf16": 36 * 2, "fp32": 36 * 4}


def test_flop_estimates():
    assert fold_flops(4, 6, 0) == 0.0
    assert fold_flops(4, 6, 2) == 2 * 4 * 6 * 2 + 4 * 6
    assert svd_flops(100, 10) == svd_flops(10, 100) == min(14 * 100 * 100 + 8 * 1000, 6 * 100 * 100 + 20 * 1000)
    assert training_flops(10, 100, 5) == 10 * (400 + 30)
    assert qr_flops(100, 10) == qr_flops(10, 100) == 2 * 100 * 100 - 2 * 1000 / 3
    assert gram_flops(4, 6, 3) == 2 * (4 + 6) * 9


def test_noise_is_relative_frobenius_error_over_all_layers():
    def rank1(row):  # the 1 × 2 matrix ``row`` as factors
        return Factors(torch.tensor([row]), torch.ones(1, 1))

    target = {"l1": rank1([3.0, 0.0]), "l2": rank1([0.0, 4.0])}
    estimate = {"l1": rank1([3.0, 1.0]), "l2": rank1([0.0, 4.0])}

    def pairs(x, y):
        return ((x[n], y[n]) for n in y)

    assert initialisation_noise(pairs(estimate, target)) == pytest.approx(1 / 5)
    assert aggregation_noise(pairs(target, target)) == 0.0
    zero = {"l1": rank1([0.0, 0.0]), "l2": rank1([0.0, 0.0])}
    assert initialisation_noise(pairs(zero, zero)) == 0.0  # round 1: both zero
    assert initialisation_noise(pairs(target, zero)) is None  # undefined against a zero global update
    assert math.isclose(aggregation_noise(pairs({k: Factors(2 * f.a, f.b) for k, f in target.items()}, target)), 1.0)
