"""docs/spec.md Part 7 by its own numbers: "Differences from the source", `a16w8` (the 16-bit multiplier against
TFLite's run-time reduction of its 31-bit one, tflite MultiplyByQuantizedMultiplier(int64_t ...), transcribed here
with Python integers), and Part 7's worked examples."""
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


def test_spec_part7_worked_examples():
    """docs/spec.md Part 7's worked examples, recomputed with the reference kernels (the normative form) and, for
    the rescale, with Python integers."""
    from refvit.int_kernels_variants import make_exp_table_n
    from refvit.reference import a16 as RA16
    from refvit.reference import arith

    def plain(v, m, s):                                          # (v m + 2^(s-1)) >> s on Python ints
        return (v * m + (1 << (s - 1))) >> s
    for (v, m, s), want in [((3, 1 << 14, 15), 2), ((-3, 1 << 14, 15), -1), (((1 << 47) - 1, (1 << 15) - 1, 62), 1),
                            ((-(1 << 47) + 1, (1 << 15) - 1, 62), -1), ((1000003, 24000, 30), 22)]:
        assert int(arith.apply_scale_16(v, m, s)) == plain(v, m, s) == want
    assert [quantize_multiplier16(s) for s in (0.1, 1 / 3, 0.75, 2.0 ** -40)] == [
        (26214, 18), (21845, 16), (24576, 15), (16384, 54)]
    assert quantize_multiplier(2.0 ** -40) == (4194304, 62)
    m, s = quantize_multiplier16(0.0123)                          # conv2d_a16's example
    assert (m, s) == (25795, 21)
    kept = {}
    out = RA16.conv2d_a16(np.array([1000, -2000, 32767], np.int16).reshape(1, 3, 1, 1),
                          np.array([127, -64, 1], np.int8).reshape(1, 3, 1, 1), np.array([5], np.int64),
                          np.array([m], np.int16), np.array([s], np.int8), internals=kept)
    assert int(kept["acc"].ravel()[0]) == 127000 + 128000 + 32767 + 5 == 287772
    assert int(out.ravel()[0]) == plain(287772, m, s) == 3540
    m, s = quantize_multiplier16(2.0 ** -20 * 256)                # softmax_a16's example
    assert (m, s) == (16384, 26)
    kept = {}
    p = RA16.softmax_a16(np.array([[0, -(1 << 20), -3 << 20, -40 << 20]], np.int64), m, s, make_exp_table_n(4096, 8),
                         internals=kept)
    assert kept["index"].ravel().tolist() == [0, 256, 768, 4095] and kept["exp"].ravel().tolist() == [32768, 12055,
                                                                                                       1631, 0]
    assert int(kept["sum"].ravel()[0]) == 46454 and int(kept["recip"].ravel()[0]) == (1 << 40) // 46454 == 23668825
    assert p.ravel().tolist() == [(e * 32767 * 23668825 + (1 << 39)) >> 40 for e in (32768, 12055, 1631, 0)] == [
        23113, 8503, 1150, 0]
    table = RA16.make_gelu_table16(2.0 ** -10, 2.0 ** -10)        # gelu_a16's example
    assert [int(table[x + 32768]) for x in (1024, -1024, 3, 32767, -32768)] == [862, -162, 2, 32767, 0]
