"""Plain integer arithmetic of docs/spec.md, Part 1, written as its pseudocode (the readable reference form).

Every function computes in plain int64 NumPy, elementwise and broadcasting, one spec line per code line
where the spec has pseudocode. Inputs outside a function's domain raise ValueError (OverflowError where the
spec says an intermediate would leave int64), so no value ever wraps around. No float arithmetic, no
tables, no caching: `refvit.intmath` holds the fast forms, tested equal to these.
"""
from __future__ import annotations

import math

import numpy as np

from refvit.intmath import DOUBLE_ROUND, ROUNDING_MODES, SINGLE_ROUND, int_range

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

__all__ = ["SINGLE_ROUND", "DOUBLE_ROUND", "INT32_MIN", "INT32_MAX", "INT64_MIN", "INT64_MAX", "require", "int64", "saturate",
           "rounding_shift_right", "saturating_rounding_doubling_high_mul", "rounding_divide_by_pot",
           "apply_scale", "requantize", "apply_scale_16", "requantize_16", "isqrt", "digit_by_digit_sqrt", "round_half_away"]


# ---------------------------------------------------------------------------------------------
# checking (the spec's domains; never part of the arithmetic)
# ---------------------------------------------------------------------------------------------

def require(ok, fn: str, what: str, exc=ValueError) -> None:
    """Raise exc("fn: what") unless ok (a bool or a boolean array that must hold everywhere)."""
    if not np.all(ok):
        raise exc(f"{fn}: {what}")


def int64(x, fn: str, name: str) -> np.ndarray:
    """x (an integer array or a Python / NumPy integer) as an int64 array; anything else is a ValueError."""
    arr = np.asarray(x)
    require(arr.dtype.kind in "iu" and arr.dtype != np.uint64, fn, f"{name} must be an integer array of at most "
            f"int64, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_rounding(rounding: str, fn: str) -> None:
    require(rounding in ROUNDING_MODES, fn, f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


# ---------------------------------------------------------------------------------------------
# saturate, rounding_shift_right
# ---------------------------------------------------------------------------------------------

def saturate(x, dtype) -> np.ndarray:
    """docs/spec.md, Part 1, saturate: y = min(max(x, lo), hi) in dtype, (lo, hi) = int_range(dtype)."""
    lo, hi = int_range(dtype)
    x = int64(x, "saturate", "x")
    y = np.minimum(np.maximum(x, lo), hi)          # clamp
    return y.astype(dtype)                         # lossless after the clamp


def rounding_shift_right(x, shift) -> np.ndarray:
    """docs/spec.md, Part 1, rounding_shift_right: round(x / 2^shift), ties toward +inf.

    if shift == 0: y = x
    else:          y = (x + (1 << (shift - 1))) >> shift
    """
    fn = "rounding_shift_right"
    x, shift = int64(x, fn, "x"), int64(shift, fn, "shift")
    require((0 <= shift) & (shift <= 63), fn, "shift must be in [0, 63]")
    half = np.where(shift == 0, 0, np.left_shift(1, np.maximum(shift - 1, 0)))    # 2^(shift-1), or 0
    require(x <= INT64_MAX - half, fn, "x + 2^(shift-1) exceeds int64", OverflowError)
    return (x + half) >> shift                      # for shift == 0: (x + 0) >> 0 = x


# ---------------------------------------------------------------------------------------------
# gemmlowp's two roundings (DOUBLE_ROUND)
# ---------------------------------------------------------------------------------------------

def _trunc_div_pow2(n: np.ndarray, e: int) -> np.ndarray:
    """trunc(n / 2^e): C division, toward zero."""
    return np.where(n >= 0, n >> e, -((-n) >> e))


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """docs/spec.md, Part 1, saturating_rounding_doubling_high_mul (gemmlowp), a and b int32.

    if a == INT32_MIN and b == INT32_MIN: return INT32_MAX
    ab = a * b ; nudge = (ab >= 0) ? 2^30 : 1 - 2^30 ; y = trunc((ab + nudge) / 2^31)
    """
    fn = "saturating_rounding_doubling_high_mul"
    a, b = int64(a, fn, "a"), int64(b, fn, "b")
    require((INT32_MIN <= a) & (a <= INT32_MAX) & (INT32_MIN <= b) & (b <= INT32_MAX), fn, "a and b must be int32")
    ab = a * b                                                       # |ab| <= 2^62
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    y = _trunc_div_pow2(ab + nudge, 31)
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, y)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """docs/spec.md, Part 1, rounding_divide_by_pot (gemmlowp): x / 2^exponent, ties away from zero.

    mask = (1 << exponent) - 1 ; remainder = x & mask ; threshold = (mask >> 1) + (x < 0 ? 1 : 0)
    y = (x >> exponent) + (remainder > threshold ? 1 : 0)
    """
    fn = "rounding_divide_by_pot"
    x, exponent = int64(x, fn, "x"), int64(exponent, fn, "exponent")
    require((INT32_MIN <= x) & (x <= INT32_MAX), fn, "x must be int32")
    require((0 <= exponent) & (exponent <= 31), fn, "exponent must be in [0, 31]")
    mask = np.left_shift(1, exponent) - 1
    remainder = x & mask                              # the low `exponent` bits of x's two's complement
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


# ---------------------------------------------------------------------------------------------
# apply_scale, requantize
# ---------------------------------------------------------------------------------------------

def apply_scale(value, multiplier, shift, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """docs/spec.md, Part 1, apply_scale: value * multiplier * 2^-shift rounded (not saturated), int64.

    SINGLE_ROUND (TOSA apply_scale_32, double_round = false):
        prod = value * multiplier ; y = (prod + (1 << (shift - 1))) >> shift
    DOUBLE_ROUND (TFLite MultiplyByQuantizedMultiplier(value, multiplier, 31 - shift)):
        left = max(31 - shift, 0) ; right = max(shift - 31, 0)
        y = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(value << left, multiplier), right)
    """
    fn = "apply_scale"
    _check_rounding(rounding, fn)
    value, multiplier, shift = int64(value, fn, "value"), int64(multiplier, fn, "multiplier"), int64(shift, fn, "shift")
    require((0 <= multiplier) & (multiplier <= INT32_MAX), fn, "multiplier must be in [0, 2^31 - 1]")
    require((2 <= shift) & (shift <= 62), fn, "shift must be in [2, 62]")
    require((INT32_MIN <= value) & (value <= INT32_MAX), fn, "value must be int32")
    half = np.left_shift(1, shift - 1)                                # 2^(shift-1)
    require((-half <= value) & (value < half), fn, "value must satisfy -2^(shift-1) <= value < 2^(shift-1)")
    if rounding == SINGLE_ROUND:
        prod = value * multiplier                                     # |prod| < 2^62
        return (prod + half) >> shift
    left = np.maximum(31 - shift, 0)
    right = np.maximum(shift - 31, 0)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(value << left, multiplier), right)


def requantize(value, multiplier, shift, out_dtype=np.int8, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """docs/spec.md, Part 1, requantize: y = saturate(apply_scale(value, multiplier, shift, rounding), out_dtype)."""
    return saturate(apply_scale(value, multiplier, shift, rounding), out_dtype)


def apply_scale_16(value, multiplier, shift) -> np.ndarray:
    """docs/spec.md, Part 7, apply_scale_16 (TOSA apply_scale_16: int48 value, 16-bit multiplier), int64:

    prod = value * multiplier ; y = (prod + (1 << (shift - 1))) >> shift        # one rounding, half up
    """
    fn = "apply_scale_16"
    value, multiplier, shift = int64(value, fn, "value"), int64(multiplier, fn, "multiplier"), int64(shift, fn, "shift")
    require((-(1 << 47) < value) & (value < 1 << 47), fn, "value must be int48: |value| <= 2^47 - 1")
    require((0 <= multiplier) & (multiplier < 1 << 15), fn, "multiplier must be in [0, 2^15 - 1]")
    require((2 <= shift) & (shift <= 62), fn, "shift must be in [2, 62]")
    prod = value * multiplier                                         # |prod| < 2^62
    return (prod + np.left_shift(1, shift - 1)) >> shift


def requantize_16(value, multiplier, shift, out_dtype=np.int16) -> np.ndarray:
    """docs/spec.md, Part 7: y = saturate(apply_scale_16(value, multiplier, shift), out_dtype)."""
    return saturate(apply_scale_16(value, multiplier, shift), out_dtype)

# ---------------------------------------------------------------------------------------------
# isqrt: the bit-by-bit method
# ---------------------------------------------------------------------------------------------

def digit_by_digit_sqrt(x: np.ndarray, steps: int) -> np.ndarray:
    """floor(sqrt(x)) by the bit-by-bit (base 4) method with `steps` iterations, bit = 4^(steps - 1) first.

    rem = x ; res = 0 ; bit = 4^(steps-1)
    repeat steps times:
        trial = res + bit
        if rem >= trial: rem = rem - trial ; res = (res >> 1) + bit
        else:            res = res >> 1
        bit = bit >> 2
    """
    rem = x.copy()
    res = np.zeros_like(x)
    bit = 1 << (2 * (steps - 1))
    for _ in range(steps):
        trial = res + bit
        take = rem >= trial
        rem = np.where(take, rem - trial, rem)
        res = np.where(take, (res >> 1) + bit, res >> 1)
        bit = bit >> 2
    return res


def isqrt(x) -> np.ndarray:
    """docs/spec.md, Part 1, isqrt: exact floor(sqrt(x)) for 0 <= x <= 2^62 - 1; 31 steps, bit = 2^60 first."""
    x = int64(x, "isqrt", "x")
    require((0 <= x) & (x <= (1 << 62) - 1), "isqrt", "x must be in [0, 2^62 - 1]")
    return digit_by_digit_sqrt(x, 31)


# ---------------------------------------------------------------------------------------------
# offline: round_half_away_from_zero of one float (the table builders)
# ---------------------------------------------------------------------------------------------

def round_half_away(x: float) -> int:
    """docs/spec.md, Part 1, round_half_away_from_zero, of one finite float:
    m = |x| ; w = floor(m) ; r = w + (m - w >= 0.5 ? 1 : 0) ; y = sign(x) * r   (m - w is exact)."""
    require(math.isfinite(x), "round_half_away_from_zero", "x must be finite (no NaN/inf)")
    m = abs(x)
    w = math.floor(m)
    r = w + (1 if m - w >= 0.5 else 0)
    return -r if x < 0 else r
