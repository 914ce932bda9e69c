"""Integer kernels of the schemes as the authors' released code computes them (issue 19).

`ibert`: I-BERT's code (kssteven418/I-BERT, fairseq/quantization/utils/quant_modules.py) differs from its paper,
which refvit's `ibert-paper` variants follow: i-GELU divides the input scale by k = 1.4142 (not sqrt 2); i-exp
uses x0 = -0.6931 and the expanded polynomial 0.35815147 x^2 + 0.96963238 x + 1; IntLayerNorm subtracts the
mean rounded to an integer, has no eps and divides 2^31 by floor(sqrt(var)). `ivit`: I-ViT's DeiT
(zkkli/I-ViT) runs Shiftmax with 16-bit output (`IntSoftmax(16)`), so its attention context multiplies int16
probabilities. Token pruning as EViT's code (youweiliang/evit) does it: kept tokens in score order, the package
token the unnormalised attention-weighted sum.

The facts (constants, step order, widths) are the authors'; the arithmetic is exact integer arithmetic, where
their code evaluates in float32 (docs/spec.md Part 4, each section's "differences from the source").
Every kernel is a pure function of integer arrays in the style of `refvit.int_kernels_variants`.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from refvit import int_kernels_variants as KV
from refvit.int_kernels import PROB_ONE, _require_array, _scalar_int, context_args
from refvit.int_kernels_prune import _check_index, cls_attention_scores, divide_round, prune_args, prune_tokens
from refvit.intmath import (SINGLE_ROUND, int_matmul, int_matmul_exact, isqrt, requantize,
                            rounding_shift_right, saturate)

# --- i-GELU as I-BERT's code: the erf argument unit is s_in / 1.4142 ------------------------------------------
IBERT_CODE_GELU_K = 1.4142         # IntGELU.k (the paper: sqrt 2)

# --- i-exp as I-BERT's code, at refvit's difference unit 2^-14 -------------------------------------------------
IBERT_CODE_X0 = -0.6931            # IntSoftmax.x0
IBERT_CODE_COEF = (0.35815147, 0.96963238, 1.0)    # a x^2 + b x + c on (x0, 0]
IBERT_CODE_MAX_Q = 30              # IntSoftmax's n: x >= 30 x0_int
EXP_CODE_LN2 = 11356               # -floor(-0.6931 * 2^14) = -floor(-11355.93)            (their x0_int)
EXP_CODE_QB = 44356                # floor((b / a) * 2^14) = floor(44356.81)                (their b_int)
EXP_CODE_QC = 749502594            # floor((c / a) * 2^28) = floor(749502594.53)            (their c_int)
EXP_CODE_SHIFT = 15                # e = z >> (q + 15): units a 2^-28 -> e(0) = 22873 <= 2^15
EXP_CODE_ONE = EXP_CODE_QC >> EXP_CODE_SHIFT                                    # 22873
SOFTMAX_CODE_CAP = IBERT_CODE_MAX_Q * EXP_CODE_LN2                              # 340680: their clamp

# --- IntLayerNorm as I-BERT's code ------------------------------------------------------------------------------
LN_CODE_MAX_CHANNELS = 4096        # var = sum y^2 <= 4096 * 255^2 < 2^28 (their overflow shift stays 0)
LN_CODE_FACTOR_BITS = 31           # factor = 2^31 // std
LN_CODE_NORM_SHIFT = 14            # t = round(norm / 2^14): norm has 30 fraction bits, t (Part 2's) 16
FLOAT32_SQRT_FIRST_WRONG = 4097 ** 2 - 1   # the smallest var with floor(float32 sqrt(var)) != isqrt(var)

# --- 16-bit Shiftmax (I-ViT's DeiT: IntSoftmax(16)) and its attention context -----------------------------------
SHIFTMAX16_BITS = 16               # their output_bit
SHIFTMAX16_NUM = (1 << 31) - 1     # factor = (2^31 - 1) // sum e
SHIFTMAX16_SHIFT = 31 - SHIFTMAX16_BITS + 1                                     # 16: p = (e * factor) >> 16
PROB16_ONE = 1 << (SHIFTMAX16_BITS - 1)                                          # output scale 2^-15
PROB16_MAX = (1 << 15) - 1         # p <= (2^31 - 1) >> 16 = 32767
MAX_TOKENS_P16 = 512               # N * 32767 * 128 <= 2^31 - 1: the context accumulator stays int32


# =============================================================================================
# GELU: I-BERT's code (k = 1.4142)
# =============================================================================================

def gelu_poly_ibert_code(x, c_b, c_c, c_1, erf_shift, multiplier, shift, *, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """i-GELU on int8 x (any shape) -> int8, the arithmetic of `gelu_poly` (same steps, same bounds); only the
    constants differ (`gelu_poly_ibert_code_constants`: the erf argument unit s_in / 1.4142)."""
    return KV.gelu_poly(x, c_b, c_c, c_1, erf_shift, multiplier, shift, rounding=rounding)


def gelu_poly_ibert_code_constants(scale_in: float, scale_out: float) -> dict:
    """Offline: `gelu_poly_constants` with S = s_in / 1.4142 as an exact rational of the two doubles (the
    paper variant: the double s_in / sqrt(2)); delta = 1 (I-BERT has no HeatViT factor)."""
    fn = "gelu_poly_ibert_code_constants"
    s = KV._positive_float(scale_in, fn, "scale_in")
    return KV.gelu_poly_constants_of(s / Fraction(IBERT_CODE_GELU_K), scale_in, scale_out, 1.0, fn)


# =============================================================================================
# softmax: I-BERT's code i-exp
# =============================================================================================

def exp_poly_ibert_code(v) -> np.ndarray:
    """I-BERT's code i-exp of v * 2^-14 for integer v in [-340680, 0] (int64 array), relative units.

    q = (-v) // 11356 ; r = v + q * 11356              # v = q x0 + r, r in (-11356, 0] (their x0_int = -11356)
    z = (r + 44356) * r + 749502594                    # exp(r) / (0.35815147 * 2^-28), in [374776239, 749502594]
    e = z >> (q + 15)                                  # e(0) = 22873
    """
    fn = "exp_poly_ibert_code"
    v = KV.exp_argument(v, SOFTMAX_CODE_CAP, fn)                   # int64 in [-cap, 0]
    q = (-v) // EXP_CODE_LN2                                       # [0, 30]
    r = v + q * EXP_CODE_LN2                                       # (-11356, 0]
    z = (r + EXP_CODE_QB) * r + EXP_CODE_QC                        # [374776239, 749502594] < 2^30
    return z >> (q + EXP_CODE_SHIFT)                               # [0, 22873]


def softmax_poly_ibert_code(scores, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                            internals: dict | None = None) -> np.ndarray:
    """Integer softmax over the last axis with I-BERT's code i-exp: int32 (..., N) -> int8 in [0, 127] (1/127).

    The differences as `softmax_poly` (unit 2^-14, capped at 340680), e = exp_poly_ibert_code(-d), Part 2's
    normalisation. internals: `diff`, `exp`, `sum`, `recip`."""
    fn = "softmax_poly_ibert_code"
    d = KV._softmax_differences(scores, multiplier, shift, rounding, SOFTMAX_CODE_CAP, fn)   # (..., N)
    return KV._normalize_probabilities(exp_poly_ibert_code(-KV._kept_diff(d, internals)), internals)


# =============================================================================================
# LayerNorm: I-BERT's code IntLayerNorm
# =============================================================================================

def divide_round_half_even(num, den) -> np.ndarray:
    """The exact quotient num / den (den > 0) rounded to the nearest integer, a tie to the even one (torch.round)."""
    num, den = np.asarray(num, np.int64), np.asarray(den, np.int64)
    q = num // den                                                 # floor
    twice_rem = 2 * (num - q * den)                                # [0, 2 den)
    up = (twice_rem > den) | ((twice_rem == den) & (q % 2 == 1))
    return q + up


def layernorm_ibert_code_normalize(x, internals: dict | None = None) -> np.ndarray:
    """t (int32, |t| <= 2^16, Part 2's scale sqrt(C) 2^-16) of int8 x (B, C, H, W), 1 <= C <= 4096, as I-BERT's
    code normalises: mean = round_half_even(sum_c x / C); y = x - mean; var = sum_c y^2; std = isqrt(var);
    factor = 2^31 // max(std, 1); norm = (y * factor) >> 1; t = rounding_shift_right(norm, 14)."""
    fn = "layernorm_ibert_code"
    _require_array(x, fn, "x", np.int8, 4, "(B, C, H, W)")
    c = x.shape[1]
    if not 1 <= c <= LN_CODE_MAX_CHANNELS:
        raise ValueError(f"{fn}: C = {c} channels must be in [1, {LN_CODE_MAX_CHANNELS}]")
    xi = x.astype(np.int64)
    total = xi.sum(axis=1, keepdims=True)                          # (B, 1, H, W), |.| <= 2^19
    mean = divide_round_half_even(total, c)                        # (B, 1, H, W) in [-128, 127]
    y = xi - mean                                                  # (B, C, H, W), |y| <= 255
    var = (y * y).sum(axis=1, keepdims=True)                       # (B, 1, H, W), <= 4096 * 255^2 < 2^28
    std = isqrt(var)                                               # [0, 16320], |y| <= std
    factor = (1 << LN_CODE_FACTOR_BITS) // np.maximum(std, 1)      # [2^31 / 16320, 2^31]; std 0: every y is 0
    norm = (y * factor) >> 1                                       # |y * factor| <= 2^31: |norm| <= 2^30
    t = rounding_shift_right(norm, LN_CODE_NORM_SHIFT)             # |t| <= 2^16
    if internals is not None:                                      # factor <= 2^31 only needs int64
        internals.update({"sum": total.astype(np.int32), "mean": mean.astype(np.int32), "y": y.astype(np.int32),
                          "sumsq": var.astype(np.int32), "root": std.astype(np.int32), "recip": factor,
                          "norm": norm.astype(np.int32), "t": t.astype(np.int32)})
    return t.astype(np.int32)


def layernorm_ibert_code(x, gamma, bias, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                         internals: dict | None = None) -> np.ndarray:
    """I-BERT's code IntLayerNorm normalisation of int8 (B, C, H, W), then Part 2's gamma/beta tail -> int8.

    gamma, bias, multiplier, shift as `int_kernels.layernorm` (t has its scale sqrt(C) 2^-16); no eps (their
    integer path has none). A constant row (std 0) gives t = 0 where their code gives NaN."""
    t = layernorm_ibert_code_normalize(x, internals)
    return KV._ln_tail(t, x.shape[1], gamma, bias, multiplier, shift, rounding, "layernorm_ibert_code", internals)


# =============================================================================================
# 16-bit Shiftmax and the attention context on int16 probabilities (I-ViT's DeiT)
# =============================================================================================

def normalize_probabilities16(e: np.ndarray, internals: dict | None = None) -> np.ndarray:
    """I-ViT's IntSoftmax(16) output stage: factor = (2^31 - 1) // sum e; p = (e * factor) >> 16 -> int16 in
    [0, 32767] at scale 2^-15. internals: `exp`, `sum`, `recip` (the factor), int32 each."""
    sigma = e.sum(axis=-1, keepdims=True)                          # [2^15, N 2^15] < 2^31 (the max key: e = 2^15)
    factor = SHIFTMAX16_NUM // sigma                               # [1, 65535]
    if internals is not None:
        internals.update({k: v.astype(np.int32) for k, v in (("exp", e), ("sum", sigma), ("recip", factor))})
    return ((e * factor) >> SHIFTMAX16_SHIFT).astype(np.int16)     # e * factor <= 2^31 - 1: p <= 32767


def softmax_shift16(scores, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                    internals: dict | None = None) -> np.ndarray:
    """Shiftmax with 16-bit output (I-ViT's DeiT): int32 (..., N) -> int16 probabilities in [0, 32767] at 2^-15.

    The differences and exp_shift as `softmax_shift`; the output stage `normalize_probabilities16`."""
    fn = "softmax_shift16"
    d = KV._softmax_differences(scores, multiplier, shift, rounding, KV.SOFTMAX_SHIFT_CAP, fn)  # (..., N)
    return normalize_probabilities16(KV.exp_shift(-KV._kept_diff(d, internals)), internals)


def attention_context_p16(p, v, multiplier, shift, *, rounding: str = SINGLE_ROUND,
                          internals: dict | None = None) -> np.ndarray:
    """acc[b, h, d, i] = sum_j p[b, h, i, j] * v[b, h, d, j] for int16 p in [0, 32767] (scale 2^-15) and int8 v,
    N <= 512 (|acc| <= 512 * 32767 * 128 < 2^31); requantize (scalar constants) -> int8 (B, Hh, D, N)."""
    fn = "attention_context_p16"
    b, h, d, n = context_args(p, v, np.int16, PROB16_MAX, MAX_TOKENS_P16, fn,
                              "int32 accumulator bound N * 32767 * 128", "p (probabilities at scale 2^-15)")
    m = _scalar_int(multiplier, fn, "multiplier")
    s = _scalar_int(shift, fn, "shift")
    acc = np.swapaxes(int_matmul_exact(p, np.swapaxes(v, 2, 3)), 2, 3)   # (B, Hh, D, N), |.| < 2^31
    if internals is not None:
        internals["acc"] = acc.astype(np.int32, order="C")
    return requantize(acc.astype(np.int64), m, s, out_dtype=np.int8, rounding=rounding)


# =============================================================================================
# token pruning as EViT's code: score order, the unnormalised attention-weighted sum
# =============================================================================================

def select_tokens_score_order(p, *, keep, num_prefix) -> np.ndarray:
    """int8 p (B, Hh, N, N) -> int32 (B, keep): the positions of the `keep` patch tokens with the largest scores
    (`select_tokens`' scores and ties), in score order: larger score first, equal scores lower position first."""
    fn = "select_tokens_score_order"
    score = cls_attention_scores(p, num_prefix, fn)                                 # (B, n)
    k = _scalar_int(keep, fn, "keep")
    if not 1 <= k <= score.shape[1]:
        raise ValueError(f"{fn}: keep must be in [1, {score.shape[1]}] (the patch tokens), got {k}")
    order = np.argsort(-score, axis=1, kind="stable")                               # (B, n): score desc, position asc
    return (order[:, :k] + int(num_prefix)).astype(np.int32)                        # (B, k) in score order


def _prune_parts(x, p, index, num_prefix, rounding, fn: str):
    """Checked inputs (index: distinct patch positions in any order) -> (tokens (B, C, N), score (B, n), index
    (B, k), dropped mask (B, N), prefix)."""
    score, b, n_tokens, prefix = prune_args(x, p, num_prefix, rounding, fn)          # (B, n)
    _require_array(index, fn, "index", np.int32, 2, "(B, k)")
    _check_index(np.sort(index, axis=1), b, prefix, n_tokens, fn)                   # distinct positions in range
    dropped = np.ones((b, n_tokens), bool)                                          # (B, N)
    dropped[:, :prefix] = False
    dropped[np.arange(b)[:, None], index] = False
    return x[:, :, 0, :], score, index, dropped, prefix


def _assemble(tokens, index, package, prefix, dtype) -> np.ndarray:
    """prefix tokens, kept tokens in the index's order, the package token -> (B, C, 1, P + k + 1)."""
    kept = np.take_along_axis(tokens, index[:, None, :].astype(np.intp), axis=2)    # (B, C, k)
    out = np.concatenate([tokens[:, :, :prefix], kept, package[:, :, None].astype(dtype)], axis=2)
    return out[:, :, None, :]


def prune_tokens_weighted_sum(x, p, index, *, num_prefix, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """EViT's package: x (B, C, 1, N), p (B, Hh, N, N) int8, index int32 (B, k) (distinct patch positions, any
    order) -> x's dtype (B, C, 1, P + k + 1): prefix, kept tokens in the index's order, and
    package = saturate(divide_round(sum_{j dropped} score_j x_j, Hh * 127)): the dropped tokens weighted by
    the class token's head-mean attention score_j / (Hh 127), not normalised. x itself when k = n."""
    fn = "prune_tokens_weighted_sum"
    tokens, score, index, dropped, prefix = _prune_parts(x, p, index, num_prefix, rounding, fn)
    b, n_tokens = dropped.shape
    if index.shape[1] == n_tokens - prefix:
        return x.copy()
    w = np.zeros((b, n_tokens), np.int64)                                           # (B, N)
    w[:, prefix:] = score
    w[~dropped] = 0                                                                 # only the dropped tokens weigh
    num = int_matmul(tokens, w[:, :, None])[:, :, 0]                                # (B, C), |.| < 2^54
    package = saturate(divide_round(num, p.shape[1] * PROB_ONE, rounding), x.dtype)  # (B, C)
    return _assemble(tokens, index, package, prefix, x.dtype)


def prune_tokens_mean_any_order(x, p, index, *, num_prefix, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """`prune_tokens` (the score-weighted average package) with the kept tokens in the index's order (distinct
    patch positions, any order: the score-order selector's output)."""
    fn = "prune_tokens_mean_any_order"
    tokens, _, index, dropped, prefix = _prune_parts(x, p, index, num_prefix, rounding, fn)
    if index.shape[1] == dropped.shape[1] - prefix:
        return x.copy()
    ascending = prune_tokens(x, p, np.sort(index, axis=1), num_prefix=num_prefix, rounding=rounding)
    return _assemble(tokens, index, ascending[:, :, 0, -1], prefix, x.dtype)   # the package does not see the order


# offline / tests -----------------------------------------------------------------------------------------------

def ibert_code_exp_constants() -> dict:
    """The three i-exp integers from the authors' decimals, exactly: x0_int, b_int, c_int at unit 2^-14."""
    a, b, c = (Fraction(str(v)) for v in IBERT_CODE_COEF)
    return {"ln2": -math.floor(Fraction(str(IBERT_CODE_X0)) * (1 << 14)),
            "qb": math.floor(b / a * (1 << 14)), "qc": math.floor(c / a * (1 << 28))}
