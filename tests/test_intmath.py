"""Property tests of refvit.intmath against independent scalar Python-int / Fraction references."""
import math
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from refvit import intmath as im
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND

I32_MIN, I32_MAX = -(2 ** 31), 2 ** 31 - 1
FAST = settings(max_examples=300, deadline=None)


# ---------------------------------------------------------------------------------------------
# independent scalar references (python ints, C semantics spelled out)
# ---------------------------------------------------------------------------------------------

def c_div(n: int, d: int) -> int:
    """C integer division: truncate toward zero."""
    q = abs(n) // abs(d)
    return q if (n >= 0) == (d > 0) else -q


def wrap_int32(x: int) -> int:
    return (x + 2 ** 31) % 2 ** 32 - 2 ** 31


def ref_srdhm(a: int, b: int) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul for int32 a, b."""
    if a == b == I32_MIN:
        return I32_MAX
    ab = a * b                                      # std::int64_t product
    nudge = 2 ** 30 if ab >= 0 else 1 - 2 ** 30
    return wrap_int32(c_div(ab + nudge, 2 ** 31))   # static_cast<int32>


def ref_rdbpot(x: int, exponent: int) -> int:
    """gemmlowp RoundingDivideByPOT on int32 x, bit-level (mask / threshold) as in C."""
    mask = (1 << exponent) - 1
    remainder = (x & 0xFFFFFFFF) & mask             # bits of the int32 two's complement
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def ref_multiply_by_quantized_multiplier(x: int, qm: int, tfl_shift: int) -> int:
    """TFLite MultiplyByQuantizedMultiplier(x, qm, tfl_shift); tfl_shift > 0 is a left shift."""
    left, right = max(tfl_shift, 0), max(-tfl_shift, 0)
    shifted = x * (1 << left)
    assert I32_MIN <= shifted <= I32_MAX, "TFLite would overflow here"
    return ref_rdbpot(ref_srdhm(shifted, qm), right)


def ref_round_half_up(q: Fraction) -> int:
    """Nearest integer to q, ties toward +infinity, via exact rationals."""
    lo = math.floor(q)
    return lo + 1 if q - lo >= Fraction(1, 2) else lo


def ref_single_round(value: int, multiplier: int, shift: int) -> int:
    return ref_round_half_up(Fraction(value * multiplier, 2 ** shift))


# ---------------------------------------------------------------------------------------------
# strategies: (value, multiplier, shift) inside the TOSA preconditions, edges forced in
# ---------------------------------------------------------------------------------------------

SHIFT_EDGES = [2, 3, 15, 30, 31, 32, 33, 47, 61, 62]
MULT_EDGES = [0, 1, 2 ** 30, 2 ** 30 + 1, 3 * 2 ** 28, I32_MAX]


def value_bounds(shift: int) -> tuple[int, int]:
    """Inclusive value range allowed by apply_scale for this shift."""
    half = 2 ** (min(shift, 32) - 1)
    return -half, half - 1


@st.composite
def scale_args(draw):
    shift = draw(st.one_of(st.sampled_from(SHIFT_EDGES), st.integers(2, 62)))
    lo, hi = value_bounds(shift)
    edges = [e for e in (lo, hi, -128, 127, -1, 0, 1) if lo <= e <= hi]   # lo/hi are INT32 extremes if shift >= 32
    value = draw(st.one_of(st.sampled_from(edges), st.integers(lo, hi)))
    multiplier = draw(st.one_of(st.sampled_from(MULT_EDGES), st.integers(0, I32_MAX)))
    return value, multiplier, shift


@st.composite
def tie_args(draw):
    """value*multiplier == odd * 2^(shift-1): an exact rounding tie, either sign."""
    shift = draw(st.one_of(st.sampled_from(SHIFT_EDGES), st.integers(2, 62)))
    lo, hi = value_bounds(shift)
    tv = draw(st.integers(max(0, shift - 1 - 30), min(shift - 1, 31)))   # 2-adic valuation of value
    tm = shift - 1 - tv                                                    # ... and of multiplier, <= 30
    negative = draw(st.booleans())
    vmax = (-lo if negative else hi) >> tv
    assume(vmax >= 1)
    ov = draw(st.integers(0, (vmax - 1) // 2)) * 2 + 1                     # odd, ov * 2^tv in range
    om = draw(st.integers(0, ((I32_MAX >> tm) - 1) // 2)) * 2 + 1
    value = -(ov << tv) if negative else ov << tv
    return value, om << tm, shift


TIE_EXAMPLES = [(1, 2 ** 30, 31), (-1, 2 ** 30, 31), (-3, 2 ** 30, 31), (3, 2 ** 30, 31),
                (-2, 2 ** 30, 32), (I32_MIN, 2 ** 30, 62), (1, 1, 2), (-1, 1, 2), (-2, 1, 2)]
EXTREME_EXAMPLES = [(-2, I32_MAX, 2), (1, I32_MAX, 2), (I32_MIN, I32_MAX, 62), (I32_MAX, I32_MAX, 62),
                    (I32_MIN, 0, 62), (-128, I32_MAX, 9), (127, I32_MAX, 9), (3, 2 ** 29, 32)]


def with_examples(examples):
    def deco(f):
        for args in examples:
            f = example(args)(f)
        return f
    return deco


# ---------------------------------------------------------------------------------------------
# apply_scale / requantize
# ---------------------------------------------------------------------------------------------

@FAST
@given(st.one_of(scale_args(), tie_args()))
@with_examples(TIE_EXAMPLES + EXTREME_EXAMPLES)
def test_apply_scale_single_round_is_exact_half_up(args):
    value, multiplier, shift = args
    got = im.apply_scale(value, multiplier, shift, SINGLE_ROUND)
    assert got.dtype == np.int64
    assert int(got) == ref_single_round(value, multiplier, shift)
    assert abs(int(got)) <= 2 ** 30  # the bound the spec promises


@FAST
@given(st.one_of(scale_args(), tie_args()))
@with_examples(TIE_EXAMPLES + EXTREME_EXAMPLES)
def test_apply_scale_double_round_is_tflite(args):
    value, multiplier, shift = args
    got = int(im.apply_scale(value, multiplier, shift, DOUBLE_ROUND))
    assert got == ref_multiply_by_quantized_multiplier(value, multiplier, 31 - shift)


def test_double_round_really_differs_from_single_round():
    # 3 * 2^29 / 2^32 = 0.375: TFLite rounds twice (0.75 -> 1, then 0.5 -> 1); single round gives 0
    assert int(im.apply_scale(3, 2 ** 29, 32, SINGLE_ROUND)) == ref_single_round(3, 2 ** 29, 32) == 0
    assert int(im.apply_scale(3, 2 ** 29, 32, DOUBLE_ROUND)) == ref_multiply_by_quantized_multiplier(3, 2 ** 29, -1) == 1


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7), st.sampled_from(im.ROUNDING_MODES),
       st.integers(0, 2 ** 32 - 1))
def test_apply_scale_broadcasts_per_channel(b, c, n, rounding, seed):
    rng = np.random.default_rng(seed)
    shift = rng.integers(2, 63, size=(1, c, 1, 1))                          # per channel
    multiplier = rng.integers(0, 2 ** 31, size=(1, c, 1, 1))
    half = np.left_shift(1, np.minimum(shift, 32) - 1)
    value = (rng.integers(-2 ** 31, 2 ** 31, size=(b, c, 1, n)) % (2 * half)) - half  # (B, C, 1, N) in range
    got = im.apply_scale(value, multiplier, shift, rounding)
    assert got.shape == (b, c, 1, n)
    ref = ref_single_round if rounding == SINGLE_ROUND else (
        lambda v, m, s: ref_multiply_by_quantized_multiplier(v, m, 31 - s))
    for idx in np.ndindex(got.shape):
        ch = (0, idx[1], 0, 0)
        assert int(got[idx]) == ref(int(value[idx]), int(multiplier[ch]), int(shift[ch]))


@FAST
@given(st.one_of(scale_args(), tie_args()), st.sampled_from([np.int8, np.uint8, np.int16, np.int32]),
       st.sampled_from(im.ROUNDING_MODES))
@example((1000, 2 ** 30, 11), np.int8, SINGLE_ROUND)            # 1000 * 2^19 saturates to 127
@example((-129, 2 ** 30, 30), np.int8, SINGLE_ROUND)              # -129 -> -128
def test_requantize_saturates_exact_result(args, dtype, rounding):
    value, multiplier, shift = args
    exact = int(im.apply_scale(value, multiplier, shift, rounding))
    bits = np.dtype(dtype).itemsize * 8
    lo, hi = (0, 2 ** bits - 1) if np.dtype(dtype).kind == "u" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    got = im.requantize(value, multiplier, shift, dtype, rounding)
    assert got.dtype == dtype and int(got) == min(max(exact, lo), hi)


# ---------------------------------------------------------------------------------------------
# gemmlowp primitives and rounding_shift_right
# ---------------------------------------------------------------------------------------------

INT32 = st.one_of(st.sampled_from([I32_MIN, I32_MIN + 1, -1, 0, 1, I32_MAX, 2 ** 30, -(2 ** 30)]),
                  st.integers(I32_MIN, I32_MAX))


@FAST
@given(INT32, INT32)
@example(I32_MIN, I32_MIN)
@example(-(2 ** 30), 1)                # ab = -2^30: a -0.5 tie after doubling
@example(-3 * 2 ** 15, 2 ** 15)        # -1.5 tie
def test_srdhm_matches_gemmlowp(a, b):
    assert int(im.saturating_rounding_doubling_high_mul(a, b)) == ref_srdhm(a, b)


@FAST
@given(INT32, st.integers(0, 31))
@example(-3, 1)   # -1.5 -> -2 (away from zero)
@example(3, 1)    # 1.5 -> 2
@example(-1, 1)   # -0.5 -> -1
@example(I32_MIN, 31)
@example(I32_MAX, 31)
def test_rdbpot_matches_gemmlowp(x, exponent):
    got = int(im.rounding_divide_by_pot(x, exponent))
    assert got == ref_rdbpot(x, exponent)
    # and independently: nearest integer, ties away from zero
    q = Fraction(x, 2 ** exponent)
    assert got == (ref_round_half_up(q) if x >= 0 else -ref_round_half_up(-q))


@FAST
@given(st.integers(-(2 ** 62), 2 ** 62), st.integers(0, 62))
@example(-3, 1)
@example(-1, 1)
@example(5, 0)
@example(-(2 ** 62), 62)
def test_rounding_shift_right_ties_toward_plus_inf(x, shift):
    assert int(im.rounding_shift_right(x, shift)) == ref_round_half_up(Fraction(x, 2 ** shift))


def test_rounding_shift_right_array_shift():
    x = np.array([[-5, -4, -3, 3, 5]])                        # (1, 5)
    shift = np.array([[0], [1], [2]])                          # (3, 1)
    got = im.rounding_shift_right(x, shift)
    want = [[ref_round_half_up(Fraction(int(v), 2 ** int(s))) for v in x[0]] for s in shift[:, 0]]
    assert got.shape == (3, 5) and got.tolist() == want


# ---------------------------------------------------------------------------------------------
# quantize_multiplier / quantize_add_multipliers
# ---------------------------------------------------------------------------------------------

def ref_quantize_multiplier(scale: float) -> tuple[int, int]:
    """Independent: find e by integer search, round the mantissa half-up, renormalise, clamp."""
    q = Fraction(scale)
    e = q.numerator.bit_length() - q.denominator.bit_length()   # 2^(e-1) <= q < 2^(e+1)
    while q >= Fraction(2) ** e:
        e += 1
    while q < Fraction(2) ** (e - 1):
        e -= 1                                                   # now 2^(e-1) <= q < 2^e
    mult, shift = ref_round_half_up(q * Fraction(2) ** (31 - e)), 31 - e
    if mult == 2 ** 31:
        mult, shift = 2 ** 30, shift - 1
    if shift > 62:
        mult, shift = ref_round_half_up(q * 2 ** 62), 62
    return mult, shift


POSITIVE_SCALES = st.floats(min_value=5e-324, max_value=2.0 ** 29 - 0.25, allow_nan=False, allow_infinity=False)


@FAST
@given(st.one_of(POSITIVE_SCALES, st.floats(1e-6, 10.0)))
@example(1.0)
@example(0.1)
@example(2.0 ** 29 - 0.25)
@example(2.0 ** -32)
def test_quantize_multiplier_rounds_mantissa_half_up(scale):
    mult, shift = im.quantize_multiplier(scale)
    assert isinstance(mult, int) and isinstance(shift, int)
    assert 2 <= shift <= 62 and 0 <= mult < 2 ** 31
    assert (mult, shift) == ref_quantize_multiplier(scale)
    # nearest representable at this shift, ties up
    assert mult == ref_round_half_up(Fraction(scale) * 2 ** shift)
    if shift < 62:
        assert mult >= 2 ** 30   # normalised: full 31-bit precision


@pytest.mark.parametrize("k", range(-32, 29))
def test_quantize_multiplier_power_of_two_is_exact(k):
    assert im.quantize_multiplier(2.0 ** k) == (2 ** 30, 30 - k)


@pytest.mark.parametrize("k", [-30, -1, 0, 5, 28])
def test_quantize_multiplier_mantissa_rounding_up_to_2pow31(k):
    scale = (1 - 2.0 ** -32) * 2.0 ** k
    assert Fraction(scale) * 2 ** (31 - k) == 2 ** 31 - Fraction(1, 2)    # mantissa is exactly 2^31 - 0.5
    assert im.quantize_multiplier(scale) == (2 ** 30, 30 - k)            # rounded up, exponent bumped
    just_below = (1 - 2.0 ** -32 - 2.0 ** -40) * 2.0 ** k
    assert im.quantize_multiplier(just_below) == (2 ** 31 - 1, 31 - k)


@pytest.mark.parametrize("scale, want", [
    (2.0 ** -40, (2 ** 22, 62)),
    (2.0 ** -70, (0, 62)),
    (1.5 * 2.0 ** -63, (1, 62)),        # 0.75 rounds to 1
    (0.5 * 2.0 ** -62, (1, 62)),        # exactly 0.5: half-up
    (5e-324, (0, 62)),
    (0.0, (0, 62)),
])
def test_quantize_multiplier_tiny_scales_clamp_shift(scale, want):
    assert im.quantize_multiplier(scale) == want
    if scale:
        assert ref_quantize_multiplier(scale) == want


@pytest.mark.parametrize("scale", [2.0 ** 29, 2.0 ** 29 - 2.0 ** -3, 1e30, -1.0, -1e-300, float("nan"), float("inf")])
def test_quantize_multiplier_rejects(scale):
    with pytest.raises(ValueError, match="quantize_multiplier: scale"):
        im.quantize_multiplier(scale)


SCALES = st.floats(min_value=1e-8, max_value=1e3)


@FAST
@given(st.one_of(SCALES, st.just(0.0)), st.one_of(SCALES, st.just(0.0)), SCALES)
@example(1.0, 1.0, 1.0)
@example(0.0, 0.0, 1.0)
@example(1.0, 0.5, 2.0 ** -28)
def test_quantize_add_multipliers_properties(sa, sb, so):
    ra, rb = Fraction(sa) / Fraction(so), Fraction(sb) / Fraction(so)
    if max(ref_round_half_up(ra * 4), ref_round_half_up(rb * 4)) >= 2 ** 31:   # not encodable even at shift 2
        with pytest.raises(ValueError, match="quantize_add_multipliers: scale ratios"):
            im.quantize_add_multipliers(sa, sb, so)
        return
    ma, mb, shift = im.quantize_add_multipliers(sa, sb, so)
    assert 2 <= shift <= 62
    assert ma == ref_round_half_up(ra * 2 ** shift) and mb == ref_round_half_up(rb * 2 ** shift)
    assert 0 <= ma < 2 ** 31 and 0 <= mb < 2 ** 31
    if shift < 62:   # largest shift: one more bit would overflow a multiplier
        assert max(ref_round_half_up(ra * 2 ** (shift + 1)), ref_round_half_up(rb * 2 ** (shift + 1))) >= 2 ** 31


@pytest.mark.parametrize("args, match", [
    ((1.0, 1.0, 0.0), "scale_out"), ((1.0, 1.0, -1.0), "scale_out"), ((-1.0, 1.0, 1.0), "scale_a"),
    ((1.0, float("nan"), 1.0), "scale_b"), ((2.0 ** 29, 1.0, 1.0), "too large"),
])
def test_quantize_add_multipliers_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        im.quantize_add_multipliers(*args)


# ---------------------------------------------------------------------------------------------
# isqrt
# ---------------------------------------------------------------------------------------------

def test_isqrt_exhaustive_below_2pow20():
    x = np.arange(2 ** 20, dtype=np.int64)
    r = im.isqrt(x)
    assert r.dtype == np.int64
    assert np.array_equal(r, np.array([math.isqrt(v) for v in range(2 ** 20)]))


def test_isqrt_squares_near_every_power_of_two():
    xs = {2 ** 62 - 1}
    for k in range(62):
        xs |= {2 ** k - 1, 2 ** k, 2 ** k + 1}
    for j in range(32):
        for r in (2 ** j - 1, 2 ** j, 2 ** j + 1):
            xs |= {r * r - 1, r * r, r * r + 1}
    xs = sorted(v for v in xs if 0 <= v < 2 ** 62)
    got = im.isqrt(np.array(xs, dtype=np.int64))
    assert got.tolist() == [math.isqrt(v) for v in xs]


@FAST
@given(st.lists(st.integers(0, 2 ** 62 - 1), min_size=1, max_size=50))
def test_isqrt_random(xs):
    assert im.isqrt(np.array(xs, dtype=np.int64)).tolist() == [math.isqrt(v) for v in xs]


def test_isqrt_keeps_shape_and_accepts_scalars():
    assert im.isqrt(np.arange(12, dtype=np.uint8).reshape(3, 1, 4)).shape == (3, 1, 4)
    assert int(im.isqrt(99)) == 9


# ---------------------------------------------------------------------------------------------
# int_matmul
# ---------------------------------------------------------------------------------------------

def ref_matmul(a, b):
    return np.matmul(np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(np.int8, -128, 127), (np.uint8, 0, 255), (np.int16, -2 ** 15, 2 ** 15 - 1),
                        (np.int32, -2 ** 24, 2 ** 24),      # float32 with short chunks -> float64 path
                        (np.int64, -2 ** 26, 2 ** 26),      # products up to 2^52: float64 path
                        (np.int32, -2 ** 28, 2 ** 28)]),    # products up to 2^56: int64 path
       st.sampled_from([((), ()), ((2,), ()), ((), (3,)), ((2, 3), (3,)), ((2, 1), (1, 4)), ((2, 3), (2, 3))]),
       st.integers(1, 9), st.integers(0, 70), st.integers(1, 9), st.integers(0, 2 ** 32 - 1))
def test_int_matmul_equals_int64_matmul(dt, batches, m, k, n, seed):
    (dtype, lo, hi), (batch_a, batch_b) = dt, batches
    rng = np.random.default_rng(seed)
    a = rng.integers(lo, hi, size=batch_a + (m, k), endpoint=True).astype(dtype)
    b = rng.integers(lo, hi, size=batch_b + (k, n), endpoint=True).astype(dtype)
    got = im.int_matmul(a, b)
    want = ref_matmul(a, b)
    assert got.dtype == np.int64 and got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize("fill", [127, -128])
def test_int_matmul_exact_at_int8_extremes(fill):
    k = 3071
    a = np.full((4, k), fill, np.int8)
    b = np.full((k, 3), fill, np.int8)
    b[::2] = 127                                    # mix products 127*fill and fill*fill
    want = ref_matmul(a, b)
    assert np.array_equal(im.int_matmul(a, b), want)
    assert im._matmul_plan(128, 128, k)[0] == np.float32   # the fast path really is float32 BLAS


def test_plain_float32_matmul_is_wrong_there():
    # 127*127*3071 is odd and > 2^25: no float32 can hold it, so ANY single float32 pass (any BLAS,
    # any summation order) must be wrong, while the chunked float32 path is exact
    k = 3071
    a, b = np.full((4, k), 127, np.int8), np.full((k, 3), 127, np.int8)
    want = ref_matmul(a, b)
    assert int(np.float32(want[0, 0])) != int(want[0, 0])
    plain = np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.int64)
    assert not np.array_equal(plain, want)
    assert im._matmul_plan(127, 127, k) == (np.float32, 2 ** 24 // 127 ** 2)   # chunks of 1040 < K
    assert np.array_equal(im.int_matmul(a, b), want)


def test_int_matmul_large_random_int8_multi_chunk():
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (2, 3, 17, 3072), dtype=np.int8)   # (B, H, M, K)
    b = rng.integers(-128, 128, (3072, 19), dtype=np.int8)
    assert np.array_equal(im.int_matmul(a, b), ref_matmul(a, b))


def test_int_matmul_paths_for_wide_values():
    rng = np.random.default_rng(1)
    for bound, path in [(2 ** 20, np.float64), (2 ** 27, None)]:   # products <= 2^40, then > 2^53
        a = rng.integers(-bound, bound, (5, 40), endpoint=True)
        b = rng.integers(-bound, bound, (40, 6), endpoint=True)
        assert im._matmul_plan(bound, bound, 40)[0] == path
        assert np.array_equal(im.int_matmul(a, b), ref_matmul(a, b))


def test_int_matmul_zero_operand_and_empty_k():
    a = np.zeros((3, 5), np.int8)
    assert np.array_equal(im.int_matmul(a, np.ones((5, 2), np.int8)), np.zeros((3, 2)))
    assert np.array_equal(im.int_matmul(np.zeros((3, 0), np.int8), np.zeros((0, 2), np.int8)), np.zeros((3, 2)))


# ---------------------------------------------------------------------------------------------
# round_half_away_from_zero, saturate, int_range
# ---------------------------------------------------------------------------------------------

def ref_half_away(x: float) -> int:
    q = Fraction(x)
    return ref_round_half_up(q) if q >= 0 else -ref_round_half_up(-q)


@FAST
@given(st.lists(st.floats(-(2.0 ** 62), 2.0 ** 62), min_size=1, max_size=20), st.sampled_from([np.float64, np.float32]))
@example([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999999999999994, -0.49999999999999994], np.float64)
@example([0.49999997, 8388607.5, -8388607.5], np.float32)
def test_round_half_away_from_zero(xs, dtype):
    x = np.array(xs, dtype=dtype)
    got = im.round_half_away_from_zero(x)
    assert got.dtype == np.int64
    assert got.tolist() == [ref_half_away(float(v)) for v in x]


@FAST
@given(st.lists(st.integers(-(2 ** 40), 2 ** 40), min_size=1, max_size=20),
       st.sampled_from(["int8", "int16", "int32", "uint8", "uint16"]))
def test_saturate_clips_then_casts(xs, name):
    bits = np.dtype(name).itemsize * 8
    lo, hi = (0, 2 ** bits - 1) if name.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert im.int_range(name) == (lo, hi)
    got = im.saturate(np.array(xs), name)
    assert got.dtype == np.dtype(name) and got.tolist() == [min(max(v, lo), hi) for v in xs]


# ---------------------------------------------------------------------------------------------
# error paths: every precondition names itself
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc, match", [
    (lambda: im.apply_scale(1, 2 ** 31, 10), ValueError, "apply_scale: multiplier"),
    (lambda: im.apply_scale(1, -1, 10), ValueError, "apply_scale: multiplier"),
    (lambda: im.apply_scale(1, 1, 1), ValueError, "apply_scale: shift"),
    (lambda: im.apply_scale(1, 1, 63), ValueError, "apply_scale: shift"),
    (lambda: im.apply_scale(2 ** 31, 1, 62), ValueError, r"apply_scale: value \(int32\)"),
    (lambda: im.apply_scale(512, 1, 10), ValueError, r"apply_scale: value must satisfy -2\^\(shift-1\)"),
    (lambda: im.apply_scale(-513, 1, 10), ValueError, r"apply_scale: value must satisfy"),
    (lambda: im.apply_scale(np.array([[0], [300]]), 1, np.array([[20, 9]])), ValueError, "apply_scale: value must"),
    (lambda: im.apply_scale(1, 1, 10, "HALF_EVEN"), ValueError, "apply_scale: rounding"),
    (lambda: im.apply_scale(1.0, 1, 10), TypeError, "apply_scale: value must be an integer array"),
    (lambda: im.apply_scale(2 ** 70, 1, 10), OverflowError, "apply_scale: value does not fit int64"),
    (lambda: im.requantize(1, 1, 10, np.uint32), ValueError, "int_range: dtype"),
    (lambda: im.rounding_shift_right(2 ** 63 - 1, 1), OverflowError, r"rounding_shift_right: x \+ 2\^\(shift-1\)"),
    (lambda: im.rounding_shift_right(1, 64), ValueError, "rounding_shift_right: shift"),
    (lambda: im.rounding_shift_right(1, -1), ValueError, "rounding_shift_right: shift"),
    (lambda: im.saturating_rounding_doubling_high_mul(2 ** 31, 1), ValueError, r"high_mul: a \(int32\)"),
    (lambda: im.saturating_rounding_doubling_high_mul(1, I32_MIN - 1), ValueError, r"high_mul: b \(int32\)"),
    (lambda: im.rounding_divide_by_pot(1, 32), ValueError, "rounding_divide_by_pot: exponent"),
    (lambda: im.rounding_divide_by_pot(2 ** 31, 1), ValueError, r"rounding_divide_by_pot: x \(int32\)"),
    (lambda: im.isqrt(-1), ValueError, "isqrt: x must be in"),
    (lambda: im.isqrt(2 ** 62), ValueError, "isqrt: x must be in"),
    (lambda: im.int_matmul(np.ones((2, 3), np.int8), np.ones((4, 2), np.int8)), ValueError, "int_matmul: inner"),
    (lambda: im.int_matmul(np.ones(3, np.int8), np.ones((3, 2), np.int8)), ValueError, "int_matmul: a must have"),
    (lambda: im.int_matmul(np.ones((2, 3)), np.ones((3, 2), np.int8)), TypeError, "int_matmul: a must be an integer"),
    (lambda: im.int_matmul(np.full((1, 4), 2 ** 31), np.full((4, 1), 2 ** 31)), OverflowError, "int_matmul: K"),
    (lambda: im.round_half_away_from_zero(np.array([np.nan])), ValueError, "round_half_away_from_zero: x must be finite"),
    (lambda: im.round_half_away_from_zero(np.array([2.0 ** 63])), OverflowError, "round_half_away_from_zero"),
    (lambda: im.saturate(np.array([1.5]), np.int8), TypeError, "saturate: x must be an integer array"),
])
def test_errors_name_the_violation(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# fast paths (issue 10): block-wise fused rescaling, narrow saturate, float isqrt, float-accumulated
# matmul chunks, block-wise rounding -- each against int64 / Python-int references, boundaries forced
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, target", [((), 4), ((0, 3), 4), ((5,), 2), ((3, 4, 5), 7), ((2, 3, 1, 7), 21),
                                           ((2, 3, 1, 7), 1), ((1, 100), 8), ((4, 1000), 64), ((2, 2), 1000)])
def test_blocks_tile_every_element_once(shape, target):
    count = np.zeros(shape, np.int64)
    for idx in im._blocks(shape, target):
        view = count[idx] if count.ndim else count
        assert view.size <= max(target, shape[-1] if shape else 1)
        view += 1
    assert np.all(count == 1)


def ref_apply_scale_array(value, multiplier, shift, rounding):
    """Element by element with Python ints: TOSA single rounding or TFLite's two roundings."""
    value, multiplier, shift = np.broadcast_arrays(np.asarray(value), np.asarray(multiplier), np.asarray(shift))
    out = np.empty(value.shape, np.int64)
    for idx in np.ndindex(value.shape):
        v, m, s = int(value[idx]), int(multiplier[idx]), int(shift[idx])
        out[idx] = ref_single_round(v, m, s) if rounding == SINGLE_ROUND else \
            ref_multiply_by_quantized_multiplier(v, m, 31 - s)
    return out


def _scale_case(rng, shape, channels_axis, shifts, dtype=np.int32):
    """Values across several blocks with per-channel (multiplier, shift); ties and extremes forced."""
    c = shape[channels_axis]
    cshape = [1] * len(shape)
    cshape[channels_axis] = c
    shift = rng.choice(np.array(shifts), c).reshape(cshape)
    mult = rng.integers(0, 2 ** 31, c).reshape(cshape)
    mult.flat[:3] = [0, I32_MAX, 2 ** 30][:c]
    half = np.left_shift(1, np.minimum(shift, 32) - 1)
    info = np.iinfo(dtype)
    lo = np.maximum(-half, int(info.min))
    hi = np.minimum(half - 1, int(info.max))
    value = rng.integers(lo, hi, shape, endpoint=True)
    flat = value.reshape(-1)
    k = flat.size // 8
    # the channel's value extremes, and small values (exact ties for the 2^30 multiplier at small shifts)
    flat[:k] = np.broadcast_to(lo, shape).reshape(-1)[:k]
    flat[k:2 * k] = np.broadcast_to(hi, shape).reshape(-1)[k:2 * k]
    flat[2 * k:3 * k] = rng.integers(-3, 4, k)
    return np.clip(value, lo, hi).astype(dtype), mult, shift


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(im.ROUNDING_MODES), st.integers(0, 2 ** 32 - 1),
       st.sampled_from([[2, 3, 9, 30, 31], [32, 33, 40, 62], [5, 31, 32, 47, 62]]),
       st.sampled_from([np.int32, np.int16, np.int8, np.uint16, np.int64]))
def test_apply_scale_and_requantize_block_path_equal_reference(rounding, seed, shifts, dtype):
    rng = np.random.default_rng(seed)
    shape = (2, 9, 1, im.BLOCK // 4 + 3)                     # several blocks, ragged last one
    value, mult, shift = _scale_case(rng, shape, 1, shifts, dtype)
    sub = (slice(None), slice(None), slice(None), slice(0, 40))   # the Python reference on a slice of it
    got = im.apply_scale(value, mult, shift, rounding)
    assert got.dtype == np.int64 and got.shape == shape
    assert np.array_equal(got[sub], ref_apply_scale_array(value[sub], mult, shift, rounding))
    # the whole array against the plain int64 formulas (TOSA: single / double_round, proved equal to TFLite)
    v, m, s = value.astype(np.int64), mult, shift
    ab = v * m
    rnd = np.left_shift(np.int64(1), s - 1)
    if rounding == DOUBLE_ROUND:
        rnd = rnd + np.where(s > 31, np.where(v >= 0, 1 << 30, -(1 << 30)), 0)
    assert np.array_equal(got, (ab + rnd) >> s)
    for out_dtype in (np.int8, np.uint8, np.int16, np.int32):
        lo, hi = im.int_range(out_dtype)
        q = im.requantize(value, mult, shift, out_dtype, rounding)
        assert q.dtype == out_dtype and np.array_equal(q, np.clip(got, lo, hi))


def test_double_round_block_path_equals_tflite_composition():
    """apply_scale(DOUBLE_ROUND) against the int64 primitives composed as TFLite does, ties forced at both stages."""
    rng = np.random.default_rng(11)
    n = im.BLOCK + 1000
    shift = rng.integers(2, 63, n)
    mult = rng.integers(0, 2 ** 31, n)
    mult[: n // 3] = 2 ** 30                                # powers of two: exact ties at 2^31 and at 2^right
    half = np.left_shift(1, np.minimum(shift, 32) - 1)
    value = rng.integers(-half, half)
    value[n // 3: n // 2] = -(2 ** (np.minimum(shift[n // 3: n // 2], 32) - 2))
    left, right = np.maximum(31 - shift, 0), np.maximum(shift - 31, 0)
    want = im.rounding_divide_by_pot(im.saturating_rounding_doubling_high_mul(np.left_shift(value, left), mult), right)
    assert np.array_equal(im.apply_scale(value, mult, shift, DOUBLE_ROUND), want)


def test_requantize_scalar_returns_numpy_scalar_like_saturate():
    got = im.requantize(1000, 2 ** 30, 11)
    assert isinstance(got, np.int8) and int(got) == 127
    assert im.apply_scale(5, 2 ** 30, 31).shape == ()


@pytest.mark.parametrize("src", ["int8", "int16", "int32", "uint8", "uint16", "int64"])
@pytest.mark.parametrize("dst", ["int8", "int16", "int32", "uint8", "uint16"])
def test_saturate_narrow_inputs_clip_in_their_own_dtype(src, dst):
    info = np.iinfo(src)
    x = np.array([info.min, info.min + 1, -129, -128, -1, 0, 1, 127, 128, 255, 256, 65535, 65536,
                  info.max - 1, info.max], dtype=np.int64)
    x = x[(x >= info.min) & (x <= info.max)].astype(src)
    lo, hi = im.int_range(dst)
    got = im.saturate(x, dst)
    assert got.dtype == np.dtype(dst) and got.tolist() == [min(max(int(v), lo), hi) for v in x]
    assert isinstance(im.saturate(x[0], dst), np.generic)          # 0-d in, numpy scalar out (unchanged)


def test_isqrt_near_squares_up_to_2pow62():
    rng = np.random.default_rng(5)
    r = np.concatenate([rng.integers(0, 2 ** 31, 20000), np.arange(2 ** 31 - 2000, 2 ** 31),
                        np.left_shift(1, np.arange(31)), np.left_shift(1, np.arange(31)) - 1])
    x = np.concatenate([r * r, r * r - 1, r * r + 1, r * r + r, r * r + 2 * r])      # (r+1)^2 - 1 = r^2 + 2r
    x = x[(x >= 0) & (x < 2 ** 62)]
    got = im.isqrt(x)
    assert got.tolist() == [math.isqrt(int(v)) for v in x]
    assert int(im.isqrt(2 ** 62 - 1)) == 2 ** 31 - 1 and int(im.isqrt(0)) == 0


@pytest.mark.parametrize("bound, k, want_dtype", [
    (127, 768, np.float32),            # one float32 pass: the GEMM output itself
    (127, 3071, np.float64),           # float32 chunks summed in float64 (K*A*B < 2^53)
    (2 ** 20, 40, np.float64),         # float64 plan, one pass
    (2 ** 26, 5, np.int64),            # float64 chunks of 2, K*A*B > 2^53: int64 sum
    (2 ** 28, 6, np.int64),            # products > 2^53: int64 matmul
])
def test_int_matmul_exact_paths_and_dtypes(bound, k, want_dtype):
    rng = np.random.default_rng(bound % 1000 + k)
    a = rng.integers(-bound, bound, (2, 7, k), endpoint=True)
    b = rng.integers(-bound, bound, (k, 5), endpoint=True)
    a[0, 0, :] = bound                                     # the largest sums of the plan's bound
    b[:, 0] = bound
    if bound <= 127:
        a, b = a.astype(np.int8), b.astype(np.int8)
    got = im.int_matmul_exact(a, b)
    assert got.dtype == want_dtype
    want = ref_matmul(a, b)
    assert np.array_equal(got.astype(np.int64), want) and np.array_equal(im.int_matmul(a, b), want)


@lru_cache(maxsize=None)
def ref_half_away_all(xf: bytes) -> list:
    """ref_half_away of every float64 in xf, once per distinct array (both dtypes below hold the same values)."""
    return [ref_half_away(float(v)) for v in np.frombuffer(xf, np.float64)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_round_half_away_from_zero_block_path(dtype):
    rng = np.random.default_rng(8)
    x = (rng.integers(-2 ** 20, 2 ** 20, im.BLOCK * 2 + 17) / 4).astype(dtype)    # many exact .5 / .25 / .75
    x[:6] = [0.5, -0.5, 2.5, -2.5, 0.0, -0.0]
    x = x.reshape(2, -1) if x.size % 2 == 0 else x
    got = im.round_half_away_from_zero(x)
    assert got.shape == x.shape and got.dtype == np.int64
    xf = x.astype(np.float64).ravel()
    assert got.ravel().tolist() == ref_half_away_all(xf.tobytes())


def test_round_half_away_from_zero_error_precedence():
    x = np.zeros(im.BLOCK * 3)
    x[0] = 2.0 ** 63                    # overflow early ...
    x[-1] = np.nan                      # ... but a NaN anywhere is reported first, as before
    with pytest.raises(ValueError, match="finite"):
        im.round_half_away_from_zero(x)
    x[-1] = -np.inf
    with pytest.raises(ValueError, match="finite"):
        im.round_half_away_from_zero(x)
    x[-1] = 0.0
    with pytest.raises(OverflowError):
        im.round_half_away_from_zero(x)
    assert int(im.round_half_away_from_zero(np.array([2.0 ** 63 - 1024]))[0]) == 2 ** 63 - 1024


@FAST
@given(st.integers(-1080, 40), st.integers(0, 2 ** 52 - 1))
@example(-33, 2 ** 52 - 1)
@example(-32, 0)
@example(-95, 2 ** 51)
def test_quantize_multiplier_integer_arithmetic_matches_fractions(exp, frac_bits):
    """Every binade from subnormals to 2^29, mantissas with all low bits: against the Fraction reference."""
    scale = math.ldexp(1.0 + frac_bits / 2 ** 52, exp)
    if not (0 < scale < 2.0 ** 29 - 0.125):
        return
    assert im.quantize_multiplier(scale) == ref_quantize_multiplier(scale)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16])
def test_l1_bound_is_the_largest_row_or_column_norm(dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(4)
    a = rng.integers(info.min, info.max, (3, 50), endpoint=True).astype(dtype)
    b = rng.integers(info.min, info.max, (50, 200), endpoint=True).astype(dtype)
    a[1] = info.min                                   # the most negative value: |x| must not wrap
    b[:, 7] = info.min
    amax, bmax = im._max_abs(a), im._max_abs(b)
    want_rows = int(np.abs(a.astype(np.int64)).sum(axis=1).max()) * bmax      # a is the smaller operand
    assert im._l1_bound(a, b, amax, bmax) == want_rows
    want_cols = int(np.abs(b.astype(np.int64)).sum(axis=0).max()) * amax
    assert im._l1_bound(np.zeros((300, 50), dtype), b, amax, bmax) == want_cols


def test_int_matmul_one_pass_from_norms_and_not_beyond():
    """K = 3072 int8: a sparse operand fits one float32 pass (norm bound <= 2^24), a dense one needs chunks."""
    rng = np.random.default_rng(6)
    a = rng.integers(-127, 128, (40, 3072)).astype(np.int8)
    sparse = np.zeros((3072, 30), np.int8)
    sparse[::24] = rng.integers(-128, 128, (128, 30))                # ||col||_1 <= 128 * 128 = 2^14
    sparse[::24, 0] = -128
    assert im._l1_bound(a, sparse, 127, 128) <= im.F32_EXACT
    assert im.int_matmul_exact(a, sparse).dtype == np.float32          # one pass
    assert np.array_equal(im.int_matmul(a, sparse), ref_matmul(a, sparse))
    dense = np.full((3072, 30), -128, np.int8)
    assert im.int_matmul_exact(a, dense).dtype == np.float64           # chunks summed in float64
    assert np.array_equal(im.int_matmul(a, dense), ref_matmul(a, dense))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(POSITIVE_SCALES, st.floats(1e-6, 10.0), st.just(0.0)), min_size=1, max_size=40))
@example([1.0, 0.1, 2.0 ** 29 - 0.25, 2.0 ** -32, 2.0 ** -40, 1.5 * 2.0 ** -63, 0.5 * 2.0 ** -62, 5e-324, 0.0,
          (1 - 2.0 ** -32) * 2.0 ** -30, (1 - 2.0 ** -32) * 2.0 ** -33, 0.49999999999999994 * 2.0 ** -62])
def test_quantize_multipliers_vectorized_equals_scalar(scales):
    mult, shift = im.quantize_multipliers(np.array(scales))
    assert mult.dtype == shift.dtype == np.int64
    assert list(zip(mult.tolist(), shift.tolist())) == [im.quantize_multiplier(s) for s in scales]


@pytest.mark.parametrize("scale", [2.0 ** 29, -1.0, float("nan"), float("inf")])
def test_quantize_multipliers_rejects_like_the_scalar(scale):
    with pytest.raises(ValueError, match="quantize_multiplier: scale"):
        im.quantize_multipliers(np.array([0.5, scale, 0.25]))


# ---------------------------------------------------------------- requantize in float64 (spec, part 1)

def _edge_values(m: int, shift: int, lo: int, hi: int) -> list[int]:
    """int32 values whose value * m * 2^-shift + 1/2 lands on, or one step either side of, each integer
    from lo - 1 to hi + 1 (the ties and the saturation edges), plus the int32 extremes."""
    vals = {-(1 << 31), (1 << 31) - 1, 0}
    if m:
        for k in sorted({lo - 1, lo, lo + 1, -1, 0, 1, hi - 1, hi, hi + 1} | set(range(lo, hi + 2, max(1, (hi - lo) // 64)))):
            v0 = ((2 * k - 1) << (shift - 1)) // m          # floor of the value at which floor(V) becomes k
            vals.update(v for v in (v0 - 1, v0, v0 + 1, v0 + 2) if -(1 << 31) <= v < 1 << 31)
    return sorted(vals)


@pytest.mark.parametrize("out_dtype", [np.int8, np.uint8, np.int16, np.uint16])
@pytest.mark.parametrize("shift", range(32, 47))
def test_requantize_float64_form_ties_and_edges(out_dtype, shift):
    lo, hi = im.int_range(out_dtype)
    bits = 8 * np.dtype(out_dtype).itemsize
    sh = np.array([shift], np.int64)
    assert im.float_scale_exact(sh, SINGLE_ROUND, lo, hi, out_dtype) == (shift <= 53 - bits)
    assert not im.float_scale_exact(sh, DOUBLE_ROUND, lo, hi, out_dtype)
    rng = np.random.default_rng(shift)
    for m in [1 << 30, (1 << 31) - 1, 3 << 28, 0, 1, int(rng.integers(1 << 30, 1 << 31))]:
        v = np.array(_edge_values(m, shift, lo, hi), np.int64)
        want = [min(max((int(x) * m + (1 << (shift - 1))) >> shift, lo), hi) for x in v]
        got = im.requantize(v.astype(np.int32), m, shift, out_dtype=out_dtype)
        assert got.dtype == out_dtype and got.tolist() == want, (m, shift)
        # per-channel form, as conv2d uses it: a column of multipliers against rows of values
        mult = np.array([[m], [max(m - 1, 0)]], np.int64)
        got2 = im.requantize(np.tile(v.astype(np.int32), (2, 1)), mult, np.full((2, 1), shift), out_dtype=out_dtype)
        want2 = [[min(max((int(x) * int(mm) + (1 << (shift - 1))) >> shift, lo), hi) for x in v] for mm in mult[:, 0]]
        assert got2.tolist() == want2


def test_requantize_float64_form_is_not_exact_beyond_its_shift_bound():
    # why the bound: at shift 46 with an 8-bit output, W = P + 128.5 in [128, 256) has a float64 step of
    # 2^-45, so V = 54 - 2^-46 (found by search: value * m = 2^45 - 1 mod 2^46) rounds up to 54. The guard
    # keeps this shift on the int64 form, which gives 53.
    shift, m, v = 46, 2103939213, 1789371
    exact = (v * m + (1 << (shift - 1))) >> shift
    w = np.float64(v) * np.ldexp(np.float64(m), -shift) + 128.5   # the float64 form's W
    assert (exact, int(w) - 128) == (53, 54)
    assert not im.float_scale_exact(np.array([shift]), SINGLE_ROUND, -128, 127, np.int8)
    assert im.requantize(np.array([v], np.int32), m, shift).tolist() == [53]
