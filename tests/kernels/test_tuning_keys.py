"""Tuning keys name everything that selects a binary, and a Llama-7B training run with dynamic padding compiles
at most 100 variants. Checked through Triton's real binder and ``Autotuner.run`` for an sm_90 target without a
GPU (``bench.offline_triton``): every launch of the run (projection shapes, M over every token bucket with and
without a multiple of 16, 1 to 64 of 64 modules, int64 and int32 index tensors) is specialised and keyed as a
GPU would, and each key must have run exactly one binary per config."""

import json

import pytest
from aot_compile import SUPPORTED, compile_in_subprocess

SCRIPT = r"""
import json
from bench.static_profile import training_run
print(json.dumps(training_run()))
"""


@pytest.mark.skipif(not SUPPORTED, reason="Triton 3.9's runtime API")
def test_keys_are_complete_and_a_7b_run_compiles_at_most_100_variants():
    result = compile_in_subprocess(SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout.splitlines()[-1])
    assert not any(run["keys_with_several_binaries_per_config"].values()), run
    assert run["compiled_variants"] <= 100, run
    # The fused GEMM: 10 token buckets x 3 rank buckets x 3 projection shapes x (forward, backward).
    assert run["tuning_keys_per_kernel"]["_gemm_lowrank_kernel"] == 10 * 3 * 3 * 2, run
