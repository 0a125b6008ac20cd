"""torch.compile with PLoRA: the fused ops are custom ops, so models compile to one graph (``fullgraph=True``),
forward and backward, with eager's values, and a new active set within a rank bucket recompiles nothing.
Eager calls bypass the custom ops (an autograd.Function with the same bodies) and give bit-identical results."""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
from helpers import MODEL_TOLERANCE, LaunchRecorder, randomize_adapters, rel_error, tiny_model, token_batch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.profiler import ProfilerActivity, profile

from fed_plora import plora
from fed_plora.kernels import plora_linear, plora_linear_nf4, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")
checks = importlib.import_module("fed_plora.kernels._checks")
launchers = importlib.import_module("fed_plora.kernels.plora_linear._triton")
gemm_lowrank = importlib.import_module("fed_plora.kernels.plora_linear._gemm_lowrank")
nf4_op = importlib.import_module("fed_plora.kernels.plora_linear_nf4.op")

# Relative Frobenius error allowed between a compiled model and eager. Our op gives identical values on
# identical operands; inductor fuses the code around it and skips intermediate bf16 roundings (measured on
# the tiny Llama with all seven projections adapted: fp32 <= 1.5e-6, bf16 logits 8e-3, adapter grads <= 3e-2).


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def operands(device, dtype=torch.float32, m=5, k=64, n=24, rank=40):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    return rand(m, k), rand(n, k, std=k**-0.5), rand(rank, k, std=k**-0.5), rand(n, rank), rand(n)


def test_custom_ops_pass_opcheck(device):
    """Schema, fake implementations (shapes, dtypes, devices), autograd registration, AOT dispatch with dynamic shapes."""
    x, weight, lora_a, lora_b, bias = operands(device, rank=4)
    active = torch.tensor([2, 0], device=device)
    torch.library.opcheck(
        torch.ops.plora.linear.default, (x.requires_grad_(), weight, lora_a.requires_grad_(), lora_b, active, 0.5, bias)
    )
    y, t = torch.ops.plora.linear(x, weight, lora_a, lora_b, active, 0.5, bias)
    assert not t.requires_grad
    dy = torch.randn_like(y)
    plain = x.detach(), lora_a.detach(), lora_b.detach()
    backward_args = (dy, plain[0], t, weight, *plain[1:], active, 0.5, [True, False, True])
    torch.library.opcheck(torch.ops.plora.linear_backward.default, backward_args)

    code2 = bnb.functional.create_dynamic_map().to(device)
    flat = nf4_op._flatten(quantize_nf4(weight, 64, code2))
    for fused in (True, False):
        torch.library.opcheck(torch.ops.plora.linear_nf4.default, (x, lora_a, lora_b, bias, *flat, active, 0.5, fused, 1))
    _, t = torch.ops.plora.linear_nf4(*plain, bias, *flat, active, 0.5, True, 1)
    torch.library.opcheck(
        torch.ops.plora.linear_nf4_backward.default, (dy, plain[0], t, *plain[1:], active, *flat, 0.5, 1, [True, True, True])
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_compiles_to_one_graph_with_eager_values(dtype, device):
    x, weight, lora_a, lora_b, bias = operands(device, dtype)
    leaves = [t.requires_grad_() for t in (x, weight, lora_a, lora_b, bias)]

    def step(fn, active):
        for leaf in leaves:
            leaf.grad = None
        y = fn(x.view(1, 5, 64), weight, lora_a, lora_b, active, 0.5, bias)
        (y.float() * torch.arange(24, device=device)).sum().backward()
        return [y.detach()] + [leaf.grad for leaf in leaves]

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(plora_linear, backend=counter, fullgraph=True)
    active = torch.tensor([7, 1, 30], device=device)
    eager, ours = step(plora_linear, active), step(compiled, active)
    # The op runs the same kernels on the same operands: y, dx, dA and dB are bit-identical.
    for name, got, expected in zip(("y", "dx", "dW", "dA", "dB", "dbias"), ours, eager):
        if name in ("dW", "dbias"):  # plain torch code, compiled by inductor
            assert rel_error(got, expected) < MODEL_TOLERANCE[dtype], name
        else:
            assert torch.equal(got, expected), name
    assert counter.frame_count == 1


def two_paths(case: str, device):
    """Leaves that get gradients, then the public op (eager path) and the custom op, as functions of nothing."""
    kind, dtype = case.split("-")
    dtype = getattr(torch, dtype)
    x, weight, lora_a, lora_b, bias = operands(device, dtype)
    leaves = [t.requires_grad_() for t in (x, lora_a, lora_b, bias)]
    active = torch.tensor([7, 1, 30], device=device)
    if kind == "float":
        weight.requires_grad_()  # dW too: plain torch in the autograd formula both paths share
        return [*leaves, weight], (
            lambda: plora_linear(x, weight, lora_a, lora_b, active, 0.5, bias),
            lambda: torch.ops.plora.linear(x, weight, lora_a, lora_b, active, 0.5, bias)[0],
        )
    fused = kind == "nf4fused"
    nf4 = quantize_nf4(weight, 64, bnb.functional.create_dynamic_map().to(device))
    dequant = "fused" if fused else "temporary"
    return leaves, (  # two trainable modules, one frozen term
        lambda: plora_linear_nf4(x, nf4, lora_a, lora_b, active, 0.5, bias, dequant=dequant, trainable=2),
        lambda: torch.ops.plora.linear_nf4(x, lora_a, lora_b, bias, *nf4_op._flatten(nf4), active, 0.5, fused, 2)[0],
    )


def plora_ops_run(fn, grad=True) -> list[str]:
    """The ``plora::`` custom ops that ``fn()`` dispatches, in order: forward and backward, or, with
    ``grad=False``, a forward under ``torch.no_grad``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.set_grad_enabled(grad):
        y = fn()
        if grad:
            y.float().sum().backward()
    return [event.name for event in prof.events() if event.name.startswith("plora::")]


@pytest.mark.parametrize("case", ["float-float32", "float-bfloat16", "nf4fused-bfloat16", "nf4temporary-float32"])
def test_eager_path_equals_the_custom_op_bit_for_bit(case, device):
    leaves, paths = two_paths(case, device)
    results = []
    for fn in paths:
        for leaf in leaves:
            leaf.grad = None
        y = fn()
        (y.float() * torch.arange(y.shape[-1], device=device)).sum().backward()
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    assert all(g is not None for g in results[0])
    for name, got, expected in zip(("y", "dx", "dA", "dB", "dbias", "dW"), *results):
        assert torch.equal(got, expected), name
    with torch.no_grad():  # autograd records nothing: the eager path runs the forward body alone
        assert torch.equal(paths[0](), paths[1]())


@pytest.mark.parametrize("kind, op", [("float", "plora::linear"), ("nf4fused", "plora::linear_nf4")])
def test_eager_calls_skip_the_custom_op_and_compiled_calls_run_it(kind, op, device):
    _, (eager, custom) = two_paths(f"{kind}-float32", device)
    assert plora_ops_run(custom) == [op, op + "_backward"]  # the profiler sees custom ops
    assert plora_ops_run(eager) == [] and plora_ops_run(eager, grad=False) == []
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(eager, backend=counter, fullgraph=True)
    plora_ops_run(compiled)  # the first call compiles forward and backward (compiling may dispatch the ops too)
    assert plora_ops_run(compiled) == [op, op + "_backward"]
    assert counter.frame_count == 1


def test_active_set_within_a_bucket_recompiles_neither_dynamo_nor_triton(monkeypatch, device):
    log: list = []
    for module in (launchers, gemm_lowrank):  # every Triton kernel of the op (all autotuned)
        for name, kernel in list(vars(module).items()):
            if isinstance(kernel, triton.runtime.Autotuner):
                monkeypatch.setattr(module, name, LaunchRecorder(kernel, log, launchers.ACTIVE_SET_ARGS))
    x, weight, lora_a, lora_b, _ = operands(device)
    lora_a.requires_grad_()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(plora_linear, backend=counter, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    first = torch.randperm(40, generator=gen)[:3].to(device)
    torch._dynamo.mark_dynamic(first, 0)  # else Dynamo makes the size dynamic at its first change (one recompile)
    keys_by_bucket: dict[int, set] = {}
    for count in (3, 2, 9, 16, 16, 5, 17, 32, 20):
        active = first if count == 3 else torch.randperm(40, generator=gen)[:count].to(device)
        log.clear()
        y = compiled(x, weight, lora_a, lora_b, active, 0.5)
        y.sum().backward()
        torch.testing.assert_close(y, plora_linear(x, weight, lora_a, lora_b, active, 0.5), rtol=0, atol=0)
        # forward (y and t in one pass), backward for lora_a only (dt = s dy B_act, then dA over x): all recorded
        assert {name for name, _ in log} == {"_gemm_lowrank_kernel", "_shrink_kernel", "_reduce_over_m_kernel"}, log
        keys_by_bucket.setdefault(16 if count <= 16 else 32, set()).add(tuple(log))
        assert counter.frame_count == (1 if count <= 16 else 2), count  # one graph per bucket
    assert {bucket: len(keys) for bucket, keys in keys_by_bucket.items()} == {16: 1, 32: 1}


def test_compiled_op_checks_index_values_when_it_runs_once_per_cuda_tensor(monkeypatch, device):
    reads = []
    monkeypatch.setattr(checks, "_values", lambda indices, read=checks._values: reads.append(1) or read(indices))
    x, weight, lora_a, lora_b, _ = operands(device, rank=4)
    compiled = torch.compile(plora_linear, backend="aot_eager", fullgraph=True)
    active = torch.tensor([1, 3], device=device)
    compiled(x, weight, lora_a, lora_b, active, 0.5)
    assert reads
    reads.clear()
    for _ in range(2):
        compiled(x, weight, lora_a, lora_b, active, 0.5)
    # A CUDA tensor's values are read back (a sync) once, not per call; a CPU tensor's on every call (no sync).
    assert len(reads) == (0 if device.type == "cuda" else 2)
    with pytest.raises(ValueError, match=r"active must hold module indices in \[0, 4\)"):
        compiled(x, weight, lora_a, lora_b, torch.tensor([1, 4], device=device), 0.5)
    with pytest.raises(ValueError, match="must not repeat"):
        compiled(x, weight, lora_a, lora_b, torch.tensor([2, 2], device=device), 0.5)


def _train_step(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    logits.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return [logits.detach(), *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_with_plora_layers_compiles_to_one_graph(dtype):
    model = tiny_model("llama").to(dtype).train()
    plora.inject(model, plora.PLoRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model)
    ids = token_batch()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for selection in ([0, 3], [1, 2]):  # a new set of the same size: the same graph
        plora.unfold(model)
        plora.select_and_fold(model, selection)
        eager, ours = _train_step(model, ids), _train_step(compiled, ids)
        assert len(ours) == 5  # logits, then selected_a and selected_b of two layers
        for got, expected in zip(ours, eager):
            assert rel_error(got, expected) < MODEL_TOLERANCE[dtype]
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nf4_layer_compiles_to_one_graph_with_eager_values(dtype):
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")  # nested absmax
    base.load_state_dict(nn.Linear(64, 32).state_dict())
    layer = plora.PLoRALinear(base.to("cpu"), 6, scale=0.5)
    with torch.no_grad():
        layer.lora_b.normal_(std=0.3)
    layer.select_and_fold([4, 1])  # 4-bit: two trainable modules, four frozen terms in the op
    x = torch.randn(2, 3, 64, dtype=dtype, requires_grad=True)  # the compute dtype of a 4-bit layer

    def step(fn):
        x.grad = layer.selected_a.grad = layer.selected_b.grad = None
        y = fn(x)
        y.square().sum().backward()
        return y.detach(), x.grad, layer.selected_a.grad, layer.selected_b.grad

    counter = CompileCounterWithBackend("inductor")
    eager, ours = step(layer), step(torch.compile(layer, backend=counter, fullgraph=True))
    for got, expected in zip(ours, eager):
        assert torch.equal(got, expected)
    assert counter.frame_count == 1
