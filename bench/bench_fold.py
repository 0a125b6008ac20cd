"""pytest-benchmark suite of the folds and the NF4 forward, each beside its reference in the same run.

* ``copy`` / ``fold``: device-to-device copy of W and ``kernels.fold_`` (bf16): bandwidth, and the peak
  memory of a fold above what was allocated before (0: no ``[N, K]`` temporary);
* ``peft_merge_nf4`` / ``fold_nf4``: PEFT's ``merge()`` of a LoRA into a bitsandbytes 4-bit layer and
  ``kernels.fold_nf4_`` into the same kind of ``Params4bit`` (NF4, blocks of 64, double quantisation);
* ``fwd_bf16`` / ``fwd_nf4_temporary`` / ``fwd_nf4_fused`` / ``fwd_bnb_peft``: our fused forward on a
  bf16 weight, ``plora_linear_nf4`` in both dequantisation modes, and bitsandbytes ``matmul_4bit`` plus
  PEFT-style LoRA.

Run through ``python -m bench.fold`` (table, ratios, JSON). Every timed call ends with a CUDA
synchronisation; each case also records the CUDA-event median (``triton.testing.do_bench``).
"""

from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

import pytest
import torch

from bench.common import median_ms, on_gpu, peak_memory_bytes, synced
from fed_plora.kernels import fold_, fold_nf4_, plora_linear, plora_linear_nf4, quantize_nf4

RANK, FOLDED, SCALE = 64, 32, 0.5

if on_gpu():
    DTYPE = torch.bfloat16
    FOLD_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # [N, K]
    FWD_CASES = [(m, k, n) for m in (16, 4096) for k, n in ((4096, 4096), (4096, 11008))]
    ROUNDS, WARMUP = 20, 3
else:  # smoke configuration through the Triton interpreter
    DTYPE = torch.bfloat16
    FOLD_SHAPES = [(128, 256)]
    FWD_CASES = [(64, 256, 128)]
    ROUNDS, WARMUP = 2, 1

FOLD_VARIANTS = ["copy", "fold", "peft_merge_nf4", "fold_nf4"]
FWD_VARIANTS = ["fwd_bf16", "fwd_nf4_temporary", "fwd_nf4_fused", "fwd_bnb_peft"]


def _device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


def _adapter(n: int, k: int, seed: int):
    gen = torch.Generator(device=_device()).manual_seed(seed)

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, device=_device()).mul_(std).to(DTYPE)

    weight = rand(n, k, std=k**-0.5)
    lora_a, lora_b = rand(RANK, k, std=k**-0.5), rand(n, RANK, std=0.02)
    indices = torch.randperm(RANK, generator=gen, device=_device())[:FOLDED]
    return weight, lora_a, lora_b, indices


def _params4bit(weight: torch.Tensor):
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True).to(
        weight.device
    )


def _peft_lora_4bit(weight, lora_a, lora_b, indices):
    """A PEFT LoRA layer (rank = the folded count) over a bitsandbytes Linear4bit holding ``weight``."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    n, k = weight.shape
    holder = torch.nn.Module()
    holder.proj = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=DTYPE, quant_type="nf4", compress_statistics=True)
    holder.proj.weight = _params4bit(weight)
    holder.is_loaded_in_4bit = True  # how PEFT recognises a 4-bit model (transformers sets it)
    model = get_peft_model(holder, LoraConfig(r=FOLDED, lora_alpha=SCALE * FOLDED, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a[indices].float())
        layer.lora_B["default"].weight.copy_(lora_b[:, indices].float())
    return model, layer


def fold_call(variant: str, n: int, k: int):
    """``(call, setup, info)`` for a fold-side variant; ``setup`` (untimed) runs before each call."""
    weight, lora_a, lora_b, indices = _adapter(n, k, seed=n + k)
    if variant == "copy":
        dst = torch.empty_like(weight)
        return (lambda: dst.copy_(weight)), None, {"bytes": 2 * weight.numel() * weight.element_size()}
    if variant == "fold":
        return (
            (lambda: fold_(weight, lora_a, lora_b, indices, SCALE)),
            None,
            {"bytes": 2 * weight.numel() * weight.element_size()},
        )
    if variant == "fold_nf4":
        param = _params4bit(weight)
        return (lambda: fold_nf4_(param, lora_a, lora_b, indices, SCALE)), None, {}
    _, layer = _peft_lora_4bit(weight, lora_a, lora_b, indices)
    return (lambda: layer.merge()), (lambda: layer.unmerge()), {}


def nf4_weight(weight: torch.Tensor):
    """``(param, how)``: ``weight`` in NF4 as QLoRA stores it (a bitsandbytes ``Params4bit``, blocks of 64,
    double quantisation); without bitsandbytes, ``quantize_nf4``'s bit-identical codes with plain fp32
    absmax (the double quantisation needs bitsandbytes' absmax code book)."""
    try:
        return _params4bit(weight), "bitsandbytes Params4bit, nested absmax"
    except ImportError:
        return quantize_nf4(weight, 64), "quantize_nf4 without bitsandbytes, fp32 absmax"


def fwd_call(variant: str, m: int, k: int, n: int):
    """``(call, info)`` for a forward variant (``info``: how the NF4 weight is stored, for NF4 variants)."""
    weight, lora_a, lora_b, active = _adapter(n, k, seed=m + n + k)
    gen = torch.Generator(device=_device()).manual_seed(m + n + k + 1)  # the same x for every variant
    x = torch.randn(m, k, generator=gen, device=_device()).to(DTYPE)
    if variant == "fwd_bf16":
        return (lambda: plora_linear(x, weight, lora_a, lora_b, active, SCALE)), {}
    if variant.startswith("fwd_nf4"):
        param, storage = nf4_weight(weight)
        mode = variant.rsplit("_", 1)[1]
        return (lambda: plora_linear_nf4(x, param, lora_a, lora_b, active, SCALE, dequant=mode)), {"nf4_storage": storage}
    import bitsandbytes as bnb

    param = _params4bit(weight)
    a_act, b_act = lora_a[active].contiguous(), lora_b[:, active].contiguous()
    return (lambda: bnb.matmul_4bit(x, param.t(), quant_state=param.quant_state) + (x @ a_act.T) @ b_act.T * SCALE), {}


FOLD_CASES = [(n, k, v) for n, k in FOLD_SHAPES for v in FOLD_VARIANTS]


@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: f"{c[2]}-N{c[0]}-K{c[1]}")
def test_fold(benchmark, case):
    n, k, variant = case
    if variant.endswith("nf4"):
        pytest.importorskip("bitsandbytes")
    call, setup, info = fold_call(variant, n, k)
    info.update({"N": n, "K": k, "R": RANK, "folded": FOLDED, "variant": variant, "dtype": str(DTYPE)})
    if setup is None:
        info["median_ms_events"] = median_ms(call) if on_gpu() else None
        info["peak_bytes"] = peak_memory_bytes(call)
        benchmark.pedantic(synced(call), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    else:  # PEFT's merge refuses to merge twice: unmerge (untimed) before every timed merge
        benchmark.pedantic(synced(call), setup=setup, rounds=min(ROUNDS, 5), warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(info)


FWD_CASES_ALL = [(m, k, n, v) for m, k, n in FWD_CASES for v in FWD_VARIANTS]


@pytest.mark.parametrize("case", FWD_CASES_ALL, ids=lambda c: f"{c[3]}-M{c[0]}-K{c[1]}-N{c[2]}")
def test_forward(benchmark, case):
    m, k, n, variant = case
    if variant == "fwd_bnb_peft":
        pytest.importorskip("bitsandbytes")
    call, info = fwd_call(variant, m, k, n)
    info.update({"M": m, "K": k, "N": n, "R": RANK, "active": FOLDED, "variant": variant, "dtype": str(DTYPE)})
    info["median_ms_events"] = median_ms(call) if on_gpu() else None
    info["peak_bytes"] = peak_memory_bytes(call)
    benchmark.extra_info.update(info)
    benchmark.pedantic(synced(call), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
