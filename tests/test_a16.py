"""16-bit activations (act_bits 16, the scheme a16w8; docs/spec.md Part 7).

1. apply_scale_16 / requantize_16 and every a16 kernel: fast (refvit.intmath, refvit.int_kernels_a16) ==
   reference (refvit.reference.arith, refvit.reference.a16) on hypothesis draws (deterministic: the "ci" profile of
   conftest.py), outputs and internals in dtype and value; boundary cases (ties, the int48 extremes, saturation,
   softmax rows that are all equal / one key far above / beyond 2^47 - 1, N = 1, all 65536 GELU inputs, constant
   and extreme LayerNorm rows in both roundings) against expected values computed here with Python integers;
   the argument errors (ValueError naming the kernel).
2. The whole model quantized with a16w8 (both roundings): int16 activations and input, fast == reference with
   internals, the roundings differ, the file round trip, scheme_of; the scheme errors; the CLI (golden, check).
3. The conformance cases of the a16 kernels (conformance/cases.py `_a16_specs`): refvit passes them with both
   kernel sets, and a DUT that computes a neighbouring choice fails them.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conformance import ERROR, FAIL, PASS, RefvitDUT, run_cases, select
from conformance.cases import get_case, random_quantized_model
from conformance.dut import use_kernels
from refvit import int_kernels as K
from refvit import int_kernels_a16 as KA16
from refvit import int_kernels_variants as KV
from refvit import int_model
from refvit import intmath as im
from refvit.cli import main
from refvit.graph import SCHEMES, GraphError, Scheme, Trace, build_graph, input_dtype, scheme_of
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.qfile import load_quantized, save_quantized
from refvit.reference import a16 as RA16
from refvit.reference import arith

ROUNDINGS = (SINGLE_ROUND, DOUBLE_ROUND)
ACC48 = (1 << 47) - 1
M16 = (1 << 15) - 1
SETTINGS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2 ** 32 - 1)
fills = st.sampled_from(("random", "min", "max", "extreme", "small"))


# ---------------------------------------------------------------------------------------------
# helpers: comparisons and independent Python-int computations
# ---------------------------------------------------------------------------------------------

def assert_same(got, want, what="output"):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.array_equal(got, want), f"{what}: values differ at {np.argwhere(got != want)[:3].tolist()}"


def run_both(name, *args, **kw):
    """The fast kernel `name` and its reference on the same arguments: the same output (dtype, shape, values)
    with and without internals, the same internals; or the same exception class. Returns the output or None."""
    fast, ref = getattr(KA16, name), getattr(RA16, name)
    try:
        want = fast(*args, **kw)
    except (ValueError, OverflowError) as e:
        with pytest.raises(type(e)):
            ref(*args, **kw)
        return None
    assert_same(ref(*args, **kw), want)
    if name not in ("attention_scores_a16", "gelu_a16"):
        kf, kr = {}, {}
        assert_same(fast(*args, **kw, internals=kf), want, "output with internals")
        assert_same(ref(*args, **kw, internals=kr), want, "reference output with internals")
        assert set(kf) == set(kr) and kf
        for k in kf:
            assert_same(kr[k], kf[k], f"internal {k}")
    return want


def py_scale16(v: int, m: int, s: int) -> int:
    """apply_scale_16 on Python integers: (v m + 2^(s-1)) >> s (floor shift)."""
    return (int(v) * int(m) + (1 << (int(s) - 1))) >> int(s)


def py_sat(v: int, dtype) -> int:
    info = np.iinfo(dtype)
    return min(max(int(v), int(info.min)), int(info.max))


def ints(rng, shape, fill, lo, hi, dtype):
    """Values in [lo, hi]: random, all lo, all hi, lo/hi mixed, or small."""
    if fill == "min":
        return np.full(shape, lo, dtype)
    if fill == "max":
        return np.full(shape, hi, dtype)
    if fill == "extreme":
        return np.where(rng.integers(0, 2, shape) == 0, lo, hi).astype(dtype)
    if fill == "small":
        return rng.integers(max(lo, -4), min(hi, 4) + 1, shape).astype(dtype)
    return rng.integers(lo, hi, shape, endpoint=True).astype(dtype)


def py_conv(x, w, bias, m, s, out_dtype=np.int16):
    """conv2d_a16 with Python integers (object arrays): acc = bias + sum x w, out = saturate(apply_scale_16)."""
    B, Cin, H, W = x.shape
    Cout, _, k, _ = w.shape
    xs = x.astype(object).reshape(B, Cin, H // k, k, W // k, k)
    acc = np.tensordot(xs, w.astype(object), axes=([1, 3, 5], [1, 2, 3]))          # (B, Ho, Wo, Cout)
    acc = np.moveaxis(acc, 3, 1) + bias.astype(object).reshape(1, Cout, 1, 1)         # (B, Cout, Ho, Wo)
    out = np.empty(acc.shape, out_dtype)
    for idx in np.ndindex(acc.shape):
        out[idx] = py_sat(py_scale16(acc[idx], m[idx[1]], s[idx[1]]), out_dtype)
    return acc, out


def py_softmax(scores, m, s, table):
    """softmax_a16 row by row with Python integers."""
    L, out = len(table), np.empty(scores.shape, np.int16)
    for idx in np.ndindex(scores.shape[:-1]):
        row = [int(v) for v in scores[idx]]
        e = [int(table[min(py_scale16(min(max(row) - v, ACC48), m, s), L - 1)]) for v in row]
        recip = (1 << 40) // sum(e)
        out[idx] = [py_sat((ei * 32767 * recip + (1 << 39)) >> 40, np.int16) for ei in e]
    return out


def py_context(p, v, m, s):
    """attention_context_a16 with Python integers -> (acc (object), out int16)."""
    acc = np.matmul(v.astype(object), np.swapaxes(p.astype(object), 2, 3))          # (B, Hh, D, N)
    out = np.empty(acc.shape, np.int16)
    for idx in np.ndindex(acc.shape):
        out[idx] = py_sat(py_scale16(acc[idx], m, s), np.int16)
    return acc, out


def py_layernorm_t(x, eps_int):
    """layernorm_wide_normalize with Python integers: t (B, C, H, W) as an object array."""
    B, C, H, W = x.shape
    t = np.empty(x.shape, object)
    for b, h, w in np.ndindex(B, H, W):
        col = [int(v) for v in x[b, :, h, w]]
        total = sum(col)
        d = [C * v - total for v in col]
        r = math.isqrt(sum(di * di for di in d) + int(eps_int))
        inv = (1 << 40) // r
        t[b, :, h, w] = [(di * inv + (1 << 23)) >> 24 for di in d]
    return t


# ---------------------------------------------------------------------------------------------
# 1a. apply_scale_16, requantize_16
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, size=st.integers(1, 64))
def test_apply_scale_16_fast_equals_reference_and_python(seed, size):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 48, size)
    v = (rng.integers(-(1 << 47) + 1, 1 << 47, size) >> (47 - bits)).astype(np.int64)   # every magnitude
    if size >= 2:
        v[:2] = [ACC48, -ACC48]
    m = rng.integers(0, M16 + 1, size).astype(np.int64)
    s = rng.integers(2, 63, size).astype(np.int64)
    want = np.array([py_scale16(a, b, c) for a, b, c in zip(v, m, s)], np.int64)
    assert_same(im.apply_scale_16(v, m, s), want)
    assert_same(arith.apply_scale_16(v, m, s), want)
    sat = np.array([py_sat(w, np.int16) for w in want], np.int16)
    assert_same(im.requantize_16(v, m, s), sat)
    assert_same(arith.requantize_16(v, m, s), sat)
    assert_same(im.requantize_16(v, m, s, np.int32), arith.requantize_16(v, m, s, np.int32))


@pytest.mark.parametrize("v, m, s, want", [
    (3, 1 << 14, 15, 2), (-3, 1 << 14, 15, -1),          # value*m exactly on a half: ties up (toward +inf)
    (1, 1, 2, 0), (-1, 1, 2, 0), (2, 1, 2, 1), (-2, 1, 2, 0), (-6, 1, 2, -1),   # 1/4, -1/4, 1/2, -1/2, -3/2
    (ACC48, M16, 62, 1), (-ACC48, M16, 62, -1),          # (2^62 - 2^47 - 2^15 + 1) / 2^62 ~ +-0.99997
    (ACC48, M16, 2, (1 << 60) - (1 << 45) - (1 << 13)), (-ACC48, M16, 2, -(1 << 60) + (1 << 45) + (1 << 13)),
    (ACC48, 0, 30, 0), (0, M16, 62, 0),
    ((1 << 46) + (1 << 45), 1 << 14, 61, 1),             # 1.5 * 2^60 / 2^61 = 0.75 -> 1
    (-(1 << 46), 1 << 14, 61, 0),                         # -2^60 / 2^61 = -1/2: a tie, up -> 0
    (-(1 << 46) - 1, 1 << 14, 61, -1),                    # just below it
])
def test_apply_scale_16_boundaries(v, m, s, want):
    """Hand-computed values, and the same formula on Python integers."""
    assert py_scale16(v, m, s) == want
    for fn in (im.apply_scale_16, arith.apply_scale_16):
        got = fn(np.int64(v), m, s)
        assert np.asarray(got).dtype == np.int64 and int(got) == want, fn.__module__
        got = fn(np.array([v, v]), np.array([m, m]), np.array([s, s]))
        assert got.dtype == np.int64 and got.tolist() == [want, want], fn.__module__


def test_apply_scale_16_tie_values_spelled_out():
    """The ties of the brief, values written by hand: 3 * 2^14 / 2^15 = 1.5 -> 2; -1.5 -> -1; the int48 extreme
    at the largest multiplier and shift: (2^47 - 1)(2^15 - 1) / 2^62 ~ 0.99997 -> 1, and -0.99997 -> -1."""
    for fn in (im.apply_scale_16, arith.apply_scale_16):
        assert int(fn(3, 1 << 14, 15)) == 2 and int(fn(-3, 1 << 14, 15)) == -1
        assert int(fn(ACC48, M16, 62)) == 1 and int(fn(-ACC48, M16, 62)) == -1
        assert int(fn(-(1 << 46), 1 << 14, 61)) == 0          # -1/2 exactly: ties go up
        assert int(fn(-(1 << 46) - 1, 1 << 14, 61)) == -1     # just below the tie


def test_requantize_16_saturates_at_int16():
    v = np.array([ACC48, -ACC48, 32767 << 10, (32767 << 10) + 512, -(32768 << 10), -(32768 << 10) - 513], np.int64)
    want = np.array([32767, -32768, 32767, 32767, -32768, -32768], np.int16)
    for fn in (im.requantize_16, arith.requantize_16):
        assert_same(fn(v, 1 << 14, 24), want)                 # m 2^14, shift 24: v / 2^10
        assert_same(fn(np.array([(32767 << 10) - 1, -(32768 << 10) + 511]), 1 << 14, 24),
                    np.array([32767, -32768], np.int16))


def test_apply_scale_16_broadcasts_like_the_reference():
    """A scalar value against per-element shifts: the fast code gives the reference's broadcast result."""
    v, s = np.array([3]), np.array([15, 16])
    want = np.array([py_scale16(3, 1 << 14, 15), py_scale16(3, 1 << 14, 16)])
    assert_same(arith.apply_scale_16(v, 1 << 14, s), want)
    assert_same(im.apply_scale_16(v, 1 << 14, s), want)


@SETTINGS
@given(scale=st.floats(2.0 ** -80, 8191.0, allow_nan=False, allow_infinity=False) | st.sampled_from(
    [8191.875 - 2.0 ** -40, 2.0 ** -48, 2.0 ** -47 * (1 - 2.0 ** -20), 1.0, 0.5 + 2.0 ** -17, 0.75]))
def test_quantize_multiplier16_is_the_exact_rounding(scale):
    """m 2^-s ~ scale with the 15-bit mantissa rounded half up (exact rationals): m in [2^14, 2^15) at s =
    15 - e (scale = f 2^e, f in [1/2, 1)), one shift less when it rounds up to 2^15, s clamped at 62."""
    from fractions import Fraction
    m, s = im.quantize_multiplier16(scale)
    assert 0 <= m <= M16 and 2 <= s <= 62
    e = math.frexp(scale)[1]
    s_want = min(15 - e, 62)
    x = Fraction(scale) * 2 ** s_want
    m_want = math.floor(x + Fraction(1, 2))
    if m_want == 1 << 15:
        m_want, s_want = 1 << 14, s_want - 1
    assert (m, s) == (m_want, s_want)
    if s < 62:
        assert 1 << 14 <= m
    assert abs(Fraction(m, 2 ** s) - Fraction(scale)) <= Fraction(1, 2 ** (s + 1))


def test_quantize_multiplier16_edges():
    assert im.quantize_multiplier16(0.0) == (0, 62)
    assert im.quantize_multiplier16(0.5) == (1 << 14, 15)
    assert im.quantize_multiplier16(2.0 ** -80) == (0, 62)
    for bad in (8191.875, 1e6, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="quantize_multiplier16"):
            im.quantize_multiplier16(bad)


@pytest.mark.parametrize("v, m, s", [(0, 1 << 15, 10), (0, -1, 10), (0, 1, 1), (0, 1, 63), (1 << 47, 1, 10),
                                     (-(1 << 47), 1, 10)])
def test_apply_scale_16_domain_errors(v, m, s):
    for fn in (im.apply_scale_16, arith.apply_scale_16, im.requantize_16, arith.requantize_16):
        with pytest.raises(ValueError, match="apply_scale_16"):
            fn(np.int64(v), m, s)


# ---------------------------------------------------------------------------------------------
# 1b. conv2d_a16
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, k=st.sampled_from((1, 2)), cin=st.integers(1, 6), cout=st.integers(1, 5), xfill=fills,
       wfill=fills, out=st.sampled_from((np.int16, np.int32)), bias_at_edge=st.booleans())
def test_conv2d_a16_fast_equals_reference(seed, k, cin, cout, xfill, wfill, out, bias_at_edge):
    rng = np.random.default_rng(seed)
    x = ints(rng, (2, cin, 2 * k, 3 * k), xfill, -32768, 32767, np.int16)
    w = ints(rng, (cout, cin, k, k), wfill, -127, 127, np.int8)
    head = ACC48 - cin * k * k * (1 << 15) * 127
    bias = rng.choice([-head, head], cout) if bias_at_edge else rng.integers(-(1 << 40), 1 << 40, cout)
    bias = bias.astype(np.int64)
    m = rng.integers(0, M16 + 1, cout).astype(np.int16)
    s = rng.integers(2, 63, cout).astype(np.int8)
    got = run_both("conv2d_a16", x, w, bias, m, s, out_dtype=out)
    acc, want = py_conv(x, w, bias, m, s, out)
    assert_same(got, want)
    kept = {}
    KA16.conv2d_a16(x, w, bias, m, s, out_dtype=out, internals=kept)
    assert kept["acc"].dtype == np.int64 and np.array_equal(kept["acc"].astype(object), acc)


def test_conv2d_a16_int48_headroom_exact():
    """x = -32768, w = -127 (channel 0) / +127 (channel 1), bias exactly at the int48 headroom: acc = +-(2^47 - 1)
    with m = 2^15 - 1, shift 62 (-> +-1) and shift 33 (-> saturated); one more in the bias is a ValueError."""
    cin, k = 64, 2
    x = np.full((1, cin, 2, 4), -32768, np.int16)
    w = np.stack([np.full((cin, k, k), -127), np.full((cin, k, k), 127),
                  np.full((cin, k, k), -127)]).astype(np.int8)
    head = ACC48 - cin * k * k * (1 << 15) * 127
    bias = np.array([head, -head, -head], np.int64)
    m = np.full(3, M16, np.int16)
    s = np.array([62, 62, 33], np.int8)
    kept = {}
    got = run_both("conv2d_a16", x, w, bias, m, s)
    KA16.conv2d_a16(x, w, bias, m, s, internals=kept)
    acc0 = cin * k * k * 32768 * 127 + head
    assert acc0 == ACC48
    assert kept["acc"][0, 0].tolist() == [[ACC48, ACC48]] and kept["acc"][0, 1].tolist() == [[-ACC48, -ACC48]]
    assert got.dtype == np.int16 and got[0, 0].ravel().tolist() == [1, 1] and got[0, 1].ravel().tolist() == [-1, -1]
    mid = cin * k * k * 32768 * 127 - head                  # channel 2: w = -127 with bias -head
    assert got[0, 2].ravel().tolist() == [py_sat(py_scale16(mid, M16, 33), np.int16)] * 2
    for fn in (KA16.conv2d_a16, RA16.conv2d_a16):
        with pytest.raises(ValueError, match="conv2d_a16"):
            fn(x, w, bias + np.array([1, 0, 0]), m, s)
        with pytest.raises(ValueError, match="conv2d_a16"):
            fn(x, w, bias - np.array([0, 1, 0]), m, s)


def test_conv2d_a16_ties_and_saturation():
    """Cin 1, weight +-1, bias 4, x in 8Z, m 2^14, shift 17 (acc / 8): every acc = +-x + 4 is a tie (j + 1/2);
    m 2^15 - 1 at shift 3 and large x saturate at int16."""
    x = (np.arange(-64, 64, dtype=np.int64) * 8).astype(np.int16).reshape(1, 1, 1, 128)
    w = np.array([1, -1], np.int8).reshape(2, 1, 1, 1)
    bias = np.array([4, 4], np.int64)
    for m, s in ((1 << 14, 17), (M16, 3)):
        mm, ss = np.full(2, m, np.int16), np.full(2, s, np.int8)
        got = run_both("conv2d_a16", x, w, bias, mm, ss)
        assert_same(got, py_conv(x, w, bias, mm, ss)[1])
    got = KA16.conv2d_a16(x * 64, w, bias, np.full(2, M16, np.int16), np.full(2, 3, np.int8))
    assert got.min() == -32768 and got.max() == 32767


# ---------------------------------------------------------------------------------------------
# 1c. attention_scores_a16, softmax_a16, attention_context_a16
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, d=st.integers(1, 8), n=st.integers(1, 6), fill=fills)
def test_attention_scores_a16_fast_equals_reference(seed, d, n, fill):
    rng = np.random.default_rng(seed)
    q = ints(rng, (2, 2, d, n), fill, -32768, 32767, np.int16)
    k = ints(rng, (2, 2, d, n), fill, -32768, 32767, np.int16)
    got = run_both("attention_scores_a16", q, k)
    want = np.matmul(np.swapaxes(q.astype(object), 2, 3), k.astype(object))
    assert got.dtype == np.int64 and np.array_equal(got.astype(object), want)


def test_attention_scores_a16_extremes():
    """q = k = -32768 over D = 64: s = 64 * 2^30 = 2^36; q = -32768, k = 32767: -64 * 32768 * 32767."""
    q = np.full((1, 1, 64, 3), -32768, np.int16)
    k = np.stack([np.full((64, 3), -32768), np.full((64, 3), 32767)])[:, None].astype(np.int16)   # (2, 1, 64, 3)
    got = run_both("attention_scores_a16", np.concatenate([q, q]), k)
    assert got.dtype == np.int64
    assert set(got[0].ravel().tolist()) == {1 << 36} and set(got[1].ravel().tolist()) == {-64 * 32768 * 32767}


def _table(rng, kind, size, bits):
    if kind == "shipped":
        return KV.make_exp_table_n(size, bits)
    t = rng.integers(0, K.EXP_ONE + 1, size).astype(np.uint16)
    t[0] = K.EXP_ONE
    return t


@SETTINGS
@given(seed=seeds, n=st.integers(1, 12), size=st.sampled_from(KV.EXP_TABLE_SIZES), bits=st.integers(0, 8),
       kind=st.sampled_from(("shipped", "random")), spread=st.integers(0, 47), shift=st.integers(2, 62))
def test_softmax_a16_fast_equals_reference_and_python(seed, n, size, bits, kind, spread, shift):
    rng = np.random.default_rng(seed)
    half = (1 << spread) >> 1
    scores = rng.integers(-half, half + 1, (2, 3, n)).astype(np.int64)
    if spread == 47:                                         # the int48 extremes in one row
        scores[0, 0, :2] = [ACC48, -ACC48][:n]
    m = int(rng.integers(0, M16 + 1))
    table = _table(rng, kind, size, bits)
    got = run_both("softmax_a16", scores, m, shift, table)
    if got is None:                                          # OverflowError: d beyond 2^47 - 1, not saturated
        assert int((scores.max(-1, keepdims=True) - scores).max()) > ACC48
        assert py_scale16(ACC48, m, shift) < size - 1
        return
    assert_same(got, py_softmax(scores, m, shift, table))


def test_softmax_a16_all_keys_equal():
    """d = 0 everywhere: idx 0, e = 2^15, sigma = N 2^15, p = round(2^15 * 32767 * floor(2^25 / N) / 2^40)."""
    table = KV.make_exp_table_n(4096, 8)
    for n in (1, 2, 3, 7, 197, 1000):
        scores = np.full((1, n), 123456789, np.int64)
        kept = {}
        got = run_both("softmax_a16", scores, M16, 40, table)
        KA16.softmax_a16(scores, M16, 40, table, internals=kept)
        recip = (1 << 25) // n
        p = ((1 << 15) * 32767 * recip + (1 << 39)) >> 40
        assert got.dtype == np.int16 and set(got.ravel().tolist()) == {p}, n
        assert abs(p - 32767 / n) <= 1                   # (N = 2: 16384 each, a tie rounded up)
        assert set(kept["index"].ravel().tolist()) == {0} and kept["sum"].ravel().tolist() == [n << 15]
        assert kept["recip"].ravel().tolist() == [recip]
    assert int(KA16.softmax_a16(np.array([[5]], np.int64), 0, 2, table)[0, 0]) == 32767      # N = 1


def test_softmax_a16_one_key_far_above():
    """One key 2^40 above the rest (scale 2^-20: d / 2^20 >> 4095): the others' index clamps at L - 1 where
    the shipped 4096-entry table at 2^-8 is 0 (2^15 e^-16 < 1/2): p = 32767 for that key, 0 elsewhere."""
    table = KV.make_exp_table_n(4096, 8)
    assert int(table[-1]) == 0 and round(2 ** 15 * math.exp(-4095 / 256)) == 0
    scores = np.zeros((2, 5), np.int64)
    scores[0, 3] = scores[1, 0] = 1 << 40
    kept = {}
    got = run_both("softmax_a16", scores, 1 << 14, 34, table)
    KA16.softmax_a16(scores, 1 << 14, 34, table, internals=kept)
    want = np.zeros((2, 5), np.int16)
    want[0, 3] = want[1, 0] = 32767
    assert_same(got, want)
    assert sorted(set(kept["index"].ravel().tolist())) == [0, 4095]


def test_softmax_a16_differences_beyond_int48_are_capped():
    """max - s up to 2^48 - 2: min(d, 2^47 - 1) is rescaled; a rescale that reaches L - 1 at 2^47 - 1 saturates
    it (m 1, shift 20: 2^27 >= 63); one that does not (m 1, shift 62) is an OverflowError naming the kernel."""
    table = KV.make_exp_table_n(64, 2)
    scores = np.array([[ACC48, -ACC48, 0, ACC48 - 5]], np.int64)
    kept = {}
    got = run_both("softmax_a16", scores, 1, 20, table)
    KA16.softmax_a16(scores, 1, 20, table, internals=kept)
    assert kept["index"].tolist() == [[0, 63, 63, 0]]
    assert_same(got, py_softmax(scores, 1, 20, table))
    for fn in (KA16.softmax_a16, RA16.softmax_a16):
        with pytest.raises(OverflowError, match="softmax_a16"):
            fn(scores, 1, 62, table)
        fn(scores[:, 2:], 1, 62, table)                      # d <= 2^47 - 1: no cap needed, no error


def _p16(rng, shape, fill):
    return ints(rng, shape, fill, 0, 32767, np.int16)


@SETTINGS
@given(seed=seeds, d=st.integers(1, 6), n=st.integers(1, 9), pfill=fills, vfill=fills, shift=st.integers(2, 62))
def test_attention_context_a16_fast_equals_reference_and_python(seed, d, n, pfill, vfill, shift):
    rng = np.random.default_rng(seed)
    p = _p16(rng, (2, 2, n, n), pfill)
    v = ints(rng, (2, 2, d, n), vfill, -32768, 32767, np.int16)
    m = int(rng.integers(0, M16 + 1))
    got = run_both("attention_context_a16", p, v, m, shift)
    acc, want = py_context(p, v, m, shift)
    assert_same(got, want)
    kept = {}
    KA16.attention_context_a16(p, v, m, shift, internals=kept)
    assert kept["acc"].dtype == np.int64 and np.array_equal(kept["acc"].astype(object), acc)


def test_attention_context_a16_p_one_everywhere():
    """p = 32767 everywhere (N = 197), v = -32768 / 32767 / random: acc = 32767 * sum_j v, the largest at
    -197 * 32767 * 32768; rescaled by m 2^14, shift 40 (and saturating with shift 20)."""
    rng = np.random.default_rng(0)
    n = 197
    p = np.full((1, 2, n, n), 32767, np.int16)
    v = np.stack([np.full((3, n), -32768), rng.integers(-32768, 32768, (3, n))])[None].astype(np.int16)
    for m, s in ((1 << 14, 40), (M16, 20)):
        got = run_both("attention_context_a16", p, v, m, s)
        acc, want = py_context(p, v, m, s)
        assert acc[0, 0, 0, 0] == -n * 32767 * 32768
        assert_same(got, want)
    assert set(KA16.attention_context_a16(p, v, M16, 20)[0, 0].ravel().tolist()) == {-32768}


# ---------------------------------------------------------------------------------------------
# 1d. layernorm_a16, gelu_a16
# ---------------------------------------------------------------------------------------------

def _ln_tail(rng, c):
    return {"gamma": rng.integers(-127, 128, c).astype(np.int8), "bias": rng.integers(-(1 << 20), 1 << 20, c)
            .astype(np.int32), "multiplier": rng.integers(1 << 30, 1 << 31, c).astype(np.int32),
            "shift": rng.integers(25, 40, c).astype(np.int8)}


@SETTINGS
@given(seed=seeds, c=st.sampled_from((1, 2, 7, 48, 1290)), n=st.integers(1, 4), fill=fills,
       rounding=st.sampled_from(ROUNDINGS), eps_bits=st.integers(0, 61))
def test_layernorm_a16_fast_equals_reference(seed, c, n, fill, rounding, eps_bits):
    rng = np.random.default_rng(seed)
    x = ints(rng, (2, c, 1, n), fill, -32768, 32767, np.int16)
    tail = _ln_tail(rng, c)
    got = run_both("layernorm_a16", x, np.int64(1 << eps_bits), *tail.values(), rounding=rounding)
    assert got.dtype == np.int16
    t = py_layernorm_t(x, 1 << eps_bits)
    kept = {}
    KA16.layernorm_a16(x, np.int64(1 << eps_bits), *tail.values(), rounding=rounding, internals=kept)
    assert np.array_equal(kept["t"].astype(object), t)
    acc = t * tail["gamma"].astype(object).reshape(1, c, 1, 1) + tail["bias"].astype(object).reshape(1, c, 1, 1)
    m, s = (tail[k].astype(np.int64).reshape(1, c, 1, 1) for k in ("multiplier", "shift"))
    assert_same(got, arith.requantize(acc.astype(np.int64), m, s, np.int16, rounding))


def test_layernorm_a16_constant_and_extreme_rows_both_roundings():
    """Rows: constant (d = 0: t = 0, out = requantize(bias)), -32768 / 32767 alternating, one 32767 among
    -32768, all -32768. Tail: gamma 1, multiplier 2^30, shift 33 (acc / 8) with bias 8 * 20000 - 4 on even
    channels: the constant rows' outputs are 19999.5, a positive tie: 20000 in both modes; bias -8 * 300 - 4 on
    odd channels: -300.5, a negative tie: SINGLE -300, DOUBLE -301 (int16 values beyond int8)."""
    c, n = 16, 4
    x = np.empty((1, c, 1, n), np.int16)
    x[0, :, 0, 0] = 1234
    x[0, :, 0, 1] = np.where(np.arange(c) % 2 == 0, -32768, 32767)
    x[0, :, 0, 2] = -32768
    x[0, 5, 0, 2] = 32767
    x[0, :, 0, 3] = -32768
    gamma = np.ones(c, np.int8)
    bias = np.where(np.arange(c) % 2 == 0, 8 * 20000 - 4, -8 * 300 - 4).astype(np.int32)
    mult, shift = np.full(c, 1 << 30, np.int32), np.full(c, 33, np.int8)
    outs = {}
    for rounding in ROUNDINGS:
        got = run_both("layernorm_a16", x, np.int64(1), gamma, bias, mult, shift, rounding=rounding)
        t = py_layernorm_t(x, 1)
        acc = (t + bias.astype(object).reshape(1, c, 1, 1)).astype(np.int64)
        assert_same(got, arith.requantize(acc, mult.reshape(1, c, 1, 1).astype(np.int64),
                                          shift.reshape(1, c, 1, 1).astype(np.int64), np.int16, rounding))
        outs[rounding] = got
    const = {r: o[0, :, 0, 0].tolist() for r, o in outs.items()}
    assert const[SINGLE_ROUND] == [20000, -300] * (c // 2)
    assert const[DOUBLE_ROUND] == [20000, -301] * (c // 2)
    assert set(outs[SINGLE_ROUND][0, :, 0, 3].tolist()) == set(outs[SINGLE_ROUND][0, :, 0, 0].tolist())  # d = 0
    assert np.any(outs[SINGLE_ROUND] != outs[DOUBLE_ROUND])


def test_gelu_a16_all_65536_inputs():
    """Every int16 x against a random int16 table: out = table[x + 32768] by Python indexing; and the shipped
    table builder's values at a few points (round_half_away(gelu(x s_in) / s_out), saturated)."""
    rng = np.random.default_rng(7)
    table = rng.integers(-32768, 32768, 1 << 16).astype(np.int16)
    x = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16).reshape(1, 256, 1, 256)
    want = np.array([table[int(v) + 32768] for v in x.ravel()], np.int16).reshape(x.shape)
    assert_same(run_both("gelu_a16", x, table), want)
    xs = x[:, :, :, ::-1].copy()[..., 3:200]                 # a non-contiguous view
    assert_same(run_both("gelu_a16", xs, table), want[:, :, :, ::-1][..., 3:200])
    assert_same(run_both("gelu_a16", np.array(-32768, np.int16), table), np.array(table[0]))
    g = KA16.make_gelu_table16(0.001, 0.002)
    assert g.dtype == np.int16 and g.shape == (1 << 16,)

    def gelu_code(i):
        xr = (i - 32768) * 0.001
        y = 0.5 * xr * (1 + math.erf(xr / math.sqrt(2))) / 0.002
        return py_sat(math.floor(abs(y) + 0.5) * (1 if y >= 0 else -1), np.int16)
    for i in (0, 1, 32767, 32768, 32769, 40000, 65535):
        assert int(g[i]) == gelu_code(i), i
    assert_same(RA16.make_gelu_table16(0.001, 0.002), g)


def test_concat_tokens_on_int16():
    """Part 2's concat_tokens takes int16 prefix and patches (both): [prefix | patches] per image; mixed widths
    are refused by both implementations."""
    from refvit.reference import kernels as RK
    rng = np.random.default_rng(3)
    pre, pat = rng.integers(-32768, 32768, (1, 3, 1, 2)).astype(np.int16), rng.integers(-32768, 32768, (2, 3, 1, 4))
    pat = pat.astype(np.int16)
    want = np.empty((2, 3, 1, 6), np.int16)
    for b in range(2):
        for c in range(3):
            want[b, c, 0] = [int(v) for v in pre[0, c, 0]] + [int(v) for v in pat[b, c, 0]]
    for fn in (K.concat_tokens, RK.concat_tokens):
        assert_same(fn(pre, pat), want)
        for a, b in ((pre.astype(np.int8), pat), (pre, pat.astype(np.int8))):
            with pytest.raises(ValueError, match="concat_tokens"):
                fn(a, b)


# ---------------------------------------------------------------------------------------------
# 1e. argument errors: ValueError naming the kernel, fast and reference alike
# ---------------------------------------------------------------------------------------------

def _conv_args(**over):
    a = {"x": np.zeros((1, 2, 1, 3), np.int16), "weight": np.ones((2, 2, 1, 1), np.int8),
         "bias": np.zeros(2, np.int64), "multiplier": np.full(2, 1 << 14, np.int16), "shift": np.full(2, 20, np.int8)}
    return a | over


def _softmax_args(**over):
    a = {"scores": np.zeros((1, 4), np.int64), "multiplier": 1 << 14, "shift": 20,
         "exp_table": KV.make_exp_table_n(64, 2)}
    return a | over


def _context_args(**over):
    a = {"p": np.zeros((1, 1, 3, 3), np.int16), "v": np.zeros((1, 1, 2, 3), np.int16), "multiplier": 1 << 14,
         "shift": 20}
    return a | over


def _ln_args(**over):
    c = 4
    a = {"x": np.zeros((1, c, 1, 2), np.int16), "eps_int": np.int64(1), "gamma": np.ones(c, np.int8),
         "bias": np.zeros(c, np.int32), "multiplier": np.full(c, 1 << 30, np.int32), "shift": np.full(c, 30, np.int8)}
    return a | over


BAD = [
    ("conv2d_a16", _conv_args(x=np.zeros((1, 2, 1, 3), np.int8))),
    ("conv2d_a16", _conv_args(x=np.zeros((1, 2, 1, 3), np.int32))),
    ("conv2d_a16", _conv_args(weight=np.ones((2, 2, 1, 1), np.int16))),
    ("conv2d_a16", _conv_args(weight=np.full((2, 2, 1, 1), -128, np.int8))),
    ("conv2d_a16", _conv_args(bias=np.zeros(2, np.int32))),
    ("conv2d_a16", _conv_args(multiplier=np.full(2, 1 << 15, np.int32))),
    ("conv2d_a16", _conv_args(multiplier=np.full(2, -1, np.int16))),
    ("conv2d_a16", _conv_args(shift=np.full(2, 1, np.int8))),
    ("conv2d_a16", _conv_args(shift=np.full(2, 63, np.int8))),
    ("conv2d_a16", _conv_args(bias=np.full(2, 1 << 47, np.int64))),
    ("attention_scores_a16", {"q": np.zeros((1, 1, 2, 3), np.int8), "k": np.zeros((1, 1, 2, 3), np.int8)}),
    ("attention_scores_a16", {"q": np.zeros((1, 1, 2, 3), np.int16), "k": np.zeros((1, 1, 2, 4), np.int16)}),
    ("softmax_a16", _softmax_args(scores=np.zeros((1, 4), np.int32))),
    ("softmax_a16", _softmax_args(scores=np.array([[1 << 47, 0]], np.int64))),
    ("softmax_a16", _softmax_args(scores=np.array([[-(1 << 47), 0]], np.int64))),
    ("softmax_a16", _softmax_args(multiplier=1 << 15)),
    ("softmax_a16", _softmax_args(shift=1)),
    ("softmax_a16", _softmax_args(shift=63)),
    ("softmax_a16", _softmax_args(exp_table=KV.make_exp_table_n(64, 2).astype(np.int32))),
    ("softmax_a16", _softmax_args(exp_table=np.full(100, 1 << 15, np.uint16))),
    ("softmax_a16", _softmax_args(exp_table=np.full(64, 100, np.uint16))),
    ("softmax_a16", _softmax_args(scores=np.zeros((1, 0), np.int64))),
    ("attention_context_a16", _context_args(v=np.zeros((1, 1, 2, 3), np.int8))),
    ("attention_context_a16", _context_args(p=np.zeros((1, 1, 3, 3), np.int8))),
    ("attention_context_a16", _context_args(p=np.full((1, 1, 3, 3), -1, np.int16))),
    ("attention_context_a16", _context_args(multiplier=1 << 15)),
    ("attention_context_a16", _context_args(shift=1)),
    ("attention_context_a16", _context_args(shift=63)),
    ("layernorm_a16", _ln_args(x=np.zeros((1, 4, 1, 2), np.int8))),
    ("layernorm_a16", _ln_args(gamma=np.full(4, -128, np.int8))),
    ("layernorm_a16", _ln_args(eps_int=np.int64(0))),
    ("layernorm_a16", _ln_args(x=np.zeros((1, 1291, 1, 2), np.int16), gamma=np.ones(1291, np.int8),
                               bias=np.zeros(1291, np.int32), multiplier=np.full(1291, 1 << 30, np.int32),
                               shift=np.full(1291, 30, np.int8))),
    ("gelu_a16", {"x": np.zeros(4, np.int8), "table": np.zeros(1 << 16, np.int16)}),
    ("gelu_a16", {"x": np.zeros(4, np.int16), "table": np.zeros(1 << 16, np.int8)}),
    ("gelu_a16", {"x": np.zeros(4, np.int16), "table": np.zeros(256, np.int16)}),
]


@pytest.mark.parametrize("name, args", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_argument_errors_name_the_kernel(name, args):
    for fn in (getattr(KA16, name), getattr(RA16, name)):
        with pytest.raises(ValueError) as e:
            fn(**args)
        text = str(e.value)
        assert "\n" not in text
        # the shared layernorm front end names itself (layernorm_wide) for what it checks
        assert text.startswith(name) or (name == "layernorm_a16" and "layernorm" in text), (fn.__module__, text)


# ---------------------------------------------------------------------------------------------
# 2. the whole model: a small random DeiT quantized with a16w8
# ---------------------------------------------------------------------------------------------


A16_KERNELS = {"conv2d": "conv2d_a16", "attention_scores": "attention_scores_a16", "softmax": "softmax_a16",
               "attention_context": "attention_context_a16", "layernorm": "layernorm_a16", "gelu": "gelu_a16"}


def a16_model(rounding=SINGLE_ROUND):
    return random_quantized_model(48, 2, 3, 32, 8, True, rounding, "a16w8")


def _traced(qm, xq, kernels):
    trace = Trace()
    logits = int_model.forward_int(qm, xq, trace, internals=True, kernels=kernels)
    return logits, trace


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_a16w8_model_records_and_input_are_int16(rounding):
    qm, calib = a16_model(rounding)
    assert input_dtype(qm.graph) == np.int16
    xq = int_model.quantize_input(qm, calib[:2])
    assert xq.dtype == np.int16 and np.abs(xq.astype(np.int64)).max() > 127      # uses the int16 range
    kinds = {(op.op, op.variant) for op in qm.graph}
    assert {(op, "a16") for op in A16_KERNELS} <= kinds and ("add", "int16") in kinds
    for op in qm.graph:
        want = "int64" if op.op == "attention_scores" else "int16"               # scores: int48 values in int64
        assert op.dtype == want, (op.name, op.dtype)
        if op.op in A16_KERNELS:
            assert op.variant == "a16" and op.kernel == A16_KERNELS[op.op], op.name
    with pytest.raises(ValueError, match="int16"):
        int_model.forward_int(qm, xq.astype(np.int8))                            # an int8 input is refused
    _, trace = _traced(qm, xq, "fast")
    for op in qm.graph:
        assert trace.tensors[op.name].dtype == np.dtype(op.dtype), op.name


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_a16w8_fast_and_reference_kernels_are_bit_identical(rounding):
    qm, calib = a16_model(rounding)
    xq = int_model.quantize_input(qm, calib[:2])
    fast_logits, fast = _traced(qm, xq, "fast")
    ref_logits, ref = _traced(qm, xq, "reference")
    assert_same(ref_logits, fast_logits, "logits")
    assert list(ref.tensors) == list(fast.tensors)
    internals = [k for k in fast.tensors if k not in {op.name for op in qm.graph} | {"input"}]
    assert any(k.endswith(".softmax.index") for k in internals) and any(k.endswith("norm1.t") for k in internals)
    assert any(k.endswith("attn.qkv.acc") for k in internals) and any(k.endswith("context.acc") for k in internals)
    for k in fast.tensors:
        assert_same(ref.tensors[k], fast.tensors[k], k)


def test_a16w8_roundings_give_different_logits():
    """The same float model and calibration in both roundings: the constants are the same (apply_scale_16 has one
    rounding) and only layernorm_a16's tail rounds by the mode -- the logits differ somewhere."""
    (qs, calib), (qd, _) = a16_model(SINGLE_ROUND), a16_model(DOUBLE_ROUND)
    assert set(qs.tensors) == set(qd.tensors)
    assert all(np.array_equal(qs.tensors[k], qd.tensors[k]) for k in qs.tensors)
    xq = int_model.quantize_input(qs, calib)
    ts, td = Trace(), Trace()
    ls, ld = int_model.forward_int(qs, xq, ts), int_model.forward_int(qd, xq, td)
    first = next(op.name for op in qs.graph if not np.array_equal(ts.tensors[op.name], td.tensors[op.name]))
    assert next(op for op in qs.graph if op.name == first).op == "layernorm"     # where the modes first part
    assert np.any(ls != ld)


def test_a16w8_file_round_trip(tmp_path):
    qm, calib = a16_model(DOUBLE_ROUND)
    back = load_quantized(save_quantized(qm, tmp_path / "a16.safetensors"))
    assert back.graph == qm.graph and back.scheme == qm.scheme == scheme_of(qm.graph, "a16w8", qm.options)
    assert set(back.tensors) == set(qm.tensors)
    for k, v in qm.tensors.items():
        b, v = np.asarray(back.tensors[k]), np.asarray(v)
        assert b.dtype == v.dtype and b.shape == v.shape and b.tobytes() == v.tobytes(), k
    assert back.tensors["blocks.0.mlp.gelu.table"].shape == (1 << 16,)
    xq = int_model.quantize_input(back, calib[:2])
    assert_same(int_model.forward_int(back, xq), int_model.forward_int(qm, xq))


def test_scheme_of_the_graph_is_a16w8():
    qm, _ = a16_model()
    a16 = SCHEMES["a16w8"]
    got = scheme_of(qm.graph, "a16w8", a16.options())
    assert got == a16 and got.parameters() == a16.parameters()
    assert (got.act_bits, got.softmax_bits, got.exp_table_size, got.exp_index_bits) == (16, 16, 4096, 8)
    assert Scheme.from_dict(json.loads(json.dumps(a16.to_dict()))) == a16
    cfg = qm.config
    assert build_graph(cfg, SINGLE_ROUND, got) == qm.graph


A16_BASE = {"layernorm": "wide", "residual": "int16", "act_bits": 16, "softmax_bits": 16}


@pytest.mark.parametrize("fields", [
    A16_BASE | {"softmax": "poly"},
    A16_BASE | {"scales": "pot", "conv": "pot"},
    A16_BASE | {"scales": "pot"},
    A16_BASE | {"softmax_bits": 8},
    A16_BASE | {"gelu": "shift"},
    A16_BASE | {"layernorm": "int32"},
    A16_BASE | {"acc_bits": 24},
    {"act_bits": 16, "softmax_bits": 16},                                      # an int8 stream / int64 LayerNorm
    {"softmax_bits": 16},                                                      # 16-bit p need act_bits 16 here
    {"act_bits": 12},
    {"conv": "a16"},
])
def test_scheme_errors_are_one_line(fields):
    with pytest.raises(GraphError) as e:
        Scheme(name="x", **fields)
    assert "\n" not in str(e.value) and "scheme 'x'" in str(e.value)


def test_token_pruning_is_refused_with_a16w8():
    qm, _ = a16_model()
    cfg = qm.config
    with pytest.raises(GraphError, match="pruning") as e:
        build_graph(cfg, SINGLE_ROUND, SCHEMES["a16w8"], prune="1:0.5")
    assert "\n" not in str(e.value)
    with pytest.raises(GraphError, match="pruning"):
        qm.with_prune("0:0.5")


# ---------------------------------------------------------------------------------------------
# 2b. the command line
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def a16_golden(tmp_path_factory):
    out = tmp_path_factory.mktemp("a16") / "seed3"
    assert main(["golden", "--scheme", "a16w8", "--seed", "3", "--batch", "2", "--formats", "npy,hex,bin",
                 "--out", str(out)]) == 0
    return out, json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_golden_a16w8_writes_an_int16_input(a16_golden):
    out, m = a16_golden
    assert m["input"]["dtype"] == "int16" and m["input"]["shape"] == [2, 3, 32, 32]
    x = np.load(out / "tensors" / "input.npy")
    assert x.dtype == np.int16 and x.shape == (2, 3, 32, 32)
    want = np.random.default_rng(3).integers(-32768, 32768, (2, 3, 32, 32), dtype=np.int16)   # the seed generator
    assert np.array_equal(x, want)
    lines = (out / "tensors" / "input.hex").read_text().split()
    assert len(lines) == x.size and all(len(s) == 4 for s in lines)
    assert [int(s, 16) for s in lines[:8]] == [int(v) & 0xFFFF for v in x.ravel()[:8]]
    assert (out / "tensors" / "input.bin").read_bytes() == x.astype("<i2").tobytes()
    by = m["tensors"]
    assert by["blocks.0.attn.softmax"]["dtype"] == "int16" and by["blocks.0.attn.scores"]["dtype"] == "int64"
    assert all(len(s) == 16 for s in (out / "tensors" / "blocks.0.attn.scores.hex").read_text().split()[:50])


@pytest.mark.slow
def test_golden_a16w8_input_dtype_and_check(a16_golden, tmp_path, capsys):
    out, m = a16_golden
    x = np.load(out / "tensors" / "input.npy")
    np.save(tmp_path / "x8.npy", np.clip(x, -128, 127).astype(np.int8))
    capsys.readouterr()
    assert main(["golden", "--scheme", "a16w8", "--input", str(tmp_path / "x8.npy"), "--out",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("refvit: error:") and "int16" in err[0]
    np.save(tmp_path / "x16.npy", x)
    again = tmp_path / "again"
    assert main(["golden", "--scheme", "a16w8", "--input", str(tmp_path / "x16.npy"), "--formats", "npy,hex,bin",
                 "--out", str(again)]) == 0
    m2 = json.loads((again / "manifest.json").read_text())
    assert m2["input"]["dtype"] == "int16" and m2["input"]["sha256_int8"] == m["input"]["sha256_int8"]
    capsys.readouterr()
    assert main(["check", str(out), str(again)]) == 0
    assert np.array_equal(np.load(again / "tensors" / "head.npy"), np.load(out / "tensors" / "head.npy"))


# ---------------------------------------------------------------------------------------------
# 3. the conformance cases of 16-bit activations (conformance/cases.py, `_a16_specs` and the a16w8 composites)
# ---------------------------------------------------------------------------------------------


INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def a16_specs(set_name="quick"):
    return [s for s in select(set_name) if s.op in A16_KERNELS.values() or "a16w8" in s.name]


def _statuses(dut, specs) -> dict:
    return {r.case: r.status for r in run_cases(dut, specs)}


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_refvit_passes_the_a16_cases(kernels):
    """Every quick a16 case (per op, and the a16w8 block and model) passes with refvit's fast kernels and with the
    reference kernels, whose cases are built from the reference (the same expected bits)."""
    specs = a16_specs()
    names = {s.name for s in specs}
    assert {s.op for s in specs} == set(A16_KERNELS.values()) | {"block", "model"}
    assert {"block_a16w8_c48_h3_n18_b2_single", "model_a16w8_c48_d2_h3_img32_p8_b2_single",
            "model_a16w8_c48_d2_h3_img32_p8_b2_double"} <= names
    use_kernels(kernels)
    try:
        results = run_cases(RefvitDUT(), specs)
        built = {s.name: get_case(s.name).expected for s in specs}
    finally:
        use_kernels("fast")
    assert [r.line() for r in results if r.status != PASS] == []
    for name, expected in built.items():                     # fast- and reference-built expectations agree
        assert_same(expected, get_case(name).expected, name)


def test_a16_case_names_and_params():
    """Named by their parameters, both roundings for layernorm_a16 (and a difference between them), the kernel's
    keyword parameters on the spec; the inputs have the kernels' dtypes."""
    specs = {s.name: s for s in select("full") if s.op in A16_KERNELS.values()}
    assert len(specs) == 30 and sum(s.quick for s in specs.values()) == 29
    for s in specs.values():
        assert s.params == get_case(s.name).params
        assert (s.rounding is not None) == (s.op == "layernorm_a16"), s.name
    for kind, c, n in (("random", 192, 32), ("constant", 48, 8), ("extreme", 1290, 6)):
        a, b = (get_case(f"layernorm_a16_c{c}_{kind}_n{n}_{m}") for m in ("single", "double"))
        assert a.params["rounding"] == SINGLE_ROUND and b.params["rounding"] == DOUBLE_ROUND
        assert all(np.array_equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
        if kind == "constant":
            assert np.any(a.expected != b.expected)
    conv = get_case("conv_a16_c256_k2_extreme_cout8_n4")
    assert conv.inputs["x"].dtype == np.int16 and conv.inputs["bias"].dtype == np.int64
    assert conv.inputs["multiplier"].dtype == np.int16 and conv.inputs["multiplier"].max() == M16
    acc = np.einsum("bcij,ocij->bo", conv.inputs["x"].astype(object)[..., :2, :2],
                    conv.inputs["weight"].astype(object)) + conv.inputs["bias"].astype(object)
    assert {abs(v) for v in acc.ravel()} == {ACC48, 256 * 4 * 32768 * 127}       # the int48 extreme, bias 0
    cap = get_case("softmax_a16_L4096_b8_cap_n24").inputs["scores"]
    assert cap.dtype == np.int64 and int(cap.max()) - int(cap.min()) == 2 * ACC48
    ties = get_case("conv_a16_c1_k1_ties_cout4_n64_shift17")
    acc = ties.inputs["x"].astype(np.int64)[0, 0, 0] * ties.inputs["weight"].astype(np.int64).reshape(4, 1) + 4
    assert np.all(acc * (1 << 14) % (1 << 17) == 1 << 16)                          # every one a tie
    ctx = get_case("context_a16_ties_h2_d8_n32")
    acc = py_context(ctx.inputs["p"], ctx.inputs["v"], 3 << 13, 28)[0]
    assert all((a * (3 << 13)) % (1 << 28) == 1 << 27 for a in acc.ravel())
    g = get_case("gelu_a16_all65536_randomtable")
    assert sorted(g.inputs["x"].ravel().tolist()) == list(range(-32768, 32768))
    assert g.expected.ravel().tolist() == [int(g.inputs["table"][int(v) + 32768]) for v in g.inputs["x"].ravel()]
    one = get_case("softmax_a16_L4096_b8_onekey_n1")
    assert set(one.expected.ravel().tolist()) == {32767}
    eq = get_case("softmax_a16_L4096_b8_equal_n24")
    assert set(eq.expected.ravel().tolist()) == {((1 << 15) * 32767 * ((1 << 25) // 24) + (1 << 39)) >> 40}


# ---------------------------------------------------------------- neighbouring choices, one DUT each

def _shift32(s):
    """A 16-bit rescale (m, s) as TOSA's 32-bit one: m << (s32 - s) at shift s32 = min(s + 16, 62) (exact)."""
    s = np.asarray(s, np.int64)
    return np.minimum(s + 16, 62)


def tosa32(acc, m, s):
    """TOSA's 32-bit RESCALE instead of apply_scale_16: the accumulator held in int32 (saturating), the 16-bit
    multiplier as a 31-bit one (m << 16, shift + 16; exact), double_round (refvit's DOUBLE_ROUND)."""
    s32 = _shift32(s)
    m32 = np.asarray(m, np.int64) << (s32 - np.asarray(s, np.int64))
    return im.apply_scale(np.clip(acc, INT32_MIN, INT32_MAX), m32, s32, DOUBLE_ROUND)


def round_away16(acc, m, s):
    """apply_scale_16 rounding half away from zero instead of up."""
    prod = np.asarray(acc, np.int64) * np.asarray(m, np.int64)
    s = np.asarray(s, np.int64)
    return np.sign(prod) * ((np.abs(prod) + (np.int64(1) << (s - 1))) >> s)


def _conv_with(rescale, out=np.int16):
    def conv2d_a16(self, x, weight, bias, multiplier, shift, *, out_dtype=np.int16):
        kept = {}
        RA16.conv2d_a16(x, weight, bias, multiplier, shift, out_dtype=out_dtype, internals=kept)
        cout = weight.shape[0]
        m, s = (np.asarray(v, np.int64).reshape(1, cout, 1, 1) for v in (multiplier, shift))
        return im.saturate(rescale(kept["acc"], m, s), out).astype(out_dtype)
    return conv2d_a16


def _context_with(rescale, out=np.int16):
    def attention_context_a16(self, p, v, multiplier, shift):
        kept = {}
        RA16.attention_context_a16(p, v, multiplier, shift, internals=kept)
        return im.saturate(rescale(kept["acc"], int(multiplier), int(shift)), out).astype(np.int16)
    return attention_context_a16


def _scores_int32(self, q, k):
    return np.clip(RA16.attention_scores_a16(q, k), INT32_MIN, INT32_MAX)


def _softmax_with(one=32767, d_max=ACC48):
    """softmax_a16 with the output at 1/one (127: Part 2's int8 scale) or the differences clipped at d_max
    (2^31 - 1: a 32-bit difference) -- anything else as the spec says (Python integers, py_softmax's)."""
    def softmax_a16(self, scores, multiplier, shift, exp_table):
        L, m, s = len(exp_table), int(multiplier), int(shift)
        out = np.empty(scores.shape, np.int16)
        for idx in np.ndindex(scores.shape[:-1]):
            row = [int(v) for v in scores[idx]]
            e = [int(exp_table[min(py_scale16(min(max(row) - v, d_max), m, s), L - 1)]) for v in row]
            recip = (1 << 40) // sum(e)
            out[idx] = [py_sat((ei * one * recip + (1 << 39)) >> 40, np.int16) for ei in e]
        return out
    return softmax_a16


def _layernorm_int8(self, x, eps_int, gamma, bias, multiplier, shift, *, rounding=SINGLE_ROUND):
    """Part 4's layernorm_wide on the int16 x: its int8 output."""
    return KV.layernorm_wide(x, eps_int, gamma, bias, multiplier, shift, rounding=rounding).astype(np.int16)


def _layernorm_other_rounding(self, x, eps_int, gamma, bias, multiplier, shift, *, rounding=SINGLE_ROUND):
    other = DOUBLE_ROUND if rounding == SINGLE_ROUND else SINGLE_ROUND
    return RA16.layernorm_a16(x, eps_int, gamma, bias, multiplier, shift, rounding=other)


def _gelu_offset(offset):
    def gelu_a16(self, x, table):
        return table[(x.astype(np.int64) + offset) % (1 << 16)]
    return gelu_a16


NEIGHBOURS = {   # name -> (DUT method name, the neighbouring implementation)
    "conv_tosa32": ("conv2d_a16", _conv_with(tosa32)),
    "conv_int8out": ("conv2d_a16", _conv_with(lambda a, m, s: arith.apply_scale_16(a, m, s), np.int8)),
    "conv_roundaway": ("conv2d_a16", _conv_with(round_away16)),
    "scores_int32": ("attention_scores_a16", _scores_int32),
    "softmax_p127": ("softmax_a16", _softmax_with(one=127)),
    "softmax_d32": ("softmax_a16", _softmax_with(d_max=INT32_MAX)),
    "context_tosa32": ("attention_context_a16", _context_with(tosa32)),
    "context_int8out": ("attention_context_a16", _context_with(lambda a, m, s: arith.apply_scale_16(a, m, s),
                                                               np.int8)),
    "layernorm_int8out": ("layernorm_a16", _layernorm_int8),
    "layernorm_otherrounding": ("layernorm_a16", _layernorm_other_rounding),
    "gelu_offset32767": ("gelu_a16", _gelu_offset(32767)),
    "gelu_nooffset": ("gelu_a16", _gelu_offset(0)),
}

# each quick per-op case, and the neighbours that must FAIL it (every case has at least one; the first is the
# choice the case is designed against)
CATCHES = {
    "conv_a16_c192_k1_random_cout64_n32": ("conv_int8out",),
    "conv_a16_c3_k4_random_cout48_img32": ("conv_int8out",),
    "conv_a16_c256_k2_extreme_cout8_n4": ("conv_tosa32", "conv_int8out"),
    "conv_a16_c1_k1_ties_cout4_n64_shift17": ("conv_roundaway", "conv_tosa32", "conv_int8out"),
    "scores_a16_random_h3_d64_n24": ("scores_int32",),
    "scores_a16_extreme_h2_d64_n8": ("scores_int32",),
    **{f"softmax_a16_L{L}_b{b}_{k}_n24": ("softmax_p127",) + (("softmax_d32",) if k == "cap" else ())
       for L, b in ((4096, 8), (256, 4)) for k in ("random", "equal", "cap")},
    "softmax_a16_L4096_b8_ties_n24": ("softmax_p127",),
    "softmax_a16_L4096_b8_far_n24": ("softmax_p127",),
    "softmax_a16_L1024_b6_randomtable_n24": ("softmax_p127",),
    "softmax_a16_L4096_b8_onekey_n1": ("softmax_p127",),
    "context_a16_random_h3_d16_n66": ("context_int8out",),
    "context_a16_pone_h2_d4_n197": ("context_tosa32", "context_int8out"),
    "context_a16_ties_h2_d8_n32": ("context_tosa32", "context_int8out"),
    "context_a16_random_h1_d4_n1": ("context_int8out",),
    **{f"layernorm_a16_c{c}_{k}_n{n}_{m}": ("layernorm_int8out",) + (("layernorm_otherrounding",)
                                                                      if k == "constant" else ())
       for k, c, n in (("random", 192, 32), ("constant", 48, 8), ("extreme", 1290, 6)) for m in ("single", "double")},
    "gelu_a16_all65536_sin0.001_sout0.002": ("gelu_offset32767", "gelu_nooffset"),
    "gelu_a16_all65536_sin0.0002_sout0.0002": ("gelu_offset32767", "gelu_nooffset"),
    "gelu_a16_all65536_randomtable": ("gelu_offset32767", "gelu_nooffset"),
}


def neighbour(name):
    method, fn = NEIGHBOURS[name]
    return type(name, (RefvitDUT,), {method: fn})()


def test_every_a16_case_fails_for_its_neighbouring_choice():
    specs = {s.name: s for s in a16_specs() if s.op not in ("block", "model")}
    assert set(specs) == set(CATCHES)
    for nb, (method, _) in NEIGHBOURS.items():
        st_ = _statuses(neighbour(nb), [s for s in specs.values() if s.op == method])
        must = {c for c, names in CATCHES.items() if nb in names}
        assert must, f"{nb} is asked to fail no case"
        assert {c: st_[c] for c in must} == dict.fromkeys(must, FAIL), nb
    # (a neighbour's other cases may pass: the int8 output on a case whose outputs all lie in int8, ...)


def test_the_a16w8_composites_fail_for_the_neighbouring_kernels():
    """The a16w8 block and model run the DUT's per-op methods: a neighbouring conv, softmax, LayerNorm or GELU
    fails them (the composites call the a16 kernels, not refvit's)."""
    specs = [s for s in a16_specs() if s.op in ("block", "model")]
    for nb in ("conv_tosa32", "conv_int8out", "softmax_p127", "context_int8out", "layernorm_int8out",
               "gelu_offset32767"):
        st_ = _statuses(neighbour(nb), specs)
        assert FAIL in st_.values() and ERROR not in st_.values(), (nb, st_)


def _model_as(qm_dut, qm_case):
    """A DUT whose model is `qm_dut` (another scheme's quantization of the same float model and calibration): it
    reads the case's input at qm_case's input scale as real values, quantizes them at its own, and gives its
    logits at qm_case's logits scale (round half away from zero, saturated to int16)."""
    class OtherScheme(RefvitDUT):
        def model(self, x, constants, *, graph):
            real = x.astype(np.float64) * float(qm_case.tensors["input.scale"])
            xq = K.quantize_input(real, float(qm_dut.tensors["input.scale"]), input_dtype(qm_dut.graph))
            logits = int_model.forward_int(qm_dut, xq).astype(np.float64)
            ratio = float(qm_dut.tensors["logits.scale"]) / float(qm_case.tensors["logits.scale"])
            return im.saturate(im.round_half_away_from_zero(logits * ratio), np.int16)
    return OtherScheme()


@pytest.mark.parametrize("rounding, mode", [(SINGLE_ROUND, "single"), (DOUBLE_ROUND, "double")])
def test_a16w8_and_int8_model_cases_tell_the_schemes_apart(rounding, mode):
    a16, _ = a16_model(rounding)
    int8, _ = random_quantized_model(48, 2, 3, 32, 8, True, rounding, "refvit-int8")
    cases = {"a16w8": f"model_a16w8_c48_d2_h3_img32_p8_b2_{mode}", "int8": f"model_c48_d2_h3_img32_p8_b2_{mode}"}
    specs = {k: [s for s in select("quick") if s.name == v] for k, v in cases.items()}
    assert _statuses(_model_as(int8, a16), specs["a16w8"]) == {cases["a16w8"]: FAIL}
    assert _statuses(_model_as(a16, int8), specs["int8"]) == {cases["int8"]: FAIL}
    # the adapter itself is faithful: a model mapped onto its own scheme passes
    assert _statuses(_model_as(a16, a16), specs["a16w8"]) == {cases["a16w8"]: PASS}
    assert _statuses(_model_as(int8, int8), specs["int8"]) == {cases["int8"]: PASS}


def test_golden_model_file_refuses_an_int8_input(tmp_path, capsys):
    """A saved a16w8 model (load_quantized checks it with an int16 input) given an int8 --input: one line, exit 2;
    the same file's --seed input is int16."""
    qm, _ = a16_model()
    f = save_quantized(qm, tmp_path / "a16.safetensors")
    np.save(tmp_path / "x8.npy", np.zeros((1, 3, 32, 32), np.int8))
    capsys.readouterr()
    assert main(["golden", "--model", str(f), "--input", str(tmp_path / "x8.npy"), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("refvit: error:") and "int16" in err[0], err
    from refvit import golden
    x = golden.seed_input(5, (1, 3, 32, 32), input_dtype(load_quantized(f).graph))
    assert x.dtype == np.int16
