"""Plain reference kernels of the authors' code variants (issue 19): docs/spec.md's pseudocode as Python-int loops.

One function per kernel of `refvit.int_kernels_authors`, with its signature, computed element by element in
Python integers (no NumPy arithmetic beyond building the output array), the only shared pieces being Part 1's
primitives (`refvit.reference.arith.apply_scale` and `requantize`, on lists of values). They are the
registry rows' `reference` kernels (`--kernels reference`); tests/test_reference_authors.py checks the fast kernels
equal them, outputs and internals, on every quick conformance case of these kernels. They check what the spec
says a kernel checks from its constants (the GELU bound, the softmax rescale, the context's N); the remaining
argument checks (dtypes, shapes, ranges) are the fast kernels'.
"""
from __future__ import annotations

from math import isqrt

import numpy as np

from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.reference.arith import apply_scale, requantize
from refvit.reference.kernels import PROB_ONE, SOFTMAX_RECIP_BITS
from refvit.reference.variants import EXP_FRAC_BITS, SOFTMAX_SHIFT_CAP

# The fixed constants of docs/spec.md Part 4 (the authors' code variants), restated here rather than imported
# from the fast kernels (tests/test_reference_authors.py checks they are the same numbers).
EXP_CODE_LN2 = 11356               # I-BERT's code x0_int: -floor(-0.6931 * 2^14)
EXP_CODE_QB = 44356                # floor((b / a) * 2^14)
EXP_CODE_QC = 749502594            # floor((c / a) * 2^28)
EXP_CODE_SHIFT = 15                # e = z >> (q + 15)
SOFTMAX_CODE_CAP = 30 * EXP_CODE_LN2   # 340680: their clamp, x >= 30 x0_int
EXP_SHIFT_ONE = 1 << 15            # exp_shift(0) = 2^15
EXP_SHIFT_MAX_Q = 16               # u >= -16 * 2^14
SHIFTMAX16_NUM = (1 << 31) - 1     # factor = (2^31 - 1) // sum e
SHIFTMAX16_SHIFT = 16              # p = (e * factor) >> 16
MAX_TOKENS_P16 = 512               # N * 32767 * 128 <= 2^31 - 1


class _Consts:   # the names the kernels below use, in one place
    EXP_CODE_LN2, EXP_CODE_QB, EXP_CODE_QC, EXP_CODE_SHIFT = EXP_CODE_LN2, EXP_CODE_QB, EXP_CODE_QC, EXP_CODE_SHIFT
    SOFTMAX_CODE_CAP, SHIFTMAX16_NUM, SHIFTMAX16_SHIFT, MAX_TOKENS_P16 = (SOFTMAX_CODE_CAP, SHIFTMAX16_NUM,
                                                                          SHIFTMAX16_SHIFT, MAX_TOKENS_P16)
    EXP_SHIFT_MAX_Q, EXP_FRAC_BITS, EXP_SHIFT_ONE, SOFTMAX_SHIFT_CAP = (EXP_SHIFT_MAX_Q, EXP_FRAC_BITS,
                                                                        EXP_SHIFT_ONE, SOFTMAX_SHIFT_CAP)


KA = KV = _Consts


def _i(v) -> int:
    return int(np.asarray(v).reshape(()))


def _requant(values: list, m, s, rounding: str) -> list:
    """Part 1's requantize to int8 of a list of values (m, s: scalars or one per value)."""
    return requantize(np.array(values, np.int64), np.asarray(m, np.int64), np.asarray(s, np.int64),
                      out_dtype=np.int8, rounding=rounding).tolist()


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


# ---------------------------------------------------------------------------------------------- GELU

def gelu_poly_ibert_code(x, c_b, c_c, c_1, erf_shift, multiplier, shift, *, rounding: str = SINGLE_ROUND):
    """docs/spec.md, Part 4, gelu_poly_ibert_code.
    Part 4 gelu_poly (the code's constants): t = c_b - min(|x|, c_b); y = sign(x)(t^2 - c_c);
    h = (y >> k) - c_1; out = requantize(-x h). The bound |x h| <= 2^31 - 1 is checked over every int8 x."""
    cb, cc, c1, k, m, s = (_i(v) for v in (c_b, c_c, c_1, erf_shift, multiplier, shift))

    def h(v):
        t = cb - min(abs(v), cb)
        return ((_sign(v) * (t * t - cc)) >> k) - c1
    worst = max(abs(v * h(v)) for v in range(-128, 128))
    if worst > (1 << 31) - 1:
        raise ValueError(f"gelu_poly_ibert_code: constants give |x * h| = {worst} > 2^31 - 1")
    table = _requant([-v * h(v) for v in range(-128, 128)], m, s, rounding)      # the 256 outputs
    return np.array([table[v + 128] for v in np.asarray(x).ravel().tolist()], np.int8).reshape(np.shape(x))


# ---------------------------------------------------------------------------------------------- softmax

def _differences(row: list, m: int, s: int, rounding: str, cap: int) -> list:
    """The front end: d_w = min(apply_scale(min(max - s_j, d_cap)), cap) (OverflowError as the fast kernel)."""
    d_cap = min((1 << (s - 1)) - 1, (1 << 31) - 1)
    top = max(row)
    d = [top - v for v in row]
    sat = int(apply_scale(np.array([d_cap]), m, s, rounding)[0])
    if sat < cap and max(d) > d_cap:
        raise OverflowError(f"score difference {max(d)} exceeds {d_cap} and the rescale is too small to saturate it")
    scaled = apply_scale(np.array([min(v, d_cap) for v in d], np.int64), m, s, rounding).tolist()
    return [min(v, cap) for v in scaled]


def _exp_code(v: int) -> int:
    q = (-v) // KA.EXP_CODE_LN2
    r = v + q * KA.EXP_CODE_LN2
    return ((r + KA.EXP_CODE_QB) * r + KA.EXP_CODE_QC) >> (q + KA.EXP_CODE_SHIFT)


def _exp_shift(v: int) -> int:
    u = max(v + (v >> 1) - (v >> 4), -KV.EXP_SHIFT_MAX_Q << KV.EXP_FRAC_BITS)
    q = (-u) >> KV.EXP_FRAC_BITS
    r = u + (q << KV.EXP_FRAC_BITS)
    return (KV.EXP_SHIFT_ONE + r) >> q


def _rows(scores, fn, internals):
    """Apply fn(row) -> (p row, d, e, sigma, recip) to every last-axis row; fill the internals."""
    a = np.asarray(scores, np.int64)
    rows = a.reshape(-1, a.shape[-1]).tolist()
    outs = [fn(r) for r in rows]
    if internals is not None:
        internals.update({"diff": np.array([o[1] for o in outs], np.int32).reshape(a.shape),
                          "exp": np.array([o[2] for o in outs], np.int32).reshape(a.shape),
                          "sum": np.array([o[3] for o in outs], np.int32).reshape(a.shape[:-1] + (1,)),
                          "recip": np.array([o[4] for o in outs], np.int32).reshape(a.shape[:-1] + (1,))})
    return [o[0] for o in outs], a.shape


def softmax_poly_ibert_code(scores, multiplier, shift, *, rounding: str = SINGLE_ROUND, internals=None):
    """docs/spec.md, Part 4, softmax_poly_ibert_code.
    Part 4: d_w (cap 340680), e = exp_poly_ibert_code(-d_w), p = rshr(e 127 (2^40 // sum e), 40)."""
    m, s = _i(multiplier), _i(shift)

    def row(r):
        d = _differences(r, m, s, rounding, KA.SOFTMAX_CODE_CAP)
        e = [_exp_code(-v) for v in d]
        sigma = sum(e)
        recip = (1 << SOFTMAX_RECIP_BITS) // sigma
        p = [min(127, (v * PROB_ONE * recip + (1 << (SOFTMAX_RECIP_BITS - 1))) >> SOFTMAX_RECIP_BITS) for v in e]
        return p, d, e, sigma, recip
    out, shape = _rows(scores, row, internals)
    return np.array(out, np.int8).reshape(shape)


def softmax_shift16(scores, multiplier, shift, *, rounding: str = SINGLE_ROUND, internals=None):
    """docs/spec.md, Part 4, softmax_shift16.
    Part 4: d_w (cap 2^19), e = exp_shift(-d_w), factor = (2^31 - 1) // sum e, p = (e factor) >> 16."""
    m, s = _i(multiplier), _i(shift)

    def row(r):
        d = _differences(r, m, s, rounding, KV.SOFTMAX_SHIFT_CAP)
        e = [_exp_shift(-v) for v in d]
        sigma = sum(e)
        factor = KA.SHIFTMAX16_NUM // sigma
        return [(v * factor) >> KA.SHIFTMAX16_SHIFT for v in e], d, e, sigma, factor
    out, shape = _rows(scores, row, internals)
    return np.array(out, np.int16).reshape(shape)


# ---------------------------------------------------------------------------------------------- context

def attention_context_p16(p, v, multiplier, shift, *, rounding: str = SINGLE_ROUND, internals=None):
    """docs/spec.md, Part 4, attention_context_p16.
    acc[b, h, d, i] = sum_j p[b, h, i, j] v[b, h, d, j]; out = requantize(acc) -> int8 (B, Hh, D, N)."""
    if np.asarray(p).shape[-1] > KA.MAX_TOKENS_P16:
        raise ValueError(f"attention_context_p16: N exceeds {KA.MAX_TOKENS_P16}")
    P, V = np.asarray(p, np.int64).tolist(), np.asarray(v, np.int64).tolist()
    b_, h_, d_, n_ = np.shape(v)
    acc = [[[[sum(P[b][h][i][j] * V[b][h][d][j] for j in range(n_)) for i in range(n_)] for d in range(d_)]
            for h in range(h_)] for b in range(b_)]
    acc = np.array(acc, np.int64).reshape(b_, h_, d_, n_)
    if internals is not None:
        internals["acc"] = acc.astype(np.int32)
    return np.array(_requant(acc.ravel().tolist(), _i(multiplier), _i(shift), rounding), np.int8).reshape(acc.shape)


# ---------------------------------------------------------------------------------------------- LayerNorm

def _round_half_even(num: int, den: int) -> int:
    q, r = divmod(num, den)
    return q + (2 * r > den or (2 * r == den and q % 2 == 1))


def layernorm_ibert_code(x, gamma, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND, internals=None):
    """docs/spec.md, Part 4, layernorm_ibert_code.
    Part 4: per position, mean = round_half_even(sum / C); y = x - mean; std = isqrt(sum y^2);
    factor = 2^31 // max(std, 1); norm = (y factor) >> 1; t = rshr(norm, 14); acc = t gamma + bias;
    out = requantize(acc, multiplier[c], shift[c]) per channel."""
    a = np.asarray(x, np.int64)
    b_, c_, h_, w_ = a.shape
    g, bi = np.asarray(gamma, np.int64).tolist(), np.asarray(bias, np.int64).tolist()
    m, s = np.asarray(multiplier, np.int64).ravel().tolist(), np.asarray(shift, np.int64).ravel().tolist()
    m, s = (m * c_ if len(m) == 1 else m), (s * c_ if len(s) == 1 else s)
    out = np.zeros(a.shape, np.int8)
    names = ("sum", "mean", "y", "sumsq", "root", "recip", "norm", "t", "acc")
    kept = {k: np.zeros((b_, 1, h_, w_) if k in ("sum", "mean", "sumsq", "root", "recip") else a.shape, np.int64)
            for k in names}
    for b in range(b_):
        for i in range(h_):
            for j in range(w_):
                col = [int(a[b, c, i, j]) for c in range(c_)]
                total = sum(col)
                mean = _round_half_even(total, c_)
                y = [v - mean for v in col]
                var = sum(t * t for t in y)
                std = isqrt(var)
                factor = (1 << 31) // max(std, 1)
                for name, val in (("sum", total), ("mean", mean), ("sumsq", var), ("root", std), ("recip", factor)):
                    kept[name][b, 0, i, j] = val
                norm = [(v * factor) >> 1 for v in y]
                t = [(v + (1 << 13)) >> 14 for v in norm]                        # rounding_shift_right(norm, 14)
                acc = [t[c] * g[c] + bi[c] for c in range(c_)]
                out[b, :, i, j] = _requant(acc, m, s, rounding)
                for name, val in (("y", y), ("norm", norm), ("t", t), ("acc", acc)):
                    kept[name][b, :, i, j] = val
    if internals is not None:
        internals.update({k: (v if k == "recip" else v.astype(np.int32)) for k, v in kept.items()})
    return out


# ---------------------------------------------------------------------------------------------- pruning

def _scores(p, prefix: int) -> list:
    a = np.asarray(p, np.int64)
    return [[sum(int(a[b, h, 0, prefix + j]) for h in range(a.shape[1])) for j in range(a.shape[3] - prefix)]
            for b in range(a.shape[0])]


def select_tokens_score_order(p, *, keep, num_prefix):
    """docs/spec.md, Token pruning, select_tokens_score_order.
    The first `keep` patch tokens by (score descending, position ascending), in that order, as positions."""
    prefix, k = int(num_prefix), int(keep)
    return np.array([[prefix + j for j in sorted(range(len(sc)), key=lambda j: (-sc[j], j))[:k]]
                     for sc in _scores(p, prefix)], np.int32)


def _divide_round(num: int, den: int, rounding: str) -> int:
    if rounding == DOUBLE_ROUND:
        return _sign(num) * ((2 * abs(num) + den) // (2 * den))
    return (2 * num + den) // (2 * den)


def _prune(x, p, index, prefix: int, rounding: str, package) -> np.ndarray:
    a = np.asarray(x, np.int64)
    b_, c_, _, n_tokens = a.shape
    idx = np.asarray(index, np.int64).tolist()
    if len(idx[0]) == n_tokens - prefix:
        return np.asarray(x).copy()
    lo, hi = (-128, 127) if np.asarray(x).dtype == np.int8 else (-32768, 32767)
    out = np.zeros((b_, c_, 1, prefix + len(idx[0]) + 1), np.int64)
    for b, sc in enumerate(_scores(p, prefix)):
        dropped = [t for t in range(prefix, n_tokens) if t not in idx[b]]
        for c in range(c_):
            pack = min(hi, max(lo, package(sc, dropped, [int(a[b, c, 0, t]) for t in range(n_tokens)], prefix)))
            out[b, c, 0] = [int(a[b, c, 0, t]) for t in range(prefix)] + [int(a[b, c, 0, t]) for t in idx[b]] + [pack]
    return out.astype(np.asarray(x).dtype)


def prune_tokens_weighted_sum(x, p, index, *, num_prefix, rounding: str = SINGLE_ROUND):
    """docs/spec.md, Token pruning, prune_tokens_weighted_sum.
    prefix, kept tokens in the index's order, saturate(divide_round(sum_{dropped} score_t x_t, Hh 127))."""
    den = np.shape(p)[1] * PROB_ONE
    return _prune(x, p, index, int(num_prefix), rounding, lambda sc, dropped, col, pre: _divide_round(
        sum(sc[t - pre] * col[t] for t in dropped), den, rounding))


def prune_tokens_mean_any_order(x, p, index, *, num_prefix, rounding: str = SINGLE_ROUND):
    """docs/spec.md, Token pruning, prune_tokens_mean_any_order.
    prefix, kept tokens in the index's order, divide_round(sum w_t x_t, sum w_t) (all w 0: a plain mean)."""
    def package(sc, dropped, col, pre):
        w = [sc[t - pre] for t in dropped]
        if sum(w) == 0:
            w = [1] * len(dropped)
        return _divide_round(sum(wi * col[t] for wi, t in zip(w, dropped)), sum(w), rounding)
    return _prune(x, p, index, int(num_prefix), rounding, package)
