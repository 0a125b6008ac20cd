"""Traffic, FLOP estimates and the noise measures of DESIGN.md §1, on hand-made tensors."""

import math

import pytest
import torch

from fed_plora.fl.costs import aggregation_noise, fold_flops, initialisation_noise, payload_bytes, svd_flops, training_flops


def test_payload_bytes_count_the_tensors_sent():
    sent = {"a": torch.zeros(3, 5), "b": torch.zeros(7, 3, dtype=torch.bfloat16)}
    assert payload_bytes(sent) == {"bf16": 36 * 2, "fp32": 36 * 4}


def test_flop_estimates():
    assert fold_flops(4, 6, 0) == 0.0
    assert fold_flops(4, 6, 2) == 2 * 4 * 6 * 2 + 4 * 6
    assert svd_flops(100, 10) == svd_flops(10, 100) == min(14 * 100 * 100 + 8 * 1000, 6 * 100 * 100 + 20 * 1000)
    assert training_flops(10, 100, 5) == 10 * (400 + 30)


def test_noise_is_relative_frobenius_error_over_all_layers():
    target = {"l1": torch.tensor([[3.0, 0.0]]), "l2": torch.tensor([[0.0, 4.0]])}
    estimate = {"l1": torch.tensor([[3.0, 1.0]]), "l2": torch.tensor([[0.0, 4.0]])}
    assert initialisation_noise(estimate, target) == pytest.approx(1 / 5)
    assert aggregation_noise(target, target) == 0.0
    zero = {"l1": torch.zeros(1, 2), "l2": torch.zeros(1, 2)}
    assert initialisation_noise(zero, zero) == 0.0  # round 1: both zero
    assert initialisation_noise(target, zero) is None  # undefined against a zero global update
    with pytest.raises(ValueError, match="same layers"):
        aggregation_noise({"l1": target["l1"]}, target)
    assert math.isclose(aggregation_noise({k: 2 * v for k, v in target.items()}, target), 1.0)
