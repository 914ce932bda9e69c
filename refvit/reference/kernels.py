"""The integer kernels of the INT8 DeiT written as docs/spec.md, Part 2's pseudocode (and Part 3's data movement).

Plain int64 NumPy: every sum of products is an int64 `np.einsum` over the spec's indices, every rescale is
`arith.apply_scale`, every clamp `arith.saturate`. Same signatures, output dtypes and shapes and `internals`
as the fast kernels of `refvit.int_kernels`; the argument checks are the spec's argument tables.
"""
from __future__ import annotations

import math

import numpy as np

from refvit.reference.arith import (
    INT32_MAX, INT64_MAX, INT64_MIN, SINGLE_ROUND, apply_scale, int64, isqrt, requantize, require, round_half_away, rounding_shift_right,
    saturate,
)

# Part 2, "Limits", and the fixed widths of its kernels
MAX_CONV_TERMS = 1 << 16          # Cin*k*k
MAX_HEAD_DIM = 1 << 16            # D
MAX_TOKENS = (1 << 16) - 1        # N
MAX_LN_CHANNELS = 4096            # C of layernorm (int8 input)
MAX_LN_EPS_INT = 1 << 61
EXP_ONE = 1 << 15                 # exp_table[0]: 1.0 in Q0.15
SOFTMAX_RECIP_BITS = 40           # recip = (1 << 40) // sigma
PROB_ONE = 127                    # probabilities at scale 1/127
LN_RECIP_BITS = 40                # inv = (1 << 40) // r
LN_T_SHIFT = 24                   # t = rounding_shift_right(d * inv, 24)
LN_T_MAX = 1 << 16                # |t| <= 2^16


# ---------------------------------------------------------------------------------------------
# argument checks (Part 2, "Conventions": exact dtypes, no silent casts)
# ---------------------------------------------------------------------------------------------

def array_arg(x, fn: str, name: str, dtypes, ndim: int | None = None) -> np.ndarray:
    """x must be an ndarray of one of `dtypes` (and `ndim` dims if given)."""
    dtypes = tuple(np.dtype(d) for d in np.atleast_1d(dtypes))
    require(isinstance(x, np.ndarray) and x.dtype in dtypes, fn,
            f"{name} must be a numpy array of dtype {' or '.join(map(str, dtypes))}, got {getattr(x, 'dtype', x)!r}")
    require(ndim is None or x.ndim == ndim, fn, f"{name} must have {ndim} dims, got shape {x.shape}")
    return x


def scalar_arg(v, fn: str, name: str, lo: int, hi: int) -> int:
    """A scalar integer constant in [lo, hi] as a Python int."""
    arr = np.asarray(v)
    require(arr.ndim == 0 and arr.dtype.kind in "iu" and not isinstance(v, (bool, np.bool_)), fn,
            f"{name} must be a scalar integer, got {v!r}")
    require(lo <= int(arr) <= hi, fn, f"{name} must be in [{lo}, {hi}], got {int(arr)}")
    return int(arr)


def per_channel(v, fn: str, name: str, channels: int) -> np.ndarray:
    """A per-channel integer constant (C,) as int64 (1, C, 1, 1), which broadcasts along axis 1."""
    v = int64(v, fn, name)
    require(v.shape == (channels,), fn, f"{name} must have shape ({channels},), got {v.shape}")
    return v.reshape(1, channels, 1, 1)


def in_range(x: np.ndarray, lo: int, hi: int) -> bool:
    return x.size == 0 or (int(x.min()) >= lo and int(x.max()) <= hi)


# ---------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------

ACCUMULATORS = {np.dtype(np.int8): (np.int32, INT32_MAX),           # x dtype -> (bias and acc dtype, |acc| bound)
                np.dtype(np.int16): (np.int64, (1 << 47) - 1)}     # Part 7: an int48 accumulator, held in int64


def conv2d_accumulate(x, weight, bias, *, weight_max: int = 127, max_terms: int = MAX_CONV_TERMS,
                      fn: str = "conv2d", x_dtype=np.int8) -> np.ndarray:
    """docs/spec.md, Part 2, conv2d_accumulate (Part 4, conv2d_w4, passes weight_max 7 and max_terms 2^20; Part 7,
    conv2d_a16, int16 x with an int64 bias into an int48 accumulator):

    terms = Cin * k * k
    acc[b, o, i, j] = bias[o] + sum_{c < Cin, u < k, v < k} x[b, c, i*k + u, j*k + v] * weight[o, c, u, v]
    -> int32 (B, Cout, H/k, W/k) (int16 x: int64)
    """
    acc_dtype, acc_max = ACCUMULATORS[np.dtype(x_dtype)]
    array_arg(x, fn, "x", x_dtype, 4)
    array_arg(weight, fn, "weight", np.int8, 4)
    array_arg(bias, fn, "bias", acc_dtype, 1)
    B, Cin, H, W = x.shape
    Cout, wcin, k, k2 = weight.shape
    require(k == k2 and k >= 1 and wcin == Cin and H % k == 0 and W % k == 0, fn,
            f"weight {weight.shape} must be (Cout, Cin, k, k) for x {x.shape} with H, W multiples of k")
    require(bias.shape == (Cout,), fn, f"bias must have shape ({Cout},), got {bias.shape}")
    terms = Cin * k * k
    require(terms <= max_terms, fn, f"Cin*k*k = {terms} exceeds {max_terms} (accumulator bound)")
    require(in_range(weight, -weight_max, weight_max), fn, f"weight must be in [-{weight_max}, {weight_max}]")
    headroom = acc_max - terms * -int(np.iinfo(x_dtype).min) * weight_max  # |x| <= 128 (int8) or 2^15 (int16)
    require(in_range(bias, -headroom, headroom), fn, f"bias must satisfy |bias| <= {headroom} (accumulator headroom)")
    xs = x.astype(np.int64).reshape(B, Cin, H // k, k, W // k, k)         # xs[b, c, i, u, j, v] = x[b, c, i*k+u, j*k+v]
    acc = np.einsum("bciujv,ocuv->boij", xs, weight.astype(np.int64))     # (B, Cout, H/k, W/k), exact int64
    acc = acc + bias.astype(np.int64).reshape(1, Cout, 1, 1)              # |acc| <= acc_max (headroom)
    return acc.astype(acc_dtype)


def conv2d(x, weight, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND, out_dtype=np.int8,
           internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 2, conv2d:

    acc = conv2d_accumulate(x, weight, bias)                                           # int32
    out[b, o, i, j] = requantize(acc[b, o, i, j], multiplier[o], shift[o], out_dtype, rounding)
    internals: `acc`.
    """
    acc = conv2d_accumulate(x, weight, bias)
    return conv_requantize(acc, multiplier, shift, rounding, out_dtype, internals, "conv2d")


def conv_requantize(acc, multiplier, shift, rounding, out_dtype, internals, fn) -> np.ndarray:
    """conv2d's second line, shared by the weight variants: per output channel o, requantize(acc, m[o], s[o])."""
    cout = acc.shape[1]
    m, s = per_channel(multiplier, fn, "multiplier", cout), per_channel(shift, fn, "shift", cout)
    if internals is not None:
        internals["acc"] = acc                                            # int32 (B, Cout, Ho, Wo)
    return requantize(acc, m, s, out_dtype, rounding)                     # (B, Cout, Ho, Wo)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def attention_scores(q, k) -> np.ndarray:
    """docs/spec.md, Part 2, attention_scores: s[b, h, i, j] = sum_{d < D} q[b, h, d, i] * k[b, h, d, j] -> int32."""
    fn = "attention_scores"
    array_arg(q, fn, "q", np.int8, 4)
    array_arg(k, fn, "k", np.int8, 4)
    require(q.shape == k.shape, fn, f"q {q.shape} and k {k.shape} must have the same shape (B, Hh, D, N)")
    require(q.shape[2] <= MAX_HEAD_DIM, fn, f"head dim D = {q.shape[2]} exceeds {MAX_HEAD_DIM}")
    s = np.einsum("bhdi,bhdj->bhij", q.astype(np.int64), k.astype(np.int64))   # (B, Hh, N, N), |s| <= D * 2^14
    return s.astype(np.int32)


def make_exp_table() -> np.ndarray:
    """docs/spec.md, Part 2, softmax, "Constants (offline)":
    exp_table[i] = round_half_away(2^15 * exp(-i / 16)), i = 0 .. 255, uint16."""
    return saturate(np.array([round_half_away(EXP_ONE * math.exp(-i / 16)) for i in range(256)]), np.uint16)


def softmax_output(e: np.ndarray) -> tuple:
    """docs/spec.md, Part 2, softmax, its last three lines (shared with Part 4's softmax variants), per row:

    sigma = sum_j e ; recip = (1 << 40) // sigma ; p = saturate(rounding_shift_right(e * 127 * recip, 40), int8)
    -> (p, sigma, recip)
    """
    sigma = e.sum(axis=-1, keepdims=True)                              # (..., 1), < 2^31
    recip = (1 << SOFTMAX_RECIP_BITS) // sigma                         # (..., 1)
    p = saturate(rounding_shift_right(e * PROB_ONE * recip, SOFTMAX_RECIP_BITS), np.int8)   # (..., N), [0, 127]
    return p, sigma, recip


def check_scores(scores, fn: str) -> np.ndarray:
    """scores: int32 (..., N), 1 <= N <= 65535 -> int64."""
    array_arg(scores, fn, "scores", np.int32)
    require(scores.ndim >= 1 and 1 <= scores.shape[-1] <= MAX_TOKENS, fn,
            f"scores must have a last axis of 1 .. {MAX_TOKENS} keys, got shape {scores.shape}")
    return scores.astype(np.int64)


def softmax(scores, multiplier, shift, exp_table, *, rounding: str = SINGLE_ROUND,
            internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 2, softmax, over the last axis -> int8 (..., N) in [0, 127]:

    m     = max_j s[j]
    d     = m - s                                               # 0 <= d <= 2^31 - 1, else OverflowError
    idx   = saturate(apply_scale(d, multiplier, shift, rounding), uint8)
    e     = exp_table[idx]
    sigma = sum_j e ; recip = (1 << 40) // sigma
    p     = saturate(rounding_shift_right(e * 127 * recip, 40), int8)
    internals: `index`, `exp` (uint16), `sum`, `recip` (int32 (..., 1)).
    """
    fn = "softmax"
    s = check_scores(scores, fn)
    array_arg(exp_table, fn, "exp_table", (np.uint16, np.int32), 1)
    require(exp_table.shape == (256,) and in_range(exp_table, 0, EXP_ONE) and int(exp_table[0]) == EXP_ONE, fn,
            "exp_table must be (256,) in [0, 2^15] with exp_table[0] = 2^15")
    multiplier = scalar_arg(multiplier, fn, "multiplier", INT64_MIN, INT64_MAX)   # ranges: apply_scale's checks,
    shift = scalar_arg(shift, fn, "shift", INT64_MIN, INT64_MAX)                  # after the OverflowError below
    m = s.max(axis=-1, keepdims=True)                                  # (..., 1)
    d = m - s                                                          # (..., N)
    require(d <= INT32_MAX, fn, "score difference max - s does not fit int32", OverflowError)   # before apply_scale's
    idx = saturate(apply_scale(d, multiplier, shift, rounding), np.uint8)   # (..., N); apply_scale checks its domain
    e = exp_table.astype(np.int64)[idx]                                # (..., N), [0, 2^15]
    p, sigma, recip = softmax_output(e)
    if internals is not None:
        internals.update({"index": idx, "exp": e.astype(np.uint16), "sum": sigma.astype(np.int32),
                          "recip": recip.astype(np.int32)})
    return p


def context_accumulate(p, v, dtype, p_max: int, max_tokens: int, fn: str) -> np.ndarray:
    """acc[b, h, d, i] = sum_{j < N} p[b, h, i, j] * v[b, h, d, j] -> int64, p (B, Hh, N, N) in [0, p_max] and v
    (B, Hh, D, N) both of dtype (int8: Part 2; int16: Part 7's attention_context_a16), N <= max_tokens."""
    array_arg(p, fn, "p", dtype, 4)
    array_arg(v, fn, "v", dtype, 4)
    B, Hh, D, N = v.shape
    require(p.shape == (B, Hh, N, N), fn, f"p must have shape {(B, Hh, N, N)} to match v {v.shape}, got {p.shape}")
    require(N <= max_tokens, fn, f"N = {N} exceeds {max_tokens}")
    require(in_range(p, 0, p_max), fn, f"p must be in [0, {p_max}] (probabilities at scale 1/{p_max})")
    return np.einsum("bhij,bhdj->bhdi", p.astype(np.int64), v.astype(np.int64))   # (B, Hh, D, N)


def attention_context(p, v, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                      internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 2, attention_context -> int8 (B, Hh, D, N):

    acc[b, h, d, i] = sum_{j < N} p[b, h, i, j] * v[b, h, d, j]
    out = requantize(acc, multiplier, shift, int8, rounding)
    internals: `acc` (int32 (B, Hh, D, N)).
    """
    fn = "attention_context"
    acc = context_accumulate(p, v, np.int8, PROB_ONE, MAX_TOKENS, fn)    # (B, Hh, D, N), |acc| < 2^30
    multiplier, shift = scalar_arg(multiplier, fn, "multiplier", 0, INT32_MAX), scalar_arg(shift, fn, "shift", 2, 62)
    if internals is not None:
        internals["acc"] = acc.astype(np.int32)
    return requantize(acc, multiplier, shift, np.int8, rounding)


# ---------------------------------------------------------------------------------------------
# add
# ---------------------------------------------------------------------------------------------

def add_arith(a, b, multiplier_a, multiplier_b, shift, out_dtype, fn: str, dtypes, out_dtypes) -> np.ndarray:
    """docs/spec.md, Part 2, add (and Part 4, add_wide, with int16 operands):

    acc = a * multiplier_a + b * multiplier_b          # int64
    out = saturate(rounding_shift_right(acc, shift), out_dtype)
    """
    array_arg(a, fn, "a", dtypes)
    array_arg(b, fn, "b", dtypes)
    require(np.dtype(out_dtype) in tuple(np.dtype(d) for d in out_dtypes), fn, f"out_dtype {out_dtype} not allowed")
    try:
        fits = np.broadcast_shapes(a.shape, b.shape) == a.shape
    except ValueError:
        fits = False
    require(fits, fn, f"b {b.shape} must broadcast to the shape of a {a.shape}")
    ma = scalar_arg(multiplier_a, fn, "multiplier_a", 0, INT32_MAX)
    mb = scalar_arg(multiplier_b, fn, "multiplier_b", 0, INT32_MAX)
    shift = scalar_arg(shift, fn, "shift", 0, 62)
    acc = a.astype(np.int64) * ma + b.astype(np.int64) * mb             # shape of a, |acc| < 2^47
    return saturate(rounding_shift_right(acc, shift), out_dtype)


def add(a, b, multiplier_a, multiplier_b, shift, *, out_dtype=np.int8) -> np.ndarray:
    """docs/spec.md, Part 2, add: saturate(rounding_shift_right(a*multiplier_a + b*multiplier_b, shift)), int8 a, b."""
    return add_arith(a, b, multiplier_a, multiplier_b, shift, out_dtype, "add", np.int8,
                     (np.int8, np.int16, np.int32, np.uint8, np.uint16, np.int64))


# ---------------------------------------------------------------------------------------------
# layernorm
# ---------------------------------------------------------------------------------------------

def layernorm_normalize(x, eps_int, internals: dict | None = None, *, fn: str = "layernorm",
                        max_channels=None) -> np.ndarray:
    """docs/spec.md, Part 2, layernorm_normalize (Part 4, layernorm_wide_normalize, also on int16 input),
    per position over channels (axis 1) -> int32 (B, C, H, W):

    total = sum_c x[c]
    d     = C * x - total
    q     = sum_c d[c]^2 + eps_int
    r     = isqrt(q)
    inv   = (1 << 40) // r
    t     = rounding_shift_right(d * inv, 24)
    internals: `sum`, `sumsq` (q - eps_int), `root`, `recip` (B, 1, H, W); `d`, `t` (B, C, H, W).
    """
    max_channels = max_channels or {np.dtype(np.int8): MAX_LN_CHANNELS}
    array_arg(x, fn, "x", tuple(max_channels), 4)
    C = x.shape[1]
    require(1 <= C <= max_channels[x.dtype], fn, f"C = {C} must be in [1, {max_channels[x.dtype]}] for {x.dtype}")
    eps_int = scalar_arg(eps_int, fn, "eps_int", 1, MAX_LN_EPS_INT)
    x = x.astype(np.int64)
    total = x.sum(axis=1, keepdims=True)                               # (B, 1, H, W)
    d = C * x - total                                                  # (B, C, H, W)
    q = (d * d).sum(axis=1, keepdims=True) + eps_int                   # (B, 1, H, W), 1 <= q < 2^62
    r = isqrt(q)                                                       # (B, 1, H, W), |d| <= r
    inv = (1 << LN_RECIP_BITS) // r                                    # (B, 1, H, W)
    t = rounding_shift_right(d * inv, LN_T_SHIFT)                      # (B, C, H, W), |t| <= 2^16
    if internals is not None:
        internals.update({"sum": total.astype(np.int32), "d": d.astype(np.int32), "sumsq": q - eps_int,
                          "root": r.astype(np.int32), "recip": inv, "t": t.astype(np.int32)})
    return t.astype(np.int32)


def layernorm_tail(t, gamma, bias, multiplier, shift, rounding, internals, fn, out_dtype=np.int8) -> np.ndarray:
    """docs/spec.md, Part 2, layernorm, its last two lines (shared with Part 4's LayerNorms):

    acc = t * gamma[c] + bias[c]
    out = requantize(acc, multiplier[c], shift[c], int8, rounding)
    internals: `acc`.
    """
    C = t.shape[1]
    array_arg(gamma, fn, "gamma", np.int8, 1)
    array_arg(bias, fn, "bias", np.int32, 1)
    require(gamma.shape == (C,) and bias.shape == (C,), fn, f"gamma and bias must have shape ({C},)")
    require(in_range(gamma, -127, 127), fn, "gamma must be in [-127, 127]")
    headroom = INT32_MAX - LN_T_MAX * 127
    require(in_range(bias, -headroom, headroom), fn, f"bias must satisfy |bias| <= {headroom}")
    m, s = per_channel(multiplier, fn, "multiplier", C), per_channel(shift, fn, "shift", C)
    acc = t.astype(np.int64) * per_channel(gamma, fn, "gamma", C) + per_channel(bias, fn, "bias", C)  # (B, C, H, W)
    if internals is not None:
        internals["acc"] = acc.astype(np.int32)
    return requantize(acc, m, s, out_dtype, rounding)                   # int8 (Part 7's layernorm_a16: int16)


def layernorm(x, eps_int, gamma, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND,
              internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 2, layernorm -> int8 (B, C, H, W):

    t   = layernorm_normalize(x, eps_int)
    acc = t * gamma[c] + bias[c]
    out = requantize(acc, multiplier[c], shift[c], int8, rounding)
    """
    t = layernorm_normalize(x, eps_int, internals)
    return layernorm_tail(t, gamma, bias, multiplier, shift, rounding, internals, "layernorm")


# ---------------------------------------------------------------------------------------------
# gelu
# ---------------------------------------------------------------------------------------------

def make_gelu_table(scale_in: float, scale_out: float) -> np.ndarray:
    """docs/spec.md, Part 2, gelu, "Table (offline)": for i = 0 .. 255, x_i = (i - 128) * scale_in (float64),
    table[i] = saturate(round_half_away(0.5 * x_i * (1 + erf(x_i / sqrt(2))) / scale_out), int8)."""
    return gelu_table_over(scale_in, scale_out, np.int8, "make_gelu_table")


def gelu_table_over(scale_in: float, scale_out: float, dtype, fn: str) -> np.ndarray:
    """The GELU table over every code of an integer dtype (int8: Part 2; int16: Part 7's make_gelu_table16):
    for i = 0 .. 2^bits - 1, x_i = (i + min) * scale_in, table[i] = saturate(round_half_away(gelu(x_i) / scale_out))."""
    for name, v in (("scale_in", scale_in), ("scale_out", scale_out)):
        require(math.isfinite(v) and v > 0, fn, f"{name} must be finite and > 0, got {v!r}")
    lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
    values = []
    for i in range(hi - lo + 1):
        x_i = (i + lo) * float(scale_in)
        values.append(round_half_away(0.5 * x_i * (1.0 + math.erf(x_i / math.sqrt(2.0))) / float(scale_out)))
    return saturate(np.array(values), dtype)


def gelu(x, table) -> np.ndarray:
    """docs/spec.md, Part 2, gelu: out = table[x + 128] (int8, the shape of x)."""
    return gelu_lookup(x, table, np.int8, "gelu")


def gelu_lookup(x, table, dtype, fn: str) -> np.ndarray:
    """out = table[x - min] for x of dtype and a table over every code of it (int8: Part 2's gelu; int16: gelu_a16)."""
    lo, n = int(np.iinfo(dtype).min), 1 << (8 * np.dtype(dtype).itemsize)
    array_arg(x, fn, "x", dtype)
    array_arg(table, fn, "table", dtype, 1)
    require(table.shape == (n,), fn, f"table must have shape ({n},), got {table.shape}")
    return table[int64(x, fn, "x") - lo]


# ---------------------------------------------------------------------------------------------
# data movement: concat_tokens (Part 2), split_qkv and gather_prefix (Part 3)
# ---------------------------------------------------------------------------------------------

def concat_tokens(prefix, patches) -> np.ndarray:
    """docs/spec.md, Part 2, concat_tokens: [prefix | patches] along tokens -> (B, C, 1, P + Np), int8 (Part 7:
    both int16); prefix (1, C, 1, P) is the same for every image."""
    fn = "concat_tokens"
    array_arg(patches, fn, "patches", (np.int8, np.int16), 4)
    array_arg(prefix, fn, "prefix", patches.dtype, 4)
    B, C, one, Np = patches.shape
    P = prefix.shape[3]
    require(prefix.shape[:3] == (1, C, 1) and one == 1, fn, f"prefix {prefix.shape} must be (1, C, 1, P) and "
            f"patches {patches.shape} (B, C, 1, Np)")
    out = np.empty((B, C, 1, P + Np), patches.dtype)
    out[:, :, :, :P] = prefix                                          # every image gets the prefix tokens
    out[:, :, :, P:] = patches
    return out


def split_qkv(qkv, *, part: int, num_heads: int) -> np.ndarray:
    """docs/spec.md, Part 3, split_heads (split_qkv): (B, 3C, 1, N) -> (B, Hh, D, N), D = C / num_heads:

    out[b, h, d, n] = qkv[b, part*C + h*D + d, 0, n]        # part 0: q, 1: k, 2: v
    """
    fn = "split_qkv"
    require(isinstance(qkv, np.ndarray) and qkv.ndim == 4 and qkv.shape[2] == 1 and qkv.shape[1] % 3 == 0, fn,
            f"qkv must be a (B, 3C, 1, N) array, got {getattr(qkv, 'shape', qkv)!r}")
    B, C3, _, N = qkv.shape
    C = C3 // 3
    Hh = scalar_arg(num_heads, fn, "num_heads", 1, max(C, 1))
    part = scalar_arg(part, fn, "part", 0, 2)
    require(C % Hh == 0, fn, f"num_heads {Hh} must divide C = {C}")
    D = C // Hh
    out = np.empty((B, Hh, D, N), qkv.dtype)
    for h in range(Hh):
        for d in range(D):
            out[:, h, d, :] = qkv[:, part * C + h * D + d, 0, :]
    return out


def gather_prefix(x, *, num_prefix: int) -> np.ndarray:
    """docs/spec.md, Part 3, gather_prefix: (B, C, 1, N) -> (B, P*C, 1, 1), P = num_prefix:

    out[b, t*C + c, 0, 0] = x[b, c, 0, t]        for t in [0, P), c in [0, C)
    """
    fn = "gather_prefix"
    require(isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[2] == 1, fn, "x must be a (B, C, 1, N) array")
    B, C, _, N = x.shape
    P = scalar_arg(num_prefix, fn, "num_prefix", 1, N)
    out = np.empty((B, P * C, 1, 1), x.dtype)
    for t in range(P):
        for c in range(C):
            out[:, t * C + c, 0, 0] = x[:, c, 0, t]
    return out
