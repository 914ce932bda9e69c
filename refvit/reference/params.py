"""The scheme parameters' kernels (issue 19) written as docs/spec.md, Part 6's pseudocode: the shift-only conv of
power-of-two scales, and the narrow accumulator (saturate or wrap at acc_bits).

Plain int64 NumPy, as `refvit.reference.kernels`; same signatures, output dtypes, shapes and `internals` as the
fast kernels of `refvit.int_kernels_variants`.
"""
from __future__ import annotations

import numpy as np

from refvit.reference.arith import (
    SINGLE_ROUND, _check_rounding, rounding_divide_by_pot, rounding_shift_right, saturate, require,
)
from refvit.reference.kernels import conv2d_accumulate, per_channel

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
