"""A device model as a hardware team's software engineer writes one: two ops of the spec, apply_scale and
requantize, in plain Python integers (TOSA apply_scale_32, docs/spec.md Part 1), nothing from refvit."""
import numpy as np

import conformance


def apply_scale_one(value: int, multiplier: int, shift: int, double_round: bool) -> int:
    """(value * multiplier + round) >> shift; DOUBLE_ROUND above shift 31 moves round by 2^30 away from zero."""
    rnd = 1 << (shift - 1)
    if double_round and shift > 31:
        rnd += (1 << 30) if value >= 0 else -(1 << 30)
    return (value * multiplier + rnd) >> shift


def _elementwise(value, multiplier, shift, rounding) -> tuple:
    v, m, s = np.broadcast_arrays(value, multiplier, shift)
    out = [apply_scale_one(int(a), int(b), int(c), rounding == "DOUBLE_ROUND")
           for a, b, c in zip(v.reshape(-1).tolist(), m.reshape(-1).tolist(), s.reshape(-1).tolist())]
    return out, v.shape


class MyDUT(conformance.DUT):
    def apply_scale(self, value, multiplier, shift, rounding="SINGLE_ROUND"):
        out, shape = _elementwise(value, multiplier, shift, rounding)
        return np.array(out, np.int64).reshape(shape)

    def requantize(self, value, multiplier, shift, out_dtype="int8", rounding="SINGLE_ROUND"):
        out, shape = _elementwise(value, multiplier, shift, rounding)
        lo, hi = np.iinfo(np.dtype(out_dtype)).min, np.iinfo(np.dtype(out_dtype)).max
        return np.array([min(max(o, lo), hi) for o in out], np.dtype(out_dtype)).reshape(shape)
