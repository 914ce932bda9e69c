"""The authors' code variants (issue 19) against independent integer emulations of the authors' steps, and
the measured "differences from the source" counts of docs/spec.md (each number there is asserted here).

The emulations are written from the authors' code as read (I-BERT IntGELU / IntSoftmax / IntLayerNorm, I-ViT
IntSoftmax(16), EViT's package token), in Python integers and fractions, not from refvit's kernels."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from refvit import int_kernels_authors as A
from refvit import int_kernels_variants as KV
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND, isqrt, quantize_multiplier, requantize

X8 = np.arange(-128, 128, dtype=np.int64)
GELU_SCALES = (0.005, 0.02, 0.05, 0.1)


def _gelu_code_n14(s: float) -> np.ndarray:
    """I-BERT's IntGELU with its fixed n = 14, in exact integers (S = s / 1.4142), requantized like refvit."""
    S, a, b = Fraction(s) / Fraction(1.4142), Fraction(-0.2888), Fraction(-1.769)
    b_int, c_int = math.floor(b / S), math.floor((1 / a) / (S * S))
    shift_int = math.floor(1 / (a * S * S * 2 ** 14))
    out = []
    for x in X8.tolist():
        y = (1 if x > 0 else -1 if x < 0 else 0) * ((min(abs(x), -b_int) + b_int) ** 2 + c_int)
        out.append(x * ((y >> 14) + shift_int))                      # their x_int * (sigmoid_int + shift_int)
    m, sh = quantize_multiplier(float(-a * S * S * 2 ** 14 * Fraction(s) / (2 * Fraction(s))))
    return requantize(-np.array(out, np.int64), m, sh, np.int8)     # their scale a S^2 2^14 s / 2 < 0


@pytest.mark.parametrize("s, vs_paper, vs_n14", [(0.005, 0, 177), (0.02, 1, 253), (0.05, 0, 254), (0.1, 0, 254)])
def test_gelu_difference_counts(s, vs_paper, vs_n14):
    code = A.gelu_poly_ibert_code(X8.astype(np.int8), **A.gelu_poly_ibert_code_constants(s, s))
    paper = KV.gelu_poly(X8.astype(np.int8), **KV.gelu_poly_constants(s, s))
    assert int((code != paper).sum()) == vs_paper
    assert int((code != _gelu_code_n14(s)).sum()) == vs_n14


def test_gelu_constants_use_k_1_4142():
    c = A.gelu_poly_ibert_code_constants(0.02, 0.02)
    S = Fraction(0.02) / Fraction(1.4142)
    assert c["c_b"] == -math.floor(Fraction(-1.769) / S) == 126
    assert c["c_c"] == -math.floor(1 / (Fraction(-0.2888) * S * S)) == 17313
    assert KV.gelu_poly_constants(0.02, 0.02)["c_c"] == 17314


def _exp_code(v: int) -> int:
    """I-BERT's code int_exp at scale 2^-14 from the decimals, exact; >> (q + 15) as refvit's unit."""
    x0 = math.floor(Fraction("-0.6931") * 2 ** 14)
    b = math.floor(Fraction("0.96963238") / Fraction("0.35815147") * 2 ** 14)
    c = math.floor(1 / Fraction("0.35815147") * 2 ** 28)
    v = max(v, 30 * x0)
    q = v // x0 if v else 0                          # floor(x / x0) for x, x0 <= 0
    r = v - x0 * q
    return ((r + b) * r + c) >> (q + 15)


def test_exp_constants_and_values():
    assert A.ibert_code_exp_constants() == {"ln2": A.EXP_CODE_LN2, "qb": A.EXP_CODE_QB, "qc": A.EXP_CODE_QC}
    assert (A.EXP_CODE_LN2, A.EXP_CODE_QB, A.EXP_CODE_QC, A.EXP_CODE_ONE) == (11356, 44356, 749502594, 22873)
    v = np.concatenate([-np.arange(0, 40000), -np.arange(A.SOFTMAX_CODE_CAP - 3000, A.SOFTMAX_CODE_CAP + 1)])
    assert A.exp_poly_ibert_code(v).tolist() == [_exp_code(int(t)) for t in v]


def test_exp_difference_count_against_the_paper():
    """spec: 56589 of the 340681 inputs v in [-340680, 0] differ from the paper's exp_poly, by at most 17."""
    v = -np.arange(0, A.SOFTMAX_CODE_CAP + 1)
    d = A.exp_poly_ibert_code(v) - KV.exp_poly(v)
    assert (int((d != 0).sum()), v.size, int(np.abs(d).max())) == (56589, 340681, 17)
    assert int(np.floor(np.float32(Fraction(749502594530744, 10 ** 6)))) == 749502592   # their float32 c_int


def _ln_code(row: list) -> list:
    """I-BERT's IntLayerNorm normalisation in integers (mean: round half even), then refvit's t step."""
    C = len(row)
    mean = Fraction(sum(row), C)
    m = math.floor(mean + Fraction(1, 2))
    if mean - math.floor(mean) == Fraction(1, 2) and m % 2:
        m -= 1
    y = [x - m for x in row]
    std = math.isqrt(sum(t * t for t in y))
    factor = 2 ** 31 // max(std, 1)
    return [((t * factor) // 2 + 2 ** 13) >> 14 for t in y]


def test_layernorm_normalisation_matches_an_emulation():
    rng = np.random.default_rng(19)
    rows = [rng.integers(-128, 128, c).tolist() for c in (1, 2, 3, 8, 192, 768, 4096)] + [[7, 7, 7], [1, 2], [2, 3],
                                                                                          [-128] * 5 + [127] * 5]
    for row in rows:
        x = np.array(row, np.int8).reshape(1, -1, 1, 1)
        assert A.layernorm_ibert_code_normalize(x).ravel().tolist() == _ln_code(row), row[:8]
    d = {}
    A.layernorm_ibert_code_normalize(np.array([1, 2], np.int8).reshape(1, 2, 1, 1), d)
    assert d["t"].ravel().tolist() == [-65536, 0] and int(d["recip"].ravel()[0]) == 2 ** 31


@pytest.mark.slow
def test_float32_sqrt_difference_count():
    """spec: floor(float32 sqrt(float32 var)) != isqrt(var) for 8792 values of var in [0, 2^26); the first is
    4097^2 - 2 (float32(var) rounds up to 4097^2 - 1, whose float32 root rounds up to 4097)."""
    wrong, first = 0, None
    for lo in range(0, 1 << 26, 1 << 22):
        v = np.arange(lo, lo + (1 << 22), dtype=np.int64)
        bad = np.floor(np.sqrt(v.astype(np.float32))).astype(np.int64) != isqrt(v)
        wrong += int(bad.sum())
        first = first if first is not None or not bad.any() else int(v[bad][0])
    assert (wrong, first) == (8792, 4097 ** 2 - 2)


def test_float32_sqrt_first_wrong_value():
    v = np.arange(4097 ** 2 - 10, 4097 ** 2 + 2, dtype=np.int64)
    f = np.floor(np.sqrt(v.astype(np.float32))).astype(np.int64)
    assert v[f != isqrt(v)].tolist()[0] == 4097 ** 2 - 2


def _shiftmax16_ivit(row: list, s: Fraction) -> list:
    """I-ViT's IntSoftmax(16) in exact integers on int scores at scale s (their own unit)."""
    mx = max(row)
    x0 = math.floor(-1 / s)
    e = []
    for t in row:
        x = t - mx
        x = x + x // 2 - x // 16
        x = max(x, 15 * x0)
        q = x // x0
        r = x - x0 * q
        e.append(((r - 2 * x0) << (15 - q)) >> 1)                   # floor((r/2 - x0) 2^(15 - q))
    total = min(sum(e), 2 ** 31 - 1)
    factor = (2 ** 31 - 1) // total
    return [(v * factor) >> 16 for v in e]


@pytest.mark.parametrize("s, differ, most", [pytest.param(0.02, 128712, 132, marks=pytest.mark.slow),
                                              pytest.param(0.05, 125176, 194, marks=pytest.mark.slow),
                                              (0.1, 104946, 414)])      # the quick run (-m "not slow"): one scale
def test_shiftmax16_difference_count_against_ivit(s, differ, most):
    """spec: over all 65536 rows of two int8 scores at score scale s, the outputs of softmax_shift16 that
    differ from I-ViT's IntSoftmax(16) at its own unit (of 131072)."""
    a, b = np.meshgrid(X8, X8, indexing="ij")
    scores = np.stack([a.ravel(), b.ravel()], axis=1).astype(np.int32)          # (65536, 2)
    m, sh = KV.softmax_exp_multiplier(s)
    ours = A.softmax_shift16(scores, m, sh)
    theirs = np.array([_shiftmax16_ivit(r, Fraction(s)) for r in scores.tolist()])
    assert (int((ours != theirs).sum()), int(np.abs(ours - theirs).max())) == (differ, most)


@pytest.mark.parametrize("rounding", [SINGLE_ROUND, DOUBLE_ROUND])
def test_shiftmax16_output_bound_and_sum(rounding):
    rng = np.random.default_rng(3)
    scores = rng.integers(-2 ** 20, 2 ** 20, (64, 197)).astype(np.int32)
    p = A.softmax_shift16(scores, *KV.softmax_exp_multiplier(1e-4), rounding=rounding)
    assert p.dtype == np.int16 and p.min() >= 0 and p.max() <= 32767 and (p.astype(np.int64).sum(-1) <= 32767).all()


@pytest.mark.parametrize("s", GELU_SCALES)
def test_ibert_paper_gelu_is_the_papers_formula(s):
    """spec (ibert-paper): gelu_poly vs I-BERT's paper i-GELU in exact integers (no erf shift), the same
    requantize: 0 of 256 differ at each scale."""
    S, a, b = Fraction(float(s) / math.sqrt(2.0)), Fraction(-0.2888), Fraction(-1.769)
    q_b, q_c = math.floor(b / S), math.floor(1 / (a * S * S))
    q_1 = math.floor(1 / (a * S * S))                                # the paper's floor(1 / S_erf)
    out = [x * ((1 if x > 0 else -1 if x < 0 else 0) * ((min(abs(x), -q_b) + q_b) ** 2 + q_c) + q_1)
           for x in X8.tolist()]
    m, sh = quantize_multiplier(float(-a * S * S * Fraction(s) / (2 * Fraction(s))))
    paper = requantize(-np.array(out, np.int64), m, sh, np.int8)
    assert int((KV.gelu_poly(X8.astype(np.int8), **KV.gelu_poly_constants(s, s)) != paper).sum()) == 0


def test_their_float32_c_int_gives_the_same_exponentials():
    """spec: I-BERT's float32 c_int (749502592) and the exact one (749502594) give the same e for every input."""
    v = -np.arange(0, A.SOFTMAX_CODE_CAP + 1)
    q = (-v) // A.EXP_CODE_LN2
    r = v + q * A.EXP_CODE_LN2
    assert np.array_equal(((r + A.EXP_CODE_QB) * r + 749502592) >> (q + 15), A.exp_poly_ibert_code(v))
