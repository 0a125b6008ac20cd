"""No autotuning config that can be picked spills registers on an H100 (sm_90) or an A100 (sm_80), with the
specialisation of the benchmark launches (bf16, R = 64, none, 16 and 64 active): every binary those launches
would compile on each GPU, built as ``python -m bench.static_profile`` builds them without a GPU (Triton's binder
and autotuner for that target, then ptxas)."""

import json

import pytest
from aot_compile import SUPPORTED, compile_in_subprocess

SCRIPT = r"""
import json
from bench.static_profile import profile_variants
rows = profile_variants(targets=("sm_90", "sm_80"))
keys = ("kernel", "target", "config", "P", "layout", "registers", "spill_stores", "spill_loads")
print(json.dumps([{k: r[k] for k in keys} for r in rows]))
"""


@pytest.mark.skipif(not SUPPORTED, reason="ahead-of-time API as of Triton 3.9")
def test_no_autotune_config_spills_on_sm90_or_sm80():
    result = compile_in_subprocess(SCRIPT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.splitlines()[-1])
    assert {row["target"] for row in rows} == {"sm_90", "sm_80"}
    assert {row["kernel"] for row in rows} >= {"_gemm_lowrank_kernel", "_gemm_with_slab_kernel", "_gemm_nf4_kernel"}
    spilling = [row for row in rows if row["spill_stores"] or row["spill_loads"]]
    assert not spilling, spilling
