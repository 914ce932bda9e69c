"""Mutation self-test of the conformance suite: one-line mutants of the reference kernels must each FAIL a case.

Each mutant is one exact source edit (an `old` fragment replaced by `new`) of refvit/intmath.py or
refvit/int_kernels.py, applied to a copy of the source and loaded as a fresh module (refvit itself is never
touched). A DUT whose per-op methods are the mutated functions then runs the quick cases of the ops the
mutant can affect; it must FAIL at least one (an ERROR does not count: a mutant must produce wrong values,
not crash). A mutant that survives shows a missing case: add one (conformance/cases.py), do not drop the
mutant. `pytest -s tests/test_mutation.py` prints the kill table and rate.

Keeping the table current: the kernels are being optimized, so a fragment may disappear. Every fragment
must occur exactly once in its file, otherwise the test fails naming the mutant: update its `old`/`new`
here (the one place), keeping the same semantic mutation.
"""
from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import refvit
from conformance import DUT, FAIL, run_case, select
from conformance.cases import get_case
from conformance.dut import REFERENCE_KERNELS

SRC = Path(refvit.__file__).resolve().parent
PER_OP = tuple(REFERENCE_KERNELS)                       # every per-op method (not block / model)
SCALED = ("apply_scale", "requantize", "conv2d", "softmax", "attention_context", "layernorm")


@dataclass(frozen=True)
class Mutant:
    id: str
    module: str          # "intmath" or "int_kernels"
    old: str             # exact fragment, must occur once in refvit/<module>.py
    new: str
    ops: tuple           # the ops whose quick cases are run against it
    what: str


# fmt: off
MUTANTS = [
    # ---- intmath: rounding shifts and rescaling -------------------------------------------------------------
    Mutant("rsr_ties_down", "intmath", "np.right_shift(x + half, shift)", "np.right_shift(x + half - 1, shift)",
           ("add", "softmax", "layernorm"), "rounding_shift_right rounds ties toward -inf"),
    Mutant("rsr_half_off_by_one", "intmath", "np.maximum(shift - 1, 0)), 0)", "np.maximum(shift - 2, 0)), 0)",
           ("add", "softmax", "layernorm"), "rounding_shift_right adds 2^(shift-2) instead of 2^(shift-1)"),
    Mutant("apply_scale_single_ties_down", "intmath", "(value * multiplier + half) >> shift",
           "(value * multiplier + half - 1) >> shift", SCALED, "SINGLE_ROUND rounds ties toward -inf"),
    Mutant("apply_scale_single_shift_plus1", "intmath", "(value * multiplier + half) >> shift",
           "(value * multiplier + half) >> (shift + 1)", SCALED, "SINGLE_ROUND shifts one bit too far"),
    Mutant("double_left_off_by_one", "intmath", "left = np.maximum(31 - shift, 0)",
           "left = np.maximum(30 - shift, 0)", SCALED, "DOUBLE_ROUND left shift one short"),
    Mutant("double_right_off_by_one", "intmath", "right = np.maximum(shift - 31, 0)",
           "right = np.maximum(shift - 32, 0)", SCALED, "DOUBLE_ROUND right shift one short"),
    Mutant("srdhm_nudge_away", "intmath", "np.where(ab >= 0, 1 << 30, 1 - (1 << 30))",
           "np.where(ab >= 0, 1 << 30, -(1 << 30))", SCALED,
           "high mul: negative nudge -2^30 (ties away from zero) instead of 1 - 2^30"),
    Mutant("srdhm_floor_not_trunc", "intmath", "np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))",
           "nudged >> 31", SCALED, "high mul: floor division instead of C truncation"),
    Mutant("rdbp_ties_up", "intmath", "    threshold = (mask >> 1) + (x < 0)\n", "    threshold = (mask >> 1)\n",
           SCALED, "RoundingDivideByPOT: ties toward +inf instead of away from zero"),
    Mutant("rdbp_ge", "intmath", "(x >> exponent) + (remainder > threshold), dtype",
           "(x >> exponent) + (remainder >= threshold), dtype", SCALED, "RoundingDivideByPOT: >= threshold"),
    # ---- intmath: saturation --------------------------------------------------------------------------------
    Mutant("saturate_lo_plus1", "intmath", "np.clip(x, lo, hi)", "np.clip(x, lo + 1, hi)", PER_OP,
           "saturation lower bound -127 instead of -128"),
    Mutant("saturate_hi_minus1", "intmath", "np.clip(x, lo, hi)", "np.clip(x, lo, hi - 1)", PER_OP,
           "saturation upper bound one low"),
    Mutant("requantize_ignores_out_dtype", "intmath",
           "return saturate(apply_scale(value, multiplier, shift, rounding), out_dtype)",
           "return saturate(apply_scale(value, multiplier, shift, rounding), np.int8).astype(out_dtype)",
           SCALED, "requantize always saturates to int8"),
    # ---- intmath: isqrt, int_matmul --------------------------------------------------------------------------
    Mutant("isqrt_strict", "intmath", "take = rem >= trial", "take = rem > trial", ("layernorm",),
           "isqrt: rem > trial (wrong at perfect squares)"),
    Mutant("isqrt_30_bits", "intmath", "ISQRT_BITS = 31", "ISQRT_BITS = 30", ("layernorm",),
           "isqrt: 30 steps from 4^29 (wrong for q >= 2^60)"),
    Mutant("isqrt_rem_off_by_one", "intmath", "rem = np.where(take, rem - trial, rem)",
           "rem = np.where(take, rem - trial + 1, rem)", ("layernorm",), "isqrt: remainder off by one"),
    Mutant("matmul_chunk_too_long", "intmath", "F32_EXACT = 1 << 24", "F32_EXACT = 1 << 26",
           ("conv2d", "attention_scores", "attention_context"),
           "int_matmul: float32 chunks 4x too long (inexact sums)"),
    Mutant("matmul_drops_chunks", "intmath", "            out += part\n", "            out = part\n",
           ("conv2d", "attention_scores", "attention_context"), "int_matmul: keeps only the last K-chunk"),
    # ---- int_kernels: conv, attention -------------------------------------------------------------------------
    Mutant("conv_bias_int16", "int_kernels", "acc += bias.astype(np.int64)[:, None]",
           "acc += bias.astype(np.int16)[:, None]", ("conv2d",), "conv: bias truncated to 16 bits"),
    Mutant("scores_int16", "int_kernels", "int_matmul(np.swapaxes(q, 2, 3), k).astype(np.int32)",
           "int_matmul(np.swapaxes(q, 2, 3), k).astype(np.int16).astype(np.int32)", ("attention_scores",),
           "scores: 16-bit accumulator (wraps)"),
    Mutant("conv_kernel_transposed", "int_kernels", ".transpose(1, 3, 5, 0, 2, 4)", ".transpose(1, 5, 3, 0, 2, 4)",
           ("conv2d",), "conv: kernel rows and columns swapped"),
    Mutant("scores_operands_swapped", "int_kernels", "int_matmul(np.swapaxes(q, 2, 3), k)",
           "int_matmul(np.swapaxes(k, 2, 3), q)", ("attention_scores",), "scores: k.q instead of q.k (transposed)"),
    Mutant("context_p_not_transposed", "int_kernels", "int_matmul(v, np.swapaxes(p, 2, 3))", "int_matmul(v, p)",
           ("attention_context",), "context: p used as (keys, queries)"),
    Mutant("context_always_single", "int_kernels",
           "return requantize(acc, multiplier, shift, out_dtype=np.int8, rounding=rounding)\n\n\n# ------",
           "return requantize(acc, multiplier, shift, out_dtype=np.int8, rounding=SINGLE_ROUND)\n\n\n# ------",
           ("attention_context",), "context: ignores the rounding mode"),
    # ---- int_kernels: softmax ---------------------------------------------------------------------------------
    Mutant("softmax_index_min254", "int_kernels", "saturate(apply_scale(d, multiplier, shift, rounding), np.uint8)",
           "np.minimum(apply_scale(d, multiplier, shift, rounding), 254)", ("softmax",),
           "softmax: table index clamped at 254 instead of 255"),
    Mutant("softmax_index_single", "int_kernels", "apply_scale(d, multiplier, shift, rounding)",
           "apply_scale(d, multiplier, shift, SINGLE_ROUND)", ("softmax",), "softmax: index ignores the rounding mode"),
    Mutant("softmax_d_off_by_one", "int_kernels", "d = s.max(axis=-1, keepdims=True) - s",
           "d = s.max(axis=-1, keepdims=True) - s + 1", ("softmax",), "softmax: score difference off by one"),
    Mutant("softmax_recip_rounded", "int_kernels", "recip = (1 << SOFTMAX_RECIP_BITS) // sigma",
           "recip = ((1 << SOFTMAX_RECIP_BITS) + sigma // 2) // sigma", ("softmax",),
           "softmax: reciprocal rounded instead of floored"),
    Mutant("softmax_recip_off_by_one", "int_kernels", "recip = (1 << SOFTMAX_RECIP_BITS) // sigma",
           "recip = ((1 << SOFTMAX_RECIP_BITS) - 1) // sigma", ("softmax",),
           "softmax: floor((2^40 - 1) / sigma), wrong at exact divisors"),
    Mutant("softmax_recip_plus1", "int_kernels", "recip = (1 << SOFTMAX_RECIP_BITS) // sigma",
           "recip = (1 << SOFTMAX_RECIP_BITS) // sigma + 1", ("softmax",), "softmax: reciprocal one too large"),
    Mutant("softmax_p_ties_down", "int_kernels", "rounding_shift_right(e * PROB_ONE * recip, SOFTMAX_RECIP_BITS)",
           "rounding_shift_right(e * PROB_ONE * recip - 1, SOFTMAX_RECIP_BITS)", ("softmax",),
           "softmax: probability ties rounded down"),
    Mutant("softmax_max_wrong_axis", "int_kernels", "d = s.max(axis=-1, keepdims=True) - s",
           "d = s.max(axis=-2, keepdims=True) - s", ("softmax",), "softmax: max over queries instead of keys"),
    Mutant("softmax_table_int16", "int_kernels", "e = exp_table.astype(np.int64)[idx]",
           "e = exp_table.astype(np.int16).astype(np.int64)[idx]", ("softmax",),
           "softmax: table entries read as int16 (2^15 wraps)"),
    # ---- int_kernels: add, gelu -------------------------------------------------------------------------------
    Mutant("add_ties_down", "int_kernels", "return saturate(rounding_shift_right(acc, shift), out_dtype)",
           "return saturate(rounding_shift_right(acc - 1, shift), out_dtype)", ("add",), "add: ties rounded down"),
    Mutant("add_int32_accumulator", "int_kernels", "acc = a.astype(np.int64) * ma + b.astype(np.int64) * mb",
           "acc = a.astype(np.int32) * ma + b.astype(np.int32) * mb", ("add",),
           "add: int32 products wrap"),
    Mutant("add_multipliers_swapped", "int_kernels", "acc = a.astype(np.int64) * ma + b.astype(np.int64) * mb",
           "acc = a.astype(np.int64) * mb + b.astype(np.int64) * ma", ("add",), "add: multipliers swapped"),
    Mutant("add_wraps", "int_kernels", "return saturate(rounding_shift_right(acc, shift), out_dtype)",
           "return rounding_shift_right(acc, shift).astype(out_dtype)", ("add",), "add: wraps instead of saturating"),
    Mutant("gelu_index_off_by_one", "int_kernels", "table[x.astype(np.int64) + 128]", "table[x.astype(np.int64) + 127]",
           ("gelu",), "gelu: table index x + 127"),
    # ---- int_kernels: layernorm -------------------------------------------------------------------------------
    Mutant("ln_d_negated", "int_kernels", "d = c * xi - total", "d = total - c * xi", ("layernorm",),
           "layernorm: d = total - C x (operands swapped)"),
    Mutant("ln_t_floor", "int_kernels", "t = rounding_shift_right(d * inv, LN_T_SHIFT)",
           "t = np.right_shift(d * inv, LN_T_SHIFT)", ("layernorm",), "layernorm: t floored, not rounded"),
    Mutant("ln_sum_int32", "int_kernels", "(d * d).sum(axis=1, keepdims=True) + eps_int",
           "(d * d).sum(axis=1, keepdims=True, dtype=np.int32) + eps_int", ("layernorm",),
           "layernorm: sum of d^2 accumulated in int32 (wraps)"),
    Mutant("ln_eps_off_by_one", "int_kernels", "(d * d).sum(axis=1, keepdims=True) + eps_int",
           "(d * d).sum(axis=1, keepdims=True) + eps_int - 1", ("layernorm",), "layernorm: q one short"),
    Mutant("ln_isqrt_plus1", "int_kernels", "r = isqrt(q)", "r = isqrt(q + 1)", ("layernorm",),
           "layernorm: isqrt(q + 1), wrong at squares minus one"),
    Mutant("ln_recip_rounded", "int_kernels", "inv = (1 << LN_RECIP_BITS) // r",
           "inv = ((1 << LN_RECIP_BITS) + r // 2) // r", ("layernorm",), "layernorm: reciprocal rounded"),
    Mutant("ln_recip_off_by_one", "int_kernels", "inv = (1 << LN_RECIP_BITS) // r",
           "inv = ((1 << LN_RECIP_BITS) - 1) // r", ("layernorm",), "layernorm: floor((2^40 - 1) / r)"),
    Mutant("ln_t_ties_down", "int_kernels", "rounding_shift_right(d * inv, LN_T_SHIFT)",
           "rounding_shift_right(d * inv - 1, LN_T_SHIFT)", ("layernorm",), "layernorm: t ties rounded down"),
    Mutant("ln_output_always_single", "int_kernels",
           "return requantize(acc, m, s, out_dtype=np.int8, rounding=rounding)",
           "return requantize(acc, m, s, out_dtype=np.int8, rounding=SINGLE_ROUND)", ("layernorm",),
           "layernorm: output requantization ignores the rounding mode"),
]
# fmt: on


# ---------------------------------------------------------------------------------------------
# loading mutated copies of the modules
# ---------------------------------------------------------------------------------------------

def _source(module: str) -> str:
    return (SRC / f"{module}.py").read_text()


class StaleMutant(AssertionError):
    pass


def _apply(source: str, mutant: Mutant) -> str:
    count = source.count(mutant.old)
    if count != 1:
        raise StaleMutant(f"mutant {mutant.id}: fragment {mutant.old!r} occurs {count} times in "
                          f"refvit/{mutant.module}.py (must be exactly once): update it in MUTANTS, {Path(__file__).name}")
    return source.replace(mutant.old, mutant.new)


def _load(module: str, source: str, intmath=None) -> types.ModuleType:
    """Execute `source` as a fresh module refvit.<module>; int_kernels imports `intmath` when given."""
    mod = types.ModuleType(f"refvit.{module}")
    mod.__file__ = str(SRC / f"{module}.py")
    saved = sys.modules.get("refvit.intmath")
    if intmath is not None:
        sys.modules["refvit.intmath"] = intmath
    try:
        exec(compile(source, f"<mutated refvit/{module}.py>", "exec"), mod.__dict__)
    finally:
        sys.modules["refvit.intmath"] = saved
    return mod


def _modules(mutant: Mutant | None):
    """(intmath, int_kernels), fresh copies with the mutant applied to one of them (int_kernels always
    imports the copy of intmath)."""
    im_src, ik_src = _source("intmath"), _source("int_kernels")
    if mutant is not None and mutant.module == "intmath":
        im_src = _apply(im_src, mutant)
    if mutant is not None and mutant.module == "int_kernels":
        ik_src = _apply(ik_src, mutant)
    im = _load("intmath", im_src)
    return im, _load("int_kernels", ik_src, intmath=im)


def _dut(im, ik) -> DUT:
    """A DUT whose per-op methods are the (mutated) modules' functions of the reference's names."""
    methods = {}
    for op, fn in REFERENCE_KERNELS.items():
        impl = getattr(ik, fn.__name__, None) or getattr(im, fn.__name__, None)
        assert impl is not None, f"{op}: no function {fn.__name__} in intmath or int_kernels"
        methods[op] = staticmethod(impl)
    return type("MutantDUT", (DUT,), methods)()


def _cases(ops) -> list:
    return [s for s in select("quick") if s.op in ops]


def _hunt(mutant: Mutant):
    """-> (killing case name or None, cases run); StaleMutant when the fragment is not there once."""
    dut = _dut(*_modules(mutant))
    specs = _cases(mutant.ops)
    for i, spec in enumerate(specs, 1):
        if run_case(dut, get_case(spec.name)).status == FAIL:
            return spec.name, i
    return None, len(specs)


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------

def test_unmutated_copies_pass():
    """The harness itself: fresh copies of the unmutated modules pass every quick per-op case."""
    dut = _dut(*_modules(None))
    bad = [r.message for r in (run_case(dut, get_case(s.name)) for s in _cases(PER_OP)) if r.status != "PASS"]
    assert bad == []


def test_mutant_table_is_well_formed():
    assert len(MUTANTS) >= 24 and len({m.id for m in MUTANTS}) == len(MUTANTS)
    sources = {m: _source(m) for m in ("intmath", "int_kernels")}
    stale = []
    for m in MUTANTS:
        assert m.module in sources and m.old != m.new and m.ops and set(m.ops) <= set(PER_OP), m.id
        try:
            _apply(sources[m.module], m)
        except StaleMutant as e:
            stale.append(str(e))
    assert stale == [], "\n".join(stale)


def test_every_mutant_fails_a_case():
    t0 = time.perf_counter()
    rows, bad = [], []
    for m in MUTANTS:
        try:
            killer, ran = _hunt(m)
        except StaleMutant as e:
            rows.append(f"  STALE    {m.id}")
            bad.append(str(e))
            continue
        rows.append(f"  {'killed ' if killer else 'SURVIVED'} {m.id:32s} {killer or '-'} (after {ran} cases)")
        if not killer:
            bad.append(f"{m.id} survived ({m.what}): add a case that catches it")
    killed = sum(r.startswith("  killed") for r in rows)
    print(f"\nmutation kill rate: {killed}/{len(MUTANTS)} = {100.0 * killed / len(MUTANTS):.1f}% "
          f"({time.perf_counter() - t0:.1f} s)\n" + "\n".join(rows))
    assert bad == [], "\n".join(bad)
