"""The authors' code variants' fast kernels equal their plain reference kernels (refvit/reference/authors.py, the
spec's pseudocode as Python-int loops): outputs and internals, on every quick conformance case of each kernel."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from conformance.cases import get_case, select
from refvit import int_kernels_authors as KA
from refvit.reference import authors as RH
from refvit import registry as R

KERNELS = ("gelu_poly_ibert_code", "softmax_poly_ibert_code", "softmax_shift16", "attention_context_p16",
           "layernorm_ibert_code", "select_tokens_score_order", "prune_tokens_mean_any_order",
           "prune_tokens_weighted_sum")


def _args(case):
    args = []
    for v in case.inputs.values():
        args.extend(v.values() if isinstance(v, dict) else [v])
    kw = {k: (np.dtype(v) if k == "out_dtype" else v) for k, v in case.params.items()}
    return args, kw


SLOW_KERNELS = ("softmax_poly_ibert_code", "softmax_shift16")   # ~8 s each: the plain softmax over 16384-row cases


@pytest.mark.parametrize("kernel", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_KERNELS else k
                                    for k in KERNELS])
def test_fast_kernel_equals_reference_on_the_quick_cases(kernel):
    fast, ref = getattr(KA, kernel), getattr(RH, kernel)
    assert list(inspect.signature(fast).parameters) == list(inspect.signature(ref).parameters)
    assert R.by_kernel_name(kernel).reference is ref                                 # the row's reference kernel
    names = [s.name for s in select("quick") if s.op == kernel]
    assert names
    takes_internals = "internals" in inspect.signature(fast).parameters
    for name in names:
        args, kw = _args(get_case(name))
        a, b = {}, {}
        got = fast(*args, **kw, **({"internals": a} if takes_internals else {}))
        want = ref(*args, **kw, **({"internals": b} if takes_internals else {}))
        assert got.dtype == want.dtype and np.array_equal(got, want), name
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name


def test_restated_constants_are_the_fast_kernels():
    """refvit/reference/authors.py restates the Part 4 constants instead of importing the fast kernels."""
    from refvit import int_kernels_authors as KA
    from refvit import int_kernels_variants as KV
    for name in ("EXP_CODE_LN2", "EXP_CODE_QB", "EXP_CODE_QC", "EXP_CODE_SHIFT", "SOFTMAX_CODE_CAP",
                 "SHIFTMAX16_NUM", "SHIFTMAX16_SHIFT", "MAX_TOKENS_P16"):
        assert getattr(RH, name) == getattr(KA, name), name
    for name in ("EXP_SHIFT_ONE", "EXP_SHIFT_MAX_Q", "EXP_FRAC_BITS", "SOFTMAX_SHIFT_CAP"):
        assert getattr(RH, name) == getattr(KV, name), name
