"""refvit.int_kernels_variants against independent references written here in exact Python integers.

The references follow docs/spec.md Part 4 and re-derive every rounding from its definition (Python's //
and >> are floor, Fraction for round-half-up), without calling intmath's scaling code: apply_scale is
TOSA apply_scale_32 (SINGLE_ROUND) / TFLite MultiplyByQuantizedMultiplier (DOUBLE_ROUND) written out.
The references also assert the width claims of the spec (e.g. every LayerNorm-int32 intermediate in int32).
Where a reference would only restate the pseudocode (the wide LayerNorm, Part 2's LayerNorm tail, the w4 and
mixed-PoT convs), the shipped reference kernels (refvit.reference) serve instead.
Accuracy tests compare each approximation with its float function and print the measured maximum error
(`python -m pytest -q -s tests/test_scheme_kernels.py`).
"""
from __future__ import annotations

import math
from decimal import Decimal, getcontext
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from refvit import int_kernels as K
from refvit import int_kernels_variants as V
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND, quantize_add_multipliers, quantize_multiplier
from refvit.reference import kernels as RK
from refvit.reference import variants as RV

ROUNDINGS = (SINGLE_ROUND, DOUBLE_ROUND)
SETTINGS = settings(max_examples=60, deadline=None)
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
X8 = np.arange(-128, 128, dtype=np.int8)       # the whole int8 domain


# ---------------------------------------------------------------------------------------------
# independent references (exact Python integers)
# ---------------------------------------------------------------------------------------------

def rhu(q: Fraction) -> int:
    """round half up (ties toward +inf) of an exact rational."""
    return math.floor(q + Fraction(1, 2))


def ref_apply_scale(v: int, m: int, s: int, rounding: str) -> int:
    """value * m * 2^-s rounded (no domain check: the monotone extension beyond int32)."""
    if rounding == SINGLE_ROUND:
        return rhu(Fraction(v * m, 1 << s))
    left, right = max(31 - s, 0), max(s - 31, 0)
    high = rhu(Fraction(v * (1 << left) * m, 1 << 31))                 # ties up
    if right == 0:
        return high
    mag = rhu(Fraction(abs(high), 1 << right))                         # ties away from zero
    return mag if high >= 0 else -mag


def in_scale_domain(v: int, s: int) -> bool:
    return INT32_MIN <= v <= INT32_MAX and -(1 << (s - 1)) <= v < (1 << (s - 1))


def clip(v: int, lo: int, hi: int) -> int:
    return min(max(v, lo), hi)


def round_half_away(f: float) -> int:
    q = Fraction(f)
    return sign(q) * math.floor(abs(q) + Fraction(1, 2))


def sign(v) -> int:
    return int(v > 0) - int(v < 0)


def ref_gelu_poly_acc(x: int, c_b, c_c, c_1, k) -> int:
    t = c_b - min(abs(x), c_b)
    y = sign(x) * (t * t - c_c)
    assert abs(t * t) <= 1 << 30 and abs(y) <= INT32_MAX               # spec: 32-bit datapath
    h = (y // (1 << k)) - c_1
    return -x * h


def ref_exp_shift(v: int) -> int:
    assert -(1 << 30) <= v <= 0
    u = v + v // 2 - v // 16
    assert INT32_MIN <= u
    u = max(u, -16 * 16384)
    q = (-u) // 16384
    r = u + q * 16384
    assert -16384 < r <= 0 and 0 <= q <= 16
    return (32768 + r) // (1 << q)


def ref_exp_poly(v: int) -> int:
    """I-BERT i-exp at input scale 2^-14, constants derived here from decimal literals."""
    ln2 = -math.floor(-Fraction(str(Decimal(2).ln())) * 16384)
    qb = math.floor(Fraction("1.353") * 16384)
    qc = math.floor(Fraction("0.344") / Fraction("0.3585") * (1 << 28))
    z = math.floor(Fraction(-v, ln2))
    r = v + z * ln2
    poly = (r + qb) ** 2 + qc
    assert -ln2 < r <= 0 and 0 < poly < 1 << 30
    return poly // (1 << (z + 15))


def ref_softmax_row(row, m, s, rounding, variant):
    top = max(int(v) for v in row)
    cap = V.SOFTMAX_POLY_CAP if variant == "poly" else V.SOFTMAX_SHIFT_CAP
    dw = [min(ref_apply_scale(top - int(v), m, s, rounding), cap) for v in row]   # unbounded d: no clamp needed
    e = [ref_exp_poly(-d) if variant == "poly" else ref_exp_shift(-d) for d in dw]
    total = sum(e)
    recip = (1 << 40) // total
    return [min(rhu(Fraction(ei * 127 * recip, 1 << 40)), 127) for ei in e]


def ref_ln32_t(col, eps_int, eps_shift):
    """layernorm_int32_normalize of one position (list of C ints), asserting every intermediate fits int32."""
    c = len(col)

    def fits(*vals):
        for v in vals:
            assert INT32_MIN <= v <= INT32_MAX, v

    total = sum(col)
    d = [c * v - total for v in col]
    fits(total, *d, *(c * v for v in col))
    m_c = math.isqrt((1 << 29) // c)
    dmax, k = max(abs(v) for v in d), 0
    while rhu(Fraction(dmax, 1 << k)) > m_c:
        k += 1
    k = max(k, eps_shift)
    d_s = [rhu(Fraction(v, 1 << k)) for v in d]
    eps_s = rhu(Fraction(eps_int, 1 << (2 * (k - eps_shift))))
    sq = sum(v * v for v in d_s)
    q = sq + eps_s
    fits(sq, q, *(v * v for v in d_s))
    r = math.isqrt(q)
    inv = (1 << 30) // r
    prods = [v * inv for v in d_s]
    fits(*prods, *(p + (1 << 13) for p in prods))
    t = [rhu(Fraction(p, 1 << 14)) for p in prods]
    assert all(abs(v) <= 1 << 16 for v in t) and 1 <= r <= 32767
    return t


def per_position(x, fn, *args):
    b, c, h, w = x.shape
    out = np.zeros(x.shape, np.int64)
    for bi, hi, wi in np.ndindex(b, h, w):
        out[bi, :, hi, wi] = fn([int(v) for v in x[bi, :, hi, wi]], *args)
    return out


def ref_tail(t, gamma, bias, mult, shift, rounding):
    """Part 2's layernorm tail (acc = t * gamma[c] + bias[c]; requantize): the shipped reference's."""
    return RK.layernorm_tail(t, gamma, bias, mult, shift, rounding, None, "layernorm")


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------

roundings = st.sampled_from(ROUNDINGS)


def int_arrays(dtype, shape, lo=None, hi=None):
    info = np.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    n = int(np.prod(shape))
    return st.lists(st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, -1, 1]).filter(lambda v: lo <= v <= hi)),
                    min_size=n, max_size=n).map(lambda v: np.array(v, dtype=dtype).reshape(shape))


# =============================================================================================
# GELU poly
# =============================================================================================

@SETTINGS
@given(c_b=st.integers(1, 1 << 15), c_c=st.integers(0, INT32_MAX), c_1=st.integers(0, INT32_MAX),
       k=st.integers(0, 31), m=st.integers(0, INT32_MAX), s=st.integers(2, 62), rounding=roundings)
@example(c_b=51, c_c=2771, c_1=2771, k=0, m=1 << 30, s=31, rounding=SINGLE_ROUND)   # ties at 2^31
@example(c_b=51, c_c=2771, c_1=2771, k=0, m=1 << 30, s=31, rounding=DOUBLE_ROUND)
@example(c_b=51, c_c=2771, c_1=2771, k=0, m=1 << 29, s=33, rounding=DOUBLE_ROUND)   # double rounding ties
@example(c_b=1, c_c=0, c_1=0, k=0, m=INT32_MAX, s=62, rounding=SINGLE_ROUND)         # smallest constants
@example(c_b=1 << 15, c_c=INT32_MAX, c_1=0, k=31, m=1 << 30, s=40, rounding=SINGLE_ROUND)  # extremes
@example(c_b=1 << 15, c_c=(1 << 30) + 7, c_1=(1 << 24) - 1, k=7, m=1 << 30, s=60, rounding=DOUBLE_ROUND)
@example(c_b=1000, c_c=4000000, c_1=(1 << 24), k=0, m=1 << 30, s=60, rounding=SINGLE_ROUND)  # bound exceeded
def test_gelu_poly_matches_reference(c_b, c_c, c_1, k, m, s, rounding):
    accs = [ref_gelu_poly_acc(int(x), c_b, c_c, c_1, k) for x in X8]
    if max(abs(a) for a in accs) > INT32_MAX:
        with pytest.raises(ValueError, match="gelu_poly"):
            V.gelu_poly(X8, c_b, c_c, c_1, k, m, s, rounding=rounding)
        return
    if not all(in_scale_domain(a, s) for a in accs):
        with pytest.raises(ValueError, match="apply_scale"):
            V.gelu_poly(X8, c_b, c_c, c_1, k, m, s, rounding=rounding)
        return
    want = [clip(ref_apply_scale(a, m, s, rounding), -128, 127) for a in accs]
    got = V.gelu_poly(X8, c_b, c_c, c_1, k, m, s, rounding=rounding)
    assert got.dtype == np.int8 and got.tolist() == want
    x2 = X8[::-1].reshape(2, 2, 64).copy()                             # any shape, elementwise
    assert V.gelu_poly(x2, c_b, c_c, c_1, k, m, s, rounding=rounding).tolist() == \
        np.array(want)[x2.astype(int) + 128].tolist()


@SETTINGS
@given(s_in=st.floats(1e-4, 2.0), ratio=st.floats(0.05, 20.0), delta=st.sampled_from([1.0, 0.5, 0.25, 0.9]))
@example(s_in=1e-4, ratio=1.0, delta=1.0)
@example(s_in=2.0, ratio=1.0, delta=0.5)
@example(s_in=1.7689999999999999 * math.sqrt(2) / 51, ratio=1.0, delta=1.0)          # b / S near an integer
def test_gelu_poly_constants_definition(s_in, ratio, delta):
    c = V.gelu_poly_constants(s_in, s_in * ratio, delta)
    S = Fraction(s_in / math.sqrt(2))
    a, b, dl = Fraction(-0.2888), Fraction(-1.769), Fraction(delta)
    assert c["c_b"] == -math.floor(b / S) and c["c_c"] == -math.floor(1 / (a * S * S))
    k = c["erf_shift"]
    assert c["c_1"] == -math.floor(1 / (dl * a * S * S * 2 ** k))
    bound = lambda kk, c1: max(abs(ref_gelu_poly_acc(int(x), c["c_b"], c["c_c"], c1, kk)) for x in X8)
    assert bound(k, c["c_1"]) <= INT32_MAX                             # fits, and k is the smallest that fits
    if k > 0:
        assert bound(k - 1, -math.floor(1 / (dl * a * S * S * 2 ** (k - 1)))) > INT32_MAX
    assert (c["multiplier"], c["shift"]) == quantize_multiplier(
        float(dl * -a * S * S * 2 ** k * Fraction(s_in) / (2 * Fraction(s_in * ratio))))


def test_gelu_poly_delta_one_is_ibert():
    """I-BERT IntGELU written out in its own signed form (q_b, q_c, shift_int = floor(1/sf) < 0): same acc."""
    s_in = 0.04
    c = V.gelu_poly_constants(s_in, 0.03)
    S = Fraction(s_in / math.sqrt(2))
    a, b = Fraction(-0.2888), Fraction(-1.769)
    q_b, q_c = math.floor(b / S), math.floor(1 / (a * S * S))
    sf = a * S * S
    shift_int = math.floor(1 / sf)
    assert c["erf_shift"] == 0
    for x in range(-128, 128):
        y = sign(x) * ((min(abs(x), -q_b) + q_b) ** 2 + q_c)           # I-BERT int_erf, scale a S^2 < 0
        ibert = x * (y + shift_int)                                     # scale S_in * sf / 2 < 0
        assert ibert == -ref_gelu_poly_acc(x, c["c_b"], c["c_c"], c["c_1"], 0)


GELU_SCALES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.3)       # input ranges +-0.64 .. +-38


def _gelu(xr):
    return 0.5 * xr * (1 + np.array([math.erf(v / math.sqrt(2)) for v in xr]))


@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_gelu_poly_accuracy(delta):
    """Against its own float function (output steps) and, for delta = 1, against the exact GELU (absolute)."""
    own, vs_gelu = [], []
    for s_in in GELU_SCALES:
        xr = X8.astype(np.float64) * s_in
        f = V.gelu_poly_reference_float(xr, delta)
        s_out = np.abs(f).max() / 127                                   # no saturation
        out = V.gelu_poly(X8, **V.gelu_poly_constants(s_in, s_out, delta)).astype(np.float64) * s_out
        own.append(float(np.abs(out - f).max() / s_out))
        if delta == 1.0:
            vs_gelu.append(float(np.abs(out - _gelu(xr)).max()))
            assert vs_gelu[-1] <= 0.0182 + 0.7 * s_out                  # L vs erf (0.01815) + integer rounding
    print(f"\ngelu_poly delta={delta}, s_in {GELU_SCALES}: max |out - x/2 (1 + delta L)| in output steps "
          f"{[round(v, 3) for v in own]}; max |out - GELU| {[round(v, 4) for v in vs_gelu]}")
    assert max(own) <= 0.75                                             # measured 0.70 (delta 1), 0.60 (0.5)


def test_gelu_poly_rejects():
    with pytest.raises(ValueError, match="gelu_poly: x must have dtype int8"):
        V.gelu_poly(X8.astype(np.int16), 51, 2771, 2771, 0, 1 << 30, 40)
    with pytest.raises(ValueError, match="gelu_poly: c_b"):
        V.gelu_poly(X8, 0, 2771, 2771, 0, 1 << 30, 40)
    with pytest.raises(ValueError, match="gelu_poly_constants: scale_in"):
        V.gelu_poly_constants(1e-6, 1.0)
    with pytest.raises(ValueError, match="delta"):
        V.gelu_poly_constants(0.1, 0.1, 0.0)


# =============================================================================================
# exp_shift, GELU shift
# =============================================================================================

@settings(max_examples=200, deadline=None)
@given(v=st.integers(-(1 << 30), 0))
@example(v=0)
@example(v=-1)
@example(v=-(1 << 30))
@example(v=-16384)
@example(v=-(16 * 16384 * 16) // 23)                                  # u near the clamp -16 * 2^14
@example(v=-182361)
def test_exp_shift_matches_reference(v):
    assert int(V.exp_shift(np.array([v]))[0]) == ref_exp_shift(v)


def test_exp_shift_accuracy():
    v = np.arange(-12 * 16384, 1, 7)
    got = V.exp_shift(v) / 32768
    err = np.abs(got - np.exp(v / 16384.0))
    rel = (err / np.exp(v / 16384.0))[v > -5 * 16384]
    print(f"\nexp_shift: max abs error {err.max():.4f}, max relative (x > -5) {rel.max():.4f}")
    assert err.max() <= 0.045 and rel.max() <= 0.08     # 1 - p/2 vs 2^-p (0.043 abs, 6% rel) + log2(e) ~ 1.4375
    assert V.exp_shift(np.array([0]))[0] == 32768
    assert np.all(np.diff(V.exp_shift(np.arange(-300000, 1))) >= 0)   # monotone


def ref_gelu_shift(x, m_in, s_in, m, s, rounding):
    w = ref_apply_scale(x, m_in, s_in, rounding)
    e1, e2 = ref_exp_shift(min(w, 0)), ref_exp_shift(-max(w, 0))
    factor = INT32_MAX // (e1 + e2)
    assert e1 * factor <= INT32_MAX
    sig = (e1 * factor) >> 16
    return x * sig


@SETTINGS
@given(m_in=st.integers(0, INT32_MAX), s_in=st.integers(8, 62), m=st.integers(0, INT32_MAX),
       s=st.integers(2, 62), rounding=roundings)
@example(m_in=1462006868, s_in=20, m=1342177280, s=45, rounding=SINGLE_ROUND)        # s_in = 0.05 constants
@example(m_in=1462006868, s_in=20, m=1 << 30, s=31, rounding=DOUBLE_ROUND)           # output ties
@example(m_in=1 << 30, s_in=8, m=1 << 30, s=23, rounding=SINGLE_ROUND)                # |w| = 2^29: deep clamp
@example(m_in=1 << 30, s_in=31, m=1 << 30, s=33, rounding=DOUBLE_ROUND)               # w = x/2: input ties
@example(m_in=0, s_in=62, m=INT32_MAX, s=62, rounding=SINGLE_ROUND)
def test_gelu_shift_matches_reference(m_in, s_in, m, s, rounding):
    accs = [ref_gelu_shift(int(x), m_in, s_in, m, s, rounding) for x in X8]
    if not all(in_scale_domain(a, s) for a in accs):
        with pytest.raises(ValueError, match="apply_scale"):
            V.gelu_shift(X8, m_in, s_in, m, s, rounding=rounding)
        return
    want = [clip(ref_apply_scale(a, m, s, rounding), -128, 127) for a in accs]
    assert V.gelu_shift(X8, m_in, s_in, m, s, rounding=rounding).tolist() == want


def test_gelu_shift_constants_definition():
    for s_in, s_out in ((0.05, 0.04), (0.003, 0.01), (1.5, 1.0)):
        c = V.gelu_shift_constants(s_in, s_out)
        assert (c["multiplier_in"], c["shift_in"]) == quantize_multiplier(float(Fraction(1.702) * Fraction(s_in) * 16384))
        assert (c["multiplier"], c["shift"]) == quantize_multiplier(float(Fraction(s_in) / 32768 / Fraction(s_out)))


def test_gelu_shift_accuracy():
    """Against x * sigmoid(1.702 x) and against the exact GELU, absolute, beyond half an output step."""
    own, vs_gelu = [], []
    for s_in in GELU_SCALES:
        xr = X8.astype(np.float64) * s_in
        f, g = xr / (1 + np.exp(-1.702 * xr)), _gelu(xr)
        s_out = max(np.abs(f).max(), np.abs(g).max()) * 1.02 / 127     # no saturation
        out = V.gelu_shift(X8, **V.gelu_shift_constants(s_in, s_out)).astype(np.float64) * s_out
        own.append(float(np.abs(out - f).max() - s_out / 2))
        vs_gelu.append(float(np.abs(out - g).max() - s_out / 2))
    print(f"\ngelu_shift, s_in {GELU_SCALES}: max |out - x sigmoid(1.702x)| - s_out/2 {[round(v, 4) for v in own]}; "
          f"max |out - GELU| - s_out/2 {[round(v, 4) for v in vs_gelu]}")
    assert max(own) <= 0.03 and max(vs_gelu) <= 0.03


# =============================================================================================
# softmax poly / shift
# =============================================================================================

def test_exp_poly_constants_and_reference():
    getcontext().prec = 50
    assert V.EXP_POLY_LN2 == -math.floor(-Fraction(str(Decimal(2).ln())) * 16384) == 11357
    assert V.EXP_POLY_QB == math.floor(Fraction("1.353") * 16384) == 22167
    assert V.EXP_POLY_QC == math.floor(Fraction("0.344") / Fraction("0.3585") * (1 << 28)) == 257578233
    assert V.EXP_POLY_ONE == 22856 and V.SOFTMAX_POLY_CAP == 30 * 11357
    v = np.concatenate([np.arange(-40000, 1), np.arange(-V.SOFTMAX_POLY_CAP, -V.SOFTMAX_POLY_CAP + 40000),
                        -np.arange(0, 31) * 11357, -np.arange(0, 30) * 11357 - 1])
    got = V.exp_poly(v)
    want = [ref_exp_poly(int(t)) for t in v[::97]]
    assert got[::97].tolist() == want
    assert [int(V.exp_poly(np.array([t]))[0]) for t in (0, -1, -11356, -11357, -V.SOFTMAX_POLY_CAP)] == \
        [ref_exp_poly(t) for t in (0, -1, -11356, -11357, -V.SOFTMAX_POLY_CAP)]


def test_exp_poly_accuracy():
    v = np.arange(-10 * 16384, 1, 5)
    got = V.exp_poly(v) / V.EXP_POLY_ONE
    ex = np.exp(v / 16384.0)
    rel = (np.abs(got - ex) / ex)[v > -5 * 16384]
    print(f"\nexp_poly: max abs error {np.abs(got - ex).max():.5f}, max relative (x > -5) {rel.max():.4f}")
    assert np.abs(got - ex).max() <= 0.003 and rel.max() <= 0.02
    e = V.exp_poly(np.arange(-V.SOFTMAX_POLY_CAP, 1))                  # v ascending
    up = np.diff(e)
    # I-BERT's polynomial is 0.49810 at -ln2 but 1.00031 / 2 at 0: at each z boundary e steps the wrong way
    # by poly(0)/2 - poly(-11356) = 21107 units of 2^-(z+16): one unit of e after the shift, for z = 1, 2, 3
    assert up.min() == -1 and np.flatnonzero(up < 0).tolist() == [V.SOFTMAX_POLY_CAP - z * V.EXP_POLY_LN2
                                                                  for z in (3, 2, 1)]


score_rows = st.integers(1, 12).flatmap(lambda n: st.lists(
    st.lists(st.one_of(st.integers(INT32_MIN, INT32_MAX), st.integers(-3000, 3000),
                       st.sampled_from([INT32_MIN, INT32_MAX, 0])), min_size=n, max_size=n),
    min_size=1, max_size=3))


@settings(max_examples=120, deadline=None)
@given(rows=score_rows, m=st.integers(0, INT32_MAX), s=st.integers(2, 62), rounding=roundings,
       variant=st.sampled_from(["poly", "shift"]))
@example(rows=[[INT32_MAX, INT32_MIN]], m=1 << 30, s=20, rounding=SINGLE_ROUND, variant="poly")  # d = 2^32 - 1, clamp
@example(rows=[[INT32_MAX, INT32_MIN]], m=1 << 30, s=20, rounding=DOUBLE_ROUND, variant="shift")
@example(rows=[[0, -1, -2, -3]], m=1 << 30, s=31, rounding=SINGLE_ROUND, variant="shift")       # ties in d_w
@example(rows=[[0, -1, -3, -5]], m=1 << 30, s=33, rounding=DOUBLE_ROUND, variant="poly")
@example(rows=[[5] * 12], m=1 << 30, s=20, rounding=SINGLE_ROUND, variant="poly")              # constant row
@example(rows=[[0, -11357, -11358, -22714, -340710, -340711]], m=1 << 30, s=30, rounding=SINGLE_ROUND,
         variant="poly")                                                                        # z boundaries, cap
@example(rows=[[0, -1, 1 << 20]], m=1, s=62, rounding=SINGLE_ROUND, variant="shift")           # tiny scale
@example(rows=[[INT32_MAX, INT32_MIN]], m=1, s=62, rounding=SINGLE_ROUND, variant="shift")     # cannot saturate
def test_softmax_variants_match_reference(rows, m, s, rounding, variant):
    scores = np.array(rows, dtype=np.int32)
    kernel = V.softmax_poly if variant == "poly" else V.softmax_shift
    cap = V.SOFTMAX_POLY_CAP if variant == "poly" else V.SOFTMAX_SHIFT_CAP
    d_cap = min((1 << (s - 1)) - 1, INT32_MAX)
    dmax = max(max(r) - min(r) for r in rows)
    if ref_apply_scale(d_cap, m, s, rounding) < cap and dmax > d_cap:
        with pytest.raises(OverflowError, match=f"softmax_{variant}"):
            kernel(scores, m, s, rounding=rounding)
        return
    want = [ref_softmax_row(r, m, s, rounding, variant) for r in rows]
    got = kernel(scores, m, s, rounding=rounding)
    assert got.dtype == np.int8 and got.tolist() == want


def test_softmax_variants_shapes_and_rejects():
    sc = np.arange(2 * 3 * 5 * 5, dtype=np.int32).reshape(2, 3, 5, 5) * 37 - 1000
    m, s = V.softmax_exp_multiplier(0.01)
    for kernel, variant in ((V.softmax_poly, "poly"), (V.softmax_shift, "shift")):
        got = kernel(sc, m, s)
        assert got.shape == sc.shape
        assert got.reshape(-1, 5).tolist() == [ref_softmax_row(r, m, s, SINGLE_ROUND, variant) for r in sc.reshape(-1, 5)]
        with pytest.raises(ValueError, match=f"softmax_{variant}: scores must have dtype int32"):
            kernel(sc.astype(np.int64), m, s)
        with pytest.raises(ValueError, match="non-empty"):
            kernel(np.zeros((2, 0), np.int32), m, s)
    assert V.softmax_exp_multiplier(0.01) == quantize_multiplier(float(Fraction(0.01) * 16384))


@pytest.mark.parametrize("variant", ["poly", "shift"])
def test_softmax_variants_accuracy(variant):
    rng = np.random.default_rng(1)
    kernel = V.softmax_poly if variant == "poly" else V.softmax_shift
    worst = 0.0
    for sigma_s in (1e-3, 3e-3, 1e-2, 5e-2):
        for n in (4, 16, 197):
            sc = rng.integers(-int(8 / sigma_s), int(8 / sigma_s), size=(100, n)).astype(np.int32)
            z = sc * sigma_s
            f = np.exp(z - z.max(-1, keepdims=True))
            f /= f.sum(-1, keepdims=True)
            p = kernel(sc, *V.softmax_exp_multiplier(sigma_s)) / 127
            worst = max(worst, float(np.abs(p - f).max()))
    print(f"\nsoftmax_{variant}: max |p/127 - softmax| = {worst:.4f} ({worst * 127:.2f} output steps)")
    assert worst <= (0.0055 if variant == "poly" else 0.021)          # measured 0.0047 / 0.0188


# =============================================================================================
# LayerNorm int32
# =============================================================================================

@settings(max_examples=300, deadline=None)
@given(x=st.integers(0, INT32_MAX))
@example(x=0)
@example(x=INT32_MAX)
@example(x=(1 << 30) - 1)
@example(x=1 << 30)
@example(x=46340 ** 2)
@example(x=46340 ** 2 - 1)
def test_isqrt32(x):
    assert int(V.isqrt32(np.array([x]))[0]) == math.isqrt(x)


def test_isqrt32_rejects():
    with pytest.raises(ValueError, match="isqrt32"):
        V.isqrt32(np.array([1 << 31]))
    with pytest.raises(ValueError, match="isqrt32"):
        V.isqrt32(np.array([-1]))


def ln_inputs(draw_dtype):
    return st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 3)).flatmap(
        lambda bcn: int_arrays(draw_dtype, (bcn[0], bcn[1], 1, bcn[2])))


@settings(max_examples=80, deadline=None)
@given(x=st.one_of(ln_inputs(np.int8), ln_inputs(np.int16)), eps_int=st.one_of(st.integers(1, (1 << 29) - 1),
       st.sampled_from([1, (1 << 29) - 1])), eps_shift=st.integers(0, 30))
@example(x=np.array([-32768, 32767] * 20, np.int16).reshape(1, 40, 1, 1), eps_int=1, eps_shift=0)
@example(x=np.array([-128] * 39 + [127], np.int8).reshape(1, 40, 1, 1), eps_int=1, eps_shift=0)
@example(x=np.full((1, 7, 1, 2), 5, np.int8), eps_int=1, eps_shift=30)             # constant rows
@example(x=np.array([3, 4], np.int16).reshape(1, 2, 1, 1), eps_int=(1 << 29) - 1, eps_shift=30)
@example(x=np.array([9], np.int8).reshape(1, 1, 1, 1), eps_int=1, eps_shift=0)     # C = 1
def test_layernorm_int32_normalize_matches_reference(x, eps_int, eps_shift):
    want = per_position(x, ref_ln32_t, eps_int, eps_shift)
    got = V.layernorm_int32_normalize(x, eps_int, eps_shift)
    assert got.dtype == np.int32 and got.tolist() == want.tolist()


@pytest.mark.parametrize("c", [4096])
def test_layernorm_int32_extreme_rows(c):
    """The widest rows of the domain: C = 4096, int16 half min / half max, one outlier, alternating."""
    rows = [np.array([-32768] * (c // 2) + [32767] * (c // 2)), np.array([-32768] * (c - 1) + [32767]),
            np.tile([32767, -32768, 0, 1], c // 4), np.array([0] * (c - 1) + [1])]
    x = np.stack(rows).astype(np.int16).reshape(len(rows), c, 1, 1)
    for eps_int, eps_shift in ((1, 0), ((1 << 29) - 1, 30), (12345, 3)):
        got = V.layernorm_int32_normalize(x, eps_int, eps_shift)
        assert got.tolist() == per_position(x, ref_ln32_t, eps_int, eps_shift).tolist()


@SETTINGS
@given(x=st.one_of(ln_inputs(np.int8), ln_inputs(np.int16)), rounding=roundings, data=st.data())
def test_layernorm_int32_full_matches_reference(x, rounding, data):
    c = x.shape[1]
    gamma = data.draw(int_arrays(np.int8, (c,), -127, 127))
    lim = INT32_MAX - 127 * (1 << 16)
    bias = data.draw(int_arrays(np.int32, (c,), -lim, lim))
    mult = data.draw(int_arrays(np.int32, (c,), 0, INT32_MAX))
    shift = data.draw(int_arrays(np.int8, (c,), 32, 62))                # acc < 2^31 <= 2^(shift-1)
    t = per_position(x, ref_ln32_t, 1, 0)
    want = ref_tail(t, gamma, bias, mult, shift, rounding)
    got = V.layernorm_int32(x, 1, 0, gamma, bias, mult, shift, rounding=rounding)
    assert got.dtype == np.int8 and got.tolist() == want.tolist()


def test_layernorm_int32_eps_definition():
    for eps, c, s_x in ((1e-6, 192, 0.05), (1e-6, 768, 1e-4), (1e-12, 768, 0.02), (1e-5, 4096, 1e-5), (0.0, 8, 1.0)):
        eps_int, k = V.layernorm_int32_eps(eps, c, s_x)
        image = eps * float(c) ** 3 / (s_x * s_x)
        assert 1 <= eps_int <= (1 << 29) - 1
        assert eps_int == max(1, int(math.floor(abs(Fraction(image) / 4 ** k) + Fraction(1, 2))))
        assert k == 0 or math.floor(Fraction(image) / 4 ** (k - 1) + Fraction(1, 2)) > (1 << 29) - 1
    with pytest.raises(ValueError, match="layernorm_int32_eps"):
        V.layernorm_int32_eps(1e-6, 4097, 0.1)


def _ln_t_error(x):
    c = x.shape[1]
    xi = x.astype(np.float64)
    d = c * xi - xi.sum(axis=1, keepdims=True)
    exact = 2.0 ** 16 * d / np.sqrt((d * d).sum(axis=1, keepdims=True) + 1)     # eps_int = 1
    e32 = float(np.abs(V.layernorm_int32_normalize(x, 1, 0) - exact).max())
    e64 = float(np.abs(V.layernorm_wide_normalize(x, 1) - exact).max()) if c <= 1290 else float("nan")
    return e32, e64, e32 * math.sqrt(c) / 2 ** 16                               # t units; z = sqrt(C) t 2^-16


def test_layernorm_int32_accuracy():
    """t vs the exact 2^16 d / sqrt(sum d^2 + eps), beside the int64 Part 2 kernel (layernorm_wide)."""
    rng = np.random.default_rng(2)
    typical, extreme = [], []
    for c, dtype, spread in ((192, np.int8, 40), (768, np.int8, 40), (768, np.int16, 3000), (768, np.int16, 30)):
        info = np.iinfo(dtype)
        x = np.clip(rng.normal(0, spread, size=(64, c)), info.min, info.max).round()
        x[:8, :4] = info.max                                            # a few outlier channels in some rows
        typical.append(_ln_t_error(x.astype(dtype).reshape(64, c, 1, 1)))
    for c, dtype, spread in ((192, np.int8, 1), (768, np.int8, 2), (768, np.int16, 30), (4096, np.int16, 5)):
        info = np.iinfo(dtype)
        x = np.clip(rng.normal(0, spread, size=(16, c)), info.min, info.max).round()
        x[:, 0] = info.max                                              # one extreme outlier per row
        extreme.append(_ln_t_error(x.astype(dtype).reshape(16, c, 1, 1)))
    fmt = lambda rows: [f"t {e32:.1f} (int64 {e64:.2f}), z {z:.4f}" for e32, e64, z in rows]
    print(f"\nlayernorm_int32 max error vs float, typical rows {fmt(typical)}; one extreme outlier {fmt(extreme)}")
    assert max(z for *_, z in typical) <= 0.012 and np.nanmax([e64 for _, e64, _ in typical + extreme]) <= 3
    assert max(z for *_, z in extreme) <= 0.07                          # bound ~ C / 2^14.5 (see spec)


def test_layernorm_int32_rejects():
    x = np.zeros((1, 4, 1, 1), np.int8)
    with pytest.raises(ValueError, match="layernorm_int32: eps_int"):
        V.layernorm_int32_normalize(x, 1 << 29, 0)
    with pytest.raises(ValueError, match="layernorm_int32: x must be an int8 or int16"):
        V.layernorm_int32_normalize(x.astype(np.int32), 1, 0)
    with pytest.raises(ValueError, match=r"layernorm_int32: C = 4097"):
        V.layernorm_int32_normalize(np.zeros((1, 4097, 1, 1), np.int16), 1, 0)


# =============================================================================================
# int16 residual: add_wide, layernorm_wide
# =============================================================================================

@SETTINGS
@given(dt_a=st.sampled_from([np.int8, np.int16]), dt_b=st.sampled_from([np.int8, np.int16]),
       out=st.sampled_from([np.int8, np.int16]), ma=st.integers(0, INT32_MAX), mb=st.integers(0, INT32_MAX),
       s=st.integers(0, 62), data=st.data())
def test_add_wide_matches_reference(dt_a, dt_b, out, ma, mb, s, data):
    check_add_wide(data.draw(int_arrays(dt_a, (2, 5))), data.draw(int_arrays(dt_b, (1, 5))), ma, mb, s, out)


@pytest.mark.parametrize("ma, mb, s, out", [(INT32_MAX, INT32_MAX, 0, np.int16),      # saturation both ways
                                            (1 << 30, 1 << 30, 31, np.int16),         # ties (x.5)
                                            (INT32_MAX, 0, 62, np.int16), (1 << 30, 1 << 29, 23, np.int8)])
def test_add_wide_boundaries(ma, mb, s, out):
    a = np.array([[-32768, 32767, -3, -1, 1, 3, 0]], np.int16)
    check_add_wide(a, np.array([[-1]], np.int8), ma, mb, s, out)
    check_add_wide(a, np.array([[-32768, 32767, 1, 0, -1, -2, -32768]], np.int16), ma, mb, s, out)


def check_add_wide(a, b, ma, mb, s, out):
    lo, hi = np.iinfo(out).min, np.iinfo(out).max
    want = [[clip(rhu(Fraction(int(a[i, j]) * ma + int(b[0, j % b.shape[1]]) * mb, 1 << s)), lo, hi)
             for j in range(a.shape[1])] for i in range(a.shape[0])]
    got = V.add_wide(a, b, ma, mb, s, out_dtype=out)
    assert got.dtype == np.dtype(out) and got.tolist() == want


def test_add_wide_equals_add_on_int8():
    rng = np.random.default_rng(3)
    a = rng.integers(-128, 128, size=(2, 8, 1, 5)).astype(np.int8)
    b = rng.integers(-128, 128, size=(1, 8, 1, 5)).astype(np.int8)
    ma, mb, s = quantize_add_multipliers(0.1, 0.2, 0.15)
    assert V.add_wide(a, b, ma, mb, s, out_dtype=np.int8).tolist() == K.add(a, b, ma, mb, s).tolist()
    with pytest.raises(ValueError, match="add_wide: a must be an int8 or int16"):
        V.add_wide(a.astype(np.int32), b, ma, mb, s)
    with pytest.raises(ValueError, match="add_wide: out_dtype"):
        V.add_wide(a, b, ma, mb, s, out_dtype=np.int32)


@SETTINGS
@given(x=st.one_of(ln_inputs(np.int8), ln_inputs(np.int16)), eps_int=st.sampled_from([1, 7, 1 << 40, 1 << 61]))
@example(x=np.array([-32768, 32767] * 20, np.int16).reshape(1, 40, 1, 1), eps_int=1 << 61)
def test_layernorm_wide_matches_reference(x, eps_int):
    assert V.layernorm_wide_normalize(x, eps_int).tolist() == RV.layernorm_wide_normalize(x, eps_int).tolist()
    if x.dtype == np.int8:
        assert V.layernorm_wide_normalize(x, eps_int).tolist() == K.layernorm_normalize(x, eps_int).tolist()


@settings(max_examples=30, deadline=None)
@given(x=ln_inputs(np.int16), rounding=roundings, data=st.data())
def test_layernorm_wide_full_matches_reference(x, rounding, data):
    c = x.shape[1]
    gamma = data.draw(int_arrays(np.int8, (c,), -127, 127))
    lim = INT32_MAX - 127 * (1 << 16)
    bias = data.draw(int_arrays(np.int32, (c,), -lim, lim))
    mult = data.draw(int_arrays(np.int32, (c,), 0, INT32_MAX))
    shift = data.draw(int_arrays(np.int8, (c,), 32, 62))
    want = RV.layernorm_wide(x, 3, gamma, bias, mult, shift, rounding=rounding)
    assert V.layernorm_wide(x, 3, gamma, bias, mult, shift, rounding=rounding).tolist() == want.tolist()


def test_layernorm_wide_int16_bounds():
    c = 1290                                                            # the int16 maximum: C^3 65535^2 / 4 <= 2^61
    x = np.array([-32768, 32767] * (c // 2), np.int16).reshape(1, c, 1, 1)
    assert V.layernorm_wide_normalize(x, 1 << 61).tolist() == RV.layernorm_wide_normalize(x, 1 << 61).tolist()
    d = [c * v - int(x.sum()) for v in x.ravel().tolist()]
    assert sum(v * v for v in d) + (1 << 61) < 1 << 62
    with pytest.raises(ValueError, match=r"layernorm_wide: C = 1291"):
        V.layernorm_wide_normalize(np.zeros((1, 1291, 1, 1), np.int16), 1)
    g = np.full(8, 127, np.int8)
    bias = np.zeros(8, np.int32)
    m, s = np.full(8, 1 << 30, np.int32), np.full(8, 40, np.int8)
    x8 = np.arange(-4, 4, dtype=np.int8).reshape(1, 8, 1, 1)
    assert V.layernorm_wide(x8, 5, g, bias, m, s).tolist() == K.layernorm(x8, 5, g, bias, m, s).tolist()


# =============================================================================================
# weights: w4 and mixed power-of-two
# =============================================================================================

@SETTINGS
@given(k=st.sampled_from([1, 2]), cin=st.integers(1, 6), cout=st.integers(1, 4), rounding=roundings, data=st.data())
def test_conv2d_w4_matches_reference(k, cin, cout, rounding, data):
    x = data.draw(int_arrays(np.int8, (2, cin, 2 * k, k)))
    w = data.draw(int_arrays(np.int8, (cout, cin, k, k), -7, 7))
    lim = INT32_MAX - cin * k * k * 896
    bias = data.draw(int_arrays(np.int32, (cout,), -lim, lim))
    mult = data.draw(int_arrays(np.int32, (cout,), 0, INT32_MAX))
    shift = data.draw(int_arrays(np.int8, (cout,), 32, 62))
    got = V.conv2d_w4(x, w, bias, mult, shift, rounding=rounding)
    assert got.tolist() == RV.conv2d_w4(x, w, bias, mult, shift, rounding=rounding).tolist()


def test_conv2d_w4_bounds():
    terms = 3072
    x = np.full((1, terms, 1, 2), -128, np.int8)
    w = np.full((2, terms, 1, 1), -7, np.int8)
    lim = INT32_MAX - terms * 896                                       # tighter than int8's 2^31 - 1 - terms * 16256
    bias = np.array([lim, -lim], np.int32)
    m, s = np.full(2, 1 << 30, np.int32), np.full(2, 32, np.int8)
    got = V.conv2d_w4(x, w, bias, m, s, out_dtype=np.int32)
    assert got[0, :, 0, 0].tolist() == [rhu(Fraction(INT32_MAX, 4)), rhu(Fraction(-lim + terms * 896, 4))]
    with pytest.raises(ValueError, match="conv2d_w4: bias"):
        V.conv2d_w4(x, w, np.array([lim + 1, 0], np.int32), m, s)
    with pytest.raises(ValueError, match=r"conv2d_w4: weight \(4-bit codes\)"):
        V.conv2d_w4(x, np.full((2, terms, 1, 1), 8, np.int8), bias, m, s)
    # the int8 kernel accepts the same codes (they fit [-127, 127]) and computes the same result
    b0 = np.array([5, -9], np.int32)
    assert V.conv2d_w4(x, w, b0, m, s).tolist() == K.conv2d(x, w, b0, m, s).tolist()


@settings(max_examples=40, deadline=None)
@given(cout=st.integers(1, 12), kdim=st.integers(1, 9), seed=st.integers(0, 2 ** 31))
def test_per_channel_weight_w4(cout, kdim, seed):
    w = np.random.default_rng(seed).normal(size=(cout, kdim, 1, 1))
    w[0] = 0.0                                                          # an all-zero row
    codes, s = V.per_channel_weight_w4(w)
    assert codes.dtype == np.int8 and codes.shape == w.shape and np.abs(codes).max(initial=0) <= 7
    amax = np.abs(w.reshape(cout, -1)).max(axis=1)
    assert np.array_equal(s, np.where(amax > 0, amax / 7, 1.0))
    for o in range(cout):
        for v, c in zip(w[o].ravel(), codes[o].ravel()):                # float64 division, exact rounding
            assert int(c) == round_half_away(float(v) / float(s[o]))
    if cout > 1:
        assert np.abs(codes[1:]).max(axis=(1, 2, 3)).tolist() == [7] * (cout - 1)


def ref_pot_code(v: float, sp: float) -> int:
    a = Fraction(abs(v) / sp)                                           # the same IEEE division, then exact
    levels = [0] + [1 << k for k in range(7)]
    best = min(levels, key=lambda lev: (abs(a - lev), -lev))            # nearest, ties to the larger level
    return sign(v) * best


@settings(max_examples=30, deadline=None)
@given(cout=st.integers(1, 10), kdim=st.integers(1, 8), seed=st.integers(0, 2 ** 31),
       fraction=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 0.05]))
def test_per_channel_weight_mixed_pot(cout, kdim, seed, fraction):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(cout, kdim))
    if cout > 2:
        w[1] = [2.0 ** -(i % 3) for i in range(kdim)]                   # exactly PoT-representable row
        w[2] = w[1]                                                     # a tie with row 1: lower index first
    codes, s, pot = V.per_channel_weight_mixed_pot(w, fraction)
    assert codes.dtype == np.int8 and pot.dtype == np.bool_ and s.shape == (cout,)
    assert int(pot.sum()) == math.floor(Fraction(fraction) * cout + Fraction(1, 2))
    amax = np.abs(w).max(axis=1)
    keys = []
    for o in range(cout):
        sp_o, s8_o = amax[o] / 64, amax[o] / 127
        p = [ref_pot_code(v, sp_o) for v in w[o]]
        i8 = [round_half_away(float(v) / s8_o) for v in w[o]]             # float64 division, exact rounding
        ep = math.fsum((float(v) - c * sp_o) * (float(v) - c * sp_o) for v, c in zip(w[o], p))
        e8 = math.fsum((float(v) - c * s8_o) * (float(v) - c * s8_o) for v, c in zip(w[o], i8))
        keys.append(((Fraction(ep) / Fraction(e8)) if e8 else (Fraction(0) if ep == 0 else math.inf), o))
        if pot[o]:
            assert codes[o].tolist() == p and s[o] == sp_o
        else:
            assert codes[o].tolist() == i8 and s[o] == s8_o
    chosen = sorted(keys)[:int(pot.sum())]
    assert sorted(o for _, o in chosen) == np.flatnonzero(pot).tolist()
    if cout > 2 and 0 < pot.sum() < cout:
        assert not (pot[2] and not pot[1])                              # equal keys: the lower index wins
    pot_codes = np.abs(codes[pot].astype(int))
    assert np.all((pot_codes == 0) | ((pot_codes & (pot_codes - 1)) == 0)) and pot_codes.max(initial=0) <= 64


def test_conv2d_mixed_pot():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(6, 16, 1, 1))
    codes, s_w, pot = V.per_channel_weight_mixed_pot(w, 0.5)
    assert pot.sum() == 3
    x = rng.integers(-128, 128, size=(2, 16, 1, 3)).astype(np.int8)
    bias = rng.integers(-1000, 1000, size=6).astype(np.int32)
    m, s = np.full(6, 1 << 30, np.int32), np.full(6, 40, np.int8)
    for rounding in ROUNDINGS:
        got = V.conv2d_mixed_pot(x, codes, bias, m, s, pot, rounding=rounding)
        assert got.tolist() == RV.conv2d_mixed_pot(x, codes, bias, m, s, pot, rounding=rounding).tolist()
    bad = codes.copy()
    bad[np.flatnonzero(pot)[0], 0, 0, 0] = 3
    with pytest.raises(ValueError, match="conv2d_mixed_pot: weight rows flagged"):
        V.conv2d_mixed_pot(x, bad, bias, m, s, pot)
    with pytest.raises(ValueError, match="conv2d_mixed_pot: pot_rows"):
        V.conv2d_mixed_pot(x, codes, bias, m, s, pot.astype(np.int8))
    # dequantized error: PoT rows are chosen where PoT costs least relative to int8
    err = lambda o: float(np.sum((w[o].ravel() - codes[o].ravel() * s_w[o]) ** 2))
    assert all(np.isfinite(err(o)) for o in range(6))
    with pytest.raises(ValueError, match="fraction"):
        V.per_channel_weight_mixed_pot(w, 1.5)
