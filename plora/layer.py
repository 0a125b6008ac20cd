"""``PLoRALinear``: a frozen linear base plus ``R`` one-rank modules, computed with the fused op."""

from __future__ import annotations

import math
import operator

import torch
from torch import nn
from torch.nn import functional as F

from fed_plora.kernels import plora_linear, plora_linear_nf4

from . import _base

TRAINABLE, FROZEN, FOLDED = "trainable", "frozen", "folded"
MODES = ("merge", "exact")


class PLoRALinear(nn.Module):
    """``y = base(x) + scale · Σ_{j ∈ active} (x · a_j) b_jᵀ`` with ``R`` one-rank modules.

    Holds the global module values ``lora_a [R, K]`` (rows ``a_j``) and ``lora_b [N, R]`` (columns
    ``b_j``) around a frozen ``base_layer`` (``nn.Linear`` or bitsandbytes ``Linear4bit``). Each
    module is in one state:

    * trainable: in the forward, receives gradients;
    * frozen: in the forward as a constant term, no gradient (``select_and_fold(mode="exact")``);
    * folded: merged into the base weight, absent from the adapter path (``mode="merge"``).

    While every module is trainable, ``lora_a`` and ``lora_b`` are the trainable parameters. After a
    selection of ``r < R`` modules they are frozen, and the selected modules train as the separate
    parameters ``selected_a [r, K]`` and ``selected_b [N, r]``, so an optimizer built then holds state
    for those alone; :meth:`unfold` writes them back. :meth:`module_values` always gives the current
    values of all ``R`` modules.

    The forward runs the fused op in the compute dtype (the autocast dtype when autocast is on,
    otherwise the base weight's dtype, or the input's for 4-bit bases); master adapters keep their
    own dtype and are cast (differentiably) for the op. Float bases use ``kernels.plora_linear``.
    NF4 bases use ``kernels.plora_linear_nf4`` on the packed weight (no dequantised weight is kept
    between calls; backward re-dequantises into a temporary), with ``trainable`` set to the number of
    selected modules so that frozen modules are evaluated as constant low-rank terms. Other 4-bit
    types (FP4) dequantise the weight for ``kernels.plora_linear`` (rebuilt in backward, not saved).

    ``torch.compile`` traces both fused ops as custom ops, so float and NF4 layers compile into one graph
    (``fullgraph=True`` works), forward and backward. A new selection of the same size reuses the graph;
    a selection of another size, or another state (all trainable, merged, exact), changes parameter and
    buffer shapes, which Dynamo keeps static by default, so each compiles once. FP4 bases break the graph
    at the saved-tensor hooks that rebuild their weight in backward.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scale: float,
        *,
        dropout: float = 0.0,
        init: str = "kaiming",
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not _base.is_adaptable(base_layer):
            raise TypeError(f"base_layer must be nn.Linear or bitsandbytes Linear4bit, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.scale = float(scale)
        self.is_4bit = _base.is_linear4bit(base_layer)
        weight = base_layer.weight
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if self.is_4bit else weight.dtype
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.selected_a: nn.Parameter | None = None
        self.selected_b: nn.Parameter | None = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.reset_adapter(init)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self._states = [TRAINABLE] * r
        self._mode: str | None = None
        self._pristine = None
        self.register_buffer("active_index", torch.arange(r, device=weight.device), persistent=False)

    # ------------------------------------------------------------------ state

    def reset_adapter(self, init: str = "kaiming") -> None:
        """Re-initialise every module as LoRA does: ``A`` random, ``B`` zero."""
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_a, std=1.0 / self.r)
            else:
                raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
            self.lora_b.zero_()

    @property
    def states(self) -> list[str]:
        """State of each of the ``R`` modules: ``"trainable"``, ``"frozen"`` or ``"folded"``."""
        return list(self._states)

    def indices(self, state: str) -> list[int]:
        """Sorted indices of the modules in ``state``."""
        return [j for j, s in enumerate(self._states) if s == state]

    @property
    def is_selected(self) -> bool:
        """Whether a selection is in force (``select_and_fold`` was called and not undone)."""
        return self._mode is not None

    def select_and_fold(self, indices, mode: str | None = None, *, pristine: bool = False) -> None:
        """Keep ``indices`` trainable; fold (``"merge"``) or freeze (``"exact"``) the other modules.

        ``mode=None`` picks ``"merge"`` for float bases and ``"exact"`` for 4-bit bases. A 4-bit fold
        re-quantises the weight, and NF4 levels are 0.08-0.30 of a block maximum apart, so most of a
        small folded delta rounds away: on a LoRA adapter trained for real (MiniLM-L6 on CoLA, rank 8,
        ``‖Δ‖/‖W‖`` 0.04-0.20, NF4 blocks of 64, double quantisation) a fold keeps only ~30% of Δ
        (``‖deq(fold(Wq)) − deq(Wq) − Δ‖ / ‖Δ‖`` = 0.69 weighted mean, 0.42-0.90 per matrix), while
        the frozen low-rank terms of ``"exact"`` reproduce Δ's output to 0.8e-6-4.4e-6 relative in fp32
        (``docs/nf4.md``, ``python -m bench.nf4_fidelity``). ``pristine=True`` keeps a host
        copy of a float base so that :meth:`unfold` restores it bit-exactly; 4-bit merges always keep
        one (packed, so cheap). Build the optimizer after this call.

        A call that fails leaves the layer as it was: everything is checked and built before the base
        changes, and a fold that fails is undone from the snapshot when one is kept (``pristine`` or a
        4-bit base; a float fold without one fails on its argument checks, before writing).
        """
        if self.is_selected:
            raise RuntimeError("select_and_fold was already called on this layer: call unfold() first")
        mode = ("exact" if self.is_4bit else "merge") if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
        selected = self._check_selection(indices)
        rest = [j for j in range(self.r) if j not in set(selected)]
        states = [FOLDED if mode == "merge" else FROZEN] * self.r
        for j in selected:
            states[j] = TRAINABLE
        # Everything the selection needs is built before the base changes; only then the fold, undone
        # from the snapshot (when one is kept) if it fails, and plain assignments.
        partial = len(selected) < self.r
        if partial:
            device = self.lora_a.device
            index = torch.tensor(selected, dtype=torch.long, device=device)
            selected_a = selected_b = None
            if selected:
                selected_a = nn.Parameter(self.lora_a.detach().index_select(0, index))
                selected_b = nn.Parameter(self.lora_b.detach().index_select(1, index))
            frozen = [j for j, s in enumerate(states) if s == FROZEN]
            frozen_index = torch.tensor(frozen, dtype=torch.long, device=device)
            active_index = torch.arange(len(selected) + len(frozen), device=device)
        saved = None
        if mode == "merge" and rest:
            saved = _base.snapshot(self.base_layer) if pristine or self.is_4bit else None
            try:
                _base.fold_into_base(self.base_layer, self.lora_a.detach(), self.lora_b.detach(), rest, self.scale)
            except BaseException:
                if saved is not None:
                    _base.restore(self.base_layer, saved)
                raise
        self._pristine = saved
        self._states, self._mode = states, mode
        if partial:
            self.lora_a.requires_grad_(False)
            self.lora_b.requires_grad_(False)
            self.selected_a, self.selected_b = selected_a, selected_b
            self.register_buffer("selected_index", index, persistent=False)
            self.register_buffer("frozen_index", frozen_index, persistent=False)
            self.active_index = active_index

    def unfold(self) -> None:
        """Undo :meth:`select_and_fold`: write trained modules back, restore the base, all trainable."""
        if not self.is_selected:
            return
        with torch.no_grad():
            if self.selected_a is not None:
                self.lora_a.index_copy_(0, self.selected_index, self.selected_a.to(self.lora_a.dtype))
                self.lora_b.index_copy_(1, self.selected_index, self.selected_b.to(self.lora_b.dtype))
        folded = self.indices(FOLDED)
        if self._pristine is not None:
            _base.restore(self.base_layer, self._pristine)
        elif folded:
            _base.fold_into_base(self.base_layer, self.lora_a.detach(), self.lora_b.detach(), folded, self.scale, unfold=True)
        self.selected_a = self.selected_b = None
        for name in ("selected_index", "frozen_index"):
            if name in self._buffers:
                del self._buffers[name]
        self._pristine = None
        self._states, self._mode = [TRAINABLE] * self.r, None
        self.lora_a.requires_grad_(True)
        self.lora_b.requires_grad_(True)
        self.active_index = torch.arange(self.r, device=self.lora_a.device)

    def merge_into_base(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Add ``scale · lora_b @ lora_a`` to the frozen base weight for good.

        ``lora_a [r, K]`` and ``lora_b [N, r]`` (any ``r``, any float dtype and device) are an update that
        is none of this layer's modules, e.g. FLoRA's stack of client modules. Refused while a selection
        is in force (unfold first).
        """
        self._check_merge(lora_a, lora_b)
        device = self.lora_a.device
        _base.merge_into_base(self.base_layer, lora_a.detach().to(device), lora_b.detach().to(device), self.scale)

    def module_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current ``(A [R, K], B [N, R])`` of all modules, detached copies in the adapter dtype."""
        a, b = self.lora_a.detach().clone(), self.lora_b.detach().clone()
        if self.selected_a is not None:
            a.index_copy_(0, self.selected_index, self.selected_a.detach().to(a.dtype))
            b.index_copy_(1, self.selected_index, self.selected_b.detach().to(b.dtype))
        return a, b

    def set_module_values(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Overwrite all modules with ``lora_a [R, K]`` and ``lora_b [N, R]`` (copied, cast).

        Refused while modules are folded (their values are in the base weight): unfold first.
        """
        for name, value, param in (("lora_a", lora_a, self.lora_a), ("lora_b", lora_b, self.lora_b)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.shape != param.shape:
                raise ValueError(f"{name} must have shape {tuple(param.shape)}, got {tuple(value.shape)}")
        if self.indices(FOLDED):
            raise RuntimeError("cannot overwrite module values while modules are folded into the base: unfold() first")
        with torch.no_grad():
            self.lora_a.copy_(lora_a)
            self.lora_b.copy_(lora_b)
            if self.selected_a is not None:
                self.selected_a.copy_(self.lora_a.index_select(0, self.selected_index))
                self.selected_b.copy_(self.lora_b.index_select(1, self.selected_index))

    def _check_merge(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        if self.is_selected:
            raise RuntimeError("cannot merge into the base while a selection is in force: unfold() first")
        for name, value in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
        if rank < 0 or lora_a.shape[1] != self.in_features or tuple(lora_b.shape) != (self.out_features, rank):
            raise ValueError(
                f"merge needs lora_a [r, {self.in_features}] and lora_b [{self.out_features}, r], "
                f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
            )

    def _check_selection(self, indices) -> list[int]:
        """``indices`` as a sorted list of distinct module indices in ``[0, R)``; ``TypeError`` for anything
        that is not an integer (a float, a bool, a float or bool tensor: never truncated to a module)."""
        if isinstance(indices, torch.Tensor):
            if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
                raise TypeError(f"indices must hold integer module indices, got a {indices.dtype} tensor")
            indices = indices.tolist()
        if isinstance(indices, (str, bytes)):
            raise TypeError(f"indices must be an iterable of module indices, got {type(indices).__name__}")
        try:
            items = list(indices)
        except TypeError:
            raise TypeError(f"indices must be an iterable of module indices, got {type(indices).__name__}") from None
        selected = sorted(_module_index(j) for j in items)
        if len(set(selected)) != len(selected):
            raise ValueError(f"indices must not repeat a module, got {selected}")
        if selected and (selected[0] < 0 or selected[-1] >= self.r):
            raise ValueError(f"indices must lie in [0, {self.r}), got {selected}")
        return selected

    # ---------------------------------------------------------------- forward

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if self.is_4bit else self.base_layer.weight.dtype

    def _adapters(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` whose columns/rows ``active_index`` selects for the op, cast to ``dtype``."""
        if "selected_index" not in self._buffers:
            a, b = self.lora_a, self.lora_b
        else:
            parts_a, parts_b = [], []
            if self.selected_a is not None:
                parts_a.append(self.selected_a)
                parts_b.append(self.selected_b)
            if self.frozen_index.numel():
                parts_a.append(self.lora_a.index_select(0, self.frozen_index))
                parts_b.append(self.lora_b.index_select(1, self.frozen_index))
            if not parts_a:
                return self.lora_a.to(dtype), self.lora_b.to(dtype)
            a = parts_a[0] if len(parts_a) == 1 else torch.cat(parts_a, 0)
            b = parts_b[0] if len(parts_b) == 1 else torch.cat(parts_b, 1)
        return a.to(dtype), b.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype(x)
        x = x.to(dtype)
        bias = self.base_layer.bias
        bias = None if bias is None else bias.to(dtype)
        a, b = self._adapters(dtype)
        if not self.is_4bit:
            return self._forward(x, self.base_layer.weight.to(dtype), a, b, bias)
        if getattr(self.base_layer.weight.quant_state, "quant_type", None) == "nf4":
            return self._forward_nf4(x, a, b, bias)
        # FP4 (no kernel reads it): the dequantised weight is not kept for backward, it is rebuilt from
        # the packed codes there.
        weight = _base.dequantized_weight(self.base_layer, dtype)

        def pack(t: torch.Tensor):
            return (lambda: _base.dequantized_weight(self.base_layer, dtype)) if t is weight else t

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            return self._forward(x, weight, a, b, bias)

    def _forward(self, x, weight, a, b, bias) -> torch.Tensor:
        if self.dropout is None or not self.training:
            return plora_linear(x, weight, a, b, self.active_index, self.scale, bias)
        # Dropout on the adapter input only: the base and the adapter see different inputs (unfused).
        index = self.active_index
        h = self.dropout(x) @ a.index_select(0, index).T
        return F.linear(x, weight, bias) + self.scale * (h @ b.index_select(1, index).T)

    def _forward_nf4(self, x, a, b, bias) -> torch.Tensor:
        param, index = self.base_layer.weight, self.active_index
        if self.dropout is None or not self.training:
            # ``_adapters`` puts the selected modules first: only those are trainable in the op.
            trainable = self.selected_index.numel() if "selected_index" in self._buffers else None
            return plora_linear_nf4(x, param, a, b, index, self.scale, bias, trainable=trainable)
        # Dropout on the adapter input only: the base term is the op with no module, the adapter unfused.
        y = plora_linear_nf4(x, param, a, b, index[:0], self.scale, bias)
        h = self.dropout(x) @ a.index_select(0, index).T
        return y + self.scale * (h @ b.index_select(1, index).T)

    def extra_repr(self) -> str:
        counts = {s: self._states.count(s) for s in (TRAINABLE, FROZEN, FOLDED)}
        return f"r={self.r}, scale={self.scale:g}, " + ", ".join(f"{k}={v}" for k, v in counts.items())


def _module_index(value) -> int:
    """One module index: a Python, NumPy or 0-d tensor integer; a bool or a float is a ``TypeError``."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"indices must hold integer module indices, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"indices must hold integer module indices, got {value!r} ({type(value).__name__})") from None


def _unpack(packed):
    return packed() if callable(packed) else packed
