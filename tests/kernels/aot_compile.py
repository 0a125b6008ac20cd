"""Ahead-of-time compilation of Triton kernels for an H100 (sm_90) on a machine with no GPU.

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects
(non-constexpr globals, branch type mismatches, layouts). ``compile_in_subprocess`` runs a script
that calls ``build`` for each kernel variant, without ``TRITON_INTERPRET``, through ``ptxas``.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import triton

#: The ahead-of-time API these tests use appeared in Triton 3.9.
SUPPORTED = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9)


def build(kernel, types: dict, constants: dict, **options) -> None:
    """Compile ``kernel`` for sm_90: ``types`` of pointer/float args (others i32), ``constants`` the constexprs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if isinstance(kernel, triton.runtime.autotuner.Autotuner) else kernel
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    constexprs = {(names.index(n),): v for n, v in constants.items()}
    triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32), options=options
    )


def compile_in_subprocess(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` (which may ``from aot_compile import build`` or import ``bench``) with the interpreter off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=timeout
    )
