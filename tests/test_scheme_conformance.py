"""The scheme variants' conformance cases tell neighbouring variants apart (issue 8).

For every ordered pair (required, implemented) of variants of one op family (GELU table / poly / shift, softmax
table / poly / shift, LayerNorm int64 / int32 / wide, residual add int8 / int16, conv weights w8 / w4 /
mixed-pot), a DUT that implements `implemented` where `required` is asked for must FAIL at least one of
`required`'s quick cases (a FAIL: wrong values, not an ERROR):

- per op: the DUT's method of the required kernel computes the implemented kernel, its constants built from the
  same scales: GELU scales are recovered by matching the case's constants against the builders over the cases'
  scale grid; softmax constants are the same real rescale (the table's index unit 2^-4, the variants' 2^-14: the
  same multiplier, the shift 10 apart); LayerNorm eps is the same integer eps image (int32: eps_int * 4^eps_shift);
  conv weights are the case's codes re-encoded by the implemented variant's offline rule (w8: max / 127; w4:
  max / 7; mixed-pot: half the rows as powers of two), the bias and rescale following the new row scales; an
  int8-only LayerNorm or adder reads int16 operands saturated to int8;
- per model: the DUT runs the model quantized (same float model, same calibration) with the scheme that has the
  implemented variant in place of the required one (an int16 residual stream with an int64 LayerNorm being no
  scheme, its LayerNorm becomes `wide`; mixed-pot weights with the `mixed-pot` scheme's fraction).

One direction cannot fail, by the spec: `layernorm_wide` on int8 input *is* part 2's `layernorm` (a conforming
superset), so a `wide` DUT passes every `int64` case; asserted here too, as are the other superset facts
(`add_wide` on int8 operands is `add`; part 2's `conv2d` computes the w4 and mixed-pot codes exactly, which is why
the conv neighbours differ in their weight codes, not in their arithmetic).
"""
from __future__ import annotations

import inspect
import itertools
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest

from conformance import ERROR, FAIL, PASS, RefvitDUT, run_cases, select
from conformance.cases import GELU_CODE_SCALES, SCHEME_MODEL_CASES, get_case, random_quantized_model
from conformance.dut import REFERENCE_KERNELS
from refvit import int_kernels as K
from refvit import int_kernels_authors as KA
from refvit.int_kernels_prune import divide_round
from refvit import int_kernels_variants as KV
from refvit import int_model
from refvit import registry as R
from refvit.graph import SCHEMES, GraphError
from refvit.intmath import (DOUBLE_ROUND, INT32_MAX, SINGLE_ROUND, quantize_multiplier, round_half_away_from_zero,
                            saturate)

# op family: (Scheme field, {variant: the kernel / DUT method})
FAMILIES = {
    "gelu": ("gelu", {"table": "gelu", "poly": "gelu_poly", "shift": "gelu_shift",
                      "poly-ibert-code": "gelu_poly_ibert_code"}),
    "softmax": ("softmax", {"table": "softmax", "poly": "softmax_poly", "shift": "softmax_shift",
                            "poly-ibert-code": "softmax_poly_ibert_code", "shift16": "softmax_shift16"}),
    "layernorm": ("layernorm", {"int64": "layernorm", "int32": "layernorm_int32", "wide": "layernorm_wide",
                                "ibert-code": "layernorm_ibert_code"}),
    "add": ("residual", {"int8": "add", "int16": "add_wide"}),
    "conv2d": ("conv", {"w8": "conv2d", "w4": "conv2d_w4", "mixed-pot": "conv2d_mixed_pot"}),
    # no Scheme field: the context follows the softmax's output dtype, the pruning records the prune options
    "attention_context": (None, {"int32": "attention_context", "p16": "attention_context_p16"}),
    "token_select": (None, {"cls_attention": "select_tokens", "cls_attention-score-order": "select_tokens_score_order"}),
    "token_prune": (None, {"package": "prune_tokens", "mean-any-order": "prune_tokens_mean_any_order",
                           "weighted-sum": "prune_tokens_weighted_sum"}),
}
PARAMETER_VARIANTS = {"pot", "acc-narrow", "table-n", "a16"}   # by scheme parameters: test_scheme_params, test_a16
PAIRS = [(fam, req, impl) for fam, (_, variants) in FAMILIES.items()
         for req, impl in itertools.permutations(variants, 2)]
# the quick run (-m "not slow") takes a cycle of each family: every variant once required, once implemented
QUICK_PAIRS = {(fam, v[i], v[(i + 1) % len(v)]) for fam, (_, variants) in FAMILIES.items()
               for v in [list(variants)] for i in range(len(v))}

SAME_KERNEL = {("layernorm", "int64", "wide"),      # identical on every input of the required variant
               ("token_prune", "package", "mean-any-order")}
SAME_PER_OP = SAME_KERNEL | {("add", "int8", "int16")}   # identical on the per-op cases (int8 operands)


def _arg_names(kernel: str) -> list:
    return [p.name for p in inspect.signature(REFERENCE_KERNELS[kernel]).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD]


# ---------------------------------------------------------------- per-op adapters: kernel `req` computed by `impl`

GELU_BUILD = {"gelu": lambda s_in, s_out: {"table": K.make_gelu_table(s_in, s_out)},
              "gelu_poly": KV.gelu_poly_constants, "gelu_shift": KV.gelu_shift_constants,
              "gelu_poly_ibert_code": KA.gelu_poly_ibert_code_constants}


def _gelu_scales(kernel: str, given: dict) -> tuple:
    """The (scale_in, scale_out) of the cases' grid whose constants by `kernel`'s builder are `given`."""
    for s_in, s_out in GELU_CODE_SCALES:
        built = GELU_BUILD[kernel](s_in, s_out)
        if all(np.array_equal(np.asarray(v), np.asarray(given[k])) for k, v in built.items()):
            return s_in, s_out
    raise NotImplementedError(f"{kernel}: constants not built from a scale pair of the cases' grid")


def _gelu_adapter(req: str, impl: str):
    def method(self, x, *consts, rounding=SINGLE_ROUND):
        s_in, s_out = _gelu_scales(req, dict(zip(_arg_names(req)[1:], consts)))
        kw = {} if impl == "gelu" else {"rounding": rounding}
        return REFERENCE_KERNELS[impl](x, **GELU_BUILD[impl](s_in, s_out), **kw)
    return method


def _softmax_adapter(req: str, impl: str):
    def method(self, scores, multiplier, shift, *table, rounding=SINGLE_ROUND):
        unit = {"softmax": K.EXP_INDEX_BITS}                  # the variants' unit is 2^-EXP_FRAC_BITS
        bits = lambda k: unit.get(k, KV.EXP_FRAC_BITS)       # noqa: E731
        s = np.int8(int(shift) + bits(req) - bits(impl))     # the same real rescale, another unit
        extra = (table or (K.make_exp_table(),)) if impl == "softmax" else ()
        return REFERENCE_KERNELS[impl](scores, multiplier, s, *extra, rounding=rounding)
    return method


def _eps_int32(eps: int) -> tuple:
    """The integer eps image as (eps_int, eps_shift), eps_int = round(eps / 4^k) <= 2^29 - 1, k smallest."""
    k = 0
    while (eps + (1 << 2 * k >> 1)) >> 2 * k > KV.LN32_EPS_MAX:
        k += 1
    return np.int64(max(1, (eps + (1 << 2 * k >> 1)) >> 2 * k)), np.int64(k)


def _layernorm_adapter(req: str, impl: str):
    def method(self, x, *args, rounding=SINGLE_ROUND):
        n_eps = {"layernorm_int32": 2, "layernorm_ibert_code": 0}.get(req, 1)
        eps = int(args[0]) << (2 * int(args[1])) if n_eps == 2 else int(args[0]) if n_eps else 1  # I-BERT: no eps
        eps_args = (_eps_int32(eps) if impl == "layernorm_int32" else () if impl == "layernorm_ibert_code"
                    else (np.int64(min(eps, K.MAX_LN_EPS_INT)),))
        if impl in ("layernorm", "layernorm_ibert_code"):    # part 2's and I-BERT's datapaths have an int8 input
            x = saturate(x, np.int8)
        return REFERENCE_KERNELS[impl](x, *eps_args, *args[n_eps:], rounding=rounding)
    return method


def _add_adapter(req: str, impl: str):
    def method(self, a, b, multiplier_a, multiplier_b, shift, *, out_dtype=np.int8 if req == "add" else np.int16):
        if impl == "add":                                    # an int8 adder: int8 ports
            a, b = saturate(a, np.int8), saturate(b, np.int8)
        return REFERENCE_KERNELS[impl](a, b, multiplier_a, multiplier_b, shift, out_dtype=out_dtype)
    return method


ENCODE = {  # the offline weight rule of each conv variant: float weights -> (codes, scales, extra constants)
    "conv2d": lambda w: (*KV.per_channel_weight_mixed_pot(w, 0.0)[:2], {}),      # fraction 0: the int8 rule
    "conv2d_w4": lambda w: (*KV.per_channel_weight_w4(w), {}),
    "conv2d_mixed_pot": lambda w: (lambda c, s, p: (c, s, {"pot_rows": p}))(*KV.per_channel_weight_mixed_pot(w, 0.5)),
}


def _conv_adapter(req: str, impl: str):
    def method(self, x, weight, bias, multiplier, shift, *pot_rows, rounding=SINGLE_ROUND, out_dtype=np.int8):
        codes, scales, extra = ENCODE[impl](weight.astype(np.float64))   # scales in units of the case's codes
        real = np.asarray(multiplier, np.float64) * 2.0 ** -np.asarray(shift, np.float64) * scales
        pairs = [quantize_multiplier(float(r)) for r in real]
        bias2 = round_half_away_from_zero(np.asarray(bias, np.float64) / scales)
        if np.abs(bias2).max() > INT32_MAX:
            raise NotImplementedError("re-encoded bias beyond int32")
        return REFERENCE_KERNELS[impl](x, codes, bias2.astype(np.int32), np.array([m for m, _ in pairs], np.int32),
                                       np.array([s for _, s in pairs], np.int8), *extra.values(), rounding=rounding,
                                       out_dtype=out_dtype)
    return method


def _context_adapter(req: str, impl: str):
    """int8 p at 1/127 <-> int16 p at 2^-15: the probabilities and the rescale converted to the other width."""
    def method(self, p, v, multiplier, shift, *, rounding=SINGLE_ROUND):
        one = {"attention_context": K.PROB_ONE, "attention_context_p16": KA.PROB16_ONE}
        hi = {"attention_context": K.PROB_ONE, "attention_context_p16": KA.PROB16_MAX}[impl]
        p2 = np.minimum(divide_round(p.astype(np.int64) * one[impl], one[req]), hi)
        p2 = p2.astype(np.int8 if impl == "attention_context" else np.int16)
        m, s = quantize_multiplier(int(multiplier) * 2.0 ** -int(shift) * one[impl] / one[req])
        return REFERENCE_KERNELS[impl](p2, v, np.int32(m), np.int8(s), rounding=rounding)
    return method


def _select_adapter(req: str, impl: str):
    def method(self, p, **kw):                           # the same arguments
        return REFERENCE_KERNELS[impl](p, **kw)
    return method


def _prune_adapter(req: str, impl: str):
    def method(self, x, p, index, **kw):                 # a position-order pruner reads the kept positions sorted
        return REFERENCE_KERNELS[impl](x, p, np.sort(index, axis=1) if impl == "prune_tokens" else index, **kw)
    return method


ADAPTERS = {"gelu": _gelu_adapter, "softmax": _softmax_adapter, "layernorm": _layernorm_adapter, "add": _add_adapter,
            "conv2d": _conv_adapter, "attention_context": _context_adapter, "token_select": _select_adapter,
            "token_prune": _prune_adapter}


def neighbour_dut(family: str, req: str, impl: str):
    """A DUT whose method for variant `req`'s kernel computes variant `impl`'s kernel."""
    variants = FAMILIES[family][1]
    method = ADAPTERS[family](variants[req], variants[impl])
    return type(f"{impl}_as_{req}", (RefvitDUT,), {variants[req]: method})()


# ---------------------------------------------------------------- per-model adapter: the neighbour scheme's model

MODEL_CASES = {"refvit-int8": "model_c48_d2_h3_img32_p8_b2_single"} | {
    s: f"model_{s}_c48_d2_h3_img32_p8_b2_single" for s in SCHEME_MODEL_CASES}


def neighbour_scheme(scheme, field: str, variant: str):
    """`scheme` with `variant` for `field` (an int16 stream needs a LayerNorm that reads it: wide; mixed-pot takes
    the named scheme's fraction, as fraction 0 is w8); None if not a valid scheme."""
    extra = {"layernorm": "wide"} if field == "residual" and variant == "int16" and scheme.layernorm == "int64" else {}
    if field == "conv" and variant == "mixed-pot":
        extra = {"pot_fraction": SCHEMES["mixed-pot"].pot_fraction}
    try:
        return replace(scheme, name=f"{scheme.name}+{field}={variant}", **{field: variant}, **extra)
    except GraphError:
        return None


@lru_cache(maxsize=None)
def _neighbour_model(scheme):
    return random_quantized_model(48, 2, 3, 32, 8, True, SINGLE_ROUND, scheme)[0]


def model_dut(scheme):
    qm = _neighbour_model(scheme)

    class NeighbourModel(RefvitDUT):
        def model(self, x, constants, *, graph):
            return int_model.forward_int(qm, x)
    return NeighbourModel()


def composite_statuses(family: str, req: str, impl: str) -> dict:
    """The quick block and model cases with token pruning whose graphs use the required variant's kernel, run by
    the neighbour DUT (its per-op method of that kernel computes the implemented variant)."""
    kernel = FAMILIES[family][1][req]
    cases = [s for s in select("quick") if s.op in ("block", "model") and "prune" in s.name
             and any(r["op"] == family and r["variant"] == req for r in get_case(s.name).params["graph"])]
    assert cases, f"no block or model case uses {kernel}"
    return _statuses(run_cases(neighbour_dut(family, req, impl), cases))


def _statuses(results) -> dict:
    return {r.case: r.status for r in results}


# ---------------------------------------------------------------- the tests

def test_families_are_the_graphs_variants():
    """FAMILIES names every variant of the graph's op families by its kernel, and each has quick cases."""
    assert len(PAIRS) == 4 * 3 + 5 * 4 + 4 * 3 + 2 + 3 * 2 + 2 + 2 + 3 * 2
    quick_ops = {s.op for s in select("quick")}
    for op, (field, variants) in FAMILIES.items():
        assert set(R.variants(op)) - PARAMETER_VARIANTS == set(variants), op
        assert all(R.row(op, v).kernel_name == kernel and kernel in quick_ops for v, kernel in variants.items())


@pytest.mark.parametrize("family, req, impl", [pytest.param(*p, id="{}-{}-as-{}".format(*p),
                                                          marks=() if p in QUICK_PAIRS else pytest.mark.slow)
                                             for p in PAIRS])
def test_neighbour_variant_fails_the_required_variants_cases(family, req, impl):
    field, variants = FAMILIES[family]
    per_op = _statuses(run_cases(neighbour_dut(family, req, impl), [s for s in select("quick")
                                                                      if s.op == variants[req]]))
    if field is None:
        if (family, req, impl) in SAME_KERNEL:            # mean-any-order on increasing positions is prune_tokens
            assert set(per_op.values()) == {PASS}
            return
        assert FAIL in per_op.values(), per_op
        if family in ("token_select", "token_prune"):     # (the order shows in a block's tokens, not in logits)
            composite = composite_statuses(family, req, impl)
            if (family, req, impl) != ("token_prune", "mean-any-order", "package"):   # same package, same order
                assert FAIL in composite.values(), composite
        return                                            # attention_context: no scheme has the other width
    models = {}
    for scheme_name, case in MODEL_CASES.items():
        scheme = SCHEMES[scheme_name]
        nb = neighbour_scheme(scheme, field, impl) if getattr(scheme, field) == req else None
        if nb is not None:
            models |= _statuses(run_cases(model_dut(nb), [s for s in select("quick") if s.name == case]))
    if (family, req, impl) in SAME_KERNEL:                # wide on int8 is part 2's layernorm: it must pass
        assert set(per_op.values()) == {PASS} and set(models.values()) <= {PASS}
        return
    if (family, req, impl) in SAME_PER_OP:                # same on int8 operands; the models tell them apart
        assert set(per_op.values()) == {PASS}
    else:
        assert FAIL in per_op.values(), per_op
    assert all(st == FAIL for st in models.values()), models
    assert models or (family, req, impl) in (("layernorm", "wide", "int64"), ("layernorm", "wide", "ibert-code")), \
        f"no model case for {field} {req}"   # wide is used with an int16 stream only, which they cannot read


def test_superset_kernels_agree_on_their_subsets():
    """Part 2's conv2d computes the w4 and mixed-pot cases exactly (an ERROR only where the w4 bias headroom
    exceeds the int8 one); add_wide on int8 operands is add; layernorm_wide on int8 input is layernorm."""
    conv = type("W8", (RefvitDUT,), {"conv2d_w4": staticmethod(K.conv2d),
                                     "conv2d_mixed_pot": staticmethod(lambda x, w, b, m, s, pot, **kw:
                                                                      K.conv2d(x, w, b, m, s, **kw))})()
    st = _statuses(run_cases(conv, [s for s in select("quick") if s.op in ("conv2d_w4", "conv2d_mixed_pot")]))
    assert {c for c, v in st.items() if v != PASS} == {"conv_w4_1x1_maxacc_cin3072_cout8_n4_single",
                                                       "conv_w4_1x1_maxacc_cin3072_cout8_n4_double"}
    assert {st[c] for c in st if "maxacc" in c and "w4" in c} == {ERROR}
    wide = type("Wide", (RefvitDUT,), {"add": staticmethod(KV.add_wide),
                                       "layernorm": staticmethod(KV.layernorm_wide)})()
    assert set(_statuses(run_cases(wide, [s for s in select("quick") if s.op in ("add", "layernorm")])).values()) \
        == {PASS}


def test_adapters_are_faithful_on_their_own_variant():
    """The adapters themselves: mapping a variant onto itself reproduces its cases, so a FAIL above is the
    neighbour's arithmetic, not the adapter's conversion. (GELU: designed constants, delta 0.5 and random
    tables have no scale pair of the grid: ERROR. Conv: only the w4 rule re-encodes its own codes as they are,
    every row's max being 7; the designed ties rows hold +-1.)"""
    for family, (_, variants) in FAMILIES.items():
        for v, kernel in variants.items():
            if family == "conv2d" and v != "w4":
                continue
            st = _statuses(run_cases(neighbour_dut(family, v, v), [s for s in select("quick") if s.op == kernel]))
            bad = {c: s for c, s in st.items() if s != PASS}
            if family == "conv2d":
                assert set(bad) <= {f"conv_w4_1x1_ties_cin1_cout4_n64_shift33_{m}" for m in ("single", "double")}
            elif family == "gelu":
                assert set(bad.values()) <= {ERROR} and all(any(t in c for t in ("designed", "randomtable", "min0",
                                                                                 "delta0.5")) for c in bad), bad
            else:
                assert bad == {}, (family, v, bad)


def test_rounding_pairs_differ():
    """Each _single/_double pair of the variant cases that exists for its rounding shows a difference."""
    names = {s.name for s in select("quick")}
    for base in ("gelu_poly_designed_cb8_cc50_c1_19_k2_shift32", "gelu_shift_min0_shift45",
                 "softmax_poly_rows16384_n2_shift33_randommult", "softmax_shift_rows16384_n2_shift33_randommult",
                 "layernorm_int32_preshift_ties_c192_n16", "layernorm_wide_int16_ties_r33554432_c192_n16_step256",
                 "conv_w4_1x1_ties_cin1_cout4_n64_shift33", "conv_mixedpot_frac0.5_1x1_ties_cin1_cout4_n64_shift33"):
        assert {f"{base}_single", f"{base}_double"} <= names
        a, b = get_case(f"{base}_single"), get_case(f"{base}_double")
        assert a.params["rounding"] == SINGLE_ROUND and b.params["rounding"] == DOUBLE_ROUND
        assert np.any(a.expected != b.expected), base
