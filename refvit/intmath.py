"""Integer arithmetic primitives of the INT8 DeiT: rounding, scaling, saturation, isqrt, exact matmul.

Every runtime function computes in int64 at most and never wraps around silently: inputs outside a
function's domain raise ValueError, intermediates that would leave int64 raise OverflowError,
and each message names the function and the violated bound. Saturation happens only in
`saturate` (and the saturating stores of `requantize`, which are the same clamp). The offline helpers
(`quantize_multiplier`, `quantize_add_multipliers`, `round_half_away_from_zero`) take floats but round
exactly (rational arithmetic).

Speed without changing a bit: elementwise work runs over cache-sized blocks (`_blocks`) with in-place
int64 scratch, in the narrowest dtype a written bound allows; floats are used only where every value
is an integer the float type represents exactly (the proofs are in the spec, next to each function).

Spec: docs/spec.md, Part 1 (one section per function, same names as here).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from refvit import parallel

SINGLE_ROUND = "SINGLE_ROUND"   # TOSA apply_scale_32, double_round=false
DOUBLE_ROUND = "DOUBLE_ROUND"   # TFLite/gemmlowp MultiplyByQuantizedMultiplier
ROUNDING_MODES = (SINGLE_ROUND, DOUBLE_ROUND)

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16))


# ---------------------------------------------------------------------------------------------
# input checking helpers
# ---------------------------------------------------------------------------------------------

def _int64(x, fn: str, name: str) -> np.ndarray:
    """x (python int, numpy integer scalar or array) as an int64 ndarray; never wraps."""
    arr = np.asarray(x)
    if arr.dtype.kind == "O":  # python ints beyond 64 bits land here
        raise OverflowError(f"{fn}: {name} does not fit int64 [{INT64_MIN}, {INT64_MAX}]")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{fn}: {name} must be an integer array, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > INT64_MAX:
        raise OverflowError(f"{fn}: {name} does not fit int64 (max {int(arr.max())} > {INT64_MAX})")
    return arr.astype(np.int64, copy=False)


def _require_in(arr: np.ndarray, lo: int, hi: int, fn: str, what: str, exc=ValueError) -> None:
    """Raise exc unless lo <= arr <= hi everywhere (inclusive bounds)."""
    if arr.size == 0:
        return
    amin, amax = int(arr.min()), int(arr.max())
    if amin < lo or amax > hi:
        raise exc(f"{fn}: {what} must be in [{lo}, {hi}], got values in [{amin}, {amax}]")


def _check_rounding(rounding: str, fn: str) -> None:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"{fn}: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


# dtypes whose every value fits int32 (no range check needed for an int32 precondition)
_NARROW = tuple(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.uint8, np.uint16))

BLOCK = 1 << 17   # elements per block of the fused elementwise loops: 1 MiB of int64 scratch (L2-sized)


def _expand(a, ndim: int) -> np.ndarray:
    """a as an array of ndim dims (leading 1s added), for _sub."""
    a = np.asarray(a)
    return a.reshape((1,) * (ndim - a.ndim) + a.shape) if a.ndim < ndim else a


def _sub(a: np.ndarray, idx: tuple):
    """The part of `a` (broadcastable to the blocked shape, same ndim) that broadcasts against block `idx`:
    a size-1 axis is kept whole (a slice) or dropped (an integer index) like the block's axis."""
    if not idx:
        return a
    return a[tuple(i if n != 1 else (slice(None) if type(i) is slice else 0) for i, n in zip(idx, a.shape))]


def _blocks(shape: tuple, target: int = BLOCK) -> list:
    """Index tuples tiling an array of `shape` in C order into near-equal blocks of at most max(t, last dim)
    elements, t = parallel.block_target(size, target) (small enough to give every thread a block).

    Whole trailing axes are kept; one axis is cut into pieces. Pure slicing: the tiles cover every
    element exactly once, so an elementwise computation done tile by tile (in any order, on any thread)
    is the same computation.
    """
    target = parallel.block_target(math.prod(shape), target)
    inner, ax = 1, len(shape)
    while ax > 0 and inner * shape[ax - 1] <= target:
        ax -= 1
        inner *= shape[ax]
    if ax == 0:
        return [()]
    split = ax - 1
    pieces = math.ceil(shape[split] / max(1, target // inner))
    step = math.ceil(shape[split] / pieces)                          # near-equal pieces of the cut axis
    return [lead + (slice(i, i + step),) for lead in np.ndindex(*shape[:split]) for i in range(0, shape[split], step)]


def for_blocks(shape: tuple, body, target: int = BLOCK) -> None:
    """body(idx) for every block of _blocks(shape, target), on refvit.parallel's threads: body must write
    only its own block of the output (and take its scratch from parallel.scratch)."""
    parallel.run(body, _blocks(shape, target))


def copy_into(out: np.ndarray, src) -> None:
    """out[...] = src (broadcast, cast unsafely: callers copy exact integers), block by block on the threads."""
    srcb = _expand(src, out.ndim)
    if not out.ndim:
        np.copyto(out, src, casting="unsafe")
        return
    for_blocks(out.shape, lambda idx: np.copyto(out[idx], _sub(srcb, idx), casting="unsafe"))


# ---------------------------------------------------------------------------------------------
# ranges and saturation
# ---------------------------------------------------------------------------------------------

_RANGES = {dt: (int(np.iinfo(dt).min), int(np.iinfo(dt).max)) for dt in _INT_DTYPES}


def int_range(dtype) -> tuple[int, int]:
    """(lo, hi) inclusive range of an integer dtype among int8/16/32/64, uint8/16."""
    dt = np.dtype(dtype)
    if dt not in _INT_DTYPES:
        raise ValueError(f"int_range: dtype must be one of {[str(d) for d in _INT_DTYPES]}, got {dt}")
    return _RANGES[dt]


def saturate(x, dtype) -> np.ndarray:
    """Clip x to dtype's range, then cast: the only place where saturation happens.

    Arrays of a narrow integer dtype are clipped in their own dtype (to the intersection of the two
    ranges, the same clamp) instead of through an int64 copy; a dtype inside the target range needs
    no clip at all.
    """
    lo, hi = int_range(dtype)
    arr = np.asarray(x)
    if arr.ndim and arr.dtype in _NARROW:
        xlo, xhi = _RANGES[arr.dtype]
        if xlo >= lo and xhi <= hi:
            return arr.astype(dtype)
        return np.clip(arr, max(lo, xlo), min(hi, xhi)).astype(dtype)
    x = _int64(arr, "saturate", "x")
    return np.clip(x, lo, hi).astype(dtype)


# ---------------------------------------------------------------------------------------------
# rounding shifts
# ---------------------------------------------------------------------------------------------

def rounding_shift_right(x, shift) -> np.ndarray:
    """round(x / 2^shift), ties toward +infinity: (x + 2^(shift-1)) >> shift (floor shift); x if shift == 0.

    shift broadcasts against x and must lie in [0, 63]; x + 2^(shift-1) must fit int64.
    """
    fn = "rounding_shift_right"
    x, shift = _int64(x, fn, "x"), _int64(shift, fn, "shift")
    _require_in(shift, 0, 63, fn, "shift")
    half = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 0)  # 2^(shift-1) or 0
    if x.size and half.size and int(x.max()) > INT64_MAX - int(half.max()):   # cheap test; exact one if it fails
        if np.any(x > INT64_MAX - half):
            raise OverflowError(f"{fn}: x + 2^(shift-1) exceeds int64 max {INT64_MAX}")
    return np.asarray(np.right_shift(x + half, shift), dtype=np.int64)


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul: int32 high half of 2*a*b, rounded to nearest.

    a, b int32. ab = a*b (int64); nudge = 2^30 if ab >= 0 else 1 - 2^30; result = (ab + nudge) / 2^31
    with C truncating division. Net effect: floor((ab + 2^30) / 2^31), i.e. ties toward +infinity.
    The only overflow, a == b == INT32_MIN, saturates to INT32_MAX.
    """
    fn = "saturating_rounding_doubling_high_mul"
    a, b = _int64(a, fn, "a"), _int64(b, fn, "b")
    _require_in(a, INT32_MIN, INT32_MAX, fn, "a (int32)")
    _require_in(b, INT32_MIN, INT32_MAX, fn, "b (int32)")
    ab = a * b                                                      # |ab| <= 2^62
    nudged = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))         # |.| <= 2^62 + 2^30
    truncated = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))  # C division toward zero
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.asarray(np.where(overflow, INT32_MAX, truncated), dtype=np.int64)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: round(x / 2^exponent), ties away from zero; x int32, exponent in [0, 31].

    mask = 2^exponent - 1; remainder = x & mask; threshold = (mask >> 1) + (x < 0);
    result = (x >> exponent) + (remainder > threshold).
    """
    fn = "rounding_divide_by_pot"
    x, exponent = _int64(x, fn, "x"), _int64(exponent, fn, "exponent")
    _require_in(x, INT32_MIN, INT32_MAX, fn, "x (int32)")
    _require_in(exponent, 0, 31, fn, "exponent")
    mask = np.left_shift(np.int64(1), exponent) - 1
    remainder = x & mask                    # low bits of two's complement x: identical in int32 and int64
    threshold = (mask >> 1) + (x < 0)
    return np.asarray((x >> exponent) + (remainder > threshold), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# fixed-point rescaling
# ---------------------------------------------------------------------------------------------

def _check_scale_args(value, multiplier, shift, rounding, fn):
    """Validate the TOSA apply_scale_32 preconditions; return (value, int64 multiplier, int64 shift).

    value keeps a narrow integer dtype (int8/16/32, uint8/16: inside int32 by type, no copy); any other
    integer dtype becomes int64 and is range-checked. The per-element test -2^(shift-1) <= value <
    2^(shift-1) is needed only where shift <= 31: for shift >= 32 every int32 value satisfies it.
    """
    _check_rounding(rounding, fn)
    value = np.asarray(value)
    if value.dtype not in _NARROW:
        value = _int64(value, fn, "value")
    multiplier, shift = _int64(multiplier, fn, "multiplier"), _int64(shift, fn, "shift")
    _require_in(multiplier, 0, INT32_MAX, fn, "multiplier")
    _require_in(shift, 2, 62, fn, "shift")
    if value.dtype not in _NARROW:
        _require_in(value, INT32_MIN, INT32_MAX, fn, "value (int32)")
    if value.size and shift.size:
        smin = int(shift.min())
        if smin <= 31:
            vmin, vmax = int(value.min()), int(value.max())
            if vmin < -(1 << (smin - 1)) or vmax >= 1 << (smin - 1):  # cheap global test failed: check per element
                half = np.left_shift(np.int64(1), shift - 1)
                if np.any((value < -half) | (value >= half)):
                    raise ValueError(f"{fn}: value must satisfy -2^(shift-1) <= value < 2^(shift-1)")
    return value, multiplier, shift


def _rounding_terms(shift: np.ndarray, rounding: str):
    """(rnd, corr) with apply_scale(v, m, shift) == (v*m + rnd - corr*[v*m < 0]) >> shift; corr is None if unused.

    SINGLE_ROUND: rnd = 2^(shift-1). DOUBLE_ROUND: the same where shift <= 31; where shift > 31,
    rnd = 2^(shift-1) + 2^30 and corr = 2^31 (TOSA's double_round term, proved equal to TFLite's
    two roundings in the spec, apply_scale). Both are int64 arrays of shift's shape.
    """
    rnd = np.left_shift(np.int64(1), shift - 1)
    if rounding == DOUBLE_ROUND and shift.size and int(shift.max()) > 31:
        big = shift > 31
        return rnd + np.where(big, np.int64(1 << 30), np.int64(0)), np.where(big, np.int64(1 << 31), np.int64(0))
    return rnd, None


def _round_shift(t: np.ndarray, rnd, corr, shift, out=None, lo=None, hi=None) -> None:
    """In place on the int64 block t = v*m: t = (t + rnd - corr*[t < 0]) >> shift; then, if `out` is given,
    out = clip(t, lo, hi) (the saturation, stored in out's dtype: exact after the clamp).

    int64 is enough: |v*m| < 2^31 * 2^31 = 2^62 and 0 <= rnd <= 2^61 + 2^30, corr <= 2^31.
    """
    if corr is not None:
        neg = t < 0
        np.add(t, rnd, out=t)
        np.subtract(t, corr, out=t, where=neg)
    else:
        np.add(t, rnd, out=t)
    np.right_shift(t, shift, out=t)
    if out is not None:
        _clip_store(t, lo, hi, out)


def _clip_store(t: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
    """out = clip(t, lo, hi), stored in out's dtype (exact after the clamp)."""
    np.clip(t, lo, hi, out=out, casting="unsafe")


FLOAT_BLOCK = 1 << 16  # elements per block of the float64 requantization: 512 KiB of scratch (L2)


def float_scale_exact(shift: np.ndarray, rounding: str, lo: int | None, hi: int | None, out_dtype) -> bool:
    """Whether saturate(apply_scale(v, m, s), [lo, hi]) may be evaluated in float64 (spec, part 1,
    "requantize in float64"): SINGLE_ROUND, [lo, hi] the whole range of an 8- or 16-bit integer out
    dtype, and 32 <= s <= 53 - bits for every shift (then every value that decides the result is
    exactly representable; s >= 32 also makes apply_scale's value precondition hold for any int32)."""
    dt = np.dtype(out_dtype)
    if rounding != SINGLE_ROUND or dt.kind not in "iu" or dt.itemsize > 2 or lo is None or not shift.size:
        return False
    return (lo, hi) == int_range(dt) and 32 <= int(shift.min()) and int(shift.max()) <= 53 - 8 * dt.itemsize


def scale_factor(multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """M = multiplier * 2^-shift as float64, exactly (multiplier < 2^31, 2 <= shift <= 62: a normal double)."""
    return np.ldexp(multiplier.astype(np.float64), -shift.astype(np.int32))


_UNSIGNED = {1: np.uint8, 2: np.uint16}
_FLOAT_TOP = {1: np.nextafter(256.0, 0.0), 2: np.nextafter(65536.0, 0.0)}   # the largest double below 2^bits
_SIGN_BIT = {1: np.uint8(1 << 7), 2: np.uint16(1 << 15)}


def _scale_float_store(w: np.ndarray, factor, lo: int, hi: int, out: np.ndarray) -> None:
    """out = saturate(floor(v * M + 1/2), [lo, hi]) for the float64 block w = v (exact integers, |v| < 2^31),
    M = factor; w is overwritten. Exact under float_scale_exact (the proof is in the spec)."""
    np.multiply(w, factor, out=w)                                 # P = fl(v * M)
    np.add(w, 0.5 - lo, out=w)                                    # W = fl(P + 1/2 - lo)
    np.clip(w, 0.0, _FLOAT_TOP[out.itemsize], out=w)              # [0, 2^bits): the saturation
    u = out.view(_UNSIGNED[out.itemsize])
    np.copyto(u, w, casting="unsafe")                             # truncation = floor on W >= 0: u = result - lo
    if lo:
        np.bitwise_xor(u, _SIGN_BIT[out.itemsize], out=u)         # u - 2^(bits-1) as the signed pattern


def _scale_float_into(value, factor, lo: int, hi: int, out: np.ndarray, addend=None) -> None:
    """out = saturate(floor((value [+ addend]) * factor + 1/2), [lo, hi]) block by block in float64, where
    float_scale_exact holds and value [+ addend] are integers below 2^31 (exact as doubles); value, addend
    and factor broadcast to out's shape. requantize's float64 form; conv2d passes its bias as the addend."""
    nd = out.ndim
    vb, fb = _expand(value, nd), _expand(factor, nd)
    ab = None if addend is None else _expand(addend, nd)

    def block(idx):
        o = out[idx] if nd else out.reshape(1)
        w = parallel.scratch("scale_float", o.size, np.float64).reshape(o.shape)
        if ab is None:
            np.copyto(w, _sub(vb, idx), casting="unsafe")         # exact: integers, |.| < 2^31
        else:
            np.add(_sub(vb, idx), _sub(ab, idx), out=w)           # exact: the sum is an integer, |.| < 2^31
        _scale_float_store(w, _sub(fb, idx), lo, hi, o)
    for_blocks(out.shape, block, FLOAT_BLOCK)


def _scale_into(value, multiplier, shift, rounding, out, lo=None, hi=None) -> None:
    """out = [clip](apply_scale(value, multiplier, shift, rounding)) block by block, arguments already checked.

    value may also be a float array holding integers (an exact GEMM result): it is converted exactly.
    out is an int64 array (no clip; computed in place) or a narrower one (clip to [lo, hi]).
    """
    shape = out.shape
    if out.size == 0:
        return
    nd = len(shape)
    if float_scale_exact(shift, rounding, lo, hi, out.dtype):
        _scale_float_into(value, scale_factor(multiplier, shift), lo, hi, out)
        return
    rnd, corr = _rounding_terms(shift, rounding)
    vb, mb, sb, rb = (_expand(a, nd) for a in (value, multiplier, shift, rnd))
    cb = None if corr is None else _expand(corr, nd)
    direct = out.dtype == np.int64 and lo is None

    def block(idx):
        o = out[idx] if out.ndim else out                      # (a 0-d array indexed by () is a scalar)
        t = o if direct else parallel.scratch("scale_int", o.size, np.int64).reshape(o.shape)
        if vb.dtype.kind == "f":
            np.copyto(t, _sub(vb, idx), casting="unsafe")      # exact: an integer-valued float, |.| < 2^53
            np.multiply(t, _sub(mb, idx), out=t)
        else:
            np.multiply(_sub(vb, idx), _sub(mb, idx), out=t)   # int64 product, |.| < 2^62
        _round_shift(t, _sub(rb, idx), None if cb is None else _sub(cb, idx), _sub(sb, idx),
                     None if direct else o, lo, hi)
    for_blocks(shape, block)


def apply_scale(value, multiplier, shift, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """value * multiplier * 2^-shift rounded to an integer (NOT saturated; |result| <= 2^30 always).

    SINGLE_ROUND: (value*multiplier + 2^(shift-1)) >> shift  (TOSA apply_scale_32, double_round=false).
    DOUBLE_ROUND: TFLite MultiplyByQuantizedMultiplier(value, multiplier, 31 - shift), i.e.
      rounding_divide_by_pot(saturating_rounding_doubling_high_mul(value << max(31-shift, 0), multiplier),
                             max(shift-31, 0)),
      computed as TOSA apply_scale_32 with double_round=true, which the spec proves equal for every input.
    Preconditions: 0 <= multiplier < 2^31, 2 <= shift <= 62, value int32 with
    -2^(shift-1) <= value < 2^(shift-1). The latter makes TFLite's left shift safe:
    |value << (31-shift)| <= 2^30 for shift < 31.
    """
    value, multiplier, shift = _check_scale_args(value, multiplier, shift, rounding, "apply_scale")
    out = np.empty(np.broadcast_shapes(value.shape, multiplier.shape, shift.shape), np.int64)
    _scale_into(value, multiplier, shift, rounding, out)
    return out


def requantize(value, multiplier, shift, out_dtype=np.int8, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """saturate(apply_scale(value, multiplier, shift, rounding), out_dtype), fused block by block."""
    value, multiplier, shift = _check_scale_args(value, multiplier, shift, rounding, "apply_scale")
    lo, hi = int_range(out_dtype)
    out = np.empty(np.broadcast_shapes(value.shape, multiplier.shape, shift.shape), out_dtype)
    _scale_into(value, multiplier, shift, rounding, out, lo, hi)
    return out if out.ndim else out[()]


# ---------------------------------------------------------------------------------------------
# the 48-bit rescale of 16-bit activations (docs/spec.md, Part 7, apply_scale_16)
# ---------------------------------------------------------------------------------------------

ACC48_MAX = (1 << 47) - 1          # an int48 accumulator: |value| <= 2^47 - 1 (TOSA's int48_t)
MULT16_MAX = (1 << 15) - 1         # a 16-bit multiplier: [0, 2^15 - 1] (TOSA's int16_t multiplier, >= 0)


def apply_scale_16(value, multiplier, shift) -> np.ndarray:
    """value * multiplier * 2^-shift rounded half up (TOSA apply_scale_16): (value*multiplier + 2^(shift-1)) >> shift.

    Preconditions: |value| <= 2^47 - 1 (int48), 0 <= multiplier <= 2^15 - 1, 2 <= shift <= 62. Then
    |value*multiplier| < 2^62 and adding 2^(shift-1) <= 2^61 stays in int64. One rounding in both rounding
    modes (TOSA's apply_scale_16 and TFLite's int64 MultiplyByQuantizedMultiplier both round once).
    Returns int64 (not saturated; |result| <= 2^60)."""
    fn = "apply_scale_16"
    value, multiplier, shift = _int64(value, fn, "value"), _int64(multiplier, fn, "multiplier"), _int64(shift, fn, "shift")
    _require_in(value, -ACC48_MAX, ACC48_MAX, fn, "value (int48)")
    _require_in(multiplier, 0, MULT16_MAX, fn, "multiplier (16-bit)")
    _require_in(shift, 2, 62, fn, "shift")
    t = value * multiplier + np.left_shift(np.int64(1), shift - 1)   # |v m| < 2^62, + 2^(shift-1) <= 2^61: < 2^63
    return t >> shift


def requantize_16(value, multiplier, shift, out_dtype=np.int16) -> np.ndarray:
    """saturate(apply_scale_16(value, multiplier, shift), out_dtype)."""
    return saturate(apply_scale_16(value, multiplier, shift), out_dtype)


def requantize_16_into(g, bias_m, multiplier, shift, out: np.ndarray) -> None:
    """out = saturate(apply_scale_16(g + bias, multiplier, shift), out.dtype), fused and block by block on the
    threads, for callers that have proved |g + bias| <= 2^47 - 1 (the conv's headroom check, the context's N bound).

    g: the exact integer GEMM result (float64 or int64, |g| < 2^47); bias_m = bias * multiplier (int64, broadcasting
    like multiplier; 0 for no bias). Fused form of the spec's line: (acc*m + 2^(s-1)) >> s with acc = g + bias is
    (g*m + (bias*m + 2^(s-1))) >> s, the same integer: every partial sum is a partial sum of the spec's (|acc*m| <
    2^62, + 2^(s-1) <= 2^61) or |g*m| < 2^62, |bias*m + 2^(s-1)| < 2^63 - 2^62, so nothing leaves int64."""
    m, s = np.asarray(multiplier, np.int64), np.asarray(shift, np.int64)
    add = np.asarray(bias_m, np.int64) + np.left_shift(np.int64(1), s - 1)        # bias*m + 2^(s-1)
    mb, sb, ab = (_expand(a, out.ndim) for a in (m, s, add))
    lo, hi = int_range(out.dtype)

    def block(idx):
        o = out[idx]
        t = parallel.scratch("requantize_16", o.size, np.int64).reshape(o.shape)
        np.copyto(t, g[idx], casting="unsafe")                    # exact: integers, |g| < 2^47
        np.multiply(t, _sub(mb, idx), out=t)                      # g*m
        np.add(t, _sub(ab, idx), out=t)                           # + bias*m + 2^(s-1)
        np.right_shift(t, _sub(sb, idx), out=t)
        _clip_store(t, lo, hi, o)                                 # saturate
    if out.size:
        for_blocks(out.shape, block)

# ---------------------------------------------------------------------------------------------
# offline: float scales -> (multiplier, shift), exact rational rounding
# ---------------------------------------------------------------------------------------------

def _round_half_up(q: Fraction) -> int:
    return math.floor(q + Fraction(1, 2))


def _check_scale_float(scale, fn: str, name: str, allow_zero: bool = True) -> Fraction:
    s = float(scale)
    if not math.isfinite(s) or s < 0 or (s == 0 and not allow_zero):
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn}: {name} must be finite and {need}, got {scale!r}")
    return Fraction(s)  # exact value of the double


def _round_half_up_scaled(num: int, den: int, k: int) -> int:
    """floor(num/den * 2^k + 1/2) for integers num >= 0, den > 0, any k: exact (Python integers)."""
    n, d = (num << k, den) if k >= 0 else (num, den << -k)
    return (2 * n + d) // (2 * d)


def quantize_multiplier(scale: float) -> tuple[int, int]:
    """scale ~= multiplier * 2^-shift with multiplier in [2^30, 2^31), 2 <= shift <= 62 (TOSA/TFLite encoding).

    The mantissa is rounded half-up exactly (integer arithmetic on the double's exact ratio
    num / 2^j); a mantissa that rounds up to 2^31 becomes 2^30 with the shift reduced by one; powers of
    two are exact. Scales below 2^-32 would need shift > 62: they get shift = 62 and multiplier =
    round_half_up(scale * 2^62) (one rounding of the exact scale, so multiplier < 2^30 and possibly 0).
    scale == 0 -> (0, 62), the limit of tiny scales. scale >= 2^29 - 2^-3 (needs shift < 2), negative,
    NaN or inf -> ValueError.
    """
    fn = "quantize_multiplier"
    s = float(scale)
    if not (math.isfinite(s) and s >= 0):
        _check_scale_float(scale, fn, "scale")                # raises, naming the problem
    if s == 0:
        return 0, 62
    num, den = s.as_integer_ratio()                       # scale == num / den exactly
    _, e = math.frexp(s)                                  # scale = m * 2^e, m in [0.5, 1)
    multiplier = _round_half_up_scaled(num, den, 31 - e)
    shift = 31 - e
    if multiplier == 1 << 31:                             # mantissa rounded up to 1.0
        multiplier, shift = 1 << 30, shift - 1
    if shift > 62:                                        # tiny scale: clamp the shift, round once
        multiplier, shift = _round_half_up_scaled(num, den, 62), 62
    if shift < 2:
        raise ValueError(f"{fn}: scale {scale!r} too large: needs shift {shift} < 2 (scale must be < 2^29 - 2^-3)")
    return multiplier, shift


def quantize_multiplier16(scale: float) -> tuple[int, int]:
    """scale ~= multiplier * 2^-shift with a 16-bit multiplier in [2^14, 2^15), 2 <= shift <= 62 (apply_scale_16).

    quantize_multiplier's rule with a 15-bit mantissa: multiplier = round_half_up(scale * 2^(15 - e)) for scale =
    f 2^e, f in [1/2, 1) (exact rational rounding); a mantissa that rounds up to 2^15 becomes 2^14 with the shift
    one less; shift > 62 is clamped to 62 with one rounding of scale * 2^62 (multiplier < 2^14, possibly 0);
    scale 0 -> (0, 62); a scale that needs shift < 2 (scale >= 2^13 - 2^-3) is a ValueError."""
    fn = "quantize_multiplier16"
    s = float(scale)
    if not (math.isfinite(s) and s >= 0):
        _check_scale_float(scale, fn, "scale")
    if s == 0:
        return 0, 62
    num, den = s.as_integer_ratio()
    _, e = math.frexp(s)
    multiplier, shift = _round_half_up_scaled(num, den, 15 - e), 15 - e
    if multiplier == 1 << 15:
        multiplier, shift = 1 << 14, shift - 1
    if shift > 62:
        multiplier, shift = _round_half_up_scaled(num, den, 62), 62
    if shift < 2:
        raise ValueError(f"{fn}: scale {scale!r} too large: needs shift {shift} < 2 (scale must be < 2^13 - 2^-3)")
    return multiplier, shift


def quantize_multipliers(scales) -> tuple[np.ndarray, np.ndarray]:
    """quantize_multiplier of every element of a float array: (multiplier int64, shift int64), same shape.

    Element for element equal to the scalar function (and the same ValueError for the first bad scale),
    vectorized in float64 without rounding: with scale = f * 2^e, f in [0.5, 1) (frexp, exact),
    f * 2^31 is exact and below 2^31 with no bit below 2^-22, so floor(f * 2^31 + 1/2) is exact (53 bits).
    The tiny-scale branch (shift > 62) rounds scale * 2^62 (exact) half up as floor(y) + (y - floor(y) >= 1/2),
    all exact.
    """
    s = np.asarray(scales, dtype=np.float64)
    bad = ~(np.isfinite(s) & (s >= 0))
    if bad.any():
        quantize_multiplier(float(s[bad][0]))                     # raises, naming the problem
    f, e = np.frexp(s)
    mult = np.floor(f * 2.0 ** 31 + 0.5)                         # exact: round_half_up(scale * 2^(31 - e))
    shift = (31 - e).astype(np.int64)
    up = mult == 2.0 ** 31                                        # mantissa rounded up to 1.0
    mult = np.where(up, 2.0 ** 30, mult)
    shift = shift - up
    tiny = (shift > 62) | (s == 0)
    if tiny.any():
        y = s * 2.0 ** 62                                         # exact (power-of-two scaling of a double)
        w = np.floor(y)
        mult = np.where(tiny, w + (y - w >= 0.5), mult)
        shift = np.where(tiny, 62, shift)
    if (shift < 2).any():
        quantize_multiplier(float(s[shift < 2][0]))               # raises: too large
    return mult.astype(np.int64), shift.astype(np.int64)


def quantize_add_multipliers(scale_a: float, scale_b: float, scale_out: float) -> tuple[int, int, int]:
    """(mult_a, mult_b, shift) for out = rounding_shift_right(a*mult_a + b*mult_b, shift).

    shift is the largest value in [2, 62] for which both mult_x = round_half_up(scale_x/scale_out * 2^shift)
    are < 2^31 (exact rational rounding). scale_a, scale_b >= 0 and finite, scale_out > 0 and finite;
    ratios too large for shift 2 -> ValueError.
    """
    fn = "quantize_add_multipliers"
    ra = _check_scale_float(scale_a, fn, "scale_a") / _check_scale_float(scale_out, fn, "scale_out", allow_zero=False)
    rb = _check_scale_float(scale_b, fn, "scale_b") / Fraction(float(scale_out))
    for shift in range(62, 1, -1):  # offline, at most 61 tries
        mult_a, mult_b = _round_half_up(ra * 2 ** shift), _round_half_up(rb * 2 ** shift)
        if mult_a < 1 << 31 and mult_b < 1 << 31:
            return mult_a, mult_b, shift
    raise ValueError(f"{fn}: scale ratios {float(ra)!r}, {float(rb)!r} too large: "
                     f"multiplier >= 2^31 even at shift 2 (ratios must be < 2^29 - 2^-3)")


def round_half_away_from_zero(x) -> np.ndarray:
    """Round floats to the nearest integer, ties away from zero, as int64 (np.round is half-to-even).

    Exact: floor(|x|) and |x| - floor(|x|) are exact in floating point, so no 0.49999... -> 1 error.
    Computed in x's float dtype, block by block; the finiteness test (min and max are finite) and the
    overflow test (|x| rounds to >= 2^63, decided on max|x| since the rounding is monotone) come first.
    """
    fn = "round_half_away_from_zero"
    x = np.asarray(x)
    if x.dtype.kind in "iu":
        return _int64(x, fn, "x")
    if x.dtype.kind != "f":
        raise TypeError(f"{fn}: x must be a float array, got dtype {x.dtype}")
    out = np.empty(x.shape, np.int64)
    if x.size == 0:
        return out
    lo, hi = x.min(), x.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):             # NaN propagates through min/max
        raise ValueError(f"{fn}: x must be finite (no NaN/inf)")
    top = max(-lo, hi)                                        # max |x|, in x's dtype
    if float(np.floor(top) + (top - np.floor(top) >= 0.5)) >= 2.0 ** 63:
        raise OverflowError(f"{fn}: |x| rounds to >= 2^63, does not fit int64")
    shape = x.shape
    if x.ndim == 0:
        x, out = x.reshape(1), out.reshape(1)

    def block(idx):
        xb, o = x[idx], out[idx]
        m, w = (parallel.scratch(key, o.size, x.dtype).reshape(o.shape) for key in ("rhafz_mag", "rhafz_whole"))
        np.abs(xb, out=m)
        np.floor(m, out=w)
        np.subtract(m, w, out=m)                              # exact fractional part
        np.add(w, m >= 0.5, out=w)                            # exact: integers below 2^63 (checked)
        np.copysign(w, xb, out=w)
        np.copyto(o, w, casting="unsafe")                     # integer-valued, |.| < 2^63: exact
    for_blocks(x.shape, block)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# integer square root
# ---------------------------------------------------------------------------------------------

def isqrt(x) -> np.ndarray:
    """Exact floor(sqrt(x)) for 0 <= x < 2^62.

    The spec's method is the bit-by-bit one (31 steps of add/sub/shift, what hardware builds); the
    reference computes the same function as r = floor(sqrt(float64(x))), then one exact integer correction
    each way. |sqrt computed in float64 - sqrt(x)| < 2^31 * 2^-52 = 2^-21 (two correctly rounded
    operations, each relative 2^-53), so r is within 1 of floor(sqrt(x)); the corrections compare r^2 and
    (r+1)^2 with x in int64 (r <= 2^31: no overflow) and make it exact.
    """
    fn = "isqrt"
    x = _int64(x, fn, "x")
    _require_in(x, 0, (1 << 62) - 1, fn, "x")
    r = np.floor(np.sqrt(x.astype(np.float64))).astype(np.int64)   # 0 <= r <= 2^31, within 1 of the root
    r -= r * r > x                                                   # now r^2 <= x
    r += (r + 1) * (r + 1) <= x                                      # now r^2 <= x < (r+1)^2
    return np.asarray(r, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# exact integer matmul through floating-point BLAS
# ---------------------------------------------------------------------------------------------

F32_EXACT = 1 << 24   # every integer with |n| <= 2^24 is a float32
F64_EXACT = 1 << 53   # every integer with |n| <= 2^53 is a float64


def _max_abs(arr: np.ndarray) -> int:
    """max |arr| as a python int (np.abs(int8(-128)) would wrap)."""
    return max(int(arr.max()), -int(arr.min())) if arr.size else 0


def _abs_bound(arr: np.ndarray) -> int:
    """A bound of |arr| for the matmul plan: the dtype's for 8-bit arrays (128 or 255: no pass over the
    data, and at most 1% shorter chunks), else the actual max |arr|. Any valid bound gives an exact plan."""
    if arr.dtype.itemsize == 1 and arr.size:
        return 128 if arr.dtype.kind == "i" else 255
    return _max_abs(arr)


def _matmul_plan(amax: int, bmax: int, k: int):
    """(float dtype, or None for int64; k_chunk) giving an exact product when |a| <= amax, |b| <= bmax."""
    prod = amax * bmax
    if prod == 0 or k == 0:  # all-zero operand or empty sum: one exact pass
        return np.float32, max(k, 1)
    k32, k64 = F32_EXACT // prod, F64_EXACT // prod
    # float32 is ~2x faster per flop than float64, but chunks shorter than ~128 cost more than one float64 pass
    if k32 >= min(k, 128):
        return np.float32, k32
    if k64 >= 1:
        return np.float64, k64
    return None, max(k, 1)


def _matmul_args(a, b, fn: str = "int_matmul"):
    """Check int_matmul's operands; return (a, b, max|a|, max|b|, K) with a, b in their own dtypes."""
    a, b = np.asarray(a), np.asarray(b)   # keep the narrow dtype: no int64 copy on the fast path
    for name, arr in (("a", a), ("b", b)):
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{fn}: {name} must be an integer array, got dtype {arr.dtype}")
        if arr.ndim < 2:
            raise ValueError(f"{fn}: {name} must have >= 2 dims, (..., M, K) @ (..., K, N); got shape {arr.shape}")
    k = a.shape[-1]
    if b.shape[-2] != k:
        raise ValueError(f"{fn}: inner dimensions differ: a {a.shape} has K={k}, b {b.shape} has K={b.shape[-2]}")
    amax, bmax = _abs_bound(a), _abs_bound(b)
    if max(amax, bmax) > INT64_MAX or k * amax * bmax > INT64_MAX:
        raise OverflowError(f"{fn}: K*max|a|*max|b| = {k * amax * bmax} exceeds int64 max {INT64_MAX}")
    return a, b, amax, bmax, k


def _l1_bound(a: np.ndarray, b: np.ndarray, amax: int, bmax: int) -> int:
    """An upper bound of sum_k |a_ik| * |b_kj| over every output (i, j): max_i ||a_i||_1 * max|b| or
    max|a| * max_j ||b_j||_1, whichever operand is smaller (one pass over it). Every partial sum, in
    any order, of the terms of one output is bounded by it. Infinite (not computed) for operands wider
    than 16 bits, whose |x| could overflow the abs."""
    small, other_max, axis = (a, bmax, -1) if a.size <= b.size else (b, amax, -2)
    size = small.dtype.itemsize
    if size > 2:
        return F64_EXACT
    # |x| as the unsigned view of abs(x): exact also for the most negative value, whose abs wraps to
    # itself (-128 -> 0x80 = 128); the sums of at most K values < 2^(8*size) fit the accumulator
    mag = np.abs(small).view(np.uint8 if size == 1 else np.uint16)
    acc = np.uint32 if small.shape[axis] < 1 << (32 - 8 * size) else np.uint64
    norms = mag.sum(axis=axis, dtype=acc)
    return int(norms.max()) * other_max if norms.size else 0


def _matmul_exact(a: np.ndarray, b: np.ndarray, amax: int, bmax: int, k: int) -> np.ndarray:
    """The exact product a @ b of checked integer operands with |a| <= amax, |b| <= bmax, as an array whose
    values ARE the integers: float32 (every |value| <= 2^24), float64 (every |value| <= 2^53) or int64.

    One float pass when K fits one chunk, or when the operands' L1 norms bound every partial sum by 2^24
    (_l1_bound; the result is then the float GEMM output itself, no copy). Otherwise
    the exact chunk results are summed in float64 while K*max|a|*max|b| <= 2^53 (every partial sum of
    chunk results is then an integer below 2^53: exact), else in int64.
    """
    ftype, k_chunk = _matmul_plan(amax, bmax, k)
    if ftype is None:
        return np.matmul(a.astype(np.int64), b.astype(np.int64))
    if ftype is np.float32 and k_chunk < k and _l1_bound(a, b, amax, bmax) <= F32_EXACT:
        k_chunk = k                             # the operands' actual norms allow one pass (see _l1_bound)
    af, bf = a.astype(ftype), b.astype(ftype)   # exact: |values| <= 2^24 (float32) or 2^53 (float64)
    if k_chunk >= k:
        return np.matmul(af, bf)                # one pass, every partial sum an integer <= K*amax*bmax
    acc_type = np.float64 if k * amax * bmax <= F64_EXACT else np.int64
    out = None
    for k0 in range(0, k, k_chunk):  # loop over K-chunks only; M, N, batch stay inside BLAS
        part = np.matmul(af[..., k0:k0 + k_chunk], bf[..., k0:k0 + k_chunk, :])   # (..., M, N), exact
        if out is None:
            out = part.astype(acc_type)
        else:
            out += part if acc_type is np.float64 else part.astype(np.int64)
    return out


def int_matmul(a, b) -> np.ndarray:
    """Exact integer matmul a (..., M, K) @ b (..., K, N) -> int64 (..., M, N), numpy batch broadcasting.

    Equal to np.matmul(a.astype(int64), b.astype(int64)), computed through float32 BLAS:
    K is split into chunks of k_chunk = 2^24 // (max|a| * max|b|) terms. Proof of exactness: every
    term a_ik*b_kj is an integer with |a_ik*b_kj| <= max|a|*max|b|, so any partial sum of any subset
    of the terms of one chunk is an integer of magnitude <= k_chunk*max|a|*max|b| <= 2^24. Integers of
    magnitude <= 2^24 are exactly representable in float32 (24-bit significand), and IEEE-754 add,
    multiply and fused multiply-add return the exact result whenever it is representable. Hence every
    operation BLAS performs (whatever its order, blocking, vectorization or FMA use) is exact, and
    each chunk result is exactly the integer dot product; the chunks are summed in float64 (exact while
    K*max|a|*max|b| <= 2^53) or int64.
    If max|a|*max|b| > 2^24 (or float32 chunks would be tiny) the same argument is used with float64
    and 2^53; if even one product exceeds 2^53 the product is done in int64 (after checking
    K*max|a|*max|b| <= 2^63 - 1).
    """
    return int_matmul_exact(a, b).astype(np.int64, copy=False)


def int_matmul_exact(a, b) -> np.ndarray:
    """int_matmul's exact product (same checks, same errors) without the final int64 conversion: an array
    whose values ARE the integers a @ b, float32 (all |values| <= 2^24), float64 (<= 2^53) or int64.

    The integer kernels use it to consume the GEMM output where BLAS wrote it (one conversion fewer).
    """
    a, b, amax, bmax, k = _matmul_args(a, b)
    return _matmul_exact(a, b, amax, bmax, k)
