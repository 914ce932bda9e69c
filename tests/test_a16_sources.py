"""docs/spec.md, "Differences from the source", `a16w8`: the 16-bit multiplier against TFLite's run-time reduction
of its 31-bit one (tflite MultiplyByQuantizedMultiplier(int64_t ...)), transcribed here with Python integers."""
from fractions import Fraction

import numpy as np

from refvit.intmath import quantize_multiplier, quantize_multiplier16


def tflite_reduced(scale: float) -> Fraction:
    """TFLite's 16x8 rescale as a real number: m32 reduced to 16 bits ((m32 + 2^15) >> 16, 0x7FFF from 0x7FFF0000)
    at total shift 15 - (31 - shift32) = shift32 - 16."""
    m32, s32 = quantize_multiplier(scale)
    reduced = (m32 + (1 << 15)) >> 16 if m32 < 0x7FFF0000 else 0x7FFF
    return Fraction(reduced, 2 ** (s32 - 16))


def test_multiplier16_differs_from_tflites_reduction_exactly_where_the_spec_says():
    scales = 2.0 ** np.random.default_rng(0).uniform(-30, -1, 100_000)
    differ = []
    for sc in map(float, scales):
        m16, s16 = quantize_multiplier16(sc)
        if Fraction(m16, 2 ** s16) != tflite_reduced(sc):
            differ.append((sc, m16, s16))
    assert len(differ) == 3                                        # the spec's count
    clamped = [d for d in differ if d[1] == 1 << 14]               # rounded up to 2^15: 2^14 at one shift less
    assert len(clamped) == 2 and all(tflite_reduced(sc).numerator == 0x7FFF for sc, _, _ in clamped)
    (sc, m16, s16), = [d for d in differ if d[1] != 1 << 14]
    assert (m16, s16) == (29059, 21) and tflite_reduced(sc) == Fraction(29060, 2 ** 21)
    for sc, m16, s16 in differ:                                    # every difference is one unit of the multiplier
        assert abs(Fraction(m16, 2 ** s16) - tflite_reduced(sc)) <= Fraction(1, 2 ** s16)
