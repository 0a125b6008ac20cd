"""Drift of a base weight after repeated merge/unfold (Select-N-Fold) cycles, per dtype.

    python -m bench.plora_drift     # writes bench/results/plora_drift-<device>.json

Each cycle folds a random 12 of R = 16 modules (``select_and_fold(mode="merge")``, a random 4 kept)
and unfolds them; the largest absolute change of the weight is reported after 1, 10 and 100 cycles,
and with ``pristine=True`` (which must be 0).
"""

from __future__ import annotations

import torch
from torch import nn

from bench.common import bench_device, format_table, write_result
from fed_plora import plora

SHAPE, RANK, CYCLES = (1024, 1024), 16, (1, 10, 100)


def drift(dtype: torch.dtype, pristine: bool, device: torch.device) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(SHAPE[1], SHAPE[0], bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        base.weight.normal_(std=0.02)
    layer = plora.PLoRALinear(base, RANK, scale=2.0, adapter_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_b.normal_(std=0.01)
    weight = base.weight.detach().float().clone()
    gen = torch.Generator().manual_seed(1)
    row = {"dtype": str(dtype).removeprefix("torch."), "pristine": pristine, "max_abs_W": weight.abs().max().item()}
    for cycle in range(1, CYCLES[-1] + 1):
        layer.select_and_fold(torch.randperm(RANK, generator=gen)[:4], mode="merge", pristine=pristine)
        layer.unfold()
        if cycle in CYCLES:
            row[f"max_err_{cycle}"] = (base.weight.float() - weight).abs().max().item()
    row["rel_err_100"] = row[f"max_err_{CYCLES[-1]}"] / row["max_abs_W"]
    return row


def main() -> None:
    device = bench_device()
    rows = [drift(d, p, device) for d in (torch.bfloat16, torch.float16, torch.float32) for p in (False, True)]
    print(format_table(rows, ["dtype", "pristine", "max_abs_W", *(f"max_err_{c}" for c in CYCLES), "rel_err_100"]))
    path = write_result("plora_drift", {"shape": SHAPE, "R": RANK, "kept": 4, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
