"""Float building blocks shared by the token form and the conv form.

NumPy has no erf, and scipy is not a dependency. Two evaluations, chosen by dtype:
- float64: piecewise Chebyshev interpolants built once at import from `math.erf` (the C library's
  double erf); tested against `math.erf` to < 4e-15 absolute. Accurate, about 170 ns an element.
- float32 (GELU only): x Phi(x) written as max(x, 0) - |x| Phi(-|x|), Phi(-z) from Abramowitz & Stegun
  7.1.26 for erfc, |error| <= 0.75e-7 |x| plus float32 rounding, about 3 ns an element; float32 inference
  (timm's own CPU erf is a few-ulp approximation too) does not need more.
"""
from __future__ import annotations

import math

import numpy as np

from . import parallel

_ERF_PIECES = [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 6.0)]
_ERF_DEGREE = 24  # analytic on each piece: degree 24 reaches double precision with margin


def _fit_piece(lo: float, hi: float) -> np.ndarray:
    # Chebyshev interpolation of erf on [lo, hi] in the variable t = (2z - lo - hi) / (hi - lo).
    k = np.arange(_ERF_DEGREE + 1)
    t = np.cos(np.pi * (k + 0.5) / (_ERF_DEGREE + 1))                      # Chebyshev nodes
    z = 0.5 * (hi - lo) * t + 0.5 * (hi + lo)
    return np.polynomial.chebyshev.chebfit(t, [math.erf(v) for v in z], _ERF_DEGREE)


_ERF_COEFS = [_fit_piece(lo, hi) for lo, hi in _ERF_PIECES]


def erf(x: np.ndarray) -> np.ndarray:
    """Error function in float64, elementwise, accurate to about 1e-16 absolute."""
    x = np.asarray(x, dtype=np.float64)
    z = np.abs(x)
    out = np.ones_like(z)                                                   # erf(z) == 1.0 in double for z >= 6
    for (lo, hi), coefs in zip(_ERF_PIECES, _ERF_COEFS):
        m = (z >= lo) & (z < hi)
        if m.any():
            t = (2.0 * z[m] - lo - hi) / (hi - lo)
            out[m] = np.polynomial.chebyshev.chebval(t, coefs)
    out[np.isnan(z)] = np.nan
    return np.copysign(out, x)


# Abramowitz & Stegun, Handbook of Mathematical Functions, formula 7.1.26: for u >= 0,
# erfc(u) = t * (a1 + a2 t + a3 t^2 + a4 t^3 + a5 t^4) * exp(-u^2) + e(u), t = 1 / (1 + p u), |e(u)| <= 1.5e-7.
_AS_P = 0.3275911
_AS_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)  # a5 .. a1, Horner order

# GELU(x) = x Phi(x) = max(x, 0) - z Phi(-z) with z = |x|, and Phi(-z) = erfc(z / sqrt 2) / 2: no 1 - erfc
# cancellation near 0, one formula for both signs. With u = z / sqrt 2, t = 1 / (1 + p z / sqrt 2)
# = K / (K + z), K = sqrt 2 / p; the 1/2 goes into the coefficients.
_GELU_K = np.float32(math.sqrt(2.0) / _AS_P)
_GELU_A = [np.float32(a / 2) for a in _AS_A]
_GELU_ZMAX = np.float32(1e4)  # Phi(-z) is 0 in float32 long before; keeps inf * 0 out of z Phi(-z)
_CHUNK = 1 << 16  # elements per pass: the scratch arrays (256 KiB each) stay in L2; whole activations would not


def _gelu_float32_chunk(x, out, z, t, s, zmax, zero):
    """GELU of the 1-D float32 chunk x into out; z, t, s are scratch arrays of the same length, zmax and
    zero constant arrays (numpy's minimum / maximum against an array are ~5x faster than against a scalar)."""
    np.abs(x, out=z)
    np.minimum(z, zmax, out=z)                        # z = |x| (NaN stays NaN)
    np.add(z, _GELU_K, out=t)
    np.divide(_GELU_K, t, out=t)                      # t = K / (K + z)
    np.multiply(t, _GELU_A[0], out=s)
    for a in _GELU_A[1:]:
        s += a
        s *= t                                        # s = t P(t) / 2
    np.multiply(x, x, out=out)
    out *= np.float32(-0.5)
    np.exp(out, out=out)                              # exp(-z^2 / 2)
    s *= out
    s *= z                                            # z Phi(-z)
    np.maximum(x, zero, out=out)
    out -= s


_GELU_CONST = (np.full(_CHUNK, _GELU_ZMAX), np.zeros(_CHUNK, np.float32))   # read-only, shared by the threads
for _a in _GELU_CONST:
    _a.flags.writeable = False


def _gelu_float32(x: np.ndarray) -> np.ndarray:
    """GELU in float32, |error| <= 0.75e-7 |x| + float32 rounding, in cache-sized chunks (on whole MLP
    activations the 19 passes would be memory bound), the chunks on refvit.parallel's threads."""
    x = np.asarray(x, dtype=np.float32)
    perm = np.argsort([-s for s in x.strides], kind="stable")  # x's memory order: the conv form's activations
    xt = np.ascontiguousarray(x.transpose(perm))              # are transposed views; no copy for those
    flat = xt.reshape(-1)
    out = np.empty_like(flat)

    def chunk(r):
        i, n = r[0], r[1] - r[0]
        scratch = [parallel.scratch(key, n, np.float32) for key in ("gelu_z", "gelu_t", "gelu_s")]
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            _gelu_float32_chunk(flat[i:i + n], out[i:i + n], *scratch, *(a[:n] for a in _GELU_CONST))
    parallel.run(chunk, parallel.ranges(flat.size, 1, _CHUNK))   # near-equal chunks of <= _CHUNK elements
    return out.reshape(xt.shape).transpose(np.argsort(perm))  # x's shape, in x's memory order


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, x * Phi(x), as torch.nn.GELU() / timm; float64 (to 1e-15) or float32 by x's dtype."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        return _gelu_float32(x)
    x64 = x.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore"):                                     # -inf * 0 is NaN, as in torch
        return 0.5 * x64 * (1.0 + erf(x64 / math.sqrt(2.0)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x - max) / sum, normalized by one reciprocal per row; x is not modified."""
    e = np.subtract(x, x.max(axis=axis, keepdims=True))
    np.exp(e, out=e)
    e *= np.reciprocal(e.sum(axis=axis, keepdims=True))
    return e


def attend(q: np.ndarray, k_t: np.ndarray, v: np.ndarray, out: np.ndarray, probs: bool = False):
    """softmax(q @ k_t) @ v of every image and head, written into `out`; with probs, also returns the
    probabilities (B, Hh, N, N) [query, key] (token pruning reads them), else None.

    q (B, Hh, N, D) already scaled, k_t (B, Hh, D, N), v (B, Hh, N, D) and out (B, Hh, N, D) may be strided
    views (BLAS reads them in place). One image at a time, so that its (Hh, N, N) scores stay in cache; the
    row sums come from a GEMV with a ones vector (a reduction would be another pass over N x N), and the
    normalization is applied to e @ v (D wide, not N wide) in the same pass that writes out's layout. Not on
    refvit.parallel's threads: between small GEMMs, the pool's threads meet OpenBLAS's spinning workers (with
    2 BLAS threads on 2 busy cores, measured 3.6x slower than the serial pass; bench/profile_ops.py)."""
    B, Hh, N, _ = q.shape
    ones = np.ones(N, q.dtype)
    p = np.empty((B, Hh, N, N), q.dtype) if probs else None
    for b in range(B):
        e = q[b] @ k_t[b]                                 # (Hh, N, N) scores
        e -= e.max(axis=-1, keepdims=True)
        np.exp(e, out=e)                                  # e = exp(s - max s)
        inv = np.reciprocal(e @ ones)[..., None]          # (Hh, N, 1) 1 / row sums
        np.multiply(e @ v[b], inv, out=out[b])            # (Hh, N, D)
        if probs:
            np.multiply(e, inv, out=p[b])
    return p


GEMV_ROW_GROUP = 4   # OpenBLAS's GEMV takes a call's rows 4 by 4 from its first row and the last 1-3 rows with
                     # other kernels, so a row's bits depend on its place in the call modulo 4 (not on alignment
                     # or BLAS threads: measured, and tests/test_parallel.py holds it): split calls at multiples of 4


def _layer_norm_block(xb, db, u, weight, bias, eps) -> None:
    """LayerNorm of the rows xb (rows, C) into db, every pass on the block while it is in cache: the two means
    as GEMVs with the 1/C vector u, d = x - mean, var = d^2 @ u, d * (1 / sqrt(var + eps)) * weight + bias."""
    np.subtract(xb, (xb @ u)[:, None], out=db)                               # d = x - mean
    sq = parallel.scratch("layer_norm_sq", db.size, db.dtype).reshape(db.shape)
    np.square(db, out=sq)
    db *= np.reciprocal(np.sqrt(sq @ u + eps))[:, None]                       # biased variance
    db *= weight
    db += bias


def layer_norm_rows(x2: np.ndarray, d2: np.ndarray, group: int, weight, bias, eps) -> None:
    """LayerNorm of the rows of x2 (rows, C) into d2 (rows, C), fused per row block on refvit.parallel's threads.

    `group` is the number of rows of one GEMV call in the unsplit form (numpy calls BLAS per image of a 3-D
    stack; a 2-D matrix is one call): blocks never straddle a group and start at multiples of GEMV_ROW_GROUP
    inside it, the group's last 1-3 rows in its last block, so every row meets the same GEMV kernel as in one
    call: the same bits."""
    rows, C = x2.shape
    u = np.full(C, 1.0 / C, x2.dtype)                                          # (C,)
    eps = np.asarray(eps, x2.dtype)
    per = parallel.block_target(rows * C, 1 << 17) // max(1, C) // GEMV_ROW_GROUP * GEMV_ROW_GROUP
    per = max(GEMV_ROW_GROUP, per)
    full = group // GEMV_ROW_GROUP * GEMV_ROW_GROUP          # the last 1-3 rows stay with the block before them
    starts = range(0, full, per) if full else range(1)       # (a lone row would be a dot product, not a GEMV)
    blocks = [(g + i, g + (i + per if i + per < full else group)) for g in range(0, rows, group) for i in starts]
    parallel.run(lambda r: _layer_norm_block(x2[r[0]:r[1]], d2[r[0]:r[1]], u, weight, bias, eps), blocks)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis with the biased variance, as torch; weight, bias (C,). The two means
    are GEMVs with a 1/C vector (a reduction along the row is ~3x slower), one call per image as numpy
    makes them on a (B, N, C) stack; all passes fused per row block (layer_norm_rows)."""
    C = x.shape[-1]
    d = np.empty(x.shape, x.dtype)                                           # (..., C)
    group = x.shape[-2] if x.ndim >= 3 else int(np.prod(x.shape[:-1]))        # rows of one GEMV call
    layer_norm_rows(np.ascontiguousarray(x).reshape(-1, C), d.reshape(-1, C), max(1, group), weight, bias, eps)
    return d
