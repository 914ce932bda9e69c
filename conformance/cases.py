"""Deterministic conformance cases: one family per integer op of the spec, plus a block and a whole model.

Every case is named by its parameters (`conv1x1_cin192_cout576_n197_single`); its random data comes from
numpy's PCG64 seeded with crc32(case name without _single/_double), so a case is the same on every machine,
independent of which other cases are built, and a rounding pair shares its inputs. Expected outputs are computed by refvit: the kernels for per-op cases and
refvit.int_model.forward_int (not the DUT composition) for block and model cases.

Boundary cases per family: rounding ties (value*multiplier exactly on a half), saturation beyond the
output dtype, all -128 / all 127 inputs, the largest accumulators, shifts 2 and 62, both rounding modes.
Inside the kernels too: every internal rounding, reciprocal and square root meets a tie and the values next
to it in some case (softmax: the table index at shift 31 and 33, floor(2^40 / sigma) at exact divisors and
just off them, p exactly on a half; layernorm: isqrt at perfect squares and squares minus one below and
above 2^53, floor(2^40 / r) exact and with fraction >= 1/2, t exactly on a half, the largest C and eps_int,
sum d^2 above 2^32), exp and GELU tables other than the shipped ones, and an accumulator no single float32
pass holds. Designed layernorm cases use an output stage that shows every t (gamma +-8, bias 4, shift 33).
The scheme variants (docs/spec.md Part 4: gelu_poly / gelu_shift, softmax_poly / softmax_shift, layernorm_int32 /
layernorm_wide, add_wide, conv2d_w4 / conv2d_mixed_pot) have families of their own, their constants made by the
offline builders of refvit.int_kernels_variants from the scales in the case name (`sin0.05_sout0.02`), plus
designed constants for ties, saturation and the edges of each domain; and a block and model case per named scheme
(refvit.graph.SCHEMES), the same random float model quantized by each. tests/test_scheme_conformance.py checks
that a neighbouring variant fails each variant's cases.
The scheme parameters (docs/spec.md Part 6) add, at the end of the suite: conv2d_pot (`conv_pot_*`), the narrow
accumulators (`conv_narrow_*`, `scores_narrow_*`, `context_narrow_*`), the table sizes (`softmax_tablen_*`,
`gelu_tablen_*`) and block and model cases of unnamed parameter schemes (PARAM_SCHEMES: `model_pertensor_*`,
`model_accsat16_*`, ...); tests/test_scheme_params.py checks that the neighbouring choices fail them.
The 16-bit activations (docs/spec.md Part 7, act_bits 16, the scheme a16w8) come last: conv2d_a16 (`conv_a16_*`:
random, the int48 extremes, ties), attention_scores_a16 (`scores_a16_*`), softmax_a16 (`softmax_a16_L{4096,256}_b{8,4}_
{random,equal,cap}_*`, ties, one key far above, a random table, N = 1), attention_context_a16 (`context_a16_*`: random,
p = 32767 everywhere, ties), layernorm_a16 (`layernorm_a16_c*_{random,constant,extreme}_*`, both roundings) and
gelu_a16 (`gelu_a16_all65536_*`: every int16 input); their block and model cases are the named scheme's
(`block_a16w8_*`, `model_a16w8_*`). tests/test_a16.py checks that a neighbouring choice fails each of them (a 32-bit
accumulator and rescale, an int8 output, ties away from zero, probabilities at 1/127, 32-bit score differences,
the other rounding, another GELU index offset) and that the a16w8 and int8 model cases tell the schemes apart.
tests/test_mutation.py checks that one-line mutants of the reference kernels each FAIL some quick case.
Sets: `quick` (seconds) is a subset of `full`.
Each family declares, per case, its rounding mode and the DUT method's keyword parameters (CaseSpec.rounding,
CaseSpec.params): `select` filters on them, and tests/test_conformance.py checks them against the built cases.

Case arrays are read-only (get_case): a DUT that writes into its inputs gets an ERROR, not later cases
with changed inputs or expectations.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np

from refvit import int_kernels as K
from refvit import int_kernels_variants as KV
from refvit import int_model, registry
from refvit.config import DeiTConfig
from refvit.intmath import (DOUBLE_ROUND, INT32_MAX, INT32_MIN, SINGLE_ROUND, apply_scale, int_range,
                            quantize_add_multipliers, quantize_multiplier, round_half_away_from_zero)

from weights_tools.convert import token_to_conv
from refvit.graph import BOUNDARY_CONSTANTS, SCHEMES, Scheme, block_graph, required_constants
from refvit.models import random_params
from refvit.quantize import quantize

from .dut import REFERENCE_KERNELS, kernel_set

SETS = ("quick", "full")
_MODES = {"single": SINGLE_ROUND, "double": DOUBLE_ROUND}


@dataclass(frozen=True, eq=False)
class Case:
    name: str
    op: str                 # the DUT method
    inputs: dict            # positional arguments in signature order: ndarray, or {name: ndarray} (constants)
    params: dict            # keyword arguments, JSON values (rounding, out_dtype, num_heads, config)
    expected: np.ndarray
    note: str = ""


@dataclass(frozen=True)
class CaseSpec:
    """A case before it is built: what a filter needs (op, rounding, parameters) without building its arrays.

    rounding: the rounding mode the case's op runs with (SINGLE_ROUND or DOUBLE_ROUND; block and model: every
    record's), None for ops that take none (attention_scores, add, gelu, ...).
    params: the keyword parameters the DUT method receives, as the built case carries them in Case.params
    (rounding, out_dtype, keep, num_prefix); block and model cases: rounding and the scheme's name (their
    Case.params hold the graph instead). Read-only."""
    name: str
    op: str
    quick: bool
    build: Callable = field(repr=False, compare=False)
    rounding: str | None = None
    params: Mapping = field(default_factory=lambda: MappingProxyType({}), compare=False)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _p(mode: str | None = None, **params) -> dict:
    """A spec's parameters: the rounding mode by its short name (single / double), then the DUT method's other
    keyword parameters as its case will carry them."""
    return ({"rounding": _MODES[mode]} if mode else {}) | params


def _rng(name: str, stream: str = "") -> np.random.Generator:
    """Seeded by the name without its rounding suffix: a _single/_double pair shares its data."""
    base = name.removesuffix("_single").removesuffix("_double")
    return np.random.default_rng(zlib.crc32(f"{base}{stream}".encode()))


def _i8(rng, shape, lo=-128, hi=127) -> np.ndarray:
    return rng.integers(lo, hi + 1, size=shape, dtype=np.int8)


def _scalar(v, dtype) -> np.ndarray:
    return np.array(v, dtype)


def _rescale(real_scale) -> tuple[np.ndarray, np.ndarray]:
    """(multiplier int32, shift int8) arrays encoding real scale(s), as the quantizer makes them."""
    pairs = [quantize_multiplier(float(s)) for s in np.atleast_1d(real_scale)]
    m, s = np.array([p[0] for p in pairs], np.int32), np.array([p[1] for p in pairs], np.int8)
    return (m, s) if np.ndim(real_scale) else (m.reshape(()), s.reshape(()))


def _kernel_case(name: str, op: str, inputs: dict, params: dict, note: str = "") -> Case:
    expected = REFERENCE_KERNELS[op](*inputs.values(), **params)
    return Case(name, op, inputs, params, np.asarray(expected), note)


def _fit_scale(acc: np.ndarray, axis=None, headroom: float = 3.0) -> np.ndarray:
    """Real rescale putting `headroom` standard deviations of acc at 127 (per channel when axis given)."""
    std = np.std(acc.astype(np.float64), axis=axis)
    return 127.0 / (headroom * np.maximum(std, 1.0))


# ---------------------------------------------------------------------------------------------
# apply_scale / requantize
# ---------------------------------------------------------------------------------------------

def _tie_triples(rng, shifts, per_shift: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, multiplier, shift) with value*multiplier = odd * 2^(shift-1): exactly half-way, both signs.

    value = +-odd_a * 2^t, multiplier = odd_b * 2^(shift-1-t) with t chosen so both fit their ranges;
    at shift 62 the only tie inside the preconditions is -2^31 * 2^30."""
    vals, mults, shs = [], [], []
    for s in shifts:
        if s == 62:
            vals.append(INT32_MIN), mults.append(1 << 30), shs.append(62)
        t_lo, t_hi = max(0, s - 31), min(30, s - 2)
        for _ in range(per_shift if t_lo <= t_hi else 0):
            t = int(rng.integers(t_lo, t_hi + 1))
            e = s - 1 - t                                                   # multiplier exponent, <= 30
            odd_b = 2 * int(rng.integers(0, 1 << (30 - e))) + 1 if e < 30 else 1
            a_bits = min(s - 1, 31) - t                                     # |value| < 2^(t + a_bits)
            odd_a = 2 * int(rng.integers(0, 1 << (a_bits - 1))) + 1 if a_bits > 1 else 1
            vals.append(odd_a << t if rng.integers(2) else -(odd_a << t)), mults.append(odd_b << e), shs.append(s)
    return np.array(vals, np.int32), np.array(mults, np.int32), np.array(shs, np.int8)


def _random_triples(rng, n: int, shifts=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random in-domain (value, multiplier, shift): |value| < 2^(shift-1), multiplier in [0, 2^31)."""
    shift = rng.integers(2, 63, n) if shifts is None else np.resize(np.asarray(shifts), n)
    bound = np.minimum(2.0 ** (shift - 1), 2.0 ** 31)
    value = np.floor(rng.uniform(-1, 1, n) * bound).astype(np.int64)
    mult = rng.integers(0, 1 << 31, n)
    mult[:4] = [0, 1, 1 << 30, INT32_MAX]
    return np.clip(value, -bound, bound - 1).astype(np.int32), mult.astype(np.int32), shift.astype(np.int8)


def _scale_case(name, op, value, mult, shift, mode, out_dtype="int8", note=""):
    params = {"rounding": _MODES[mode]} | ({"out_dtype": out_dtype} if op == "requantize" else {})
    return _kernel_case(name, op, {"value": value, "multiplier": mult, "shift": shift}, params, note)


def _scale_specs():
    for mode in _MODES:
        yield f"apply_scale_ties_shift2to62_{mode}", "apply_scale", True, _p(mode), lambda n, m=mode: _scale_case(
            n, "apply_scale", *_tie_triples(_rng(n), range(2, 63)), m, note="every value*multiplier is a tie")
        yield f"apply_scale_random_{mode}", "apply_scale", True, _p(mode), lambda n, m=mode: _scale_case(
            n, "apply_scale", *_random_triples(_rng(n), 4096), m)
        yield f"requantize_ties_int8_{mode}", "requantize", True, _p(mode, out_dtype="int8"), \
            lambda n, m=mode: _scale_case(
            n, "requantize", *_tie_triples(_rng(n), range(2, 63), 8), m, note="ties, saturated to int8")
        for s in (2, 62):
            yield f"requantize_shift{s}_{mode}", "requantize", True, _p(mode, out_dtype="int8"), \
                lambda n, m=mode, s=s: _scale_case(n, "requantize", *_random_triples(_rng(n), 1024, [s]), m)
        yield f"requantize_saturate_int8_{mode}", "requantize", True, _p(mode, out_dtype="int8"), \
            lambda n, m=mode: _scale_case(
            n, "requantize", *_saturating_triples(_rng(n)), m, note="outputs far beyond int8")
        yield f"requantize_saturate_int16_{mode}", "requantize", True, _p(mode, out_dtype="int16"), \
            lambda n, m=mode: _scale_case(n, "requantize", *_saturating_triples(_rng(n)), m, "int16")
        yield f"requantize_maxacc_{mode}", "requantize", True, _p(mode, out_dtype="int8"), \
            lambda n, m=mode: _scale_case(
            n, "requantize", *_maxacc_triples(), m, note="int32 extremes at shifts 32..62")


def _saturating_triples(rng):
    value, mult, shift = _random_triples(rng, 1024, range(8, 20))
    return value, np.maximum(mult, 1 << 30).astype(np.int32), shift


def _maxacc_triples():
    shifts = np.arange(32, 63, dtype=np.int8)
    value = np.array([INT32_MAX, INT32_MIN, INT32_MIN + 1, -1] * len(shifts), np.int32)
    mult = np.array([INT32_MAX, 1 << 30, INT32_MAX, 1 << 30] * len(shifts), np.int32)
    return value, mult, np.repeat(shifts, 4)


# ---------------------------------------------------------------------------------------------
# conv2d (every Linear as a 1x1 conv, and the patch embedding)
# ---------------------------------------------------------------------------------------------

def _conv_case(name, x, w, bias=None, mode="single", out_dtype="int8", mult=None, shift=None, note="", op="conv2d",
               extra=None):
    """Random bias and data-fitted per-channel rescale unless given; op: conv2d or a Part 4 variant, whose
    further constants (pot_rows) come in `extra`."""
    rng = _rng(name, "/constants")
    cout = w.shape[0]
    if bias is None:
        bias = rng.integers(-(1 << 16), 1 << 16, cout).astype(np.int32)
    if mult is None:
        acc = K.conv2d_accumulate(x, w, bias)
        mult, shift = _rescale(_fit_scale(acc, axis=(0, 2, 3)) * (256 if out_dtype == "int16" else 1))
    inputs = {"x": x, "weight": w, "bias": bias, "multiplier": mult, "shift": shift} | (extra or {})
    return _kernel_case(name, op, inputs, {"rounding": _MODES[mode], "out_dtype": out_dtype}, note)


def _conv1x1(name, cin, cout, n, mode, fill=None, batch=1, out_dtype="int8"):
    rng = _rng(name)
    x = np.full((batch, cin, 1, n), fill, np.int8) if fill is not None else _i8(rng, (batch, cin, 1, n))
    return _conv_case(name, x, _i8(rng, (cout, cin, 1, 1), -127), mode=mode, out_dtype=out_dtype)


def _patch_conv(name, k, img, cout, mode):
    rng = _rng(name)
    return _conv_case(name, _i8(rng, (1, 3, img, img)), _i8(rng, (cout, 3, k, k), -127), mode=mode)


def _conv_maxacc(name, cin, cout, mode, wmax=127, product_max=K.SYM_PRODUCT_MAX, op="conv2d", extra=None, n=4):
    """x = -128 everywhere; weights -wmax / +wmax (per row when an array) and bias +-(INT32_MAX - Cin*product_max),
    the kernel's headroom: acc = +-INT32_MAX where wmax * 128 = product_max."""
    x = np.full((1, cin, 1, n), -128, np.int8)
    sign = np.where(np.arange(cout) % 2 == 0, -1, 1)
    w = (sign * wmax).astype(np.int8)[:, None, None, None] * np.ones((1, cin, 1, 1), np.int8)
    bias = (-sign * (INT32_MAX - cin * product_max)).astype(np.int32)
    shift = np.resize(np.array([32, 33, 40, 62], np.int8), cout)
    mult = np.resize(np.array([INT32_MAX, 1 << 30, 1 << 30, INT32_MAX], np.int32), cout)
    return _conv_case(name, x, w, bias, mode, mult=mult, shift=shift, note="acc = +-(2^31 - 1)", op=op, extra=extra)


def _conv_ties(name, mode, op="conv2d", extra=None):
    """Cin = 1, weight +-1, bias 4, x in 8Z: acc = 4 (mod 8); multiplier 2^30, shift 33: acc/8 is a tie."""
    rng = _rng(name)
    x = (rng.integers(-16, 16, (1, 1, 1, 64)) * 8).astype(np.int8)
    w = np.array([1, -1, 1, -1], np.int8).reshape(4, 1, 1, 1)
    bias, mult, shift = np.full(4, 4, np.int32), np.full(4, 1 << 30, np.int32), np.full(4, 33, np.int8)
    return _conv_case(name, x, w, bias, mode, mult=mult, shift=shift, note="every output is a rounding tie", op=op,
                      extra=extra)


def _conv_saturate(name, mode):
    rng = _rng(name)
    x, w = _i8(rng, (1, 64, 1, 16)), _i8(rng, (32, 64, 1, 1), -127)
    acc = K.conv2d_accumulate(x, w, np.zeros(32, np.int32))
    mult, shift = _rescale(_fit_scale(acc, axis=(0, 2, 3), headroom=0.25))     # ~90 % of outputs saturate
    return _conv_case(name, x, w, np.zeros(32, np.int32), mode, mult=mult, shift=shift)


def _conv_allmax(name, cin, cout, n, mode):
    """x = 127, weight +-127 everywhere: sum = +-Cin*127^2, odd and above 2^25 for Cin = 3071, so no single
    float32 pass can hold it (docs/spec.md, int_matmul). bias cancels it to a small acc shown at scale 1."""
    rng = _rng(name)
    x = np.full((1, cin, 1, n), 127, np.int8)
    sign = np.where(np.arange(cout) % 2 == 0, 1, -1)
    w = (sign * 127).astype(np.int8)[:, None, None, None] * np.ones((1, cin, 1, 1), np.int8)
    bias = (-sign * cin * 127 * 127 + rng.integers(-100, 101, cout)).astype(np.int32)
    mult, shift = np.full(cout, 1 << 30, np.int32), np.full(cout, 30, np.int8)
    return _conv_case(name, x, w, bias, mode, mult=mult, shift=shift,
                      note="exact accumulator: out = acc = bias +- Cin*127^2 (scale 1)")


def _conv_specs():
    for mode in _MODES:
        yield f"conv1x1_cin192_cout576_n197_{mode}", "conv2d", True, _p(mode, out_dtype="int8"), \
            lambda n, m=mode: _conv1x1(n, 192, 576, 197, m)
        yield f"patchconv_k16_cin3_cout192_img224_{mode}", "conv2d", True, _p(mode, out_dtype="int8"), \
            lambda n, m=mode: _patch_conv(n, 16, 224, 192, m)
        yield f"conv1x1_maxacc_cin3072_cout8_n4_{mode}", "conv2d", True, _p(mode, out_dtype="int8"), \
            lambda n, m=mode: _conv_maxacc(n, 3072, 8, m)
        yield f"conv1x1_ties_cin1_cout4_n64_shift33_{mode}", "conv2d", True, _p(mode, out_dtype="int8"), \
            lambda n, m=mode: _conv_ties(n, m)
        yield f"conv1x1_saturate_cin64_cout32_n16_{mode}", "conv2d", True, _p(mode, out_dtype="int8"), \
            lambda n, m=mode: _conv_saturate(n, m)
        yield f"conv1x1_cin768_cout3072_n197_{mode}", "conv2d", False, _p(mode, out_dtype="int8"), \
            lambda n, m=mode: _conv1x1(n, 768, 3072, 197, m)
        yield f"conv1x1_cin3072_cout768_n197_{mode}", "conv2d", False, _p(mode, out_dtype="int8"), \
            lambda n, m=mode: _conv1x1(n, 3072, 768, 197, m)
    yield "patchconv_k4_cin3_cout192_img32_single", "conv2d", True, _p("single", out_dtype="int8"), \
        lambda n: _patch_conv(n, 4, 32, 192, "single")
    yield "patchconv_k16_cin3_cout768_img384_single", "conv2d", False, _p("single", out_dtype="int8"), \
        lambda n: _patch_conv(n, 16, 384, 768, "single")
    for fill, tag in ((-128, "allneg128"), (127, "all127")):
        yield f"conv1x1_{tag}_cin192_cout64_n16_single", "conv2d", True, _p("single", out_dtype="int8"), \
            lambda n, f=fill: _conv1x1(n, 192, 64, 16, "single", fill=f)
    yield "conv1x1_head_int16_cin384_cout1000_n1_b4_single", "conv2d", True, _p("single", out_dtype="int16"), \
        lambda n: _conv1x1(n, 384, 1000, 1, "single", batch=4, out_dtype="int16")
    yield "conv1x1_allmax_cin3071_cout4_n4_single", "conv2d", True, _p("single", out_dtype="int8"), \
        lambda n: _conv_allmax(n, 3071, 4, 4, "single")


# ---------------------------------------------------------------------------------------------
# attention: scores, softmax, context
# ---------------------------------------------------------------------------------------------

def _heads(rng, heads, d, n, lo=-128, hi=127):
    return _i8(rng, (1, heads, d, n), lo, hi), _i8(rng, (1, heads, d, n), lo, hi)


def _scores_case(name, heads, d, n, extremes=False):
    if extremes:   # head 0: q = k = -128 (max +D*2^14); head 1: q = -128, k = 127 (min)
        q = np.full((1, 2, d, n), -128, np.int8)
        k = np.stack([np.full((d, n), -128), np.full((d, n), 127)])[None].astype(np.int8)
    else:
        q, k = _heads(_rng(name), heads, d, n)
    return _kernel_case(name, "attention_scores", {"q": q, "k": k}, {})


def _softmax_rescale(d: int, s_qk: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The model's softmax constants for q, k at scale s_qk: score difference -> units of 1/16."""
    return _rescale(s_qk * s_qk / math.sqrt(d) * 2 ** K.EXP_INDEX_BITS)


def _softmax_case(name, scores, mode, mult=None, shift=None, note="", table=None):
    if mult is None:
        mult, shift = _softmax_rescale(64)
    table = K.make_exp_table() if table is None else table
    inputs = {"scores": scores.astype(np.int32), "multiplier": mult, "shift": shift, "exp_table": table}
    return _kernel_case(name, "softmax", inputs, {"rounding": _MODES[mode]}, note)


def _random_exp_table(rng, dtype=np.uint16) -> np.ndarray:
    """A valid exp table that is not the shipped one: entries uniform in [0, 2^15] (not monotonic), table[0] =
    2^15 as required, one more 2^15 and one 0 inside, table[254] != table[255] (the index clamp shows)."""
    t = rng.integers(0, K.EXP_ONE + 1, K.EXP_TABLE_SIZE)
    t[0] = K.EXP_ONE
    i, j = rng.choice(np.arange(1, K.EXP_TABLE_SIZE - 2), 2, replace=False)
    t[i], t[j] = K.EXP_ONE, 0
    if t[254] == t[255]:
        t[254] = t[255] ^ 1
    return t.astype(dtype)


def _softmax_random_table(name, n, mode, dtype=np.uint16):
    """Random scores (indices over the whole table and clamped at 255) against a random valid table."""
    return _softmax_case(name, _random_scores(_rng(name), 3, n), mode, table=_random_exp_table(
        _rng(name, "/table"), dtype), note="random valid exp table")


def _softmax_shift33(name, n, mode):
    """Index = d * multiplier / 2^33: DOUBLE_ROUND rounds twice, so the two modes pick different table
    entries for some d; a random table makes every index change visible."""
    rng = _rng(name)
    scores = rng.integers(-1500, 1, (1, 2, n, n)).astype(np.int32)
    mult = _scalar(int(rng.integers(1 << 30, 1 << 31)), np.int32)
    return _softmax_case(name, scores, mode, mult, _scalar(33, np.int8), "index rounding at shift 33",
                         _random_exp_table(_rng(name, "/table")))


def _softmax_shift40(name, n, mode):
    """Index = 1.5 d / 2^10 (multiplier 3 * 2^29, shift 40) on random scores: indices over the whole table, the
    clamp at 255 reached only for d > 2^17 (beyond a 2^16-entry lookup of d), a random table."""
    return _softmax_case(name, _random_scores(_rng(name), 3, n), mode, _scalar(3 << 29, np.int32),
                         _scalar(40, np.int8), "index = 1.5 d / 1024", _random_exp_table(_rng(name, "/table")))


def _softmax_direct(name, n, mode):
    """Index = 1.5 d / 2^18 (multiplier 3 * 2^29, shift 48): the clamp at 255 is reached only for d > 2^25, and
    score spreads up to 2^27 -- beyond any lookup of d, so the index is computed directly; a random table."""
    rng = _rng(name)
    scores = rng.integers(-(1 << 27), 1, (1, 2, n, n)).astype(np.int64)           # (1, 2, N, N)
    d = np.arange(1 << 20, dtype=np.int64)                                          # where the two modes differ
    split = d[apply_scale(d, 3 << 29, 48, SINGLE_ROUND) != apply_scale(d, 3 << 29, 48, DOUBLE_ROUND)]
    flat = scores.reshape(-1, n)
    flat[:, 0] = 0                                                                  # the row maximum
    rows = np.arange(len(split)) % len(flat)
    flat[rows, 1 + np.arange(len(split)) // len(flat)] = -split                     # d = those differences
    return _softmax_case(name, scores, mode, _scalar(3 << 29, np.int32), _scalar(48, np.int8),
                         "index = 1.5 d / 2^18 over d < 2^27, with the d where the rounding modes differ",
                         _random_exp_table(_rng(name, "/table")))


def _split(rng, total: int, parts: int, cap: int) -> list:
    """total as `parts` non-negative integers <= cap (requires total <= parts * cap), randomly uneven."""
    pieces = [total // parts + (k < total % parts) for k in range(parts)]
    for _ in range(4 * parts if parts > 1 else 0):
        a, b = rng.choice(parts, 2, replace=False)
        move = int(rng.integers(0, min(pieces[a], cap - pieces[b]) + 1))
        pieces[a], pieces[b] = pieces[a] - move, pieces[b] + move
    assert sum(pieces) == total and 0 <= min(pieces) and max(pieces) <= cap
    return pieces


def _softmax_recip_ties(name, n):
    """The reciprocal and the final rounding of softmax at their boundaries, through a designed exp table.

    multiplier 2^30, shift 30: idx = d exactly, so scores = -idx choose each key's table entry e. Rows:
    - sigma = 2^16, an exact divisor of 2^40, two keys of e = 2^15: p = 63.5 exactly, a tie (-> 64);
    - sigma = 254 k and a key e = o k (o odd): 127 e / sigma = o / 2 exactly but sigma does not divide 2^40,
      so floor(2^40 / sigma) lands just below the tie (-> (o - 1) / 2); half of these rows have
      frac(2^40 / sigma) >= 1/2, where a rounded reciprocal would land above it;
    - all keys equal (sigma = N 2^15) and a single non-zero key (p = 127).
    The remaining keys are fillers summing sigma up, and zeros (table[1] = 0)."""
    rng = _rng(name)
    table = [K.EXP_ONE, 0, K.EXP_ONE]                      # index 2: a second 2^15 entry

    def index(e):
        if e not in table[3:]:
            table.append(e)
        return table.index(e, 3)

    rows = [[0, 0] + [1] * (n - 2), [0, 2] + [1] * (n - 2), [0] * n, [0] + [1] * (n - 1)]
    want_up = 0
    while len(rows) < 16:
        o = int(rng.choice([1, 3, 5, 7, 9, 11, 13, 15]))
        k = int(rng.integers(-(-K.EXP_ONE // (254 - o)), min(K.EXP_ONE // o, 1800) + 1))
        sigma, e = 254 * k, o * k
        fill = sigma - K.EXP_ONE - e
        parts = -(-fill // K.EXP_ONE) + int(rng.integers(0, 3))
        up = (1 << 40) % sigma * 2 >= sigma               # frac(2^40 / sigma) >= 1/2
        if fill < 0 or parts > n - 2 or up != (want_up % 2 == 0):
            continue
        want_up += 1
        idx = [0, index(e)] + [index(f) for f in _split(rng, fill, parts, K.EXP_ONE)]
        rows.append(idx + [1] * (n - len(idx)))
    assert len(table) <= K.EXP_TABLE_SIZE
    table += rng.integers(0, K.EXP_ONE + 1, K.EXP_TABLE_SIZE - len(table)).tolist()
    idx = np.array([rng.permutation(r) for r in rows])
    return _softmax_case(name, -idx.reshape(1, 1, len(rows), n), "single", _scalar(1 << 30, np.int32),
                         _scalar(30, np.int8), "reciprocal at exact divisors and half-integer p",
                         np.array(table, np.uint16))


def _softmax_longest(name, n):
    """N = the largest key count: an all-equal row (sigma = N 2^15, the largest sum) and a random row."""
    rng = _rng(name)
    scores = np.stack([np.full(n, 777), rng.integers(-(1 << 20), 1 << 20, n)]).reshape(1, 1, 2, n)
    return _softmax_case(name, scores, "single", note="sigma up to N * 2^15 < 2^31")


def _random_scores(rng, heads, n, d=64):
    q, k = _heads(rng, heads, d, n)
    return K.attention_scores(q, k)


def _softmax_kind(name, kind, n, mode):
    rng = _rng(name)
    if kind == "random":
        return _softmax_case(name, _random_scores(rng, 3, n), mode)
    if kind == "equal":
        return _softmax_case(name, np.full((1, 2, n, n), 12345, np.int32), mode, note="sigma = N * 2^15")
    if kind == "ties":  # multiplier 2^30, shift 31: index = round(d / 2); odd differences are ties
        scores = rng.integers(-200, 200, (1, 2, n, n)).astype(np.int32)
        return _softmax_case(name, scores, mode, _scalar(1 << 30, np.int32), _scalar(31, np.int8),
                             note="index = round(d/2), ties on odd differences")
    if kind == "saturated_index":  # huge spread: most indices clamp at 255
        return _softmax_case(name, rng.integers(-(1 << 30), 1 << 30, (1, 1, n, n)).astype(np.int32), mode)
    if kind == "extreme_scores":   # differences up to 2^31 - 1, shift 40
        s = rng.choice(np.array([-(1 << 30) + 1, 0, 1 << 30]), (1, 1, n, n)).astype(np.int32)
        return _softmax_case(name, s, mode, _scalar(1 << 30, np.int32), _scalar(40, np.int8))
    raise ValueError(kind)


def _context_case(name, heads, d, n, mode, kind="random", shift=None):
    rng = _rng(name)
    if kind == "maxacc":   # p = 127, v = -128 everywhere: acc = -N * 127 * 128
        p, v = np.full((1, heads, n, n), 127, np.int8), np.full((1, heads, d, n), -128, np.int8)
        mult, shift = _rescale(127.0 / (n * 127 * 128))
    else:
        p = K.softmax(_random_scores(rng, heads, n, d), *_softmax_rescale(d), K.make_exp_table())
        v = _i8(rng, (1, heads, d, n))
        acc = np.einsum("bhij,bhdj->bhdi", p.astype(np.int64), v.astype(np.int64))
        scale = float(_fit_scale(acc, headroom=0.5 if kind == "saturate" else 3.0))
        if shift is None:
            mult, shift = _rescale(scale)
        else:                                   # a given shift (<= 31: the value range is a real precondition)
            mult, shift = _scalar(round(scale * 2 ** shift), np.int32), _scalar(shift, np.int8)
    return _kernel_case(name, "attention_context", {"p": p, "v": v, "multiplier": mult, "shift": shift},
                        {"rounding": _MODES[mode]})


def _context_ties(name, heads, d, n, mode, shift=33):
    """v = 4 (mod 8), each query row of p holds 1 or 3 entries = 1 (mod 8), the rest 0: acc = 4 (mod 8) and
    multiplier 2^30, shift 33 make every acc/8 a rounding tie (SINGLE and DOUBLE differ on negative ones);
    shift 31: v odd, acc/2 a tie."""
    rng = _rng(name)
    step, lo = (8, 4) if shift == 33 else (2, 1)
    v = (rng.integers(-128 // step, 128 // step, (1, heads, d, n)) * step + lo).astype(np.int8)
    p = np.zeros((1, heads, n, n), np.int8)
    for h in range(heads):
        for i in range(n):
            keys = rng.choice(n, 1 + 2 * int(rng.integers(2)), replace=False)
            p[0, h, i, keys] = rng.integers(0, 16, keys.size) * 8 + 1
    return _kernel_case(name, "attention_context", {"p": p, "v": v, "multiplier": _scalar(1 << 30, np.int32),
                                                    "shift": _scalar(shift, np.int8)}, {"rounding": _MODES[mode]},
                        "every output is a rounding tie")


def _attention_specs():
    yield "attention_scores_h3_d64_n197", "attention_scores", True, _p(), lambda n: _scores_case(n, 3, 64, 197)
    yield "attention_scores_extremes_h2_d64_n8", "attention_scores", True, _p(), lambda n: _scores_case(
        n, 2, 64, 8, extremes=True)
    yield "attention_scores_h12_d64_n577", "attention_scores", False, _p(), lambda n: _scores_case(n, 12, 64, 577)
    for mode in _MODES:
        for kind in ("random", "ties", "equal", "saturated_index", "extreme_scores"):
            yield f"softmax_n197_{kind}_{mode}", "softmax", True, _p(mode), \
                lambda n, k=kind, m=mode: _softmax_kind(n, k, 197, m)
        yield f"attention_context_h3_d64_n197_{mode}", "attention_context", True, _p(mode), \
            lambda n, m=mode: _context_case(n, 3, 64, 197, m)
    yield "softmax_n1_random_single", "softmax", True, _p("single"), lambda n: _softmax_kind(n, "random", 1, "single")
    for mode in _MODES:
        yield f"softmax_n197_randomtable_{mode}", "softmax", True, _p(mode), \
            lambda n, m=mode: _softmax_random_table(n, 197, m)
        yield f"softmax_n64_shift33_randomtable_{mode}", "softmax", True, _p(mode), \
            lambda n, m=mode: _softmax_shift33(n, 64, m)
        yield f"softmax_n32_shift40_randomtable_{mode}", "softmax", True, _p(mode), lambda n, m=mode: _softmax_shift40(
            n, 32, m)
        yield f"softmax_n32_shift48_directindex_randomtable_{mode}", "softmax", True, _p(mode), lambda n, m=mode: \
            _softmax_direct(n, 32, m)
    yield "softmax_n197_randomtable_int32_single", "softmax", True, _p("single"), lambda n: _softmax_random_table(
        n, 197, "single", np.int32)
    yield "softmax_n16_recip_ties_designedtable_single", "softmax", True, _p("single"), \
        lambda n: _softmax_recip_ties(n, 16)
    yield "softmax_n65535_equal_random_single", "softmax", True, _p("single"), \
        lambda n: _softmax_longest(n, K.MAX_TOKENS)
    yield "softmax_n577_equal_single", "softmax", False, _p("single"), \
        lambda n: _softmax_kind(n, "equal", 577, "single")
    yield "softmax_n577_random_double", "softmax", False, _p("double"), \
        lambda n: _softmax_kind(n, "random", 577, "double")
    yield "attention_context_maxacc_h1_d64_n197_single", "attention_context", True, _p("single"), \
        lambda n: _context_case(n, 1, 64, 197, "single", "maxacc")
    yield "attention_context_saturate_h3_d64_n197_single", "attention_context", True, _p("single"), \
        lambda n: _context_case(n, 3, 64, 197, "single", "saturate")
    yield "attention_context_h12_d64_n577_single", "attention_context", False, _p("single"), lambda n: _context_case(
        n, 12, 64, 577, "single")
    for mode in _MODES:
        yield f"attention_context_ties_h2_d8_n16_shift33_{mode}", "attention_context", True, _p(mode), \
            lambda n, m=mode: _context_ties(n, 2, 8, 16, m)
    yield "attention_context_h3_d64_n197_shift31_single", "attention_context", True, _p("single"), \
        lambda n: _context_case(n, 3, 64, 197, "single", shift=31)
    yield "attention_context_ties_h2_d8_n16_shift31_single", "attention_context", True, _p("single"), \
        lambda n: _context_ties(n, 2, 8, 16, "single", 31)


# ---------------------------------------------------------------------------------------------
# add, gelu, layernorm, concat_tokens
# ---------------------------------------------------------------------------------------------

def _add_case(name, a, b, ma, mb, shift, note="", op="add", out_dtype="int8"):
    inputs = {"a": a, "b": b, "multiplier_a": _scalar(ma, np.int32), "multiplier_b": _scalar(mb, np.int32),
              "shift": _scalar(shift, np.int8)}
    return _kernel_case(name, op, inputs, {"out_dtype": out_dtype}, note)


def _add_kind(name, kind):
    rng = _rng(name)
    shape = (1, 192, 1, 197)
    if kind == "random":         # typical residual: ratios 0.8 and 0.6 at shift 31
        return _add_case(name, _i8(rng, shape), _i8(rng, shape), 1717986918, 1288490189, 31)
    if kind == "pos_broadcast":  # the position embedding (1, C, 1, N) broadcast over the batch
        return _add_case(name, _i8(rng, (2,) + shape[1:]), _i8(rng, shape), 1073741824, 858993459, 31)
    if kind == "ties_shift8":    # a*128 + b*256 = 128 (mod 256) for odd a: exactly half-way
        return _add_case(name, _i8(rng, shape), _i8(rng, shape), 128, 256, 8, "ties for every odd a")
    if kind == "shift2":
        return _add_case(name, _i8(rng, shape), _i8(rng, shape), 1, 3, 2)
    if kind == "shift62":        # the largest shift: |a*ma + b*mb| < 2^39 so every output rounds to 0
        return _add_case(name, _i8(rng, shape), _i8(rng, shape), INT32_MAX, 1 << 30, 62)
    if kind == "saturate":       # ratios ~2: sums far beyond int8
        return _add_case(name, _i8(rng, shape), _i8(rng, shape), 2147483000, 2147483000, 30)
    if kind == "extremes":       # every pair of {-128, -1, 0, 127}
        vals = np.array([-128, -1, 0, 127], np.int8)
        a, b = np.meshgrid(vals, vals)
        return _add_case(name, a.reshape(1, 1, 1, 16), b.reshape(1, 1, 1, 16), 1 << 30, 1 << 30, 30)
    raise ValueError(kind)


def _gelu_case(name, sweep, random_table=False):
    rng = _rng(name)
    x = np.arange(-128, 128, dtype=np.int8).reshape(1, 256, 1, 1) if sweep else _i8(rng, (1, 768, 1, 197))
    table = _i8(_rng(name, "/table"), (K.GELU_TABLE_SIZE,)) if random_table else K.make_gelu_table(0.05, 0.02)
    return _kernel_case(name, "gelu", {"x": x, "table": table}, {}, "random table" if random_table else "")


def _layernorm_case(name, c, n, mode, kind="random", x=None):
    rng = _rng(name)
    x = _ln_x(rng, kind, c, n) if x is None else x                                   # (1, C, 1, N) int8
    tail = _ln_tail_constants(rng, c)
    inputs = {"x": x, "eps_int": _scalar(K.layernorm_eps_int(1e-6, c, 0.05), np.int64)} | tail
    return _kernel_case(name, "layernorm", inputs, {"rounding": _MODES[mode]})


def _ln_tail_constants(rng, c) -> dict:
    """Random gamma, bias and a plausible per-channel rescale of the LayerNorm tail (s_g ~ 1/127, s_out 0.05)."""
    s_t = math.sqrt(c) * 2.0 ** -K.LN_T_BITS
    gamma = _i8(rng, (c,), -127)
    bias = rng.integers(-(1 << 20), 1 << 20, c).astype(np.int32)
    mult, shift = _rescale(s_t * rng.uniform(0.005, 0.02, c) / 0.05)
    return {"gamma": gamma, "bias": bias, "multiplier": mult, "shift": shift}


# Designed layernorms: an output stage that shows every t, so each internal rounding of layernorm_normalize
# is visible: gamma = +-8, bias = 4, multiplier 2^30, shift 33 give out = round(+-t + 1/2), itself a rounding
# tie in every element (SINGLE_ROUND: +-t + 1; DOUBLE_ROUND: away from zero). Needs |t| <= 126.

def _layernorm_exposed(name, x, eps_int, mode, note, shift=33, op="layernorm", eps_shift=None):
    """shift 33: gamma +-8, bias 4 (acc/8 a tie); shift 31: gamma +-2, bias 1 (acc/2 a tie, both modes agree).
    op: layernorm or a Part 4 variant (layernorm_int32 takes eps_shift too)."""
    c = x.shape[1]
    eps = {"eps_int": _scalar(eps_int, np.int64)} | ({} if eps_shift is None else
                                                     {"eps_shift": _scalar(eps_shift, np.int64)})
    t = _LN_NORMALIZE[op](x, *eps.values())
    assert int(np.abs(t).max()) <= 126, f"{name}: |t| = {int(np.abs(t).max())} would saturate"
    g = 1 << (shift - 30)
    gamma = np.where(_rng(name, "/constants").integers(0, 2, c) == 0, -g, g).astype(np.int8)
    inputs = {"x": x} | eps | {"gamma": gamma, "bias": np.full(c, g // 2, np.int32),
                               "multiplier": np.full(c, 1 << 30, np.int32), "shift": np.full(c, shift, np.int8)}
    return _kernel_case(name, op, inputs, {"rounding": _MODES[mode]}, note)


_LN_NORMALIZE = {"layernorm": K.layernorm_normalize, "layernorm_wide": KV.layernorm_wide_normalize,
                 "layernorm_int32": KV.layernorm_int32_normalize}


def _two_level(rng, c, n, ones, step=1, dtype=np.int8) -> np.ndarray:
    """Each position: a random offset o plus `step` on `ones` random channels, so d is -ones*step or
    (c - ones)*step everywhere and sum_c d^2 = ones (c - ones) c step^2 at every position."""
    lo, hi = int_range(dtype)
    x = np.zeros((1, c, 1, n), np.int64)
    for j in range(n):
        x[0, rng.permutation(c)[:ones], 0, j] = step
        x[0, :, 0, j] += rng.integers(lo, hi + 1 - step)
    return x.astype(dtype)


def _layernorm_two_level(name, c, n, ones, q_of_r, r, mode, note, step=1, op="layernorm", dtype=np.int8,
                         eps_shift=None):
    """Two-level rows (sum_c d^2 = S everywhere); eps_int = q_of_r(r) - S sets q, hence r = isqrt(q), exactly
    (layernorm_int32: with eps_shift 0 and |d| <= M_C, so that k = 0)."""
    return _layernorm_exposed(name, _two_level(_rng(name), c, n, ones, step, dtype),
                              q_of_r(r) - ones * (c - ones) * c * step * step, mode, note, op=op, eps_shift=eps_shift)


def _layernorm_domain_edge(name, c, n, eps_int, mode):
    """The largest C and eps_int: q up to 2^61 + C^3 255^2 / 4, the top of the isqrt domain. Positions:
    -128/127 alternating (largest sum d^2), one 127 among -128 (largest |d| / r), random rows."""
    x = _i8(_rng(name), (1, c, 1, n))
    x[0, :, 0, 0] = np.where(np.arange(c) % 2 == 0, -128, 127)
    x[0, :, 0, 1] = -128
    x[0, 0, 0, 1] = 127
    return _layernorm_exposed(name, x, eps_int, mode, "largest C and eps_int")


def _layernorm_big_eps(name, c, n, eps_int, mode, shift=33):
    return _layernorm_exposed(name, _i8(_rng(name), (1, c, 1, n)), eps_int, mode, "eps_int keeps |t| small", shift)


def _concat_case(name, p, c, n, b):
    rng = _rng(name)
    return _kernel_case(name, "concat_tokens", {"prefix": _i8(rng, (1, c, 1, p)), "patches": _i8(rng, (b, c, 1, n))},
                        {})


def _elementwise_specs():
    for kind in ("random", "pos_broadcast", "ties_shift8", "shift2", "shift62", "saturate", "extremes"):
        yield f"add_{kind}_c192_n197", "add", True, _p(out_dtype="int8"), lambda n, k=kind: _add_kind(n, k)
    yield "gelu_sweep_all256", "gelu", True, _p(), lambda n: _gelu_case(n, True)
    yield "gelu_c768_n197", "gelu", True, _p(), lambda n: _gelu_case(n, False)
    for mode in _MODES:
        yield f"layernorm_c192_n197_{mode}", "layernorm", True, _p(mode), \
            lambda n, m=mode: _layernorm_case(n, 192, 197, m)
        yield f"layernorm_alternating_c768_n8_{mode}", "layernorm", True, _p(mode), lambda n, m=mode: _layernorm_case(
            n, 768, 8, m, "alternating")
    for kind in ("constant_rows", "allneg128", "all127"):
        yield f"layernorm_{kind}_c192_n16_single", "layernorm", True, _p("single"), lambda n, k=kind: _layernorm_case(
            n, 192, 16, "single", k)
    yield "layernorm_c768_n577_single", "layernorm", False, _p("single"), \
        lambda n: _layernorm_case(n, 768, 577, "single")
    yield "layernorm_alternating_c4096_n2_double", "layernorm", False, _p("double"), lambda n: _layernorm_case(
        n, 4096, 2, "double", "alternating")
    yield "gelu_randomtable_sweep_all256", "gelu", True, _p(), lambda n: _gelu_case(n, True, True)
    yield "gelu_randomtable_c768_n197", "gelu", True, _p(), lambda n: _gelu_case(n, False, True)
    for mode in _MODES:
        # q = 2^34 exactly: a perfect square, r = 2^17, inv = 2^23 exact; d odd: every t = d / 2 is a tie
        yield f"layernorm_ties_r131072_c192_n16_{mode}", "layernorm", True, _p(mode), lambda n, m=mode: \
            _layernorm_two_level(n, 192, 16, 97, lambda r: r * r, 1 << 17, m, "q = r^2, every t a tie")
        yield f"layernorm_epsmax_c4096_n8_{mode}", "layernorm", True, _p(mode), \
            lambda n, m=mode: _layernorm_domain_edge(n, K.MAX_LN_CHANNELS, 8, K.MAX_LN_EPS_INT, m)
        yield f"layernorm_eps2p50_c192_n197_{mode}", "layernorm", True, _p(mode), lambda n, m=mode: _layernorm_big_eps(
            n, 192, 197, 1 << 50, m)
    yield "layernorm_eps2p50_c192_n197_shift31_single", "layernorm", True, _p("single"), lambda n: _layernorm_big_eps(
        n, 192, 197, 1 << 50, "single", 31)
    # q = r^2 - 1, isqrt = r - 1. r = 2^17: inv = 2^23 + 64, just below the ties for d < 0, above for d > 0;
    # r = 67109 (not a power of two): t(r - 1) != t(r) for d = -64
    yield "layernorm_squareminus1_r131072_c192_n16_single", "layernorm", True, _p("single"), \
        lambda n: _layernorm_two_level(
        n, 192, 16, 97, lambda r: r * r - 1, 1 << 17, "single", "q = r^2 - 1, t next to ties")
    yield "layernorm_squareminus1_r67109_c192_n16_single", "layernorm", True, _p("single"), \
        lambda n: _layernorm_two_level(
        n, 192, 16, 64, lambda r: r * r - 1, 67109, "single", "q = r^2 - 1, t(r - 1) != t(r)")
    # r = ceil(2^40 / 1026) (q > 2^53): float64 sqrt(r^2 - 1) rounds to r (float32: r + 7) but isqrt is r - 1,
    # and inv = 2^40 // (r - 1) = 1026 where r would give 1025: t moves
    yield "layernorm_squareminus1_r1071648761_c4096_n4_single", "layernorm", True, _p("single"), \
        lambda n: _layernorm_two_level(
        n, 4096, 4, 68, lambda r: r * r - 1, 1071648761, "single", "q = r^2 - 1 above 2^53", step=128)
    # sum_c d^2 = 300 * 3796 * 4096, just above 2^32: needs a 33-bit accumulator
    yield "layernorm_sumsq_above2p32_c4096_n4_single", "layernorm", True, _p("single"), lambda n: _layernorm_case(
        n, 4096, 4, "single", x=_two_level(_rng(n, "/x"), 4096, 4, 300))
    # r = 3 * 2^17: 2^40 / r = 2^23 / 3 has fraction 2/3; d = -3, 189: d * inv just inside a tie
    yield "layernorm_recip_r393216_c192_n16_single", "layernorm", True, _p("single"), lambda n: _layernorm_two_level(
        n, 192, 16, 3, lambda r: r * r + r, 3 << 17, "single", "floor(2^40 / r) vs a rounded reciprocal")
    yield "layernorm_onemax_c4096_n4_single", "layernorm", True, _p("single"), lambda n: _layernorm_case(
        n, K.MAX_LN_CHANNELS, 4, "single", "onemax")
    yield "layernorm_c1_n16_single", "layernorm", True, _p("single"), lambda n: _layernorm_case(n, 1, 16, "single")
    yield "concat_tokens_p1_c192_n196_b1", "concat_tokens", True, _p(), lambda n: _concat_case(n, 1, 192, 196, 1)
    yield "concat_tokens_p2_c48_n16_b3", "concat_tokens", True, _p(), lambda n: _concat_case(n, 2, 48, 16, 3)


# ---------------------------------------------------------------------------------------------
# block and model: a small random float DeiT, quantized by refvit
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def random_quantized_model(embed_dim: int, depth: int, num_heads: int, img_size: int, patch_size: int,
                           distilled: bool, rounding: str, scheme="refvit-int8", deit3: bool = False):
    """-> (QuantizedModel, its float calibration batch): plausible random weights, deterministic; the same float
    model and calibration for every scheme (a name of refvit.graph.SCHEMES, or a Scheme). deit3: a DeiT-III
    (layer scale, position embedding on the patches only)."""
    cfg = DeiTConfig(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                     num_heads=num_heads, num_classes=10, distilled=distilled, layer_scale=deit3,
                     no_embed_class=deit3)
    head_mode = "mean" if distilled else "cls"
    rng = _rng(f"model_{embed_dim}_{depth}_{num_heads}_{img_size}_{patch_size}_{distilled}" + ("_deit3" * deit3))
    params = random_params(cfg, head_mode, rng)
    calib = rng.standard_normal((4, 3, img_size, img_size)).astype(np.float32)
    return quantize(token_to_conv(params), cfg, [calib], head_mode=head_mode, method="max", rounding=rounding,
                    scheme=SCHEMES[scheme] if isinstance(scheme, str) else scheme), calib


def _int_constants(qm, names=None) -> dict:
    names = names if names is not None else qm.tensors
    return {k: qm.tensors[k] for k in names if np.asarray(qm.tensors[k]).dtype.kind in "iub"}   # b: pot_rows


def _model_case(name, embed_dim, depth, num_heads, img, patch, batch, mode, block_only, distilled=True,
                scheme="refvit-int8", prune=(), deit3=False):
    qm, calib = random_quantized_model(embed_dim, depth, num_heads, img, patch, distilled, _MODES[mode], scheme,
                                       deit3)
    if prune:        # token pruning: the same constants, the graph with its selections (refvit.resolve.with_prune)
        qm = qm.with_prune(prune)
    xq = int_model.quantize_input(qm, calib[:batch])
    trace = int_model.Trace()
    logits = int_model.forward_int(qm, xq, trace)
    if block_only:   # block 0 alone, in names relative to it (its graph, its constants)
        graph = block_graph(qm.graph, 0)
        consts = {c: qm.tensors[f"blocks.0.{c}" if f"blocks.0.{c}" in qm.tensors else c]
                  for c in required_constants(graph) if c not in BOUNDARY_CONSTANTS}
        x0 = next(op for op in qm.graph if op.name == "blocks.0.norm1").inputs["x"]   # embed; DeiT-III: tokens
        return Case(name, "block", {"x": trace.tensors[x0], "constants": consts},
                    {"graph": [op.to_dict() for op in graph]}, trace.tensors["blocks.0.residual2"],
                    "block 0 of a random quantized DeiT; expected from refvit's graph interpreter")
    return Case(name, "model", {"x": xq, "constants": _int_constants(qm, required_constants(qm.graph))},
                {"graph": [op.to_dict() for op in qm.graph]}, logits,
                "random quantized DeiT; expected from refvit.int_model.forward_int")


def _composite_specs():
    for mode in _MODES:
        yield f"block_c48_h3_n18_b2_{mode}", "block", True, _p(mode, scheme="refvit-int8"), \
            lambda n, m=mode: _model_case(n, 48, 1, 3, 32, 8, 2, m, True)
        yield f"model_c48_d2_h3_img32_p8_b2_{mode}", "model", True, _p(mode, scheme="refvit-int8"), \
            lambda n, m=mode: _model_case(n, 48, 2, 3, 32, 8, 2, m, False)
    yield "block_c192_h3_n198_b1_single", "block", False, _p("single", scheme="refvit-int8"), \
        lambda n: _model_case(n, 192, 1, 3, 224, 16, 1,
                                                                                 "single", True)
    yield "model_c192_d2_h3_img224_p16_b1_double", "model", False, _p("double", scheme="refvit-int8"), \
        lambda n: _model_case(n, 192, 2, 3, 224, 16, 1,
                                                                                          "double", False)
    # a plain head (cls token only, not distilled) and depth above 2
    yield "model_c48_d3_h3_img32_p8_b2_plainhead_single", "model", True, _p("single", scheme="refvit-int8"), \
        lambda n: _model_case(n, 48, 3, 3, 32, 8, 2, "single", False, distilled=False)


# ---------------------------------------------------------------------------------------------
# token pruning: select_tokens, prune_tokens (docs/spec.md, "Token pruning (HeatViT / EViT selector)")
# ---------------------------------------------------------------------------------------------

def _cls_probs(rng, kind, b, h, n_tokens, prefix, keep) -> np.ndarray:
    """int8 probabilities (B, Hh, N, N) in [0, 127]; the class token's row to the n patches by `kind`:
    random | ties (0/1 entries: scores 0..Hh, long runs of equal scores across the cut) | allzero (image 0: every
    patch 0; the others: exactly the n - keep dropped ones) | max (126/127: scores beyond int8) | pair (two
    equal lowest scores, the dropped pair for keep = n - 2)."""
    n = n_tokens - prefix
    p = _i8(rng, (b, h, n_tokens, n_tokens), 0, 127)
    if kind == "ties":
        row = rng.integers(0, 2, (b, h, n))
    elif kind == "max":
        row = rng.integers(126, 128, (b, h, n))
    else:
        row = rng.integers(2 if kind == "pair" else 1, 128, (b, h, n))
    for i in range(b):
        if kind == "allzero":
            row[i, :, rng.permutation(n)[:n if i == 0 else n - keep]] = 0
        elif kind == "pair":
            row[i, :, rng.permutation(n)[:2]] = 1
    p[:, :, 0, prefix:] = row
    return p


def _select_case(name, kind, h, n_tokens, prefix, keep, b):
    p = _cls_probs(_rng(name), kind, b, h, n_tokens, prefix, keep)
    return _kernel_case(name, "select_tokens", {"p": p}, {"keep": keep, "num_prefix": prefix}, f"cls row: {kind}")


def _prune_case(name, kind, c, h, n_tokens, prefix, keep, b, mode, dtype=np.int8):
    """x random over dtype (extremes: only its min and max), index from the reference select_tokens."""
    rng = _rng(name)
    p = _cls_probs(rng, "max" if kind == "extremes" else kind, b, h, n_tokens, prefix, keep)
    lo, hi = int_range(dtype)
    x = rng.integers(lo, hi + 1, (b, c, 1, n_tokens)).astype(dtype)
    if kind == "extremes":
        x = np.where(x < 0, lo, hi).astype(dtype)
    index = REFERENCE_KERNELS["select_tokens"](p, keep=keep, num_prefix=prefix)
    return _kernel_case(name, "prune_tokens", {"x": x, "p": p, "index": index},
                        {"num_prefix": prefix, "rounding": _MODES[mode]}, f"cls row: {kind}")


def _prune_specs():
    for kind, h, n, prefix, keep, b in (("random", 3, 66, 2, 45, 2), ("ties", 3, 34, 2, 10, 2),
                                        ("allzero", 3, 18, 1, 5, 2), ("random", 3, 66, 2, 1, 2),
                                        ("random", 3, 18, 2, 16, 2), ("max", 12, 50, 1, 20, 1)):
        yield f"select_tokens_{kind}_h{h}_n{n}_p{prefix}_k{keep}_b{b}", "select_tokens", True, \
            _p(keep=keep, num_prefix=prefix), \
            lambda nm, a=(kind, h, n, prefix, keep, b): _select_case(nm, *a)
    yield "select_tokens_random_h12_n197_p1_k138_b2", "select_tokens", False, _p(keep=138, num_prefix=1), \
        lambda nm: _select_case(nm, "random", 12, 197, 1, 138, 2)
    for mode in _MODES:
        for kind, c, h, n, prefix, keep, b in (("random", 192, 3, 66, 2, 45, 2), ("pair", 16, 3, 18, 1, 15, 2),
                                               ("ties", 48, 3, 34, 2, 10, 2), ("allzero", 16, 3, 18, 1, 5, 2),
                                               ("random", 48, 3, 66, 2, 1, 2), ("random", 48, 3, 18, 2, 16, 2),
                                               ("extremes", 16, 12, 34, 1, 3, 1)):
            yield f"prune_tokens_{kind}_c{c}_h{h}_n{n}_p{prefix}_k{keep}_b{b}_{mode}", "prune_tokens", True, \
                _p(mode, num_prefix=prefix), \
                lambda nm, a=(kind, c, h, n, prefix, keep, b), m=mode: _prune_case(nm, *a, m)
        yield f"prune_tokens_int16_c32_h3_n18_p1_k9_b2_{mode}", "prune_tokens", True, _p(mode, num_prefix=1), \
            lambda nm, m=mode: _prune_case(nm, "random", 32, 3, 18, 1, 9, 2, m, np.int16)
        # the selector inside a block and a model: DUT.block / DUT.model run the pruned graph with its methods
        yield f"block_c48_h3_n18_b2_prune0k0p5_{mode}", "block", True, _p(mode, scheme="refvit-int8"), \
            lambda nm, m=mode: _model_case(nm, 48, 1, 3, 32, 8, 2, m, True, prune=((0, 0.5),))
        yield f"model_c48_d2_h3_img32_p8_b2_prune0k0p5_1k0p7_{mode}", "model", True, _p(mode, scheme="refvit-int8"), \
            lambda nm, m=mode: _model_case(nm, 48, 2, 3, 32, 8, 2, m, False, prune=((0, 0.5), (1, 0.7)))
    yield "model_c192_d3_h3_img224_p16_b1_prune0k0p7_2k0p5_single", "model", False, \
        _p("single", scheme="refvit-int8"), \
        lambda nm: _model_case(nm, 192, 3, 3, 224, 16, 1, "single", False, prune=((0, 0.7), (2, 0.5)))


# ---------------------------------------------------------------------------------------------
# scheme variants (docs/spec.md, Part 4): constants from the offline builders of int_kernels_variants
# ---------------------------------------------------------------------------------------------

# (scale_in, scale_out) of the GELU variant cases, named in each case (`sin0.05_sout0.02`): plausible, saturating
# at the top, a wide input range (the erf clamp min(|x|, c_b), exp_shift's q <= 16 clamp), small inputs, and
# the smallest scale_in the poly builder takes (erf_shift 6)
GELU_VARIANT_SCALES = ((0.05, 0.05), (0.05, 0.02), (0.3, 0.3), (0.002, 0.001), (1e-4, 5e-5))
GELU_VARIANT_BUILDERS = {"gelu_poly": KV.gelu_poly_constants, "gelu_shift": KV.gelu_shift_constants}
SOFTMAX_VARIANTS = ("softmax_poly", "softmax_shift")
SOFTMAX_CAPS = {"softmax_poly": KV.SOFTMAX_POLY_CAP, "softmax_shift": KV.SOFTMAX_SHIFT_CAP}
LN_VARIANT_MAX_C16 = {"layernorm_int32": KV.LN32_MAX_CHANNELS,                          # largest C, int16 input
                      "layernorm_wide": KV.LN_WIDE_MAX_CHANNELS[np.dtype(np.int16)]}
ALL256 = np.arange(-128, 128, dtype=np.int8).reshape(1, 256, 1, 1)                    # every int8 value


def scales_tag(scale_in: float, scale_out: float) -> str:
    """The case-name part that records the scales a case's constants were built from."""
    return f"sin{scale_in:g}_sout{scale_out:g}"


def _const_scalars(consts: dict) -> dict:
    """A builder's integer constants as the quantizer stores them: multipliers int32, shifts int8, the rest int64."""
    def dtype(k):
        return np.int32 if k.startswith("multiplier") else np.int8 if k.startswith("shift") else np.int64
    return {k: _scalar(v, dtype(k)) for k, v in consts.items()}


def _gelu_variant_case(name, op, mode, consts, x=ALL256, note=""):
    return _kernel_case(name, op, {"x": x} | _const_scalars(consts), {"rounding": _MODES[mode]}, note)


def _gelu_variant_specs():
    for op, build in GELU_VARIANT_BUILDERS.items():
        for i, (s_in, s_out) in enumerate(GELU_VARIANT_SCALES):
            for mode in _MODES if i == 0 else ("single",):
                yield f"{op}_all256_{scales_tag(s_in, s_out)}_{mode}", op, True, _p(mode), \
                    lambda n, o=op, b=build, si=s_in, so=s_out, m=mode: _gelu_variant_case(n, o, m, b(si, so))
        yield f"{op}_b2_c96_n33_{scales_tag(0.05, 0.05)}_single", op, True, _p("single"), lambda n, o=op, b=build: \
            _gelu_variant_case(n, o, "single", b(0.05, 0.05), _i8(_rng(n), (2, 96, 1, 33)))
    # HeatViT's delta: c_1 != c_c (a DUT that mixes them up fails)
    yield f"gelu_poly_delta0.5_all256_{scales_tag(0.05, 0.05)}_single", "gelu_poly", True, _p("single"), lambda n: \
        _gelu_variant_case(n, "gelu_poly", "single", KV.gelu_poly_constants(0.05, 0.05, 0.5), note="delta = 0.5")
    for mode in _MODES:
        # designed: erf_shift 2 floors negative y, h = -7 for x <= -8 gives acc = -7|x|, a tie at /4 for
        # |x| = 2 (mod 4) (negative: the two modes differ), x >= 16 saturates
        yield f"gelu_poly_designed_cb8_cc50_c1_19_k2_shift32_{mode}", "gelu_poly", True, _p(mode), lambda n, m=mode: \
            _gelu_variant_case(n, "gelu_poly", m, {"c_b": 8, "c_c": 50, "c_1": 19, "erf_shift": 2,
                                                   "multiplier": 1 << 30, "shift": 32}, note="ties and saturation")
        # multiplier_in 0: w = 0, sig = 16383 for every x; out = x * 16383 / 2^15 lies just below a tie for odd x,
        # which DOUBLE_ROUND's first rounding (at 2^31) turns into one: the modes differ at x = 1
        yield f"gelu_shift_min0_shift45_{mode}", "gelu_shift", True, _p(mode), lambda n, m=mode: _gelu_variant_case(
            n, "gelu_shift", m, {"multiplier_in": 0, "shift_in": 20, "multiplier": 1 << 30, "shift": 45},
            note="sigmoid 1/2 everywhere; double rounding")


def _softmax_variant_case(name, op, scores, mode, mult, shift, note=""):
    inputs = {"scores": np.asarray(scores).astype(np.int32), "multiplier": _scalar(mult, np.int32),
              "shift": _scalar(shift, np.int8)}
    return _kernel_case(name, op, inputs, {"rounding": _MODES[mode]}, note)


def exp_rescale(s_qk: float, d: int = 64) -> tuple[int, int]:
    """The model's constants of a poly/shift softmax for q, k at scale s_qk and head width d."""
    return KV.softmax_exp_multiplier(s_qk * s_qk / math.sqrt(d))


def _exp_boundaries(op) -> np.ndarray:
    """The score differences d_w where the exponential's integer part changes (exp_poly: z = d // 11357;
    exp_shift: q of u = -(d + (d >> 1) - (d >> 4)) as in the spec), up to the cap."""
    cap = SOFTMAX_CAPS[op]
    if op == "softmax_poly":
        return np.arange(1, cap // KV.EXP_POLY_LN2 + 1) * KV.EXP_POLY_LN2
    v = -np.arange(cap + 1, dtype=np.int64)
    u = np.maximum(v + (v >> 1) - (v >> 4), -KV.EXP_SHIFT_MAX_Q << KV.EXP_FRAC_BITS)
    q = (-u) >> KV.EXP_FRAC_BITS
    return np.nonzero(np.diff(q))[0] + 1


def _softmax_sweep(name, op):
    """Rows [0, -d] (d_w = d: multiplier 2^30, shift 30) for every d < 4096, d within 4 of each boundary of the
    exponential's integer part, around the cap, and far beyond it (up to 2^31 - 1)."""
    cap = SOFTMAX_CAPS[op]
    near = (_exp_boundaries(op)[:, None] + np.arange(-4, 5)).ravel()
    d = np.unique(np.concatenate([np.arange(4096), near, cap + np.arange(-2, 3), [1 << 20, (1 << 29) - 1, INT32_MAX]]))
    scores = np.stack([np.zeros_like(d), -d], axis=-1).reshape(1, 1, len(d), 2)   # (1, 1, rows, 2)
    return _softmax_variant_case(name, op, scores, "single", 1 << 30, 30, "every exp boundary, cap and beyond")


def _softmax_variant_kind(name, op, kind, n, mode):
    rng = _rng(name)
    if kind.startswith("random_sqk"):                 # the model's constants for q, k at scale s_qk, D = 64
        return _softmax_variant_case(name, op, _random_scores(rng, 1, n), mode, *exp_rescale(float(kind[10:])))
    if kind == "shift33_randommult":   # rows [0, -d]: d_w = d * m / 2^33 in [d/8, d/4), where e is steepest;
        d = rng.integers(0, 80_000, n)   # DOUBLE_ROUND's two roundings move d_w by one in 1/8 of the rows
        scores = np.stack([np.zeros_like(d), -d], axis=-1).reshape(1, 1, n, 2)
        return _softmax_variant_case(name, op, scores, mode, int(rng.integers(1 << 30, 1 << 31)), 33,
                                     "two roundings in DOUBLE_ROUND")
    if kind == "equal":
        return _softmax_variant_case(name, op, np.full((1, 1, n, n), 12345), mode, *exp_rescale(0.01),
                                     "sigma = N * exp(0)")
    if kind == "spread":                              # one equal row (largest sigma) and a row mostly past the floor
        scores = np.stack([np.full(n, 777), rng.integers(-(1 << 20), 1 << 20, n)]).reshape(1, 1, 2, n)
        return _softmax_variant_case(name, op, scores, mode, *exp_rescale(0.01), "largest N")
    if kind == "ties_shift31":                        # d_w = round(d / 2): odd d are ties
        return _softmax_variant_case(name, op, rng.integers(-200_000, 1, (1, 2, n, n)), mode, 1 << 30, 31)
    if kind == "dcap_shift20":                        # d_w = d * 2^10: the d_cap clamp (2^19 - 1) and the cap
        s = rng.choice(np.array([-(1 << 30) + 1, -300, 0, 1 << 30]), (1, 1, n, n))
        return _softmax_variant_case(name, op, s, mode, 1 << 30, 20, "differences up to 2^31 - 1, clamped")
    if kind == "shift2":                              # d_cap = 1: every d >= 1 saturates at the cap
        return _softmax_variant_case(name, op, _random_scores(rng, 1, n), mode, INT32_MAX, 2)
    if kind == "shift62":                             # d_w = 0 for every d < 2^31: uniform rows
        return _softmax_variant_case(name, op, _random_scores(rng, 1, n), mode, INT32_MAX, 62)
    raise ValueError(kind)


def _softmax_family(op, sweep):
    """The cases of one softmax variant kernel (Part 4 and the authors' code): random and designed rows in both
    roundings, every kind at N up to the longest row, and its own sweep (`sweep(name)`: every exp boundary)."""
    for mode in _MODES:
        yield f"{op}_n197_random_sqk0.01_{mode}", op, True, _p(mode), \
            lambda nm, m=mode: _softmax_variant_kind(nm, op, "random_sqk0.01", 197, m)
        yield f"{op}_rows16384_n2_shift33_randommult_{mode}", op, True, _p(mode), lambda nm, m=mode: \
            _softmax_variant_kind(nm, op, "shift33_randommult", 16384, m)
    for kind, n in (("random_sqk0.03", 64), ("equal", 64), ("random_sqk0.01", 1), ("ties_shift31", 64),
                    ("dcap_shift20", 64), ("shift2", 16), ("shift62", 16), ("spread", K.MAX_TOKENS)):
        yield f"{op}_n{n}_{kind}_single", op, True, _p("single"), lambda nm, k=kind, n=n: \
            _softmax_variant_kind(nm, op, k, n, "single")
    yield f"{op}_sweep_n2_shift30_single", op, True, _p("single"), sweep
    yield f"{op}_n577_random_sqk0.01_double", op, False, _p("double"), lambda nm: _softmax_variant_kind(
        nm, op, "random_sqk0.01", 577, "double")


def _softmax_variant_specs():
    for op in SOFTMAX_VARIANTS:
        yield from _softmax_family(op, lambda nm, o=op: _softmax_sweep(nm, o))


def _ln_x(rng, kind, c, n, dtype=np.int8) -> np.ndarray:
    """LayerNorm input rows (1, C, 1, N) of `dtype` (int8 or int16)."""
    lo, hi = int_range(dtype)
    shape = (1, c, 1, n)
    if kind == "random":
        return rng.integers(lo, hi + 1, size=shape, dtype=dtype)
    if kind == "residual":         # a residual stream: Gaussian, std hi / 10, four outlier channels 6x
        return _gaussian(rng, shape, hi / 10, dtype, outlier_channels=4)
    if kind == "constant_rows":    # every position constant over channels: d = 0, only eps counts
        return np.broadcast_to(rng.integers(lo, hi + 1, size=(1, 1, 1, n), dtype=dtype), shape).copy()
    if kind in ("allneg128", "all127"):
        return np.full(shape, lo if kind == "allneg128" else hi, dtype)
    if kind == "alternating":      # lo / hi alternating over channels: the largest variance and sum d^2
        return np.broadcast_to(np.where(np.arange(c) % 2 == 0, lo, hi)[None, :, None, None], shape).astype(dtype)
    if kind == "onemax":           # one hi among lo: |t| at its bound 2^16 sqrt((C-1)/C)
        x = np.full(shape, lo, dtype)
        x[0, np.arange(n) % c, 0, np.arange(n)] = hi
        return x
    raise ValueError(kind)


def _gaussian(rng, shape, std, dtype, outlier_channels=0) -> np.ndarray:
    """Gaussian integers of `dtype` (rounded half away from zero, clipped), a few channels (axis 1) 6x wider."""
    x = rng.standard_normal(shape) * std
    if outlier_channels:
        x[:, rng.choice(shape[1], min(outlier_channels, shape[1]), replace=False)] *= 6
    lo, hi = int_range(dtype)
    return np.clip(round_half_away_from_zero(x), lo, hi).astype(dtype)


def _ln_eps(op, eps, c, s_x) -> dict:
    if op == "layernorm_int32":
        eps_int, eps_shift = KV.layernorm_int32_eps(eps, c, s_x)
        return {"eps_int": _scalar(eps_int, np.int64), "eps_shift": _scalar(eps_shift, np.int64)}
    return {"eps_int": _scalar(K.layernorm_eps_int(eps, c, s_x), np.int64)}


def _ln_variant_case(name, op, kind, c, n, dtype, mode, eps=1e-6, s_x=None):
    """x of `kind`; eps constants by the variant's builder (s_x 0.05 for int8, 0.05/256 for int16); a random tail."""
    x = _ln_x(_rng(name), kind, c, n, dtype)
    s_x = s_x or (0.05 if dtype == np.int8 else 0.05 / 256)
    inputs = {"x": x} | _ln_eps(op, eps, c, s_x) | _ln_tail_constants(_rng(name, "/constants"), c)
    return _kernel_case(name, op, inputs, {"rounding": _MODES[mode]})


def _ln32_preshift_ties(name, c, n, mode):
    """x in [-2, 2] with sum_c x = 8 (mod 16) per position, eps_shift 4 (k = 4 everywhere, |d| < M_C): every
    d = C x - sum x is 8 (mod 16), so every pre-shift d_s = rounding_shift_right(d, 4) is a tie; eps_int 2^29 - 1
    keeps |t| small, and the exposed output stage shows every t."""
    rng = _rng(name)
    x = rng.integers(-2, 3, (1, c, 1, n))
    for j in range(n):
        need = (8 - int(x[0, :, 0, j].sum())) % 16
        up = need <= 8
        cand = np.nonzero(x[0, :, 0, j] < 2 if up else x[0, :, 0, j] > -2)[0]
        x[0, rng.choice(cand, need if up else 16 - need, replace=False), 0, j] += 1 if up else -1
    assert np.all(x.sum(axis=1) % 16 == 8) and np.abs(x).max() <= 2
    return _layernorm_exposed(name, x.astype(np.int8), (1 << 29) - 1, mode, "pre-shift ties", op="layernorm_int32",
                              eps_shift=4)


def _layernorm_variant_specs():
    for op in ("layernorm_int32", "layernorm_wide"):
        cmax = LN_VARIANT_MAX_C16[op]
        for mode in _MODES:
            yield f"{op}_int8_c192_n64_{mode}", op, True, _p(mode), lambda nm, o=op, m=mode: _ln_variant_case(
                nm, o, "random", 192, 64, np.int8, m)
            yield f"{op}_int16_residual_c768_n32_{mode}", op, True, _p(mode), lambda nm, o=op, m=mode: _ln_variant_case(
                nm, o, "residual", 768, 32, np.int16, m)
        for kind, c, n in (("alternating", cmax, 4), ("onemax", cmax, 4), ("constant_rows", 768, 16),
                           ("random", 1, 16)):
            yield f"{op}_int16_{kind}_c{c}_n{n}_single", op, True, _p("single"), lambda nm, o=op, k=kind, c=c, n=n: \
                _ln_variant_case(nm, o, k, c, n, np.int16, "single")
        yield f"{op}_int8_alternating_c4096_n2_single", op, True, _p("single"), lambda nm, o=op: _ln_variant_case(
            nm, o, "alternating", 4096, 2, np.int8, "single")
        # eps 1e-3 at s_x 2e-4: int32 eps_shift 8 (eps_s matters where k > 8), wide eps_int ~ 1.1e13
        yield f"{op}_int16_eps1e-3_sx2e-4_c768_n32_single", op, True, _p("single"), lambda nm, o=op: _ln_variant_case(
            nm, o, "residual", 768, 32, np.int16, "single", eps=1e-3, s_x=2e-4)
        yield f"{op}_int16_residual_c768_n577_double", op, False, _p("double"), lambda nm, o=op: _ln_variant_case(
            nm, o, "residual", 768, 577, np.int16, "double")
    for mode in _MODES:
        yield f"layernorm_int32_preshift_ties_c192_n16_{mode}", "layernorm_int32", True, _p(mode), lambda nm, m=mode: \
            _ln32_preshift_ties(nm, 192, 16, m)
        # int16 two-level rows, step 256: d = 95 * 256 or -97 * 256, q = 2^50 = (2^25)^2, every t = d 2^16 / r a tie
        yield f"layernorm_wide_int16_ties_r33554432_c192_n16_step256_{mode}", "layernorm_wide", True, _p(mode), \
            lambda nm, m=mode: _layernorm_two_level(nm, 192, 16, 97, lambda r: r * r, 1 << 25, m, "q = r^2, t ties",
                                                    step=256, op="layernorm_wide", dtype=np.int16)
    # isqrt32 at q = r^2 and r^2 - 1 above 2^28 (k = 0): t(r - 1) != t(r) for both levels of d
    for tag, q_of_r in (("square", lambda r: r * r), ("squareminus1", lambda r: r * r - 1)):
        yield f"layernorm_int32_{tag}_r23046_c32_n16_single", "layernorm_int32", True, _p("single"), \
            lambda nm, f=q_of_r: \
            _layernorm_two_level(nm, 32, 16, 16, f, 23046, "single", "isqrt32 at its boundary",
                                 op="layernorm_int32", eps_shift=0)


def _add_wide_kind(name, kind):
    rng = _rng(name)
    shape = (1, 192, 1, 64)

    def i16(shp, std=None):   # int16 stream values: uniform, or Gaussian with the given std
        if std is None:
            return rng.integers(-32768, 32768, shp).astype(np.int16)
        return _gaussian(rng, shp, std, np.int16)

    def case(a, b, ma, mb, s, out="int16", note=""):
        return _add_case(name, a, b, ma, mb, s, note, op="add_wide", out_dtype=out)
    if kind == "residual_i16i8":     # the int16 residual add: stream + int8 branch -> stream
        return case(i16(shape, 6000), _i8(rng, shape), *quantize_add_multipliers(2e-4, 0.05, 2.2e-4))
    if kind == "pos_i8i8_b2":        # tokens + position embedding (broadcast) -> int16 stream
        return case(_i8(rng, (2,) + shape[1:]), _i8(rng, shape), *quantize_add_multipliers(0.05, 0.02, 2e-4))
    if kind == "i16i16":
        return case(i16(shape), i16(shape), *quantize_add_multipliers(2e-4, 3e-4, 4e-4))
    if kind == "saturate":           # ratios ~2: far beyond int16
        return case(i16(shape), i16(shape), 2147483000, 2147483000, 30)
    if kind == "ties_shift8":        # a*128 + b*256 = 128 (mod 256) for odd a
        return case(i16(shape), _i8(rng, shape), 128, 256, 8, note="ties for every odd a")
    if kind == "shift0":             # no rounding: a + 2b, saturated
        return case(i16(shape), i16(shape), 1, 2, 0)
    if kind == "shift62":            # |acc| < 2^47: every output rounds to 0
        return case(i16(shape), i16(shape), INT32_MAX, 1 << 30, 62)
    if kind == "out_int8":           # an int16 stream read back into int8
        return case(i16(shape, 6000), _i8(rng, shape), *quantize_add_multipliers(2e-4, 0.05, 0.05), out="int8")
    if kind == "i8i8_out_int8":      # exactly part 2's add
        return case(_i8(rng, shape), _i8(rng, shape), 1717986918, 1288490189, 31, out="int8")
    if kind in ("extremes_i16i8", "extremes_i16i16"):   # every pair of extremes; shift 31 / 32: half / quarter sums
        va = np.array([-32768, -32767, -1, 0, 1, 32767], np.int16)
        vb = np.array([-128, -1, 0, 127], np.int8) if kind == "extremes_i16i8" else va
        a, b = np.meshgrid(va, vb)
        s = 31 if kind == "extremes_i16i8" else 32
        return case(a.reshape(1, 1, 1, -1), b.reshape(1, 1, 1, -1), INT32_MAX, INT32_MAX, s)
    raise ValueError(kind)


ADD_WIDE_INT8_OUT = ("out_int8", "i8i8_out_int8")   # the add_wide kinds whose output is int8 (the rest: int16)


def _add_wide_specs():
    for kind in ("residual_i16i8", "pos_i8i8_b2", "i16i16", "saturate", "ties_shift8", "shift0", "shift62",
                 "out_int8", "i8i8_out_int8", "extremes_i16i8", "extremes_i16i16"):
        size = {"extremes_i16i8": "n24", "extremes_i16i16": "n36"}.get(kind, "c192_n64")
        yield f"add_wide_{kind}_{size}", "add_wide", True, \
            _p(out_dtype="int8" if kind in ADD_WIDE_INT8_OUT else "int16"), \
            lambda nm, k=kind: _add_wide_kind(nm, k)


CONV_VARIANTS = {"conv2d_w4": "w4", "conv2d_mixed_pot": "mixedpot_frac0.5"}   # op -> name tag


def _variant_weights(rng, op, shape, fraction=0.5) -> tuple[np.ndarray, dict]:
    """Codes (and pot_rows) of plausible float weights (Gaussian rows of varied scale) by the variant's builder."""
    w = rng.standard_normal(shape) * rng.uniform(0.02, 0.2, (shape[0],) + (1,) * (len(shape) - 1))
    if op == "conv2d_w4":
        return KV.per_channel_weight_w4(w)[0], {}
    codes, _, pot_rows = KV.per_channel_weight_mixed_pot(w, fraction)
    return codes, {"pot_rows": pot_rows}


def _conv_variant(name, op, x_shape, cout, k, mode, fill=None, out_dtype="int8", fraction=0.5, saturate=False):
    """A conv of the variant on random (or constant) x; saturate: no bias, ~90 % of the outputs saturate."""
    rng = _rng(name)
    x = np.full(x_shape, fill, np.int8) if fill is not None else _i8(rng, x_shape)
    w, extra = _variant_weights(rng, op, (cout, x_shape[1], k, k), fraction)
    if not saturate:
        return _conv_case(name, x, w, mode=mode, out_dtype=out_dtype, op=op, extra=extra)
    bias = np.zeros(cout, np.int32)
    mult, shift = _rescale(_fit_scale(K.conv2d_accumulate(x, w, bias), axis=(0, 2, 3), headroom=0.25))
    return _conv_case(name, x, w, bias, mode, mult=mult, shift=shift, op=op, extra=extra)


def _alternate_rows(cout) -> dict:
    return {"pot_rows": np.arange(cout) % 2 == 0}


def _conv_variant_specs():
    for op, tag in CONV_VARIANTS.items():
        pot = op == "conv2d_mixed_pot"
        for mode in _MODES:
            yield f"conv_{tag}_1x1_cin192_cout576_n32_{mode}", op, True, _p(mode, out_dtype="int8"), \
                lambda nm, o=op, m=mode: _conv_variant(nm, o, (1, 192, 1, 32), 576, 1, m)
            yield f"conv_{tag}_patch_k4_cin3_cout48_img32_{mode}", op, True, _p(mode, out_dtype="int8"), \
                lambda nm, o=op, m=mode: \
                _conv_variant(nm, o, (1, 3, 32, 32), 48, 4, m)
            yield f"conv_{tag}_1x1_ties_cin1_cout4_n64_shift33_{mode}", op, True, _p(mode, out_dtype="int8"), \
                lambda nm, o=op, m=mode, p=pot: \
                _conv_ties(nm, m, op=o, extra=_alternate_rows(4) if p else None)
            # w4: +-7 with the w4 headroom reaches +-(2^31 - 1); mixed-pot: PoT rows +-64, int8 rows +-127
            yield f"conv_{tag}_1x1_maxacc_cin3072_cout8_n4_{mode}", op, True, _p(mode, out_dtype="int8"), \
                lambda nm, o=op, m=mode, p=pot: \
                _conv_maxacc(nm, 3072, 8, m, np.where(np.arange(8) % 2 == 0, 64, 127) if p else KV.W4_MAX,
                             K.SYM_PRODUCT_MAX if p else KV.W4_PRODUCT_MAX, o, _alternate_rows(8) if p else None)
        yield f"conv_{tag}_1x1_saturate_cin64_cout32_n16_single", op, True, _p("single", out_dtype="int8"), \
            lambda nm, o=op: _conv_variant(nm, o, (1, 64, 1, 16), 32, 1, "single", saturate=True)
        for fill, ftag in ((-128, "allneg128"), (127, "all127")):
            yield f"conv_{tag}_1x1_{ftag}_cin192_cout64_n16_single", op, True, _p("single", out_dtype="int8"), \
                lambda nm, o=op, f=fill: \
                _conv_variant(nm, o, (1, 192, 1, 16), 64, 1, "single", fill=f)
        yield f"conv_{tag}_1x1_head_int16_cin384_cout10_n1_b4_single", op, True, _p("single", out_dtype="int16"), \
            lambda nm, o=op: _conv_variant(nm, o, (4, 384, 1, 1), 10, 1, "single", out_dtype="int16")
        yield f"conv_{tag}_1x1_cin768_cout3072_n197_single", op, False, _p("single", out_dtype="int8"), \
            lambda nm, o=op: _conv_variant(nm, o, (1, 768, 1, 197), 3072, 1, "single")
    for frac in (0, 1):
        yield f"conv_mixedpot_frac{frac}_1x1_cin64_cout32_n16_single", "conv2d_mixed_pot", True, \
            _p("single", out_dtype="int8"), \
            lambda nm, f=frac: \
            _conv_variant(nm, "conv2d_mixed_pot", (1, 64, 1, 16), 32, 1, "single", fraction=f)
    # the largest Cin*k*k of conv2d_w4 (2^20): acc = +-(2^31 - 1) with weights +-7
    yield "conv_w4_1x1_maxacc_cin1048576_cout2_n1_single", "conv2d_w4", False, _p("single", out_dtype="int8"), \
        lambda nm: _conv_maxacc(nm, 1 << 20, 2, "single", KV.W4_MAX, KV.W4_PRODUCT_MAX, "conv2d_w4", n=1)


SCHEME_MODEL_CASES = tuple(s for s in SCHEMES if s != "refvit-int8")   # the default has its own cases above


def _deit3_specs():
    """DeiT-III (docs/spec.md, "DeiT-III"): layer scale folded into attn.proj and mlp.fc2, the position
    embedding added to the patches before the class token (the graph's `embed` before `tokens`)."""
    yield "block_deit3_c48_h3_n17_b2_single", "block", True, _p("single", scheme="refvit-int8"), \
        lambda n: _model_case(n, 48, 1, 3, 32, 8, 2, "single", True, distilled=False, deit3=True)
    for mode in _MODES:
        yield f"model_deit3_c48_d2_h3_img32_p8_b2_{mode}", "model", True, _p(mode, scheme="refvit-int8"), \
            lambda n, m=mode: _model_case(n, 48, 2, 3, 32, 8, 2, m, False, distilled=False, deit3=True)


def _scheme_model_specs():
    for scheme in SCHEME_MODEL_CASES:
        yield f"block_{scheme}_c48_h3_n18_b2_single", "block", True, _p("single", scheme=scheme), \
            lambda n, s=scheme: _model_case(n, 48, 1, 3, 32, 8, 2, "single", True, scheme=s)
        for mode in _MODES:
            yield f"model_{scheme}_c48_d2_h3_img32_p8_b2_{mode}", "model", True, _p(mode, scheme=scheme), \
                lambda n, s=scheme, m=mode: \
                _model_case(n, 48, 2, 3, 32, 8, 2, m, False, scheme=s)


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------

def _registry_specs():
    """The cases of op registry rows that bring their own (`OpVariant.cases`: a variant registered outside
    refvit): (name, inputs, params, note, quick) each, expected outputs from the row's kernel."""
    for row in registry.rows():
        for name, inputs, params, note, quick in (row.cases() if row.cases else ()):
            yield name, row.kernel_name, quick, dict(params), functools.partial(
                _kernel_case, op=row.kernel_name, inputs=inputs, params=params, note=note)


def all_specs() -> tuple:
    """Every case spec (cached; rows registered or removed later make a new list)."""
    return _all_specs(registry.generation())


@functools.lru_cache(maxsize=4)
def _all_specs(generation: int) -> tuple:
    specs = []
    for family in (_scale_specs, _conv_specs, _attention_specs, _elementwise_specs, _composite_specs,
                   _gelu_variant_specs, _softmax_variant_specs, _layernorm_variant_specs, _add_wide_specs,
                   _conv_variant_specs, _scheme_model_specs, _deit3_specs, _prune_specs, _authors_code_specs,
                   _registry_specs, _scheme_param_specs, _a16_specs):
        for name, op, quick, params, builder in family():
            specs.append(CaseSpec(name, op, quick, functools.partial(builder, name), params.get("rounding"),
                                  MappingProxyType(params)))
    names = [s.name for s in specs]
    assert len(set(names)) == len(names), "duplicate case names"
    return tuple(specs)


# ---------------------------------------------------------------------------------------------
# scheme parameters (issue 19; docs/spec.md Part 6): conv2d_pot, per-tensor weights, narrow accumulators
# ---------------------------------------------------------------------------------------------

PARAM_SCHEMES = {  # model cases of unnamed parameter schemes (tag: fields)
    "pertensor": {"weights": "per-tensor"},
    "accsat16": {"acc_bits": 16, "acc_overflow": "saturate"},
    "accwrap16": {"acc_bits": 16, "acc_overflow": "wrap"},
    "exp64b2-gelu64": {"exp_table_size": 64, "exp_index_bits": 2, "gelu_table_size": 64},
}
ACC_MODES = {"sat": "saturate", "wrap": "wrap"}


def _pot_case(name, x, w, bias, shift, mode, out_dtype="int8", note=""):
    inputs = {"x": x, "weight": w, "bias": np.asarray(bias, np.int32), "shift": np.asarray(shift, np.int8)}
    return _kernel_case(name, "conv2d_pot", inputs, {"rounding": _MODES[mode], "out_dtype": out_dtype}, note)


def _pot_fit_shift(acc, out_dtype="int8") -> np.ndarray:
    """Per channel the shift that puts 3 standard deviations of acc (a constant acc: half of it) near the output's
    largest code."""
    std = np.std(acc.astype(np.float64), axis=(0, 2, 3))
    spread = np.where(std > 0, 3 * std, np.abs(acc.astype(np.float64)).max(axis=(0, 2, 3)) / 2)
    scale = 127.0 / np.maximum(spread, 1.0) * (256 if out_dtype == "int16" else 1)
    return np.clip(-np.floor(np.log2(scale)), -31, 31).astype(np.int8)


def _pot_random(name, x_shape, cout, k, mode, fill=None, out_dtype="int8"):
    rng = _rng(name)
    x = np.full(x_shape, fill, np.int8) if fill is not None else _i8(rng, x_shape)
    w = _i8(rng, (cout, x_shape[1], k, k), -127)
    bias = rng.integers(-(1 << 16), 1 << 16, cout).astype(np.int32)
    return _pot_case(name, x, w, bias, _pot_fit_shift(K.conv2d_accumulate(x, w, bias), out_dtype), mode, out_dtype)


def _pot_residues(name, mode, residue):
    """Cin = 1, weight +-1, bias `residue`, x in 8Z, shift 3: acc = +-residue (mod 8). residue 4: every output a
    tie; 3 and 5: next to a tie, where a multiply-then-shift requantizer that rounds twice (DOUBLE_ROUND with
    multiplier 2^30, shift 33) is off by one."""
    rng = _rng(name)
    x = (rng.integers(-16, 16, (1, 1, 1, 64)) * 8).astype(np.int8)
    w = np.array([1, -1, 1, -1], np.int8).reshape(4, 1, 1, 1)
    return _pot_case(name, x, w, np.array([residue, residue, -residue, -residue]), np.full(4, 3), mode,
                     note=f"acc = +-{residue} mod 8 at shift 3")


def _pot_maxacc(name, mode):
    """acc = +-(2^31 - 1) (x = -128, weights +-127, bias the headroom) at shifts 31, 24, 16, 0, -1 ... (saturating)."""
    cin, cout = 3072, 8
    x = np.full((1, cin, 1, 4), -128, np.int8)
    sign = np.where(np.arange(cout) % 2 == 0, -1, 1)
    w = (sign * 127).astype(np.int8)[:, None, None, None] * np.ones((1, cin, 1, 1), np.int8)
    bias = (-sign * (INT32_MAX - cin * K.SYM_PRODUCT_MAX)).astype(np.int32)
    return _pot_case(name, x, w, bias, np.array([31, 30, 24, 16, 8, 0, -1, -31]), mode, note="acc = +-(2^31 - 1)")


def _pot_left(name, mode):
    """Negative shifts (an exact left shift) into int16 logits: small acc, shifts -1 ... -8, some saturating."""
    rng = _rng(name)
    x, w = _i8(rng, (4, 16, 1, 1), -8, 8), _i8(rng, (8, 16, 1, 1), -16, 16)
    return _pot_case(name, x, w, rng.integers(-64, 65, 8), -np.arange(1, 9), mode, "int16",
                     note="shift < 0: out = acc * 2^-shift, exact, saturated to int16")


def _pot_saturate(name, mode):
    rng = _rng(name)
    x, w = _i8(rng, (1, 64, 1, 16)), _i8(rng, (32, 64, 1, 1), -127)
    acc = K.conv2d_accumulate(x, w, np.zeros(32, np.int32))
    return _pot_case(name, x, w, np.zeros(32), _pot_fit_shift(acc) - 4, mode, note="~90 % of outputs saturate")


def _narrow_conv(name, bits, overflow, mode, kind):
    """conv2d_narrow at acc_bits `bits`: `random` (full-range x and w, Cin 192: many sums beyond 2^15; the rescale
    fitted to the exact sums) or `edge` (Cin 1, weight 1, bias 2^(bits-1) -+ 4, x in [-8, 8]: every accumulator
    from -2^(bits-1) - 4 to 2^(bits-1) + 3 shown exactly, int32 out at scale 1)."""
    rng = _rng(name)
    attrs = {"acc_bits": bits, "acc_overflow": overflow, "rounding": _MODES[mode]}
    if kind == "random":   # bits 16: Cin 192, full-range x and w; bits 24: Cin 3072, x >= 0, row o's |w| up to
        if bits < 20:      # 20 ... 127 with alternating sign: sums from ~2^21 to ~1.5 * 2^23
            x, w = _i8(rng, (1, 192, 1, 16)), _i8(rng, (16, 192, 1, 1), -127)
        else:
            x = _i8(rng, (1, 3072, 1, 16), 0)
            top = np.linspace(20, 127, 16).astype(np.int64).reshape(16, 1, 1, 1)
            w = (rng.integers(0, 1 << 20, (16, 3072, 1, 1)) % (top + 1) * np.where(np.arange(16) % 2, -1, 1)
                 .reshape(16, 1, 1, 1)).astype(np.int8)
        bias = rng.integers(-(1 << 12), 1 << 12, 16).astype(np.int32)
        mult, shift = _rescale(np.full(16, 127.0 / (1 << (bits - 1))))            # 2^(bits-1) -> 127
        out = "int8"
    else:
        x = np.arange(-8, 9, dtype=np.int8).reshape(1, 1, 1, 17)
        w = np.ones((2, 1, 1, 1), np.int8)
        half = 1 << (bits - 1)
        bias = np.array([half - 4, -half + 4], np.int32)
        mult, shift = np.full(2, 1 << 30, np.int32), np.full(2, 30, np.int8)
        out = "int32"
    inputs = {"x": x, "weight": w, "bias": bias, "multiplier": mult, "shift": shift}
    return _kernel_case(name, "conv2d_narrow", inputs, attrs | {"out_dtype": out},
                        f"acc_bits {bits}, {overflow}")


def _narrow_scores(name, bits, overflow):
    rng = _rng(name)
    q, k = _i8(rng, (1, 2, 64, 12)), _i8(rng, (1, 2, 64, 12))
    q[0, 0], k[0, 0] = -128, -128                                                  # head 0: +64 * 2^14 = 2^20
    k[0, 0, :, ::2] = 127                                                          # and -64 * 128 * 127
    return _kernel_case(name, "attention_scores_narrow", {"q": q, "k": k},
                        {"acc_bits": bits, "acc_overflow": overflow}, f"acc_bits {bits}, {overflow}")


def _narrow_context(name, bits, overflow, mode):
    rng = _rng(name)
    p = rng.integers(0, 128, (1, 2, 197, 197)).astype(np.int8)                     # sums far beyond 2^15
    v = _i8(rng, (1, 2, 16, 197))
    v[0, 1] = np.where(np.arange(197) % 2 == 0, 127, -128).astype(np.int8)
    exact = np.einsum("bhij,bhdj->bhdi", p.astype(np.int64), v.astype(np.int64))
    mult, shift = _rescale(float(_fit_scale(exact)))
    return _kernel_case(name, "attention_context_narrow", {"p": p, "v": v, "multiplier": mult, "shift": shift},
                        {"acc_bits": bits, "acc_overflow": overflow, "rounding": _MODES[mode]},
                        f"acc_bits {bits}, {overflow}")


def _narrow_specs():
    for tag, overflow in ACC_MODES.items():
        for bits in (16, 24):
            for mode in _MODES:
                yield f"conv_narrow_{tag}{bits}_1x1_random_cout16_n16_{mode}", "conv2d_narrow", True, \
                    _p(mode, acc_bits=bits, acc_overflow=overflow, out_dtype="int8"), \
                    lambda nm, b=bits, o=overflow, m=mode: _narrow_conv(nm, b, o, m, "random")
            yield f"conv_narrow_{tag}{bits}_1x1_edge_cin1_cout2_n17_single", "conv2d_narrow", True, \
                _p("single", acc_bits=bits, acc_overflow=overflow, out_dtype="int32"), \
                lambda nm, b=bits, o=overflow: _narrow_conv(nm, b, o, "single", "edge")
        for bits in (16, 20):
            yield f"scores_narrow_{tag}{bits}_h2_d64_n12", "attention_scores_narrow", True, \
                _p(acc_bits=bits, acc_overflow=overflow), lambda nm, b=bits, o=overflow: _narrow_scores(nm, b, o)
        for mode in _MODES:
            yield f"context_narrow_{tag}16_h2_d16_n197_{mode}", "attention_context_narrow", True, \
                _p(mode, acc_bits=16, acc_overflow=overflow), \
                lambda nm, o=overflow, m=mode: _narrow_context(nm, 16, o, m)


EXP_TABLE_N = ((64, 2), (64, 4), (1024, 6), (4096, 8))      # (entries, index bits) of the softmax_table_n cases
GELU_TABLE_N = (16, 64, 128)


def _softmax_tablen(name, size, bits, mode, kind):
    """softmax_table_n. random: attention scores of random heads, the rescale spreading their differences over
    the table; cap: the rescale of one real unit at 2^bits index units (s_qk 0.05, D 64) with spreads up to 2^30
    (most indices clamp at L - 1); ties: multiplier 2^30, shift 33 (index = round(d / 8): d = 4 mod 8 are ties,
    d = 3 mod 8 next to them, where DOUBLE_ROUND rounds twice); table: a random valid table."""
    rng = _rng(name)
    table = KV.make_exp_table_n(size, bits)
    mult, shift = _rescale(0.05 / 8 * 2 ** bits)
    if kind == "random":   # the rescale spreads the differences over the whole table
        scores = _random_scores(rng, 3, 24)
        mult, shift = _rescale(size / (4.0 * float(np.std(scores.astype(np.float64)))))
    elif kind == "ties":
        scores = rng.integers(-4 * size, 4 * size, (1, 2, 24, 24)).astype(np.int32)
        mult, shift = _scalar(1 << 30, np.int32), _scalar(33, np.int8)
    elif kind == "cap":
        scores = rng.integers(-(1 << 30), 1 << 30, (1, 1, 24, 24)).astype(np.int32)
    elif kind == "equal":   # every key equal: sigma = N * 2^15
        scores = np.full((1, 2, 24, 24), 12345, np.int32)
    elif kind == "extreme":   # differences up to 2^31 - 1 at shift 40 (beyond apply_scale's int32 domain: capped)
        scores = rng.choice(np.array([-(1 << 30) + 1, 0, 1 << 30]), (1, 1, 24, 24)).astype(np.int32)
        mult, shift = _scalar(1 << 30, np.int32), _scalar(40, np.int8)
    else:
        table = rng.integers(0, K.EXP_ONE + 1, size).astype(np.uint16)
        table[0] = K.EXP_ONE
        scores = _random_scores(rng, 2, 24)
        mult, shift = _rescale(size / (4.0 * float(np.std(scores.astype(np.float64)))))
    inputs = {"scores": scores.astype(np.int32), "multiplier": mult, "shift": shift, "exp_table": table}
    return _kernel_case(name, "softmax_table_n", inputs, {"rounding": _MODES[mode]}, f"{size} entries, 2^-{bits}")


def _table_size_specs():
    for size, bits in EXP_TABLE_N:
        for kind in ("random", "ties", "cap"):
            for mode in _MODES:
                yield f"softmax_tablen_L{size}_b{bits}_{kind}_n24_{mode}", "softmax_table_n", True, _p(mode), \
                    lambda nm, L=size, b=bits, k=kind, m=mode: _softmax_tablen(nm, L, b, m, k)
    yield "softmax_tablen_L512_b5_randomtable_n24_single", "softmax_table_n", True, _p("single"), \
        lambda nm: _softmax_tablen(nm, 512, 5, "single", "table")
    for kind in ("equal", "extreme"):
        for mode in _MODES:
            yield f"softmax_tablen_L128_b3_{kind}_n24_{mode}", "softmax_table_n", True, _p(mode), \
                lambda nm, k=kind, m=mode: _softmax_tablen(nm, 128, 3, m, k)
    for size in GELU_TABLE_N:
        for s_in, s_out in GELU_VARIANT_SCALES[:3]:
            yield f"gelu_tablen_L{size}_all256_{scales_tag(s_in, s_out)}", "gelu_table_n", True, {}, \
                lambda nm, L=size, si=s_in, so=s_out: _kernel_case(
                    nm, "gelu_table_n", {"x": ALL256, "table": KV.make_gelu_table_n(si, so, L)}, {},
                    f"{L} entries, step {256 // L}")
    yield "gelu_tablen_L32_randomtable_all256", "gelu_table_n", True, {}, lambda nm: _kernel_case(
        nm, "gelu_table_n", {"x": ALL256, "table": _i8(_rng(nm), (32,))}, {}, "a random table")


def _pot_allmax(name):
    """x = 127, weight +-127, Cin 3071: sums +-Cin 127^2 beyond a float32 pass; the bias cancels them, shift 0."""
    cin = 3071
    x = np.full((1, cin, 1, 4), 127, np.int8)
    sign = np.where(np.arange(4) % 2 == 0, 1, -1)
    w = (sign * 127).astype(np.int8)[:, None, None, None] * np.ones((1, cin, 1, 1), np.int8)
    bias = (-sign * cin * 127 * 127 + _rng(name).integers(-100, 101, 4)).astype(np.int32)
    return _pot_case(name, x, w, bias, np.zeros(4), "single", note="exact accumulator: out = acc (shift 0)")


def _scheme_param_specs():
    yield "conv_pot_1x1_allmax_cin3071_cout4_n4_single", "conv2d_pot", True, _p("single", out_dtype="int8"), \
        _pot_allmax
    yield from _narrow_specs()
    yield from _table_size_specs()
    pot = "conv2d_pot"
    for mode in _MODES:
        yield f"conv_pot_1x1_cin192_cout576_n32_{mode}", pot, True, _p(mode, out_dtype="int8"), \
            lambda nm, m=mode: _pot_random(nm, (1, 192, 1, 32), 576, 1, m)
        yield f"conv_pot_patch_k4_cin3_cout48_img32_{mode}", pot, True, _p(mode, out_dtype="int8"), \
            lambda nm, m=mode: _pot_random(nm, (1, 3, 32, 32), 48, 4, m)
        for residue, tag in ((4, "ties"), (3, "neartie3"), (5, "neartie5")):
            yield f"conv_pot_1x1_{tag}_cin1_cout4_n64_shift3_{mode}", pot, True, _p(mode, out_dtype="int8"), \
                lambda nm, m=mode, r=residue: _pot_residues(nm, m, r)
        yield f"conv_pot_1x1_maxacc_cin3072_cout8_n4_{mode}", pot, True, _p(mode, out_dtype="int8"), \
            lambda nm, m=mode: _pot_maxacc(nm, m)
        yield f"conv_pot_1x1_leftshift_int16_cin16_cout8_n1_b4_{mode}", pot, True, _p(mode, out_dtype="int16"), \
            lambda nm, m=mode: _pot_left(nm, m)
        yield f"conv_pot_1x1_saturate_cin64_cout32_n16_{mode}", pot, True, _p(mode, out_dtype="int8"), \
            lambda nm, m=mode: _pot_saturate(nm, m)
    for fill, ftag in ((-128, "allneg128"), (127, "all127")):
        yield f"conv_pot_1x1_{ftag}_cin192_cout64_n16_single", pot, True, _p("single", out_dtype="int8"), \
            lambda nm, f=fill: _pot_random(nm, (1, 192, 1, 16), 64, 1, "single", fill=f)
    yield "conv_pot_1x1_head_int16_cin384_cout10_n1_b4_single", pot, True, _p("single", out_dtype="int16"), \
        lambda nm: _pot_random(nm, (4, 384, 1, 1), 10, 1, "single", out_dtype="int16")
    yield "conv_pot_1x1_cin768_cout3072_n197_single", pot, False, _p("single", out_dtype="int8"), \
        lambda nm: _pot_random(nm, (1, 768, 1, 197), 3072, 1, "single")
    for tag, fields in PARAM_SCHEMES.items():
        scheme = Scheme(name=tag, **fields)
        yield f"block_{tag}_c48_h3_n18_b2_single", "block", True, _p("single", scheme=tag), \
            lambda n, s=scheme: _model_case(n, 48, 1, 3, 32, 8, 2, "single", True, scheme=s)
        for mode in _MODES:
            yield f"model_{tag}_c48_d2_h3_img32_p8_b2_{mode}", "model", True, _p(mode, scheme=tag), \
                lambda n, s=scheme, m=mode: _model_case(n, 48, 2, 3, 32, 8, 2, m, False, scheme=s)


ROUNDINGS = tuple(_MODES.values())      # SINGLE_ROUND, DOUBLE_ROUND


def rounding_mode(name: str) -> str:
    """SINGLE_ROUND / DOUBLE_ROUND from itself or its short name (single, double), any case."""
    mode = _MODES.get(name.lower(), name.upper())
    if mode not in ROUNDINGS:
        raise ValueError(f"unknown rounding mode {name!r}; choose from {', '.join(ROUNDINGS)} (or single, double)")
    return mode


def select(set_name: str = "quick", filter: str | None = None, *, ops=None, rounding: str | None = None) -> list:
    """The CaseSpecs of a set ('quick' or 'full'), in suite order, narrowed by any of:
    filter: a substring of the name; ops: an op name or a collection of them (the CaseSpec's op field);
    rounding: SINGLE_ROUND or DOUBLE_ROUND (or single / double): drops the cases that run with the other mode
    (the CaseSpec's rounding field), keeps those whose op takes no rounding mode."""
    if set_name not in SETS:
        raise ValueError(f"unknown case set {set_name!r}; choose from {SETS}")
    wanted_ops = None if ops is None else {ops} if isinstance(ops, str) else set(ops)
    known = {s.op for s in all_specs()}
    if wanted_ops is not None and wanted_ops - known:
        raise ValueError(f"unknown op {sorted(wanted_ops - known)[0]!r}; ops with cases: {', '.join(sorted(known))}")
    mode = None if rounding is None else rounding_mode(rounding)
    return [s for s in all_specs() if (s.quick or set_name == "full") and (not filter or filter in s.name)
            and (wanted_ops is None or s.op in wanted_ops) and (mode is None or s.rounding in (None, mode))]


def _readonly(value):
    """Arrays -> read-only copies (owning their data, so no view of them can be made writeable); dicts are
    rebuilt with read-only values; anything else is returned as is."""
    if isinstance(value, dict):
        return {k: _readonly(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        value = value.copy()
        value.flags.writeable = False
    return value


def get_case(name: str) -> Case:
    """Build (once) the case with this name. Its arrays are read-only copies: the case is cached, and a DUT
    that writes into its inputs must not change what later runs of it (or of other DUTs) see or expect."""
    return _get_case(name, registry.generation(), kernel_set())


@functools.lru_cache(maxsize=None)
def _get_case(name: str, generation: int, kernels: str) -> Case:
    for spec in all_specs():
        if spec.name == name:
            case = spec.build()
            return dataclasses.replace(case, inputs=_readonly(case.inputs),
                                       expected=_readonly(np.asarray(case.expected)))
    raise KeyError(f"no conformance case named {name!r}; see `python -m conformance list --set full`")
get_case.cache_clear = _get_case.cache_clear   # the cache of built cases (tests)


# ---------------------------------------------------------------------------------------------
# the authors' code variants (issue 19; docs/spec.md Part 4 "The authors' code variants", "Token pruning"):
# I-BERT's code i-GELU / i-exp / IntLayerNorm, I-ViT's 16-bit Shiftmax and its int16 context, EViT's pruning
# options. Constants from the offline builders of refvit.int_kernels_authors at the scales in the name.
# ---------------------------------------------------------------------------------------------

from refvit import int_kernels_authors as KA   # noqa: E402  (this section's own import, kept with it)

# the paper's grid plus 0.02, where k = 1.4142 moves c_c (and an output) against the paper's sqrt 2
GELU_CODE_SCALES = GELU_VARIANT_SCALES + ((0.02, 0.02),)


def _gelu_code_specs():
    op = "gelu_poly_ibert_code"
    for i, (s_in, s_out) in enumerate(GELU_CODE_SCALES):
        for mode in _MODES if i in (0, len(GELU_CODE_SCALES) - 1) else ("single",):
            yield f"{op}_all256_{scales_tag(s_in, s_out)}_{mode}", op, True, _p(mode), lambda n, si=s_in, so=s_out, m=mode: \
                _gelu_variant_case(n, op, m, KA.gelu_poly_ibert_code_constants(si, so))
    yield f"{op}_b2_c96_n33_{scales_tag(0.05, 0.05)}_single", op, True, _p("single"), lambda n: _gelu_variant_case(
        n, op, "single", KA.gelu_poly_ibert_code_constants(0.05, 0.05), _i8(_rng(n), (2, 96, 1, 33)))
    for mode in _MODES:   # the paper variant's designed ties and saturation (the same arithmetic)
        yield f"{op}_designed_cb8_cc50_c1_19_k2_shift32_{mode}", op, True, _p(mode), lambda n, m=mode: _gelu_variant_case(
            n, op, m, {"c_b": 8, "c_c": 50, "c_1": 19, "erf_shift": 2, "multiplier": 1 << 30, "shift": 32},
            note="ties and saturation")


def _exp_code_boundaries(op) -> np.ndarray:
    """The d_w where the exponential's integer part changes: multiples of 11356 (poly code), exp_shift's q (shift16)."""
    if op == "softmax_poly_ibert_code":
        return np.arange(1, KA.SOFTMAX_CODE_CAP // KA.EXP_CODE_LN2 + 1) * KA.EXP_CODE_LN2
    return _exp_boundaries("softmax_shift")


def _softmax_code_sweep(name, op, cap):
    """`_softmax_sweep` for these kernels: every d < 4096, within 4 of each boundary, around the cap, far beyond."""
    near = (_exp_code_boundaries(op)[:, None] + np.arange(-4, 5)).ravel()
    d = np.unique(np.concatenate([np.arange(4096), near, cap + np.arange(-2, 3), [1 << 20, (1 << 29) - 1, INT32_MAX]]))
    scores = np.stack([np.zeros_like(d), -d], axis=-1).reshape(1, 1, len(d), 2)   # (1, 1, rows, 2)
    return _softmax_variant_case(name, op, scores, "single", 1 << 30, 30, "every exp boundary, cap and beyond")


SOFTMAX_CODE_CAPS = {"softmax_poly_ibert_code": KA.SOFTMAX_CODE_CAP, "softmax_shift16": KV.SOFTMAX_SHIFT_CAP}


def _softmax_code_specs():
    for op, cap in SOFTMAX_CODE_CAPS.items():
        yield from _softmax_family(op, lambda nm, o=op, c=cap: _softmax_code_sweep(nm, o, c))


def _context_p16_case(name, heads, d, n, mode, kind="random"):
    """int16 probabilities: from softmax_shift16 (random), 32767 everywhere with v = -128 (the accumulator
    bound at N = 512: -512 * 32767 * 128), or ties (p = 1 (mod 8) on 1 or 3 keys, v = 4 (mod 8), shift 33)."""
    rng = _rng(name)
    if kind == "maxacc":
        p, v = np.full((1, heads, n, n), KA.PROB16_MAX, np.int16), np.full((1, heads, d, n), -128, np.int8)
        mult, shift = _rescale(127.0 / (n * KA.PROB16_MAX * 128))
    elif kind == "ties":
        v = (rng.integers(-16, 16, (1, heads, d, n)) * 8 + 4).astype(np.int8)
        p = np.zeros((1, heads, n, n), np.int16)
        for h in range(heads):
            for i in range(n):
                keys = rng.choice(n, 1 + 2 * int(rng.integers(2)), replace=False)
                p[0, h, i, keys] = rng.integers(0, 16, keys.size) * 8 + 1                  # |acc| / 8 < 127
        mult, shift = _scalar(1 << 30, np.int32), _scalar(33, np.int8)
    else:
        p = KA.softmax_shift16(_random_scores(rng, heads, n, d), *exp_rescale(0.05, d))
        v = _i8(rng, (1, heads, d, n))
        acc = np.einsum("bhij,bhdj->bhdi", p.astype(np.int64), v.astype(np.int64))
        mult, shift = _rescale(float(_fit_scale(acc, headroom=0.5 if kind == "saturate" else 3.0)))
    return _kernel_case(name, "attention_context_p16", {"p": p, "v": v, "multiplier": mult, "shift": shift},
                        {"rounding": _MODES[mode]}, kind)


def _context_p16_specs():
    op = "attention_context_p16"
    for mode in _MODES:
        yield f"{op}_h3_d16_n66_{mode}", op, True, _p(mode), lambda nm, m=mode: _context_p16_case(nm, 3, 16, 66, m)
        yield f"{op}_ties_h2_d8_n32_shift33_{mode}", op, True, _p(mode), lambda nm, m=mode: _context_p16_case(
            nm, 2, 8, 32, m, "ties")
    yield f"{op}_saturate_h2_d8_n64_single", op, True, _p("single"), lambda nm: _context_p16_case(nm, 2, 8, 64, "single", "saturate")
    yield f"{op}_maxacc_h1_d2_n512_single", op, True, _p("single"), lambda nm: _context_p16_case(nm, 1, 2, 512, "single", "maxacc")
    yield f"{op}_h1_d4_n1_single", op, True, _p("single"), lambda nm: _context_p16_case(nm, 1, 4, 1, "single")
    yield f"{op}_h3_d64_n197_double", op, False, _p("double"), lambda nm: _context_p16_case(nm, 3, 64, 197, "double")


def _rows_to_x(rows: list, c: int) -> np.ndarray:
    """Rows (each a list of C int8 values) -> (1, C, 1, len(rows)) int8."""
    return np.array(rows, np.int64).T.reshape(1, c, 1, len(rows)).astype(np.int8)


def _ln_code_var_row(target: int, head: tuple = (), c: int = 4096) -> list:
    """An int8 row of C channels starting with `head`, sum_c x^2 = target, |sum| < C / 2 (so the rounded mean is
    0 and y = x): the rest a greedy sum of squares (isqrt of what is left, at most 127) of alternating sign."""
    row = list(head)
    rest = target - sum(v * v for v in row)
    while rest > 0:
        a = min(127, math.isqrt(rest))
        row.append(a if len(row) % 2 == 0 else -a)
        rest -= a * a
    assert sum(v * v for v in row) == target and len(row) <= c and abs(sum(row)) < c // 2
    return row + [0] * (c - len(row))


def _ln_code_designed(name, mode):
    """Rows that meet each step of I-BERT's IntLayerNorm, shown through the exposed tail (gamma +-8, bias 4,
    shift 33: out = round(+-t + 1/2)) where |t| <= 126 and through a plain tail otherwise: C = 2 rows for the
    mean's ties to even ([1, 2] -> 2, [2, 3] -> 2, [-2, -1] -> -2, [-3, -2] -> -2) and y * factor = -2^31."""
    rows = [[1, 2], [2, 3], [-2, -1], [-3, -2], [5, 5], [-128, 127], [127, -128], [0, 1]]
    return _kernel_case(name, "layernorm_ibert_code", {"x": _rows_to_x(rows, 2)} | _ln_code_tail(name, 2, 33),
                        {"rounding": _MODES[mode]}, "integer mean ties to even; |y factor| = 2^31")


def _ln_code_tail(name, c, shift) -> dict:
    """The exposed output stage: gamma = +-2^(shift-30), bias 2^(shift-31), multiplier 2^30."""
    g = 1 << (shift - 30)
    gamma = np.where(_rng(name, "/constants").integers(0, 2, c) == 0, -g, g).astype(np.int8)
    return {"gamma": gamma, "bias": np.full(c, g // 2, np.int32), "multiplier": np.full(c, 1 << 30, np.int32),
            "shift": np.full(c, shift, np.int8)}


def _ln_code_sqrt_rows(name, mode):
    """C = 4096 rows with var = 4096^2 - 1, 4096^2, 4097^2 - 2, 4097^2 - 1, 4097^2 (mean 0): isqrt exact where a float32
    sqrt of a float32 var is one too large (4097^2 - 2 and 4097^2 - 1); a random tail shows t."""
    rows = [_ln_code_var_row(v) for v in (4096 ** 2 - 1, 4096 ** 2, 4097 ** 2 - 2, 4097 ** 2 - 1, 4097 ** 2)]
    x = _rows_to_x(rows, 4096)
    return _kernel_case(name, "layernorm_ibert_code", {"x": x} | _ln_tail_constants(_rng(name, "/constants"), 4096),
                        {"rounding": _MODES[mode]}, "isqrt where float32 sqrt is wrong")


def _ln_code_tie_rows(count: int = 3) -> list:
    """(std s, y) pairs, 520 <= s <= 8000 (var = s^2 fits 4096 int8 channels) ascending, y in 1..127 the smallest y the smallest in 1..39 with norm = (y (2^31 // s)) >> 1 = 2^13
    (mod 2^14) (then -y too) and |t| <= 126: t = rounding_shift_right(norm, 14) is a tie."""
    out = []
    for s in range(520, 8001):
        f = (1 << 31) // s
        y = next((y for y in range(1, 128) if (y * f >> 1) % (1 << 14) == 1 << 13 and (y * f >> 1) >> 14 <= 125), 0)
        if y:
            out.append((s, y))
        if len(out) == count:
            return out
    raise AssertionError("too few tie rows")


def _ln_code_t_ties(name, mode):
    """C = 4096 rows with var = s^2 (std = s) and y = +-y0 in channels 0, 1 such that t of both is a rounding tie
    (`_ln_code_tie_rows`), shown through the exposed tail (the other channels saturate)."""
    rows = [_ln_code_var_row(s * s, (y, -y)) for s, y in _ln_code_tie_rows()]
    return _kernel_case(name, "layernorm_ibert_code", {"x": _rows_to_x(rows, 4096)} | _ln_code_tail(name, 4096, 33),
                        {"rounding": _MODES[mode]}, "t rounding ties in channels 0 and 1")


def _ln_code_odd_rows(count: int = 12) -> list:
    """(std s, y) pairs, |y| <= 127, with y factor odd (factor = 2^31 // s) and norm = (y factor) >> 1 = 2^13 - 1 (mod 2^14):
    a floor of y factor / 2 taken any other way (e.g. rounded) moves t = rshr(norm, 14) by one."""
    out = []
    for s in range(1, 8161):
        f = (1 << 31) // s
        out += [(s, y) for y in range(-127, 128) if (y * f) % 2 and 2 * y * y <= s * s
                and ((y * f) >> 1) % (1 << 14) == (1 << 13) - 1][:1]                  # x = y is int8 (mean 0)
        if len(out) == count:
            return out
    raise AssertionError("too few odd rows")


def _ln_code_norm_floor(name, mode):
    """C = 4096 rows, row r with var = s^2 and y, -y in channels 2r, 2r + 1 (`_ln_code_odd_rows`); the tail of
    channel 2r (gamma 1, multiplier 2^30, shift 40: out = round((t + bias) / 2^10)) has the bias that puts
    t + bias at 2^9 - 1 (mod 2^10), just below a rounding tie, in [2^14, 2^17): t one larger changes the output."""
    rows, tail = [], _ln_tail_constants(_rng(name, "/constants"), 4096)
    gamma, bias = tail["gamma"].copy(), tail["bias"].copy()
    mult, shift = np.full(4096, 1 << 30, np.int32), np.full(4096, 40, np.int8)
    for r, (s, y) in enumerate(_ln_code_odd_rows()):
        rows.append(_ln_code_var_row(s * s, (0,) * (2 * r) + (y, -y)))
        f = (1 << 31) // s
        t = (((y * f) >> 1) + (1 << 13)) >> 14
        gamma[2 * r], bias[2 * r] = 1, (1 << 16) + (((1 << 9) - 1 - t - (1 << 16)) % (1 << 10))
    inputs = {"x": _rows_to_x(rows, 4096), "gamma": gamma, "bias": bias, "multiplier": mult, "shift": shift}
    return _kernel_case(name, "layernorm_ibert_code", inputs, {"rounding": _MODES[mode]}, "norm is a floor")


def _ln_code_kind(name, kind, c, n, mode):
    x = _ln_x(_rng(name), kind, c, n)
    return _kernel_case(name, "layernorm_ibert_code", {"x": x} | _ln_tail_constants(_rng(name, "/constants"), c),
                        {"rounding": _MODES[mode]}, kind)


def _layernorm_code_specs():
    op = "layernorm_ibert_code"
    for mode in _MODES:
        yield f"{op}_c192_n64_{mode}", op, True, _p(mode), lambda nm, m=mode: _ln_code_kind(nm, "random", 192, 64, m)
        yield f"{op}_designed_meanties_c2_n8_{mode}", op, True, _p(mode), lambda nm, m=mode: _ln_code_designed(nm, m)
        yield f"{op}_tties_c4096_n3_{mode}", op, True, _p(mode), lambda nm, m=mode: _ln_code_t_ties(nm, m)
        yield f"{op}_sqrt_var4097sq_c4096_n5_{mode}", op, True, _p(mode), lambda nm, m=mode: _ln_code_sqrt_rows(nm, m)
        yield f"{op}_normfloor_c4096_n12_{mode}", op, True, _p(mode), lambda nm, m=mode: _ln_code_norm_floor(nm, m)
    for kind, c, n in (("residual", 768, 32), ("constant_rows", 768, 16), ("allneg128", 192, 4), ("all127", 192, 4),
                       ("alternating", 4096, 2), ("onemax", 4096, 4), ("random", 1, 16)):
        yield f"{op}_{kind}_c{c}_n{n}_single", op, True, _p("single"), lambda nm, k=kind, c=c, n=n: _ln_code_kind(
            nm, k, c, n, "single")
    yield f"{op}_residual_c768_n577_double", op, False, _p("double"), lambda nm: _ln_code_kind(nm, "residual", 768, 577, "double")


def _select_score_case(name, kind, h, n_tokens, prefix, keep, b):
    p = _cls_probs(_rng(name), kind, b, h, n_tokens, prefix, keep)
    return _kernel_case(name, "select_tokens_score_order", {"p": p}, {"keep": keep, "num_prefix": prefix},
                        f"cls row: {kind}")


def _prune_option_case(name, op, kind, c, h, n_tokens, prefix, keep, b, mode, dtype=np.int8):
    """As `_prune_case`, the index from the score-order selector; `halfties` (h = 2, one dropped token whose
    score is 127: package = x / 2, a tie for every odd x)."""
    rng = _rng(name)
    p = _cls_probs(rng, "max" if kind == "extremes" else "random" if kind == "halfties" else kind,
                   b, h, n_tokens, prefix, keep)
    lo, hi = int_range(dtype)
    x = rng.integers(lo, hi + 1, (b, c, 1, n_tokens)).astype(dtype)
    if kind == "extremes":
        x = np.where(x < 0, lo, hi).astype(dtype)
    if kind == "halfties":                 # the first patch scores 127 (127 + 0), the others >= 128: it is the
        p[:, :, 0, prefix:] = np.maximum(p[:, :, 0, prefix:], 64)                  # one dropped (keep = n - 1)
        p[:, 0, 0, prefix], p[:, 1, 0, prefix] = 127, 0
        x[:, :, 0, prefix] = rng.integers(-64, 64, (b, c)) * 2 + 1                  # odd: x * 127 / 254 a tie
    index = REFERENCE_KERNELS["select_tokens_score_order"](p, keep=keep, num_prefix=prefix)
    return _kernel_case(name, op, {"x": x, "p": p, "index": index}, {"num_prefix": prefix, "rounding": _MODES[mode]},
                        f"cls row: {kind}")


PRUNE_OPTION_OPS = {"prune_tokens_weighted_sum": "weightedsum", "prune_tokens_mean_any_order": "meanscoreorder"}


def _prune_option_specs():
    for kind, h, n, prefix, keep, b in (("random", 3, 66, 2, 45, 2), ("ties", 3, 34, 2, 10, 2),
                                        ("allzero", 3, 18, 1, 5, 2), ("random", 3, 66, 2, 1, 2),
                                        ("random", 3, 18, 2, 16, 2), ("max", 12, 50, 1, 20, 1)):
        yield f"select_tokens_score_order_{kind}_h{h}_n{n}_p{prefix}_k{keep}_b{b}", "select_tokens_score_order", \
            True, _p(keep=keep, num_prefix=prefix), lambda nm, a=(kind, h, n, prefix, keep, b): _select_score_case(nm, *a)
    for op, tag in PRUNE_OPTION_OPS.items():
        for mode in _MODES:
            for kind, c, h, n, prefix, keep, b in (("random", 192, 3, 66, 2, 45, 2), ("pair", 16, 3, 18, 1, 15, 2),
                                                   ("ties", 48, 3, 34, 2, 10, 2), ("allzero", 16, 3, 18, 1, 5, 2),
                                                   ("random", 48, 3, 66, 2, 1, 2), ("random", 48, 3, 18, 2, 16, 2),
                                                   ("extremes", 16, 12, 34, 1, 3, 1), ("halfties", 64, 2, 10, 1, 8, 2)):
                yield f"prune_{tag}_{kind}_c{c}_h{h}_n{n}_p{prefix}_k{keep}_b{b}_{mode}", op, True, \
                    _p(mode, num_prefix=prefix), \
                    lambda nm, o=op, a=(kind, c, h, n, prefix, keep, b), m=mode: _prune_option_case(nm, o, *a, m)
            yield f"prune_{tag}_int16_c32_h3_n18_p1_k9_b2_{mode}", op, True, _p(mode, num_prefix=1), lambda nm, o=op, m=mode: \
                _prune_option_case(nm, o, "random", 32, 3, 18, 1, 9, 2, m, np.int16)
    for order, package in (("score", "mean"), ("position", "weighted-sum"), ("score", "weighted-sum")):
        tag = f"order{order}_package{package.replace('-', '')}"
        setting = ((0, 0.5), (1, 0.7), ("order", order), ("package", package))
        for mode in _MODES:
            yield f"model_c48_d2_h3_img32_p8_b2_prune0k0p5_1k0p7_{tag}_{mode}", "model", True, \
                _p(mode, scheme="refvit-int8"), \
                lambda nm, m=mode, s=setting: _model_case(nm, 48, 2, 3, 32, 8, 2, m, False, prune=s)
        yield f"block_c48_h3_n18_b2_prune0k0p5_{tag}_single", "block", True, _p("single", scheme="refvit-int8"), lambda nm, s=setting: _model_case(
            nm, 48, 1, 3, 32, 8, 2, "single", True, prune=s[:1] + s[2:])


def _authors_code_specs():
    """The families of this section, one entry in the family list."""
    for family in (_gelu_code_specs, _softmax_code_specs, _context_p16_specs, _layernorm_code_specs,
                   _prune_option_specs):
        yield from family()


# ---------------------------------------------------------------------------------------------
# 16-bit activations (act_bits 16, the scheme a16w8; docs/spec.md Part 7): int16 activations, int8 weights, int48
# accumulators rescaled by apply_scale_16 (16-bit multipliers), 16-bit probabilities, a 65536-entry GELU table.
# The block and model cases of a16w8 are `_scheme_model_specs`' (a16w8 is a named scheme).
# ---------------------------------------------------------------------------------------------

from refvit import int_kernels_a16 as KA16   # noqa: E402  (this section's own imports, kept with it)
from refvit.intmath import quantize_multiplier16   # noqa: E402

ACC48_MAX = (1 << 47) - 1
A16_EXP_TABLES = ((4096, 8), (256, 4))       # (entries, index bits): a16w8's table and part 2's
A16_GELU_SCALES = ((0.001, 0.002), (2e-4, 2e-4))   # (scale_in, scale_out) of the shipped-table GELU cases


def _i16(rng, shape, lo=-32768, hi=32767) -> np.ndarray:
    return rng.integers(lo, hi + 1, size=shape).astype(np.int16)


def _rescale16(real_scale) -> tuple[np.ndarray, np.ndarray]:
    """(multiplier int16, shift int8) arrays encoding real scale(s) as apply_scale_16 takes them (the quantizer's
    quantize_multiplier16)."""
    pairs = [quantize_multiplier16(float(s)) for s in np.atleast_1d(real_scale)]
    m, s = np.array([p[0] for p in pairs], np.int16), np.array([p[1] for p in pairs], np.int8)
    return (m, s) if np.ndim(real_scale) else (m.reshape(()), s.reshape(()))


def _fit16(acc: np.ndarray, axis=None, headroom: float = 3.0):
    """The 16-bit rescale putting `headroom` standard deviations of acc at 32767 (per channel when axis given)."""
    std = np.std(acc.astype(np.float64), axis=axis)
    return _rescale16(32767.0 / (headroom * np.maximum(std, 1.0)))


def _conv_a16(name, kind, cin, k, cout, spatial):
    """conv2d_a16 cases (out_dtype int16). random: full-range int16 x, int8 weights in [-127, 127], random bias,
    per-channel rescale fitted to the accumulators (3 sigma at 32767); extreme: x = -32768, weights -127 / +127 per
    row, bias at the int48 headroom (acc = +-(2^47 - 1)) or 0, multiplier 2^15 - 1 at shifts 62, 47, 40, 33;
    ties: Cin 1, weights +-1, bias 4, x in 8Z, multiplier 2^14, shift 17 (every acc / 8 is a tie)."""
    rng = _rng(name)
    h, w = spatial
    if kind == "random":
        x, wt = _i16(rng, (1, cin, h, w)), _i8(rng, (cout, cin, k, k), -127)
        bias = rng.integers(-(1 << 30), 1 << 30, cout).astype(np.int64)
        acc = np.einsum("bciujv,ocuv->boij", x.astype(np.int64).reshape(1, cin, h // k, k, w // k, k),
                        wt.astype(np.int64)) + bias.reshape(1, cout, 1, 1)
        mult, shift = _fit16(acc, axis=(0, 2, 3))
        note = "random int16 x, fitted 16-bit rescale"
    elif kind == "extreme":
        x = np.full((1, cin, h, w), -32768, np.int16)
        sign = np.where(np.arange(cout) % 2 == 0, -1, 1)
        wt = (sign * 127).astype(np.int8)[:, None, None, None] * np.ones((1, cin, k, k), np.int8)
        head = ACC48_MAX - cin * k * k * (1 << 15) * 127
        bias = np.where(np.arange(cout) % 4 < 2, -sign * head, 0).astype(np.int64)      # acc +-(2^47 - 1), +-2^30 127
        mult = np.full(cout, (1 << 15) - 1, np.int16)
        shift = np.resize(np.array([62, 62, 47, 47, 40, 40, 33, 33], np.int8), cout)
        note = "acc = +-(2^47 - 1) (bias at the int48 headroom) and +-Cin k^2 2^15 127"
    else:
        x = (rng.integers(-4096, 4096, (1, 1, h, w)) * 8).astype(np.int16)
        wt = np.array([1, -1, 1, -1], np.int8).reshape(4, 1, 1, 1)
        bias = np.full(4, 4, np.int64)
        mult, shift = np.full(4, 1 << 14, np.int16), np.full(4, 17, np.int8)
        note = "every acc / 8 is a rounding tie"
    inputs = {"x": x, "weight": wt, "bias": bias, "multiplier": mult, "shift": shift}
    return _kernel_case(name, "conv2d_a16", inputs, {"out_dtype": "int16"}, note)


def _scores_a16(name, kind, heads, d, n):
    """random: full-range int16 q, k (|s| beyond int32); extreme: head 0 q = k = -32768 (s = D 2^30), head 1
    q = -32768, k = 32767."""
    if kind == "extreme":
        q = np.full((1, 2, d, n), -32768, np.int16)
        k = np.stack([np.full((d, n), -32768), np.full((d, n), 32767)])[None].astype(np.int16)
    else:
        rng = _rng(name)
        q, k = _i16(rng, (1, heads, d, n)), _i16(rng, (1, heads, d, n))
    return _kernel_case(name, "attention_scores_a16", {"q": q, "k": k}, {}, kind)


def _a16_scores_random(rng, heads, n, d=64, std=4000.0):
    """int48 scores of random int16 heads (Gaussian q, k of the given std, as a calibrated int16 activation)."""
    q, k = (_gaussian(rng, (1, heads, d, n), std, np.int16) for _ in range(2))
    return KA16.attention_scores_a16(q, k)


def _softmax_a16(name, size, bits, kind, n):
    """softmax_a16 against make_exp_table_n(size, bits) (a random valid table for `randomtable`). random: scores
    of random heads, the rescale spreading their differences over the table; equal: every key equal (sigma =
    N 2^15); cap: scores in {-(2^47 - 1), 0, 2^47 - 1} (differences up to 2^48 - 2, capped at 2^47 - 1) at the
    model's rescale of int16 q, k (s 0.05/256, D 64: one real unit at 2^bits index units); ties: multiplier 2^14,
    shift 16 (index = round(d / 4): d = 2 mod 4 are ties); far: one key per row 2^40 above the others (p = 32767
    and 0 where table[L - 1] = 0); onekey: N = 1 (p = 32767)."""
    rng = _rng(name)
    table = KV.make_exp_table_n(size, bits)
    s_qk = (0.05 / 256) ** 2 / math.sqrt(64) * 2 ** bits
    mult, shift = _rescale16(s_qk)
    if kind in ("random", "randomtable"):
        scores = _a16_scores_random(rng, 3, n)
        mult, shift = _rescale16(size / (4.0 * float(np.std(scores.astype(np.float64)))))
        if kind == "randomtable":
            table = rng.integers(0, K.EXP_ONE + 1, size).astype(np.uint16)
            table[0] = K.EXP_ONE
    elif kind == "equal":
        scores = np.full((1, 2, n, n), 123456789, np.int64)
    elif kind == "cap":
        scores = rng.choice(np.array([-ACC48_MAX, 0, ACC48_MAX]), (1, 1, n, n)).astype(np.int64)
        assert KA16.apply_scale_16(ACC48_MAX, mult, shift) >= size - 1
    elif kind == "ties":
        scores = rng.integers(-16 * size, 16 * size, (1, 2, n, n)).astype(np.int64)
        mult, shift = _scalar(1 << 14, np.int16), _scalar(16, np.int8)
    elif kind == "far":
        scores = rng.integers(-(1 << 20), 1 << 20, (1, 2, n, n)).astype(np.int64)
        scores[0, :, np.arange(n), rng.integers(0, n, n)] = 1 << 40
        mult, shift = _scalar(1 << 14, np.int16), _scalar(34, np.int8)
    else:
        scores = rng.integers(-ACC48_MAX, ACC48_MAX, (2, 3, 1)).astype(np.int64)
    inputs = {"scores": scores, "multiplier": mult, "shift": shift, "exp_table": table}
    return _kernel_case(name, "softmax_a16", inputs, {}, f"{size} entries at 2^-{bits}; {kind}")


def _context_a16(name, kind, heads, d, n):
    """random: p from softmax_a16 of random scores, random int16 v, the rescale fitted (3 sigma at 32767); pone:
    p = 32767 everywhere, v = -32768 (head 0) and random (acc up to N 32767 2^15); ties: odd p < 7000 on 1 or 3
    keys, v = +-2^14: acc = 2^14 S with S odd; multiplier 3 2^13, shift 28: out = 1.5 S, every one a tie."""
    rng = _rng(name)
    if kind == "pone":
        p = np.full((1, heads, n, n), KA16.PROB16_ONE, np.int16)
        v = _i16(rng, (1, heads, d, n))
        v[0, 0] = -32768
        mult, shift = _rescale16(32767.0 / (n * 32767.0 * 32768.0))
    elif kind == "ties":
        v = (rng.choice(np.array([-1, 1]), (1, heads, d, n)) << 14).astype(np.int16)
        p = np.zeros((1, heads, n, n), np.int16)
        for h in range(heads):
            for i in range(n):
                keys = rng.choice(n, 1 + 2 * int(rng.integers(2)), replace=False)
                p[0, h, i, keys] = rng.integers(0, 3500, keys.size) * 2 + 1
        mult, shift = _scalar(3 << 13, np.int16), _scalar(28, np.int8)
    else:
        scores = _a16_scores_random(rng, heads, n, d)
        sm, ss = _rescale16(256 / (4.0 * max(float(np.std(scores.astype(np.float64))), 1.0)))
        p = KA16.softmax_a16(scores, sm, ss, KV.make_exp_table_n(256, 4))
        v = _gaussian(rng, (1, heads, d, n), 6000.0, np.int16)
        acc = np.einsum("bhij,bhdj->bhdi", p.astype(np.int64), v.astype(np.int64))
        mult, shift = _fit16(acc)
    return _kernel_case(name, "attention_context_a16", {"p": p, "v": v, "multiplier": mult, "shift": shift}, {},
                        kind)


def _layernorm_a16(name, kind, c, n, mode):
    """layernorm_a16 on int16 rows: random (Gaussian residual stream with outlier channels), constant (d = 0:
    out = requantize(bias), biases on negative ties, int16 values beyond int8), extreme (-32768 / 32767
    alternating, one 32767 among -32768, all -32768). Tail: random gamma, bias 8 b - 4 with |b| < 20000,
    multiplier 2^30, shift 33 (acc / 8: the constant rows' outputs are ties, and |out| reaches the int16 range);
    random rows: a plausible tail at s_out 2^-8 of s_t."""
    rng = _rng(name)
    if kind == "random":
        x = _ln_x(rng, "residual", c, n, np.int16)
    elif kind == "constant":
        x = np.broadcast_to(_i16(rng, (1, 1, 1, n)), (1, c, 1, n)).copy()
    else:
        x = np.full((1, c, 1, n), -32768, np.int16)
        x[0, :, 0, 0::3] = np.where(np.arange(c) % 2 == 0, -32768, 32767)[:, None]
        x[0, np.arange(c) % c, 0, 1] = -32768
        x[0, 0, 0, 1::3] = 32767
    eps = {"eps_int": _scalar(K.layernorm_eps_int(1e-6, c, 0.05 / 256), np.int64)}
    if kind == "random":
        tail = _ln_tail_constants(_rng(name, "/constants"), c)
        tail["shift"] = (tail["shift"].astype(np.int64) - 8).astype(np.int8)          # 256x: int16 outputs
    else:
        r = _rng(name, "/constants")
        tail = {"gamma": _i8(r, (c,), -127), "bias": (8 * r.integers(-20000, 20000, c) - 4).astype(np.int32),
                "multiplier": np.full(c, 1 << 30, np.int32), "shift": np.full(c, 33, np.int8)}
    return _kernel_case(name, "layernorm_a16", {"x": x} | eps | tail, {"rounding": _MODES[mode]}, kind)


def _gelu_a16(name, table):
    x = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16).reshape(1, 256, 1, 256)    # every int16 value
    return _kernel_case(name, "gelu_a16", {"x": x, "table": table}, {}, "every int16 input")


def _a16_specs():
    conv = "conv2d_a16"
    for kind, cin, k, cout, spatial, tag in (("random", 192, 1, 64, (1, 32), "cout64_n32"),
                                             ("random", 3, 4, 48, (32, 32), "cout48_img32"),
                                             ("extreme", 256, 2, 8, (2, 8), "cout8_n4"),
                                             ("ties", 1, 1, 4, (1, 64), "cout4_n64_shift17")):
        yield f"conv_a16_c{cin}_k{k}_{kind}_{tag}", conv, True, _p(out_dtype="int16"), \
            lambda nm, a=(kind, cin, k, cout, spatial): _conv_a16(nm, *a)
    yield "conv_a16_c768_k1_random_cout3072_n197", conv, False, _p(out_dtype="int16"), \
        lambda nm: _conv_a16(nm, "random", 768, 1, 3072, (1, 197))
    for kind, h, d, n in (("random", 3, 64, 24), ("extreme", 2, 64, 8)):
        yield f"scores_a16_{kind}_h{h}_d{d}_n{n}", "attention_scores_a16", True, _p(), \
            lambda nm, a=(kind, h, d, n): _scores_a16(nm, *a)
    for size, bits in A16_EXP_TABLES:
        for kind in ("random", "equal", "cap"):
            yield f"softmax_a16_L{size}_b{bits}_{kind}_n24", "softmax_a16", True, _p(), \
                lambda nm, L=size, b=bits, k=kind: _softmax_a16(nm, L, b, k, 24)
    for kind, n in (("ties", 24), ("far", 24), ("randomtable", 24), ("onekey", 1)):
        size, bits = (1024, 6) if kind == "randomtable" else A16_EXP_TABLES[0]
        yield f"softmax_a16_L{size}_b{bits}_{kind}_n{n}", "softmax_a16", True, _p(), \
            lambda nm, L=size, b=bits, k=kind, n=n: _softmax_a16(nm, L, b, k, n)
    for kind, h, d, n in (("random", 3, 16, 66), ("pone", 2, 4, 197), ("ties", 2, 8, 32), ("random", 1, 4, 1)):
        yield f"context_a16_{kind}_h{h}_d{d}_n{n}", "attention_context_a16", True, _p(), \
            lambda nm, a=(kind, h, d, n): _context_a16(nm, *a)
    for kind, c, n in (("random", 192, 32), ("constant", 48, 8), ("extreme", 1290, 6)):
        for mode in _MODES:
            yield f"layernorm_a16_c{c}_{kind}_n{n}_{mode}", "layernorm_a16", True, _p(mode), \
                lambda nm, a=(kind, c, n), m=mode: _layernorm_a16(nm, *a, m)
    for s_in, s_out in A16_GELU_SCALES:
        yield f"gelu_a16_all65536_{scales_tag(s_in, s_out)}", "gelu_a16", True, _p(), \
            lambda nm, si=s_in, so=s_out: _gelu_a16(nm, KA16.make_gelu_table16(si, so))
    yield "gelu_a16_all65536_randomtable", "gelu_a16", True, _p(), lambda nm: _gelu_a16(nm, _i16(_rng(nm), (1 << 16,)))
