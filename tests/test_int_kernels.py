"""refvit.int_kernels against the shipped reference kernels (refvit.reference: docs/spec.md's Part 2 pseudocode in
plain int64, rescaling by TOSA apply_scale_32 / TFLite's two roundings, no intmath scaling code), the spec's worked
examples and direct Python-int formulas.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refvit import int_kernels as K
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND, quantize_add_multipliers, quantize_multiplier
from refvit.reference import arith as R
from refvit.reference import kernels as RK

ROUNDINGS = (SINGLE_ROUND, DOUBLE_ROUND)
FILLS = ("random", "min", "max", "extreme")
SETTINGS = settings(max_examples=100, deadline=None)
INT32_MAX = (1 << 31) - 1


# the references: the shipped reference kernels (refvit.reference)
# ---------------------------------------------------------------------------------------------

def ref_requantize(acc, multiplier, shift, rounding, lo=-128, hi=127):
    """requantize to any range [lo, hi]: the reference apply_scale, then the clamp."""
    return np.clip(R.apply_scale(acc, multiplier, shift, rounding), lo, hi)


ref_conv_acc = RK.conv2d_accumulate
ref_layernorm_t = RK.layernorm_normalize


def ref_softmax(scores, multiplier, shift, table, rounding):
    return RK.softmax(scores, multiplier, shift, table, rounding=rounding)


def ref_layernorm(x, eps_int, gamma, bias, mult, shift, rounding):
    return RK.layernorm(x, eps_int, gamma, bias, mult, shift, rounding=rounding)


# ---------------------------------------------------------------------------------------------
# input generators
# ---------------------------------------------------------------------------------------------

def int8_array(rng, shape, fill, lo=-128, hi=127):
    if fill == "random":
        return rng.integers(lo, hi + 1, shape).astype(np.int8)
    if fill == "min":
        return np.full(shape, lo, np.int8)
    if fill == "max":
        return np.full(shape, hi, np.int8)
    return rng.choice(np.array([lo, hi], np.int8), shape)


def rand_scales(rng, n, acc_bound, spread=2):
    """n (multiplier, shift) pairs mapping |acc| <= acc_bound to around +-2^8 (some saturate), valid for apply_scale."""
    mult = rng.integers(0, 1 << 31, n)
    mult[: min(n, 2)] = [(1 << 31) - 1, 1 << 30][: min(n, 2)]     # boundary multipliers
    bits = max(int(acc_bound).bit_length(), 1)
    shift = bits + 31 - 8 + rng.integers(-spread, spread + 1, n)
    return mult.astype(np.int32), np.clip(shift, bits + 1, 62).astype(np.int64)


seeds = st.integers(0, 2**32 - 1)
fills = st.sampled_from(FILLS)
roundings = st.sampled_from(ROUNDINGS)


# ---------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, fill=fills, rounding=roundings, b=st.integers(1, 2), cin=st.integers(1, 6),
       cout=st.integers(1, 5), k=st.sampled_from([1, 2, 3]), ho=st.integers(1, 3), wo=st.integers(1, 3))
def test_conv2d_matches_reference(seed, fill, rounding, b, cin, cout, k, ho, wo):
    rng = np.random.default_rng(seed)
    x = int8_array(rng, (b, cin, ho * k, wo * k), fill)
    w = int8_array(rng, (cout, cin, k, k), fill if fill == "random" else "extreme", lo=-127)
    bias = rng.integers(-(1 << 20), 1 << 20, cout).astype(np.int32)
    acc_ref = ref_conv_acc(x, w, bias)
    acc = K.conv2d_accumulate(x, w, bias)
    assert acc.dtype == np.int32 and np.array_equal(acc, acc_ref)
    mult, shift = rand_scales(rng, cout, cin * k * k * 128 * 127 + (1 << 20))
    out = K.conv2d(x, w, bias, mult, shift, rounding=rounding)
    assert out.dtype == np.int8 and out.shape == (b, cout, ho, wo)
    assert np.array_equal(out, ref_requantize(acc_ref, mult[:, None, None], shift[:, None, None], rounding))


@pytest.mark.parametrize("sign", [1, -1])
def test_conv2d_largest_accumulator_is_int32_max(sign):
    cin, k = 4096, 4                                                 # Cin*k*k = 2^16, the limit
    terms = cin * k * k
    x = np.full((1, cin, k, k), -128, np.int8)
    w = np.full((1, cin, k, k), -127 * sign, np.int8)                 # sum = sign * 2^16 * 128 * 127
    bias = np.array([sign * (INT32_MAX - terms * 128 * 127)], np.int32)
    acc = K.conv2d_accumulate(x, w, bias)
    assert int(acc[0, 0, 0, 0]) == sign * INT32_MAX == int(ref_conv_acc(x, w, bias)[0, 0, 0, 0])
    for rounding in ROUNDINGS:
        out = K.conv2d(x, w, bias, np.array([(1 << 31) - 1]), np.array([62]), rounding=rounding)
        assert np.array_equal(out, ref_requantize(acc, (1 << 31) - 1, 62, rounding))
    with pytest.raises(ValueError, match="bias"):
        K.conv2d_accumulate(x, w, bias + np.int32(sign))
    with pytest.raises(ValueError, match="Cin\\*k\\*k"):
        K.conv2d_accumulate(np.zeros((1, cin + 1, k, k), np.int8), np.zeros((1, cin + 1, k, k), np.int8),
                            np.zeros(1, np.int32))


def test_conv2d_out_dtype_int32_for_logits():
    rng = np.random.default_rng(1)
    x, w = int8_array(rng, (2, 16, 1, 1), "random"), int8_array(rng, (10, 16, 1, 1), "random", lo=-127)
    bias = rng.integers(-5000, 5000, 10).astype(np.int32)
    mult, shift = np.full(10, 1 << 30), np.full(10, 30)              # scale 1: acc itself
    out = K.conv2d(x, w, bias, mult, shift, out_dtype=np.int32)
    assert out.dtype == np.int32 and np.array_equal(out, ref_conv_acc(x, w, bias))


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, fill=fills, b=st.integers(1, 2), h=st.integers(1, 3), d=st.integers(1, 9), n=st.integers(1, 9))
def test_attention_scores_matches_einsum(seed, fill, b, h, d, n):
    rng = np.random.default_rng(seed)
    q, k = int8_array(rng, (b, h, d, n), fill), int8_array(rng, (b, h, d, n), fill)
    s = K.attention_scores(q, k)
    ref = np.einsum("bhdi,bhdj->bhij", q.astype(np.int64), k.astype(np.int64))
    assert s.dtype == np.int32 and np.array_equal(s, ref)


def test_attention_scores_largest_accumulator():
    d = 1 << 16
    q = np.full((1, 1, d, 2), -128, np.int8)
    q[..., 1] = 127
    s = K.attention_scores(q, q)
    assert s[0, 0].tolist() == [[d * 128 * 128, -d * 128 * 127], [-d * 128 * 127, d * 127 * 127]]
    with pytest.raises(ValueError, match="head dim"):
        K.attention_scores(np.zeros((1, 1, d + 1, 1), np.int8), np.zeros((1, 1, d + 1, 1), np.int8))


@SETTINGS
@given(seed=seeds, fill=fills, rounding=roundings, b=st.integers(1, 2), h=st.integers(1, 2),
       d=st.integers(1, 6), n=st.integers(1, 12))
def test_attention_context_matches_reference(seed, fill, rounding, b, h, d, n):
    rng = np.random.default_rng(seed)
    p = int8_array(rng, (b, h, n, n), fill, lo=0)
    v = int8_array(rng, (b, h, d, n), fill)
    (mult,), (shift,) = rand_scales(rng, 1, n * 127 * 128)
    out = K.attention_context(p, v, int(mult), int(shift), rounding=rounding)
    acc = np.einsum("bhij,bhdj->bhdi", p.astype(np.int64), v.astype(np.int64))
    assert out.dtype == np.int8 and np.array_equal(out, ref_requantize(acc, mult, shift, rounding))


def _exp_scores(rng, shape, span, fill):
    """int32 scores in [-span, span] (fill 'extreme' hits both ends; 'min'/'max' give constant rows)."""
    if fill == "random":
        return rng.integers(-span, span + 1, shape).astype(np.int32)
    if fill == "extreme":
        return rng.choice(np.array([-span, span]), shape).astype(np.int32)
    return np.full(shape, -span if fill == "min" else span, np.int32)


@SETTINGS
@given(seed=seeds, fill=fills, rounding=roundings, lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       n=st.integers(1, 40), span=st.sampled_from([3, 1000, 1 << 20, (1 << 30) - 1]), units=st.floats(0.5, 2000))
def test_softmax_matches_reference(seed, fill, rounding, lead, n, span, units):
    """`units` = idx of the largest difference 2*span; > 255 exercises the clamp."""
    rng = np.random.default_rng(seed)
    scores = _exp_scores(rng, tuple(lead) + (n,), span, fill)
    mult, shift = quantize_multiplier(units / (2 * span))
    table = K.make_exp_table()
    p = K.softmax(scores, mult, shift, table, rounding=rounding)
    assert p.dtype == np.int8 and p.shape == scores.shape
    assert np.array_equal(p, ref_softmax(scores, mult, shift, table, rounding))
    assert np.array_equal(p, K.softmax(scores, mult, shift, table.astype(np.int32), rounding=rounding))


def test_softmax_constant_row_and_extremes():
    table = K.make_exp_table()
    mult, shift = quantize_multiplier(1.0)
    for n in (1, 2, 3, 127, 4096):   # every p = round(127/n), ties up (exact here: 2^25/n is exact at the tie n = 2)
        p = K.softmax(np.zeros((1, n), np.int32), mult, shift, table)
        assert set(p.ravel().tolist()) == {math.floor(Fraction(127, n) + Fraction(1, 2))}
    # n = 254: 127/n is a tie, but recip = floor(2^25/254) is truncated, so p = 0 (a ceiling would give 1)
    assert K.softmax(np.zeros((1, 254), np.int32), mult, shift, table).max() == 0
    row = np.full((1, 4096), -(1 << 30) + (1 << 23), np.int32)      # the extremes of attention_scores at D = 2^16
    row[0, 7] = 1 << 30                                              # difference 2^31 - 2^23
    mult, shift = quantize_multiplier(2.0 ** -20)                    # idx = 2^11 - 8 -> clamped to 255, e = 0
    p = K.softmax(row, mult, shift, table)
    assert p[0, 7] == 127 and int(p.sum()) == 127
    assert np.array_equal(p, ref_softmax(row, mult, shift, table, SINGLE_ROUND))
    row[0, 0] = -(1 << 31)
    with pytest.raises(OverflowError, match="softmax: score difference"):
        K.softmax(row, mult, shift, table)


@SETTINGS
@given(seed=seeds, n=st.integers(2, 64), sigma=st.floats(1e-3, 0.1), spread=st.floats(0.1, 25.0))
def test_softmax_approximates_float_softmax(seed, n, sigma, spread):
    """Error budget: idx rounding to 1/16 -> e off by a factor within e^(+-1/32) (+-3.2%), which moves
    e_j/sum e by at most ~6.7% of p; table rounding 2^-16 per entry -> (N+1)*2^-15; output rounding 0.5/127."""
    rng = np.random.default_rng(seed)
    span = max(1, int(spread / sigma))
    scores = rng.integers(-span, span + 1, (4, n)).astype(np.int32)
    p = K.softmax(scores, *quantize_multiplier(16 * sigma), K.make_exp_table())
    real = scores * sigma
    expected = np.exp(real - real.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    tol = 0.5 / 127 + 0.07 * expected + (n + 1) * 2.0 ** -15
    assert np.all(np.abs(K.dequantize(p, 1 / 127) - expected) <= tol)


def test_exp_table_entries():
    table = K.make_exp_table()
    assert table.dtype == np.uint16 and table.shape == (256,) and table[0] == 1 << 15
    exact = [Fraction(2 ** 15) * Fraction(math.exp(-i / 16)) for i in range(256)]
    assert all(abs(int(t) - x) <= Fraction(1, 2) for t, x in zip(table, exact))
    # no entry is near a rounding tie, so any libm exp within a few ulps gives the same table
    assert all(abs((x - math.floor(x)) - Fraction(1, 2)) > Fraction(1, 10 ** 6) for x in exact)
    assert np.all(np.diff(table.astype(np.int64)) <= 0)


# ---------------------------------------------------------------------------------------------
# add, gelu, layout, boundary
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=seeds, fill=fills, shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.just(1), st.integers(1, 6)),
       broadcast=st.booleans(), ratios=st.tuples(st.floats(0.01, 100), st.floats(0.01, 100)),
       out_dtype=st.sampled_from([np.int8, np.int16]))
def test_add_matches_reference(seed, fill, shape, broadcast, ratios, out_dtype):
    rng = np.random.default_rng(seed)
    a = int8_array(rng, shape, fill)
    b = int8_array(rng, (1,) + shape[1:] if broadcast else shape, fill)
    ma, mb, shift = quantize_add_multipliers(ratios[0], ratios[1], 1.0)
    out = K.add(a, b, ma, mb, shift, out_dtype=out_dtype)
    lo, hi = np.iinfo(out_dtype).min, np.iinfo(out_dtype).max
    assert out.dtype == out_dtype and np.array_equal(out, RK.add(a, b, ma, mb, shift, out_dtype=out_dtype))
    # sanity: the real sum at scale 1, within rounding of the multipliers (unsaturated entries)
    real = a * ratios[0] + np.broadcast_to(b, shape) * ratios[1]
    inside = (real > lo + 1) & (real < hi - 1)
    assert np.all(np.abs(out[inside] - real[inside]) <= 0.5 + 256 * 2.0 ** -(shift + 1))  # multiplier rounding


@pytest.mark.parametrize("scale_in,scale_out", [(0.05, 0.03), (0.02, 0.02), (0.1, 0.005), (0.01, 0.05)])
def test_gelu_table_within_half_step_of_exact_gelu(scale_in, scale_out):
    table = K.make_gelu_table(scale_in, scale_out)
    assert table.dtype == np.int8 and table.shape == (256,)
    for i, q in enumerate(table.tolist()):
        x = (i - 128) * scale_in
        g = x * 0.5 * math.erfc(-x / math.sqrt(2.0)) / scale_out     # x * Phi(x), via erfc
        if -128 < q < 127:
            assert abs(q - g) <= 0.5 + 1e-9
        else:
            assert (q == 127 and g >= 126.5) or (q == -128 and g <= -127.5)


@SETTINGS
@given(seed=seeds, shape=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_gelu_is_table_lookup(seed, shape):
    rng = np.random.default_rng(seed)
    x = int8_array(rng, tuple(shape), "random")
    x.ravel()[0], x.ravel()[-1] = -128, 127
    table = rng.integers(-128, 128, 256).astype(np.int8)
    out = K.gelu(x, table)
    assert out.dtype == np.int8 and np.array_equal(out.ravel(), [table[int(v) + 128] for v in x.ravel()])


def test_split_merge_heads_channel_order():
    x = np.arange(2 * 12 * 5).reshape(2, 12, 1, 5).astype(np.int8)
    y = K.split_heads(x, 3)
    assert y.shape == (2, 3, 4, 5)
    for b, h, d, n in np.ndindex(*y.shape):
        assert y[b, h, d, n] == x[b, h * 4 + d, 0, n]
    assert np.array_equal(K.merge_heads(y), x)


def test_concat_tokens():
    rng = np.random.default_rng(2)
    prefix, patches = int8_array(rng, (1, 4, 1, 2), "random"), int8_array(rng, (3, 4, 1, 5), "random")
    out = K.concat_tokens(prefix, patches)
    assert out.dtype == np.int8 and out.shape == (3, 4, 1, 7)
    for b in range(3):
        assert np.array_equal(out[b, :, :, :2], prefix[0]) and np.array_equal(out[b, :, :, 2:], patches[b])


def test_quantize_input_rounds_half_away_and_saturates():
    scale = 0.1
    x = np.array([0.25, -0.25, 0.35, -0.35, 12.7, 12.8, -12.8, -12.9, 1e300, -1e300, 0.0, 0.04999, 0.05, -0.05])
    out = K.quantize_input(x, scale)
    ref = []
    for v in x.tolist():
        r = Fraction(v / scale)                                        # the float64 quotient, exactly
        mag = math.floor(abs(r) + Fraction(1, 2))
        ref.append(min(max(mag if r >= 0 else -mag, -128), 127))
    assert out.dtype == np.int8 and out.tolist() == ref
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    assert K.quantize_input(x32, scale).tolist() == K.quantize_input(x32.astype(np.float64), scale).tolist()
    assert K.quantize_input(np.array([np.inf, -np.inf]), scale).tolist() == [127, -128]
    with pytest.raises(ValueError, match="quantize_input: x must not contain NaN"):
        K.quantize_input(np.array([np.nan]), scale)


def test_dequantize():
    q = np.array([-128, 0, 5, 127], np.int8)
    assert K.dequantize(q, 0.5).tolist() == [v * 0.5 for v in q.tolist()]
    assert K.dequantize(q, 0.5).dtype == np.float64


# ---------------------------------------------------------------------------------------------
# layernorm
# ---------------------------------------------------------------------------------------------

def _ln_constants(rng, c, headroom=1 << 16, spread=6):
    gamma = rng.integers(-127, 128, c).astype(np.int8)
    bias = rng.integers(-headroom, headroom + 1, c).astype(np.int32)
    mult, shift = rand_scales(rng, c, (127 << 16) + headroom, spread)
    return gamma, bias, mult, shift


@SETTINGS
@given(seed=seeds, fill=fills, rounding=roundings, b=st.integers(1, 2), c=st.integers(1, 40),
       hw=st.tuples(st.integers(1, 3), st.integers(1, 3)), eps_int=st.sampled_from([1, 7, 12345, 1 << 40, 1 << 61]))
def test_layernorm_matches_reference(seed, fill, rounding, b, c, hw, eps_int):
    rng = np.random.default_rng(seed)
    x = int8_array(rng, (b, c) + hw, fill)
    gamma, bias, mult, shift = _ln_constants(rng, c)
    t = K.layernorm_normalize(x, eps_int)
    assert t.dtype == np.int32 and np.array_equal(t, ref_layernorm_t(x, eps_int))
    out = K.layernorm(x, eps_int, gamma, bias, mult, shift, rounding=rounding)
    assert out.dtype == np.int8 and out.shape == x.shape
    assert np.array_equal(out, ref_layernorm(x, eps_int, gamma, bias, mult, shift, rounding))


@pytest.mark.parametrize("eps_int", [1, 2, 3, 7, 8])
def test_layernorm_isqrt_at_perfect_squares(eps_int):
    """C = 2, x = (1, 0): d = (1, -1), q = 2 + eps_int crosses the squares 4 and 9 (r = 1, 2, 2, 3, 3)."""
    x = np.array([1, 0], np.int8).reshape(1, 2, 1, 1)
    r = math.isqrt(2 + eps_int)
    t = K.layernorm_normalize(x, eps_int)
    assert t.ravel().tolist() == [((1 << 40) // r + (1 << 23)) >> 24, ((-((1 << 40) // r)) + (1 << 23)) >> 24]


def test_layernorm_largest_values():
    c = K.MAX_LN_CHANNELS
    rng = np.random.default_rng(3)
    x = np.full((1, c, 1, 3), -128, np.int8)
    x[0, 0, 0, 0] = 127                                   # one outlier: largest |t| ~ 2^16 sqrt((C-1)/C)
    x[0, ::2, 0, 1] = 127                                 # half/half: largest sum d^2 = C^3 * 255^2 / 4
    x[0, :, 0, 2] = rng.integers(-128, 128, c)
    gamma = np.full(c, 127, np.int8)
    bias = np.full(c, INT32_MAX - (127 << 16), np.int32)  # at the headroom limit
    bias[1::2] *= -1
    mult, shift = rand_scales(rng, c, INT32_MAX)
    t = K.layernorm_normalize(x, 1)
    assert np.array_equal(t, ref_layernorm_t(x, 1)) and int(np.abs(t).max()) <= 1 << 16
    assert int(t[0, 0, 0, 0]) == math.floor(2 ** 16 * math.sqrt((c - 1) / c) + 0.5)
    for rounding in ROUNDINGS:
        out = K.layernorm(x, 1, gamma, bias, mult, shift, rounding=rounding)
        assert np.array_equal(out, ref_layernorm(x, 1, gamma, bias, mult, shift, rounding))
    with pytest.raises(ValueError, match="bias"):
        K.layernorm(x, 1, gamma, bias + np.int32(1), mult, shift)
    with pytest.raises(ValueError, match="eps_int"):
        K.layernorm(x, (1 << 61) + 1, gamma, bias, mult, shift)
    with pytest.raises(ValueError, match="C = 4097"):
        K.layernorm(np.zeros((1, c + 1, 1, 1), np.int8), 1, np.zeros(c + 1, np.int8), np.zeros(c + 1, np.int32),
                    np.zeros(c + 1, np.int64), np.full(c + 1, 31))


def test_layernorm_constant_row_is_bias():
    rng = np.random.default_rng(4)
    c = 16
    gamma, bias, mult, shift = _ln_constants(rng, c)
    for value in (-128, 0, 127):
        x = np.full((2, c, 1, 3), value, np.int8)
        out = K.layernorm(x, 5, gamma, bias, mult, shift)
        ref = ref_requantize(bias.astype(np.int64)[None, :, None, None], mult[:, None, None], shift[:, None, None],
                             SINGLE_ROUND)
        assert np.array_equal(out, np.broadcast_to(ref, x.shape))


@SETTINGS
@given(seed=seeds, c=st.integers(8, 256), scale_x=st.floats(0.005, 0.5), eps=st.sampled_from([1e-6, 1e-12, 1e-2]))
def test_layernorm_approximates_float_layernorm(seed, c, scale_x, eps):
    """Tolerance 0.6 output step: 0.5 from the final rounding; the rest (t rounding and the 2^40
    reciprocal: |dt| <= 0.5 + 255*C/2^24; isqrt floor: relative 1/r; bias rounding) is < 0.1 step here."""
    rng = np.random.default_rng(seed)
    n = 5
    x = rng.integers(-128, 128, (1, c, 1, n)).astype(np.int8)
    gamma_real = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    beta_real = rng.uniform(-1.0, 1.0, c)
    scale_out = 6.0 / 127
    gamma = np.where(gamma_real > 0, 127, -127).astype(np.int8)     # per-channel symmetric: one value each
    scale_acc = np.abs(gamma_real) / 127 * math.sqrt(c) / 2 ** 16    # real value of one unit of t*gamma
    bias = np.array([round(b / s) for b, s in zip(beta_real, scale_acc)], np.int32)
    mult, shift = zip(*(quantize_multiplier(s / scale_out) for s in scale_acc))
    eps_int = K.layernorm_eps_int(eps, c, scale_x)
    out = K.layernorm(x, eps_int, gamma, bias, np.array(mult), np.array(shift))

    xr = x.astype(np.float64) * scale_x
    mean, var = xr.mean(axis=1, keepdims=True), xr.var(axis=1, keepdims=True)
    y = (xr - mean) / np.sqrt(var + eps) * gamma_real[None, :, None, None] + beta_real[None, :, None, None]
    y = np.clip(y, -128 * scale_out, 127 * scale_out)
    assert np.all(np.abs(K.dequantize(out, scale_out) - y) <= 0.6 * scale_out)


def test_layernorm_eps_int():
    assert K.layernorm_eps_int(1e-6, 192, 0.05) == round(1e-6 * 192 ** 3 / 0.05 ** 2)
    assert K.layernorm_eps_int(1e-12, 192, 0.05) == 1                # never 0: q > 0
    with pytest.raises(ValueError, match="exceeds"):
        K.layernorm_eps_int(1.0, 4096, 1e-9)


def test_spec_worked_examples():
    """The worked examples of docs/spec.md (Part 2), checked against the independent references."""
    table = K.make_exp_table()
    scores = np.array([[10, 8, 0, -20]], np.int32)
    mult, shift = quantize_multiplier(16 / 8)
    assert (mult, shift) == (1 << 30, 29)
    p = K.softmax(scores, mult, shift, table)
    assert np.array_equal(p, ref_softmax(scores, mult, shift, table, SINGLE_ROUND))
    assert p.tolist() == [[61, 47, 17, 1]]

    x = np.array([10, -2, 4, 0], np.int8).reshape(1, 4, 1, 1)
    eps_int = K.layernorm_eps_int(1e-6, 4, 0.1)
    t = K.layernorm_normalize(x, eps_int)
    assert eps_int == 1 and np.array_equal(t, ref_layernorm_t(x, 1))
    assert t.ravel().tolist() == [50972, -36409, 7282, -21845]
    s_acc = (1 / 127) * 2 / 2 ** 16
    gamma, bias = np.full(4, 127, np.int8), np.array([round(0.5 / s_acc), 0, 0, 0], np.int32)
    mult, shift = quantize_multiplier(s_acc / (3 / 127))
    out = K.layernorm(x, 1, gamma, bias, np.full(4, mult), np.full(4, shift))
    assert np.array_equal(out, ref_layernorm(x, 1, gamma, bias, np.full(4, mult), np.full(4, shift), SINGLE_ROUND))
    assert bias[0] == 2080768 and (mult, shift) == (1431655765, 47) and out.ravel().tolist() == [87, -47, 9, -28]


# ---------------------------------------------------------------------------------------------
# rounding modes: every rescale honours `rounding` (data chosen so the two modes disagree)
# ---------------------------------------------------------------------------------------------

TIES = np.arange(-128, 128, dtype=np.int8).reshape(1, 1, 16, 16)   # accumulators hitting every residue mod 8
POW2 = (1 << 30, 33)                                                 # acc / 8: exact ties in both signs
NEAR_TIE = ((1 << 31) - 1, 33)                                       # acc/4 * (1 - 2^-31): just below ties


def _rounding_cases():
    """name -> (kernel(rounding), reference(rounding))."""
    c = 256
    ties = TIES.astype(np.int64)
    ln_x = np.random.default_rng(6).integers(-128, 128, (1, c, 1, 2)).astype(np.int8)
    ln_bias = np.arange(-128, 128, dtype=np.int32)                   # gamma = 0: acc = bias
    ln_const = (np.zeros(c, np.int8), ln_bias, np.full(c, POW2[0]), np.full(c, POW2[1]))
    scores = -np.arange(1024, dtype=np.int32).reshape(1, 1024)       # d = 0 .. 1023
    eye = np.eye(16, dtype=np.int8).reshape(1, 1, 16, 16)            # context acc = v
    one = (np.ones((1, 1, 1, 1), np.int8), np.zeros(1, np.int32), [POW2[0]], [POW2[1]])   # conv acc = x
    return {
        "conv2d": (lambda r: K.conv2d(TIES.reshape(256, 1, 1, 1), *one, rounding=r),
                   lambda r: ref_requantize(ties.reshape(256, 1, 1, 1), *POW2, r)),
        "attention_context": (lambda r: K.attention_context(eye, TIES, *POW2, rounding=r),
                              lambda r: ref_requantize(ties, *POW2, r)),
        "layernorm": (lambda r: K.layernorm(ln_x, 1, *ln_const, rounding=r),
                      lambda r: np.broadcast_to(ref_requantize(ln_bias.reshape(1, c, 1, 1), *POW2, r), ln_x.shape)),
        "softmax": (lambda r: K.softmax(scores, *NEAR_TIE, K.make_exp_table(), rounding=r),
                    lambda r: ref_softmax(scores, *NEAR_TIE, K.make_exp_table(), r)),
    }


@pytest.mark.parametrize("name", list(_rounding_cases()))
def test_rounding_mode_is_honoured(name):
    kernel, ref = _rounding_cases()[name]
    single, double = ref(SINGLE_ROUND), ref(DOUBLE_ROUND)
    assert not np.array_equal(single, double)                        # the data separates the modes
    assert np.array_equal(kernel(SINGLE_ROUND), single) and np.array_equal(kernel(DOUBLE_ROUND), double)


# ---------------------------------------------------------------------------------------------
# batch invariance: an image gives the same bits alone and inside a batch
# ---------------------------------------------------------------------------------------------

def _batch_cases():
    """name -> (kernel, tuple of arguments batched along axis 0)."""
    rng = np.random.default_rng(5)
    x8 = lambda shape, lo=-128: int8_array(rng, shape, "random", lo=lo)  # noqa: E731
    bsz, c, n, heads = 3, 6, 7, 2
    tokens = x8((bsz, c, 1, n))
    q, k = x8((bsz, heads, c // heads, n)), x8((bsz, heads, c // heads, n))
    conv_w, conv_b = x8((4, 3, 2, 2), lo=-127), rng.integers(-999, 999, 4).astype(np.int32)
    m4, s4 = rand_scales(rng, 4, 12 * 128 * 127 + 999)
    gamma, bias, mult, shift = _ln_constants(rng, c)
    pos, prefix = x8((1, c, 1, n)), x8((1, c, 1, 2))
    table, gelu_table = K.make_exp_table(), K.make_gelu_table(0.05, 0.03)
    mult_s, shift_s = quantize_multiplier(0.01)
    return {
        "conv2d": (lambda x: K.conv2d(x, conv_w, conv_b, m4, s4), (x8((bsz, 3, 4, 6)),)),
        "attention_scores": (K.attention_scores, (q, k)),
        "softmax": (lambda s: K.softmax(s, mult_s, shift_s, table),
                    (rng.integers(-5000, 5000, (bsz, heads, n, n)).astype(np.int32),)),
        "attention_context": (lambda p, v: K.attention_context(p, v, 1 << 30, 40), (x8((bsz, heads, n, n), lo=0), q)),
        "add": (lambda a: K.add(a, pos, 3 << 28, 5 << 27, 30), (tokens,)),
        "layernorm": (lambda x: K.layernorm(x, 99, gamma, bias, mult, shift), (tokens,)),
        "gelu": (lambda x: K.gelu(x, gelu_table), (tokens,)),
        "concat_tokens": (lambda x: K.concat_tokens(prefix, x), (tokens,)),
        "split_merge": (lambda x: K.merge_heads(K.split_heads(x, heads)), (tokens,)),
        "quantize_input": (lambda x: K.quantize_input(x, 0.02), (rng.standard_normal((bsz, 3, 4, 4)),)),
    }


@pytest.mark.parametrize("name", list(_batch_cases()))
def test_batch_invariance(name):
    fn, args = _batch_cases()[name]
    whole = fn(*args)
    for i in range(len(args[0])):
        alone = fn(*(a[i:i + 1] for a in args))
        assert alone.dtype == whole.dtype and np.array_equal(alone, whole[i:i + 1])


# ---------------------------------------------------------------------------------------------
# error paths
# ---------------------------------------------------------------------------------------------

I8 = lambda *shape: np.zeros(shape, np.int8)  # noqa: E731
TABLE = K.make_exp_table()
GOOD_CONV = dict(x=I8(1, 2, 2, 2), weight=I8(3, 2, 2, 2), bias=np.zeros(3, np.int32),
                 multiplier=np.full(3, 1 << 30), shift=np.full(3, 40))


def _conv(**changes):
    return lambda: K.conv2d(**{**GOOD_CONV, **changes})


def _ln(x=None, eps_int=1, gamma=None, bias=None):
    c = 4
    return lambda: K.layernorm(I8(1, c, 1, 2) if x is None else x, eps_int, I8(c) if gamma is None else gamma,
                               np.zeros(c, np.int32) if bias is None else bias, np.full(c, 1 << 30), np.full(c, 40))


ERROR_CASES = {
    "conv x dtype": (_conv(x=np.zeros((1, 2, 2, 2), np.int16)), "conv2d: x must have dtype int8"),
    "conv x list": (_conv(x=[[1]]), "conv2d: x must be a numpy array"),
    "conv x ndim": (_conv(x=I8(2, 2, 2)), "conv2d: x must have 4 dims"),
    "conv weight -128": (_conv(weight=np.full((3, 2, 2, 2), -128, np.int8)), "conv2d: weight .*\\[-127, 127\\]"),
    "conv weight Cin": (_conv(weight=I8(3, 5, 2, 2)), "conv2d: weight has Cin"),
    "conv stride": (_conv(x=I8(1, 2, 3, 2)), "not a multiple"),
    "conv bias dtype": (_conv(bias=np.zeros(3, np.int64)), "conv2d: bias must have dtype int32"),
    "conv bias shape": (_conv(bias=np.zeros(4, np.int32)), "conv2d: bias must have shape"),
    "conv multiplier shape": (_conv(multiplier=np.full(2, 1 << 30)), "conv2d: multiplier must have shape"),
    "conv shift float": (_conv(shift=np.full(3, 40.0)), "conv2d: shift must be an integer"),
    "scores k shape": (lambda: K.attention_scores(I8(1, 1, 2, 3), I8(1, 1, 2, 4)), "attention_scores: q .* and k"),
    "scores q dtype": (lambda: K.attention_scores(np.zeros((1, 1, 2, 3)), I8(1, 1, 2, 3)),
                       "attention_scores: q must have dtype"),
    "softmax dtype": (lambda: K.softmax(I8(2, 3), 1 << 30, 40, TABLE), "softmax: scores must have dtype int32"),
    "softmax table[0]": (lambda: K.softmax(np.zeros((2, 3), np.int32), 1 << 30, 40, np.zeros(256, np.int32)),
                         "softmax: exp_table\\[0\\]"),
    "softmax table dtype": (lambda: K.softmax(np.zeros((2, 3), np.int32), 1 << 30, 40, TABLE.astype(np.int64)),
                            "softmax: exp_table must be"),
    "softmax multiplier": (lambda: K.softmax(np.zeros((2, 3), np.int32), np.array([1, 2]), 40, TABLE),
                           "softmax: multiplier must be a scalar"),
    "context p negative": (lambda: K.attention_context(np.full((1, 1, 2, 2), -1, np.int8), I8(1, 1, 3, 2), 1 << 30, 40),
                           "attention_context: p .*\\[0, 127\\]"),
    "context p shape": (lambda: K.attention_context(I8(1, 1, 3, 3), I8(1, 1, 3, 2), 1 << 30, 40),
                        "attention_context: p must have shape"),
    "add broadcast": (lambda: K.add(I8(1, 3, 1, 4), I8(2, 3, 1, 4), 1 << 30, 1 << 30, 31), "add: b .* must broadcast"),
    "add multiplier": (lambda: K.add(I8(1, 3), I8(1, 3), 1 << 31, 1, 31), "add: multiplier_a"),
    "add b dtype": (lambda: K.add(I8(1, 3), np.zeros((1, 3), np.uint8), 1, 1, 31), "add: b must have dtype int8"),
    "ln gamma -128": (_ln(gamma=np.full(4, -128, np.int8)), "layernorm: gamma .*\\[-127, 127\\]"),
    "ln gamma shape": (_ln(gamma=I8(5)), "layernorm: gamma"),
    "ln eps_int 0": (_ln(eps_int=0), "layernorm: eps_int"),
    "ln x dtype": (_ln(x=np.zeros((1, 4, 1, 2), np.int32)), "layernorm: x must have dtype int8"),
    "gelu table shape": (lambda: K.gelu(I8(3), I8(255)), "gelu: table must have shape"),
    "gelu x dtype": (lambda: K.gelu(np.zeros(3, np.int32), I8(256)), "gelu: x must have dtype int8"),
    "concat prefix": (lambda: K.concat_tokens(I8(2, 4, 1, 1), I8(2, 4, 1, 5)), "concat_tokens: prefix"),
    "concat channels": (lambda: K.concat_tokens(I8(1, 4, 1, 1), I8(2, 3, 1, 5)), "concat_tokens: patches"),
    "split heads": (lambda: K.split_heads(I8(1, 5, 1, 2), 2), "split_heads: num_heads"),
    "quantize int": (lambda: K.quantize_input(np.zeros(3, np.int8), 0.1), "quantize_input: x must be a float"),
    "quantize scale": (lambda: K.quantize_input(np.zeros(3), 0.0), "quantize_input: scale"),
    "gelu table scale": (lambda: K.make_gelu_table(0.1, float("nan")), "make_gelu_table: scale_out"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_raises_naming_the_problem(case):
    call, message = ERROR_CASES[case]
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# fast paths (issue 10): fused GEMM -> bias -> rescale -> saturate, softmax table, fused layernorm,
# block-wise add; large shapes (several blocks) and boundary constants, against the references above
# ---------------------------------------------------------------------------------------------

from refvit import intmath as _im  # noqa: E402


def _channel_scales(rng, n, shifts):
    mult = rng.integers(0, 1 << 31, n)
    mult[: min(n, 3)] = [0, INT32_MAX, 1 << 30][: min(n, 3)]
    return mult.astype(np.int64), rng.choice(np.array(shifts), n).astype(np.int64)


@settings(max_examples=10, deadline=None)
@given(seed=seeds, rounding=roundings, shifts=st.sampled_from([[32, 35, 40], [33, 62], [20, 31, 32, 40]]),
       out_dtype=st.sampled_from([np.int8, np.int16, np.int32]), b=st.sampled_from([1, 3]))
def test_conv2d_fused_path_large(seed, rounding, shifts, out_dtype, b):
    """Cout x B*N spans several blocks; per-channel shifts below 32 take the checked path. Bias at the headroom."""
    rng = np.random.default_rng(seed)
    cin, cout, n = 40, 96, 700
    x = int8_array(rng, (b, cin, 1, n), "random")
    x[0, :, 0, :3] = np.array([[-128], [127], [-128]]).T            # extreme columns
    w = int8_array(rng, (cout, cin, 1, 1), "random", lo=-127)
    w[0] = -127
    headroom = INT32_MAX - cin * 128 * 127
    bias = rng.integers(-headroom, headroom + 1, cout).astype(np.int32)
    bias[:2] = [headroom, -headroom]
    mult, shift = _channel_scales(rng, cout, shifts)
    if min(shifts) <= 31:                 # keep the apply_scale precondition |acc| < 2^(shift-1) satisfied
        shift = np.maximum(shift, 32)
        shift[5] = 31
        bias[5] = 0
        w[5] = 0
    acc = ref_conv_acc(x, w, bias)
    want = ref_requantize(acc, mult[None, :, None, None], shift[None, :, None, None], rounding,
                          *_im.int_range(out_dtype))
    got = K.conv2d(x, w, bias, mult, shift, rounding=rounding, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.flags.c_contiguous and np.array_equal(got, want)
    assert np.array_equal(K.conv2d_accumulate(x, w, bias), acc)


def test_conv2d_value_precondition_still_checked():
    x = np.full((1, 4, 1, 3), 127, np.int8)
    w = np.full((2, 4, 1, 1), 127, np.int8)
    bias = np.zeros(2, np.int32)
    with pytest.raises(ValueError, match=r"apply_scale: value must satisfy"):   # acc = 64516 >= 2^(16-1)
        K.conv2d(x, w, bias, np.full(2, 1 << 30), np.array([40, 16]))


@settings(max_examples=10, deadline=None)
@given(seed=seeds, rounding=roundings, shift=st.sampled_from([20, 31, 32, 45]))
def test_attention_context_multi_chunk_and_fused(seed, rounding, shift):
    """N = 1100 > 1032 keys: float32 chunks summed in float64; several blocks; shift <= 31 takes the checked path."""
    rng = np.random.default_rng(seed)
    n, d = 1100, 3
    p = int8_array(rng, (1, 2, n, n), "random", lo=0)
    p[0, 0, 0] = 127
    v = int8_array(rng, (1, 2, d, n), "random")
    v[0, 0, 0] = -128
    acc = np.einsum("bhij,bhdj->bhdi", p.astype(np.int64), v.astype(np.int64))
    if shift <= 31:
        acc_max = int(np.abs(acc).max())
        shift = max(shift, acc_max.bit_length() + 1)
    mult = (1 << 31) - 1
    got = K.attention_context(p, v, mult, shift, rounding=rounding)
    assert np.array_equal(got, ref_requantize(acc, mult, shift, rounding))


def _softmax_case(rng, rows, n, span):
    s = rng.integers(-span, span + 1, (rows, n)).astype(np.int32)
    s[0] = s[0, 0]                               # a constant row
    return s


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("mult, shift, span, note", [
    (*quantize_multiplier(0.128), 3000, "table ends at the first index-255 d (about 2000)"),
    (1518500250, 43, 3000, "index 255 far beyond every d (first at ~1.5e6): partial table"),
    (1 << 30, 31, 200, "exact ties at every other d"),
    ((1 << 31) - 1, 33, 2000, "near ties, DOUBLE differs"),
    (1 << 30, 52, 5000, "index 255 beyond the table: partial table, d inside it"),
    (1 << 30, 52, 1 << 20, "index 255 beyond the table, d beyond it: plain path"),
    (0, 40, 1000, "multiplier 0: every index 0"),
    (3, 2, 50, "shift 2: d < 2 only"),
])
def test_softmax_table_path_equals_reference(rounding, mult, shift, span, note):
    rng = np.random.default_rng(shift)
    if shift == 2:
        scores = rng.integers(0, 2, (6, 9)).astype(np.int32)          # d in {0, 1}: inside the domain
    else:
        scores = _softmax_case(rng, 6, 300, span)
    table = K.make_exp_table()
    got = K.softmax(scores, mult, shift, table, rounding=rounding)
    assert got.dtype == np.int8 and np.array_equal(got, ref_softmax(scores, mult, shift, table, rounding)), note


def test_softmax_table_boundary_and_custom_tables():
    """d at c - 1, c, c + 1 for c the first d of index 255; tables that are not monotone; int32 tables."""
    mult, shift = quantize_multiplier(0.128)
    c = int(np.argmax(R.apply_scale(np.arange(1 << 20), mult, shift, SINGLE_ROUND) >= 255))
    row = np.array([0, -(c - 1), -c, -(c + 1), -(c + 1000), -1, -2], np.int32)
    rng = np.random.default_rng(3)
    for table in (K.make_exp_table(), K.make_exp_table().astype(np.int32),
                  np.concatenate([[K.EXP_ONE], rng.integers(0, K.EXP_ONE + 1, 255)]).astype(np.uint16)):
        table[-1] = 7                                                     # a nonzero last entry: clamping shows
        for rounding in ROUNDINGS:
            got = K.softmax(row[None, :], mult, shift, table, rounding=rounding)
            assert np.array_equal(got, ref_softmax(row[None, :], mult, shift, table, rounding))


def test_softmax_many_rows_several_blocks():
    rng = np.random.default_rng(9)
    scores = rng.integers(-4000, 4000, (2, 3, 200, 197)).astype(np.int32)   # 1200 rows > one block
    table = K.make_exp_table()
    for rounding in ROUNDINGS:
        got = K.softmax(scores, 1518500250, 43, table, rounding=rounding)
        assert np.array_equal(got, ref_softmax(scores, 1518500250, 43, table, rounding))


def test_softmax_error_precedence_unchanged():
    scores = np.array([[INT32_MAX, -INT32_MAX]], np.int32)
    with pytest.raises(OverflowError, match="score difference"):           # before the bad multiplier
        K.softmax(scores, -5, 40, K.make_exp_table())
    with pytest.raises(ValueError, match="apply_scale: multiplier"):
        K.softmax(np.zeros((1, 3), np.int32), -5, 40, K.make_exp_table())
    with pytest.raises(ValueError, match="apply_scale: value must satisfy"):  # d = 9 >= 2^(4-1)
        K.softmax(np.array([[0, 9]], np.int32), 1 << 30, 4, K.make_exp_table())


@settings(max_examples=8, deadline=None)
@given(seed=seeds, rounding=roundings, fill=fills, shifts=st.sampled_from([[40, 47, 54], [33, 62], [31, 40]]))
def test_layernorm_fused_path_large(seed, rounding, fill, shifts):
    rng = np.random.default_rng(seed)
    b, c, n = 2, 300, 120                                  # 72000 elements: two blocks
    x = int8_array(rng, (b, c, 1, n), fill)
    x[0, :, 0, 0] = 5                                      # constant position
    x[0, ::2, 0, 1], x[0, 1::2, 0, 1] = -128, 127          # the largest sum of d^2
    gamma, bias, mult, shift = _ln_constants(rng, c, headroom=INT32_MAX - (127 << 16))
    mult, shift = mult.astype(np.int64), rng.choice(np.array(shifts), c)
    if min(shifts) <= 31:   # the checked path: |acc| < 2^30 needs small biases
        bias = (bias // (1 << 8)).astype(np.int32)
    for eps_int in (1, 1 << 61):
        t = K.layernorm_normalize(x, eps_int)
        assert t.dtype == np.int32 and np.array_equal(t, ref_layernorm_t(x, eps_int))
        got = K.layernorm(x, eps_int, gamma, bias, mult, shift, rounding=rounding)
        assert np.array_equal(got, ref_layernorm(x, eps_int, gamma, bias, mult, shift, rounding))


@settings(max_examples=10, deadline=None)
@given(seed=seeds, shift=st.sampled_from([0, 1, 30, 31, 62]), out_dtype=st.sampled_from([np.int8, np.int16]),
       broadcast=st.booleans())
def test_add_block_path_large(seed, shift, out_dtype, broadcast):
    rng = np.random.default_rng(seed)
    a = int8_array(rng, (3, 200, 1, 197), "random")
    a[0, 0, 0, :2] = [-128, 127]
    b = int8_array(rng, (1, 200, 1, 197) if broadcast else a.shape, "extreme")
    ma, mb = int(rng.integers(0, 1 << 31)), INT32_MAX
    want = RK.add(a, b, ma, mb, shift, out_dtype=out_dtype)
    got = K.add(a, b, ma, mb, shift, out_dtype=out_dtype)
    assert got.dtype == out_dtype and np.array_equal(got, want)


@pytest.mark.parametrize("ma, mb, shift, out_dtype", [(INT32_MAX, INT32_MAX, 0, np.int16), (1 << 30, 3 << 28, 31, np.int8),
                                                      (12345, INT32_MAX, 62, np.int8), (0, 1, 1, np.int16)])
def test_add_every_int8_pair(ma, mb, shift, out_dtype):
    # every (a, b) pair once, through reversed (strided) views, and a 0-d pair: against Python ints
    a = np.repeat(np.arange(-128, 128), 256).astype(np.int8).reshape(256, 1, 1, 256)
    b = np.tile(np.arange(-128, 128), 256).astype(np.int8).reshape(256, 1, 1, 256)
    want = RK.add(a, b, ma, mb, shift, out_dtype=out_dtype)
    half = (1 << (shift - 1)) if shift else 0
    lo, hi = _im.int_range(out_dtype)
    got = K.add(a[:, :, :, ::-1], b[:, :, :, ::-1], ma, mb, shift, out_dtype=out_dtype)
    assert got.dtype == out_dtype and np.array_equal(got, want[:, :, :, ::-1])
    zero_d = K.add(np.array(-128, np.int8), np.array(127, np.int8), ma, mb, shift, out_dtype=out_dtype)
    assert zero_d.shape == () and int(zero_d) == int(np.clip((-128 * ma + 127 * mb + half) >> shift, lo, hi))


def test_gelu_every_input_and_strided():
    table = np.random.default_rng(2).integers(-128, 128, 256).astype(np.int8)
    x = np.arange(-128, 128, dtype=np.int8)
    assert K.gelu(x, table).tolist() == [int(table[v + 128]) for v in x.tolist()]
    xs = np.tile(x, (3, 2))[:, ::3]                        # a non-contiguous view
    assert np.array_equal(K.gelu(xs, table), table[xs.astype(np.int64) + 128])
