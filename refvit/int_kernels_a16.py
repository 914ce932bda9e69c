"""Integer kernels of 16-bit activations (the scheme parameter `act_bits: 16`, the scheme `a16w8`): int16
activations everywhere, int8 weights, 16-bit probabilities, int48 accumulators (as TOSA's int16 x int8 CONV2D
and int16 MATMUL) rescaled by TOSA's apply_scale_16 (a 16-bit multiplier, one rounding).

Every kernel here is the Part 2 kernel of the same name with the activation width raised to 16 bits; what
changes is written next to each (widths, bounds, the rescale), the rest is shared code. Same conventions as
`refvit.int_kernels`: dtypes, shapes and ranges checked (ValueError naming the kernel and the argument), int64
at most, every GEMM intmath's exact float-BLAS matmul (float64: every partial sum an integer below 2^47 < 2^53).

Spec: docs/spec.md, Part 7 (one section per kernel, same names as here).
"""
from __future__ import annotations

import numpy as np

from refvit import int_kernels as K
from refvit import int_kernels_variants as KV
from refvit.int_kernels import _conv_gemm, _nchw, _per_channel, _require_array, _require_range, _scalar_int
from refvit.intmath import (ACC48_MAX, MULT16_MAX, SINGLE_ROUND, apply_scale_16, int_matmul_exact, requantize_16,
                            requantize_16_into)

PROB16_ONE = 32767                 # probabilities at scale 1/32767: p in [0, 32767]
MAX_CONV_TERMS_16 = 1 << 16        # Cin*k*k: |sum x*w| <= 2^16 * 2^15 * 127 < 2^38
MAX_HEAD_DIM_16 = 1 << 16          # D: |q . k| <= 2^16 * 2^30 = 2^46 <= 2^47 - 1
MAX_TOKENS_16 = (1 << 16) - 1      # N: sigma < 2^31; |sum_j p v| <= N * 32767 * 2^15 < 2^46


def _rescale16(multiplier, shift, fn: str, channels: int | None = None) -> tuple:
    """The apply_scale_16 constants: 16-bit multipliers in [0, 2^15 - 1], shifts in [2, 62] (scalar or per channel)."""
    if channels is None:
        m, s = _scalar_int(multiplier, fn, "multiplier"), _scalar_int(shift, fn, "shift")
        m, s = np.int64(m), np.int64(s)
    else:
        m, s = _per_channel(multiplier, fn, "multiplier", channels), _per_channel(shift, fn, "shift", channels)
    _require_range(np.asarray(m), 0, MULT16_MAX, fn, "multiplier (16-bit)")
    _require_range(np.asarray(s), 2, 62, fn, "shift")
    return m, s


# ---------------------------------------------------------------------------------------------
# conv2d_a16: int16 x, int8 weights, int64 bias, int48 accumulator, apply_scale_16 per channel
# ---------------------------------------------------------------------------------------------

def conv2d_a16(x, weight, bias, multiplier, shift, *, out_dtype=np.int16, internals: dict | None = None) -> np.ndarray:
    """acc = bias[o] + sum_{c,u,v} x * w (int48); out = requantize_16(acc, multiplier[o], shift[o], out_dtype).

    x int16 (B, Cin, H, W), weight int8 in [-127, 127] (Cout, Cin, k, k), stride k; bias int64 (Cout,) with
    |bias| <= 2^47 - 1 - Cin*k*k * 2^15 * 127; multiplier int16 (Cout,) in [0, 2^15 - 1], shift (Cout,) in [2, 62].
    internals: `acc` (int64 (B, Cout, H/k, W/k))."""
    fn = "conv2d_a16"
    g, shape = _conv_gemm(x, weight, bias, fn, 127, MAX_CONV_TERMS_16, np.int16)   # (Cout, B*Ho*Wo), |g| < 2^38
    m, s = _rescale16(multiplier, shift, fn, shape[1])
    m, s = m.reshape(-1, 1), s.reshape(-1, 1)                                     # (Cout, 1)
    if internals is not None:                                                     # the plain form
        acc = g.astype(np.int64) + bias.astype(np.int64)[:, None]                 # exact: |acc| <= 2^47 - 1
        internals["acc"] = _nchw(acc, shape)
        return _nchw(requantize_16(acc, m, s, out_dtype), shape)
    out = np.empty(g.shape, out_dtype)                                            # (Cout, B*Ho*Wo)
    requantize_16_into(g, bias.astype(np.int64)[:, None] * m, m, s, out)          # fused: |bias*m| < 2^62
    return _nchw(out, shape)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def attention_scores_a16(q, k) -> np.ndarray:
    """s[b, h, i, j] = sum_d q[b, h, d, i] * k[b, h, d, j] -> int64 (B, Hh, N, N) (an int48 value: |s| <= D 2^30)."""
    fn = "attention_scores_a16"
    _require_array(q, fn, "q", np.int16, 4, "(B, Hh, D, N)")
    _require_array(k, fn, "k", np.int16, 4, "(B, Hh, D, N)")
    if q.shape != k.shape:
        raise ValueError(f"{fn}: q {q.shape} and k {k.shape} must have the same shape (B, Hh, D, N)")
    if q.shape[2] > MAX_HEAD_DIM_16:
        raise ValueError(f"{fn}: head dim D = {q.shape[2]} exceeds {MAX_HEAD_DIM_16} (int48 accumulator bound)")
    s = int_matmul_exact(np.swapaxes(q, 2, 3), k)                   # (B, Hh, N, N), float64: exact, |s| <= 2^46
    return s.astype(np.int64)


def softmax_a16(scores, multiplier, shift, exp_table, *, internals: dict | None = None) -> np.ndarray:
    """Softmax over the last axis of int48 scores (int64 (..., N)) -> int16 probabilities in [0, 32767] at 1/32767.

    d = max - s ; idx = min(apply_scale_16(min(d, 2^47 - 1), multiplier, shift), L - 1) ; e = exp_table[idx]
    (L = len(exp_table) in 64 ... 4096, Part 6's tables); then Part 2's output stage with 32767 for 127.
    internals: `index` (uint16), `exp`, `sum`, `recip` (int32)."""
    fn = "softmax_a16"
    _require_array(scores, fn, "scores", np.int64)
    if scores.ndim < 1 or scores.shape[-1] == 0:
        raise ValueError(f"{fn}: scores must have a non-empty last axis (keys), got shape {scores.shape}")
    if scores.shape[-1] > MAX_TOKENS_16:
        raise ValueError(f"{fn}: N = {scores.shape[-1]} keys exceeds {MAX_TOKENS_16} (sum bound)")
    _require_range(scores, -ACC48_MAX, ACC48_MAX, fn, "scores (int48)")
    size = KV._table_size(exp_table, fn, (np.uint16,), KV.EXP_TABLE_SIZES)
    _require_range(exp_table, 0, K.EXP_ONE, fn, "exp_table (Q0.15)")
    if int(exp_table[0]) != K.EXP_ONE:
        raise ValueError(f"{fn}: exp_table[0] must be 2^15 (exp(0) in Q0.15), got {int(exp_table[0])}")
    m, s = _rescale16(multiplier, shift, fn)
    d = scores.max(axis=-1, keepdims=True) - scores                 # (..., N) in [0, 2^48 - 2]
    if d.size and int(d.max()) > ACC48_MAX and int(apply_scale_16(ACC48_MAX, m, s)) < size - 1:
        raise OverflowError(f"{fn}: score difference {int(d.max())} exceeds 2^47 - 1 and the rescale (multiplier "
                            f"{int(m)}, shift {int(s)}) is too small to saturate it at {size - 1}")
    idx = np.minimum(apply_scale_16(np.minimum(d, ACC48_MAX), m, s), size - 1)   # (..., N) in [0, L - 1]
    if internals is not None:
        internals["index"] = idx.astype(np.uint16)
    e = exp_table.astype(np.int64)[idx]                             # (..., N) in [0, 2^15]
    return KV._normalize_probabilities(e, internals, PROB16_ONE, np.int16)


def attention_context_a16(p, v, multiplier, shift, *, internals: dict | None = None) -> np.ndarray:
    """acc[b, h, d, i] = sum_j p[b, h, i, j] * v[b, h, d, j] (int48); out = requantize_16(acc, multiplier, shift)
    -> int16 (B, Hh, D, N). p int16 in [0, 32767] (B, Hh, N, N), v int16 (B, Hh, D, N). internals: `acc` (int64)."""
    fn = "attention_context_a16"
    K.context_args(p, v, np.int16, PROB16_ONE, MAX_TOKENS_16, fn, "int48 accumulator bound",
                   "p (probabilities at scale 1/32767)", v_dtype=np.int16)
    m, s = _rescale16(multiplier, shift, fn)
    acc = np.swapaxes(int_matmul_exact(p, np.swapaxes(v, 2, 3)), 2, 3)          # (B, Hh, D, N), exact, < 2^46
    if internals is not None:
        internals["acc"] = acc.astype(np.int64, order="C")
        return requantize_16(internals["acc"], m, s, np.int16)
    out = np.empty(acc.shape, np.int16)
    requantize_16_into(acc, 0, m, s, out)
    return out


# ---------------------------------------------------------------------------------------------
# layernorm_a16, gelu_a16
# ---------------------------------------------------------------------------------------------

def layernorm_a16(x, eps_int, gamma, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                  internals: dict | None = None) -> np.ndarray:
    """Part 4's layernorm_wide on int16 x (B, C, H, W), C <= 1290, with the output saturated to int16 (the tail's
    acc = t * gamma + bias is int32 and its rescale Part 1's apply_scale, as in Part 2). internals: as layernorm."""
    fn = "layernorm_a16"
    _require_array(x, fn, "x", np.int16, 4, "(B, C, H, W)")
    t = KV.layernorm_wide_normalize(x, eps_int, internals)
    return KV._ln_tail(t, x.shape[1], gamma, bias, multiplier, shift, rounding, fn, internals, np.int16)


def gelu_a16(x, table) -> np.ndarray:
    """out = table[x + 32768]: a 65536-entry lookup, x int16 (any shape), table int16 (65536,)."""
    fn = "gelu_a16"
    _require_array(x, fn, "x", np.int16)
    _require_array(table, fn, "table", np.int16, 1, "(65536,)")
    if table.shape != (1 << 16,):
        raise ValueError(f"{fn}: table must have shape (65536,), got {table.shape}")
    # table[x + 32768] == rolled[x mod 2^16] with rolled = roll(table, 32768): x mod 2^16 is x's uint16 view
    return np.take(np.roll(table, 1 << 15), x.view(np.uint16), mode="clip")   # (indices < 65536: clip is a no-op)


def make_gelu_table16(scale_in: float, scale_out: float) -> np.ndarray:
    """Offline: table[i] = saturate(round_half_away(gelu((i - 32768) * scale_in) / scale_out), int16), i < 65536."""
    return K.gelu_table_of(scale_in, scale_out, np.int16)


__all__ = ["conv2d_a16", "attention_scores_a16", "softmax_a16", "attention_context_a16", "layernorm_a16", "gelu_a16",
           "make_gelu_table16", "PROB16_ONE"]
