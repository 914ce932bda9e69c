"""Integer kernels of the INT8 DeiT in conv form (NCHW; token tensors are (B, C, 1, N)).

Every runtime kernel is a pure function of integer arrays and integer constants: it checks the
dtypes, shapes and ranges of its inputs (ValueError naming the argument), computes in int64 at most,
checks the accumulator bounds stated in the spec (the checks are on the constants wherever the bound
can be proved for every input), and saturates only through intmath's clamp (saturate / requantize).
All rescaling is intmath's apply_scale arithmetic and every GEMM intmath's exact float-BLAS matmul.
The only float operations on values are the boundary `quantize_input` / `dequantize` and the offline
table / constant builders (`make_exp_table`, `make_gelu_table`, `layernorm_eps_int`); elsewhere floats
only ever hold integers they represent exactly (GEMM results, proofs in the spec).

For speed the kernels fuse their integer steps (GEMM output -> bias -> rescale -> saturate) and run
them over cache-sized blocks in place; each fused form is the spec's pseudocode rewritten by exact
integer identities, stated in a comment where it is used and tested equal to the plain form.

Spec: docs/spec.md, Part 2 (one section per kernel, same names as here).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from refvit import parallel
from refvit.intmath import (
    BLOCK, SINGLE_ROUND, _check_scale_args, _clip_store, _expand, _sub, _round_shift, _rounding_terms, _scale_float_into,
    _scale_into, apply_scale, copy_into, float_scale_exact, for_blocks, int_matmul_exact, int_range, isqrt, requantize,
    round_half_away_from_zero, saturate, scale_factor,
)

INT32_MAX = (1 << 31) - 1
SYM_PRODUCT_MAX = 128 * 127       # max |x*w| for int8 x and symmetric int8 w in [-127, 127]

MAX_CONV_TERMS = 1 << 16          # Cin*k*k: |sum x*w| <= 2^16 * 128*127 < 2^30
MAX_HEAD_DIM = 1 << 16            # D: |q.k| <= 2^16 * 2^14 = 2^30
MAX_TOKENS = (1 << 16) - 1        # N: softmax sum < 2^31, context acc <= N*127*128 < 2^31
MAX_LN_CHANNELS = 4096            # C: sum_c d^2 <= C^3 * 255^2 / 4 < 2^50
MAX_LN_EPS_INT = 1 << 61          # q = sum d^2 + eps_int < 2^62 (isqrt domain)

EXP_INDEX_BITS = 4                # softmax table index unit: 1/16 of a real score difference
EXP_TABLE_SIZE = 256              # idx = min(., 255): "the uint8 difference"
EXP_ONE = 1 << 15                 # exp_table entries are Q0.15, exp_table[0] = 1.0
SOFTMAX_RECIP_BITS = 40           # recip = floor(2^40 / sigma): 1/sigma_real in Q0.25
PROB_ONE = 127                    # softmax output scale 1/127
LN_RECIP_BITS = 40                # inv = floor(2^40 / r)
LN_T_SHIFT = 24                   # t = round(d * inv / 2^24) = round(2^16 * d / r)
LN_T_BITS = LN_RECIP_BITS - LN_T_SHIFT   # 16: |t| <= 2^16
GELU_TABLE_SIZE = 256


# ---------------------------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------------------------

def _require_array(x, fn: str, name: str, dtype, ndim: int | None = None, layout: str = "") -> np.ndarray:
    """x must be an ndarray of exactly `dtype` (no silent casts) and, if given, `ndim` dims."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{fn}: {name} must be a numpy array of dtype {np.dtype(dtype)}, got {type(x).__name__}")
    if x.dtype != np.dtype(dtype):
        raise ValueError(f"{fn}: {name} must have dtype {np.dtype(dtype)}, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dims {layout}, got shape {x.shape}")
    return x


_DTYPE_RANGES: dict = {}


def _dtype_range(dt: np.dtype) -> tuple:
    """(min, max) of an integer dtype; +-infinity for any other (every bound is then scanned)."""
    if dt not in _DTYPE_RANGES:
        info = np.iinfo(dt) if dt.kind in "iu" else None
        _DTYPE_RANGES[dt] = (int(info.min), int(info.max)) if info else (-math.inf, math.inf)
    return _DTYPE_RANGES[dt]


def _require_range(x: np.ndarray, lo: int, hi: int, fn: str, name: str) -> None:
    """lo <= x <= hi everywhere (inclusive). A bound that x's integer dtype already implies is not scanned."""
    if not x.size:
        return
    dlo, dhi = _dtype_range(x.dtype)
    if (dlo < lo and int(x.min()) < lo) or (dhi > hi and int(x.max()) > hi):
        raise ValueError(f"{fn}: {name} must be in [{lo}, {hi}], got values in [{int(x.min())}, {int(x.max())}]")


def _per_channel(v, fn: str, name: str, channels: int) -> np.ndarray:
    """A per-channel integer constant: 1-D of length C -> int64 (1, C, 1, 1) for NCHW broadcasting."""
    v = np.asarray(v)
    if v.dtype.kind not in "iu":
        raise ValueError(f"{fn}: {name} must be an integer array, got dtype {v.dtype}")
    if v.shape != (channels,):
        raise ValueError(f"{fn}: {name} must have shape ({channels},) (one per channel), got {v.shape}")
    return v.astype(np.int64).reshape(1, channels, 1, 1)


def _scalar_int(v, fn: str, name: str) -> int:
    """A scalar integer constant (python int, numpy integer, or 0-d integer array)."""
    arr = np.asarray(v)
    if isinstance(v, (bool, np.bool_)) or arr.dtype.kind not in "iu" or arr.ndim != 0:
        raise ValueError(f"{fn}: {name} must be a scalar integer, got {v!r}")
    return int(arr)


def _require_bias_headroom(bias: np.ndarray, max_abs_sum: int, fn: str, acc_max: int = INT32_MAX,
                           acc: str = "int32") -> None:
    """|sum| <= max_abs_sum for every input, so acc = sum + bias fits the accumulator (|acc| <= acc_max: int32, or
    int48 for Part 7's 16-bit activations) iff |bias| <= acc_max - max_abs_sum."""
    limit = acc_max - max_abs_sum
    _require_range(bias, -limit, limit, fn, f"bias (so that |acc| <= {max_abs_sum} + |bias| fits {acc})")


# ---------------------------------------------------------------------------------------------
# layout helpers (pure reshapes)
# ---------------------------------------------------------------------------------------------

def split_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """(B, C, 1, N) -> (B, Hh, D, N) with channel c = h*D + d (timm's qkv head order)."""
    fn = "split_heads"
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[2] != 1:
        raise ValueError(f"{fn}: x must be a (B, C, 1, N) array, got {getattr(x, 'shape', type(x).__name__)}")
    b, c, _, n = x.shape
    num_heads = _scalar_int(num_heads, fn, "num_heads")
    if num_heads <= 0 or c % num_heads:
        raise ValueError(f"{fn}: num_heads {num_heads} must be positive and divide C = {c}")
    return x.reshape(b, num_heads, c // num_heads, n)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, Hh, D, N) -> (B, Hh*D, 1, N), the inverse of split_heads."""
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise ValueError(f"merge_heads: x must be a (B, Hh, D, N) array, got {getattr(x, 'shape', type(x).__name__)}")
    b, h, d, n = x.shape
    return x.reshape(b, h * d, 1, n)


def concat_tokens(prefix: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """[prefix | patches] along tokens: prefix (1, C, 1, P) broadcast over B, patches (B, C, 1, Np); both int8, or
    both int16 (Part 7's 16-bit activations)."""
    fn = "concat_tokens"
    dtype = patches.dtype if isinstance(patches, np.ndarray) and patches.dtype == np.int16 else np.int8
    _require_array(prefix, fn, "prefix", dtype, 4, "(1, C, 1, P)")
    _require_array(patches, fn, "patches", dtype, 4, "(B, C, 1, Np)")
    if prefix.shape[0] != 1 or prefix.shape[2] != 1:
        raise ValueError(f"{fn}: prefix must have shape (1, C, 1, P), got {prefix.shape}")
    b, c, h, _ = patches.shape
    if h != 1 or c != prefix.shape[1]:
        raise ValueError(f"{fn}: patches must have shape (B, {prefix.shape[1]}, 1, Np), got {patches.shape}")
    prefix_b = np.broadcast_to(prefix, (b,) + prefix.shape[1:])   # (B, C, 1, P)
    return np.concatenate([prefix_b, patches], axis=3)            # (B, C, 1, P + Np)


# ---------------------------------------------------------------------------------------------
# boundary: the only float ops of the integer model
# ---------------------------------------------------------------------------------------------

def _require_scale(scale, fn: str) -> np.ndarray:
    s = np.asarray(scale, dtype=np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise ValueError(f"{fn}: scale must be finite and > 0, got {scale!r}")
    return s


def quantize_input(x, scale, dtype=np.int8) -> np.ndarray:
    """Model boundary (like TFLite QUANTIZE): saturate(round_half_away(x / scale), dtype), x / scale in float64.

    scale is a positive float (or an array broadcasting against x, e.g. per channel (1, C, 1, 1)); dtype int8, or
    int16 for 16-bit activations (Part 7).
    """
    fn = "quantize_input"
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"{fn}: x must be a float array, got dtype {x.dtype}")
    ratio = x.astype(np.float64) / _require_scale(scale, fn)   # one IEEE-754 division: correctly rounded
    if np.isnan(ratio).any():
        raise ValueError(f"{fn}: x must not contain NaN (+-inf saturate)")
    ratio = np.clip(ratio, -2.0 ** 62, 2.0 ** 62)              # keeps +-inf / huge values in int64; saturate decides
    return saturate(round_half_away_from_zero(ratio), dtype)


def dequantize(q, scale) -> np.ndarray:
    """The real value q * scale as float64 (reporting only; scale scalar or broadcasting against q)."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu":
        raise ValueError(f"dequantize: q must be an integer array, got dtype {q.dtype}")
    return q.astype(np.float64) * _require_scale(scale, "dequantize")


# ---------------------------------------------------------------------------------------------
# convolution (every Linear as a 1x1 conv, and the patch embedding)
# ---------------------------------------------------------------------------------------------

_ACCUMULATORS = {np.dtype(np.int8): (np.int32, INT32_MAX, "int32"),      # x dtype -> (bias dtype, |acc| bound, name)
                 np.dtype(np.int16): (np.int64, (1 << 47) - 1, "int48")}  # Part 7: int16 x int8 in an int48 acc


def _conv_gemm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, fn: str = "conv2d", weight_max: int = 127,
               max_terms: int = MAX_CONV_TERMS, x_dtype=np.int8):
    """Checks of conv2d_accumulate, then sum_{c,u,v} x*w as an exact GEMM result (Cout, B*Ho*Wo) without bias.

    Weights in [-weight_max, weight_max] (127 for int8 codes; conv2d_w4 passes 7), Cin*k*k <= max_terms with
    max_terms * 128 * weight_max < 2^30. Returns (g, (B, Cout, Ho, Wo)); g is float32 or float64 holding the
    exact integers (|g| <= terms * 128 * weight_max < 2^30). x_dtype int16 (Part 7, conv2d_a16): int64 bias,
    |g| <= terms * 2^15 * 127 < 2^38 (float64, exact), acc = g + bias within int48.
    """
    bias_dtype, acc_max, acc_name = _ACCUMULATORS[np.dtype(x_dtype)]
    x_max = -int_range(x_dtype)[0]                                # 128 or 2^15
    _require_array(x, fn, "x", x_dtype, 4, "(B, Cin, H, W)")
    _require_array(weight, fn, "weight", np.int8, 4, "(Cout, Cin, k, k)")
    _require_array(bias, fn, "bias", bias_dtype, 1, "(Cout,)")
    b, cin, h, w = x.shape
    cout, wcin, k, k2 = weight.shape
    if k != k2 or k == 0:
        raise ValueError(f"{fn}: weight must be square (Cout, Cin, k, k) with k >= 1, got {weight.shape}")
    if wcin != cin:
        raise ValueError(f"{fn}: weight has Cin = {wcin} but x has {cin} channels")
    if h % k or w % k:
        raise ValueError(f"{fn}: x spatial size {h}x{w} is not a multiple of the kernel/stride {k}")
    if bias.shape != (cout,):
        raise ValueError(f"{fn}: bias must have shape ({cout},), got {bias.shape}")
    codes = "symmetric int8" if weight_max == 127 else f"{weight_max.bit_length() + 1}-bit codes"
    _require_range(weight, -weight_max, weight_max, fn, f"weight ({codes})")
    terms = cin * k * k
    if terms > max_terms:
        raise ValueError(f"{fn}: Cin*k*k = {terms} exceeds {max_terms} (accumulator bound)")
    _require_bias_headroom(bias, terms * x_max * weight_max, fn, acc_max, acc_name)
    ho, wo = h // k, w // k
    # One GEMM over all images and positions (batched small GEMMs are ~5x slower in numpy).
    cols = (x.reshape(b, cin, ho, k, wo, k)
             .transpose(1, 3, 5, 0, 2, 4)
             .reshape(terms, b * ho * wo))                        # (Cin*k*k, B*Ho*Wo), (c, u, v) order
    g = int_matmul_exact(weight.reshape(cout, terms), cols)       # (Cout, B*Ho*Wo), |.| <= terms*x_max*127
    return g, (b, cout, ho, wo)


def _nchw(out2d: np.ndarray, shape) -> np.ndarray:
    """(Cout, B*Ho*Wo) -> (B, Cout, Ho, Wo), C-contiguous (a copy only when B > 1)."""
    b, cout, ho, wo = shape
    return np.ascontiguousarray(out2d.reshape(cout, b, ho, wo).transpose(1, 0, 2, 3))


def conv2d_accumulate(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """acc[b, o, i, j] = bias[o] + sum_{c, u, v} x[b, c, i*k + u, j*k + v] * weight[o, c, u, v] -> int32.

    stride == kernel size k, no padding; H and W must be multiples of k.
    """
    g, shape = _conv_gemm(x, weight, bias)
    acc = np.empty(g.shape, np.int32)
    np.copyto(acc, g, casting="unsafe")                           # exact: integers, |g| < 2^30
    acc += bias[:, None]                                          # int32: fits by the bias headroom check
    return _nchw(acc, shape)


def conv2d(x, weight, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND, out_dtype=np.int8,
           internals: dict | None = None) -> np.ndarray:
    """requantize(conv2d_accumulate(x, weight, bias)) per output channel -> out_dtype (B, Cout, H/k, W/k).

    Fused: with g = the GEMM sum and acc = g + bias, acc*m + rnd = g*m + (bias*m + rnd), so per output
    channel one multiply and one add of a constant give the apply_scale numerator (all in int64: |g*m| < 2^61,
    |bias*m| < 2^62, |acc*m + rnd| < 2^62 + 2^61 + 2^30). DOUBLE_ROUND adds bias*m first: its rounding
    term depends on the sign of acc*m.
    internals: a dict receives `acc` (int32 (B, Cout, H/k, W/k)); the plain form then runs (same output).
    """
    return conv_requantize(*_conv_gemm(x, weight, bias), bias, multiplier, shift, rounding=rounding,
                           out_dtype=out_dtype, internals=internals)


def conv_requantize(g, shape, bias, multiplier, shift, *, rounding: str, out_dtype, internals=None,
                    fn: str = "conv2d") -> np.ndarray:
    """The requantization of a conv's GEMM sum g (Cout, B*Ho*Wo) plus bias, per output channel (conv2d's
    second half, shared with the weight variants) -> out_dtype (B, Cout, Ho, Wo)."""
    cout = shape[1]
    m, s = _per_channel(multiplier, fn, "multiplier", cout), _per_channel(shift, fn, "shift", cout)
    m, s = m.reshape(cout, 1), s.reshape(cout, 1)
    acc_shape = (cout, 1)                                         # value domain: acc is int32 (headroom check)
    _check_scale_args(np.zeros(acc_shape, np.int32), m, s, rounding, "apply_scale")
    lo, hi = int_range(out_dtype)
    if int(s.min()) <= 31 or internals is not None:  # shift <= 31: value < 2^(shift-1) is checked on the acc
        acc = np.empty(g.shape, np.int32)                         # (Cout, B*Ho*Wo)
        np.copyto(acc, g, casting="unsafe")
        acc += bias[:, None]
        if internals is not None:
            internals["acc"] = _nchw(acc, shape)                  # (B, Cout, Ho, Wo)
        return _nchw(requantize(acc, m, s, out_dtype=out_dtype, rounding=rounding), shape)
    out = np.empty(g.shape, out_dtype)
    if float_scale_exact(s, rounding, lo, hi, out_dtype):         # SINGLE_ROUND, 32 <= s <= 45 (int8): float64
        _scale_float_into(g, scale_factor(m, s), lo, hi, out, addend=bias.astype(np.float64).reshape(cout, 1))
        return _nchw(out, shape)                                  # acc = g + bias: |acc| < 2^31 (headroom check)
    rnd, corr = _rounding_terms(s, rounding)
    bias_m = bias.astype(np.int64).reshape(cout, 1) * m           # |bias*m| < 2^62
    add1, add2 = (bias_m + rnd, None) if corr is None else (bias_m, rnd)

    def block(idx):
        o = out[idx]
        t = parallel.scratch("conv_requantize", o.size, np.int64).reshape(o.shape)
        np.copyto(t, g[idx], casting="unsafe")                    # exact: integer-valued float, |g| < 2^30
        np.multiply(t, _sub(m, idx), out=t)                       # g*m
        np.add(t, _sub(add1, idx), out=t)                         # SINGLE: + bias*m + rnd; DOUBLE: + bias*m
        if corr is None:
            np.right_shift(t, _sub(s, idx), out=t)
            _clip_store(t, lo, hi, o)
        else:
            _round_shift(t, _sub(add2, idx), _sub(corr, idx), _sub(s, idx), o, lo, hi)
    if out.size:
        for_blocks(g.shape, block)
    return _nchw(out, shape)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def _check_heads(q: np.ndarray, k: np.ndarray, fn: str, qname: str, kname: str) -> None:
    _require_array(q, fn, qname, np.int8, 4, "(B, Hh, D, N)")
    _require_array(k, fn, kname, np.int8, 4, "(B, Hh, D, N)")
    if q.shape != k.shape:
        raise ValueError(f"{fn}: {qname} {q.shape} and {kname} {k.shape} must have the same shape (B, Hh, D, N)")


def attention_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """s[b, h, i, j] = sum_d q[b, h, d, i] * k[b, h, d, j] -> int32 (B, Hh, N, N); |s| <= D * 2^14."""
    fn = "attention_scores"
    _check_heads(q, k, fn, "q", "k")
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dim D = {q.shape[2]} exceeds {MAX_HEAD_DIM} (accumulator bound)")
    s = int_matmul_exact(np.swapaxes(q, 2, 3), k)                   # (B, Hh, N, D) @ (B, Hh, D, N)
    out = np.empty(s.shape, np.int32)
    copy_into(out, s)                                               # exact integers, |s| <= 2^30
    return out


def make_exp_table() -> np.ndarray:
    """Offline: exp_table[i] = round_half_away(2^15 * exp(-i/16)), i = 0..255, uint16 (exp_table[0] = 2^15)."""
    vals = np.array([EXP_ONE * math.exp(-i / (1 << EXP_INDEX_BITS)) for i in range(EXP_TABLE_SIZE)])
    return saturate(round_half_away_from_zero(vals), np.uint16)


SOFTMAX_LUT_MAX = 1 << 19         # longest score-difference -> e table (uint16 entries: 1 MiB)


@lru_cache(maxsize=16)
def _softmax_lut(multiplier: int, shift: int, rounding: str, table: bytes, table_dtype: str):
    """(T, exact): T[d] = exp_table[saturate(apply_scale(d, multiplier, shift, rounding), uint8)] for
    0 <= d < len(T), uint16, read-only; `exact` says that T[min(d, len(T) - 1)] is that value for EVERY valid d.

    The index idx(d) = min(apply_scale(d), 255) is non-decreasing in d (multiplier >= 0, both modes) and
    d ranges over [0, last], last = min(2^31, 2^(shift-1)) - 1 (apply_scale's domain). So with c = the
    first d where idx reaches idx(last) (binary search), every d >= c has idx(d) = idx(c): the table
    ends at c when c <= SOFTMAX_LUT_MAX (exact); otherwise it covers 0..SOFTMAX_LUT_MAX and is used only
    when every d of the call is inside it. Built by the reference functions themselves, so T is
    bit-identical to them by construction.
    """
    exp_table = np.frombuffer(table, dtype=np.dtype(table_dtype)).astype(np.int32)
    last = min(INT32_MAX, (1 << (shift - 1)) - 1)                 # largest d inside apply_scale's domain

    def index(d):
        return int(saturate(apply_scale(np.int64(d), multiplier, shift, rounding), np.uint8))

    top, lo, hi = index(last), 0, last
    while lo < hi:                                                # first d with idx(d) == idx(last)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if index(mid) >= top else (mid + 1, hi)
    end, exact = lo, True
    if end > SOFTMAX_LUT_MAX:
        end, exact = SOFTMAX_LUT_MAX, False
    idx = saturate(apply_scale(np.arange(end + 1, dtype=np.int64), multiplier, shift, rounding), np.uint8)
    lut = exp_table[idx].astype(np.uint16)                        # entries in [0, 2^15] (checked): exact
    lut.flags.writeable = False
    return lut, exact


def softmax(scores, multiplier, shift, exp_table, *, rounding: str = SINGLE_ROUND,
            internals: dict | None = None) -> np.ndarray:
    """Integer softmax over the last axis: int32 scores (..., N) -> int8 probabilities in [0, 127] (scale 1/127).

    (multiplier, shift) maps a score difference to units of 1/16 (scale_scores * 16 = multiplier * 2^-shift).
    internals: a dict receives `index` (uint8) and `exp` (uint16), shaped as scores, and `sum` and `recip`
    (int32 (..., 1)); idx is then computed step by step rather than through the d -> e table (same values).
    """
    fn = "softmax"
    _require_array(scores, fn, "scores", np.int32)
    if scores.ndim < 1 or scores.shape[-1] == 0:
        raise ValueError(f"{fn}: scores must have a non-empty last axis (keys), got shape {scores.shape}")
    n = scores.shape[-1]
    if n > MAX_TOKENS:
        raise ValueError(f"{fn}: N = {n} keys exceeds {MAX_TOKENS} (sum bound)")
    if not isinstance(exp_table, np.ndarray) or exp_table.dtype not in (np.dtype(np.uint16), np.dtype(np.int32)):
        got = getattr(exp_table, "dtype", type(exp_table).__name__)
        raise ValueError(f"{fn}: exp_table must be a uint16 or int32 array, got {got}")
    if exp_table.shape != (EXP_TABLE_SIZE,):
        raise ValueError(f"{fn}: exp_table must have shape ({EXP_TABLE_SIZE},), got {exp_table.shape}")
    _require_range(exp_table, 0, EXP_ONE, fn, "exp_table (Q0.15)")
    if int(exp_table[0]) != EXP_ONE:
        raise ValueError(f"{fn}: exp_table[0] must be 2^15 = {EXP_ONE} (exp(0) in Q0.15), got {int(exp_table[0])}")
    multiplier, shift = _scalar_int(multiplier, fn, "multiplier"), _scalar_int(shift, fn, "shift")

    s = scores.reshape(-1, n)                                     # (rows, N), a view when possible
    top, low = np.empty((s.shape[0], 1), np.int32), np.empty((s.shape[0], 1), np.int32)   # (rows, 1)
    row_blocks = parallel.ranges(s.shape[0], n, BLOCK)            # row blocks on the threads
    parallel.run(lambda r: (np.max(s[r[0]:r[1]], axis=-1, keepdims=True, out=top[r[0]:r[1]]),
                            np.min(s[r[0]:r[1]], axis=-1, keepdims=True, out=low[r[0]:r[1]])), row_blocks)
    dmax = int((top.astype(np.int64) - low).max()) if s.size else 0
    if dmax > INT32_MAX:                                          # d = max - s, 0 <= d <= dmax per row
        raise OverflowError(f"{fn}: score difference max - s = {dmax} does not fit int32")
    # apply_scale's preconditions on d: d ranges over [0, dmax] (0 at each row's max), and the value
    # test is monotone in d, so checking 0 and dmax is checking every d
    _check_scale_args(np.array([0, dmax], np.int32), multiplier, shift, rounding, "apply_scale")
    out = np.empty(scores.shape, np.int8)
    if s.size == 0:
        return out
    o2 = out.reshape(-1, n)
    lut, exact = _softmax_lut(multiplier, shift, rounding, exp_table.tobytes(), exp_table.dtype.str)
    if not (exact or dmax < len(lut)) or internals is not None:
        lut = None
    kept = None if internals is None else {"index": np.empty(s.shape, np.uint8), "exp": np.empty(s.shape, np.uint16),
                                           "sum": np.empty((s.shape[0], 1), np.int32),
                                           "recip": np.empty((s.shape[0], 1), np.int32)}   # (rows, N), (rows, 1)
    table16 = exp_table.astype(np.uint16)                         # [0, 2^15]: exact
    ones = np.ones(n)                                             # sigma = e @ ones, a float64 GEMV

    def block(r):
        r0, r1 = r
        d = parallel.scratch("softmax_d", (r1 - r0) * n, np.int32).reshape(r1 - r0, n)   # d = top - s in [0, dmax],
        e = parallel.scratch("softmax_e", (r1 - r0) * n, np.uint16).reshape(r1 - r0, n)  # dmax < 2^31 (checked)
        w = parallel.scratch("softmax_w", (r1 - r0) * n, np.float64).reshape(r1 - r0, n)
        np.subtract(top[r0:r1], s[r0:r1], out=d)                  # exact in int32: 0 <= d <= dmax <= 2^31 - 1
        if lut is not None:                                       # e = exp_table[min(apply_scale(d), 255)]:
            np.take(lut, d, out=e, mode="clip")                   # T[min(d, len(T) - 1)] (d >= 0)
        else:
            idx = np.empty(d.shape, np.uint8) if kept is None else kept["index"][r0:r1]
            _scale_into(d, np.int64(multiplier), np.int64(shift), rounding, idx, 0, 255)
            np.take(table16, idx, out=e, mode="clip")             # (indices < 256: clip is a no-op)
        np.copyto(w, e)                                           # exact: integers <= 2^15
        sigma = (w @ ones).astype(np.int64)[:, None]              # in [2^15, N * 2^15]: every partial sum an
        recip = (1 << SOFTMAX_RECIP_BITS) // sigma                # integer < 2^31, exact in float64 (spec)
        if kept is not None:                                      # e <= 2^15, sigma < 2^31, recip <= 2^25
            kept["exp"][r0:r1], kept["sum"][r0:r1], kept["recip"][r0:r1] = e, sigma, recip
        # p = rounding_shift_right(e * 127 * recip, 40) = floor(e * (127 * recip * 2^-40) + 1/2), in float64:
        # 127*recip < 2^32 and e*127*recip < 2^47 are exact products, the 2^-40 scaling is exact, and the sum
        # (< 128, lowest bit >= 2^-40: 48 bits) is exact; the cast to int8 truncates = floors a positive value.
        w *= (PROB_ONE * recip).astype(np.float64) * 2.0 ** -SOFTMAX_RECIP_BITS
        np.add(w, 0.5, out=w)
        np.copyto(o2[r0:r1], w, casting="unsafe")                 # 0 <= p <= 127: the int8 saturate never clamps
    parallel.run(block, row_blocks)
    if kept is not None:                                          # index, exp (..., N); sum, recip (..., 1)
        internals.update({k: v.reshape(scores.shape[:-1] + (v.shape[1],)) for k, v in kept.items()})
    return out


def context_args(p, v, p_dtype, p_max: int, max_tokens: int, fn: str, bound: str, what: str,
                 v_dtype=np.int8) -> tuple:
    """The checks of a context kernel: p (B, Hh, N, N) of p_dtype in [0, p_max], v (B, Hh, D, N) of v_dtype that
    agree, N <= max_tokens (`bound` says why) -> (B, Hh, D, N)."""
    _require_array(p, fn, "p", p_dtype, 4, "(B, Hh, N, N)")
    _require_array(v, fn, "v", v_dtype, 4, "(B, Hh, D, N)")
    b, h, d, n = v.shape
    if p.shape != (b, h, n, n):
        raise ValueError(f"{fn}: p must have shape (B, Hh, N, N) = {(b, h, n, n)} to match v {v.shape}, got {p.shape}")
    if n > max_tokens:
        raise ValueError(f"{fn}: N = {n} exceeds {max_tokens} ({bound})")
    _require_range(p, 0, p_max, fn, what)
    return b, h, d, n


def attention_context(p, v, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                      internals: dict | None = None) -> np.ndarray:
    """acc[b, h, d, i] = sum_j p[b, h, i, j] * v[b, h, d, j]; requantize (scalar constants) -> int8 (B, Hh, D, N).

    internals: a dict receives `acc` (int32 (B, Hh, D, N))."""
    fn = "attention_context"
    b, h, d, n = context_args(p, v, np.int8, PROB_ONE, MAX_TOKENS, fn, "accumulator bound",
                              "p (probabilities at scale 1/127)")
    multiplier, shift = _scalar_int(multiplier, fn, "multiplier"), _scalar_int(shift, fn, "shift")
    # acc^T = p @ v^T (B, Hh, N, D), viewed back as (B, Hh, D, N): p is then read in its own order
    acc = np.swapaxes(int_matmul_exact(p, np.swapaxes(v, 2, 3)), 2, 3)   # (B, Hh, D, N), |.| <= N*127*128
    if internals is not None:
        internals["acc"] = acc.astype(np.int32, order="C")         # (B, Hh, D, N), exact: |acc| < 2^30
    m, s = np.asarray(multiplier, np.int64), np.asarray(shift, np.int64)
    _check_scale_args(np.zeros(1, np.int32), m, s, rounding, "apply_scale")
    if shift <= 31:  # value < 2^(shift-1) is a real precondition here: check it on the actual acc
        return requantize(acc.astype(np.int64), m, s, out_dtype=np.int8, rounding=rounding)
    out = np.empty(acc.shape, np.int8)
    _scale_into(acc, m, s, rounding, out, -128, 127)              # requantize, fused: acc converted exactly
    return out


# ---------------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------------

def require_broadcast(a: np.ndarray, b: np.ndarray, fn: str) -> None:
    """b must broadcast to exactly a's shape (the second operand of an add)."""
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        shape = None
    if shape != a.shape:
        raise ValueError(f"{fn}: b {b.shape} must broadcast to the shape of a {a.shape}")


def _add_direct(a: np.ndarray, b: np.ndarray, ma: int, mb: int, shift: int, out_dtype) -> np.ndarray:
    """The spec's arithmetic of `add`, block by block in int64, on two 1-D int8 arrays of one length (the
    table builder's; `add` itself gathers from that table)."""
    lo, hi = int_range(out_dtype)
    half = (1 << shift - 1) if shift else 0                       # rounding_shift_right(acc, shift)
    out = np.empty(a.shape, out_dtype)
    ma64, mb64 = np.int64(ma), np.int64(mb)

    def block(idx):
        o = out[idx]
        t, u = (parallel.scratch(key, o.size, np.int64) for key in ("add_t", "add_u"))
        np.multiply(a[idx], ma64, out=t)                          # acc = a*ma + b*mb, |acc| < 2^39
        np.multiply(b[idx], mb64, out=u)
        np.add(t, u, out=t)
        np.add(t, half, out=t)                                    # + 2^(shift-1) <= 2^61: stays in int64
        np.right_shift(t, shift, out=t)
        _clip_store(t, lo, hi, o)           # saturate
    for_blocks(a.shape, block)
    return out


@lru_cache(maxsize=64)
def _add_lut(ma: int, mb: int, shift: int, out_dtype: str) -> np.ndarray:
    """T[256 * ua + ub] = add's value for the int8 pair whose bit patterns are (ua, ub), read-only.

    Made by _add_direct itself on all 65536 pairs, so gathering from it is bit-identical to the
    arithmetic by construction; per element a gather costs ~2x less than six int64 passes."""
    codes = np.arange(256, dtype=np.uint8).view(np.int8)          # the int8 value of each bit pattern
    lut = _add_direct(np.repeat(codes, 256), np.tile(codes, 256), ma, mb, shift, np.dtype(out_dtype))
    lut.flags.writeable = False
    return lut


def add(a, b, multiplier_a, multiplier_b, shift, *, out_dtype=np.int8) -> np.ndarray:
    """saturate(rounding_shift_right(a*multiplier_a + b*multiplier_b, shift)); b broadcasts to a's shape."""
    fn = "add"
    _require_array(a, fn, "a", np.int8)
    _require_array(b, fn, "b", np.int8)
    require_broadcast(a, b, fn)
    ma, mb = _scalar_int(multiplier_a, fn, "multiplier_a"), _scalar_int(multiplier_b, fn, "multiplier_b")
    shift = _scalar_int(shift, fn, "shift")
    for name, m in (("multiplier_a", ma), ("multiplier_b", mb)):
        if not 0 <= m <= INT32_MAX:
            raise ValueError(f"{fn}: {name} must be in [0, 2^31 - 1], got {m}")
    if not 0 <= shift <= 62:
        raise ValueError(f"{fn}: shift must be in [0, 62], got {shift}")
    int_range(out_dtype)                                          # an integer dtype
    out = np.empty(a.shape, out_dtype)
    if out.size:                                                  # out = T[256 * ua + ub], (ua, ub) the bit patterns
        a1, b1 = (a, b) if a.ndim else (a.reshape(1), b.reshape(1))
        b1 = _expand(b1, a1.ndim)
        o1 = out.reshape(a1.shape)
        lut = _add_lut(ma, mb, shift, np.dtype(out_dtype).str)

        def block(i):
            o = o1[i]
            idx = parallel.scratch("add_idx", o.size, np.uint16).reshape(o.shape)
            np.left_shift(a1[i].view(np.uint8), 8, out=idx, dtype=np.uint16)
            np.bitwise_or(idx, _sub(b1, i).view(np.uint8), out=idx)   # b broadcasts
            np.take(lut, idx, out=o, mode="clip")                     # (uint16 indices < 65536: a no-op)
        for_blocks(a1.shape, block)
    return out if out.ndim else out[()]


def make_gelu_table(scale_in: float, scale_out: float) -> np.ndarray:
    """Offline: table[i] = saturate(round_half_away(gelu((i - 128) * scale_in) / scale_out)), int8 (256,).

    gelu is the exact-erf GELU 0.5 * x * (1 + erf(x / sqrt(2))) in float64 (math.erf).
    """
    return gelu_table_of(scale_in, scale_out, np.int8)


def gelu_table_of(scale_in: float, scale_out: float, dtype) -> np.ndarray:
    """Offline: the GELU table over every code x of an integer dtype (int8: 256 entries, int16: 65536; Part 7),
    table[x - min] = saturate(round_half_away(gelu(x * scale_in) / scale_out), dtype), x ascending."""
    for name, s in (("scale_in", scale_in), ("scale_out", scale_out)):
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"make_gelu_table: {name} must be finite and > 0, got {s!r}")
    lo, hi = int_range(dtype)
    xs = [x * float(scale_in) for x in range(lo, hi + 1)]
    g = np.array([0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))) for x in xs])
    return saturate(round_half_away_from_zero(g / float(scale_out)), dtype)


def gelu(x, table) -> np.ndarray:
    """out = table[x + 128]: a 256-entry lookup, x int8 (any shape), table int8 (256,)."""
    fn = "gelu"
    _require_array(x, fn, "x", np.int8)
    _require_array(table, fn, "table", np.int8, 1, "(256,)")
    if table.shape != (GELU_TABLE_SIZE,):
        raise ValueError(f"{fn}: table must have shape ({GELU_TABLE_SIZE},), got {table.shape}")
    # table[x + 128] == rolled[x mod 256] with rolled = roll(table, 128): x mod 256 is x's uint8 view
    rolled, u = np.roll(table, 128), x.view(np.uint8)
    if not x.ndim or not x.flags.c_contiguous:
        return np.take(rolled, u, mode="clip")                    # (uint8 indices < 256: clip is a no-op)
    out = np.empty(x.shape, np.int8)
    for_blocks(x.shape, lambda i: np.take(rolled, u[i], out=out[i], mode="clip"))
    return out


# ---------------------------------------------------------------------------------------------
# layer norm over channels
# ---------------------------------------------------------------------------------------------

def eps_image(eps: float, channels: int, scale_x: float, max_channels: int, fn: str) -> float:
    """Offline: eps * C^3 / scale_x^2 in float64 (eps in units of sum_c d^2), its arguments checked."""
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be finite and >= 0, got {eps!r}")
    if not (math.isfinite(scale_x) and scale_x > 0):
        raise ValueError(f"{fn}: scale_x must be finite and > 0, got {scale_x!r}")
    if not (isinstance(channels, (int, np.integer)) and 1 <= channels <= max_channels):
        raise ValueError(f"{fn}: channels must be an integer in [1, {max_channels}], got {channels!r}")
    return eps * float(channels) ** 3 / (float(scale_x) * float(scale_x))


def layernorm_eps_int(eps: float, channels: int, scale_x: float) -> int:
    """Offline: the integer image of eps in units of sum_c d^2, max(1, round_half_away(eps * C^3 / scale_x^2)).

    var + eps = scale_x^2 / C^3 * (sum_c d^2 + eps * C^3 / scale_x^2), with d = C*x - sum_c x.
    """
    fn = "layernorm_eps_int"
    image = eps_image(eps, channels, scale_x, MAX_LN_CHANNELS, fn)
    if not image <= MAX_LN_EPS_INT:
        raise ValueError(f"{fn}: eps * C^3 / scale_x^2 = {image!r} exceeds {MAX_LN_EPS_INT}")
    return max(1, int(round_half_away_from_zero(np.float64(image))))


def _layernorm_args(x, eps_int):
    fn = "layernorm"
    _require_array(x, fn, "x", np.int8, 4, "(B, C, H, W)")
    c = x.shape[1]
    if not 1 <= c <= MAX_LN_CHANNELS:
        raise ValueError(f"{fn}: C = {c} channels must be in [1, {MAX_LN_CHANNELS}] (accumulator bound)")
    eps_int = _scalar_int(eps_int, fn, "eps_int")
    if not 1 <= eps_int <= MAX_LN_EPS_INT:
        raise ValueError(f"{fn}: eps_int must be in [1, 2^61], got {eps_int}")
    return c, eps_int


def _layernorm_rows(x: np.ndarray, c: int, eps_int: int, internals: dict | None = None):
    """Per position (B, 1, H, W) int64: (C*inv, 2^23 - total*inv), so that d*inv + 2^23 = x*(C*inv) + (2^23 - total*inv).

    total = sum_c x (int32: |.| <= 128*C <= 2^19), S2 = sum_c x^2 (int32: <= 2^14*C <= 2^26), and
    q = sum_c d^2 + eps_int = C^2*S2 - C*total^2 + eps_int: sum_c (C*x - total)^2 = C^2*S2 - 2*C*total*total
    + C*total^2. In int64 on these small arrays: C^2*S2 <= 2^50, C*total^2 <= 2^50.
    """
    total = x.sum(axis=1, keepdims=True, dtype=np.int32).astype(np.int64)               # (B, 1, H, W)
    s2 = np.square(x, dtype=np.int16).sum(axis=1, keepdims=True, dtype=np.int32).astype(np.int64)
    q = c * c * s2 - c * total * total + eps_int                  # = sum_c d^2 + eps_int, 1 <= q < 2^62
    r = isqrt(q)                                                  # >= 1; |d| <= r since d^2 <= q < (r+1)^2
    inv = (1 << LN_RECIP_BITS) // r                               # (B, 1, H, W) in [2^9, 2^40]
    if internals is not None:                                     # the spec's names, each (B, 1, H, W)
        internals.update({"sum": total.astype(np.int32), "sumsq": q - eps_int, "root": r.astype(np.int32),
                          "recip": inv})                          # |total| <= 2^19, r < 2^31
    return c * inv, (1 << (LN_T_SHIFT - 1)) - total * inv         # |C*inv| <= 2^52, |total*inv| <= 2^59


def _layernorm_coefs(x: np.ndarray, c: int, eps_int: int):
    """_layernorm_rows of every position, computed on blocks of positions (every channel of each) on the threads."""
    bsz, _, h, w = x.shape
    a, b = np.empty((bsz, 1, h, w), np.int64), np.empty((bsz, 1, h, w), np.int64)   # (B, 1, H, W)

    def block(pos):
        i, (w0, w1) = pos
        a[i:i + 1, ..., w0:w1], b[i:i + 1, ..., w0:w1] = _layernorm_rows(x[i:i + 1, ..., w0:w1], c, eps_int)
    parallel.run(block, [(i, r) for i in range(bsz) for r in parallel.ranges(w, c * h, BLOCK)])
    return a, b


def _layernorm_t(t: np.ndarray, xb: np.ndarray, ab: np.ndarray, bb: np.ndarray) -> None:
    """t = rounding_shift_right(d*inv, 24) = (x*(C*inv) + (2^23 - total*inv)) >> 24, in place (int64)."""
    np.multiply(xb, ab, out=t)                                    # |x*C*inv| <= 128 * 2^52 = 2^59
    np.add(t, bb, out=t)                                          # = d*inv + 2^23, |.| <= 2^40 + 2^23
    np.right_shift(t, LN_T_SHIFT, out=t)                          # |t| <= 2^16


def layernorm_normalize(x, eps_int, internals: dict | None = None) -> np.ndarray:
    """t = round(2^16 * d / isqrt(sum_c d^2 + eps_int)), d = C*x - sum_c x, over channels of int8 (B, C, H, W) -> int32.

    The normalized value is z = (x - mean) / sqrt(var + eps) = sqrt(C) * t * 2^-16; |t| <= 2^16.
    internals: a dict receives `sum`, `sumsq` (sum_c d^2), `root`, `recip` (B, 1, H, W) and `d`, `t` (B, C, H, W).
    """
    c, eps_int = _layernorm_args(x, eps_int)
    a, b = _layernorm_rows(x, c, eps_int, internals) if internals is not None else _layernorm_coefs(x, c, eps_int)
    out = np.empty(x.shape, np.int32)

    def block(idx):
        o = out[idx]
        t = parallel.scratch("layernorm_t", o.size, np.int64).reshape(o.shape)
        _layernorm_t(t, x[idx], _sub(a, idx), _sub(b, idx))
        np.copyto(o, t, casting="unsafe")                         # |t| <= 2^16: exact in int32
    if out.size:
        for_blocks(x.shape, block)
    if internals is not None:                                     # d = C*x - total, |d| < 2^20
        internals.update({"d": c * x.astype(np.int32) - internals["sum"], "t": out})
    return out


def layernorm(x, eps_int, gamma, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND,
              internals: dict | None = None) -> np.ndarray:
    """Integer LayerNorm over channels (axis 1) of int8 (B, C, H, W), then gamma/beta as a depthwise 1x1 conv.

    t = layernorm_normalize(x, eps_int); acc = t * gamma[c] + bias[c]; out = requantize per channel -> int8.
    Fused per block: acc*m + rnd = t*(gamma*m) + (bias*m + rnd) (|t*gamma*m| <= 2^16 * 127 * 2^31 < 2^54,
    |bias*m| < 2^62, and |acc*m + rnd| < 2^63 as in apply_scale): t is never stored.
    internals: a dict receives layernorm_normalize's and `acc` (int32 (B, C, H, W)); the plain form then runs.
    """
    fn = "layernorm"
    c, eps_int = _layernorm_args(x, eps_int)
    _require_array(gamma, fn, "gamma", np.int8, 1, f"({c},)")
    _require_array(bias, fn, "bias", np.int32, 1, f"({c},)")
    if gamma.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"{fn}: gamma {gamma.shape} and bias {bias.shape} must have shape ({c},)")
    _require_range(gamma, -127, 127, fn, "gamma (symmetric int8)")
    _require_bias_headroom(bias, (1 << LN_T_BITS) * 127, fn)
    m, s = _per_channel(multiplier, fn, "multiplier", c), _per_channel(shift, fn, "shift", c)
    g64, b64 = gamma.astype(np.int64).reshape(1, c, 1, 1), bias.astype(np.int64).reshape(1, c, 1, 1)
    _check_scale_args(np.zeros((1, c, 1, 1), np.int32), m, s, rounding, "apply_scale")
    if int(s.min()) <= 31 or internals is not None:  # shift <= 31: value < 2^(shift-1) is checked on the acc
        acc = layernorm_normalize(x, eps_int, internals) * g64 + b64   # (B, C, H, W), fits int32 (bias check)
        if internals is not None:
            internals["acc"] = acc.astype(np.int32)
        return requantize(acc, m, s, out_dtype=np.int8, rounding=rounding)
    a, b = _layernorm_coefs(x, c, eps_int)
    rnd, corr = _rounding_terms(s, rounding)
    bias_m = b64 * m
    add1, add2 = (bias_m + rnd, None) if corr is None else (bias_m, rnd)
    out = np.empty(x.shape, np.int8)
    gm = g64 * m

    def block(idx):
        o = out[idx]
        t = parallel.scratch("layernorm_t", o.size, np.int64).reshape(o.shape)
        _layernorm_t(t, x[idx], _sub(a, idx), _sub(b, idx))       # t
        np.multiply(t, _sub(gm, idx), out=t)                      # t*gamma*m
        np.add(t, _sub(add1, idx), out=t)                         # SINGLE: acc*m + rnd; DOUBLE: acc*m
        if corr is None:
            np.right_shift(t, _sub(s, idx), out=t)
            _clip_store(t, -128, 127, o)
        else:
            _round_shift(t, _sub(add2, idx), _sub(corr, idx), _sub(s, idx), o, -128, 127)
    if out.size:
        for_blocks(x.shape, block)
    return out
