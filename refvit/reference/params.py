"""The scheme parameters' kernels (issue 19) written as docs/spec.md, Part 6's pseudocode: the shift-only conv of
power-of-two scales, and the narrow accumulator (saturate or wrap at acc_bits).

Plain int64 NumPy, as `refvit.reference.kernels`; same signatures, output dtypes, shapes and `internals` as the
fast kernels of `refvit.int_kernels_variants`.
"""
from __future__ import annotations

import numpy as np

from refvit.reference.arith import (
    INT32_MAX, SINGLE_ROUND, _check_rounding, int64, requantize, rounding_divide_by_pot, rounding_shift_right,
    saturate, require,
)
from refvit.reference.kernels import (
    attention_context, attention_scores, conv2d_accumulate, conv_requantize, per_channel, scalar_arg,
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
