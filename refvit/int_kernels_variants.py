"""Integer kernels of the scheme variants (issue 8): polynomial / shift GELU and softmax, a 32-bit LayerNorm,
an int16 residual stream, 4-bit and mixed power-of-two weights.

Every runtime kernel is a pure function of integer arrays and integer constants, in the style of
`refvit.int_kernels`: dtypes, shapes and ranges are checked (ValueError naming the kernel and the argument),
everything is computed in int64 at most with the narrower bounds stated in the spec checked on the constants
(exhaustively over the 256 int8 inputs for the elementwise kernels), saturation only through
`intmath.saturate`, rescaling only through `intmath.apply_scale` / `requantize` / `rounding_shift_right`,
GEMMs only through `intmath.int_matmul`. Floats appear only in the offline constant builders
(`gelu_poly_constants`, `gelu_shift_constants`, `softmax_exp_multiplier`, `layernorm_int32_eps`,
`per_channel_weight_w4`, `per_channel_weight_mixed_pot`), which round exactly (rational arithmetic or
IEEE-754 correctly rounded operations only), so the integer constants are the same on every machine.

Spec: docs/spec.md, Part 4 "integer scheme variants" (one section per kernel, same names as here).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from refvit import int_kernels as K
from refvit.int_kernels import _per_channel, _require_array, _require_bias_headroom, _require_range, _scalar_int
from refvit.intmath import ROUNDING_MODES
from refvit.intmath import (
    SINGLE_ROUND, apply_scale, int_matmul, isqrt, quantize_multiplier, requantize, round_half_away_from_zero,
    rounding_shift_right, saturate,
)

INT32_MAX = (1 << 31) - 1
_INT8_DOMAIN = np.arange(-128, 128, dtype=np.int64)      # every int8 value, in table order (index = x + 128)

# --- GELU poly (I-BERT i-GELU, HeatViT delta) -----------------------------------------------------------
GELU_POLY_A = -0.2888              # erf(u) ~ L(u) = sign(u) * (a * (min(|u|, -b) + b)^2 + 1)   (I-BERT)
GELU_POLY_B = -1.769
GELU_POLY_MAX_CB = 1 << 15         # c_b <= 2^15: t^2 <= 2^30
GELU_POLY_MAX_ACC = INT32_MAX      # |x * h| <= 2^31 - 1 over all int8 x (checked exhaustively)

# --- shift-based exp (I-ViT ShiftExp), shared by gelu_shift and softmax_shift ------------------------------
EXP_FRAC_BITS = 14                 # exp arguments are real values in units of 2^-14
EXP_SHIFT_ONE = 1 << 15            # exp_shift(0) = 2^15: Q0.15
EXP_SHIFT_MAX_Q = 16               # u >= -16 * 2^14, so the shift q <= 16 (q = 16 already gives 0)
GELU_SHIFT_SIGMOID_BITS = 15       # sigmoid in Q0.15, [0, 2^15 - 1]
GELU_SHIFT_COEF = 1.702            # GELU(x) ~ x * sigmoid(1.702 x)

# --- polynomial exp (I-BERT i-exp), softmax_poly -------------------------------------------------------------
EXP_POLY_A, EXP_POLY_B, EXP_POLY_C = 0.3585, 1.353, 0.344     # exp(p) ~ a (p + b)^2 + c on (-ln2, 0]
EXP_POLY_LN2 = 11357              # -floor(-ln2 / 2^-14) = ceil(11356.52): the paper's -x0_int (exact ln 2; code: 11356)
EXP_POLY_QB = 22167                # floor(b / 2^-14) = floor(22167.55)
EXP_POLY_QC = 257578233            # floor(c / (a 2^-28)) = floor(257578233.7); all three tested from decimals
EXP_POLY_MAX_Z = 30                # I-BERT's n: x >= 30 * x0, z <= 30
EXP_POLY_SHIFT = 15                # e = poly >> (z + 15): exp_poly(0) = 22856 <= 2^15
EXP_POLY_ONE = (EXP_POLY_QB ** 2 + EXP_POLY_QC) >> EXP_POLY_SHIFT              # 22856

SOFTMAX_SHIFT_CAP = 1 << 19        # score differences beyond 32 (real) give e = 0 in exp_shift
SOFTMAX_POLY_CAP = EXP_POLY_MAX_Z * EXP_POLY_LN2                               # 340710: I-BERT's clamp

# --- LayerNorm int32 ---------------------------------------------------------------------------------------
LN32_MAX_CHANNELS = 4096
LN32_SUMSQ_MAX = 1 << 29           # sum_c d_s^2 <= 2^29 and eps_s <= 2^29 - 1: q < 2^30, r < 2^15
LN32_EPS_MAX = (1 << 29) - 1
LN32_MAX_EPS_SHIFT = 30
LN32_RECIP_BITS = 30               # inv = 2^30 // r; |d_s * inv| <= 2^30
LN32_T_SHIFT = LN32_RECIP_BITS - K.LN_T_BITS                                    # 14: t = round(2^16 d_s / r)
ISQRT32_BITS = 16

# --- wide (int16-capable) LayerNorm and add ------------------------------------------------------------------
LN_WIDE_MAX_CHANNELS = {np.dtype(np.int8): K.MAX_LN_CHANNELS, np.dtype(np.int16): 1290}  # C^3 R^2 / 4 <= 2^61

# --- weights ---------------------------------------------------------------------------------------------
W4_MAX = 7
W4_PRODUCT_MAX = 128 * W4_MAX      # 896
MAX_W4_TERMS = 1 << 20             # 2^20 * 896 < 2^30
POT_MAX_EXP = 6                    # power-of-two codes 0, +-1, +-2, ..., +-64
POT_LEVELS = (0,) + tuple(1 << k for k in range(POT_MAX_EXP + 1))


# =============================================================================================
# helpers
# =============================================================================================

def _int_const(v, fn: str, name: str, lo: int, hi: int) -> int:
    """A scalar integer constant in [lo, hi]."""
    v = _scalar_int(v, fn, name)
    if not lo <= v <= hi:
        raise ValueError(f"{fn}: {name} must be in [{lo}, {hi}], got {v}")
    return v


def _rescale_const(multiplier, shift, fn: str, prefix: str = "") -> tuple[int, int]:
    m = _int_const(multiplier, fn, prefix + "multiplier", 0, INT32_MAX)
    s = _int_const(shift, fn, prefix + "shift", 2, 62)
    return m, s


def _positive_float(v, fn: str, name: str) -> Fraction:
    f = float(v)
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {v!r}")
    return Fraction(f)


def _multiplier_of(ratio: Fraction, fn: str) -> tuple[int, int]:
    """quantize_multiplier of an exact rational (rounded once to the nearest double first)."""
    try:
        return quantize_multiplier(float(ratio))
    except ValueError as e:
        raise ValueError(f"{fn}: rescale ratio {float(ratio)!r} not representable: {e}") from None


# =============================================================================================
# GELU, polynomial (I-BERT i-GELU with HeatViT's delta)
# =============================================================================================

def _gelu_poly_h(x: np.ndarray, c_b: int, c_c: int, c_1: int, erf_shift: int) -> np.ndarray:
    """h(x) = (y >> k) - c_1 with y = sign(x) * ((c_b - min(|x|, c_b))^2 - c_c), I-BERT's int_erf value."""
    t = c_b - np.minimum(np.abs(x), c_b)                          # [0, c_b], t^2 <= 2^30
    y = np.sign(x) * (t * t - c_c)                                 # |y| <= max(2^30, c_c) < 2^31
    return (y >> erf_shift) - c_1


def gelu_poly(x, c_b, c_c, c_1, erf_shift, multiplier, shift, *, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """I-BERT i-GELU on int8 x (any shape) -> int8, same shape.

    t = c_b - min(|x|, c_b); y = sign(x) * (t^2 - c_c); h = (y >> erf_shift) - c_1;
    out = requantize(-x * h, multiplier, shift, int8, rounding). Constants from `gelu_poly_constants`.
    """
    fn = "gelu_poly"
    _require_array(x, fn, "x", np.int8)
    c_b = _int_const(c_b, fn, "c_b", 1, GELU_POLY_MAX_CB)
    c_c = _int_const(c_c, fn, "c_c", 0, INT32_MAX)
    c_1 = _int_const(c_1, fn, "c_1", 0, INT32_MAX)
    k = _int_const(erf_shift, fn, "erf_shift", 0, 31)
    m, s = _rescale_const(multiplier, shift, fn)
    h = _gelu_poly_h(_INT8_DOMAIN, c_b, c_c, c_1, k)              # (256,), every int8 input
    acc = -_INT8_DOMAIN * h                                        # (256,)
    worst = int(np.abs(acc).max())
    if worst > GELU_POLY_MAX_ACC:
        raise ValueError(f"{fn}: constants give |x * h| = {worst} > 2^31 - 1 for some int8 x "
                         f"(c_1 = {c_1}, erf_shift = {k}: raise erf_shift)")
    table = requantize(acc, m, s, out_dtype=np.int8, rounding=rounding)   # (256,) int8
    return table[x.astype(np.int64) + 128]


def gelu_poly_reference_float(x_real, delta: float = 1.0) -> np.ndarray:
    """Offline / tests: the float function gelu_poly approximates, x/2 * (1 + delta * L(x / sqrt(2)))."""
    u = np.asarray(x_real, np.float64) / math.sqrt(2.0)
    lu = np.sign(u) * (GELU_POLY_A * (np.minimum(np.abs(u), -GELU_POLY_B) + GELU_POLY_B) ** 2 + 1.0)
    return 0.5 * np.asarray(x_real, np.float64) * (1.0 + delta * lu)


def gelu_poly_constants(scale_in: float, scale_out: float, delta: float = 1.0) -> dict:
    """Offline: the integer constants of `gelu_poly` for an int8 input at scale_in, output at scale_out.

    S = scale_in / sqrt(2) (float64, correctly rounded); with exact rationals of the doubles a, b, S, delta:
    c_b = -floor(b / S), c_c = -floor(1 / (a S^2)), erf_shift k = the smallest k >= 0 with
    c_1 = -floor(1 / (delta a S^2 2^k)) giving |x * h| <= 2^31 - 1 for every int8 x, and
    (multiplier, shift) = quantize_multiplier(delta |a| S^2 2^k scale_in / (2 scale_out)).
    delta = 1 is I-BERT; HeatViT's extra factor multiplies L: GELU ~ x/2 (1 + delta L(x / sqrt 2)).
    """
    fn = "gelu_poly_constants"
    _positive_float(scale_in, fn, "scale_in")
    return gelu_poly_constants_of(Fraction(float(scale_in) / math.sqrt(2.0)), scale_in, scale_out, delta, fn)


def gelu_poly_constants_of(S: Fraction, scale_in: float, scale_out: float, delta: float, fn: str) -> dict:
    """`gelu_poly_constants` for a given erf argument unit S (an exact rational): the rules after S."""
    s_in = _positive_float(scale_in, fn, "scale_in")
    s_out = _positive_float(scale_out, fn, "scale_out")
    dl = _positive_float(delta, fn, "delta")
    a, b = Fraction(GELU_POLY_A), Fraction(GELU_POLY_B)
    c_b = -math.floor(b / S)
    c_c = -math.floor(1 / (a * S * S))
    if c_b > GELU_POLY_MAX_CB or c_c > INT32_MAX:
        raise ValueError(f"{fn}: scale_in {float(scale_in)!r} too small (c_b = {c_b} must be <= 2^15 and "
                         f"c_c = {c_c} <= 2^31 - 1)")
    for k in range(0, 32):
        c_1 = -math.floor(1 / (dl * a * S * S * 2 ** k))
        if c_1 > INT32_MAX:
            continue
        h = _gelu_poly_h(_INT8_DOMAIN, c_b, c_c, c_1, k)
        if int(np.abs(_INT8_DOMAIN * h).max()) <= GELU_POLY_MAX_ACC:
            break
    else:  # pragma: no cover - k = 31 always fits for an admissible c_c
        raise ValueError(f"{fn}: no erf_shift in [0, 31] bounds the product")
    m, sh = _multiplier_of(dl * (-a) * S * S * 2 ** k * s_in / (2 * s_out), fn)
    return {"c_b": c_b, "c_c": c_c, "c_1": c_1, "erf_shift": k, "multiplier": m, "shift": sh}


# =============================================================================================
# shift-based exp (I-ViT ShiftExp) and GELU, shift (I-ViT ShiftGELU)
# =============================================================================================

def exp_shift(v) -> np.ndarray:
    """exp(v * 2^-14) in Q0.15 for integer v in [-2^30, 0] (int64 array): I-ViT's ShiftExp.

    u = v + (v >> 1) - (v >> 4)          # v * log2(e), log2(e) ~ 1.4375
    u = max(u, -16 * 2^14)               # q <= 16
    q = (-u) >> 14 ; r = u + (q << 14)   # u = -q * 2^14 + r, r in (-2^14, 0]
    e = (2^15 + r) >> q                  # 2^(-q) * (1 - p/2), p = -r / 2^14 in [0, 1)
    """
    fn = "exp_shift"
    v = np.asarray(v)
    if v.dtype.kind not in "iu":
        raise ValueError(f"{fn}: v must be an integer array, got dtype {v.dtype}")
    v = v.astype(np.int64)
    _require_range(v, -(1 << 30), 0, fn, "v")
    u = v + (v >> 1) - (v >> 4)                                    # [-1.4375 * 2^30, 0], fits int32
    u = np.maximum(u, -EXP_SHIFT_MAX_Q << EXP_FRAC_BITS)
    q = (-u) >> EXP_FRAC_BITS                                      # [0, 16]
    r = u + (q << EXP_FRAC_BITS)                                   # (-2^14, 0]
    return (EXP_SHIFT_ONE + r) >> q                                # [0, 2^15]


def gelu_shift(x, multiplier_in, shift_in, multiplier, shift, *, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """I-ViT ShiftGELU x * sigmoid(1.702 x) on int8 x (any shape) -> int8, elementwise.

    w = apply_scale(x, multiplier_in, shift_in)        # 1.702 x in units of 2^-14
    e1 = exp_shift(min(w, 0)); e2 = exp_shift(-max(w, 0))   # e^(w - m), e^(-m), m = max(w, 0)
    factor = (2^31 - 1) // (e1 + e2); sig = (e1 * factor) >> 16    # Q0.15
    out = requantize(x * sig, multiplier, shift, int8)
    """
    fn = "gelu_shift"
    _require_array(x, fn, "x", np.int8)
    m_in, s_in = _rescale_const(multiplier_in, shift_in, fn, "multiplier_in/shift_in: ")
    m, s = _rescale_const(multiplier, shift, fn)
    w = apply_scale(_INT8_DOMAIN, m_in, s_in, rounding)            # (256,), |w| <= 2^30
    e1 = exp_shift(np.minimum(w, 0))                               # (256,) [0, 2^15]
    e2 = exp_shift(-np.maximum(w, 0))                              # one of e1, e2 is 2^15
    total = e1 + e2                                                # [2^15, 2^16]
    factor = INT32_MAX // total                                    # [2^15 - 1, 2^16 - 1]
    sig = (e1 * factor) >> (31 - GELU_SHIFT_SIGMOID_BITS)          # e1*factor <= 2^31 - 1: sig <= 2^15 - 1
    acc = _INT8_DOMAIN * sig                                       # |.| <= 128 * (2^15 - 1) < 2^22
    table = requantize(acc, m, s, out_dtype=np.int8, rounding=rounding)
    return table[x.astype(np.int64) + 128]


def gelu_shift_constants(scale_in: float, scale_out: float) -> dict:
    """Offline: (multiplier_in, shift_in) = quantize_multiplier(1.702 * scale_in * 2^14),
    (multiplier, shift) = quantize_multiplier(scale_in * 2^-15 / scale_out). Exact rationals, rounded once."""
    fn = "gelu_shift_constants"
    s_in, s_out = _positive_float(scale_in, fn, "scale_in"), _positive_float(scale_out, fn, "scale_out")
    m_in, sh_in = _multiplier_of(Fraction(GELU_SHIFT_COEF) * s_in * (1 << EXP_FRAC_BITS), fn)
    m, sh = _multiplier_of(s_in / (1 << GELU_SHIFT_SIGMOID_BITS) / s_out, fn)
    return {"multiplier_in": m_in, "shift_in": sh_in, "multiplier": m, "shift": sh}


# =============================================================================================
# softmax, polynomial exp (I-BERT) and shift exp (I-ViT Shiftmax)
# =============================================================================================

def exp_argument(v, cap: int, fn: str) -> np.ndarray:
    """An exp kernel's argument: integers in [-cap, 0] (units 2^-14), as int64."""
    v = np.asarray(v)
    if v.dtype.kind not in "iu":
        raise ValueError(f"{fn}: v must be an integer array, got dtype {v.dtype}")
    v = v.astype(np.int64)
    _require_range(v, -cap, 0, fn, "v")
    return v


def exp_poly(v) -> np.ndarray:
    """I-BERT i-exp of v * 2^-14 for integer v in [-SOFTMAX_POLY_CAP, 0] (int64 array), relative units.

    z = (-v) // 11357 ; r = v + z * 11357              # v = -z ln2 + r, r in (-ln2, 0] (units 2^-14)
    poly = (r + 22167)^2 + 257578233                   # exp(r) / (0.3585 * 2^-28)
    e = poly >> (z + 15)                               # exp(v) * 22856 approximately; e(0) = 22856
    """
    fn = "exp_poly"
    v = exp_argument(v, SOFTMAX_POLY_CAP, fn)                      # int64 in [-cap, 0]
    z = (-v) // EXP_POLY_LN2                                       # [0, 30]
    r = v + z * EXP_POLY_LN2                                       # (-11357, 0]
    p = r + EXP_POLY_QB                                            # [10811, 22167]
    poly = p * p + EXP_POLY_QC                                     # [374455954, 748954122] < 2^30
    return poly >> (z + EXP_POLY_SHIFT)                            # [0, 22856]


def _softmax_differences(scores, multiplier, shift, rounding: str, cap: int, fn: str) -> np.ndarray:
    """d_w = min(apply_scale(min(max - s, d_cap), multiplier, shift), cap) per row, int64 (..., N) in [0, cap]."""
    _require_array(scores, fn, "scores", np.int32)
    if scores.ndim < 1 or scores.shape[-1] == 0:
        raise ValueError(f"{fn}: scores must have a non-empty last axis (keys), got shape {scores.shape}")
    if scores.shape[-1] > K.MAX_TOKENS:
        raise ValueError(f"{fn}: N = {scores.shape[-1]} keys exceeds {K.MAX_TOKENS} (sum bound)")
    m, s = _rescale_const(multiplier, shift, fn)
    si = scores.astype(np.int64)
    d = si.max(axis=-1, keepdims=True) - si                        # (..., N) in [0, 2^32 - 1]
    d_cap = min((1 << (s - 1)) - 1, INT32_MAX)                     # apply_scale's domain
    if int(apply_scale(np.array([d_cap]), m, s, rounding)[0]) < cap and d.size and int(d.max()) > d_cap:
        raise OverflowError(f"{fn}: score difference {int(d.max())} exceeds {d_cap} and the rescale "
                            f"(multiplier {m}, shift {s}) is too small to saturate it at {cap}")
    scaled = apply_scale(np.minimum(d, d_cap), m, s, rounding)     # >= 0, monotone in d
    return np.minimum(scaled, cap)


def _normalize_probabilities(e: np.ndarray, internals: dict | None = None, one: int = K.PROB_ONE,
                             dtype=np.int8) -> np.ndarray:
    """Part 2 softmax tail: recip = 2^40 // sum e; p = saturate(rounding_shift_right(e * one * recip, 40), dtype)
    (one = 127, int8; Part 7's softmax_a16: 32767, int16).

    internals: a dict receives `exp` (int32, e's shape), `sum` and `recip` (int32 (..., 1))."""
    sigma = e.sum(axis=-1, keepdims=True)                          # >= e of the max key >= 1
    recip = (1 << K.SOFTMAX_RECIP_BITS) // sigma
    if internals is not None:                      # e <= 2^15, sigma < 2^31, recip < 2^26 (sigma >= e(0) >= 22856)
        internals.update({k: v.astype(np.int32) for k, v in (("exp", e), ("sum", sigma), ("recip", recip))})
    p = rounding_shift_right(e * one * recip, K.SOFTMAX_RECIP_BITS)   # e <= sigma: p <= one; e*one*recip < 2^56
    return saturate(p, dtype)


def _kept_diff(d: np.ndarray, internals: dict | None) -> np.ndarray:
    """Record the capped score differences as the `diff` internal (int32: d <= cap < 2^20)."""
    if internals is not None:
        internals["diff"] = d.astype(np.int32)
    return d


def softmax_poly(scores, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                 internals: dict | None = None) -> np.ndarray:
    """Integer softmax over the last axis with I-BERT's i-exp: int32 (..., N) -> int8 in [0, 127] (scale 1/127).

    (multiplier, shift) = softmax_exp_multiplier(score scale): a score difference in units of 2^-14.
    internals: a dict receives `diff` (the capped differences), `exp`, `sum`, `recip`.
    """
    fn = "softmax_poly"
    d = _softmax_differences(scores, multiplier, shift, rounding, SOFTMAX_POLY_CAP, fn)   # (..., N)
    return _normalize_probabilities(exp_poly(-_kept_diff(d, internals)), internals)   # e <= 22856, sum < 2^31


def softmax_shift(scores, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                  internals: dict | None = None) -> np.ndarray:
    """Integer softmax over the last axis with I-ViT's ShiftExp (Shiftmax): int32 (..., N) -> int8 in [0, 127].

    internals: a dict receives `diff` (the capped differences), `exp`, `sum`, `recip`."""
    fn = "softmax_shift"
    d = _softmax_differences(scores, multiplier, shift, rounding, SOFTMAX_SHIFT_CAP, fn)  # (..., N)
    return _normalize_probabilities(exp_shift(-_kept_diff(d, internals)), internals)  # e <= 2^15, sum < 2^31


def softmax_exp_multiplier(score_scale: float) -> tuple[int, int]:
    """Offline: quantize_multiplier(score_scale * 2^14), score_scale = s_q * s_k / sqrt(D) (the real logit per unit)."""
    fn = "softmax_exp_multiplier"
    return _multiplier_of(_positive_float(score_scale, fn, "score_scale") * (1 << EXP_FRAC_BITS), fn)


# =============================================================================================
# LayerNorm with 32-bit intermediates
# =============================================================================================

def isqrt32(x) -> np.ndarray:
    """Exact floor(sqrt(x)) for 0 <= x <= 2^31 - 1 by the bit-by-bit method on 32-bit values (16 steps)."""
    fn = "isqrt32"
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise ValueError(f"{fn}: x must be an integer array, got dtype {x.dtype}")
    x = x.astype(np.int64)
    _require_range(x, 0, INT32_MAX, fn, "x")
    rem = x.copy()
    res = np.zeros_like(x)
    bit = np.int64(1) << np.int64(2 * (ISQRT32_BITS - 1))          # 4^15 = 2^30
    for _ in range(ISQRT32_BITS):
        trial = res + bit                                          # < 2^31
        take = rem >= trial
        rem = np.where(take, rem - trial, rem)
        res = np.where(take, (res >> 1) + bit, res >> 1)
        bit >>= np.int64(2)
    return res


def _ln_input(x, fn: str, max_channels: dict) -> tuple[np.ndarray, int]:
    if not isinstance(x, np.ndarray) or x.dtype not in (np.dtype(np.int8), np.dtype(np.int16)):
        got = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"{fn}: x must be an int8 or int16 numpy array, got {got}")
    if x.ndim != 4:
        raise ValueError(f"{fn}: x must have 4 dims (B, C, H, W), got shape {x.shape}")
    c, cmax = x.shape[1], max_channels[x.dtype]
    if not 1 <= c <= cmax:
        raise ValueError(f"{fn}: C = {c} channels must be in [1, {cmax}] for {x.dtype} input (accumulator bound)")
    return x, c


def layernorm_int32_normalize(x, eps_int, eps_shift, internals: dict | None = None) -> np.ndarray:
    """t = round(2^16 d_s / isqrt32(sum_c d_s^2 + eps_s)) with every intermediate in int32 -> int32 (B, C, H, W).

    d = C*x - sum_c x; per position, k = max(eps_shift, smallest k with |rounding_shift_right(d, k)| <= M_C),
    M_C = isqrt(2^29 // C); d_s = rounding_shift_right(d, k); eps_s = rounding_shift_right(eps_int, 2(k - eps_shift)).
    x is int8 or int16 with 1 <= C <= 4096.
    """
    fn = "layernorm_int32"
    x, c = _ln_input(x, fn, {np.dtype(np.int8): LN32_MAX_CHANNELS, np.dtype(np.int16): LN32_MAX_CHANNELS})
    eps_int = _int_const(eps_int, fn, "eps_int", 1, LN32_EPS_MAX)
    k0 = _int_const(eps_shift, fn, "eps_shift", 0, LN32_MAX_EPS_SHIFT)
    m_c = math.isqrt(LN32_SUMSQ_MAX // c)                          # C * M_C^2 <= 2^29
    xi = x.astype(np.int64)
    total = xi.sum(axis=1, keepdims=True)                          # (B, 1, H, W), |.| <= 2^27
    d = c * xi - total                                             # (B, C, H, W), |.| < 2^28
    dmax = np.abs(d).max(axis=1, keepdims=True)                    # (B, 1, H, W)
    k_d = sum((rounding_shift_right(dmax, j) > m_c).astype(np.int64) for j in range(29))  # smallest fitting k
    k = np.maximum(k_d, k0)                                        # (B, 1, H, W) in [0, 30]
    d_s = rounding_shift_right(d, k)                               # |d_s| <= M_C
    eps_s = rounding_shift_right(np.int64(eps_int), np.minimum(2 * (k - k0), 31))   # [0, 2^29 - 1]
    q = (d_s * d_s).sum(axis=1, keepdims=True) + eps_s             # [1, 2^30 - 1]
    if q.size and (int(q.min()) < 1 or int(q.max()) > (1 << 30) - 1):  # proved impossible (spec); a guard
        raise OverflowError(f"{fn}: q = sum d_s^2 + eps_s left [1, 2^30 - 1]")
    r = isqrt32(q)                                                 # [1, 32767], |d_s| <= r
    inv = (1 << LN32_RECIP_BITS) // r                              # [2^15, 2^30]
    t = rounding_shift_right(d_s * inv, LN32_T_SHIFT)              # |d_s * inv| <= 2^30: |t| <= 2^16
    if internals is not None:                                      # every value below fits int32
        kept = {"sum": total, "d": d, "k": k, "ds": d_s, "sumsq": q - eps_s, "root": r, "recip": inv, "t": t}
        internals.update({name: v.astype(np.int32) for name, v in kept.items()})
    return t.astype(np.int32)


def _ln_tail(t: np.ndarray, c: int, gamma, bias, multiplier, shift, rounding: str, fn: str,
             internals: dict | None = None, out_dtype=np.int8) -> np.ndarray:
    """Part 2 layernorm tail: acc = t * gamma[c] + bias[c]; requantize per channel -> int8 (Part 7: int16)
    (internals: `acc`)."""
    _require_array(gamma, fn, "gamma", np.int8, 1, f"({c},)")
    _require_array(bias, fn, "bias", np.int32, 1, f"({c},)")
    if gamma.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"{fn}: gamma {gamma.shape} and bias {bias.shape} must have shape ({c},)")
    _require_range(gamma, -127, 127, fn, "gamma (symmetric int8)")
    _require_bias_headroom(bias, (1 << K.LN_T_BITS) * 127, fn)
    m, s = _per_channel(multiplier, fn, "multiplier", c), _per_channel(shift, fn, "shift", c)
    acc = t.astype(np.int64) * gamma.astype(np.int64).reshape(1, c, 1, 1) + bias.astype(np.int64).reshape(1, c, 1, 1)
    if internals is not None:
        internals["acc"] = acc.astype(np.int32)                    # fits int32 by the bias check
    return requantize(acc, m, s, out_dtype=out_dtype, rounding=rounding)


def layernorm_int32(x, eps_int, eps_shift, gamma, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                    internals: dict | None = None) -> np.ndarray:
    """LayerNorm over channels of int8 or int16 (B, C, H, W) with 32-bit intermediates, then Part 2's gamma/beta tail.

    Same gamma, bias, multiplier, shift constants as int_kernels.layernorm (t has scale sqrt(C) * 2^-16);
    only the eps constants differ: (eps_int, eps_shift) = layernorm_int32_eps(eps, C, scale_x).
    internals: a dict receives sum, d, shift, ds, sumsq, root, recip, t and acc (docs/spec.md).
    """
    fn = "layernorm_int32"
    t = layernorm_int32_normalize(x, eps_int, eps_shift, internals)
    return _ln_tail(t, x.shape[1], gamma, bias, multiplier, shift, rounding, fn, internals)


def layernorm_int32_eps(eps: float, channels: int, scale_x: float) -> tuple[int, int]:
    """Offline: eps * C^3 / scale_x^2 = eps_int * 4^eps_shift, with eps_int <= 2^29 - 1 (the smallest such shift).

    image = eps * C^3 / scale_x^2 (float64, as layernorm_eps_int); eps_shift = the smallest k >= 0 with
    round_half_away(image / 4^k) <= 2^29 - 1; eps_int = max(1, round_half_away(image / 4^eps_shift)).
    """
    fn = "layernorm_int32_eps"
    image = K.eps_image(eps, channels, scale_x, LN32_MAX_CHANNELS, fn)
    for k in range(LN32_MAX_EPS_SHIFT + 1):
        scaled = image / 4.0 ** k                                  # exact: division by a power of two
        if scaled < 2.0 ** 30 and (v := int(round_half_away_from_zero(np.float64(scaled)))) <= LN32_EPS_MAX:
            return max(1, v), k
    raise ValueError(f"{fn}: eps * C^3 / scale_x^2 = {image!r} exceeds (2^29 - 1) * 4^{LN32_MAX_EPS_SHIFT}")


# =============================================================================================
# int16 residual stream: add and LayerNorm on int16
# =============================================================================================

def add_wide(a, b, multiplier_a, multiplier_b, shift, *, out_dtype=np.int16) -> np.ndarray:
    """Part 2 `add` for int8 or int16 operands (each): saturate(rounding_shift_right(a*ma + b*mb, shift), out_dtype).

    b broadcasts to a's shape; |acc| <= 2 * 2^15 * (2^31 - 1) < 2^47. out_dtype int16 (default) or int8.
    """
    fn = "add_wide"
    for name, arr in (("a", a), ("b", b)):
        if not isinstance(arr, np.ndarray) or arr.dtype not in (np.dtype(np.int8), np.dtype(np.int16)):
            got = getattr(arr, "dtype", type(arr).__name__)
            raise ValueError(f"{fn}: {name} must be an int8 or int16 numpy array, got {got}")
    if np.dtype(out_dtype) not in (np.dtype(np.int8), np.dtype(np.int16)):
        raise ValueError(f"{fn}: out_dtype must be int8 or int16, got {np.dtype(out_dtype)}")
    K.require_broadcast(a, b, fn)
    ma = _int_const(multiplier_a, fn, "multiplier_a", 0, INT32_MAX)
    mb = _int_const(multiplier_b, fn, "multiplier_b", 0, INT32_MAX)
    s = _int_const(shift, fn, "shift", 0, 62)
    acc = a.astype(np.int64) * ma + b.astype(np.int64) * mb        # |.| < 2^47
    return saturate(rounding_shift_right(acc, s), out_dtype)


def layernorm_wide_normalize(x, eps_int, internals: dict | None = None) -> np.ndarray:
    """Part 2 `layernorm_normalize` on int8 or int16 input (int64 intermediates); C <= 4096 (int8), 1290 (int16)."""
    fn = "layernorm_wide"
    x, c = _ln_input(x, fn, LN_WIDE_MAX_CHANNELS)
    eps_int = _int_const(eps_int, fn, "eps_int", 1, K.MAX_LN_EPS_INT)
    xi = x.astype(np.int64)
    total = xi.sum(axis=1, keepdims=True)                          # |.| <= 2^15 * C
    d = c * xi - total                                             # |.| <= 65535 * (C - 1) < 2^27
    q = (d * d).sum(axis=1, keepdims=True) + eps_int               # <= C^3 * 65535^2 / 4 + 2^61 < 2^62
    r = isqrt(q)                                     # [1, 2^31), |d| <= r
    inv = (1 << K.LN_RECIP_BITS) // r                              # [2^9, 2^40]
    t = rounding_shift_right(d * inv, K.LN_T_SHIFT)                # |d * inv| <= 2^40: |t| <= 2^16
    if internals is not None:                                      # Part 2's names; sumsq < 2^62, recip <= 2^40
        internals.update({"sum": total.astype(np.int32), "d": d.astype(np.int32), "sumsq": q - eps_int,
                          "root": r.astype(np.int32), "recip": inv, "t": t.astype(np.int32)})
    return t.astype(np.int32)


def layernorm_wide(x, eps_int, gamma, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                   internals: dict | None = None) -> np.ndarray:
    """Part 2 `layernorm` accepting int8 or int16 input (identical to int_kernels.layernorm on int8; same internals)."""
    t = layernorm_wide_normalize(x, eps_int, internals)
    return _ln_tail(t, x.shape[1], gamma, bias, multiplier, shift, rounding, "layernorm_wide", internals)


# =============================================================================================
# weights: 4-bit codes and mixed power-of-two rows
# =============================================================================================

def conv2d_w4(x, weight, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND, out_dtype=np.int8,
              internals: dict | None = None) -> np.ndarray:
    """Part 2 conv2d with 4-bit weight codes in [-7, 7] stored as int8: the tighter bound |sum| <= terms * 896.

    acc = bias + sum x * w (int32, exact, any order); out = requantize(acc, multiplier[o], shift[o]) per channel.
    Cin*k*k <= 2^20; |bias| <= 2^31 - 1 - terms * 896.
    """
    g, shape = K._conv_gemm(x, weight, bias, "conv2d_w4", W4_MAX, MAX_W4_TERMS)    # (Cout, B*Ho*Wo), exact
    return K.conv_requantize(g, shape, bias, multiplier, shift, rounding=rounding, out_dtype=out_dtype,
                             internals=internals, fn="conv2d_w4")


def _is_pot_code(w: np.ndarray) -> np.ndarray:
    a = np.abs(w.astype(np.int64))
    return (a == 0) | (((a & (a - 1)) == 0) & (a <= POT_LEVELS[-1]))


def conv2d_mixed_pot(x, weight, bias, multiplier, shift, pot_rows, *, rounding: str = SINGLE_ROUND,
                     out_dtype=np.int8, internals: dict | None = None) -> np.ndarray:
    """Part 2 conv2d whose rows flagged in pot_rows (bool (Cout,)) hold only codes 0, +-2^k (k <= 6).

    The arithmetic is int_kernels.conv2d's (the codes are ordinary int8); this kernel checks the PoT rows.
    """
    fn = "conv2d_mixed_pot"
    _require_array(weight, fn, "weight", np.int8, 4, "(Cout, Cin, k, k)")
    _require_array(pot_rows, fn, "pot_rows", np.bool_, 1, "(Cout,)")
    if pot_rows.shape != (weight.shape[0],):
        raise ValueError(f"{fn}: pot_rows must have shape ({weight.shape[0]},), got {pot_rows.shape}")
    bad = ~_is_pot_code(weight[pot_rows])
    if bad.any():
        raise ValueError(f"{fn}: weight rows flagged in pot_rows must hold only 0, +-2^k (k <= {POT_MAX_EXP}); "
                         f"found {int(weight[pot_rows][bad][0])}")
    return K.conv2d(x, weight, bias, multiplier, shift, rounding=rounding, out_dtype=out_dtype, internals=internals)


def per_channel_weight_w4(w) -> tuple[np.ndarray, np.ndarray]:
    """Offline: symmetric per-output-channel 4-bit codes in [-7, 7] (int8 storage) and their scales (Cout,) float64.

    s[c] = max|W[c]| / 7 (1.0 for an all-zero row); codes = round_half_away(W / s[c]).
    """
    return _per_channel_symmetric(w, W4_MAX, "per_channel_weight_w4")


def _per_channel_symmetric(w, qmax: int, fn: str) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w, np.float64)
    if w.ndim < 1 or w.shape[0] == 0 or not np.all(np.isfinite(w)):
        raise ValueError(f"{fn}: w must be a finite float array with at least one output channel")
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) if w.size else np.zeros(w.shape[0])
    s = np.where(amax > 0, amax / qmax, 1.0)
    codes = round_half_away_from_zero(w / s.reshape(-1, *[1] * (w.ndim - 1)))
    _require_range(codes, -qmax, qmax, fn, "codes")                # |w / s| <= qmax (+ an ulp): never clamps
    return codes.astype(np.int8), s


def _pot_codes(v: np.ndarray) -> np.ndarray:
    """Nearest level of {0, 1, 2, 4, ..., 64} to v >= 0 (linear distance), ties to the larger level."""
    level = np.zeros(v.shape, np.int64)
    lower = 0
    for lev in POT_LEVELS[1:]:
        level = np.where(v >= (lower + lev) / 2, lev, level)       # midpoints 0.5, 1.5, 3, 6, 12, 24, 48: exact
        lower = lev
    return level


def per_channel_weight_mixed_pot(w, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offline: mixed power-of-two / int8 per-channel weights (Auto-ViT-Acc style).

    Every row gets both encodings: int8 (s8 = max|W| / 127, codes round_half_away(W / s8) in [-127, 127]) and
    PoT (sp = max|W| / 64, |code| = nearest of 0, 1, 2, 4, ..., 64 to |W| / sp, ties up, sign of W). The errors
    e8, ep are the exactly rounded (math.fsum) sums of squared dequantization errors of the row. The
    n = floor(fraction * Cout + 1/2) rows with the smallest ep / e8 (0/0 = 0, x/0 = inf; exact rational compare;
    ties by lower row index) take PoT. Returns (codes int8, scales float64 (Cout,), pot_rows bool (Cout,)).
    """
    fn = "per_channel_weight_mixed_pot"
    fr = float(fraction)
    if not (math.isfinite(fr) and 0.0 <= fr <= 1.0):
        raise ValueError(f"{fn}: fraction must be in [0, 1], got {fraction!r}")
    q8, s8 = _per_channel_symmetric(w, 127, fn)
    w = np.asarray(w, np.float64)
    cout = w.shape[0]
    rows = w.reshape(cout, -1)
    amax = np.abs(rows).max(axis=1, initial=0.0)                                   # (Cout,)
    sp = np.where(amax > 0, amax / (1 << POT_MAX_EXP), 1.0)                        # max |W| -> code 64
    qp = (np.sign(rows) * _pot_codes(np.abs(rows) / sp[:, None])).astype(np.int64)  # (Cout, K)
    err8 = rows - q8.reshape(cout, -1).astype(np.float64) * s8[:, None]
    errp = rows - qp.astype(np.float64) * sp[:, None]
    keys = []
    for c in range(cout):
        e8, ep = math.fsum((err8[c] * err8[c]).tolist()), math.fsum((errp[c] * errp[c]).tolist())
        key = Fraction(ep) / Fraction(e8) if e8 > 0 else (Fraction(0) if ep == 0 else math.inf)
        keys.append((key, c))
    n_pot = math.floor(Fraction(fr) * cout + Fraction(1, 2))
    pot_rows = np.zeros(cout, bool)
    for _, c in sorted(keys)[:n_pot]:
        pot_rows[c] = True
    codes = np.where(pot_rows[:, None], qp, q8.reshape(cout, -1).astype(np.int64)).reshape(w.shape)
    return codes.astype(np.int8), np.where(pot_rows, sp, s8), pot_rows


# ---------------------------------------------------------------------------------------------
# scheme parameters (issue 19; docs/spec.md Part 6): power-of-two scales
# ---------------------------------------------------------------------------------------------

POT_MAX_SHIFT = 31                 # conv2d_pot: shift in [-31, 31]; negative: an exact left shift


def pot_shift(acc: np.ndarray, shift: np.ndarray, rounding: str) -> np.ndarray:
    """round(acc / 2^shift) of an int32 accumulator, shift in [-31, 31] (broadcasts): shift <= 0 is the exact
    acc * 2^-shift; shift > 0 rounds, SINGLE_ROUND ties toward +inf ((acc + 2^(shift-1)) >> shift), DOUBLE_ROUND
    ties away from zero (gemmlowp RoundingDivideByPOT). int64 (|result| < 2^62)."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"pot_shift: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    acc, shift = np.asarray(acc, np.int64), np.asarray(shift, np.int64)
    right = np.maximum(shift, 0)
    if rounding == SINGLE_ROUND:
        down = rounding_shift_right(acc, right)
    else:
        mask = np.left_shift(np.int64(1), right) - 1                                # 2^shift - 1
        down = (acc >> right) + ((acc & mask) > (mask >> 1) + (acc < 0))           # ties away from zero
    return np.where(shift < 0, acc << np.maximum(-shift, 0), down)


def conv2d_pot(x, weight, bias, shift, *, rounding: str = SINGLE_ROUND, out_dtype=np.int8,
               internals: dict | None = None) -> np.ndarray:
    """Part 2's conv2d accumulator, requantized by a rounding shift per output channel (no multiplier):
    out = saturate(pot_shift(acc, shift[o], rounding), out_dtype) -> (B, Cout, H/k, W/k); shift in [-31, 31]."""
    fn = "conv2d_pot"
    g, shape = K._conv_gemm(x, weight, bias, fn)                                    # (Cout, B*Ho*Wo), exact
    cout = shape[1]
    s = _per_channel(shift, fn, "shift", cout).reshape(cout, 1)                     # (Cout, 1)
    _require_range(s, -POT_MAX_SHIFT, POT_MAX_SHIFT, fn, "shift")
    acc = g.astype(np.int64) + bias.astype(np.int64)[:, None]                      # (Cout, B*Ho*Wo), |acc| < 2^31
    if internals is not None:
        internals["acc"] = K._nchw(acc.astype(np.int32), shape)                     # (B, Cout, Ho, Wo)
    return K._nchw(saturate(pot_shift(acc, s, rounding), out_dtype), shape)         # (B, Cout, Ho, Wo)


# ---------------------------------------------------------------------------------------------
# scheme parameters: a narrow accumulator (acc_bits < 32) that saturates or wraps (docs/spec.md Part 6)
# ---------------------------------------------------------------------------------------------

ACC_OVERFLOW_MODES = ("saturate", "wrap")
MIN_ACC_BITS = 16


def narrow_accumulator(acc, acc_bits: int, acc_overflow: str, fn: str = "narrow_accumulator") -> np.ndarray:
    """The exact sum `acc` as an acc_bits-bit two's complement register holds it -> int32: `saturate` clamps to
    [-2^(acc_bits-1), 2^(acc_bits-1) - 1], `wrap` keeps the low acc_bits bits (sign-extended)."""
    bits = _scalar_int(acc_bits, fn, "acc_bits")
    if not MIN_ACC_BITS <= bits <= 32:
        raise ValueError(f"{fn}: acc_bits must be in [{MIN_ACC_BITS}, 32], got {bits}")
    if acc_overflow not in ACC_OVERFLOW_MODES:
        raise ValueError(f"{fn}: acc_overflow must be one of {ACC_OVERFLOW_MODES}, got {acc_overflow!r}")
    a, half = np.asarray(acc, np.int64), 1 << (bits - 1)
    if acc_overflow == "saturate":
        return np.clip(a, -half, half - 1).astype(np.int32)
    return (((a + half) & ((1 << bits) - 1)) - half).astype(np.int32)                # sign-extended low bits


def conv2d_narrow(x, weight, bias, multiplier, shift, *, acc_bits: int, acc_overflow: str,
                  rounding: str = SINGLE_ROUND, out_dtype=np.int8, internals: dict | None = None) -> np.ndarray:
    """Part 2's conv2d with an acc_bits accumulator: acc = narrow_accumulator(conv2d_accumulate(x, weight, bias)),
    then requantize per output channel -> out_dtype (B, Cout, H/k, W/k). internals: `acc_exact`, `acc`."""
    fn = "conv2d_narrow"
    exact = K.conv2d_accumulate(x, weight, bias)                                    # (B, Cout, Ho, Wo) int32
    cout = exact.shape[1]
    m, s = _per_channel(multiplier, fn, "multiplier", cout), _per_channel(shift, fn, "shift", cout)
    acc = narrow_accumulator(exact, acc_bits, acc_overflow, fn)                     # (B, Cout, Ho, Wo)
    if internals is not None:
        internals["acc_exact"], internals["acc"] = exact, acc
    return requantize(acc.astype(np.int64), m, s, out_dtype=out_dtype, rounding=rounding)


def attention_scores_narrow(q, k, *, acc_bits: int, acc_overflow: str) -> np.ndarray:
    """Part 2's attention_scores accumulated in acc_bits: narrow_accumulator(q . k) -> int32 (B, Hh, N, N)."""
    return narrow_accumulator(K.attention_scores(q, k), acc_bits, acc_overflow, "attention_scores_narrow")


def attention_context_narrow(p, v, multiplier, shift, *, acc_bits: int, acc_overflow: str,
                             rounding: str = SINGLE_ROUND, internals: dict | None = None) -> np.ndarray:
    """Part 2's attention_context with an acc_bits accumulator: requantize(narrow_accumulator(sum_j p v)) -> int8
    (B, Hh, D, N). internals: `acc_exact`, `acc`."""
    fn = "attention_context_narrow"
    kept: dict = {}
    K.attention_context(p, v, multiplier, shift, rounding=rounding, internals=kept)   # checks; the exact acc
    exact = kept["acc"]                                                             # (B, Hh, D, N) int32
    acc = narrow_accumulator(exact, acc_bits, acc_overflow, fn)
    if internals is not None:
        internals["acc_exact"], internals["acc"] = exact, acc
    m, s = np.asarray(_scalar_int(multiplier, fn, "multiplier"), np.int64), np.asarray(_scalar_int(shift, fn, "shift"), np.int64)
    return requantize(acc.astype(np.int64), m, s, out_dtype=np.int8, rounding=rounding)


# ---------------------------------------------------------------------------------------------
# scheme parameters: table sizes and index steps of the table softmax and the table GELU (docs/spec.md Part 6)
# ---------------------------------------------------------------------------------------------

EXP_TABLE_SIZES = tuple(1 << k for k in range(6, 13))         # 64 ... 4096 entries
EXP_INDEX_BITS_RANGE = tuple(range(0, 9))                     # index unit 2^-b of a real score difference
GELU_TABLE_SIZES = tuple(1 << k for k in range(4, 9))         # 16 ... 256 entries over the 256 int8 inputs


def _table_size(table, fn: str, dtypes, sizes) -> int:
    if not isinstance(table, np.ndarray) or table.dtype not in tuple(np.dtype(d) for d in dtypes) or table.ndim != 1:
        raise ValueError(f"{fn}: table must be a 1-D array of dtype {' or '.join(np.dtype(d).name for d in dtypes)}, "
                         f"got {getattr(table, 'dtype', type(table).__name__)} {getattr(table, 'shape', '')}")
    if table.shape[0] not in sizes:
        raise ValueError(f"{fn}: table must have one of {sizes} entries, got {table.shape[0]}")
    return table.shape[0]


def make_exp_table_n(size: int, index_bits: int) -> np.ndarray:
    """Offline: exp_table[i] = round_half_away(2^15 exp(-i / 2^index_bits)), i < size, uint16 (size 256 and 4 bits:
    part 2's make_exp_table)."""
    if size not in EXP_TABLE_SIZES or index_bits not in EXP_INDEX_BITS_RANGE:
        raise ValueError(f"make_exp_table_n: size must be one of {EXP_TABLE_SIZES} and index_bits in [0, 8], "
                         f"got {size}, {index_bits}")
    vals = np.array([K.EXP_ONE * math.exp(-i / (1 << index_bits)) for i in range(size)])
    return saturate(round_half_away_from_zero(vals), np.uint16)


def softmax_table_n(scores, multiplier, shift, exp_table, *, rounding: str = SINGLE_ROUND,
                    internals: dict | None = None) -> np.ndarray:
    """Part 2's softmax with an exp table of L = len(exp_table) entries (64 ... 4096): idx = min(apply_scale(max - s),
    L - 1), e = exp_table[idx], then part 2's output stage -> int8 (..., N) in [0, 127]. internals: index, exp, sum,
    recip."""
    fn = "softmax_table_n"
    size = _table_size(exp_table, fn, (np.uint16,), EXP_TABLE_SIZES)
    _require_range(exp_table, 0, K.EXP_ONE, fn, "exp_table (Q0.15)")
    if int(exp_table[0]) != K.EXP_ONE:
        raise ValueError(f"{fn}: exp_table[0] must be 2^15 (exp(0) in Q0.15), got {int(exp_table[0])}")
    idx = _softmax_differences(scores, multiplier, shift, rounding, size - 1, fn)  # (..., N) in [0, L - 1]
    if internals is not None:
        internals["index"] = idx.astype(np.uint16)
    return _normalize_probabilities(exp_table.astype(np.int64)[idx], internals)   # e <= 2^15, sum < 2^31


def make_gelu_table_n(scale_in: float, scale_out: float, size: int) -> np.ndarray:
    """Offline: entry j of `size` covers the int8 inputs x in [-128 + j step, -128 + (j + 1) step - 1], step =
    256 / size; its value is the GELU at the bucket's midpoint: table[j] = saturate(round_half_away(gelu(x_j
    scale_in) / scale_out)), x_j = -128 + j step + (step - 1) / 2 (size 256: part 2's make_gelu_table)."""
    if size not in GELU_TABLE_SIZES:
        raise ValueError(f"make_gelu_table_n: size must be one of {GELU_TABLE_SIZES}, got {size}")
    step = K.GELU_TABLE_SIZE // size
    xs = [(-128 + j * step + (step - 1) / 2) * float(scale_in) for j in range(size)]
    g = np.array([0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))) for x in xs])
    return saturate(round_half_away_from_zero(g / float(scale_out)), np.int8)


def gelu_table_n(x, table) -> np.ndarray:
    """out = table[(x + 128) >> log2(256 / L)], L = len(table) in 16 ... 256: int8 x (any shape) -> int8."""
    fn = "gelu_table_n"
    _require_array(x, fn, "x", np.int8)
    size = _table_size(table, fn, (np.int8,), GELU_TABLE_SIZES)
    step_bits = (K.GELU_TABLE_SIZE // size).bit_length() - 1
    return table[(x.astype(np.int64) + 128) >> step_bits]
