"""Static profile of the kernels: compiled and modelled on a machine without a GPU, never timed.

python -m bench.static_profile            # JSON into bench/results/static_profile.json, tables on stdout
python -m bench.static_profile --quick    # sm_90 only, one active count (a smoke run)

The JSON's parts:

* ``variants``: the launches of each benchmark op (bf16, R = 64, M = 4096 and the shapes below; none, 16 and 64
  active; NF4 at M = 16 and 4096) are made on ``meta`` tensors through ``bench.offline_triton`` (Triton's own
  binder and autotuner for a CUDA target, nothing runs); every binary they would compile on sm_90 and on sm_80
  (every config the autotuner can pick there) is built with that specialisation, and ``bench.sass`` reads its
  registers, spills, shared memory, occupancy and the instruction mix of its K loops.
* ``roofline``, ``target_bounds``, ``forward_designs``: the HBM bytes and FLOPs of each op's launch plan (each
  launcher counts its own, see ``fed_plora.kernels._cost``; torch launches in between are counted from their
  operands), bound per launch by ``max(flops / peak, bytes / bandwidth)`` scaled by ``min(1, programs / SMs)``
  (a launch with fewer programs than SMs cannot use the whole GPU), summed, and divided by the bound of the
  reference (the bare cuBLAS product, the unfused path, the bf16 forward); for both forward designs.
* ``nf4_issue_bounds``: the NF4 GEMM's instruction-issue time at M = 16 against its memory floor.
* ``training_run``: the binaries and tuning keys a Llama-7B training run with dynamic padding would compile
  (every projection shape, M over every token bucket from 16 to 8192 with and without a multiple of 16,
  1 to 64 of 64 modules active, int64 and int32 indices).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from bench import sass
from bench.offline_triton import AMPERE, HOPPER, Launch, OfflineGPU, compile_launch
from fed_plora.kernels import _cost
from fed_plora.kernels._checks import as_kernel_indices
from fed_plora.kernels.nf4 import _triton as nf4_triton
from fed_plora.kernels.nf4.layout import NF4_LEVELS, NF4Weight
from fed_plora.kernels.plora_linear import _gemm_lowrank, formulas
from fed_plora.kernels.plora_linear import _triton as fused
from fed_plora.kernels.plora_linear_nf4 import _triton as nf4_gemm

RESULT = Path(__file__).resolve().parent / "results" / "static_profile.json"
RANK, SCALE, DTYPE = 64, 0.25, torch.bfloat16
#: (M, K, N) of the benchmark launches; NF4 adds M = 16 (decoding) at the three shapes.
SHAPES = [(4096, 4096, 4096), (4096, 4096, 11008), (4096, 11008, 4096)]
NF4_SHAPES = [(16, k, n) for _, k, n in SHAPES] + [(4096, 4096, 4096)]
COUNTS = (16, 64)
TARGETS = {"sm_90": (HOPPER, sass.HOPPER), "sm_80": (AMPERE, sass.AMPERE)}
#: Llama-7B projections (K, N): q/k/v/o, gate/up, down.
LLAMA_7B = [(4096, 4096), (4096, 11008), (11008, 4096)]

#: Every autotuned kernel; the NF4 GEMM last (a training run with a bf16 base does not launch it).
TUNERS = [
    fused._shrink_kernel,
    fused._gemm_with_slab_kernel,
    fused._reduce_over_m_kernel,
    _gemm_lowrank._gemm_lowrank_kernel,
    nf4_gemm._gemm_nf4_kernel,
]


# ------------------------------------------------------------------------------------------ launches


def _meta(*shape, dtype=DTYPE):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _nf4_meta(n: int, k: int) -> NF4Weight:
    blocks = n * k // 64
    return NF4Weight(
        packed=_meta(n * k // 2, 1, dtype=torch.uint8), absmax=_meta(blocks, dtype=torch.uint8), shape=torch.Size((n, k)),
        dtype=DTYPE, blocksize=64, code=torch.tensor(NF4_LEVELS, device="meta"), offset=_meta((), dtype=torch.float32),
        absmax2=_meta(-(-blocks // 256), dtype=torch.float32), code2=_meta(256, dtype=torch.float32),
    )  # fmt: skip


def _active(count: int, index_dtype: torch.dtype) -> torch.Tensor:
    """An index tensor as the op hands it to the formulas (normalised as ``check_indices`` does)."""
    return as_kernel_indices(_meta(count, dtype=index_dtype))


def forward(m, k, n, count, index_dtype=torch.int64):
    x, w = _meta(m, k), _meta(n, k)
    return formulas.forward(x, w, _meta(RANK, k), _meta(n, RANK), _active(count, index_dtype), SCALE, None)


def backward(m, k, n, count, index_dtype=torch.int64):
    x, w = _meta(m, k), _meta(n, k)
    t = _meta(m, triton.next_power_of_2(max(16, count)), dtype=torch.float32)
    active = _active(count, index_dtype)
    return formulas.backward(_meta(m, n), x, t, lambda: w.T, _meta(RANK, k), _meta(n, RANK), active, SCALE, [True] * 3)


def nf4_forward(m, k, n, count):
    x, a, b, active = _meta(m, k), _meta(RANK, k), _meta(n, RANK), _meta(count, dtype=torch.int64)
    return formulas.forward(x, _nf4_meta(n, k), a, b, active, SCALE, None, gemm=nf4_gemm.gemm_nf4_with_slab)


def nf4_temporary_forward(m, k, n, count):
    """The NF4 op's forward for large M: dequantise W into a temporary, then the bf16 forward."""
    nf4, weight = _nf4_meta(n, k), _meta(n, k)
    nf4_triton.dequantize(nf4, weight)
    return formulas.forward(_meta(m, k), weight, _meta(RANK, k), _meta(n, RANK), _active(count, torch.int64), SCALE, None)


def cublas(m, k, n):
    """The bare product the op is compared with (``x Wᵀ`` or ``dy W``): one launch, each operand moved once."""
    return [_cost.Cost("cublas", 2 * m * n * k, (m * k + n * k + m * n) * DTYPE.itemsize)]


OPS = {"forward": forward, "backward": backward}


# ------------------------------------------------------------------------------------------ variants


def describe(launch: Launch, target: str) -> dict:
    """Registers, spills, shared memory, occupancy and K-loop mix of ``launch``'s binary for ``target``."""
    gpu_target, sm = TARGETS[target]
    compiled = compile_launch(launch, gpu_target)
    meta = compiled.metadata
    report = sass.ptxas_report(compiled.asm["ptx"], gpu_target.arch, meta.enable_fp_fusion)
    blocks = {k: v for k, v in launch.args.items() if k.startswith(("BLOCK_", "GROUP_"))}
    return {
        "kernel": launch.kernel,
        "target": target,
        "config": {**blocks, "num_warps": meta.num_warps, "num_stages": meta.num_stages},
        "P": launch.args.get("P"),
        **report,
        "shared": meta.shared,
        **sass.occupancy(report["registers"], meta.shared, meta.num_warps, sm),
        "k_loops": sass.tensor_loops(compiled.asm["cubin"]),
    }


def benchmark_variants(target: str = "sm_90", counts=COUNTS) -> dict[str, Launch]:
    """Every binary the benchmark launches compile on ``target`` (all configs its autotuners can pick), by compile key."""
    with OfflineGPU(TARGETS[target][0]).watch(*TUNERS) as gpu:
        for m, k, n in SHAPES:
            for count in (0, *counts):  # no module active: the plain GEMM
                forward(m, k, n, count)
                backward(m, k, n, count)
        for m, k, n in NF4_SHAPES:
            for count in counts:
                nf4_forward(m, k, n, count)
    return gpu.variants()


def profile_variants(targets=tuple(TARGETS), counts=COUNTS) -> list[dict]:
    rows = []
    for target in targets:
        for launch in benchmark_variants(target, counts).values():
            rows.append({**describe(launch, target), "layout": _layout(launch)})
    return rows


def _layout(launch: Launch) -> str:
    """Which unit strides the binary is specialised on (they distinguish e.g. the forward and the dx GEMM)."""
    return ",".join(name for name, value in launch.args.items() if name.startswith("stride") and value == 1)


# ------------------------------------------------------------------------------------------ roofline


class _TorchLaunches(TorchDispatchMode):
    """Counts every torch kernel run in the block into ``_cost``: bytes of its tensor operands and results, and
    the FLOPs of matrix products."""

    FREE = ("empty", "new_empty", "empty_like", "empty_strided", "detach", "alias", "lift_fresh", "ones_like")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if not view and not name.startswith(self.FREE):
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            results = out if isinstance(out, (tuple, list)) else [out]
            written = sum(r.numel() * r.element_size() for r in results if isinstance(r, torch.Tensor))
            read = 0 if name.endswith(("zero_", "fill_", "zeros_like")) else sum(t.numel() * t.element_size() for t in tensors)
            flops = 2 * results[0].numel() * tensors[-1].shape[0] if name in ("mm", "addmm") else 0
            _cost.record(f"torch.{name}", flops, read + written)
        return out


def plan(op, *shape) -> list[_cost.Cost]:
    """The launches of ``op(*shape)`` with their costs, in order."""
    with OfflineGPU().watch(*TUNERS), _cost.counting() as launches, _TorchLaunches():
        op(*shape)
    return launches


def bound_us(launches: list[_cost.Cost], sm: sass.SM, programs: dict[str, int] | None = None) -> float:
    """Sum over launches of ``max(flops / peak, bytes / bandwidth)`` (µs), each scaled up when it has fewer
    programs than the GPU has SMs."""
    total = 0.0
    for launch in launches:
        seconds = max(launch.flops / sm.dense_bf16_flops, launch.bytes / sm.hbm_bytes_per_s)
        share = min(1.0, (programs or {}).get(launch.name, sm.sms) / sm.sms)
        total += seconds / share
    return total * 1e6


def grids(op, *shape) -> dict[str, int]:
    """Most programs of each Triton launch of ``op(*shape)`` over the configs the autotuner benchmarks."""
    with OfflineGPU().watch(*TUNERS) as gpu:
        op(*shape)
    most: dict[str, int] = {}
    for launch in gpu.launches:
        name = launch.kernel.strip("_").removesuffix("_kernel")
        most[name] = max(most.get(name, 0), int(torch.tensor(launch.grid).prod()))
    return most


def unfused_fwdbwd(m, k, n, count):
    """PEFT's LoRA at rank = the active count (the benchmark's unfused path): forward and backward by autograd."""
    x = _meta(m, k).requires_grad_()
    a, b = _meta(count, k).requires_grad_(), _meta(n, count).requires_grad_()
    y = x @ _meta(n, k).T + (x @ a.T) @ b.T * SCALE
    y.backward(_meta(m, n))


def bound_ratios(m: int, k: int, n: int, count: int, sm: sass.SM = sass.HOPPER) -> dict[str, float]:
    """Modelled bounds of the benchmark's ratios at one shape: fused forward / cuBLAS ``x Wᵀ``, fused backward /
    cuBLAS ``dy W``, unfused / fused forward+backward (the most the fused op can gain over the unfused path, if
    the unfused one ran at its bound), and the NF4 op's forward (the better of its two paths) / the bf16 one."""

    def bound(op):
        return bound_us(plan(op, m, k, n, count), sm, grids(op, m, k, n, count))

    fwd, bwd = bound(forward), bound(backward)
    return {
        "fwd/cublas": fwd / bound_us(cublas(m, k, n), sm),
        "bwd/cublas_dgrad": bwd / bound_us(cublas(m, n, k), sm),
        "unfused/fused fwd+bwd": bound_us(plan(unfused_fwdbwd, m, k, n, count), sm) / (fwd + bwd),
        "nf4/bf16 fwd": min(bound(nf4_forward), bound(nf4_temporary_forward)) / fwd,
    }


def roofline(sm: sass.SM = sass.HOPPER, counts=COUNTS) -> list[dict]:
    rows = []
    for op_name, op in OPS.items():
        for m, k, n in SHAPES:
            for count in counts:
                launches = plan(op, m, k, n, count)
                reference = cublas(m, k, n) if op_name == "forward" else cublas(m, n, k)
                ours, base = bound_us(launches, sm, grids(op, m, k, n, count)), bound_us(reference, sm)
                rows.append({
                    "op": op_name, "M": m, "K": k, "N": n, "active": count,
                    "launches": [{"name": c.name, "GFLOP": c.flops / 1e9, "MB": c.bytes / 1e6} for c in launches],
                    "bound_us": ours, "cublas_bound_us": base, "bound_ratio": ours / base,
                })  # fmt: skip
    return rows


def forward_with_shrink(m, k, n, count):
    """The other forward design: a separate shrink for t (a second pass over x), then the GEMM seeded with the slab."""
    x, w = _meta(m, k), _meta(n, k)
    a, b, active = _meta(RANK, k), _meta(n, RANK), _active(count, torch.int64)
    return formulas.forward(x, w, a, b, active, SCALE, None, gemm=fused.gemm_with_slab)


def forward_designs(sm: sass.SM = sass.HOPPER, counts=COUNTS) -> list[dict]:
    """Modelled bound / cuBLAS of both forward designs: the one pass over x that the op runs (t computed once per
    run of tiles, ``gemm_lowrank``) and a separate shrink before the GEMM."""
    rows = []
    for m in (2048, 4096, 8192):
        for k, n in LLAMA_7B:
            for count in counts:
                base = bound_us(cublas(m, k, n), sm)
                ratio = {
                    name: bound_us(plan(op, m, k, n, count), sm, grids(op, m, k, n, count)) / base
                    for name, op in (("one_pass", forward), ("separate_shrink", forward_with_shrink))
                }
                rows.append({"M": m, "K": k, "N": n, "active": count, **ratio})
    return rows


#: H100 SXM boost clock (Hz) and warp schedulers per SM: at most 4 warp-instructions issued per cycle per SM.
CLOCK_HZ, SCHEDULERS = 1.98e9, 4


def nf4_issue_bounds(variants: list[dict]) -> list[dict]:
    """NF4 GEMM at decoding size (M = 16): for each sm_90 config, the time to issue its K loops' instructions
    (warp-instructions over ``SCHEDULERS`` per SM on ``min(programs, SMs)`` SMs at ``CLOCK_HZ``; ``splits``
    programs share each output tile's K-steps, as the launcher chooses them) against the memory floor of the
    product (its operands' bytes at HBM bandwidth, without the split's partial sums)."""
    rows = []
    for m, k, n in [s for s in NF4_SHAPES if s[0] == 16]:
        launches = plan(nf4_forward, m, k, n, 16)
        floor_us = next(c.bytes for c in launches if c.name == "gemm_nf4_with_slab") / sass.HOPPER.hbm_bytes_per_s * 1e6
        for v in variants:
            if v["kernel"] != "_gemm_nf4_kernel" or v["target"] != "sm_90" or v["P"] != 16:
                continue
            c = v["config"]
            tiles, k_steps = -(-m // c["BLOCK_M"]) * -(-n // c["BLOCK_N"]), k // c["BLOCK_K"]
            split = nf4_gemm.splits(tiles, k_steps, sass.HOPPER.sms, floor_us * sass.HOPPER.hbm_bytes_per_s / 1e6, 2 * m * n * 4)
            programs, steps = tiles * split, -(-k_steps // split)
            warp_instructions = programs * steps * v["k_loops"][0]["instructions"] * c["num_warps"]
            issue_us = warp_instructions / (SCHEDULERS * min(programs, sass.HOPPER.sms) * CLOCK_HZ) * 1e6
            rows.append({"M": m, "K": k, "N": n, "config": c, "splits": split, "programs": programs,
                         "k_loop_instructions": v["k_loops"][0]["instructions"], "issue_us": issue_us,
                         "memory_floor_us": floor_us, "issue/floor": issue_us / floor_us})  # fmt: skip
    return rows


def target_bounds(counts=(8, 16, 64)) -> list[dict]:
    """``bound_ratios`` at the GPU suite's and the benchmark's shapes."""
    shapes = sorted({(m, k, n) for m in (16, 2048, 4096, 8192) for k, n in ((4096, 4096), (4096, 11008), (11008, 4096))})
    return [{"M": m, "K": k, "N": n, "active": c, **bound_ratios(m, k, n, c)} for m, k, n in shapes for c in counts]


# ------------------------------------------------------------------------------------------ training run


def training_run() -> dict:
    """Binaries and tuning keys a Llama-7B run with dynamic padding compiles (see the module docstring), with
    int64 and int32 index tensors; and the tuning keys under which more binaries ran than the kernel has configs
    (a key that misses something that selects a binary: one config is tuned, another binary reuses it untuned)."""
    token_counts = sorted({m for b in (2**i for i in range(4, 14)) for m in (b, b - 1)})
    tuners = TUNERS[:-1]
    with OfflineGPU().watch(*tuners) as gpu:
        for k, n in LLAMA_7B:
            for m in token_counts:
                for count in (1, 16, 17, 32, 33, 64):
                    for index_dtype in (torch.int64, torch.int32):
                        forward(m, k, n, count, index_dtype)
                        backward(m, k, n, count, index_dtype)
        keys = {tuner.base_fn.__name__: len(gpu.tuning_keys(tuner)) for tuner in tuners}
    variants = gpu.variants()
    per_kernel: dict[str, int] = {}
    for launch in variants.values():
        per_kernel[launch.kernel] = per_kernel.get(launch.kernel, 0) + 1
    incomplete = {
        tuner.base_fn.__name__: sum(len(b) > len(tuner.configs) for b in gpu.binaries_per_tuning_key(tuner).values())
        for tuner in tuners
    }
    return {
        "token_counts": token_counts,
        "active_counts": [1, 16, 17, 32, 33, 64],
        "index_dtypes": ["int64", "int32"],
        "compiled_variants": len(variants),
        "variants_per_kernel": per_kernel,
        "tuning_keys": sum(keys.values()),
        "tuning_keys_per_kernel": keys,
        "keys_with_several_binaries_per_config": incomplete,
    }


# ------------------------------------------------------------------------------------------ driver


def _print_tables(result: dict) -> None:
    print("variants (compiled, not timed):")
    print(f"{'kernel':24} {'target':6} {'P':>3} {'config':34} {'layout':28} {'regs':>4} {'spill':>5} {'smem':>7} "
          f"{'warps/SM':>8} {'loop instr':>11} {'wgmma':>7} {'mma.sync':>9}")  # fmt: skip
    for row in result["variants"]:
        c = row["config"]
        blocks = "/".join(str(v) for k, v in c.items() if k.startswith("BLOCK_"))
        config = f"{blocks} w{c['num_warps']} s{c['num_stages']}"
        loops = row["k_loops"]
        mix = {k: "/".join(str(loop[k]) for loop in loops) for k in ("instructions", "wgmma", "mma_sync")}
        print(f"{row['kernel']:24} {row['target']:6} {row['P'] or '':>3} {config:34} {row['layout']:28} {row['registers']:>4} "
              f"{row['spill_stores']:>5} {row['shared']:>7} {row['warps_per_sm'] if row['fits'] else 'n/a':>8} "
              f"{mix['instructions']:>11} {mix['wgmma']:>7} {mix['mma_sync']:>9}")  # fmt: skip
    print("\nroofline (modelled, H100 SXM):")
    for row in result["roofline"]:
        print(f"{row['op']:9} M={row['M']} K={row['K']} N={row['N']} active={row['active']}: "
              f"{row['bound_us']:.1f} us vs cuBLAS {row['cublas_bound_us']:.1f} us = {row['bound_ratio']:.3f}x")  # fmt: skip
    run = result["training_run"]
    print(f"\nLlama-7B training run: {run['compiled_variants']} compiled variants, {run['tuning_keys']} tuning keys, "
          f"incomplete keys {run['keys_with_several_binaries_per_config']}")  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sm_90 only, 16 active")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    started = time.time()
    targets, counts = (("sm_90",), (16,)) if args.quick else (tuple(TARGETS), COUNTS)
    result = {
        "what": "compiled and modelled, not timed: no GPU ran anything",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "dtype": str(DTYPE), "rank": RANK,
        "hardware": {name: vars(sm) for name, (_, sm) in TARGETS.items()},
        "variants": profile_variants(targets, counts),
        "roofline": roofline(counts=counts),
        "forward_designs": forward_designs(counts=counts),
        "target_bounds": target_bounds(),
        "training_run": training_run(),
    }  # fmt: skip
    result["nf4_issue_bounds"] = nf4_issue_bounds(result["variants"])
    result["seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    _print_tables(result)
    print(f"\nwrote {args.out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
