"""Mutation self-test of the conformance suite: one-line mutants of the reference kernels must each FAIL a case.

Each mutant is one exact source edit (an `old` fragment replaced by `new`) of refvit/intmath.py,
refvit/int_kernels.py, refvit/int_kernels_prune.py or refvit/int_kernels_variants.py, applied to a copy of the
source and loaded as a fresh module (refvit itself is never touched; the kernel modules import the copies of
the modules below them). A DUT whose per-op methods are the mutated functions then runs the quick cases of the ops the
mutant can affect; it must FAIL at least one (an ERROR does not count: a mutant must produce wrong values,
not crash). A mutant that survives shows a missing case: add one (conformance/cases.py), do not drop the
mutant. `pytest -s tests/test_mutation.py` prints the kill table and rate.

Keeping the table current: the kernels are being optimized, so a fragment may disappear. Every fragment
must occur exactly once in its file, otherwise the test fails naming every stale mutant: update its
`old`/`new` here (MUTANTS, the one place), keeping the same semantic mutation. A mutant of code no DUT op
reaches any more (a helper the kernels stopped calling) survives: retarget it to the code that does the job
now. The spec's bit-by-bit isqrt (SPEC_ISQRT below) is mutated too, since hardware builds that method.
"""
from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import refvit
from conformance import DUT, FAIL, run_case, select
from conformance.cases import get_case
from conformance.dut import REFERENCE_KERNELS

SRC = Path(refvit.__file__).resolve().parent
PER_OP = tuple(REFERENCE_KERNELS)                       # every per-op method (not block / model)
SCALED = ("apply_scale", "requantize", "conv2d", "softmax", "attention_context", "layernorm")
MODULES = ("intmath", "int_kernels", "int_kernels_prune", "int_kernels_variants")   # the modules mutated


# The spec's isqrt (docs/spec.md, Part 1: bit by bit, 31 steps), what hardware builds. The reference computes
# the same function another way; mutants of this text (module "spec_isqrt") replace the kernels' isqrt, so the
# cases are also checked against the bugs of the spec's method.
SPEC_ISQRT = """
def isqrt(x):
    x = np.asarray(x, dtype=np.int64)
    rem = x.copy()
    res = np.zeros_like(x)
    bit = np.int64(1) << np.int64(60)
    for _ in range(31):
        trial = res + bit
        take = rem >= trial
        rem = np.where(take, rem - trial, rem)
        res = np.where(take, (res >> 1) + bit, res >> 1)
        bit >>= np.int64(2)
    return res
"""


@dataclass(frozen=True)
class Mutant:
    id: str
    module: str          # "intmath", "int_kernels" or "spec_isqrt"
    old: str             # exact fragment, must occur once in refvit/<module>.py
    new: str
    ops: tuple           # the ops whose quick cases are run against it
    what: str


# fmt: off
MUTANTS = [
    # ---- intmath: the rescale every kernel uses (apply_scale / requantize and their fused forms) --------------
    Mutant("rescale_ties_down", "intmath", "rnd = np.left_shift(np.int64(1), shift - 1)",
           "rnd = np.left_shift(np.int64(1), shift - 1) - 1", SCALED, "apply_scale rounds ties toward -inf"),
    Mutant("rescale_half_off_by_one", "intmath", "rnd = np.left_shift(np.int64(1), shift - 1)",
           "rnd = np.left_shift(np.int64(1), shift - 2)", SCALED, "apply_scale adds 2^(shift-2), not 2^(shift-1)"),
    Mutant("rescale_shift_plus1", "intmath", "    np.right_shift(t, shift, out=t)\n",
           "    np.right_shift(t, shift + 1, out=t)\n", SCALED, "apply_scale shifts one bit too far"),
    Mutant("double_from_shift31", "intmath", "big = shift > 31", "big = shift >= 31", SCALED,
           "DOUBLE_ROUND's second rounding already at shift 31"),
    Mutant("double_nudge_half", "intmath", "np.where(big, np.int64(1 << 30), np.int64(0))",
           "np.where(big, np.int64(1 << 29), np.int64(0))", SCALED, "DOUBLE_ROUND: first rounding term 2^29"),
    Mutant("double_corr_off_by_one", "intmath", "np.subtract(t, corr, out=t, where=neg)",
           "np.subtract(t, corr - 1, out=t, where=neg)", SCALED,
           "DOUBLE_ROUND: negative correction 2^31 - 1 (ties of negative values)"),
    Mutant("double_corr_ignores_sign", "intmath", "np.subtract(t, corr, out=t, where=neg)",
           "np.subtract(t, corr, out=t, where=~neg)", SCALED, "DOUBLE_ROUND: correction on positive values"),
    Mutant("requantize_lo_plus1", "intmath", "np.clip(t, lo, hi, out=out, casting=\"unsafe\")",
           "np.clip(t, lo + 1, hi, out=out, casting=\"unsafe\")", SCALED, "requantize saturates at -127"),
    Mutant("requantize_hi_minus1", "intmath", "np.clip(t, lo, hi, out=out, casting=\"unsafe\")",
           "np.clip(t, lo, hi - 1, out=out, casting=\"unsafe\")", SCALED, "requantize saturates at 126"),
    Mutant("requantize_ignores_out_dtype", "intmath", "    lo, hi = int_range(out_dtype)\n",
           "    lo, hi = int_range(np.int8)\n", SCALED, "requantize always saturates to int8"),
    Mutant("float_requant_ties_down", "intmath", "np.add(w, 0.5 - lo, out=w)",
           "np.add(w, 0.5 - lo - 2.0 ** -40, out=w)", SCALED, "requantize in float64 rounds ties toward -inf"),
    Mutant("float_requant_hi_minus1", "intmath", "{1: np.nextafter(256.0, 0.0),",
           "{1: np.nextafter(255.0, 0.0),", SCALED, "requantize in float64 saturates at 126"),
    Mutant("float_requant_no_sign_flip", "intmath", "np.bitwise_xor(u, _SIGN_BIT[out.itemsize], out=u)",
           "np.bitwise_xor(u, _SIGN_BIT[out.itemsize] >> 1, out=u)", SCALED,
           "requantize in float64 stores u - 64, not u - 128"),
    # ---- intmath: isqrt, int_matmul --------------------------------------------------------------------------
    Mutant("isqrt_up_correction_off_by_one", "intmath", "r += (r + 1) * (r + 1) <= x",
           "r += (r + 1) * (r + 1) <= x + 1", ("layernorm",), "isqrt: one high at squares minus one"),
    Mutant("isqrt_no_down_correction", "intmath", "r -= r * r > x", "r -= 0 * (r * r > x)", ("layernorm",),
           "isqrt: float64 sqrt not corrected down (one high at r^2 - 1 above 2^53)"),
    Mutant("spec_isqrt_strict", "spec_isqrt", "take = rem >= trial", "take = rem > trial", ("layernorm",),
           "spec isqrt: rem > trial (wrong at perfect squares)"),
    Mutant("spec_isqrt_30_steps", "spec_isqrt", "bit = np.int64(1) << np.int64(60)\n    for _ in range(31):",
           "bit = np.int64(1) << np.int64(58)\n    for _ in range(30):", ("layernorm",),
           "spec isqrt: starts at 4^29 (wrong for q >= 2^60)"),
    Mutant("spec_isqrt_rem_off_by_one", "spec_isqrt", "rem = np.where(take, rem - trial, rem)",
           "rem = np.where(take, rem - trial + 1, rem)", ("layernorm",), "spec isqrt: remainder off by one"),
    Mutant("isqrt_float32", "intmath", "np.sqrt(x.astype(np.float64))", "np.sqrt(x.astype(np.float32))",
           ("layernorm",), "isqrt: float32 sqrt, corrected by one each way"),
    Mutant("matmul_chunk_too_long", "intmath", "F32_EXACT = 1 << 24", "F32_EXACT = 1 << 26",
           ("conv2d", "attention_scores", "attention_context"),
           "int_matmul: float32 chunks 4x too long (inexact sums)"),
    Mutant("matmul_drops_chunks", "intmath", "out += part if acc_type", "out = part if acc_type",
           ("conv2d", "attention_scores", "attention_context"), "int_matmul: keeps only the last K-chunk"),
    # ---- int_kernels: conv -----------------------------------------------------------------------------------
    Mutant("conv_kernel_transposed", "int_kernels", ".transpose(1, 3, 5, 0, 2, 4)", ".transpose(1, 5, 3, 0, 2, 4)",
           ("conv2d",), "conv: kernel rows and columns swapped"),
    Mutant("conv_bias_int16", "int_kernels", "bias_m = bias.astype(np.int64)", "bias_m = bias.astype(np.int16)",
           ("conv2d",), "conv: bias truncated to 16 bits (shift > 31 path)"),
    Mutant("conv_bias_subtracted", "int_kernels", "bias_m = bias.astype(np.int64).reshape(cout, 1) * m",
           "bias_m = -bias.astype(np.int64).reshape(cout, 1) * m", ("conv2d",),
           "conv: bias subtracted (shift <= 31 path)"),
    Mutant("conv_always_single", "int_kernels",
           "rnd, corr = _rounding_terms(s, rounding)\n    bias_m = bias",
           "rnd, corr = _rounding_terms(s, SINGLE_ROUND)\n    bias_m = bias", ("conv2d",),
           "conv: ignores the rounding mode"),
    Mutant("conv_saturate_lo_plus1", "int_kernels", "            _clip_store(t, lo, hi, o)\n        else:",
           "            _clip_store(t, lo + 1, hi, o)\n        else:", ("conv2d",),
           "conv: saturates at -127"),
    # ---- int_kernels: attention ------------------------------------------------------------------------------
    Mutant("scores_operands_swapped", "int_kernels", "int_matmul_exact(np.swapaxes(q, 2, 3), k)",
           "int_matmul_exact(np.swapaxes(k, 2, 3), q)", ("attention_scores",), "scores: k.q (transposed)"),
    Mutant("scores_int16", "int_kernels", "copy_into(out, s)", "copy_into(out, s.astype(np.int16))",
           ("attention_scores",), "scores: 16-bit accumulator (wraps)"),
    Mutant("context_p_not_transposed", "int_kernels", "int_matmul_exact(p, np.swapaxes(v, 2, 3))",
           "int_matmul_exact(np.swapaxes(p, 2, 3), np.swapaxes(v, 2, 3))", ("attention_context",),
           "context: p used as (keys, queries)"),
    Mutant("context_always_single", "int_kernels", "_scale_into(acc, m, s, rounding, out, -128, 127)",
           "_scale_into(acc, m, s, SINGLE_ROUND, out, -128, 127)", ("attention_context",),
           "context: ignores the rounding mode"),
    Mutant("context_saturate_lo_plus1", "int_kernels", "_scale_into(acc, m, s, rounding, out, -128, 127)",
           "_scale_into(acc, m, s, rounding, out, -127, 127)", ("attention_context",), "context: saturates at -127"),
    Mutant("context_acc_off_by_one", "int_kernels", "requantize(acc.astype(np.int64), m, s",
           "requantize(acc.astype(np.int64) + 1, m, s", ("attention_context",),
           "context: accumulator off by one (shift <= 31 path)"),
    # ---- int_kernels: softmax ---------------------------------------------------------------------------------
    Mutant("softmax_d_off_by_one", "int_kernels", "np.subtract(top[r0:r1], s[r0:r1], out=d)",
           "np.subtract(top[r0:r1] + 1, s[r0:r1], out=d)", ("softmax",), "softmax: score difference off by one"),
    Mutant("softmax_lut_index_min254", "int_kernels",
           "idx = saturate(apply_scale(np.arange(end + 1, dtype=np.int64), multiplier, shift, rounding), np.uint8)",
           "idx = np.minimum(saturate(apply_scale(np.arange(end + 1, dtype=np.int64), multiplier, shift, rounding), "
           "np.uint8), 254)",
           ("softmax",), "softmax (table path): index clamped at 254"),
    Mutant("softmax_lut_one_short", "int_kernels", "end, exact = lo, True", "end, exact = lo - 1, True", ("softmax",),
           "softmax (table path): lookup one entry short of the clamp"),
    Mutant("softmax_lut_single", "int_kernels",
           "_softmax_lut(multiplier, shift, rounding, exp_table.tobytes()",
           "_softmax_lut(multiplier, shift, SINGLE_ROUND, exp_table.tobytes()", ("softmax",),
           "softmax (table path): index ignores the rounding mode"),
    Mutant("softmax_direct_index_min254", "int_kernels", "rounding, idx, 0, 255)", "rounding, idx, 0, 254)",
           ("softmax",), "softmax (direct path): index clamped at 254"),
    Mutant("softmax_direct_single", "int_kernels", "_scale_into(d, np.int64(multiplier), np.int64(shift), rounding,",
           "_scale_into(d, np.int64(multiplier), np.int64(shift), SINGLE_ROUND,", ("softmax",),
           "softmax (direct path): index ignores the rounding mode"),
    Mutant("softmax_table_int16", "int_kernels", "lut = exp_table[idx].astype(np.uint16)",
           "lut = exp_table[idx].astype(np.uint16) & 0x7FFF", ("softmax",),
           "softmax: table entries stored in 15 bits (2^15 wraps to 0)"),
    Mutant("softmax_recip_rounded", "int_kernels", "recip = (1 << SOFTMAX_RECIP_BITS) // sigma",
           "recip = ((1 << SOFTMAX_RECIP_BITS) + sigma // 2) // sigma", ("softmax",),
           "softmax: reciprocal rounded instead of floored"),
    Mutant("softmax_recip_off_by_one", "int_kernels", "recip = (1 << SOFTMAX_RECIP_BITS) // sigma",
           "recip = ((1 << SOFTMAX_RECIP_BITS) - 1) // sigma", ("softmax",),
           "softmax: floor((2^40 - 1) / sigma), wrong at exact divisors"),
    Mutant("softmax_recip_plus1", "int_kernels", "recip = (1 << SOFTMAX_RECIP_BITS) // sigma",
           "recip = (1 << SOFTMAX_RECIP_BITS) // sigma + 1", ("softmax",), "softmax: reciprocal one too large"),
    Mutant("softmax_p_ties_down", "int_kernels", "np.add(w, 0.5, out=w)",
           "np.add(w, 0.5 - 2.0 ** -41, out=w)", ("softmax",),
           "softmax: probability ties rounded down"),
    # ---- int_kernels: add, gelu -------------------------------------------------------------------------------
    Mutant("add_ties_down", "int_kernels", "half = (1 << shift - 1) if shift else 0",
           "half = (1 << shift - 1) - 1 if shift else 0", ("add",), "add: ties rounded down"),
    Mutant("add_int32_products", "int_kernels", "ma64, mb64 = np.int64(ma), np.int64(mb)",
           "ma64, mb64 = np.int32(ma), np.int32(mb)", ("add",), "add: int32 products (wrap)"),
    Mutant("add_multipliers_swapped", "int_kernels", "np.multiply(a[idx], ma64, out=t)",
           "np.multiply(a[idx], mb64, out=t)", ("add",), "add: a scaled by multiplier_b"),
    Mutant("add_saturate_hi_minus1", "int_kernels", "_clip_store(t, lo, hi, o)           # saturate",
           "_clip_store(t, lo, hi - 1, o)           # saturate", ("add",),
           "add: saturates at 126"),
    Mutant("add_table_index_7_bits", "int_kernels", "np.left_shift(a1[i].view(np.uint8), 8, out=idx",
           "np.left_shift(a1[i].view(np.uint8), 7, out=idx", ("add",), "add: table row index a << 7"),
    Mutant("gelu_index_off_by_one", "int_kernels", "np.roll(table, 128)", "np.roll(table, 127)", ("gelu",),
           "gelu: table[x + 127]"),
    # ---- int_kernels: layernorm -------------------------------------------------------------------------------
    Mutant("ln_total_int8", "int_kernels", "total = x.sum(axis=1, keepdims=True, dtype=np.int32)",
           "total = x.sum(axis=1, keepdims=True, dtype=np.int8)", ("layernorm",), "layernorm: sum x in int8 (wraps)"),
    Mutant("ln_q_int32", "int_kernels", "q = c * c * s2 - c * total * total + eps_int",
           "q = (c * c * s2 - c * total * total).astype(np.int32) + eps_int", ("layernorm",),
           "layernorm: sum d^2 in int32 (wraps)"),
    Mutant("ln_eps_off_by_one", "int_kernels", "q = c * c * s2 - c * total * total + eps_int",
           "q = c * c * s2 - c * total * total + eps_int - 1", ("layernorm",), "layernorm: q one short"),
    Mutant("ln_isqrt_plus1", "int_kernels", "r = isqrt(q)", "r = isqrt(q + 1)", ("layernorm",),
           "layernorm: isqrt(q + 1), wrong at squares minus one"),
    Mutant("ln_recip_rounded", "int_kernels", "inv = (1 << LN_RECIP_BITS) // r",
           "inv = ((1 << LN_RECIP_BITS) + r // 2) // r", ("layernorm",), "layernorm: reciprocal rounded"),
    Mutant("ln_recip_off_by_one", "int_kernels", "inv = (1 << LN_RECIP_BITS) // r",
           "inv = ((1 << LN_RECIP_BITS) - 1) // r", ("layernorm",), "layernorm: floor((2^40 - 1) / r)"),
    Mutant("ln_t_ties_down", "int_kernels", "(1 << (LN_T_SHIFT - 1)) - total * inv",
           "(1 << (LN_T_SHIFT - 1)) - 1 - total * inv", ("layernorm",), "layernorm: t ties rounded down"),
    Mutant("ln_d_negated", "int_kernels", "return c * inv, (1 << (LN_T_SHIFT - 1)) - total * inv",
           "return -c * inv, (1 << (LN_T_SHIFT - 1)) + total * inv", ("layernorm",), "layernorm: d = total - C x"),
    Mutant("ln_bias_subtracted", "int_kernels", "bias_m = b64 * m",
           "bias_m = -b64 * m", ("layernorm",),
           "layernorm: bias subtracted (shift <= 31 path)"),
    Mutant("ln_always_single", "int_kernels", "rnd, corr = _rounding_terms(s, rounding)\n    bias_m = b64",
           "rnd, corr = _rounding_terms(s, SINGLE_ROUND)\n    bias_m = b64", ("layernorm",),
           "layernorm: output requantization ignores the rounding mode"),
    Mutant("ln_saturate_lo_plus1", "int_kernels", "_clip_store(t, -128, 127, o)",
           "_clip_store(t, -127, 127, o)", ("layernorm",), "layernorm: saturates at -127"),
    # ---- int_kernels_prune: the token selector ----------------------------------------------------------------
    Mutant("select_ties_higher_position", "int_kernels_prune", "order = np.argsort(-score, axis=1, kind=\"stable\")",
           "order = score.shape[1] - 1 - np.argsort(-score[:, ::-1], axis=1, kind=\"stable\")", ("select_tokens",),
           "select: of equal scores the higher position first"),
    Mutant("select_score_order", "int_kernels_prune", "np.sort(order[:, :k], axis=1) + prefix",
           "order[:, :k] + prefix", ("select_tokens",), "select: kept tokens in score order (EViT's), not theirs"),
    Mutant("select_scores_int8", "int_kernels_prune", "return row.sum(axis=1, dtype=np.int64)",
           "return row.sum(axis=1, dtype=np.int8).astype(np.int64)", ("select_tokens", "prune_tokens"),
           "scores summed over heads in int8 (wraps)"),
    Mutant("select_head0_only", "int_kernels_prune", "return row.sum(axis=1, dtype=np.int64)",
           "return row[:, :1].sum(axis=1, dtype=np.int64)", ("select_tokens", "prune_tokens"),
           "scores from head 0 only"),
    Mutant("package_ties_down", "int_kernels_prune", "return (2 * num + den) // (2 * den)",
           "return (2 * num + den - 1) // (2 * den)", ("prune_tokens",), "package: SINGLE_ROUND ties rounded down"),
    Mutant("package_always_single", "int_kernels_prune", "if rounding == DOUBLE_ROUND:", "if rounding == \"never\":",
           ("prune_tokens",), "package: ignores the rounding mode"),
    Mutant("package_unweighted", "int_kernels_prune", "w[:, prefix:] = score", "w[:, prefix:] = 1",
           ("prune_tokens",), "package: plain average whatever the scores"),
    Mutant("package_weighs_kept", "int_kernels_prune", "w[~dropped] = 0", "w[:, :prefix] = 0", ("prune_tokens",),
           "package: the kept tokens weigh too"),
    Mutant("package_no_plain_fallback", "int_kernels_prune", "w[flat] = dropped[flat]", "w[flat] = 0",
           ("prune_tokens",), "package: 0 instead of the plain average when every dropped score is 0"),
    # ---- int_kernels_variants: the scheme variants (docs/spec.md, Part 4) -----------------------------------
    Mutant("gelu_poly_c1_for_cc", "int_kernels_variants", "y = np.sign(x) * (t * t - c_c)",
           "y = np.sign(x) * (t * t - c_1)", ("gelu_poly",), "gelu_poly: c_1 in place of c_c (equal at delta 1)"),
    Mutant("gelu_poly_erf_rounded", "int_kernels_variants", "return (y >> erf_shift) - c_1",
           "return ((y + (1 << erf_shift >> 1)) >> erf_shift) - c_1", ("gelu_poly",),
           "gelu_poly: erf value rounded, not floored"),
    Mutant("gelu_poly_no_clamp", "int_kernels_variants", "t = c_b - np.minimum(np.abs(x), c_b)",
           "t = c_b - np.abs(x)", ("gelu_poly",), "gelu_poly: no min(|x|, c_b) clamp"),
    Mutant("gelu_poly_always_single", "int_kernels_variants",
           "table = requantize(acc, m, s, out_dtype=np.int8, rounding=rounding)   # (256,) int8",
           "table = requantize(acc, m, s, out_dtype=np.int8, rounding=SINGLE_ROUND)   # (256,) int8", ("gelu_poly",),
           "gelu_poly: ignores the rounding mode"),
    Mutant("exp_shift_log2e_1375", "int_kernels_variants", "(v >> 4)                                    # [-1.4375",
           "(v >> 3)                                    # [-1.4375",
           ("gelu_shift", "softmax_shift"), "exp_shift: log2(e) ~ 1.375"),
    Mutant("exp_shift_clamp_q15", "int_kernels_variants", "u = np.maximum(u, -EXP_SHIFT_MAX_Q << EXP_FRAC_BITS)",
           "u = np.maximum(u, -(EXP_SHIFT_MAX_Q - 1) << EXP_FRAC_BITS)", ("gelu_shift", "softmax_shift"),
           "exp_shift: clamped at q = 15 (e = 1 instead of 0 far below the max)"),
    Mutant("exp_shift_no_linear_term", "int_kernels_variants", "return (EXP_SHIFT_ONE + r) >> q",
           "return EXP_SHIFT_ONE >> q", ("gelu_shift", "softmax_shift"), "exp_shift: 2^-q without (1 - p/2)"),
    Mutant("gelu_shift_factor_2p31", "int_kernels_variants", "factor = INT32_MAX // total",
           "factor = (INT32_MAX + 1) // total", ("gelu_shift",), "gelu_shift: 2^31 // total"),
    Mutant("gelu_shift_sigmoid_rounded", "int_kernels_variants",
           "sig = (e1 * factor) >> (31 - GELU_SHIFT_SIGMOID_BITS)",
           "sig = rounding_shift_right(e1 * factor, 31 - GELU_SHIFT_SIGMOID_BITS)", ("gelu_shift",),
           "gelu_shift: sigmoid rounded, not floored"),
    Mutant("gelu_shift_e2_abs", "int_kernels_variants", "e2 = exp_shift(-np.maximum(w, 0))",
           "e2 = exp_shift(-np.abs(w))", ("gelu_shift",), "gelu_shift: e2 = e^-|w| instead of e^-max(w, 0)"),
    Mutant("gelu_shift_always_single", "int_kernels_variants",
           "< 2^22\n    table = requantize(acc, m, s, out_dtype=np.int8, rounding=rounding)",
           "< 2^22\n    table = requantize(acc, m, s, out_dtype=np.int8, rounding=SINGLE_ROUND)", ("gelu_shift",),
           "gelu_shift: output ignores the rounding mode"),
    Mutant("exp_poly_z_ceil", "int_kernels_variants", "z = (-v) // EXP_POLY_LN2", "z = -(v // EXP_POLY_LN2)",
           ("softmax_poly",), "exp_poly: z rounded up, r in [0, ln 2)"),
    Mutant("exp_poly_qb_plus1", "int_kernels_variants", "p = r + EXP_POLY_QB", "p = r + EXP_POLY_QB + 1",
           ("softmax_poly",), "exp_poly: q_b one too large"),
    Mutant("exp_poly_shift_short", "int_kernels_variants", "return poly >> (z + EXP_POLY_SHIFT)",
           "return poly >> (z + EXP_POLY_SHIFT - 1)", ("softmax_poly",), "exp_poly: one bit more (every e doubled)"),
    Mutant("softmax_variant_always_single", "int_kernels_variants",
           "scaled = apply_scale(np.minimum(d, d_cap), m, s, rounding)",
           "scaled = apply_scale(np.minimum(d, d_cap), m, s, SINGLE_ROUND)", ("softmax_poly", "softmax_shift"),
           "softmax variants: the score rescale ignores the rounding mode"),
    Mutant("softmax_variant_recip_rounded", "int_kernels_variants", "recip = (1 << K.SOFTMAX_RECIP_BITS) // sigma",
           "recip = ((1 << K.SOFTMAX_RECIP_BITS) + sigma // 2) // sigma", ("softmax_poly", "softmax_shift"),
           "softmax variants: reciprocal rounded instead of floored"),
    Mutant("softmax_variant_p_floor", "int_kernels_variants",
           "p = rounding_shift_right(e * one * recip, K.SOFTMAX_RECIP_BITS)",
           "p = (e * one * recip) >> K.SOFTMAX_RECIP_BITS", ("softmax_poly", "softmax_shift"),
           "softmax variants: probabilities floored"),
    Mutant("ln32_eps_shift_plus1", "int_kernels_variants", "k = np.maximum(k_d, k0)", "k = np.maximum(k_d, k0 + 1)",
           ("layernorm_int32",), "layernorm_int32: pre-shift at least eps_shift + 1"),
    Mutant("ln32_eps_shifted_by_k", "int_kernels_variants", "np.minimum(2 * (k - k0), 31)", "np.minimum(k - k0, 31)",
           ("layernorm_int32",), "layernorm_int32: eps shifted by k - eps_shift, not twice that"),
    Mutant("ln32_preshift_floor", "int_kernels_variants", "d_s = rounding_shift_right(d, k)           ",
           "d_s = d >> k                               ",
           ("layernorm_int32",), "layernorm_int32: pre-shift floors"),
    Mutant("ln32_mc_halved", "int_kernels_variants", "m_c = math.isqrt(LN32_SUMSQ_MAX // c)",
           "m_c = math.isqrt(LN32_SUMSQ_MAX // c) // 2", ("layernorm_int32",),
           "layernorm_int32: pre-shift target M_C / 2 (one bit too many)"),
    Mutant("ln32_recip_rounded", "int_kernels_variants", "inv = (1 << LN32_RECIP_BITS) // r",
           "inv = ((1 << LN32_RECIP_BITS) + r // 2) // r", ("layernorm_int32",), "layernorm_int32: reciprocal rounded"),
    Mutant("ln32_t_floor", "int_kernels_variants", "t = rounding_shift_right(d_s * inv, LN32_T_SHIFT)",
           "t = (d_s * inv) >> LN32_T_SHIFT", ("layernorm_int32",), "layernorm_int32: t floored"),
    Mutant("isqrt32_strict", "int_kernels_variants", "take = rem >= trial", "take = rem > trial", ("layernorm_int32",),
           "isqrt32: rem > trial (wrong at perfect squares)"),
    Mutant("isqrt32_starts_4p13", "int_kernels_variants",
           "bit = np.int64(1) << np.int64(2 * (ISQRT32_BITS - 1))",
           "bit = np.int64(1) << np.int64(2 * (ISQRT32_BITS - 3))", ("layernorm_int32",),
           "isqrt32: starts at 4^13 (wrong for q >= 2^28)"),
    Mutant("ln_wide_sumsq_int32", "int_kernels_variants", "q = (d * d).sum(axis=1, keepdims=True) + eps_int",
           "q = (d * d).astype(np.int32).sum(axis=1, keepdims=True) + eps_int", ("layernorm_wide",),
           "layernorm_wide: d^2 in 32 bits (wraps on int16 input)"),
    Mutant("ln_wide_recip_off_by_one", "int_kernels_variants", "inv = (1 << K.LN_RECIP_BITS) // r",
           "inv = ((1 << K.LN_RECIP_BITS) - 1) // r", ("layernorm_wide",), "layernorm_wide: floor((2^40 - 1) / r)"),
    Mutant("ln_wide_t_floor", "int_kernels_variants", "t = rounding_shift_right(d * inv, K.LN_T_SHIFT)",
           "t = (d * inv) >> K.LN_T_SHIFT", ("layernorm_wide",), "layernorm_wide: t floored"),
    Mutant("add_wide_floor", "int_kernels_variants", "return saturate(rounding_shift_right(acc, s), out_dtype)",
           "return saturate(acc >> s, out_dtype)", ("add_wide",), "add_wide: floors instead of rounding"),
    Mutant("add_wide_always_int16", "int_kernels_variants", "return saturate(rounding_shift_right(acc, s), out_dtype)",
           "return saturate(rounding_shift_right(acc, s), np.int16)", ("add_wide",),
           "add_wide: ignores out_dtype int8"),
    Mutant("add_wide_b_8bit", "int_kernels_variants", "acc = a.astype(np.int64) * ma + b.astype(np.int64) * mb",
           "acc = a.astype(np.int64) * ma + b.astype(np.int8).astype(np.int64) * mb", ("add_wide",),
           "add_wide: b read through an 8-bit port"),
    Mutant("w4_always_single", "int_kernels_variants",
           "return K.conv_requantize(g, shape, bias, multiplier, shift, rounding=rounding,",
           "return K.conv_requantize(g, shape, bias, multiplier, shift, rounding=SINGLE_ROUND,", ("conv2d_w4",),
           "conv2d_w4: ignores the rounding mode"),
    Mutant("w4_always_int8", "int_kernels_variants", "out_dtype=out_dtype,\n                             internals=internals, fn=\"conv2d_w4\")",
           "out_dtype=np.int8,\n                             internals=internals, fn=\"conv2d_w4\")", ("conv2d_w4",),
           "conv2d_w4: ignores out_dtype int16"),
    Mutant("mixed_pot_rows_unsigned", "int_kernels_variants", "return K.conv2d(x, weight, bias, multiplier, shift,",
           "return K.conv2d(x, np.where(pot_rows[:, None, None, None], np.abs(weight), weight), bias, multiplier, "
           "shift,", ("conv2d_mixed_pot",),
           "conv2d_mixed_pot: the power-of-two rows lose their sign"),
    Mutant("mixed_pot_always_single", "int_kernels_variants",
           "rounding=rounding, out_dtype=out_dtype, internals=internals)",
           "rounding=SINGLE_ROUND, out_dtype=out_dtype, internals=internals)",
           ("conv2d_mixed_pot",), "conv2d_mixed_pot: ignores the rounding mode"),
]
# fmt: on


# ---------------------------------------------------------------------------------------------
# loading mutated copies of the modules
# ---------------------------------------------------------------------------------------------

def _source(module: str) -> str:
    return SPEC_ISQRT if module == "spec_isqrt" else (SRC / f"{module}.py").read_text()


class StaleMutant(AssertionError):
    pass


def _apply(source: str, mutant: Mutant) -> str:
    count = source.count(mutant.old)
    if count != 1:
        raise StaleMutant(f"mutant {mutant.id}: fragment {mutant.old!r} occurs {count} times in "
                          f"refvit/{mutant.module}.py (must be exactly once): update it in MUTANTS, {Path(__file__).name}")
    return source.replace(mutant.old, mutant.new)


def _load(module: str, source: str, **deps) -> types.ModuleType:
    """Execute `source` as a fresh module refvit.<module>; its imports of refvit.<name> (`from refvit.<name>
    import f` and `from refvit import <name>`) get deps[name], a copy, in place of refvit's own."""
    mod = types.ModuleType(f"refvit.{module}")
    mod.__file__ = str(SRC / f"{module}.py")
    saved = {n: (sys.modules.get(f"refvit.{n}"), getattr(refvit, n, None)) for n in deps}
    try:
        for n, dep in deps.items():
            sys.modules[f"refvit.{n}"] = dep
            setattr(refvit, n, dep)
        exec(compile(source, f"<mutated refvit/{module}.py>", "exec"), mod.__dict__)
    finally:
        for n, (entry, attr) in saved.items():
            sys.modules[f"refvit.{n}"] = entry
            setattr(refvit, n, attr)
    return mod


def _modules(mutant: Mutant | None):
    """(intmath, int_kernels, int_kernels_prune, int_kernels_variants), fresh copies with the mutant applied to
    one of them (the kernel modules always import the copy of intmath; the variants the copy of int_kernels)."""
    src = {m: _source(m) for m in MODULES}
    if mutant is not None and mutant.module in src:
        src[mutant.module] = _apply(src[mutant.module], mutant)
    im = _load("intmath", src["intmath"])
    ik = _load("int_kernels", src["int_kernels"], intmath=im)
    ikp = _load("int_kernels_prune", src["int_kernels_prune"], intmath=im)
    ikv = _load("int_kernels_variants", src["int_kernels_variants"], intmath=im, int_kernels=ik)
    if mutant is not None and mutant.module == "spec_isqrt":
        spec = {"np": np}
        exec(compile(_apply(SPEC_ISQRT, mutant), "<mutated spec isqrt>", "exec"), spec)
        ik.isqrt = ikv.isqrt = spec["isqrt"]           # what layernorm and layernorm_wide call
    return im, ik, ikp, ikv


def _dut(*modules) -> DUT:
    """A DUT whose per-op methods are the (mutated) modules' functions of the reference's names (the first
    module that has the name: int_kernels, intmath, int_kernels_prune, int_kernels_variants); a kernel of
    another module (refvit/int_kernels_authors.py: tests/test_mutation_authors.py mutates it) is refvit's own."""
    methods = {}
    order = (modules[1], modules[0]) + modules[2:]
    for op, fn in REFERENCE_KERNELS.items():
        impl = next((getattr(m, fn.__name__) for m in order if hasattr(m, fn.__name__)), None)
        if impl is None:
            assert fn.__module__ not in {f"refvit.{m}" for m in MODULES}, f"{op}: no function {fn.__name__}"
            impl = fn
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
    """The harness itself: fresh copies of the unmutated modules pass every quick per-op case, and so does
    layernorm (and layernorm_wide) with the spec's isqrt in place of the reference's."""
    mods = _modules(None)
    dut = _dut(*mods)
    bad = [r.message for r in (run_case(dut, get_case(s.name)) for s in _cases(PER_OP)) if r.status != "PASS"]
    assert bad == []
    spec = {"np": np}
    exec(SPEC_ISQRT, spec)
    mods[1].isqrt = mods[3].isqrt = spec["isqrt"]
    assert [r.message for r in (run_case(dut, get_case(s.name)) for s in _cases(("layernorm", "layernorm_wide")))
            if r.status != "PASS"] == []


def test_mutant_table_is_well_formed():
    assert len(MUTANTS) >= 24 and len({m.id for m in MUTANTS}) == len(MUTANTS)
    sources = {m: _source(m) for m in MODULES + ("spec_isqrt",)}
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
    modules = dict.fromkeys(m.module for m in MUTANTS)
    per_module = ", ".join(f"{mod} {sum(r.startswith('  killed') for r, m in zip(rows, MUTANTS) if m.module == mod)}"
                           f"/{sum(m.module == mod for m in MUTANTS)}" for mod in modules)
    print(f"\nmutation kill rate: {killed}/{len(MUTANTS)} = {100.0 * killed / len(MUTANTS):.1f}% "
          f"({time.perf_counter() - t0:.1f} s; {per_module})\n" + "\n".join(rows))
    assert bad == [], "\n".join(bad)
