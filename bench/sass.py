"""What a compiled Triton kernel costs a streaming multiprocessor, read from its PTX and cubin without a GPU.

* ``ptxas_report``: registers per thread and spill bytes, from ``ptxas -v`` run on the kernel's PTX with the
  ptxas and options Triton itself uses (the compile cache may skip ptxas, so it is run again here);
* ``tensor_loops``: the SASS instruction mix of every innermost loop that issues tensor-core instructions
  (the K loop of a GEMM): one trip of it is one K-step, since Triton does not unroll it;
* ``occupancy``: resident blocks and warps per SM from registers, shared memory and warps.

The tools are the ones Triton bundles (``ptxas``, ``nvdisasm``); no driver is needed.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass

import triton
from triton.backends.nvidia.compiler import get_ptxas

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass(frozen=True)
class SM:
    """Per-SM limits of a GPU generation (CUDA occupancy calculator values) and its roofline peaks."""

    name: str
    registers: int
    shared_bytes: int  # per SM, usable by blocks
    shared_per_block: int  # opt-in maximum for one block
    max_warps: int
    max_blocks: int
    sms: int
    dense_bf16_flops: float
    hbm_bytes_per_s: float


#: H100 SXM (sm_90) and A100 SXM 80 GB (sm_80).
HOPPER = SM("H100 SXM", 65536, 228 * 1024, 227 * 1024, 64, 32, 132, 989e12, 3.35e12)
AMPERE = SM("A100 SXM", 65536, 164 * 1024, 163 * 1024, 64, 32, 108, 312e12, 2.04e12)

_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_report(ptx: str, capability: int, fp_fusion: bool = True) -> dict:
    """``{"registers", "spill_stores", "spill_loads", "stack_frame"}`` of the (single) kernel in ``ptx``."""
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        command = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path]
        command += [] if fp_fusion else ["--fmad=false"]
        log = subprocess.run([*command, "-o", path + ".o"], capture_output=True, text=True, check=True).stderr
    stores, loads = (int(v) for v in _SPILLS.search(log).groups())
    return {
        "registers": int(_REGS.search(log).group(1)),
        "spill_stores": stores,
        "spill_loads": loads,
        "stack_frame": int(_STACK.search(log).group(1)),
    }


#: SASS opcodes reported in a loop's mix, by what they do.
_CLASSES = {
    "wgmma": ("HGMMA",),
    "mma_sync": ("HMMA",),
    "tma_load": ("UTMALDG",),
    "cp_async": ("LDGSTS",),
    "global_load": ("LDG",),
    "global_store": ("STG",),
    "shared_load": ("LDS", "LDSM"),
    "shared_store": ("STS",),
    "local_spill": ("LDL", "STL"),
    "barrier": ("BAR", "SYNCS", "WARPSYNC"),
}
_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):", re.MULTILINE)
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def _instructions(cubin: bytes) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """``(opcode, operands)`` of every instruction, and the index each label points at."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(_BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    code, labels = [], {}
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(code)
            continue
        found = _LINE.search(line)
        if found:
            code.append(found.groups())
    return code, labels


def tensor_loops(cubin: bytes) -> list[dict]:
    """Mix of every innermost backward-branch loop that issues tensor-core instructions, in code order (a GEMM's
    K loop; a kernel with several loop bodies, e.g. one that also accumulates a low-rank input, has several).

    ``instructions`` counts every SASS instruction of one trip (``NOP`` excluded), per warp: one trip is one
    K-step, as Triton does not unroll these loops. The classes count opcodes by their stem (``LDG`` includes
    ``LDG.E.128``); ``vector_bits`` is the widest global load of the trip."""
    code, labels = _instructions(cubin)
    loops = []
    for i, (op, rest) in enumerate(code):
        target = _TARGET.search(rest)
        if op.startswith("BRA") and target and labels.get(target.group(1), i + 1) <= i:
            loops.append((labels[target.group(1)], i))
    mixes = []
    for start, end in sorted(loops):
        body = [op for op, _ in code[start : end + 1] if op != "NOP"]
        inner = not any(start < s and e < end for s, e in loops)
        if inner and any(op.startswith(("HGMMA", "HMMA")) for op in body):
            mix = Counter()
            for op in body:
                for name, stems in _CLASSES.items():
                    if op.split(".")[0] in stems:
                        mix[name] += 1
            widths = [int(w) for op in body if op.startswith("LDG") for w in re.findall(r"\.(\d+)", op)]
            mixes.append({"instructions": len(body), **{n: mix[n] for n in _CLASSES}, "vector_bits": max(widths, default=0)})
    return mixes


def occupancy(registers: int, shared: int, warps: int, sm: SM) -> dict:
    """Resident blocks and warps per SM; ``fits`` is False when one block needs more shared memory than the SM allows."""
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp in units of 256
    limits = {
        "registers": sm.registers // (per_warp * warps),
        "shared": sm.shared_bytes // (shared + 1024) if shared else sm.max_blocks,  # 1 KiB reserved per block
        "warps": sm.max_warps // warps,
        "blocks": sm.max_blocks,
    }
    blocks = min(limits.values())
    return {
        "fits": shared <= sm.shared_per_block,
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "limited_by": min(limits, key=limits.get),
    }
