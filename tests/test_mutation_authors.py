"""Mutation self-test of the authors' code variants' conformance cases (issue 19): each one-line mutant of
refvit/int_kernels_authors.py, loaded as a fresh module from an edited copy of the source, must FAIL at least one
quick case of the kernels it can affect (an ERROR does not count). A surviving mutant shows a missing case.

Equivalent mutants, left out as no input can tell them apart: I-BERT's float32 c_int 749502592 for 749502594
(every exponential is the same, tests/test_authors_code.py), a cap of 31 * 11356 (e is 0 from q = 30 on either
way) and (2^31 - 1) // std for 2^31 // std (they differ only for std a power of two, where t is the same for
every |y| <= 255)."""
from __future__ import annotations

import types
from pathlib import Path

import pytest

import refvit
from conformance import FAIL, RefvitDUT, run_case, select
from conformance.cases import get_case

SOURCE = Path(refvit.__file__).parent / "int_kernels_authors.py"

# (name, old fragment (exactly once in the source), new, the kernels whose cases must catch it)
MUTANTS = [
    ("exp_ln2", "EXP_CODE_LN2 = 11356 ", "EXP_CODE_LN2 = 11357 ", ["softmax_poly_ibert_code"]),
    ("exp_qb", "EXP_CODE_QB = 44356 ", "EXP_CODE_QB = 44357 ", ["softmax_poly_ibert_code"]),
    ("exp_shift", "return z >> (q + EXP_CODE_SHIFT)", "return z >> (q + EXP_CODE_SHIFT - 1)",
     ["softmax_poly_ibert_code"]),
    ("shiftmax16_round", "return ((e * factor) >> SHIFTMAX16_SHIFT)",
     "return ((e * factor + (1 << 15)) >> SHIFTMAX16_SHIFT)", ["softmax_shift16"]),
    ("shiftmax16_num", "factor = SHIFTMAX16_NUM // sigma", "factor = (SHIFTMAX16_NUM + 1) // sigma",
     ["softmax_shift16"]),
    ("mean_half_up", "((twice_rem == den) & (q % 2 == 1))", "(twice_rem == den)", ["layernorm_ibert_code"]),
    ("norm_round", "norm = (y * factor) >> 1  ", "norm = (y * factor + 1) >> 1  ", ["layernorm_ibert_code"]),
    ("t_floor", "t = rounding_shift_right(norm, LN_CODE_NORM_SHIFT)", "t = norm >> LN_CODE_NORM_SHIFT",
     ["layernorm_ibert_code"]),
    ("context_rounding", "return requantize(acc.astype(np.int64), m, s, out_dtype=np.int8, rounding=rounding)",
     "return requantize(acc.astype(np.int64), m, s, out_dtype=np.int8)", ["attention_context_p16"]),
    ("score_order_sorted", "return (order[:, :k] + int(num_prefix)).astype(np.int32)",
     "return (np.sort(order[:, :k], axis=1) + int(num_prefix)).astype(np.int32)", ["select_tokens_score_order"]),
    ("weighted_sum_den", "divide_round(num, p.shape[1] * PROB_ONE, rounding)", "divide_round(num, p.shape[1] * 128, rounding)",
     ["prune_tokens_weighted_sum"]),
    ("weighted_sum_rounding", "divide_round(num, p.shape[1] * PROB_ONE, rounding)",
     "divide_round(num, p.shape[1] * PROB_ONE)", ["prune_tokens_weighted_sum"]),
    ("mean_any_order_sorted", "return _assemble(tokens, index, ascending[:, :, 0, -1]",
     "return _assemble(tokens, np.sort(index, axis=1), ascending[:, :, 0, -1]", ["prune_tokens_mean_any_order"]),
]


def _mutated(old: str, new: str) -> types.ModuleType:
    text = SOURCE.read_text()
    assert text.count(old) == 1, f"stale mutant fragment {old!r}"
    module = types.ModuleType("int_kernels_authors_mutant")
    module.__file__ = str(SOURCE)
    exec(compile(text.replace(old, new), str(SOURCE), "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("name, old, new, kernels", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_fails_a_case(name, old, new, kernels):
    module = _mutated(old, new)
    dut = type(f"Mutant_{name}", (RefvitDUT,), {k: staticmethod(getattr(module, k)) for k in kernels})()
    statuses = [run_case(dut, get_case(s.name)).status for s in select("quick") if s.op in kernels]
    assert statuses and FAIL in statuses, f"mutant {name} survives: add a case"
