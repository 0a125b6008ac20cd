"""Triton launches on a machine with no GPU, as a GPU would see them: specialisation, tuning keys, binaries.

``OfflineGPU`` replaces ``JITFunction.run`` (the last step of every launch) and makes its target Triton's current
one (so code that asks Triton which GPU it runs on sees it) for as long as it is entered:
each launch is bound and specialised by Triton's own binder for a CUDA target (``sm_90`` by default), its
compile key computed as the runtime computes it, and nothing runs. Every ``@triton.autotune`` kernel keeps
its real ``Autotuner.run`` (keys from the real arguments, one benchmark per config of a new key), with a
benchmark stand-in that records each config it is asked to time and picks the first. So running the
library's launchers on ``meta`` tensors (no memory) shows exactly which binaries a GPU would compile, under
which tuning keys, and with which grids; ``compile`` then builds any recorded variant through ptxas.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)
AMPERE = GPUTarget("cuda", 80, 32)


@dataclasses.dataclass
class Launch:
    """One launch of a JIT kernel: what Triton specialises it on, its arguments and grid."""

    kernel: str
    key: str  # Triton's compile-cache key: one binary per distinct key
    args: dict[str, Any]  # bound arguments (tensors as given, constexprs included)
    grid: tuple[int, ...]
    tuning_key: tuple | None  # the key a watched autotuner filed it under (None: not autotuned)
    jit: JITFunction = dataclasses.field(repr=False)
    packed: tuple = dataclasses.field(repr=False)  # (options, signature, constexprs, attrs) for ``compile``


class OfflineGPU(contextlib.AbstractContextManager):
    """Records every Triton launch made inside the ``with`` block instead of running it (see module docstring).

    ``launches`` lists them in order; ``tuning_keys(tuner)`` (inside the block) the keys a watched autotuner met.
    """

    def __init__(self, target: GPUTarget = HOPPER):
        self.target = target
        self.backend = make_backend(target)
        self.launches: list[Launch] = []
        self._binders: dict[int, Any] = {}
        self._saved: list = []
        self._tuners: list[Autotuner] = []

    # -------------------------------------------------------------------------------- recording

    def _run(self, jit: JITFunction, *args, grid, warmup, **kwargs):
        kwargs.setdefault("debug", jit.debug)
        binder = self._binders.get(id(jit))
        if binder is None:
            binder = self._binders[id(jit)] = create_function_from_signature(jit.signature, jit.params, self.backend)
        bound, specialization, _ = binder(*args, **kwargs)
        options_obj = self.backend.parse_options(kwargs)
        key = compute_cache_key({}, specialization, options_obj)
        packed = jit._pack_args(self.backend, kwargs, bound, specialization, options_obj)
        grid = grid(bound) if callable(grid) else grid
        tuner = next((t for t in self._tuners if t.fn is jit), None)
        tuning_key = None if tuner is None else _tuning_key(tuner, bound)
        self.launches.append(Launch(jit.fn.__name__, key, dict(bound), tuple(grid), tuning_key, jit, packed))

    def _do_bench(self, kernel_call, quantiles=None):
        kernel_call()
        order = self._bench_calls = self._bench_calls + 1
        return [float(order)] * (len(quantiles) if quantiles else 1)  # the first config of a tuning run wins

    def watch(self, *tuners: Autotuner) -> OfflineGPU:
        """Autotuners whose benchmark is replaced by the stand-in and whose caches are cleared (restored on exit)."""
        self._tuners.extend(tuners)
        return self

    def __enter__(self):
        offline = self
        self._bench_calls = 0
        self._saved.append((driver, "_active", driver._active))
        driver._active = _TargetOnly(self.target)  # what Triton's current target is while the block runs
        original_run = JITFunction.run

        def run(jit, *args, grid, warmup, **kwargs):
            return offline._run(jit, *args, grid=grid, warmup=warmup, **kwargs)

        JITFunction.run = run
        self._saved.append((JITFunction, "run", original_run))
        for tuner in self._tuners:
            self._saved.append((tuner, "cache", tuner.cache))
            self._saved.append((tuner, "do_bench", tuner.__dict__.get("do_bench")))
            tuner.cache = {}
            tuner.do_bench = self._do_bench
        return self

    def __exit__(self, *exc):
        for owner, name, value in reversed(self._saved):
            if value is None and name == "do_bench":
                owner.__dict__.pop("do_bench", None)
            else:
                setattr(owner, name, value)
        self._saved.clear()
        return False

    # ----------------------------------------------------------------------------------- queries

    def tuning_keys(self, tuner: Autotuner) -> list[tuple]:
        """The keys ``tuner`` tuned inside the block (its cache while the block ran)."""
        return list(tuner.cache)

    def binaries_per_tuning_key(self, tuner: Autotuner) -> dict[tuple, set[str]]:
        """For each key ``tuner`` met, the distinct binaries launched under it (one per config if the key is complete)."""
        found: dict[tuple, set[str]] = {}
        for launch in self.launches:
            if launch.jit is tuner.fn:
                found.setdefault(launch.tuning_key, set()).add(launch.key)
        return found

    def variants(self) -> dict[str, Launch]:
        """One launch per distinct binary (compile key), first occurrence."""
        seen: dict[str, Launch] = {}
        for launch in self.launches:
            seen.setdefault(launch.kernel + launch.key, launch)
        return seen


class _TargetOnly:
    """A Triton driver that knows its target and nothing else: nothing can run through it."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target


def _tuning_key(tuner: Autotuner, bound: dict) -> tuple:
    """The key ``Autotuner.run`` computes: the values of its key arguments, then every tensor argument's dtype."""
    return (*(bound[name] for name in tuner.keys), *(str(v.dtype) for v in bound.values() if hasattr(v, "dtype")))


def compile_launch(launch: Launch, target: GPUTarget):
    """Build ``launch``'s binary for ``target`` exactly as the runtime would (Triton's compile pipeline, ptxas)."""
    options, signature, constexprs, attrs = launch.packed
    backend = make_backend(target)
    options = backend.parse_options({k: v for k, v in options.__dict__.items() if k in _OPTION_NAMES})
    return triton.compile(ASTSource(launch.jit, signature, constexprs, attrs), target=target, options=options.__dict__)


_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg", "debug")
