"""The kernels of 16-bit activations (`act_bits: 16`, the scheme `a16w8`) written as docs/spec.md, Part 7's
pseudocode: int16 activations, int8 weights, int48 accumulators rescaled by `apply_scale_16`, 16-bit probabilities.

Plain int64 NumPy, as `refvit.reference.kernels`; same signatures, output dtypes, shapes and `internals` as the
fast kernels of `refvit.int_kernels_a16`.
"""
from __future__ import annotations

import numpy as np

from refvit.reference.arith import SINGLE_ROUND, apply_scale_16, requantize_16, require, rounding_shift_right, saturate
from refvit.reference.kernels import (array_arg, context_accumulate, conv2d_accumulate, gelu_lookup, gelu_table_over,
                                     in_range, layernorm_tail, per_channel, scalar_arg)
from refvit.reference.params import EXP_TABLE_SIZES
from refvit.reference.variants import layernorm_wide_normalize

ACC48_MAX = (1 << 47) - 1         # |int48| <= 2^47 - 1
MULT16_MAX = (1 << 15) - 1        # 16-bit multipliers in [0, 2^15 - 1]
MAX_TERMS_16 = 1 << 16            # Cin*k*k of conv2d_a16
MAX_HEAD_DIM_16 = 1 << 16         # D of attention_scores_a16
MAX_TOKENS_16 = (1 << 16) - 1     # N of softmax_a16 and attention_context_a16
PROB16_ONE = 32767                # probabilities at scale 1/32767
EXP_ONE = 1 << 15                 # exp_table[0]: 1.0 in Q0.15
SOFTMAX_RECIP_BITS = 40           # recip = (1 << 40) // sigma


def _rescale16(multiplier, shift, fn: str, channels: int | None = None) -> tuple:
    """The apply_scale_16 constants: multiplier in [0, 2^15 - 1], shift in [2, 62]; scalar, or per channel (1, C, 1, 1)."""
    if channels is None:
        return scalar_arg(multiplier, fn, "multiplier", 0, MULT16_MAX), scalar_arg(shift, fn, "shift", 2, 62)
    m, s = per_channel(multiplier, fn, "multiplier", channels), per_channel(shift, fn, "shift", channels)
    require(in_range(m, 0, MULT16_MAX) and in_range(s, 2, 62), fn, "multiplier must be in [0, 2^15 - 1] and shift "
            "in [2, 62]")
    return m, s


def conv2d_a16(x, weight, bias, multiplier, shift, *, out_dtype=np.int16, internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 7, conv2d_a16 -> out_dtype (B, Cout, H/k, W/k):

    terms = Cin * k * k                                                  # <= 2^16
    acc[b, o, i, j] = bias[o] + sum_{c, u, v} x[b, c, i*k + u, j*k + v] * weight[o, c, u, v]      # int48
    out[b, o, i, j] = requantize_16(acc[b, o, i, j], multiplier[o], shift[o], out_dtype)
    internals: `acc` (int64).
    """
    fn = "conv2d_a16"
    acc = conv2d_accumulate(x, weight, bias, max_terms=MAX_TERMS_16, fn=fn, x_dtype=np.int16)   # int48, in int64
    m, s = _rescale16(multiplier, shift, fn, weight.shape[0])
    if internals is not None:
        internals["acc"] = acc
    return requantize_16(acc, m, s, out_dtype)


def attention_scores_a16(q, k) -> np.ndarray:
    """docs/spec.md, Part 7, attention_scores_a16: s[b, h, i, j] = sum_{d < D} q[b, h, d, i] * k[b, h, d, j] -> int64
    (an int48 value, |s| <= D * 2^30)."""
    fn = "attention_scores_a16"
    array_arg(q, fn, "q", np.int16, 4)
    array_arg(k, fn, "k", np.int16, 4)
    require(q.shape == k.shape, fn, f"q {q.shape} and k {k.shape} must have the same shape (B, Hh, D, N)")
    require(q.shape[2] <= MAX_HEAD_DIM_16, fn, f"head dim D = {q.shape[2]} exceeds {MAX_HEAD_DIM_16}")
    return np.einsum("bhdi,bhdj->bhij", q.astype(np.int64), k.astype(np.int64))   # (B, Hh, N, N)


def softmax_a16(scores, multiplier, shift, exp_table, *, internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 7, softmax_a16, over the last axis -> int16 (..., N) in [0, 32767] (scale 1/32767):

    L     = len(exp_table)                                      # 64, ..., 4096
    m     = max_j s[j] ; d = m - s                              # 0 <= d <= 2^48 - 2
    idx   = min(apply_scale_16(min(d, 2^47 - 1), multiplier, shift), L - 1)
    e     = exp_table[idx]                                      # [0, 2^15]
    sigma = sum_j e ; recip = (1 << 40) // sigma
    p     = saturate(rounding_shift_right(e * 32767 * recip, 40), int16)
    internals: `index` (uint16), `exp`, `sum`, `recip` (int32).
    """
    fn = "softmax_a16"
    array_arg(scores, fn, "scores", np.int64)
    require(scores.ndim >= 1 and 1 <= scores.shape[-1] <= MAX_TOKENS_16, fn,
            f"scores must have a last axis of 1 .. {MAX_TOKENS_16} keys, got shape {scores.shape}")
    require(in_range(scores, -ACC48_MAX, ACC48_MAX), fn, "scores must be int48: |s| <= 2^47 - 1")
    array_arg(exp_table, fn, "exp_table", np.uint16, 1)
    L = exp_table.shape[0]
    require(L in EXP_TABLE_SIZES and in_range(exp_table, 0, EXP_ONE) and int(exp_table[0]) == EXP_ONE, fn,
            f"exp_table must have one of {EXP_TABLE_SIZES} entries in [0, 2^15], exp_table[0] = 2^15")
    m, sh = _rescale16(multiplier, shift, fn)
    s = scores
    d = s.max(axis=-1, keepdims=True) - s                                  # (..., N)
    big = int(apply_scale_16(ACC48_MAX, m, sh))
    require(not (big < L - 1 and d.max() > ACC48_MAX), fn, "a score difference beyond 2^47 - 1 that the rescale "
            "does not saturate at L - 1", OverflowError)
    idx = np.minimum(apply_scale_16(np.minimum(d, ACC48_MAX), m, sh), L - 1)   # (..., N) in [0, L - 1]
    e = exp_table.astype(np.int64)[idx]                                   # (..., N)
    sigma = e.sum(axis=-1, keepdims=True)                                 # (..., 1), [2^15, N 2^15]
    recip = (1 << SOFTMAX_RECIP_BITS) // sigma                            # (..., 1)
    p = saturate(rounding_shift_right(e * PROB16_ONE * recip, SOFTMAX_RECIP_BITS), np.int16)   # [0, 32767]
    if internals is not None:
        internals.update({"index": idx.astype(np.uint16), "exp": e.astype(np.int32), "sum": sigma.astype(np.int32),
                          "recip": recip.astype(np.int32)})
    return p


def attention_context_a16(p, v, multiplier, shift, *, internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 7, attention_context_a16 -> int16 (B, Hh, D, N):

    acc[b, h, d, i] = sum_{j < N} p[b, h, i, j] * v[b, h, d, j]          # int48: |acc| <= N * 32767 * 2^15
    out = requantize_16(acc, multiplier, shift, int16)
    internals: `acc` (int64).
    """
    fn = "attention_context_a16"
    acc = context_accumulate(p, v, np.int16, PROB16_ONE, MAX_TOKENS_16, fn)   # (B, Hh, D, N), |acc| < 2^46
    m, s = _rescale16(multiplier, shift, fn)
    if internals is not None:
        internals["acc"] = acc
    return requantize_16(acc, m, s, np.int16)


def layernorm_a16(x, eps_int, gamma, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                  internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 7, layernorm_a16: Part 4's layernorm_wide on int16 x, the output saturated to int16:

    t   = layernorm_wide_normalize(x, eps_int)                  # int16 x, C <= 1290
    acc = t * gamma[c] + bias[c]                                # int32, Part 2's tail
    out = requantize(acc, multiplier[c], shift[c], int16, rounding)
    """
    array_arg(x, "layernorm_a16", "x", np.int16, 4)
    t = layernorm_wide_normalize(x, eps_int, internals)
    return layernorm_tail(t, gamma, bias, multiplier, shift, rounding, internals, "layernorm_a16", np.int16)


def make_gelu_table16(scale_in: float, scale_out: float) -> np.ndarray:
    """docs/spec.md, Part 7, gelu_a16, "Table (offline)": for i = 0 .. 65535, x_i = (i - 32768) * scale_in (float64),
    table[i] = saturate(round_half_away(0.5 * x_i * (1 + erf(x_i / sqrt(2))) / scale_out), int16)."""
    return gelu_table_over(scale_in, scale_out, np.int16, "make_gelu_table16")


def gelu_a16(x, table) -> np.ndarray:
    """docs/spec.md, Part 7, gelu_a16: out = table[x + 32768] (int16, the shape of x)."""
    return gelu_lookup(x, table, np.int16, "gelu_a16")
