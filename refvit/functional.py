"""Float building blocks shared by the token form and the conv form.

NumPy has no erf, and scipy is not a dependency. Two evaluations, chosen by dtype:
- float64: piecewise Chebyshev interpolants built once at import from `math.erf` (the C library's
  double erf); tested against `math.erf` to < 4e-15 absolute. Accurate, about 170 ns an element.
- float32: Abramowitz & Stegun 7.1.26 (Maclaurin series below 0.5), max abs error 3e-7 (a few
  float32 ulps near 1), about 10 ns an element; float32 inference (timm's own CPU erf is a few-ulp approximation too) does not need more.
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


def erf_float32(x: np.ndarray) -> np.ndarray:
    """Error function for float32 inference, |error| <= 3e-7: A&S 7.1.26 in float32, and below
    |x| = 0.5, where 1 - poly*exp cancels, the Maclaurin series to x^13 (truncation < 2e-9).
    In-place arithmetic: this runs on every MLP activation, so temporaries cost real time."""
    x = np.asarray(x, dtype=np.float32)
    z = np.abs(x)
    t = np.multiply(z, np.float32(_AS_P))
    t += np.float32(1.0)
    np.reciprocal(t, out=t)
    out = np.full_like(z, np.float32(_AS_A[0]))
    for a in _AS_A[1:]:
        out *= t
        out += np.float32(a)
    out *= t                                          # poly(t)
    np.multiply(z, z, out=t)
    np.negative(t, out=t)
    np.exp(t, out=t)
    out *= t
    np.subtract(np.float32(1.0), out, out=out)        # 1 - poly * exp(-z^2)
    small = np.flatnonzero(z < 0.5)
    if small.size:
        zs = z.ravel()[small]
        z2 = zs * zs
        series = np.zeros_like(zs)
        for n in range(6, -1, -1):  # sum_n (-1)^n z^(2n+1) / (n! (2n+1)), Horner in z^2
            series = series * z2 + np.float32((-1) ** n / (math.factorial(n) * (2 * n + 1)))
        out.ravel()[small] = np.float32(2.0 / math.sqrt(math.pi)) * zs * series
    return np.copysign(out, x, out=out)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, x * Phi(x), as torch.nn.GELU() / timm; float64 or float32 by x's dtype."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        y = erf_float32(x * np.float32(1.0 / math.sqrt(2.0)))
        y += np.float32(1.0)
        y *= x
        y *= np.float32(0.5)
        return y
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
