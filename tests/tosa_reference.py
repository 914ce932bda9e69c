"""A NumPy reading of the TOSA 1.0 pseudocode for the operators refvit's export uses, for the tests.

Written from the TOSA specification's operator pseudocode (apply_scale_32, RESCALE, MUL, ARITHMETIC_RIGHT_SHIFT,
INTDIV, TABLE, GATHER, CONV2D, MATMUL, REDUCE_*, ...), not from refvit's kernels: `run_program` executes a
refvit.export_tosa.TosaProgram and raises TosaRequireError where the specification says REQUIRE (a value
out of range, a shift out of range, a RESCALE value outside -2^(shift-1) <= value < 2^(shift-1), an int32
sum that overflows). Stricter than TOSA in one place, on purpose: a narrowing CAST and a shift-0 MUL must not
wrap (refvit's Part 5 proves they never do; TOSA would truncate).
"""
from __future__ import annotations

import numpy as np

RANGES = {"int8": (-128, 127), "int16": (-32768, 32767), "int32": (-(1 << 31), (1 << 31) - 1), "bool": (0, 1)}
NP = {"int8": np.int8, "int16": np.int16, "int32": np.int32, "bool": np.bool_}


class TosaRequireError(AssertionError):
    """A TOSA REQUIRE (a precondition of the specification) fails."""


def _require(ok, op, what: str) -> None:
    if not np.all(ok):
        raise TosaRequireError(f"{op.loc}: tosa.{op.opcode}: {what}")


def _fits(x: np.ndarray, dtype: str, op, what: str) -> np.ndarray:
    lo, hi = RANGES[dtype]
    _require((x >= lo) & (x <= hi), op, f"{what} leaves {dtype}")
    return x


def _apply_scale_32(value, multiplier, shift, double_round: bool, op):
    """TOSA apply_scale_32, elementwise on int64 arrays (multiplier and shift broadcast)."""
    _require(multiplier >= 0, op, "multiplier < 0")
    _require((shift >= 2) & (shift <= 62), op, "shift outside [2, 62]")
    half = np.left_shift(np.int64(1), shift - 1)
    _require((value >= -half) & (value < half), op, "value outside [-2^(shift-1), 2^(shift-1))")
    rnd = half.copy() if isinstance(half, np.ndarray) else half
    if double_round:
        rnd = rnd + np.where(shift > 31, np.where(value >= 0, 1 << 30, -(1 << 30)), 0)
    return (value * multiplier + rnd) >> shift        # |value * multiplier| < 2^62: exact in int64


def _rescale(op, x, m, s, izp, ozp):
    a = op.attrs
    _require(a["scale32"], op, "only scale32 is used")
    _require(not a["input_unsigned"] and not a["output_unsigned"], op, "unsigned rescale")
    _require((izp == 0).all() and (ozp == 0).all(), op, "zero points must be 0")
    if not a["per_channel"]:
        _require(m.size == 1 and s.size == 1, op, "per-tensor constants of length 1")
    y = _apply_scale_32(x, m, s, a["rounding_mode"] == "DOUBLE_ROUND", op)   # channel = last axis
    lo, hi = RANGES[op.result.dtype]
    return np.clip(y, lo, hi)


def _mul(op, a, b, shift):
    s = int(shift.reshape(-1)[0])
    _require(0 <= s <= 63, op, "shift outside [0, 63]")
    if s > 0:
        return _fits((a * b + (1 << (s - 1))) >> s, "int32", op, "product")
    return _fits(a * b, op.result.dtype, op, "product (no wrap)")


def _ars(op, a, b):
    bits = {"int8": 7, "int16": 15, "int32": 31}[op.result.dtype]
    _require((b >= 0) & (b <= bits), op, f"shift outside [0, {bits}]")
    out = a >> b
    if op.attrs["round"]:
        out = out + ((b > 0) & (((a >> np.maximum(b - 1, 0)) & 1) == 1))
    return out


def _intdiv(op, a, b):
    _require(b != 0, op, "division by zero")
    q = np.abs(a) // np.abs(b) * np.sign(a) * np.sign(b)                           # truncation toward zero
    return _fits(q, "int32", op, "quotient")


def _dot(a, b, op, what):
    """The product of integer matrices whose every partial sum fits int32, which the L1 bound |a| @ |b| <= 2^31 - 1
    guarantees. Both products run in float64: exact, every partial sum being an integer below 2^53."""
    af, bf = a.astype(np.float64), b.astype(np.float64)
    _fits(np.abs(af) @ np.abs(bf), "int32", op, f"{what} partial sums")
    return (af @ bf).astype(np.int64)


def _conv2d(op, x, w, bias, izp, wzp):
    _require((izp == 0).all() and (wzp == 0).all(), op, "zero points must be 0")
    _require(tuple(op.attrs["pad"]) == (0, 0, 0, 0) and tuple(op.attrs["dilation"]) == (1, 1), op, "pad/dilation")
    sy, sx = op.attrs["stride"]
    B, H, W, C = x.shape
    O, KH, KW, _ = w.shape
    _require(sy == KH and sx == KW and H % KH == 0 and W % KW == 0, op, "stride = kernel, no remainder")
    cols = x.reshape(B, H // KH, KH, W // KW, KW, C).transpose(0, 1, 3, 2, 4, 5).reshape(-1, KH * KW * C)
    acc = _dot(cols, w.reshape(O, -1).T, op, "accumulator")                        # (B*OH*OW, O)
    return _fits(acc + bias, "int32", op, "acc + bias").reshape(B, H // KH, W // KW, O)


def _matmul(op, a, b, azp, bzp):
    _require((azp == 0).all() and (bzp == 0).all(), op, "zero points must be 0")
    return _dot(a, b, op, "accumulator")


def _gather(op, values, idx):
    _require((idx >= 0) & (idx < values.shape[1]), op, "index out of range")
    return values[np.arange(values.shape[0])[:, None], idx]                       # (N, W, C)


def _reduce_sum(op, x):
    axis = op.attrs["axis"]
    _fits(np.abs(x).sum(axis=axis, keepdims=True), "int32", op, "partial sums")       # bounds every partial sum
    return x.sum(axis=axis, keepdims=True)


def _cast(op, x):
    if op.result.dtype == "bool":
        return (x != 0).astype(np.int64)
    return _fits(x, op.result.dtype, op, "narrowing cast (no truncation)")


def _table(op, x, table):
    _require(op.operands[0].dtype == "int8" and table.shape == (256,), op, "int8 TABLE of 256 entries")
    return table[x + 128]


def _arith(fn, checked=True):
    def run(op, a, b):
        out = fn(a, b)
        return _fits(out, op.result.dtype, op, "result") if checked else out
    return run


OPS = {
    "rescale": _rescale, "mul": _mul, "arithmetic_right_shift": _ars, "intdiv": _intdiv, "conv2d": _conv2d,
    "matmul": _matmul, "gather": _gather, "reduce_sum": _reduce_sum, "cast": _cast, "table": _table,
    "add": _arith(np.add), "sub": _arith(np.subtract), "maximum": _arith(np.maximum), "minimum": _arith(np.minimum),
    "greater_equal": _arith(lambda a, b: (a >= b).astype(np.int64), False),
    "abs": lambda op, x: _fits(np.abs(x), "int32", op, "abs"),
    "select": lambda op, c, a, b: np.where(c != 0, a, b),
    "reduce_max": lambda op, x: x.max(axis=op.attrs["axis"], keepdims=True),
    "reshape": lambda op, x, shape: x.reshape(tuple(shape)),
    "transpose": lambda op, x: x.transpose(op.attrs["perms"]),
    "slice": lambda op, x, start, size: x[tuple(slice(a, a + n) for a, n in zip(start, size))],
    "tile": lambda op, x, mult: np.tile(x, tuple(mult)),
    "concat": lambda op, *xs: np.concatenate(xs, axis=op.attrs["axis"]),
}


def run_program(program, x: np.ndarray, extra: dict | None = None) -> dict:
    """Execute a TosaProgram on int8 input x (and `extra` {value name: array}, further inputs of a hand-built
    program); {refvit tensor name: array in the result's dtype}."""
    env = {program.input.name: x.astype(np.int64)} | {k: np.asarray(v).astype(np.int64) for k, v in (extra or {}).items()}
    for op in program.ops:
        if op.opcode in ("const", "const_shape"):
            out = op.attrs["values"].astype(np.int64)
        else:
            out = OPS[op.opcode](op, *(env[v.name] for v in op.operands))
        if op.result.dtype != "shape":
            if out.shape != op.result.shape:
                raise AssertionError(f"{op.loc}: tosa.{op.opcode} gave shape {out.shape}, type says {op.result.shape}")
            _fits(out, op.result.dtype, op, "result")
        env[op.result.name] = out
    return {name: env[v.name].astype(NP[v.dtype]) for name, v in program.results}
