"""The scheme parameters' kernels (issue 19) written as docs/spec.md, Part 6's pseudocode: the shift-only conv of
power-of-two scales, and the narrow accumulator (saturate or wrap at acc_bits).

Plain int64 NumPy, as `refvit.reference.kernels`; same signatures, output dtypes, shapes and `internals` as the
fast kernels of `refvit.int_kernels_variants`.
"""
from __future__ import annotations

import numpy as np

from refvit.reference.arith import (
    INT32_MAX, SINGLE_ROUND, _check_rounding, apply_scale, int64, requantize, rounding_divide_by_pot, rounding_shift_right,
    saturate, require,
)
from refvit.reference.kernels import (
    array_arg, attention_context, attention_scores, check_scores, conv2d_accumulate, conv_requantize, in_range,
    per_channel, scalar_arg, softmax_output,
)

POT_MAX_SHIFT = 31


def pot_shift(acc, shift, rounding: str) -> np.ndarray:
    """docs/spec.md, Part 6, pot_shift: acc * 2^-shift, rounded; shift in [-31, 31].

    shift <= 0:                  acc << -shift                          exact
    shift > 0, SINGLE_ROUND:     rounding_shift_right(acc, shift)      ties toward +inf
    shift > 0, DOUBLE_ROUND:     rounding_divide_by_pot(acc, shift)    ties away from zero
    """
    _check_rounding(rounding, "pot_shift")
    acc, shift = np.asarray(acc, np.int64), np.asarray(shift, np.int64)
    right = np.maximum(shift, 0)
    down = rounding_shift_right(acc, right) if rounding == SINGLE_ROUND else rounding_divide_by_pot(acc, right)
    return np.where(shift <= 0, acc << (-np.minimum(shift, 0)), down)


def conv2d_pot(x, weight, bias, shift, *, rounding: str = SINGLE_ROUND, out_dtype=np.int8,
               internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 6, conv2d_pot:

    acc = conv2d_accumulate(x, weight, bias)                                # int32, Part 2
    out[b, o, i, j] = saturate(pot_shift(acc[b, o, i, j], shift[o], rounding), out_dtype)
    internals: `acc`.
    """
    fn = "conv2d_pot"
    acc = conv2d_accumulate(x, weight, bias, fn=fn)
    s = per_channel(shift, fn, "shift", acc.shape[1])
    require((-POT_MAX_SHIFT <= s) & (s <= POT_MAX_SHIFT), fn, f"shift must be in [-{POT_MAX_SHIFT}, {POT_MAX_SHIFT}]")
    if internals is not None:
        internals["acc"] = acc                                              # int32 (B, Cout, Ho, Wo)
    return saturate(pot_shift(acc, np.broadcast_to(s, acc.shape), rounding), out_dtype)


ACC_OVERFLOW_MODES = ("saturate", "wrap")


def narrow_accumulator(acc, acc_bits: int, acc_overflow: str, fn: str = "narrow_accumulator") -> np.ndarray:
    """docs/spec.md, Part 6, narrow_accumulator: lo = -2^(acc_bits-1), hi = 2^(acc_bits-1) - 1

    saturate: min(max(acc, lo), hi)
    wrap:     ((acc - lo) mod 2^acc_bits) + lo
    -> int32
    """
    bits = scalar_arg(acc_bits, fn, "acc_bits", 16, 32)
    require(acc_overflow in ACC_OVERFLOW_MODES, fn, f"acc_overflow must be one of {ACC_OVERFLOW_MODES}")
    acc = int64(acc, fn, "acc")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    y = np.minimum(np.maximum(acc, lo), hi) if acc_overflow == "saturate" else np.mod(acc - lo, 1 << bits) + lo
    return y.astype(np.int32)


def conv2d_narrow(x, weight, bias, multiplier, shift, *, acc_bits: int, acc_overflow: str,
                  rounding: str = SINGLE_ROUND, out_dtype=np.int8, internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 6, conv2d_narrow:

    acc_exact = conv2d_accumulate(x, weight, bias)                               # Part 2, int32
    acc = narrow_accumulator(acc_exact, acc_bits, acc_overflow)
    out[b, o, i, j] = requantize(acc[b, o, i, j], multiplier[o], shift[o], out_dtype, rounding)
    internals: `acc_exact`, `acc`.
    """
    exact = conv2d_accumulate(x, weight, bias, fn="conv2d_narrow")
    acc = narrow_accumulator(exact, acc_bits, acc_overflow, "conv2d_narrow")
    if internals is not None:
        internals["acc_exact"] = exact
    return conv_requantize(acc, multiplier, shift, rounding, out_dtype, internals, "conv2d_narrow")


def attention_scores_narrow(q, k, *, acc_bits: int, acc_overflow: str) -> np.ndarray:
    """docs/spec.md, Part 6: narrow_accumulator(attention_scores(q, k), acc_bits, acc_overflow)."""
    return narrow_accumulator(attention_scores(q, k), acc_bits, acc_overflow, "attention_scores_narrow")


def attention_context_narrow(p, v, multiplier, shift, *, acc_bits: int, acc_overflow: str,
                             rounding: str = SINGLE_ROUND, internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 6, attention_context_narrow:

    acc_exact[b, h, d, i] = sum_{j < N} p[b, h, i, j] * v[b, h, d, j]           # Part 2
    acc = narrow_accumulator(acc_exact, acc_bits, acc_overflow)
    out = requantize(acc, multiplier, shift, int8, rounding)
    internals: `acc_exact`, `acc`.
    """
    fn = "attention_context_narrow"
    kept: dict = {}
    attention_context(p, v, multiplier, shift, rounding=rounding, internals=kept)    # the checks, the exact sum
    acc = narrow_accumulator(kept["acc"], acc_bits, acc_overflow, fn)
    if internals is not None:
        internals["acc_exact"], internals["acc"] = kept["acc"], acc
    m, s = scalar_arg(multiplier, fn, "multiplier", 0, INT32_MAX), scalar_arg(shift, fn, "shift", 2, 62)
    return requantize(acc, m, s, np.int8, rounding)


EXP_TABLE_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
GELU_TABLE_SIZES = (16, 32, 64, 128, 256)


def softmax_table_n(scores, multiplier, shift, exp_table, *, rounding: str = SINGLE_ROUND,
                    internals: dict | None = None) -> np.ndarray:
    """docs/spec.md, Part 6, softmax_table_n, over the last axis -> int8 (..., N) in [0, 127]:

    L     = len(exp_table)                                      # 64, 128, ..., 4096
    m     = max_j s[j] ; d = m - s
    idx   = min(apply_scale(min(d, d_cap), multiplier, shift, rounding), L - 1)    # d_cap = min(2^(shift-1) - 1, 2^31 - 1)
    e     = exp_table[idx]
    sigma = sum_j e ; recip = (1 << 40) // sigma ; p = saturate(rounding_shift_right(e * 127 * recip, 40), int8)
    internals: `index` (uint16), `exp`, `sum`, `recip` (int32).
    """
    fn = "softmax_table_n"
    s = check_scores(scores, fn)
    array_arg(exp_table, fn, "exp_table", (np.uint16,), 1)
    L = exp_table.shape[0]
    require(L in EXP_TABLE_SIZES and in_range(exp_table, 0, 1 << 15) and int(exp_table[0]) == 1 << 15, fn,
            f"exp_table must have one of {EXP_TABLE_SIZES} entries in [0, 2^15], exp_table[0] = 2^15")
    m = scalar_arg(multiplier, fn, "multiplier", 0, INT32_MAX)
    sh = scalar_arg(shift, fn, "shift", 2, 62)
    d = s.max(axis=-1, keepdims=True) - s                                  # (..., N) >= 0
    d_cap = min((1 << (sh - 1)) - 1, INT32_MAX)
    big = apply_scale(np.array([d_cap]), m, sh, rounding)[0]
    require(not (big < L - 1 and d.max() > d_cap), fn, "a score difference beyond apply_scale's domain that the "
            "rescale does not saturate at L - 1", OverflowError)
    idx = np.minimum(apply_scale(np.minimum(d, d_cap), m, sh, rounding), L - 1)   # (..., N) in [0, L - 1]
    e = exp_table.astype(np.int64)[idx]
    p, sigma, recip = softmax_output(e)
    if internals is not None:
        internals.update({"index": idx.astype(np.uint16), "exp": e.astype(np.int32), "sum": sigma.astype(np.int32),
                          "recip": recip.astype(np.int32)})
    return p


def gelu_table_n(x, table) -> np.ndarray:
    """docs/spec.md, Part 6, gelu_table_n: L = len(table) in 16 ... 256, step = 256 / L;
    out = table[floor((x + 128) / step)] (int8, the shape of x)."""
    fn = "gelu_table_n"
    array_arg(x, fn, "x", np.int8)
    array_arg(table, fn, "table", np.int8, 1)
    require(table.shape[0] in GELU_TABLE_SIZES, fn, f"table must have one of {GELU_TABLE_SIZES} entries")
    return table[(x.astype(np.int64) + 128) // (256 // table.shape[0])]
