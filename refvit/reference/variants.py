"""The integer scheme variants written as docs/spec.md, Part 4's pseudocode: polynomial and shift GELU and
softmax, the 32-bit and the wide LayerNorm, the int16 residual add, 4-bit and mixed power-of-two weights.

Plain int64 NumPy, as `refvit.reference.kernels`; the fixed constants are Part 4's table ("Fixed constants"),
restated here (a test compares them with `refvit.int_kernels_variants`'). Same signatures, output dtypes and
shapes and `internals` as the fast kernels of `refvit.int_kernels_variants`.
"""
from __future__ import annotations

import numpy as np

from refvit.reference.arith import (
    INT32_MAX, SINGLE_ROUND, apply_scale, digit_by_digit_sqrt, int64, isqrt, requantize, require, rounding_shift_right,
)
from refvit.reference.kernels import (
    add_arith, check_scores, conv2d_accumulate, conv_requantize, layernorm_normalize, layernorm_tail,
    array_arg, scalar_arg, softmax_output,
)

INT8_VALUES = np.arange(-128, 128, dtype=np.int64)   # every int8 x, in table order (index x + 128)

# Part 4, "Fixed constants"
EXP_FRAC_BITS = 14                 # exp arguments in units of 2^-14
EXP_POLY_LN2 = 11357               # ceil(ln 2 * 2^14)
EXP_POLY_QB = 22167                # floor(1.353 / 2^-14)
EXP_POLY_QC = 257578233            # floor(0.344 / (0.3585 * 2^-28))
SOFTMAX_POLY_CAP = 30 * EXP_POLY_LN2   # 340710
SOFTMAX_SHIFT_CAP = 1 << 19
GELU_SHIFT_SIGMOID_BITS = 15
LN32_SUMSQ_MAX = 1 << 29
LN32_MAX_CHANNELS = 4096
LN_WIDE_MAX_CHANNELS = {np.dtype(np.int8): 4096, np.dtype(np.int16): 1290}   # layernorm_wide: C^3 R^2 / 4 <= 2^61
W4_MAX, MAX_W4_TERMS = 7, 1 << 20
POT_MAX_EXP = 6                    # power-of-two codes 0, +-1, +-2, ..., +-64


def _rescale(multiplier, shift, fn: str, prefix: str = "") -> tuple:
    return (scalar_arg(multiplier, fn, prefix + "multiplier", 0, INT32_MAX),
            scalar_arg(shift, fn, prefix + "shift", 2, 62))


# =============================================================================================
# GELU
# =============================================================================================

def gelu_poly(x, c_b, c_c, c_1, erf_shift, multiplier, shift, *, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """docs/spec.md, Part 4, gelu_poly (I-BERT i-GELU) -> int8, the shape of x. The integer formula on every
    int8 value (the bound on acc is checked for all 256 inputs), then out = table[x + 128]:

    t   = c_b - min(|x|, c_b)
    y   = sign(x) * (t*t - c_c)
    h   = (y >> k) - c_1
    acc = -x * h                               # |acc| <= 2^31 - 1 for every int8 x
    out = requantize(acc, multiplier, shift, int8, rounding)
    """
    fn = "gelu_poly"
    array_arg(x, fn, "x", np.int8)
    c_b = scalar_arg(c_b, fn, "c_b", 1, 1 << 15)
    c_c = scalar_arg(c_c, fn, "c_c", 0, INT32_MAX)
    c_1 = scalar_arg(c_1, fn, "c_1", 0, INT32_MAX)
    k = scalar_arg(erf_shift, fn, "erf_shift", 0, 31)
    multiplier, shift = _rescale(multiplier, shift, fn)
    v = INT8_VALUES                                                    # (256,)
    t = c_b - np.minimum(np.abs(v), c_b)
    y = np.sign(v) * (t * t - c_c)
    h = (y >> k) - c_1
    acc = -v * h
    require(np.abs(acc) <= INT32_MAX, fn, "constants give |x * h| > 2^31 - 1 for some int8 x")
    table = requantize(acc, multiplier, shift, np.int8, rounding)      # (256,)
    return table[x.astype(np.int64) + 128]


def exp_shift(v) -> np.ndarray:
    """docs/spec.md, Part 4, exp_shift (I-ViT ShiftExp): exp(v * 2^-14) in Q0.15 for -2^30 <= v <= 0.

    u = v + (v >> 1) - (v >> 4) ; u = max(u, -16 * 2^14)
    q = (-u) >> 14 ; r = u + (q << 14) ; e = (2^15 + r) >> q
    """
    v = int64(v, "exp_shift", "v")
    require((-(1 << 30) <= v) & (v <= 0), "exp_shift", "v must be in [-2^30, 0]")
    u = v + (v >> 1) - (v >> 4)
    u = np.maximum(u, -16 << EXP_FRAC_BITS)
    q = (-u) >> EXP_FRAC_BITS                                          # [0, 16]
    r = u + (q << EXP_FRAC_BITS)                                       # (-2^14, 0]
    return ((1 << 15) + r) >> q


def gelu_shift(x, multiplier_in, shift_in, multiplier, shift, *, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """docs/spec.md, Part 4, gelu_shift (I-ViT ShiftGELU) -> int8, the shape of x. The integer formula on every
    int8 value, then out = table[x + 128]:

    w      = apply_scale(x, multiplier_in, shift_in, rounding)
    e1     = exp_shift(min(w, 0)) ; e2 = exp_shift(-max(w, 0))
    total  = e1 + e2 ; factor = (2^31 - 1) // total ; sig = (e1 * factor) >> 16
    acc    = x * sig
    out    = requantize(acc, multiplier, shift, int8, rounding)
    """
    fn = "gelu_shift"
    array_arg(x, fn, "x", np.int8)
    m_in, s_in = _rescale(multiplier_in, shift_in, fn, "multiplier_in/shift_in: ")
    multiplier, shift = _rescale(multiplier, shift, fn)
    v = INT8_VALUES                                                    # (256,)
    w = apply_scale(v, m_in, s_in, rounding)
    e1 = exp_shift(np.minimum(w, 0))
    e2 = exp_shift(-np.maximum(w, 0))
    total = e1 + e2
    factor = INT32_MAX // total
    sig = (e1 * factor) >> (31 - GELU_SHIFT_SIGMOID_BITS)
    acc = v * sig
    table = requantize(acc, multiplier, shift, np.int8, rounding)      # (256,)
    return table[x.astype(np.int64) + 128]


# =============================================================================================
# softmax: the front end at 2^-14, exp_poly, exp_shift
# =============================================================================================

def softmax_differences(scores, multiplier, shift, rounding: str, cap: int, fn: str) -> np.ndarray:
    """docs/spec.md, Part 4, "Softmax front end: score differences at 2^-14", per row:

    m     = max_j s[j]
    d     = m - s
    d_cap = min(2^(shift-1) - 1, 2^31 - 1)
    d_w   = min(apply_scale(min(d, d_cap), multiplier, shift, rounding), cap)
    (OverflowError if some d > d_cap while apply_scale(d_cap) < cap: the clamp would change a value.)
    """
    s = check_scores(scores, fn)
    multiplier, shift = _rescale(multiplier, shift, fn)
    m = s.max(axis=-1, keepdims=True)                                  # (..., 1)
    d = m - s                                                          # (..., N), [0, 2^32 - 1]
    d_cap = min((1 << (shift - 1)) - 1, INT32_MAX)
    saturates = int(apply_scale(d_cap, multiplier, shift, rounding)) >= cap
    require(saturates or d <= d_cap, fn, f"a score difference exceeds {d_cap} and the rescale does not saturate "
            f"it at {cap}", OverflowError)
    return np.minimum(apply_scale(np.minimum(d, d_cap), multiplier, shift, rounding), cap)


def exp_poly(v) -> np.ndarray:
    """docs/spec.md, Part 4, exp_poly (I-BERT i-exp) of v * 2^-14 for -340710 <= v <= 0:

    z = (-v) // 11357 ; r = v + z * 11357 ; poly = (r + 22167)^2 + 257578233 ; e = poly >> (z + 15)
    """
    v = int64(v, "exp_poly", "v")
    require((-SOFTMAX_POLY_CAP <= v) & (v <= 0), "exp_poly", f"v must be in [-{SOFTMAX_POLY_CAP}, 0]")
    z = (-v) // EXP_POLY_LN2                                           # [0, 30]
    r = v + z * EXP_POLY_LN2                                           # (-11357, 0]
    poly = (r + EXP_POLY_QB) ** 2 + EXP_POLY_QC                        # < 2^30
    return poly >> (z + 15)                                            # [0, 22856]


def _softmax_variant(scores, multiplier, shift, rounding, internals, fn, cap, exp) -> np.ndarray:
    """d_w = the front end; e = exp(-d_w); then Part 2's output stage. internals: diff, exp, sum, recip (int32)."""
    d_w = softmax_differences(scores, multiplier, shift, rounding, cap, fn)
    e = exp(-d_w)
    p, sigma, recip = softmax_output(e)
    if internals is not None:
        internals.update({"diff": d_w.astype(np.int32), "exp": e.astype(np.int32), "sum": sigma.astype(np.int32),
                          "recip": recip.astype(np.int32)})
    return p


def softmax_poly(scores, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                 internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 4, softmax_poly: the front end with cap = 340710, e = exp_poly(-d_w), Part 2's output
    stage (sigma, recip, p) -> int8 (..., N). internals: `diff`, `exp`, `sum`, `recip`."""
    return _softmax_variant(scores, multiplier, shift, rounding, internals, "softmax_poly", SOFTMAX_POLY_CAP, exp_poly)


def softmax_shift(scores, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                  internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 4, softmax_shift: the front end with cap = 2^19, e = exp_shift(-d_w), Part 2's output
    stage -> int8 (..., N). internals: `diff`, `exp`, `sum`, `recip`."""
    return _softmax_variant(scores, multiplier, shift, rounding, internals, "softmax_shift", SOFTMAX_SHIFT_CAP,
                            exp_shift)


# =============================================================================================
# LayerNorm with 32-bit intermediates; the wide LayerNorm
# =============================================================================================

def isqrt32(x) -> np.ndarray:
    """docs/spec.md, Part 4, isqrt32: floor(sqrt(x)) for 0 <= x <= 2^31 - 1, Part 1's bit-by-bit method with
    bit = 4^15 = 2^30 first and 16 iterations."""
    x = int64(x, "isqrt32", "x")
    require((0 <= x) & (x <= INT32_MAX), "isqrt32", "x must be in [0, 2^31 - 1]")
    return digit_by_digit_sqrt(x, 16)


def layernorm_int32_normalize(x, eps_int, eps_shift, internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 4, layernorm_int32_normalize, per position over channels -> int32 (B, C, H, W):

    total = sum_c x[c]
    d     = C * x - total
    M_C   = isqrt(2^29 // C)
    dmax  = max_c |d[c]|
    k_d   = the smallest k >= 0 with rounding_shift_right(dmax, k) <= M_C
    k     = max(k_d, eps_shift)
    d_s   = rounding_shift_right(d, k)
    eps_s = rounding_shift_right(eps_int, min(2 (k - eps_shift), 31))
    q     = sum_c d_s^2 + eps_s
    r     = isqrt32(q)
    inv   = (1 << 30) // r
    t     = rounding_shift_right(d_s * inv, 14)
    internals: `sum`, `d`, `shift` (k), `ds`, `sumsq` (q - eps_s), `root`, `recip`, `t`, all int32.
    """
    fn = "layernorm_int32"
    array_arg(x, fn, "x", (np.int8, np.int16), 4)
    C = x.shape[1]
    require(1 <= C <= LN32_MAX_CHANNELS, fn, f"C = {C} must be in [1, {LN32_MAX_CHANNELS}]")
    eps_int = scalar_arg(eps_int, fn, "eps_int", 1, LN32_SUMSQ_MAX - 1)
    eps_shift = scalar_arg(eps_shift, fn, "eps_shift", 0, 30)
    x = x.astype(np.int64)
    total = x.sum(axis=1, keepdims=True)                               # (B, 1, H, W)
    d = C * x - total                                                  # (B, C, H, W)
    M_C = int(isqrt(LN32_SUMSQ_MAX // C))
    dmax = np.abs(d).max(axis=1, keepdims=True)                        # (B, 1, H, W)
    k_d = np.zeros_like(dmax)
    while np.any(rounding_shift_right(dmax, k_d) > M_C):               # the smallest k with the shifted dmax <= M_C
        k_d = k_d + (rounding_shift_right(dmax, k_d) > M_C)
    k = np.maximum(k_d, eps_shift)                                     # (B, 1, H, W)
    d_s = rounding_shift_right(d, k)                                   # (B, C, H, W), |d_s| <= M_C
    eps_s = rounding_shift_right(eps_int, np.minimum(2 * (k - eps_shift), 31))   # (B, 1, H, W)
    q = (d_s * d_s).sum(axis=1, keepdims=True) + eps_s                 # (B, 1, H, W), [1, 2^30 - 1]
    r = isqrt32(q)
    inv = (1 << 30) // r
    t = rounding_shift_right(d_s * inv, 14)                            # (B, C, H, W), |t| <= 2^16
    if internals is not None:
        kept = {"sum": total, "d": d, "k": k, "ds": d_s, "sumsq": q - eps_s, "root": r, "recip": inv, "t": t}
        internals.update({name: value.astype(np.int32) for name, value in kept.items()})
    return t.astype(np.int32)


def layernorm_int32(x, eps_int, eps_shift, gamma, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                    internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 4, layernorm_int32: t = layernorm_int32_normalize(x, eps_int, eps_shift), then Part 2's
    tail acc = t * gamma[c] + bias[c], out = requantize(acc, multiplier[c], shift[c], int8, rounding)."""
    t = layernorm_int32_normalize(x, eps_int, eps_shift, internals)
    return layernorm_tail(t, gamma, bias, multiplier, shift, rounding, internals, "layernorm_int32")


def layernorm_wide_normalize(x, eps_int, internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 4, layernorm_wide_normalize, layernorm_wide: Part 2's layernorm_normalize on int8 or
    int16 x (C <= 4096 for int8, C <= 1290 for int16) -> int32 (B, C, H, W)."""
    return layernorm_normalize(x, eps_int, internals, fn="layernorm_wide", max_channels=LN_WIDE_MAX_CHANNELS)


def layernorm_wide(x, eps_int, gamma, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                   internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 4, layernorm_wide_normalize, layernorm_wide: Part 2's layernorm on int8 or int16 x:
    t = layernorm_wide_normalize(x, eps_int), then Part 2's tail (acc = t * gamma[c] + bias[c]; requantize)."""
    t = layernorm_wide_normalize(x, eps_int, internals)
    return layernorm_tail(t, gamma, bias, multiplier, shift, rounding, internals, "layernorm_wide")



# =============================================================================================
# add_wide
# =============================================================================================

def add_wide(a, b, multiplier_a, multiplier_b, shift, *, out_dtype=np.int16) -> np.ndarray:
    """docs/spec.md, Part 4, add_wide: Part 2's add on int8 or int16 a, b, out_dtype int16 or int8:

    acc = a * multiplier_a + b * multiplier_b ; out = saturate(rounding_shift_right(acc, shift), out_dtype)
    """
    return add_arith(a, b, multiplier_a, multiplier_b, shift, out_dtype, "add_wide", (np.int8, np.int16),
                     (np.int8, np.int16))


# =============================================================================================
# weights: 4-bit codes, mixed power-of-two rows
# =============================================================================================

def conv2d_w4(x, weight, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND, out_dtype=np.int8,
              internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 4, conv2d_w4: Part 2's conv2d with weight codes in [-7, 7] and Cin*k*k <= 2^20:

    acc[b, o, i, j] = bias[o] + sum_{c, u, v} x[b, c, i*k + u, j*k + v] * weight[o, c, u, v]
    out = requantize(acc, multiplier[o], shift[o], out_dtype, rounding)
    """
    acc = conv2d_accumulate(x, weight, bias, weight_max=W4_MAX, max_terms=MAX_W4_TERMS, fn="conv2d_w4")
    return conv_requantize(acc, multiplier, shift, rounding, out_dtype, internals, "conv2d_w4")


def conv2d_mixed_pot(x, weight, bias, multiplier, shift, pot_rows, *, rounding: str = SINGLE_ROUND,
                     out_dtype=np.int8, internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 4, conv2d_mixed_pot: Part 2's conv2d; the rows o flagged in pot_rows (bool (Cout,)) must
    hold only the codes 0, +-1, +-2, +-4, ..., +-64."""
    fn = "conv2d_mixed_pot"
    array_arg(weight, fn, "weight", np.int8, 4)
    array_arg(pot_rows, fn, "pot_rows", np.bool_, 1)
    require(pot_rows.shape == (weight.shape[0],), fn, f"pot_rows must have shape ({weight.shape[0]},)")
    pot_codes = [0] + [s * (1 << j) for j in range(POT_MAX_EXP + 1) for s in (1, -1)]
    require(np.isin(weight[pot_rows], pot_codes), fn,
            f"weight rows flagged in pot_rows must hold only 0, +-2^k (k <= {POT_MAX_EXP})")
    acc = conv2d_accumulate(x, weight, bias)
    return conv_requantize(acc, multiplier, shift, rounding, out_dtype, internals, "conv2d")
