"""The fused op's contract beyond its values: bad input, compilation, CPU dispatch, GPU behaviour."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from helpers import LaunchRecorder

from fed_plora.kernels import plora_linear, plora_linear_reference

triton_launchers = importlib.import_module("fed_plora.kernels.plora_linear._triton")
fused_launchers = importlib.import_module("fed_plora.kernels.plora_linear._gemm_lowrank")
#: (module, kernel) of every Triton kernel the op launches.
KERNELS = [
    (triton_launchers, "_shrink_kernel"),
    (triton_launchers, "_gemm_with_slab_kernel"),
    (triton_launchers, "_reduce_over_m_kernel"),
    (fused_launchers, "_gemm_lowrank_kernel"),
]


def operands(device, dtype=torch.float32, m=6, k=12, n=10, rank=4):
    gen = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(m, k, generator=gen).to(device, dtype),
        weight=torch.randn(n, k, generator=gen).to(device, dtype),
        lora_a=torch.randn(rank, k, generator=gen).to(device, dtype),
        lora_b=torch.randn(n, rank, generator=gen).to(device, dtype),
        active=torch.tensor([0, 2], device=device),
        scale=0.5,
        bias=None,
    )


BAD_INPUTS = [
    # (what to replace, builder(ops) -> new value, exception, words the message must contain)
    ("x", lambda o: o["x"][:, :5], ValueError, ["x", "K = 12"]),
    ("x", lambda o: o["x"].tolist(), TypeError, ["x", "torch.Tensor"]),
    ("x", lambda o: o["x"].to(torch.float64), TypeError, ["x", "float32, float16 or bfloat16"]),
    ("x", lambda o: o["x"].int(), TypeError, ["x"]),
    ("weight", lambda o: o["weight"][0], ValueError, ["weight", "2 dimensions"]),
    ("weight", lambda o: o["weight"].half(), TypeError, ["weight", "dtype"]),
    ("lora_a", lambda o: o["lora_a"][:, :7], ValueError, ["lora_a", "[R, K]"]),
    ("lora_a", lambda o: o["lora_a"][:0], ValueError, ["lora_a", "R >= 1"]),
    ("lora_a", lambda o: o["lora_a"].bfloat16(), TypeError, ["lora_a", "dtype"]),
    ("lora_b", lambda o: o["lora_b"][:, :3], ValueError, ["lora_b", "[N, R]"]),
    ("lora_b", lambda o: o["lora_b"].T, ValueError, ["lora_b", "[N, R]"]),
    ("bias", lambda o: torch.zeros(9, device=o["x"].device), ValueError, ["bias", "[N]"]),
    ("bias", lambda o: torch.zeros(10, device=o["x"].device, dtype=torch.float16), TypeError, ["bias", "dtype"]),
    ("active", lambda o: torch.tensor([0, 4], device=o["x"].device), ValueError, ["active", "[0, 4)"]),
    ("active", lambda o: torch.tensor([-1], device=o["x"].device), ValueError, ["active", "[0, 4)"]),
    ("active", lambda o: torch.tensor([1, 1], device=o["x"].device), ValueError, ["active", "repeat"]),
    ("active", lambda o: torch.tensor([0.0, 1.0], device=o["x"].device), TypeError, ["active", "integer"]),
    ("active", lambda o: torch.tensor([True, False], device=o["x"].device), TypeError, ["active", "integer"]),
    ("active", lambda o: torch.tensor([[0, 1]], device=o["x"].device), ValueError, ["active", "1 dimensions"]),
    ("active", lambda o: torch.arange(5, device=o["x"].device), ValueError, ["active", "5 entries"]),
    ("active", lambda o: [0, 1], TypeError, ["active", "torch.Tensor"]),
    ("scale", lambda o: float("nan"), ValueError, ["scale", "finite"]),
    ("scale", lambda o: torch.tensor(0.5), TypeError, ["scale", "float"]),
    ("scale", lambda o: "0.5", TypeError, ["scale", "float"]),
]


@pytest.mark.parametrize("name, build, error, words", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_raises_clear_error(name, build, error, words, device):
    ops = operands(device)
    ops[name] = build(ops)
    with pytest.raises(error) as info:
        plora_linear(**ops)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_device_mismatch_names_argument():
    ops = operands("cpu")
    ops["lora_b"] = ops["lora_b"].to("meta")
    with pytest.raises(ValueError, match="lora_b must be on cpu"):
        plora_linear(**ops)
    ops = operands("cpu")
    ops["active"] = ops["active"].to("meta")
    with pytest.raises(ValueError, match="active must be on cpu"):
        plora_linear(**ops)


def test_failed_call_leaves_inputs_untouched(device):
    ops = operands(device)
    before = {k: v.clone() for k, v in ops.items() if isinstance(v, torch.Tensor)}
    ops["active"] = torch.tensor([3, 3], device=device)
    with pytest.raises(ValueError):
        plora_linear(**ops)
    for key, value in before.items():
        if key != "active":
            assert torch.equal(ops[key], value)


def test_in_place_change_of_index_tensor_is_revalidated(device):
    ops = operands(device)
    plora_linear(**ops)  # validated and cached
    ops["active"][1] = 9  # bumps the tensor's version counter
    with pytest.raises(ValueError, match="active"):
        plora_linear(**ops)


def test_changing_active_set_within_a_bucket_compiles_nothing_new(monkeypatch, device):
    log: list = []
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, LaunchRecorder(getattr(module, name), log, triton_launchers.ACTIVE_SET_ARGS))
    gen = torch.Generator().manual_seed(1)
    rank = 40
    ops = operands(device, m=20, k=24, n=18, rank=rank)
    lora_a = ops["lora_a"].requires_grad_()
    lora_b = ops["lora_b"].requires_grad_()
    keys_by_bucket: dict[int, set] = {}
    for count in (1, 2, 7, 15, 16, 17, 31, 32, 33, 40):
        for _ in range(2):
            active = torch.randperm(rank, generator=gen)[:count].to(device)
            if count == 7:
                active = torch.randperm(rank, generator=gen)[10 : 10 + count].to(device)  # unaligned pointer
            log.clear()
            plora_linear(ops["x"], ops["weight"], lora_a, lora_b, active, 0.5).sum().backward()
            assert {kernel for kernel, _ in log} == {"_gemm_lowrank_kernel", "_shrink_kernel", "_reduce_over_m_kernel"}
            bucket = 16 if count <= 16 else 32 if count <= 32 else 64
            keys_by_bucket.setdefault(bucket, set()).add(tuple(log))
    assert {bucket: len(keys) for bucket, keys in keys_by_bucket.items()} == {16: 1, 32: 1, 64: 1}


def test_cpu_tensors_without_interpreter_use_torch_path():
    code = (
        "import torch\n"
        "from fed_plora.kernels import plora_linear, plora_linear_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, w = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g)\n"
        "a, b = torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g)\n"
        "i = torch.tensor([2, 0])\n"
        "assert torch.equal(plora_linear(x, w, a, b, i, 0.5), plora_linear_reference(x, w, a, b, i, 0.5))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -------------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("count", [8, 64])
def test_bf16_benchmark_shapes_on_gpu(k, n, count):
    torch.manual_seed(0)
    m, rank = 2048, 64
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * k**-0.5).bfloat16()
    a = (torch.randn(rank, k, device="cuda") * k**-0.5).bfloat16().requires_grad_()
    b = torch.randn(n, rank, device="cuda", dtype=torch.bfloat16).requires_grad_()
    xg = x.clone().requires_grad_()
    active = torch.randperm(rank, device="cuda")[:count]
    y = plora_linear(xg, w, a, b, active, 2.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = plora_linear_reference(x64, w.double(), a64, b64, active, 2.0)
    y64.backward(dy.double())
    for fast, ref in ((y, y64), (xg.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert ((fast.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
def test_no_host_sync_and_no_recompile_on_gpu():
    torch.manual_seed(0)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 512, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(384, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sets = [torch.randperm(64, device="cuda")[:c] for c in (3, 9, 16, 5)]
    for active in sets:  # first use validates each index tensor (one small read) and compiles bucket 16
        plora_linear(x, w, a, b, active, 1.0).float().sum().backward()
    kernels = [getattr(module, name) for module, name in KERNELS if name != "_gemm_with_slab_kernel"]  # no empty set here
    cached = [_compiled_count(k) for k in kernels]
    assert all(count > 0 for count in cached)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for active in sets * 3:
            y = plora_linear(x, w, a, b, active, 1.0)
            y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [_compiled_count(k) for k in kernels] == cached


def _compiled_count(kernel) -> int:
    """Compiled variants of an autotuned Triton kernel (first item of each device cache entry)."""
    return sum(len(entry[0]) for entry in kernel.fn.device_caches.values())


def test_matrices_beyond_32_bit_offsets_are_refused(device):
    ops = operands(device)
    ops["x"] = ops["x"][:1].expand(2**31 // 12 + 1, 12)  # a view: no memory behind the large shape
    with pytest.raises(ValueError, match="32-bit offsets"):
        plora_linear(**ops)
