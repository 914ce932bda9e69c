"""The reference kernels (refvit.reference, docs/spec.md's pseudocode) against the fast kernels.

1. Every (op, variant) of refvit.graph.KERNELS has a reference kernel of the same name and signature.
2. Property tests, fast == reference, for every kernel: both rounding modes, edge values (ties, saturation
   bounds, perfect squares, extreme accumulators, int16 inputs where the variant takes them); outputs and
   `internals` equal in dtype, shape and every value; an input one rejects, the other rejects with the same
   exception class. The fast kernels run both without internals (their fused paths) and with them.
3. The primitives of Part 1 against intmath, and the reference against the spec's worked examples
   (hand-computed values, independent of both implementations).
4. Whole models: every named scheme, both roundings, unpruned and pruned ("1:0.5"), run with the reference
   kernels and with the default: every traced tensor and internal bit-identical.
5. The reference layer imports no fast kernel.
"""
from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from refvit import int_kernels as K
from refvit import int_kernels_prune as KP
from refvit import int_kernels_variants as KV
from refvit import intmath as im
from refvit import graph as G
from refvit import registry as R
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.reference import arith, kernels as RK, prune as RP, variants as RV

ROUNDINGS = (SINGLE_ROUND, DOUBLE_ROUND)
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
SETTINGS = settings(max_examples=40, deadline=None)
FILLS = ("random", "min", "max", "extreme", "small")
seeds = st.integers(0, 2 ** 32 - 1)
fills = st.sampled_from(FILLS)
roundings = st.sampled_from(ROUNDINGS)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def assert_same(got, want, what="output"):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.array_equal(got, want), f"{what}: values differ at {np.argwhere(got != want)[:3].tolist()}"


def takes_internals(fn) -> bool:
    return "internals" in inspect.signature(fn).parameters


def run_both(key, *args, **kw):
    """Call the registry row's fast kernel and its reference kernel on the same arguments: equal outputs (and
    internals, where the kernel takes them), or the same exception class. Returns the output."""
    fast, ref = R.row(*key).kernel, R.row(*key).reference
    try:
        want = fast(*args, **kw)
    except (ValueError, OverflowError) as e:
        with pytest.raises(type(e)):
            ref(*args, **kw)
        return None
    assert_same(ref(*args, **kw), want)
    if takes_internals(fast):
        kept_fast, kept_ref = {}, {}
        assert_same(fast(*args, **kw, internals=kept_fast), want, "output with internals")
        assert_same(ref(*args, **kw, internals=kept_ref), want, "reference output with internals")
        assert set(kept_ref) == set(kept_fast) == set(R.row(*key).internals)
        for name in kept_fast:
            assert_same(kept_ref[name], kept_fast[name], f"internal {name}")
    return want


def int_array(rng, shape, fill, lo, hi, dtype):
    """Values in [lo, hi]: random, all lo, all hi, lo/hi mixed, or small (ties and zero)."""
    if fill == "random":
        a = rng.integers(lo, hi, shape, endpoint=True)
    elif fill == "min":
        a = np.full(shape, lo)
    elif fill == "max":
        a = np.full(shape, hi)
    elif fill == "extreme":
        a = rng.choice(np.array([lo, hi]), shape)
    else:
        a = rng.integers(max(lo, -3), min(hi, 3), shape, endpoint=True)
    return a.astype(dtype)


SHIFT_MODES = ("near", "float", "wide", "small")


def scales(rng, n, acc_bound, mode):
    """n (multiplier int32, shift int8) pairs valid for values |acc| <= acc_bound: near (outputs around 2^8, some
    saturate), float (32..45: the fast float64 requantization), wide (any valid shift), small (<= 31 where possible)."""
    bits = max(int(acc_bound).bit_length(), 1)
    mult = rng.integers(0, 1 << 31, n)
    mult[:min(n, 3)] = [INT32_MAX, 1 << 30, 0][:min(n, 3)]        # boundary multipliers; 2^30 makes exact ties
    lo = max(bits + 1, 2)
    if mode == "near":
        shift = bits + 23 + rng.integers(-2, 3, n)
    elif mode == "float":
        shift = rng.integers(32, 46, n)
    elif mode == "wide":
        shift = rng.integers(lo, 63, n)
    else:
        shift = rng.integers(lo, max(lo, 31) + 1, n)
    return mult.astype(np.int32), np.clip(shift, lo, 62).astype(np.int8)


# ---------------------------------------------------------------------------------------------
# 1. one reference kernel per registry row, the same name and signature
# ---------------------------------------------------------------------------------------------

def test_every_registry_row_has_a_reference_kernel():
    for row in R.rows():
        key, fast, ref = row.key, row.kernel, row.reference
        assert callable(ref) and ref.__module__.startswith("refvit.reference."), key
        assert ref.__name__ == fast.__name__, key
        fp, rp = inspect.signature(fast).parameters, inspect.signature(ref).parameters
        assert [(p.name, p.kind, p.default) for p in rp.values()] == \
               [(p.name, p.kind, p.default) for p in fp.values()], key
        assert "docs/spec.md" in ref.__doc__, f"{ref.__name__}'s docstring names no spec section"


def test_reference_kernel_set_picks_the_row_and_rejects_unknown_variants():
    op = G.build_graph(G.DeiTConfig(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=3))[0]
    assert G.kernel_set("reference")(op) is R.row(op.op, op.variant).reference is RK.conv2d

    class Fake:
        op, variant = "gelu", "cubic"
    with pytest.raises(ValueError, match="cubic"):
        G.reference_kernels(Fake())


def test_fixed_constants_are_the_fast_kernels():
    assert RK.make_exp_table().tolist() == K.make_exp_table().tolist()
    pairs = [(RK.MAX_CONV_TERMS, K.MAX_CONV_TERMS), (RK.MAX_HEAD_DIM, K.MAX_HEAD_DIM), (RK.MAX_TOKENS, K.MAX_TOKENS),
             (RK.MAX_LN_CHANNELS, K.MAX_LN_CHANNELS), (RK.MAX_LN_EPS_INT, K.MAX_LN_EPS_INT),
             (RV.EXP_POLY_LN2, KV.EXP_POLY_LN2), (RV.EXP_POLY_QB, KV.EXP_POLY_QB), (RV.EXP_POLY_QC, KV.EXP_POLY_QC),
             (RV.SOFTMAX_POLY_CAP, KV.SOFTMAX_POLY_CAP), (RV.SOFTMAX_SHIFT_CAP, KV.SOFTMAX_SHIFT_CAP),
             (RV.LN32_SUMSQ_MAX, KV.LN32_SUMSQ_MAX), (RV.W4_MAX, KV.W4_MAX), (RV.MAX_W4_TERMS, KV.MAX_W4_TERMS),
             (RV.LN_WIDE_MAX_CHANNELS, KV.LN_WIDE_MAX_CHANNELS), (RP.MAX_SELECT_HEADS, KP.MAX_SELECT_HEADS)]
    for got, want in pairs:
        assert got == want


# ---------------------------------------------------------------------------------------------
# 3. Part 1 primitives against intmath, and the spec's worked examples
# ---------------------------------------------------------------------------------------------

SHIFT_EDGES = [2, 3, 15, 30, 31, 32, 33, 45, 46, 47, 61, 62]
MULT_EDGES = [0, 1, 1 << 29, 1 << 30, (1 << 30) + 1, INT32_MAX]


@st.composite
def scale_args(draw):
    """(value, multiplier, shift) in apply_scale's domain; value * multiplier an exact tie half of the time."""
    shift = draw(st.one_of(st.sampled_from(SHIFT_EDGES), st.integers(2, 62)))
    half = 1 << (min(shift, 32) - 1)
    if draw(st.booleans()):
        tv = draw(st.integers(max(0, shift - 31), min(shift - 1, 31)))      # value = odd * 2^tv, multiplier
        ov = draw(st.integers(0, max(0, (half >> tv) - 1) // 2)) * 2 + 1     # = odd * 2^(shift-1-tv)
        om = draw(st.integers(0, ((INT32_MAX >> (shift - 1 - tv)) - 1) // 2)) * 2 + 1
        value = min(ov << tv, half - 1) * draw(st.sampled_from([1, -1]))
        return value, om << (shift - 1 - tv), shift
    value = draw(st.one_of(st.sampled_from([-half, half - 1, -1, 0, 1]), st.integers(-half, half - 1)))
    return value, draw(st.one_of(st.sampled_from(MULT_EDGES), st.integers(0, INT32_MAX))), shift


@settings(max_examples=400, deadline=None)
@given(st.lists(scale_args(), min_size=1, max_size=8), roundings)
@example([(-2, 1 << 30, 32), (3, 1 << 29, 32), (-3, 1 << 30, 31), (INT32_MIN, INT32_MAX, 62), (INT32_MAX, 0, 62)],
         DOUBLE_ROUND)
def test_apply_scale_and_requantize_equal_intmath(args, rounding):
    v, m, s = (np.array(a, np.int64) for a in zip(*args))
    assert_same(arith.apply_scale(v, m, s, rounding), im.apply_scale(v, m, s, rounding))
    for dtype in (np.int8, np.uint8, np.int16, np.int32):
        assert_same(arith.requantize(v, m, s, dtype, rounding), im.requantize(v, m, s, dtype, rounding))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=6), st.integers(0, 31))
def test_gemmlowp_primitives_and_rounding_shift_equal_intmath(xs, e):
    x = np.array(xs, np.int64)
    assert_same(arith.rounding_divide_by_pot(x, e), im.rounding_divide_by_pot(x, e))
    assert_same(arith.saturating_rounding_doubling_high_mul(x, x[::-1]),
                im.saturating_rounding_doubling_high_mul(x, x[::-1]))
    for shift in (0, 1, e, 2 * e, 62):
        assert_same(arith.rounding_shift_right(x, shift), im.rounding_shift_right(x, shift))
    for dtype in (np.int8, np.uint8, np.int16, np.uint16):
        assert_same(arith.saturate(x, dtype), im.saturate(x, dtype))


def _isqrt_edges():
    out = [0, 1, 2, 3, 4, 15, 16, (1 << 62) - 1, (1 << 31) - 1, 1 << 31]
    for k in range(1, 32):
        r = (1 << k) - 1
        out += [r * r - 1, r * r, r * r + 1, (r + 1) * (r + 1) - 1]             # perfect squares and neighbours
    return [v for v in out if 0 <= v < 1 << 62]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, (1 << 62) - 1), min_size=1, max_size=20))
def test_isqrt_bit_by_bit_equals_intmath_and_math(xs):
    x = np.array(xs + _isqrt_edges(), np.int64)
    got = arith.isqrt(x)
    assert_same(got, im.isqrt(x))
    assert got.tolist() == [math.isqrt(int(v)) for v in x]
    small = x[x <= INT32_MAX]
    assert_same(RV.isqrt32(small), KV.isqrt32(small))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(1 << 30), 0), min_size=1, max_size=20))
def test_exp_shift_and_exp_poly_equal_the_fast_ones(vs):
    v = np.array(vs + [0, -1, -16384, -170965, -182361, -(1 << 30)], np.int64)
    assert_same(RV.exp_shift(v), KV.exp_shift(v))
    w = np.maximum(v, -RV.SOFTMAX_POLY_CAP)
    w = np.concatenate([w, [-11356, -11357, -11358, -22714, -RV.SOFTMAX_POLY_CAP]])
    assert_same(RV.exp_poly(w), KV.exp_poly(w))


@pytest.mark.parametrize("scale_in,scale_out", [(0.05, 0.03), (0.02, 0.02), (0.1, 0.005), (1e-3, 0.5)])
def test_gelu_table_builder_equals_the_fast_one(scale_in, scale_out):
    assert_same(RK.make_gelu_table(scale_in, scale_out), K.make_gelu_table(scale_in, scale_out))


@settings(max_examples=200, deadline=None)
@given(st.integers(-(1 << 54), 1 << 54), st.integers(1, 1 << 40), roundings)
@example(-7, 2, SINGLE_ROUND)
@example(-7, 2, DOUBLE_ROUND)
def test_divide_round_equals_the_fast_one(num, den, rounding):
    assert RP.divide_round(num, den, rounding) == int(KP.divide_round(num, den, rounding))


def test_spec_worked_examples():
    """docs/spec.md's worked examples, values written by hand in the spec (not computed by either kernel set)."""
    assert arith.rounding_shift_right(np.array([-3, -1, 3, 5]), 1).tolist() == [-1, 0, 2, 3]
    a = np.array([1, -1, -3, 3, INT32_MIN])
    b = np.array([1 << 30] * 4 + [INT32_MIN])
    assert arith.saturating_rounding_doubling_high_mul(a, b).tolist() == [1, 0, -1, 2, INT32_MAX]
    assert arith.rounding_divide_by_pot(np.array([-3, -1, 1, 3, 5]), 1).tolist() == [-2, -1, 1, 2, 3]
    rows = [(-3, 1 << 30, 31, -1, -1), (3, 1 << 29, 32, 0, 1), (-2, 1 << 30, 32, 0, -1), (100, 1518500250, 38, 1, 1)]
    for v, m, s, single, double in rows:                          # Part 1, apply_scale, "Worked examples"
        assert int(arith.apply_scale(v, m, s, SINGLE_ROUND)) == single
        assert int(arith.apply_scale(v, m, s, DOUBLE_ROUND)) == double
    assert int(arith.requantize(1000, 1 << 30, 11)) == 127
    assert arith.saturate(np.array([-300, 5, 200]), np.int8).tolist() == [-128, 5, 127]
    assert arith.isqrt(np.array([0, 1, 2, 3, 4, 15, 16, (1 << 62) - 1])).tolist() == [0, 1, 1, 1, 2, 3, 4, INT32_MAX]

    table = RK.make_exp_table()                                   # Part 2, softmax, "Worked example"
    assert int(table[0]) == 32768 and int(table[177]) == 1 and int(table[178]) == 0
    kept = {}
    p = RK.softmax(np.array([[10, 8, 0, -20]], np.int32), 1 << 30, 29, table, internals=kept)
    assert p.tolist() == [[61, 47, 17, 1]]
    assert kept["index"].tolist() == [[0, 4, 20, 60]] and kept["exp"].tolist() == [[32768, 25520, 9388, 771]]
    assert kept["sum"].tolist() == [[68447]] and kept["recip"].tolist() == [[16063693]]
    for fn, want in ((RV.softmax_poly, [61, 47, 17, 1]), (RV.softmax_shift, [59, 49, 18, 1])):   # Part 4
        kept = {}
        assert fn(np.array([[10, 8, 0, -20]], np.int32), 1 << 30, 19, internals=kept).tolist() == [want]
        assert kept["diff"].tolist() == [[0, 4096, 20480, 61440]]
    assert RV.exp_poly(np.array([0, -4096, -20480, -61440])).tolist() == [22856, 17826, 6526, 538]
    assert RV.exp_shift(np.array([0, -4096, -20480, -61440])).tolist() == [32768, 26880, 9856, 824]

    x = np.array([10, -2, 4, 0], np.int8).reshape(1, 4, 1, 1)     # Part 2, layernorm, "Worked example"
    kept = {}
    out = RK.layernorm(x, 1, np.full(4, 127, np.int8), np.array([2080768, 0, 0, 0], np.int32),
                       np.full(4, 1431655765), np.full(4, 47), internals=kept)
    assert out.ravel().tolist() == [87, -47, 9, -28]
    assert kept["d"].ravel().tolist() == [28, -20, 4, -12] and kept["sumsq"].item() == 1344
    assert kept["root"].item() == 36 and kept["recip"].item() == 30541989660
    assert kept["t"].ravel().tolist() == [50972, -36409, 7282, -21845]
    assert kept["acc"].ravel().tolist() == [8554212, -4623943, 924814, -2774315]
    assert RV.layernorm_int32_normalize(x, 1, 0).ravel().tolist() == [50972, -36409, 7282, -21845]   # Part 4

    gx = np.array([-40, -20, 1, 20, 40], np.int8)                 # Part 4, gelu_poly and gelu_shift examples
    assert RV.gelu_poly(gx, 51, 2771, 2771, 0, 1587694791, 43).tolist() == [-1, -3, 1, 17, 39]
    assert RV.gelu_shift(gx[:2], 1462006868, 20, 1 << 30, 45).tolist() == [-1, -3]

    p = np.zeros((1, 1, 5, 5), np.int8)                           # Token pruning, "Worked example"
    xt = np.array([5, 10, -3, 7, -4], np.int8).reshape(1, 1, 1, 5)
    p[0, 0, 0, 1:] = [3, 1, 2, 2]
    index = RP.select_tokens(p, keep=2, num_prefix=1)
    assert index.tolist() == [[1, 3]]
    assert RP.prune_tokens(xt, p, index, num_prefix=1).ravel().tolist() == [5, 10, 7, -4]
    p[0, 0, 0, 1:] = [3, 0, 2, 0]
    for rounding, last in ((SINGLE_ROUND, -3), (DOUBLE_ROUND, -4)):
        assert RP.prune_tokens(xt, p, index, num_prefix=1, rounding=rounding).ravel().tolist() == [5, 10, 7, last]


# ---------------------------------------------------------------------------------------------
# 2. every kernel: fast == reference
# ---------------------------------------------------------------------------------------------

@settings(max_examples=90, deadline=None)
@given(seed=seeds, fill=fills, rounding=roundings, variant=st.sampled_from(["w8", "w4", "mixed-pot"]),
       b=st.integers(1, 2), cin=st.integers(1, 5), cout=st.integers(1, 5), k=st.sampled_from([1, 2, 3]),
       ho=st.integers(1, 3), mode=st.sampled_from(SHIFT_MODES),
       out_dtype=st.sampled_from([np.int8, np.int16, np.int32]), bias_fill=st.sampled_from(["random", "edge"]))
def test_conv2d_variants(seed, fill, rounding, variant, b, cin, cout, k, ho, mode, out_dtype, bias_fill):
    rng = np.random.default_rng(seed)
    wmax = 7 if variant == "w4" else 127
    x = int_array(rng, (b, cin, ho * k, 2 * k), fill, -128, 127, np.int8)
    w = int_array(rng, (cout, cin, k, k), fill if fill != "small" else "random", -wmax, wmax, np.int8)
    pot_rows = rng.random(cout) < 0.5
    if variant == "mixed-pot":
        w[pot_rows] = rng.choice(np.array([0, 1, -1, 2, -4, 8, -16, 32, -64, 64]), w[pot_rows].shape)
    terms = cin * k * k
    headroom = INT32_MAX - terms * 128 * 127                       # every variant's headroom at least
    bias = (rng.integers(-(1 << 20), 1 << 20, cout) if bias_fill == "random"
            else rng.choice(np.array([-headroom, headroom]), cout)).astype(np.int32)
    mult, shift = scales(rng, cout, terms * 128 * wmax + int(np.abs(bias.astype(np.int64)).max()), mode)
    extra = (pot_rows,) if variant == "mixed-pot" else ()
    run_both(("conv2d", variant), x, w, bias, mult, shift, *extra, rounding=rounding, out_dtype=np.dtype(out_dtype))


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("sign", [1, -1])
def test_extreme_accumulators(rounding, sign):
    """The largest accumulators the bounds allow (no saturation of acc: it is exactly int32's edge)."""
    cin = 3072
    x = np.full((1, cin, 1, 2), -128, np.int8)
    w = np.full((2, cin, 1, 1), -127 * sign, np.int8)
    bias = np.full(2, sign * (INT32_MAX - cin * 128 * 127), np.int32)
    kept = {}
    run_both(("conv2d", "w8"), x, w, bias, np.array([1 << 30, INT32_MAX]), np.array([32, 62]), rounding=rounding,
             out_dtype=np.dtype(np.int32))
    RK.conv2d(x, w, bias, np.array([1 << 30, 1]), np.array([33, 62]), out_dtype=np.int32, internals=kept)
    assert int(np.abs(kept["acc"].astype(np.int64)).max()) == INT32_MAX
    q = np.full((1, 1, 1024, 3), -128, np.int8)                    # |s| = D * 2^14 = 2^24
    assert int(run_both(("attention_scores", "int32"), q, q).max()) == 1 << 24
    p = np.full((1, 1, 600, 600), 127, np.int8)
    v = np.full((1, 1, 2, 600), -128 if sign > 0 else 127, np.int8)
    run_both(("attention_context", "int32"), p, v, 1 << 30, 40, rounding=rounding)
    w4 = np.full((2, cin, 1, 1), -7 * sign, np.int8)
    run_both(("conv2d", "w4"), x, w4, np.full(2, sign * (INT32_MAX - cin * 128 * 7), np.int32),
             np.array([1 << 30, 3]), np.array([32, 62]), rounding=rounding, out_dtype=np.dtype(np.int32))


@SETTINGS
@given(seed=seeds, fill=fills, b=st.integers(1, 2), h=st.integers(1, 3), d=st.integers(1, 9), n=st.integers(1, 9))
def test_attention_scores(seed, fill, b, h, d, n):
    rng = np.random.default_rng(seed)
    q, k = (int_array(rng, (b, h, d, n), fill, -128, 127, np.int8) for _ in range(2))
    run_both(("attention_scores", "int32"), q, k)


@SETTINGS
@given(seed=seeds, fill=fills, rounding=roundings, b=st.integers(1, 2), h=st.integers(1, 2), d=st.integers(1, 5),
       n=st.integers(1, 12), mode=st.sampled_from(SHIFT_MODES))
def test_attention_context(seed, fill, rounding, b, h, d, n, mode):
    rng = np.random.default_rng(seed)
    p = int_array(rng, (b, h, n, n), fill, 0, 127, np.int8)
    v = int_array(rng, (b, h, d, n), fill, -128, 127, np.int8)
    mult, shift = scales(rng, 1, n * 127 * 128, mode)
    run_both(("attention_context", "int32"), p, v, int(mult[0]), int(shift[0]), rounding=rounding)


def score_rows(rng, shape, span, fill):
    """int32 scores whose row spans are about `span` (ties and the int32 extremes included)."""
    if fill == "extreme":
        return rng.choice(np.array([INT32_MIN, INT32_MAX, 0], np.int64), shape).astype(np.int32)
    base = rng.integers(-(1 << 30), 1 << 30, shape[:-1] + (1,))
    s = base + (rng.integers(0, max(span, 1), shape) if fill != "small" else rng.integers(-2, 3, shape))
    return np.clip(s, INT32_MIN, INT32_MAX).astype(np.int32)


@SETTINGS
@given(seed=seeds, fill=fills, rounding=roundings, variant=st.sampled_from(["table", "poly", "shift"]),
       lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), n=st.integers(1, 20),
       span=st.sampled_from([1, 40, 1 << 12, 1 << 20, 1 << 29, 1 << 31]),
       mult=st.one_of(st.sampled_from([0, 1, 1 << 30, INT32_MAX]), st.integers(0, INT32_MAX)),
       shift=st.one_of(st.sampled_from([2, 19, 30, 31, 32, 33, 40, 62]), st.integers(2, 62)),
       table_kind=st.sampled_from(["spec", "random16", "random32"]))
def test_softmax_variants(seed, fill, rounding, variant, lead, n, span, mult, shift, table_kind):
    rng = np.random.default_rng(seed)
    scores = score_rows(rng, tuple(lead) + (n,), span, fill)
    if variant != "table":
        run_both(("softmax", variant), scores, mult, shift, rounding=rounding)
        return
    table = K.make_exp_table()
    if table_kind != "spec":
        table = np.sort(rng.integers(0, 1 << 15, 256))[::-1].astype(np.uint16 if table_kind == "random16" else np.int32)
        table[0] = 1 << 15
    run_both(("softmax", "table"), scores, mult, shift, table, rounding=rounding)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_softmax_long_rows_and_large_differences(rounding):
    """Beyond the fast kernel's d -> e table (2^19) and the d_cap clamp of the variants."""
    rng = np.random.default_rng(5)
    scores = rng.integers(-(1 << 30), 1 << 30, (3, 300)).astype(np.int32)
    for mult, shift in ((1 << 30, 34), (INT32_MAX, 40), (1, 62), (1 << 30, 31)):
        run_both(("softmax", "table"), scores, mult, shift, K.make_exp_table(), rounding=rounding)
    for variant in ("poly", "shift"):
        for mult, shift in ((1 << 30, 19), (1 << 30, 31), (1 << 30, 33), (5, 40), (INT32_MAX, 62)):
            run_both(("softmax", variant), scores, mult, shift, rounding=rounding)


@SETTINGS
@given(seed=seeds, fill=fills, dtypes=st.sampled_from([("int8", "int8", "int8"), ("int8", "int8", "int16"),
                                                       ("int16", "int8", "int16"), ("int16", "int16", "int8"),
                                                       ("int8", "int16", "int16")]),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.just(1), st.integers(1, 6)),
       broadcast=st.booleans(), ma=st.one_of(st.sampled_from([0, 1, 1 << 30, INT32_MAX]), st.integers(0, INT32_MAX)),
       mb=st.integers(0, INT32_MAX), shift=st.one_of(st.sampled_from([0, 1, 30, 31, 32, 62]), st.integers(0, 62)))
def test_add_variants(seed, fill, dtypes, shape, broadcast, ma, mb, shift):
    rng = np.random.default_rng(seed)
    da, db, dout = (np.dtype(d) for d in dtypes)
    a = int_array(rng, shape, fill, *im.int_range(da), da)
    b = int_array(rng, (1,) + shape[1:] if broadcast else shape, fill, *im.int_range(db), db)
    if da == db == dout == np.int8:
        run_both(("add", "int8"), a, b, ma, mb, shift, out_dtype=np.dtype(np.int8))
        run_both(("add", "int8"), a, b, ma, mb, shift, out_dtype=np.dtype(np.int16))
    run_both(("add", "int16"), a, b, ma, mb, shift, out_dtype=dout)


@SETTINGS
@given(seed=seeds, shape=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_gelu_table(seed, shape):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, shape).astype(np.int8)
    run_both(("gelu", "table"), x, rng.integers(-128, 128, 256).astype(np.int8))
    run_both(("gelu", "table"), np.arange(-128, 128, dtype=np.int8), K.make_gelu_table(0.05, 0.03))


@SETTINGS
@given(c_b=st.integers(1, 1 << 15), c_c=st.integers(0, INT32_MAX), c_1=st.integers(0, INT32_MAX),
       k=st.integers(0, 31), m=st.integers(0, INT32_MAX), s=st.integers(2, 62), rounding=roundings)
@example(c_b=51, c_c=2771, c_1=2771, k=0, m=1 << 30, s=31, rounding=DOUBLE_ROUND)
@example(c_b=51, c_c=2771, c_1=2771, k=0, m=1 << 29, s=33, rounding=DOUBLE_ROUND)
@example(c_b=1 << 15, c_c=INT32_MAX, c_1=0, k=31, m=1 << 30, s=40, rounding=SINGLE_ROUND)
@example(c_b=1000, c_c=4000000, c_1=1 << 24, k=0, m=1 << 30, s=60, rounding=SINGLE_ROUND)   # bound exceeded
def test_gelu_poly(c_b, c_c, c_1, k, m, s, rounding):
    x = np.arange(-128, 128, dtype=np.int8).reshape(2, 8, 16)
    run_both(("gelu", "poly"), x, c_b, c_c, c_1, k, m, s, rounding=rounding)


@SETTINGS
@given(m_in=st.integers(0, INT32_MAX), s_in=st.integers(2, 62), m=st.integers(0, INT32_MAX), s=st.integers(2, 62),
       rounding=roundings)
@example(m_in=1462006868, s_in=20, m=1 << 30, s=45, rounding=SINGLE_ROUND)
@example(m_in=1 << 30, s_in=8, m=1 << 30, s=23, rounding=DOUBLE_ROUND)
@example(m_in=INT32_MAX, s_in=7, m=1, s=2, rounding=SINGLE_ROUND)                              # shift_in < 8
def test_gelu_shift(m_in, s_in, m, s, rounding):
    x = np.arange(-128, 128, dtype=np.int8).reshape(16, 16)
    run_both(("gelu", "shift"), x, m_in, s_in, m, s, rounding=rounding)


@SETTINGS
@given(s_in=st.floats(1e-3, 0.5), ratio=st.floats(0.1, 10.0), delta=st.sampled_from([1.0, 0.5]), rounding=roundings,
       n=st.integers(1, 20), span=st.sampled_from([3, 1 << 10, 1 << 20]), seed=seeds)
def test_variants_with_the_offline_builders_constants(s_in, ratio, delta, rounding, n, span, seed):
    """The constants the quantizer really makes (gelu_poly_constants, gelu_shift_constants, softmax_exp_multiplier)."""
    x = np.arange(-128, 128, dtype=np.int8)
    c = KV.gelu_poly_constants(s_in, s_in * ratio, delta)
    assert run_both(("gelu", "poly"), x, **c, rounding=rounding) is not None
    c = KV.gelu_shift_constants(s_in, s_in * ratio)
    assert run_both(("gelu", "shift"), x, **c, rounding=rounding) is not None
    mult, shift = KV.softmax_exp_multiplier(s_in * ratio / 64)
    scores = score_rows(np.random.default_rng(seed), (3, n), span, "random")
    for variant in ("poly", "shift"):
        assert run_both(("softmax", variant), scores, mult, shift, rounding=rounding) is not None
    mult, shift = im.quantize_multiplier(16 * s_in * ratio / 64)
    assert run_both(("softmax", "table"), scores, mult, shift, K.make_exp_table(), rounding=rounding) is not None


def ln_constants(rng, c, mode, bias_fill="random"):
    gamma = rng.integers(-127, 128, c).astype(np.int8)
    headroom = INT32_MAX - 127 * (1 << 16)
    bias = (rng.integers(-(1 << 24), 1 << 24, c) if bias_fill == "random"
            else rng.choice(np.array([-headroom, headroom]), c)).astype(np.int32)
    mult, shift = scales(rng, c, INT32_MAX if bias_fill != "random" else 127 * (1 << 16) + (1 << 24), mode)
    return gamma, bias, mult, shift


@SETTINGS
@given(seed=seeds, fill=fills, rounding=roundings, variant=st.sampled_from(["int64", "wide", "int32"]),
       dtype=st.sampled_from(["int8", "int16"]), b=st.integers(1, 2), c=st.integers(1, 40), hw=st.integers(1, 4),
       eps=st.one_of(st.sampled_from([1, 2, 3, 7, 8, (1 << 29) - 1, 1 << 61]), st.integers(1, 1 << 61)),
       eps_shift=st.one_of(st.sampled_from([0, 1, 30]), st.integers(0, 30)), mode=st.sampled_from(SHIFT_MODES),
       bias_fill=st.sampled_from(["random", "edge"]))
def test_layernorm_variants(seed, fill, rounding, variant, dtype, b, c, hw, eps, eps_shift, mode, bias_fill):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype if variant != "int64" else "int8")
    x = int_array(rng, (b, c, 1, hw), fill, *im.int_range(dt), dt)
    gamma, bias, mult, shift = ln_constants(rng, c, mode, bias_fill)
    if variant == "int32":
        eps = eps % ((1 << 29) - 1) + 1
        run_both(("layernorm", "int32"), x, eps, eps_shift, gamma, bias, mult, shift, rounding=rounding)
    else:
        run_both(("layernorm", variant), x, eps, gamma, bias, mult, shift, rounding=rounding)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_layernorm_largest_inputs(rounding):
    """The channel limits: int8 C = 4096 (half -128 / half 127: the largest sum d^2), int16 C = 1290 (wide) and
    C = 4096 (int32); one outlier per position; the bias at its headroom."""
    rng = np.random.default_rng(3)
    for variant, dtype, c in (("int64", np.int8, 4096), ("wide", np.int16, 1290), ("int32", np.int16, 4096)):
        lo, hi = im.int_range(dtype)
        x = np.full((1, c, 1, 3), lo, dtype)
        x[0, 0, 0, 0] = hi
        x[0, ::2, 0, 1] = hi
        x[0, :, 0, 2] = rng.integers(lo, hi + 1, c)
        gamma, bias, mult, shift = ln_constants(rng, c, "near", "edge")
        eps_args = (1, 0) if variant == "int32" else (1,)
        run_both(("layernorm", variant), x, *eps_args, gamma, bias, mult, shift, rounding=rounding)
        run_both(("layernorm", variant), x, *eps_args, gamma, bias, mult, np.full(c, 40, np.int8), rounding=rounding)


@SETTINGS
@given(seed=seeds, b=st.integers(1, 2), heads=st.integers(1, 3), d=st.integers(1, 4), n=st.integers(1, 5),
       p=st.integers(1, 2))
def test_data_movement(seed, b, heads, d, n, p):
    rng = np.random.default_rng(seed)
    c = heads * d
    qkv = rng.integers(-128, 128, (b, 3 * c, 1, n)).astype(np.int8)
    for part in range(3):
        run_both(("split_heads", "channels"), qkv, part=part, num_heads=heads)
    prefix = rng.integers(-128, 128, (1, c, 1, p)).astype(np.int8)
    tokens = run_both(("concat_tokens", "prefix"), prefix, qkv[:, :c])
    run_both(("gather_prefix", "channels"), tokens, num_prefix=p)
    run_both(("gather_prefix", "channels"), tokens.astype(np.int16) * 200, num_prefix=1)


@SETTINGS
@given(seed=seeds, rounding=roundings, b=st.integers(1, 3), heads=st.integers(1, 3), n=st.integers(2, 9),
       prefix=st.integers(1, 2), levels=st.sampled_from([1, 2, 4, 128]), dtype=st.sampled_from(["int8", "int16"]),
       keep_frac=st.floats(0.0, 1.0), fill=fills)
def test_token_select_and_prune(seed, rounding, b, heads, n, prefix, levels, dtype, keep_frac, fill):
    """Scores with few levels (ties; all zero with levels = 1), any keep from 1 to all, int8 and int16 tokens."""
    rng = np.random.default_rng(seed)
    N = prefix + n
    p = (rng.integers(0, levels, (b, heads, N, N)) * (127 // max(levels - 1, 1))).astype(np.int8)
    keep = max(1, min(n, round(keep_frac * n)))
    index = run_both(("token_select", "cls_attention"), p, keep=keep, num_prefix=prefix)
    x = int_array(rng, (b, 4, 1, N), fill, *im.int_range(dtype), np.dtype(dtype))
    run_both(("token_prune", "package"), x, p, index, num_prefix=prefix, rounding=rounding)
    other = np.sort(rng.permutation(np.arange(prefix, N))[:keep]).astype(np.int32)   # any valid selection
    run_both(("token_prune", "package"), x, p, np.broadcast_to(other, (b, keep)).copy(), num_prefix=prefix,
             rounding=rounding)


def test_rejected_inputs_are_rejected_by_both():
    """A few inputs outside the domains: both kernel sets raise the same exception class."""
    x = np.zeros((1, 2, 1, 1), np.int8)
    w = np.zeros((1, 2, 1, 1), np.int8)
    bias = np.zeros(1, np.int32)
    cases = [
        (("conv2d", "w8"), (x, w.astype(np.int16), bias, [1 << 30], [31]), {}),           # weight dtype
        (("conv2d", "w8"), (x, np.full((1, 2, 1, 1), -128, np.int8), bias, [1 << 30], [31]), {}),   # -128
        (("conv2d", "w4"), (x, np.full((1, 2, 1, 1), 8, np.int8), bias, [1 << 30], [31]), {}),
        (("conv2d", "mixed-pot"), (x, np.full((1, 2, 1, 1), 3, np.int8), bias, [1 << 30], [31], np.array([True])), {}),
        (("conv2d", "w8"), (x + 100, w + 100, np.array([60000], np.int32), [1 << 30], [16]), {}),  # acc >= 2^15
        (("softmax", "table"), (np.array([INT32_MIN, INT32_MAX], np.int32), 1, 40, K.make_exp_table()), {}),
        (("softmax", "table"), (np.array([INT32_MIN, INT32_MAX], np.int32), -5, 40, K.make_exp_table()), {}),  # order
        (("softmax", "table"), (np.array([0, 9], np.int32), 1 << 30, 4, K.make_exp_table()), {}),    # d >= 2^(shift-1)
        (("softmax", "poly"), (np.array([INT32_MIN, INT32_MAX], np.int32), 1, 40), {}),
        (("attention_context", "int32"), (np.full((1, 1, 1, 1), -1, np.int8), np.zeros((1, 1, 1, 1), np.int8), 1, 30), {}),
        (("add", "int8"), (np.zeros(3, np.int8), np.zeros(2, np.int8), 1, 1, 1), {}),
        (("add", "int16"), (np.zeros(3, np.int32), np.zeros(3, np.int8), 1, 1, 1), {}),
        (("layernorm", "int64"), (x.astype(np.int16), 1, np.zeros(2, np.int8), np.zeros(2, np.int32), [1, 1], [3, 3]),
         {}),
        (("layernorm", "int32"), (x, 1 << 29, 0, np.zeros(2, np.int8), np.zeros(2, np.int32), [1, 1], [3, 3]), {}),
        (("token_select", "cls_attention"), (np.zeros((1, 1, 3, 3), np.int8),), {"keep": 3, "num_prefix": 1}),
        (("token_prune", "package"), (np.zeros((1, 1, 1, 3), np.int8), np.zeros((1, 1, 3, 3), np.int8),
                                      np.array([[2, 1]], np.int32)), {"num_prefix": 1}),
    ]
    for key, args, kw in cases:
        with pytest.raises((ValueError, OverflowError)):
            R.row(*key).kernel(*args, **kw)
        assert run_both(key, *args, **kw) is None, key


# ---------------------------------------------------------------------------------------------
# 4. whole models: every named scheme, both roundings, pruned and not
# ---------------------------------------------------------------------------------------------

CFG = G.DeiTConfig(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5, distilled=True)


@pytest.fixture(scope="module")
def scheme_models():
    """Every named scheme's quantization of one random tiny float model, and an input batch for each: int8 at
    refvit-int8's input scale (the same bytes for every int8 scheme), int16 for a16w8 (Part 7)."""
    from refvit.checkpoints.convert import token_to_conv
    from refvit.models import random_params
    from refvit.quantize import quantize
    rng = np.random.default_rng(18)
    params = token_to_conv(random_params(CFG, "mean", rng))
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    models = {name: quantize(params, CFG, [x], head_mode="mean", method="max", scheme=scheme)
              for name, scheme in G.SCHEMES.items()}
    xq = K.quantize_input(x.astype(np.float64) * 3, float(models["refvit-int8"].tensors["input.scale"]))  # saturates
    xq16 = {name: K.quantize_input(x.astype(np.float64) * 3, float(qm.tensors["input.scale"]), np.int16)
            for name, qm in models.items() if G.input_dtype(qm.graph) == np.int16}
    return models, {name: xq16.get(name, xq) for name in models}


def whole_model_params():
    """Every scheme x rounding x pruning; the quick run (-m "not slow") takes every scheme unpruned with
    SINGLE_ROUND and pruned with DOUBLE_ROUND."""
    for scheme in G.SCHEMES:
        for rounding in ROUNDINGS:
            for prune in ("", "1:0.5"):
                quick = (rounding == SINGLE_ROUND) == (prune == "")
                yield pytest.param(scheme, rounding, prune, id=f"{scheme}-{rounding}-{prune}",
                                   marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("scheme, rounding, prune", whole_model_params())
def test_whole_models_bit_identical(scheme_models, scheme, rounding, prune):
    models, xqs = scheme_models
    qm, xq = models[scheme], xqs[scheme]
    softmax = next(op.variant for op in qm.graph if op.op == "softmax")
    if prune and G.PROBABILITIES.get(softmax, ("int8",))[0] != "int8":
        with pytest.raises(G.GraphError, match="prun"):      # the selector reads int8 probabilities only
            G.build_graph(CFG, rounding, qm.scheme, prune=prune)
        return
    graph = G.build_graph(CFG, rounding, qm.scheme, prune=prune)
    fast, ref = G.Trace(), G.Trace()
    out_fast = G.run_graph(graph, qm.tensors, xq, fast, internals=True)
    out_ref = G.run_graph(graph, qm.tensors, xq, ref, kernels=G.reference_kernels, internals=True)
    assert_same(out_ref, out_fast, "logits")
    assert list(ref.tensors) == list(fast.tensors) and ref.internals == fast.internals
    for name, want in fast.tensors.items():
        assert_same(ref.tensors[name], want, name)
    assert any(op.op == "token_prune" for op in graph) == bool(prune)
    assert len(fast.internals) >= 2 * CFG.depth                     # the traced internals are really compared


# ---------------------------------------------------------------------------------------------
# 5. the reference imports no fast kernel
# ---------------------------------------------------------------------------------------------

def test_reference_imports_only_numpy_math_and_intmath_constants():
    allowed_intmath = {"SINGLE_ROUND", "DOUBLE_ROUND", "ROUNDING_MODES", "int_range"}
    for f in (Path(RK.__file__).parent).glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                assert {a.name for a in node.names} <= {"numpy", "math"}, f.name
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f.name
                if node.module == "refvit.intmath":
                    assert {a.name for a in node.names} <= allowed_intmath, f.name
                else:
                    assert node.module in ("__future__", "numpy", "math") or node.module.startswith("refvit.reference"), \
                        (f.name, node.module)


def test_spec_points_to_every_reference_kernel():
    """docs/spec.md's `Reference kernel: ...` lines name existing functions, and every registry row's reference."""
    import importlib
    import re
    spec = (Path(__file__).resolve().parents[1] / "docs" / "spec.md").read_text(encoding="utf-8")
    named = set()
    for line in spec.splitlines():
        if line.startswith("Reference kernel: "):
            for path in re.findall(r"`refvit\.reference\.(\w+)\.(\w+)`", line):
                module = importlib.import_module(f"refvit.reference.{path[0]}")
                assert callable(getattr(module, path[1], None)), path
                named.add(getattr(module, path[1]))
    assert {r.reference for r in R.rows()} <= named


@pytest.mark.slow   # every quick case built twice, once with the plain kernels (~30 s)
def test_conformance_expected_outputs_are_the_same_with_the_reference_kernels():
    """`python -m conformance run --kernels reference`: every quick case's expected output, computed with the
    reference kernels, equals the default (fast) one; and refvit's own DUT passes them all."""
    import conformance
    from conformance.dut import kernel_set, use_kernels
    from conformance.runner import PASS, run_cases
    specs = [s for s in conformance.select("quick") if s.op not in ("block", "model")]
    fast = {s.name: conformance.get_case(s.name).expected for s in specs}
    try:
        use_kernels("reference")
        assert kernel_set() == "reference"
        for s in specs:
            assert_same(conformance.get_case(s.name).expected, fast[s.name], s.name)
        assert all(r.status == PASS for r in run_cases(conformance.RefvitDUT(), specs))
    finally:
        use_kernels("fast")


QUICK_GOLDEN_SCHEMES = ("refvit-int8", "int16-residual")   # the quick run's: int8 and int16 tensors, pruned and not


@pytest.mark.parametrize("scheme", [s if s in QUICK_GOLDEN_SCHEMES else pytest.param(s, marks=pytest.mark.slow)
                                    for s in G.SCHEMES])
def test_golden_with_reference_kernels_writes_the_same_bytes(scheme_models, scheme, tmp_path):
    """`golden --kernels reference` == the default, file for file (internals, every format), every scheme (the
    quick run: two; test_whole_models_bit_identical compares every scheme's traced tensors and internals)."""
    from refvit import golden
    models, xqs = scheme_models
    qm, xq = (models[scheme].with_prune("1:0.5") if scheme == "refvit-int8" else models[scheme]), xqs[scheme]
    for kernels in ("fast", "reference"):
        golden.write_golden(qm, xq, tmp_path / kernels, formats=("npy", "hex", "bin", "h"), internals=True,
                            kernels=kernels)
    files = sorted(p.relative_to(tmp_path / "fast") for p in (tmp_path / "fast").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "reference") for p in (tmp_path / "reference").rglob("*")
                           if p.is_file())
    for f in files:
        assert (tmp_path / "fast" / f).read_bytes() == (tmp_path / "reference" / f).read_bytes(), f
