"""The NF4 GEMM's register lookup (``LOOKUP_ASM``: byte permutes in inline PTX, which the interpreter cannot run)
gives the levels of both nibbles of every byte, in every byte position of its input word, for both 16-bit dtypes.

The PTX is run here by a small evaluator of the four instructions it uses, written from the PTX ISA
(``prmt.b32`` default mode: result byte ``i`` is byte ``c[4i+2:4i]`` of ``{b, a}``, or that byte's sign bit
repeated when ``c[4i+3]`` is set); its operands are numbered as Triton's ``inline_asm_elementwise`` numbers them
with ``pack=4`` (outputs first, two registers each; every 32-bit argument four times)."""

import re

import pytest
import torch

from fed_plora.kernels.nf4.layout import NF4_LEVELS
from fed_plora.kernels.plora_linear_nf4._triton import LOOKUP_ASM, LOOKUP_CONSTRAINTS

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    pool = a | (b << 32)
    out = 0
    for i in range(4):
        selector = (c >> (4 * i)) & 0xF
        byte = (pool >> (8 * (selector & 7))) & 0xFF
        if selector & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


OPS = {
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "shr.b32": lambda a, b: a >> b,
    "prmt.b32": _prmt,
}


def run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Evaluate ``asm`` (declarations and the instructions of ``OPS``) on ``operands`` (``"$5": value``)."""
    regs = dict(operands)
    for line in asm.strip().strip("{}").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dest, *sources = [a.strip() for a in args.split(",")]
        values = [int(s, 16) if s.startswith("0x") else int(s) if s.isdigit() else regs[s] for s in sources]
        regs[dest] = OPS[op](*values) & MASK
    return regs


def _bits(dtype: torch.dtype) -> list[int]:
    return torch.tensor(NF4_LEVELS).to(dtype).view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist()


def _operands(word: int, bits: list[int]) -> dict[str, int]:
    """``$4``: the input word; ``$5 + 4t`` (``t`` = 0-7): levels 4(t % 4) to 4(t % 4) + 3, low bytes for t < 4."""
    operands = {"$4": word}
    for t in range(8):
        first, shift = 4 * (t % 4), 8 * (t // 4)
        table = sum(((bits[first + i] >> shift) & 0xFF) << (8 * i) for i in range(4))
        for copy in range(4):
            operands[f"${5 + 4 * t + copy}"] = table
    return operands


def test_constraints_match_the_operands():
    constraints = LOOKUP_CONSTRAINTS.value.split(",")
    assert constraints[:4] == ["=r"] * 4 and len(constraints) == 4 + 1 + 8 * 4
    used = {int(n) for n in re.findall(r"\$(\d+)", LOOKUP_ASM.value)}
    assert used == {0, 1, 2, 3, 4} | {5 + 4 * t for t in range(8)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_byte_in_every_position_gives_the_levels_of_its_nibbles(dtype):
    bits = _bits(dtype)
    g = torch.Generator().manual_seed(0)
    for position in range(4):
        others = torch.randint(0, 256, (256, 4), generator=g)
        for value in range(256):
            data = others[value].tolist()
            data[position] = value
            word = sum(b << (8 * i) for i, b in enumerate(data))
            regs = run_ptx(LOOKUP_ASM.value, _operands(word, bits))
            for i, byte in enumerate(data):  # output register i // 2, half i % 2, for both outputs
                hi = (regs[f"${i // 2}"] >> (16 * (i % 2))) & 0xFFFF
                lo = (regs[f"${2 + i // 2}"] >> (16 * (i % 2))) & 0xFFFF
                assert (hi, lo) == (bits[byte >> 4], bits[byte & 15]), (position, value, i)


def test_a_wrong_table_is_seen():
    bits = _bits(torch.bfloat16)
    operands = _operands(0x00000080, bits)  # high nibble 8, low nibble 0
    assert run_ptx(LOOKUP_ASM.value, operands)["$0"] & 0xFFFF == bits[8]
    operands.update({f"${29 + c}": 0 for c in range(4)})  # the high bytes of levels 8-11 lost
    assert run_ptx(LOOKUP_ASM.value, operands)["$0"] & 0xFFFF != bits[8]
