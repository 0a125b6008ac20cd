"""Every benchmark target, once: ``bench.fold`` and ``bench.gpu_suite`` print each ratio beside its target here.

A fixed target holds ``value relation limit``. A roofline-relative one holds against the ratio's modelled bound
at the measured shape (``bench.static_profile.bound_ratios``): at most the bound times its slack (``<=``), or at
least the bound divided by it (``>=``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """``name`` (as ``bench.gpu_suite`` prints it), ``relation`` "<=", ">=" or ">", ``limit`` (the slack factor
    over the modelled bound where ``over_bound``) and what the ratio ``measures``."""

    name: str
    relation: str
    limit: float
    measures: str
    over_bound: bool = False

    def limit_at(self, bound: float | None = None) -> float:
        """The limit a value is held to (at ``bound``, the modelled bound, for a roofline-relative target)."""
        if not self.over_bound:
            return self.limit
        return self.limit * bound if self.relation == "<=" else bound / self.limit

    def text(self, bound: float | None = None) -> str:
        """``relation limit``, as the tables print it."""
        return f"{self.relation} {self.limit_at(bound):.3g}"

    def met(self, value: float | None, bound: float | None = None) -> bool | None:
        """Whether ``value`` meets the target (None without a value)."""
        if value is None:
            return None
        limit = self.limit_at(bound)
        return {"<=": value <= limit, ">=": value >= limit, ">": value > limit}[self.relation]


#: How much further from its roofline bound a fused kernel may run than cuBLAS runs from its own.
ROOFLINE_SLACK = 1.05

FUSED_FWD = Target(
    "fwd / cuBLAS x W^T", "<=", ROOFLINE_SLACK, "fused PLoRA forward over cuBLAS x W^T at the same shape", over_bound=True
)
FUSED_BWD = Target(
    "bwd / cuBLAS dy W", "<=", ROOFLINE_SLACK, "fused backward (dx, dA, dB) over cuBLAS dy W at the same shape", over_bound=True
)
UNFUSED_GAIN = Target(
    "PEFT-style unfused / fused, fwd+bwd",
    ">=",
    ROOFLINE_SLACK,
    "forward+backward of PEFT-style unfused LoRA over the fused op's",
    over_bound=True,
)
UNSLOTH_GAIN = Target(
    "Unsloth-style / fused, fwd+bwd",
    ">",
    1.0,
    "forward+backward of Unsloth-style LoRA (cuBLAS, in-place addmm_) over the fused op's",
)
CHANGING_ACTIVE_SET = Target(
    "changing / fixed active set, fwd+bwd",
    "<=",
    1.05,
    "fused forward+backward with a new active set every call over one fixed set",
)
RECOMPILES = Target("recompiles while the set changes", "<=", 0, "kernels compiled while the active set changes")
FOLD_BANDWIDTH = Target("fold / copy bandwidth", ">=", 0.85, "bf16 fold's bandwidth over a device-to-device copy of W")
NF4_FOLD_GAIN = Target("PEFT 4-bit merge / NF4 fold", ">=", 100, "PEFT's merge into a bitsandbytes 4-bit layer over fold_nf4_")
#: The token count at which ``NF4_FORWARD`` holds.
NF4_FORWARD_M = 4096
NF4_FORWARD = Target(
    f"NF4 fwd (best mode) / bf16 fused fwd at M = {NF4_FORWARD_M}",
    "<=",
    1.10,
    "NF4 PLoRA forward (best dequantisation mode) over our bf16 fused forward",
)
NF4_FORWARD_ROOFLINE = Target(
    "NF4 fwd (best mode) / bf16 fused fwd",
    "<=",
    ROOFLINE_SLACK,
    "NF4 PLoRA forward (best dequantisation mode) over bf16's, against its modelled bound",
    over_bound=True,
)
TRAIN_SPEEDUP = Target("train step tokens/s, PLoRA / PEFT", ">=", 1.3, "training step tokens/s with PLoRA over PEFT LoRA")
TRAIN_PEAK_MEMORY = Target("train step peak memory, PLoRA / PEFT", "<=", 1.0, "training step peak memory, PLoRA over PEFT LoRA")
