"""The integer graph as TOSA: MLIR in the `tosa` dialect (TOSA 1.0 operators, generic op form), one function
from the int8 input to the integer logits, constants inline.

One walk over the graph records (refvit.graph): each record becomes the TOSA operator sequence written down
in docs/spec.md, Part 5, name for name with the emitters below (each registry row's `tosa`). Every
intermediate is a TOSA integer type (int8, int16, int32, bool): no 64-bit values, so only the records that
have a 32-bit realization are exported; `check_exportable` names the first one that has none, and why.
Tensors live in TOSA's channels-last layouts inside the function (tokens (B, 1, N, C), heads (B, N, Hh, D),
scores (B*Hh, N, N)); the results are transposed back to refvit's layouts, so `--outputs all` gives every
tensor exactly as refvit's trace (and the golden manifest) names and shapes it.

`export_tosa(qm, batch, outputs)` -> TosaProgram (the TOSA op list, `.to_mlir()` prints it). The static
preconditions of TOSA (RESCALE's value range, the shift and multiplier ranges of the exact realizations)
are checked here, on the model's constants, for every input: a model that would need them to hold only for
some inputs is refused (TosaExportError, one line naming the op).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

import refvit

from . import graph as G
from . import int_kernels as K
from . import int_kernels_authors as KA
from . import int_kernels_variants as KV
from . import registry as R
from .intmath import INT32_MAX, SINGLE_ROUND, apply_scale, int_range
from .qfile import QuantizedModel

OUTPUTS = ("logits", "all")
MLIR_TYPES = {"int8": "i8", "int16": "i16", "int32": "i32", "bool": "i1"}
DECIMAL_MAX = 1024                   # constants up to this many elements are written in decimal, larger in hex
SCORE_STEP_MAX = 128 * 128 + 128 * 127   # max - min of one attention_scores term: q.k in [-128*127, 128*128] per d
ADD_LOW_BITS = 16                    # add: multipliers split as m = m_hi * 2^16 + m_lo
ADD_SHIFTS = (ADD_LOW_BITS + 1, 62 - 30 + ADD_LOW_BITS)   # add's shift range for the exact realization: [17, 48]


class TosaExportError(G.GraphError):
    """A graph that TOSA's integer types cannot express (a 64-bit intermediate, an unprovable precondition)."""


# ---------------------------------------------------------------------------------------------
# the TOSA program: values and ops
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Value:
    """An SSA value: a tensor (dtype int8 | int16 | int32 | bool) or a shape (dtype 'shape', shape (rank,))."""
    name: str
    shape: tuple
    dtype: str

    def mlir_type(self) -> str:
        if self.dtype == "shape":
            return f"!tosa.shape<{self.shape[0]}>"
        return f"tensor<{'x'.join(map(str, self.shape))}{'x' if self.shape else ''}{MLIR_TYPES[self.dtype]}>"


@dataclass(frozen=True)
class TosaOp:
    """One TOSA operator: tosa.<opcode>(operands) {attrs} -> result, from refvit op `loc`."""
    opcode: str
    operands: tuple
    attrs: dict
    result: Value
    loc: str


@dataclass
class TosaProgram:
    input: Value
    ops: list
    results: list                    # [(refvit tensor name, Value)] in execution order
    header: list = field(default_factory=list)

    def to_mlir(self, function: str = "main") -> str:
        """The MLIR text: a header of comments, then one func.func @<function> in the generic op form."""
        res = ", ".join(f"{v.mlir_type()} {{refvit.name = \"{n}\"}}" for n, v in self.results)
        lines = [f"// {h}" for h in self.header]
        lines.append(f"func.func @{function}(%{self.input.name}: {self.input.mlir_type()}) -> ({res}) {{")
        lines += [f"  {_op_text(op)}" for op in self.ops]
        lines.append(f"  return {', '.join('%' + v.name for _, v in self.results)} : "
                     f"{', '.join(v.mlir_type() for _, v in self.results)}")
        lines.append("}")
        return "\n".join(lines) + "\n"


def _op_text(op: TosaOp) -> str:
    attrs = ", ".join(f"{k} = {_attr_text(k, v, op)}" for k, v in op.attrs.items())
    ins = ", ".join(v.mlir_type() for v in op.operands)
    return (f"%{op.result.name} = \"tosa.{op.opcode}\"({', '.join('%' + v.name for v in op.operands)})"
            f"{' <{' + attrs + '}>' if attrs else ''} : ({ins}) -> {op.result.mlir_type()} loc(\"{op.loc}\")")


def _attr_text(key: str, v, op: TosaOp) -> str:
    if key == "values":
        return _dense(v, op.result)
    if isinstance(v, bool):
        return "true" if v else "false"
    if key == "rounding_mode":
        return f"#tosa.rounding_mode<{v}>"
    if key == "axis":
        return f"{v} : i32"
    if key == "perms":
        return f"array<i32: {', '.join(map(str, v))}>"
    if key in ("pad", "stride", "dilation"):
        return f"array<i64: {', '.join(map(str, v))}>"
    if key == "acc_type":
        return v
    raise ValueError(f"no MLIR form for attribute {key!r}")


def _dense(a: np.ndarray, result: Value) -> str:
    """A dense elements attribute: splat, decimal (small) or little-endian hex (large)."""
    kind = "tensor<" + ("x".join(map(str, a.shape)) + "xindex>" if result.dtype == "shape"
                        else result.mlir_type()[7:])
    flat = a.reshape(-1)
    if flat.size and (flat == flat[0]).all():
        return f"dense<{int(flat[0])}> : {kind}"
    if a.size <= DECIMAL_MAX or result.dtype == "shape":
        return f"dense<{_nested(a)}> : {kind}"
    dt = {"int8": "<i1", "int16": "<i2", "int32": "<i4"}[result.dtype]
    return f"dense<\"0x{a.astype(dt).tobytes().hex().upper()}\"> : {kind}"


def _nested(a: np.ndarray) -> str:
    return "[" + ", ".join(_nested(s) for s in a) + "]" if a.ndim else str(int(a))


# ---------------------------------------------------------------------------------------------
# the emitter: appends TOSA ops, names values, shares small constants
# ---------------------------------------------------------------------------------------------

def _broadcast(*shapes) -> tuple:
    if len({len(s) for s in shapes}) != 1:
        raise ValueError(f"TOSA broadcasting needs equal ranks, got {shapes}")
    return tuple(np.broadcast_shapes(*shapes))


class _Emitter:
    def __init__(self):
        self.ops, self.loc, self._n, self._shared = [], "", 0, {}

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def emit(self, opcode: str, operands, shape, dtype, name: str | None = None, **attrs) -> Value:
        v = Value(name or self._name("v"), tuple(int(d) for d in shape), dtype)
        self.ops.append(TosaOp(opcode, tuple(operands), attrs, v, self.loc))
        return v

    # constants
    def const(self, a, dtype: str, name: str | None = None) -> Value:
        """A constant tensor (values must fit `dtype`). A named one (a model constant) is emitted once under
        its name; unnamed small ones are shared (one tosa.const per value, shape and dtype)."""
        a = np.asarray(a)
        lo, hi = int_range(dtype)
        if a.size and (int(a.min()) < lo or int(a.max()) > hi):
            raise ValueError(f"constant {name or ''} does not fit {dtype}")
        a = np.ascontiguousarray(a.astype(dtype))
        key = ("named", name) if name else (dtype, a.shape, a.tobytes()) if a.size <= 64 else None
        if key in self._shared:
            return self._shared[key]
        v = self.emit("const", (), a.shape, dtype, mlir_name(name) if name else self._name("k"), values=a)
        if key:
            self._shared[key] = v
        return v

    def scalar(self, value: int, rank: int, dtype: str = "int32") -> Value:
        """A one-element constant of rank `rank` (TOSA broadcasts only between equal ranks)."""
        return self.const(np.full((1,) * rank, int(value), np.int64), dtype)

    def shape(self, dims) -> Value:
        key = ("shape", tuple(dims))
        if key not in self._shared:
            self._shared[key] = self.emit("const_shape", (), (len(dims),), "shape", self._name("s"),
                                          values=np.array(dims, np.int64))
        return self._shared[key]

    # data movement
    def reshape(self, v: Value, shape) -> Value:
        if int(np.prod(shape)) != int(np.prod(v.shape)):
            raise ValueError(f"reshape {v.shape} -> {shape}")
        return v if tuple(shape) == v.shape else self.emit("reshape", (v, self.shape(shape)), shape, v.dtype)

    def transpose(self, v: Value, perm) -> Value:
        return self.emit("transpose", (v,), tuple(v.shape[p] for p in perm), v.dtype, perms=tuple(perm))

    def slice(self, v: Value, start, size) -> Value:
        return self.emit("slice", (v, self.shape(start), self.shape(size)), size, v.dtype)

    def cast(self, v: Value, dtype: str) -> Value:
        return v if v.dtype == dtype else self.emit("cast", (v,), v.shape, dtype)

    # arithmetic (int32 unless said)
    def binary(self, opcode: str, a: Value, b: Value) -> Value:
        out = "bool" if opcode in ("greater_equal", "greater", "equal") else a.dtype
        return self.emit(opcode, (a, b), _broadcast(a.shape, b.shape), out)

    def mul(self, a: Value, b: Value, shift: int = 0) -> Value:
        return self.emit("mul", (a, b, self.const(np.array([shift]), "int8")), _broadcast(a.shape, b.shape), "int32")

    def ars(self, a: Value, b: Value, round: bool) -> Value:
        return self.emit("arithmetic_right_shift", (a, b), _broadcast(a.shape, b.shape), a.dtype, round=round)

    def select(self, cond: Value, a: Value, b: Value) -> Value:
        return self.emit("select", (cond, a, b), _broadcast(cond.shape, a.shape, b.shape), a.dtype)

    def reduce(self, opcode: str, v: Value, axis: int) -> Value:
        shape = tuple(1 if i == axis else d for i, d in enumerate(v.shape))
        return self.emit(opcode, (v,), shape, v.dtype, axis=axis)

    def rescale(self, v: Value, multiplier, shift, dtype: str, rounding: str, names=(None, None)) -> Value:
        """RESCALE with scale32; per channel (the last axis) when the constants have more than one element."""
        m, s = np.atleast_1d(np.asarray(multiplier)), np.atleast_1d(np.asarray(shift))
        per_channel = m.size > 1
        return self.emit("rescale", (v, self.const(m, "int32", names[0]), self.const(s, "int8", names[1]),
                                     self.const(np.array([0]), v.dtype), self.const(np.array([0]), dtype)),
                         v.shape, dtype, scale32=True, rounding_mode=rounding, per_channel=per_channel,
                         input_unsigned=False, output_unsigned=False)


# ---------------------------------------------------------------------------------------------
# static preconditions
# ---------------------------------------------------------------------------------------------

def _require_rescale_domain(op: G.Op, bound, shift, what: str) -> None:
    """RESCALE's -2^(shift-1) <= value < 2^(shift-1) for every input: max |value| <= bound (per channel)
    must be below 2^(shift-1) wherever shift <= 31 (for shift >= 32 every int32 value satisfies it)."""
    b = np.broadcast_to(np.asarray(bound, object), np.shape(shift))
    for bi, si in zip(np.ravel(b), np.ravel(shift)):
        if int(si) <= 31 and int(bi) >= 1 << (int(si) - 1):
            raise TosaExportError(f"op {op.name!r}: TOSA RESCALE needs |{what}| < 2^(shift-1) for every input, "
                                  f"but |{what}| can reach {int(bi)} with shift {int(si)}")


def _require(op: G.Op, ok: bool, why: str) -> None:
    if not ok:
        raise TosaExportError(f"op {op.name!r} ({op.kernel}): {why}")


# ---------------------------------------------------------------------------------------------
# emitters: one per (op, variant); each gets the internal input values and the constants
# {argument: (constant name, array)}, returns (internal output value, its layout kind)
# ---------------------------------------------------------------------------------------------

def _conv_accumulate(em: _Emitter, x: Value, c: dict):
    """CONV2D (OHWI weights, stride = kernel, int32 accumulator + bias) as tokens -> (acc (B, 1, N, Cout), bound
    (Cout,)): |acc[..., o]| <= bound[o] = 128 sum |weight[o]| + |bias[o]| for every int8 input (<= 2^31 - 1 by
    part 2's bias headroom)."""
    (wn, w), (bn, bias) = c["weight"], c["bias"]                                   # (Cout, Cin, k, k), (Cout,)
    cout, k = w.shape[0], w.shape[2]
    B, H, W, _ = x.shape                                                            # NHWC
    zp = em.const(np.array([0]), "int8")
    acc = em.emit("conv2d", (x, em.const(w.transpose(0, 2, 3, 1), "int8", wn), em.const(bias, "int32", bn), zp, zp),
                  (B, H // k, W // k, cout), "int32", pad=(0, 0, 0, 0), stride=(k, k), dilation=(1, 1),
                  acc_type="i32")                                                   # (B, H/k, W/k, Cout)
    bound = 128 * np.abs(w.astype(np.int64)).sum(axis=(1, 2, 3)) + np.abs(bias.astype(np.int64))
    return em.reshape(acc, (B, 1, (H // k) * (W // k), cout)), bound                # (B, 1, N, Cout) tokens


def _conv2d(em: _Emitter, op: G.Op, ctx: dict, x: Value, c: dict):
    """CONV2D, then a per-channel RESCALE (multiplier, shift) in the record's rounding."""
    acc, bound = _conv_accumulate(em, x, c)
    _require_rescale_domain(op, bound, c["shift"][1], "acc")
    return em.rescale(acc, c["multiplier"][1], c["shift"][1], op.dtype, op.attrs["rounding"],
                      (c["multiplier"][0], c["shift"][0])), "nhwc"


def pot_rescale_shifts(shift, bits: int) -> tuple:
    """conv2d_pot's shift (Cout,) in [-31, 31] with a `bits`-bit output -> (RESCALE shift 30 + s', clamp H (Cout,)),
    s' = max(shift, -bits), H = min(2^max(bits - 1 + s', 0), 2^31 - 1) (docs/spec.md Part 5, conv2d_pot).

    With R(v, t) = apply_scale_32(v, 2^30, 30 + t) = floor((v 2^30 + 2^(29+t)) / 2^(30+t)) = floor(v / 2^t + 1/2)
    for t in [-28, 32] (TOSA's 2 <= 30 + t <= 62), R is pot_shift's SINGLE_ROUND (t >= 1) and the exact left
    shift (t <= 0: an integer plus 1/2, floored). R is nondecreasing in v and R(+-H, s') saturates at the output's
    max / min, so clamping v to [-H, H] changes no saturated result; s' = shift unless shift < -bits, where
    |v| <= 1 after the clamp and 2^bits saturates as 2^-shift does. RESCALE's value condition |v| < 2^(29+s') then
    holds for every v in [-H, H] (bits <= 16 < 30)."""
    s = np.maximum(np.asarray(shift, np.int64), -bits)                              # (Cout,) in [-bits, 31]
    clamp = np.minimum(np.left_shift(np.int64(1), np.maximum(bits - 1 + s, 0)), INT32_MAX)
    return 30 + s, clamp


def _conv2d_pot(em: _Emitter, op: G.Op, ctx: dict, x: Value, c: dict):
    """conv2d_pot: CONV2D, then pot_shift as RESCALE(acc, 2^30, 30 + s', SINGLE_ROUND) per channel (a MINIMUM /
    MAXIMUM clamp first where RESCALE's value condition is not proved). DOUBLE_ROUND's ties away from zero is
    the single rounding of acc - 1 for acc < 0: acc + (acc >> 31) on the channels with shift >= 1 (>= -2^31 by
    the headroom). TOSA's double_round RESCALE is not used: with multiplier 2^j (j <= 30) it adds 2^(30-j) >= 1
    to a non-negative acc, which rounds acc = 2^(s-1) - 1 (mod 2^s) up."""
    acc, bound = _conv_accumulate(em, x, c)
    shift = c["shift"][1].astype(np.int64)                                          # (Cout,)
    _require(op, (np.abs(shift) <= KV.POT_MAX_SHIFT).all(),
             f"shift must be in [-{KV.POT_MAX_SHIFT}, {KV.POT_MAX_SHIFT}], got [{shift.min()}, {shift.max()}]")
    rescale_shift, clamp = pot_rescale_shifts(shift, 8 * np.dtype(op.dtype).itemsize)
    channels = (1, 1, 1, len(shift))
    if op.attrs["rounding"] != SINGLE_ROUND:
        neg = em.ars(acc, em.scalar(31, 4), round=False)                            # -1 where acc < 0, else 0
        if (shift < 1).any():                                                       # exact channels keep acc
            neg = em.mul(neg, em.const((shift >= 1).astype(np.int64).reshape(channels), "int32"))
        acc, bound = em.binary("add", acc, neg), bound + 1                         # (B, 1, N, Cout)
    if (bound >= np.left_shift(np.int64(1), rescale_shift - 1)).any():             # value condition not proved
        acc = em.binary("maximum", em.binary("minimum", acc, em.const(clamp.reshape(channels), "int32")),
                        em.const(-clamp.reshape(channels), "int32"))                # [-H, H]
    return em.rescale(acc, np.full(len(shift), 1 << 30), rescale_shift, op.dtype, SINGLE_ROUND), "nhwc"


def _concat_tokens(em: _Emitter, op: G.Op, ctx: dict, patches: Value, c: dict):
    """TILE the (1, 1, P, C) prefix to the batch, CONCAT before the patches along tokens."""
    name, prefix = c["prefix"]                                                      # (1, C, 1, P)
    p = em.const(prefix.transpose(0, 2, 3, 1), "int8", name)                       # (1, 1, P, C)
    B = patches.shape[0]
    if B > 1:
        p = em.emit("tile", (p, em.shape((B, 1, 1, 1))), (B,) + p.shape[1:], "int8")   # (B, 1, P, C)
    shape = (B, 1, p.shape[2] + patches.shape[2], patches.shape[3])
    return em.emit("concat", (p, patches), shape, "int8", axis=2), "nhwc"          # (B, 1, N, C)


def _add_int8(em: _Emitter, op: G.Op, ctx: dict, a: Value, *rest):
    """Part 2 `add` exactly in 32 bits: acc = H * 2^16 + L with H, L from the multipliers' high and low
    halves; out = RESCALE(H + (L >> 16), 2^30, shift + 14) (spec Part 5, add). rest: (b, constants), or
    (constants,) when b is a constant (the position embedding)."""
    *b, c = rest
    if b:
        b = b[0]
    else:
        name, arr = c["b"]                                                          # (1, C, 1, N)
        b = em.const(arr.transpose(0, 2, 3, 1), "int8", name)                      # (1, 1, N, C)
    s = int(c["shift"][1])
    _require(op, ADD_SHIFTS[0] <= s <= ADD_SHIFTS[1],
             f"shift {s} is outside [{ADD_SHIFTS[0]}, {ADD_SHIFTS[1]}], the range of its exact 32-bit realization")
    rank = len(a.shape)
    hi, lo = [], []
    for x, m in ((a, int(c["multiplier_a"][1])), (b, int(c["multiplier_b"][1]))):
        x32 = em.cast(x, "int32")                                                   # |x| <= 128
        hi.append(em.mul(x32, em.scalar(m >> ADD_LOW_BITS, rank)))                  # |.| < 2^22
        lo.append(em.mul(x32, em.scalar(m & ((1 << ADD_LOW_BITS) - 1), rank)))     # |.| < 2^23
    h, low = em.binary("add", *hi), em.binary("add", *lo)                          # |H| < 2^23, |L| < 2^24
    t = em.binary("add", h, em.ars(low, em.scalar(ADD_LOW_BITS, rank), round=False))   # H + floor(L / 2^16)
    return em.rescale(t, 1 << 30, s + 30 - ADD_LOW_BITS, op.dtype, SINGLE_ROUND), "nhwc"


def _isqrt32(em: _Emitter, q: Value) -> Value:
    """isqrt32: the bit-by-bit square root, 16 steps of add, compare, select and shift (Part 4)."""
    rank = len(q.shape)
    rem, res = q, em.binary("sub", q, q)                                            # res = 0
    one = em.scalar(1, rank)
    for i in range(KV.ISQRT32_BITS):
        bit = em.scalar(1 << 2 * (KV.ISQRT32_BITS - 1 - i), rank)                  # 4^15 .. 1
        trial = em.binary("add", res, bit)                                          # < 2^31
        take = em.binary("greater_equal", rem, trial)
        rem = em.select(take, em.binary("sub", rem, trial), rem)
        half = em.ars(res, one, round=False)
        res = em.select(take, em.binary("add", half, bit), half)
    return res


def _preshift_thresholds(m_c: int) -> np.ndarray:
    """thr_j, the smallest dmax with rounding_shift_right(dmax, j) > M_C, for the j whose thr_j fits int32:
    k_d = #{j : dmax >= thr_j} (the larger j never count: dmax < 2^28)."""
    thr = [m_c + 1] + [((m_c + 1) << j) - (1 << (j - 1)) for j in range(1, 29)]
    return np.array([t for t in thr if t <= INT32_MAX], np.int64)


def _layernorm_int32(em: _Emitter, op: G.Op, ctx: dict, x: Value, c: dict):
    """layernorm_int32 (Part 4) over the last axis of (B, 1, N, C), then Part 2's gamma/beta tail."""
    B, _, N, C = x.shape
    eps_int, k0 = int(c["eps_int"][1]), int(c["eps_shift"][1])
    (gn, gamma), (bn, bias) = c["gamma"], c["bias"]
    x32 = em.cast(x, "int32")                                                       # (B, 1, N, C)
    total = em.reduce("reduce_sum", x32, 3)                                         # (B, 1, N, 1), |.| <= 2^27
    d = em.binary("sub", em.mul(x32, em.scalar(C, 4)), total)                      # (B, 1, N, C), |d| < 2^28
    dmax = em.reduce("reduce_max", em.emit("abs", (d,), d.shape, "int32"), 3)      # (B, 1, N, 1)
    thr = em.const(_preshift_thresholds(math.isqrt(KV.LN32_SUMSQ_MAX // C)).reshape(1, 1, 1, -1), "int32")
    over = em.cast(em.binary("greater_equal", dmax, thr), "int32")                  # (B, 1, N, J) 0/1
    k = em.binary("maximum", em.reduce("reduce_sum", over, 3), em.scalar(k0, 4))   # (B, 1, N, 1) in [0, 30]
    d_s = em.ars(d, k, round=True)                                                  # (B, 1, N, C), |.| <= M_C
    e2 = em.binary("minimum", em.mul(em.binary("sub", k, em.scalar(k0, 4)), em.scalar(2, 4)), em.scalar(31, 4))
    eps_s = em.ars(em.scalar(eps_int, 4), e2, round=True)                          # (B, 1, N, 1)
    q = em.binary("add", em.reduce("reduce_sum", em.mul(d_s, d_s), 3), eps_s)      # (B, 1, N, 1) in [1, 2^30)
    r = _isqrt32(em, q)                                                             # [1, 32767]
    inv = em.binary("intdiv", em.scalar(1 << KV.LN32_RECIP_BITS, 4), r)            # [2^15, 2^30]
    t = em.ars(em.mul(d_s, inv), em.scalar(KV.LN32_T_SHIFT, 4), round=True)        # (B, 1, N, C), |t| <= 2^16
    acc = em.binary("add", em.mul(t, em.const(gamma.reshape(1, 1, 1, C), "int32", gn)),
                    em.const(bias.reshape(1, 1, 1, C), "int32", bn))               # |acc| <= 2^31 - 1
    bound = (1 << K.LN_T_BITS) * np.abs(gamma.astype(np.int64)) + np.abs(bias.astype(np.int64))
    _require_rescale_domain(op, bound, c["shift"][1], "acc")
    return em.rescale(acc, c["multiplier"][1], c["shift"][1], "int8", op.attrs["rounding"],
                      (c["multiplier"][0], c["shift"][0])), "nhwc"


def _split_heads(em: _Emitter, op: G.Op, ctx: dict, qkv: Value, c: dict):
    """SLICE part p of the (B, 1, N, 3C) qkv output, RESHAPE to heads (B, N, Hh, D)."""
    B, _, N, C3 = qkv.shape
    C, part, Hh = C3 // 3, op.attrs["part"], op.attrs["num_heads"]
    v = em.slice(qkv, (0, 0, 0, part * C), (B, 1, N, C))                           # (B, 1, N, C)
    return em.reshape(v, (B, N, Hh, C // Hh)), "heads"                             # (B, N, Hh, D)


def _rows(em: _Emitter, v: Value, perm) -> Value:
    """heads (B, N, Hh, D) -> (B*Hh, ., .) MATMUL operand: transpose then merge batch and heads."""
    t = em.transpose(v, perm)                                                       # (B, Hh, ., .)
    return em.reshape(t, (t.shape[0] * t.shape[1],) + t.shape[2:])


def _attention_scores(em: _Emitter, op: G.Op, ctx: dict, q: Value, k: Value, c: dict):
    """MATMUL (B*Hh, N, D) x (B*Hh, D, N) -> int32 scores (B*Hh, N, N)."""
    a, b = _rows(em, q, (0, 2, 1, 3)), _rows(em, k, (0, 2, 3, 1))                  # (R, N, D), (R, D, N)
    zp = em.const(np.array([0]), "int8")
    return em.emit("matmul", (a, b, zp, zp), (a.shape[0], a.shape[1], b.shape[2]), "int32"), "flat"


def _score_bound(ctx: dict) -> int:
    """The largest score difference max - s of a row of attention_scores: D * (128*128 + 128*127) < 2^31."""
    return ctx["head_dim"] * SCORE_STEP_MAX


def _softmax_front(em: _Emitter, op: G.Op, ctx: dict, s: Value, c: dict, cap: int) -> Value:
    """Part 4 front end: d_w = min(apply_scale(min(max - s, d_cap)), cap), int32 (R, N, N)."""
    m, sh, rounding = int(c["multiplier"][1]), int(c["shift"][1]), op.attrs["rounding"]
    d_cap = min((1 << (sh - 1)) - 1, INT32_MAX)
    _require(op, int(apply_scale(np.int64(d_cap), m, sh, rounding)) >= cap or _score_bound(ctx) <= d_cap,
             f"score differences up to {_score_bound(ctx)} exceed d_cap {d_cap} and the rescale does not "
             f"saturate them at {cap} (refvit raises OverflowError there)")
    mx = em.reduce("reduce_max", s, 2)                                              # (R, N, 1)
    d = em.binary("minimum", em.binary("sub", mx, s), em.scalar(d_cap, 3))          # (R, N, N) in [0, d_cap]
    w = em.rescale(d, m, sh, "int32", rounding, (c["multiplier"][0], c["shift"][0]))
    return em.binary("minimum", w, em.scalar(cap, 3))                               # [0, cap]


def _recip_pow2(em: _Emitter, op: G.Op, sigma: Value, bits: int, lo: int, hi: int) -> Value:
    """floor(2^bits / sigma) for lo <= sigma <= hi by long division with 32-bit INTDIV: 2^30 first, then
    chunks of c bits with (hi - 1) * 2^c <= 2^31 - 1 (remainder < sigma)."""
    step = ((INT32_MAX // max(hi - 1, 1)).bit_length() - 1)
    _require(op, step >= 1 and (1 << bits) // lo <= INT32_MAX,
             f"the softmax sum reaches {hi}: its reciprocal 2^{bits} // sum needs a divisor below 2^30")
    rank = len(sigma.shape)
    num = em.scalar(1 << 30, rank)
    q = em.binary("intdiv", num, sigma)                                             # floor(2^30 / sigma)
    rem = em.binary("sub", num, em.mul(q, sigma))                                   # [0, sigma)
    left = bits - 30
    while left:
        cbits = min(step, left)
        num = em.mul(rem, em.scalar(1 << cbits, rank))                              # <= (hi - 1) * 2^c
        qc = em.binary("intdiv", num, sigma)
        q = em.binary("add", em.mul(q, em.scalar(1 << cbits, rank)), qc)            # floor(2^(bits done) / sigma)
        left -= cbits
        if left:
            rem = em.binary("sub", num, em.mul(qc, sigma))
    return q


def _softmax_tail(em: _Emitter, op: G.Op, e: Value, e_one: int) -> Value:
    """Part 2 output stage: p = rounding_shift_right(e * 127 * (2^40 // sum e), 40), as MUL with shift 40."""
    sigma = em.reduce("reduce_sum", e, 2)                                           # (R, N, 1) in [e_one, N e_one]
    recip = _recip_pow2(em, op, sigma, K.SOFTMAX_RECIP_BITS, e_one, e.shape[2] * e_one)
    e127 = em.mul(e, em.scalar(K.PROB_ONE, 3))                                      # < 2^22
    return em.cast(em.mul(e127, recip, K.SOFTMAX_RECIP_BITS), "int8"), "flat"       # [0, 127]


def _exp_poly(em: _Emitter, dw: Value) -> Value:
    """exp_poly(-d_w): z = d_w // 11357, r = z*11357 - d_w, e = ((r + 22167)^2 + 257578233) >> min(z + 15, 31)."""
    z = em.binary("intdiv", dw, em.scalar(KV.EXP_POLY_LN2, 3))                      # [0, 30]
    r = em.binary("sub", em.mul(z, em.scalar(KV.EXP_POLY_LN2, 3)), dw)              # (-11357, 0]
    p = em.binary("add", r, em.scalar(KV.EXP_POLY_QB, 3))
    poly = em.binary("add", em.mul(p, p), em.scalar(KV.EXP_POLY_QC, 3))             # < 2^30
    sh = em.binary("minimum", em.binary("add", z, em.scalar(KV.EXP_POLY_SHIFT, 3)), em.scalar(31, 3))
    return em.ars(poly, sh, round=False)                                            # [0, 22856]


def _exp_shift(em: _Emitter, dw: Value) -> Value:
    """exp_shift(-d_w) for 0 <= d_w <= 2^30: I-ViT's ShiftExp with arithmetic shifts (Part 4)."""
    rank = len(dw.shape)
    v = em.binary("sub", em.scalar(0, rank), dw)                                    # [-2^30, 0]
    u = em.binary("sub", em.binary("add", v, em.ars(v, em.scalar(1, rank), False)),
                  em.ars(v, em.scalar(4, rank), False))                             # > -2^31
    u = em.binary("maximum", u, em.scalar(-KV.EXP_SHIFT_MAX_Q << KV.EXP_FRAC_BITS, rank))
    q = em.ars(em.binary("sub", em.scalar(0, rank), u), em.scalar(KV.EXP_FRAC_BITS, rank), False)   # [0, 16]
    r = em.binary("add", u, em.mul(q, em.scalar(1 << KV.EXP_FRAC_BITS, rank)))     # (-2^14, 0]
    return em.ars(em.binary("add", r, em.scalar(KV.EXP_SHIFT_ONE, rank)), q, False)   # [0, 2^15]


def _softmax_poly(em, op, ctx, s, c):
    return _softmax_tail(em, op, _exp_poly(em, _softmax_front(em, op, ctx, s, c, KV.SOFTMAX_POLY_CAP)),
                         KV.EXP_POLY_ONE)


def _exp_poly_ibert_code(em: _Emitter, dw: Value) -> Value:
    """exp_poly_ibert_code(-d_w): q = d_w // 11356, r = q*11356 - d_w, e = ((r + 44356) r + 749502594) >> min(q + 15, 31)."""
    q = em.binary("intdiv", dw, em.scalar(KA.EXP_CODE_LN2, 3))                      # [0, 30]
    r = em.binary("sub", em.mul(q, em.scalar(KA.EXP_CODE_LN2, 3)), dw)              # (-11356, 0]
    z = em.binary("add", em.mul(em.binary("add", r, em.scalar(KA.EXP_CODE_QB, 3)), r),
                  em.scalar(KA.EXP_CODE_QC, 3))                                     # |(r + b) r| < 2^29, z < 2^30
    sh = em.binary("minimum", em.binary("add", q, em.scalar(KA.EXP_CODE_SHIFT, 3)), em.scalar(31, 3))
    return em.ars(z, sh, round=False)                                               # [0, 22873]


def _softmax_poly_ibert_code(em, op, ctx, s, c):
    return _softmax_tail(em, op, _exp_poly_ibert_code(em, _softmax_front(em, op, ctx, s, c, KA.SOFTMAX_CODE_CAP)),
                         KA.EXP_CODE_ONE)


def _softmax_shift(em, op, ctx, s, c):
    return _softmax_tail(em, op, _exp_shift(em, _softmax_front(em, op, ctx, s, c, KV.SOFTMAX_SHIFT_CAP)),
                         KV.EXP_SHIFT_ONE)


def _softmax_table(em: _Emitter, op: G.Op, ctx: dict, s: Value, c: dict, sizes=(K.EXP_TABLE_SIZE,)):
    """Part 2 softmax: idx = min(RESCALE(max - s), L - 1), e = GATHER(exp_table, idx), then the output stage (L =
    256; Part 6's softmax_table_n: L in `sizes`, where the kernel's cap of d at apply_scale's domain never acts,
    since RESCALE's domain is required of every difference)."""
    m, sh = int(c["multiplier"][1]), int(c["shift"][1])
    name, table = c["exp_table"]
    L = len(table)
    _require(op, L in sizes and int(table[0]) == K.EXP_ONE and 0 <= table.min() and table.max() <= K.EXP_ONE,
             f"exp_table must be {' | '.join(map(str, sizes))} Q0.15 entries in [0, 2^15] with exp_table[0] = 2^15")
    _require_rescale_domain(op, _score_bound(ctx), sh, "max - s")
    mx = em.reduce("reduce_max", s, 2)                                              # (R, N, 1)
    d = em.binary("sub", mx, s)                                                     # (R, N, N) >= 0
    idx = em.rescale(d, m, sh, "int32", op.attrs["rounding"], (c["multiplier"][0], c["shift"][0]))
    idx = em.binary("minimum", idx, em.scalar(L - 1, 3))                            # [0, L - 1]
    values = em.const(table.astype(np.int64).reshape(1, -1, 1), "int32", name)    # (1, L, 1)
    flat = em.reshape(idx, (1, int(np.prod(idx.shape))))                            # (1, R*N*N)
    e = em.emit("gather", (values, flat), (1, flat.shape[1], 1), "int32")          # (1, R*N*N, 1)
    return _softmax_tail(em, op, em.reshape(e, s.shape), K.EXP_ONE)


def _softmax_table_n(em: _Emitter, op: G.Op, ctx: dict, s: Value, c: dict):
    """Part 6's softmax_table_n: _softmax_table with an exp table of 64 ... 4096 entries (GATHER takes any length)."""
    return _softmax_table(em, op, ctx, s, c, KV.EXP_TABLE_SIZES)


def _attention_context(em: _Emitter, op: G.Op, ctx: dict, p: Value, v: Value, c: dict):
    """MATMUL p (B*Hh, N, N) x v (B*Hh, N, D), RESCALE (scalar), merge heads to (B, 1, N, C)."""
    B, N, Hh, D = v.shape
    zp = em.const(np.array([0]), "int8")
    acc = em.emit("matmul", (p, _rows(em, v, (0, 2, 1, 3)), zp, zp), (B * Hh, N, D), "int32")  # (R, N, D)
    _require_rescale_domain(op, N * K.PROB_ONE * 128, c["shift"][1], "acc")
    o = em.rescale(acc, c["multiplier"][1], c["shift"][1], "int8", op.attrs["rounding"],
                   (c["multiplier"][0], c["shift"][0]))
    o = em.transpose(em.reshape(o, (B, Hh, N, D)), (0, 2, 1, 3))                     # (B, N, Hh, D)
    return em.reshape(o, (B, 1, N, Hh * D)), "nhwc"                                 # c = h*D + d


def _gelu_table(em: _Emitter, op: G.Op, ctx: dict, x: Value, c: dict):
    """TABLE int8: out = table[x + 128], exactly Part 2's gelu."""
    name, table = c["table"]
    return em.emit("table", (x, em.const(table, "int8", name)), x.shape, "int8"), "nhwc"


def _gelu_table_n(em: _Emitter, op: G.Op, ctx: dict, x: Value, c: dict):
    """gelu_table_n (Part 6) as one TABLE int8 of 256 entries: T[i] = table[i >> log2(256 / G)], so T[x + 128] is
    table[(x + 128) >> log2(step)], the kernel's value for every int8 x."""
    name, table = c["table"]
    step = 256 // len(table)
    expanded = np.repeat(np.asarray(table), step)                                  # (256,): entry j repeated step times
    return em.emit("table", (x, em.const(expanded, "int8", f"{name}.expanded")), x.shape, "int8"), "nhwc"


def _gelu_poly(em: _Emitter, op: G.Op, ctx: dict, x: Value, c: dict):
    """gelu_poly (Part 4) elementwise: t = c_b - min(|x|, c_b), y = sign(x) (t^2 - c_c), h = (y >> k) - c_1,
    RESCALE(-x h)."""
    v = {k: int(c[k][1]) for k in ("c_b", "c_c", "c_1", "erf_shift", "multiplier", "shift")}
    rank = len(x.shape)
    x32 = em.cast(x, "int32")
    ax = em.emit("abs", (x32,), x.shape, "int32")
    t = em.binary("sub", em.scalar(v["c_b"], rank), em.binary("minimum", ax, em.scalar(v["c_b"], rank)))
    u = em.binary("sub", em.mul(t, t), em.scalar(v["c_c"], rank))                 # t^2 - c_c
    zero = em.scalar(0, rank)
    y = em.select(em.binary("greater_equal", x32, em.scalar(1, rank)), u,
                  em.select(em.binary("greater_equal", em.scalar(-1, rank), x32), em.binary("sub", zero, u),
                            em.binary("sub", u, u)))                               # sign(x) * u
    h = em.binary("sub", em.ars(y, em.scalar(v["erf_shift"], rank), False), em.scalar(v["c_1"], rank))
    acc = em.mul(em.binary("sub", zero, x32), h)                                  # -x h, |.| <= 2^31 - 1
    dom = np.arange(-128, 128)
    worst = int(np.abs(KV._gelu_poly_h(dom, v["c_b"], v["c_c"], v["c_1"], v["erf_shift"]) * dom).max())
    _require_rescale_domain(op, worst, v["shift"], "x * h")
    return em.rescale(acc, v["multiplier"], v["shift"], "int8", op.attrs["rounding"],
                      (c["multiplier"][0], c["shift"][0])), "nhwc"


def _gelu_shift(em: _Emitter, op: G.Op, ctx: dict, x: Value, c: dict):
    """gelu_shift (Part 4) elementwise: w = RESCALE(x), e1, e2 = exp_shift, sig = (e1 ((2^31 - 1) // (e1 + e2)))
    >> 16, RESCALE(x sig)."""
    rank, rounding = len(x.shape), op.attrs["rounding"]
    _require_rescale_domain(op, 127, c["shift_in"][1], "x")
    w = em.rescale(x, c["multiplier_in"][1], c["shift_in"][1], "int32", rounding,
                   (c["multiplier_in"][0], c["shift_in"][0]))                      # |w| <= 2^30
    zero = em.scalar(0, rank)
    e1 = _exp_shift(em, em.binary("maximum", em.binary("sub", zero, w), zero))     # exp_shift(min(w, 0))
    e2 = _exp_shift(em, em.binary("maximum", w, zero))                             # exp_shift(-max(w, 0))
    factor = em.binary("intdiv", em.scalar(INT32_MAX, rank), em.binary("add", e1, e2))   # [2^15 - 1, 2^16 - 1]
    sig = em.ars(em.mul(e1, factor), em.scalar(31 - KV.GELU_SHIFT_SIGMOID_BITS, rank), False)   # [0, 2^15 - 1]
    _require_rescale_domain(op, 128 * ((1 << KV.GELU_SHIFT_SIGMOID_BITS) - 1), c["shift"][1], "x * sig")
    return em.rescale(em.mul(em.cast(x, "int32"), sig), c["multiplier"][1], c["shift"][1], "int8", rounding,
                      (c["multiplier"][0], c["shift"][0])), "nhwc"


def _gather_prefix(em: _Emitter, op: G.Op, ctx: dict, x: Value, c: dict):
    """SLICE the first P tokens, RESHAPE (B, 1, P, C) -> (B, 1, 1, P*C): channel p*C + c."""
    B, _, _, C = x.shape
    P = op.attrs["num_prefix"]
    return em.reshape(em.slice(x, (0, 0, 0, 0), (B, 1, P, C)), (B, 1, 1, P * C)), "nhwc"


def emitter(op: str, variant: str):
    """The emitter of (op, variant): its registry row's `tosa` (a function of this module by name, or a
    function), or a TosaExportError with the row's `no_tosa` reason."""
    row = R.row(op, variant)
    if row.tosa is None:
        raise TosaExportError(row.no_tosa)
    return row.tosa if callable(row.tosa) else globals()[row.tosa]


def check_exportable(graph, scheme: str = "") -> None:
    """Raise TosaExportError naming the first record that TOSA cannot express, and why."""
    for op in graph:
        if R.row(op.op, op.variant).tosa is None:
            why = R.row(op.op, op.variant).no_tosa
            raise TosaExportError(f"{'scheme ' + scheme + ': ' if scheme else ''}op {op.name!r} ({op.op} variant "
                                  f"{op.variant!r}, kernel {op.kernel}) cannot be written in TOSA: {why}; "
                                  f"quantize with --scheme tosa-int32")


# ---------------------------------------------------------------------------------------------
# the walk
# ---------------------------------------------------------------------------------------------

def _to_refvit(em: _Emitter, v: Value, kind: str, shape: tuple) -> Value:
    """An internal value in refvit's layout: tokens (B, 1, N, C) -> (B, C, 1, N), heads (B, N, Hh, D) ->
    (B, Hh, D, N), flat rows -> reshape."""
    perm = {"nhwc": (0, 3, 1, 2), "heads": (0, 2, 3, 1)}.get(kind)
    return em.reshape(em.transpose(v, perm) if perm else v, shape)


def _header(qm: QuantizedModel, batch: int, outputs: str) -> list:
    sc = qm.scheme
    return [f"refvit {refvit.__version__}: the integer DeiT as TOSA 1.0 (MLIR tosa dialect, generic op form), "
            f"written by `refvit export-tosa`",
            f"scheme {sc.name} (conv {sc.conv}, layernorm {sc.layernorm}, softmax {sc.softmax}, gelu {sc.gelu}, "
            f"residual {sc.residual}), rounding {qm.rounding}, head {qm.head_mode}",
            "config " + ", ".join(f"{k} {v}" for k, v in qm.config.to_dict().items()),
            f"input: int8 ({batch}, {qm.config.in_chans}, {qm.config.img_size}, {qm.config.img_size}) NCHW, refvit's "
            f"int8 input (quantize_input at input.scale {float(qm.tensors['input.scale']):.9g})",
            ("results: every tensor of refvit's trace in execution order, in refvit's layouts (attribute "
             "refvit.name); the last is the logits" if outputs == "all" else "result: the logits"),
            f"logits: int16 ({batch}, {qm.config.num_classes}, 1, 1) at logits.scale "
            f"{float(qm.tensors['logits.scale']):.9g}",
            "each op carries loc(\"<refvit op name>\"); conv weights are OHWI; docs/spec.md Part 5 gives each "
            "refvit op's TOSA sequence", refvit.DOCS_NOTE]


def export_tosa(qm: QuantizedModel, batch: int = 1, outputs: str = "logits") -> TosaProgram:
    """The integer model `qm` as a TOSA program for a batch of `batch` images (static shapes)."""
    if outputs not in OUTPUTS:
        raise TosaExportError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
    if not (isinstance(batch, int) and batch >= 1):
        raise TosaExportError(f"batch must be a positive integer, got {batch!r}")
    check_exportable(qm.graph, qm.scheme.name)
    cfg = qm.config
    em = _Emitter()
    x = Value("input", (batch, cfg.in_chans, cfg.img_size, cfg.img_size), "int8")
    em.loc = "input"
    env = {"input": (em.transpose(x, (0, 2, 3, 1)), "nhwc")}                        # (B, H, W, C)
    ctx = {"head_dim": cfg.head_dim}
    results = []
    for op in qm.graph:
        em.loc = op.name
        c = {arg: (name, np.asarray(qm.tensors[name])) for arg, name in op.constants.items()}
        args = [env[t][0] for t in op.inputs.values()]
        v, kind = emitter(op.op, op.variant)(em, op, ctx, *args, c)
        if v.dtype != op.dtype:
            raise AssertionError(f"{op.name}: emitted {v.dtype}, the record says {op.dtype}")
        env[op.name] = (v, kind)
        if outputs == "all" or op is qm.graph[-1]:
            results.append((op.name, _to_refvit(em, v, kind, op.shape_for(batch))))
    return TosaProgram(x, em.ops, results, _header(qm, batch, outputs))


def mlir_name(name: str) -> str:
    """The SSA name a model constant gets in the MLIR (`%<name>`): refvit's constant names are valid as they are."""
    if not re.fullmatch(r"[A-Za-z_$.][A-Za-z0-9_$.\-]*", name):
        raise ValueError(f"{name!r} is not a valid MLIR value name")
    return name
