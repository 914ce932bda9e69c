"""Float building blocks shared by the token form and the conv form.

NumPy has no erf, and scipy is not a dependency. Two evaluations, chosen by dtype:
- float64: piecewise Chebyshev interpolants built once at import from `math.erf` (the C library's
  double erf); tested against `math.erf` to < 4e-15 absolute. Accurate, about 170 ns an element.
- float32: Abramowitz & Stegun 7.1.26 (Maclaurin series below 0.5), max abs error 4e-7 (a few
  float32 ulps near 1), a few ns an element; float32 inference (timm's own CPU erf is a few-ulp approximation too) does not need more.
"""
from __future__ import annotations

import math

import numpy as np

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


# Abramowitz & Stegun, Handbook of Mathematical Functions, formula 7.1.26 (|error| <= 1.5e-7).
_AS_P = 0.3275911
_AS_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)  # a5 .. a1, Horner order


_CHUNK = 1 << 14  # elements per pass: the scratch arrays stay in L1/L2 cache (the whole array would not)
_SERIES = [np.float32((-1) ** n / (math.factorial(n) * (2 * n + 1))) for n in range(6, -1, -1)]


def _erf_float32_chunk(x, out, z, t, s, _unused=None):
    """erf of the 1-D float32 chunk x into out; z, t, s are scratch arrays of the same length."""
    np.abs(x, out=z)
    np.multiply(z, np.float32(_AS_P), out=t)
    t += np.float32(1.0)
    np.reciprocal(t, out=t)
    out.fill(np.float32(_AS_A[0]))
    for a in _AS_A[1:]:
        out *= t
        out += np.float32(a)
    out *= t                                          # poly(t)
    np.multiply(z, z, out=t)
    np.negative(t, out=t)
    np.exp(t, out=t)
    out *= t
    np.subtract(np.float32(1.0), out, out=out)        # 1 - poly(t) * exp(-z^2)
    np.multiply(z, z, out=t)                          # below 0.5: sum_n (-1)^n z^(2n+1) / (n! (2n+1))
    s.fill(0)
    for c in _SERIES:                                 # Horner in z^2
        s *= t
        s += c
    s *= z
    s *= np.float32(2.0 / math.sqrt(math.pi))
    np.copyto(out, s, where=z < np.float32(0.5))
    np.copysign(out, x, out=out)


def _chunked(x: np.ndarray, chunk_fn) -> np.ndarray:
    """Apply chunk_fn(x_chunk, out_chunk, *4 scratch) over cache-sized pieces of float32 x."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty_like(flat)
    scratch = [np.empty(min(_CHUNK, flat.size), np.float32) for _ in range(4)]
    for i in range(0, flat.size, _CHUNK):
        n = min(_CHUNK, flat.size - i)
        chunk_fn(flat[i:i + n], out[i:i + n], *(a[:n] for a in scratch))
    return out.reshape(np.shape(x))


def erf_float32(x: np.ndarray) -> np.ndarray:
    """Error function for float32 inference, |error| <= 4e-7: A&S 7.1.26 in float32, and below
    |x| = 0.5, where 1 - poly*exp cancels, the Maclaurin series to x^13 (truncation < 2e-9).
    Evaluated in cache-sized chunks: on whole MLP activations the ~30 passes are memory bound."""
    with np.errstate(invalid="ignore", over="ignore"):  # the series overflows at |x| = inf, then is not used
        return _chunked(x, _erf_float32_chunk)


def _gelu_float32_chunk(x, out, z, t, s, u):
    np.multiply(x, np.float32(1.0 / math.sqrt(2.0)), out=u)
    _erf_float32_chunk(u, out, z, t, s)               # out = erf(x / sqrt 2)
    out += np.float32(1.0)
    out *= x
    out *= np.float32(0.5)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, x * Phi(x), as torch.nn.GELU() / timm; float64 or float32 by x's dtype."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        with np.errstate(invalid="ignore", over="ignore"):
            return _chunked(x, _gelu_float32_chunk)
    x64 = x.astype(np.float64, copy=False)
    return 0.5 * x64 * (1.0 + erf(x64 / math.sqrt(2.0)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, axis: int = -1) -> np.ndarray:
    """LayerNorm over one axis with the biased variance, as torch. weight/bias broadcast against x."""
    mean = x.mean(axis=axis, keepdims=True)
    d = x - mean
    var = (d * d).mean(axis=axis, keepdims=True)
    return d / np.sqrt(var + np.asarray(eps, dtype=x.dtype)) * weight + bias
