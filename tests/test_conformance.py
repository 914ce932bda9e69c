"""The conformance suite: refvit passes its own cases; deliberately broken DUTs fail with a precise message."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import conformance
from conformance import FAIL, PASS, DUT, ExternalCommandDUT, RefvitDUT, get_case, run_cases, select
from conformance.__main__ import main as conformance_main
from refvit import int_kernels as K
from refvit import intmath
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- broken adapters: one thing wrong each

class HalfToEvenDUT(RefvitDUT):
    """np.round (ties to even) instead of the spec's ties toward +inf."""
    def requantize(self, value, multiplier, shift, out_dtype=np.int8, rounding=SINGLE_ROUND):
        exact = np.asarray(value, np.float64) * np.asarray(multiplier, np.float64) / 2.0 ** np.asarray(shift)
        return intmath.saturate(np.round(exact).astype(np.int64), out_dtype)


class ShiftOffByOneDUT(RefvitDUT):
    def conv2d(self, x, weight, bias, multiplier, shift, *, rounding=SINGLE_ROUND, out_dtype=np.int8):
        return K.conv2d(x, weight, bias, multiplier, np.asarray(shift) + 1, rounding=rounding, out_dtype=out_dtype)


class WrapAroundDUT(RefvitDUT):
    """A cast instead of saturation."""
    def requantize(self, value, multiplier, shift, out_dtype=np.int8, rounding=SINGLE_ROUND):
        return intmath.apply_scale(value, multiplier, shift, rounding).astype(out_dtype)


class FloatLayerNormDUT(RefvitDUT):
    """Float mean / variance / sqrt, then the spec's gamma, bias and requantize."""
    def layernorm(self, x, eps_int, gamma, bias, multiplier, shift, *, rounding=SINGLE_ROUND):
        c = x.shape[1]
        xf = x.astype(np.float64)
        d = c * (xf - xf.mean(axis=1, keepdims=True))
        t = np.round(2.0 ** 16 * d / np.sqrt((d * d).sum(axis=1, keepdims=True) + float(eps_int))).astype(np.int64)
        acc = t * gamma.astype(np.int64).reshape(1, c, 1, 1) + bias.astype(np.int64).reshape(1, c, 1, 1)
        m, s = (np.asarray(v, np.int64).reshape(1, c, 1, 1) for v in (multiplier, shift))
        return intmath.requantize(acc, m, s, np.int8, rounding)


class AlwaysDoubleRoundDUT(RefvitDUT):
    def conv2d(self, x, weight, bias, multiplier, shift, *, rounding=SINGLE_ROUND, out_dtype=np.int8):
        return K.conv2d(x, weight, bias, multiplier, shift, rounding=DOUBLE_ROUND, out_dtype=out_dtype)


BROKEN = [  # (adapter, op whose cases it breaks, a case that must FAIL)
    (HalfToEvenDUT, "requantize", "requantize_ties_int8_single"),
    (ShiftOffByOneDUT, "conv2d", "conv1x1_cin192_cout576_n197_single"),
    (WrapAroundDUT, "requantize", "requantize_saturate_int8_single"),
    (FloatLayerNormDUT, "layernorm", "layernorm_c192_n197_single"),
    (AlwaysDoubleRoundDUT, "conv2d", "conv1x1_ties_cin1_cout4_n64_shift33_single"),
]


# ---------------------------------------------------------------- refvit against its own suite

def test_quick_set_passes_on_refvit():
    results = run_cases(RefvitDUT(), select("quick"))
    assert len(results) >= 60
    assert [r.message for r in results if r.status != PASS] == []
    assert conformance.summarize(results).startswith(f"{len(results)} passed, 0 failed, 0 errors")


def test_every_op_has_quick_cases_and_names_are_unique():
    quick = select("quick")
    assert {s.op for s in quick} == set(conformance.OPS)
    full = [s.name for s in select("full")]
    assert len(set(full)) == len(full) and {s.name for s in quick} < set(full)
    for part in ("requantize_shift2_", "requantize_shift62_", "_ties_", "_saturate_", "allneg128", "all127",
                 "maxacc", "_single", "_double", "randomtable", "squareminus1", "epsmax_c4096", "_recip",
                 "plainhead", "_shift31_", "_shift33_"):
        assert any(part in n for n in full), part


@conformance.parametrize_cases("quick", filter="softmax")   # the documented pytest recipe
def test_recipe_for_other_projects(case):
    conformance.check(RefvitDUT(), case)


def test_cases_are_deterministic():
    a = get_case("conv1x1_cin192_cout576_n197_single")
    get_case.cache_clear()
    b = get_case("conv1x1_cin192_cout576_n197_single")
    assert a is not b
    assert all(np.array_equal(a.inputs[k], b.inputs[k]) for k in a.inputs) and np.array_equal(a.expected, b.expected)


def test_tie_cases_really_are_ties():
    """Independent of refvit: value * multiplier is exactly an odd multiple of 2^(shift-1) (Python ints)."""
    for name in ("apply_scale_ties_shift2to62_single", "requantize_ties_int8_double"):
        c = get_case(name)
        v, m, s = (c.inputs[k].tolist() for k in ("value", "multiplier", "shift"))
        assert {2, 62} <= set(s)
        assert all((vi * mi) % (1 << si) == 1 << (si - 1) for vi, mi, si in zip(v, m, s))
        assert all(-(1 << (si - 1)) <= vi < (1 << (si - 1)) and 0 <= mi < 1 << 31 for vi, mi, si in zip(v, m, s))
    c = get_case("conv1x1_ties_cin1_cout4_n64_shift33_single")
    acc = c.inputs["x"].astype(np.int64)[0, 0, 0] * c.inputs["weight"].reshape(-1, 1) + c.inputs["bias"][:, None]
    assert np.all(acc % 8 == 4)                                      # acc * 2^30 / 2^33 = acc / 8: a tie
    single, double = c.expected, get_case("conv1x1_ties_cin1_cout4_n64_shift33_double").expected
    neg = (acc < 0).reshape(single.shape)
    assert np.all(single[neg] == double[neg] + 1) and np.all(single[~neg] == double[~neg])  # +inf vs away


def _rsr(v: int, s: int) -> int:                       # round(v / 2^s), ties toward +inf (Python ints)
    return (v + (1 << (s - 1))) >> s


def _ln_internals(case):
    """Per position (d list, q) of a layernorm case, in Python ints straight from the spec (no refvit)."""
    x = case.inputs["x"].astype(np.int64)
    c, eps = x.shape[1], int(case.inputs["eps_int"])
    out = []
    for b, h, w in np.ndindex(x.shape[0], x.shape[2], x.shape[3]):
        xs = [int(v) for v in x[b, :, h, w]]
        total = sum(xs)
        d = [c * v - total for v in xs]
        out.append((d, sum(v * v for v in d) + eps))
    return out


def _t(d: int, r: int) -> int:
    return _rsr(d * ((1 << 40) // r), 24)


def test_layernorm_internal_boundaries_really_are_there():
    """The designed layernorm cases put isqrt, the reciprocal and the t rounding exactly at their boundaries."""
    import math
    for mode in ("single", "double"):                   # q = 2^34 = (2^17)^2, inv = 2^23 exact, every t a tie
        case = get_case(f"layernorm_ties_r131072_c192_n16_{mode}")
        for d, q in _ln_internals(case):
            assert q == 1 << 34 and (1 << 40) % math.isqrt(q) == 0
            assert all(v * ((1 << 40) // math.isqrt(q)) % (1 << 24) == 1 << 23 for v in d)
        assert set(np.unique(case.inputs["gamma"])) == {-8, 8} and set(case.inputs["bias"]) == {4}
        assert set(case.inputs["multiplier"]) == {1 << 30} and set(case.inputs["shift"]) == {33}
    for name, r in (("layernorm_squareminus1_r131072_c192_n16_single", 1 << 17),
                    ("layernorm_squareminus1_r67109_c192_n16_single", 67109),
                    ("layernorm_squareminus1_r1071648761_c4096_n4_single", 1071648761)):
        for d, q in _ln_internals(get_case(name)):       # q = r^2 - 1: isqrt is r - 1, and r would change t
            assert q == r * r - 1 and math.isqrt(q) == r - 1
            assert any(_t(v, r - 1) != _t(v, r) for v in d)
    big = 1071648761 ** 2 - 1                            # a float sqrt alone is too big: float64 by 1, float32 by 8
    assert int(np.sqrt(np.float64(big))) == 1071648761 and int(np.sqrt(np.float32(big))) == 1071648761 + 7
    for d, q in _ln_internals(get_case("layernorm_recip_r393216_c192_n16_single")):
        r = math.isqrt(q)                                # frac(2^40 / r) >= 1/2: floor and rounded recip differ in t
        assert r == 3 << 17 and 2 * ((1 << 40) % r) >= r
        assert any(_rsr(v * ((1 << 40) // r), 24) != _rsr(v * ((1 << 40) // r + 1), 24) for v in d)
    for mode in ("single", "double"):                   # the top of the domain: C = 4096, eps_int = 2^61
        case = get_case(f"layernorm_epsmax_c4096_n8_{mode}")
        qs = [q for _, q in _ln_internals(case)]
        assert case.inputs["x"].shape[1] == 4096 and int(case.inputs["eps_int"]) == 1 << 61
        assert max(qs) == (1 << 61) + 4096 ** 3 * 255 ** 2 // 4 < 1 << 62
    for d, q in _ln_internals(get_case("layernorm_sumsq_above2p32_c4096_n4_single")):
        assert 1 << 32 < sum(v * v for v in d) < 3 << 31


def _softmax_rows(case):
    """Per row (idx, e, sigma) of a softmax case whose multiplier/shift make idx = d exactly."""
    assert int(case.inputs["multiplier"]) == 1 << 30 and int(case.inputs["shift"]) == 30
    table = [int(v) for v in case.inputs["exp_table"]]
    for row in case.inputs["scores"].reshape(-1, case.inputs["scores"].shape[-1]).tolist():
        idx = [min(max(row) - s, 255) for s in row]
        e = [table[i] for i in idx]
        yield idx, e, sum(e)


def test_softmax_internal_boundaries_really_are_there():
    case = get_case("softmax_n16_recip_ties_designedtable_single")
    exact_ties = below_ties = rounded_up = 0
    for _, e, sigma in _softmax_rows(case):
        recip = (1 << 40) // sigma
        for v in e:
            if (v * 127 * recip) % (1 << 40) == 1 << 39:                      # an exact tie of p
                exact_ties += 1
                assert (1 << 40) % sigma == 0
            elif (2 * 127 * v) % sigma == 0 and (2 * 127 * v // sigma) % 2 == 1:  # 127 e / sigma = k + 1/2
                below_ties += 1                                               # floor(2^40/sigma) lands below
                assert _rsr(v * 127 * recip, 40) == 127 * v // sigma
                rounded_up += 2 * ((1 << 40) % sigma) >= sigma
    assert exact_ties >= 4 and below_ties >= 12 and rounded_up >= 6
    shipped = K.make_exp_table()
    for name in ("softmax_n197_randomtable_single", "softmax_n197_randomtable_int32_single",
                 "softmax_n64_shift33_randomtable_double"):
        t = get_case(name).inputs["exp_table"]
        assert t[0] == 1 << 15 and 0 <= t.min() and t.max() <= 1 << 15 and not np.array_equal(t, shipped)
        assert t[254] != t[255]
    c = get_case("softmax_n197_randomtable_single")                          # indices reach the clamp at 255
    d_max = int(c.inputs["scores"].astype(np.int64).max(axis=-1).max() - c.inputs["scores"].min())
    assert (d_max * int(c.inputs["multiplier"])) >> int(c.inputs["shift"]) > 255


def test_other_internal_boundaries_really_are_there():
    for mode in ("single", "double"):                   # attention_context: every acc / 8 is a tie
        c = get_case(f"attention_context_ties_h2_d8_n16_shift33_{mode}")
        acc = np.einsum("bhij,bhdj->bhdi", c.inputs["p"].astype(np.int64), c.inputs["v"].astype(np.int64))
        assert np.all(acc % 8 == 4) and (acc < 0).any() and int(c.inputs["shift"]) == 33
    c = get_case("conv1x1_allmax_cin3071_cout4_n4_single")                 # no float32 holds Cin * 127^2
    total = 3071 * 127 * 127
    assert total % 2 == 1 and total > 1 << 25 and np.all(c.inputs["x"] == 127)
    assert np.all(np.abs(c.inputs["weight"]) == 127)
    assert not np.array_equal(get_case("gelu_randomtable_sweep_all256").inputs["table"], K.make_gelu_table(0.05, 0.02))


# ---------------------------------------------------------------- broken DUTs fail, precisely

@pytest.mark.parametrize("adapter, op, must_fail", BROKEN, ids=[b[0].__name__ for b in BROKEN])
def test_broken_adapter_fails_with_a_precise_message(adapter, op, must_fail):
    dut = adapter()
    results = {r.case: r for r in run_cases(dut, [s for s in select("quick") if s.op == op])}
    failed = results[must_fail]
    assert failed.status == FAIL, failed
    msg = failed.message
    assert msg.startswith(f"FAIL {op} [{must_fail}]: MISMATCH: ")
    # the reported first element really is the first mismatch, with the right values and count
    case = get_case(must_fail)
    actual = dut.run_case(case)
    differ = actual != case.expected
    first = tuple(int(i) for i in np.argwhere(differ)[0])
    assert f"{int(differ.sum())} of {differ.size} elements differ" in msg
    assert f"first at index {first}: expected {case.expected[first]}, actual {actual[first]}" in msg


def test_composites_use_the_dut_kernels():
    """block / model cases are composed from the DUT's own methods: a broken layernorm breaks them too (every
    composite whose graph calls `layernorm`; other schemes' LayerNorm variants are other methods)."""
    specs = [s for s in select("quick", "block_") + select("quick", "model_")
             if any(op["op"] == "layernorm" and op["variant"] == "int64" for op in get_case(s.name).params["graph"])]
    results = run_cases(FloatLayerNormDUT(), specs)
    assert len(results) >= 6 and all(r.status == FAIL for r in results), [r.line() for r in results]


def test_dtype_and_shape_are_checked_before_values():
    class Int16Out(RefvitDUT):
        def gelu(self, x, table):
            return K.gelu(x, table).astype(np.int16)

    class Transposed(RefvitDUT):
        def gelu(self, x, table):
            return K.gelu(x, table).transpose(0, 3, 2, 1)
    case = get_case("gelu_c768_n197")
    assert conformance.run_case(Int16Out(), case).message.endswith("BAD DTYPE: dtype int16, expected int8")
    message = conformance.run_case(Transposed(), case).message
    assert "BAD SHAPE: shape (1, 197, 1, 768), expected (1, 768, 1, 197)" in message


def test_errors_are_reported_not_raised():
    class NoOutput(RefvitDUT):
        def gelu(self, x, table):
            return None

    class Refuses(RefvitDUT):      # implemented (overridden), but raises: its cases are ERROR, not SKIP
        def gelu(self, x, table):
            raise NotImplementedError("only table sizes of 512")
    r = conformance.run_case(Refuses(), get_case("gelu_sweep_all256"))
    assert r.status == "ERROR" and "DUT raised NotImplementedError: only table sizes of 512" in r.message
    r = conformance.run_case(NoOutput(), get_case("gelu_sweep_all256"))
    assert r.status == "ERROR" and "produced no output" in r.message
    with pytest.raises(AssertionError, match=r"ERROR gelu \[gelu_sweep_all256\]: DUT produced no output"):
        conformance.check(NoOutput(), "gelu_sweep_all256")


# ---------------------------------------------------------------- what a DUT implements: SKIP, not ERROR

class Partial(DUT):
    """Two ops in plain Python ints (TOSA apply_scale_32), nothing else."""
    def apply_scale(self, value, multiplier, shift, rounding=SINGLE_ROUND):
        v, m, s = np.broadcast_arrays(value, multiplier, shift)
        out = [(a * b + (1 << (c - 1)) + ((1 << 30) if a >= 0 else -(1 << 30)) * (rounding == DOUBLE_ROUND and c > 31))
               >> c for a, b, c in zip(v.reshape(-1).tolist(), m.reshape(-1).tolist(), s.reshape(-1).tolist())]
        return np.array(out, np.int64).reshape(v.shape)

    def requantize(self, value, multiplier, shift, out_dtype=np.int8, rounding=SINGLE_ROUND):
        info = np.iinfo(np.dtype(out_dtype))
        return np.clip(self.apply_scale(value, multiplier, shift, rounding), info.min, info.max).astype(out_dtype)


def test_unimplemented_ops_are_skip_with_the_reason():
    specs = select("quick")
    results = run_cases(Partial(), specs)
    mine = [s.name for s in specs if s.op in ("apply_scale", "requantize")]
    assert [r.case for r in results if r.status == PASS] == mine
    skipped = [r for r in results if r.status == conformance.SKIP]
    assert len(skipped) == len(specs) - len(mine) and not [r for r in results if r.status in (FAIL, "ERROR")]
    by_name = {r.case: r for r in skipped}
    assert by_name["gelu_sweep_all256"].message == "SKIP gelu [gelu_sweep_all256]: Partial does not implement gelu"
    block = by_name["block_c48_h3_n18_b2_single"].message      # a block: every per-op method its graph calls
    graph_ops = {op["op"] for op in get_case("block_c48_h3_n18_b2_single").params["graph"]}
    assert {"layernorm", "conv2d", "softmax", "gelu", "add"} <= graph_ops
    assert all(m in block for m in ("layernorm", "conv2d", "softmax", "gelu", "add")) and "requantize" not in block
    assert "class Mine(Partial, conformance.RefvitDUT)" in block
    summary = conformance.summarize(results)
    assert summary.startswith(f"{len(mine)} passed, 0 failed, 0 errors, {len(skipped)} skipped ({len(specs)} cases)")
    assert "not implemented by the DUT: conv2d, attention_scores, softmax" in summary and "apply_scale" not in summary


def test_refvit_fallback_runs_blocks_and_models():
    class Mine(Partial, RefvitDUT):
        pass
    specs = select("quick", ops=["block", "model", "requantize"])
    results = run_cases(Mine(), specs)
    assert [r.status for r in results] == [PASS] * len(specs) and len(specs) >= 20


def test_implements_is_decided_by_the_method_not_by_calling_it():
    class Instance(DUT):
        pass
    dut = Instance()
    dut.gelu = lambda x, table: K.gelu(x, table)          # an instance attribute counts too
    assert conformance.implements(dut, "gelu") and not conformance.implements(dut, "softmax")
    assert conformance.implements(Partial, "requantize") and not conformance.implements(Partial, "conv2d")
    per_op = [op for op in conformance.OPS if op not in ("block", "model")]    # those two: DUT's compositions
    assert all(conformance.implements(RefvitDUT, op) for op in per_op)
    assert not conformance.implements(RefvitDUT, "block")
    assert conformance.missing_methods(ExternalCommandDUT("true"), get_case("gelu_sweep_all256")) == []
    assert conformance.missing_methods(Partial(), get_case("gelu_sweep_all256")) == ["gelu"]


# ---------------------------------------------------------------- CaseSpec fields and filters

def test_spec_rounding_and_params_are_the_built_cases():
    """Every quick case's spec declares exactly the keyword parameters its built case carries; block and model
    specs the rounding mode of every record of their graph."""
    for spec in select("quick"):
        case = get_case(spec.name)
        if spec.op in ("block", "model"):
            modes = {op["attrs"]["rounding"] for op in case.params["graph"] if "rounding" in op["attrs"]}
            assert modes == {spec.rounding} and spec.params["scheme"] in spec.name + "refvit-int8", spec.name
        else:
            assert dict(spec.params) == case.params and spec.rounding == case.params.get("rounding"), spec.name


def test_select_by_op_and_rounding():
    quick = select("quick")
    double = select("quick", rounding="double")
    assert double == select("quick", rounding=DOUBLE_ROUND) and 0 < len(double) < len(quick)
    assert [s.name for s in double] == [s.name for s in quick if get_case(s.name).params.get("rounding") in
                                        (None, DOUBLE_ROUND) and not (s.op in ("block", "model") and
                                                                      s.rounding == SINGLE_ROUND)]
    assert {s.op for s in select("quick", ops="softmax")} == {"softmax"}
    both = select("quick", ops=["gelu", "add"], rounding="single")
    assert {s.op for s in both} == {"gelu", "add"} and len(both) == sum(s.op in ("gelu", "add") for s in quick)
    with pytest.raises(ValueError, match="unknown op 'softmaxx'"):
        select("quick", ops=["softmaxx"])
    with pytest.raises(ValueError, match="unknown rounding mode"):
        select("quick", rounding="half_even")


# ---------------------------------------------------------------- check(): tracebacks and messages

def test_check_lets_the_dut_exception_through():
    class Crashing(RefvitDUT):
        def gelu(self, x, table):
            raise ZeroDivisionError("device fell over")
    with pytest.raises(ZeroDivisionError, match="device fell over") as info:
        conformance.check(Crashing(), "gelu_sweep_all256")
    assert info.traceback[-1].name == "gelu"                  # raised where the DUT raised it
    conformance.check(RefvitDUT(), "gelu_sweep_all256")       # passes: returns None
    with pytest.raises(pytest.skip.Exception, match="Partial does not implement gelu"):
        conformance.check(Partial(), "gelu_sweep_all256")


def test_mismatch_message_names_the_inputs_there_and_the_note():
    case = get_case("requantize_ties_int8_single")
    with pytest.raises(AssertionError) as info:
        conformance.check(HalfToEvenDUT(), case)
    msg = str(info.value)
    actual = HalfToEvenDUT().requantize(*case.inputs.values(), **case.params)
    i = int(np.argmax(actual != case.expected))
    v, m, s = (int(case.inputs[k][i]) for k in ("value", "multiplier", "shift"))
    assert f"inputs there: value={v}, multiplier={m}, shift={s}" in msg
    assert (v * m) % (1 << s) == 1 << (s - 1)                 # independently: that element is a tie
    assert f"largest difference {int(np.abs(actual.astype(int) - case.expected.astype(int)).max())}" in msg
    assert msg.endswith("; case note: ties, saturated to int8")
    conv = get_case("conv1x1_ties_cin1_cout4_n64_shift33_single")
    msg = conformance.run_case(AlwaysDoubleRoundDUT(), conv).message
    out = AlwaysDoubleRoundDUT().conv2d(*conv.inputs.values(), **conv.params)
    c = int(np.argwhere(out != conv.expected)[0][1])           # the channel of the first mismatch
    assert f"bias[{c}]=4, multiplier[{c}]={1 << 30}, shift[{c}]=33" in msg
    assert msg.endswith("case note: every output is a rounding tie")


def test_a_dut_cannot_change_the_cases():
    """Case arrays are read-only and containers are the DUT's own copies: a DUT that writes into its inputs
    gets an ERROR, and neither it nor one that edits its dicts changes later runs' inputs or expectations."""
    name = "gelu_sweep_all256"
    fresh = next(s for s in select("quick") if s.name == name).build()

    class Scribbler(RefvitDUT):
        def gelu(self, x, table):
            table[:] = 0
            return K.gelu(x, table)

    class Unlocker(RefvitDUT):
        def gelu(self, x, table):
            x.flags.writeable = True
            x += 1
            return K.gelu(x, table)

    class DictEditor(RefvitDUT):
        def run_case(self, case):
            case.inputs.clear()
            case.params["extra"] = 1
            raise RuntimeError("edited its dicts")

    for bad in (Scribbler(), Unlocker()):
        r = conformance.run_case(bad, get_case(name))
        assert r.status == "ERROR" and "ValueError" in r.message, r.message
    assert conformance.run_case(DictEditor(), get_case("block_c48_h3_n18_b2_single")).status == "ERROR"
    for case_name in (name, "block_c48_h3_n18_b2_single"):
        assert conformance.run_case(RefvitDUT(), get_case(case_name)).status == PASS
    case = get_case(name)
    assert np.array_equal(case.inputs["table"], fresh.inputs["table"]) and np.array_equal(case.expected, fresh.expected)
    assert not case.inputs["x"].flags.writeable and not case.expected.flags.writeable


# ---------------------------------------------------------------- external command DUT

SIMULATOR = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import numpy as np
from conformance.casefiles import read_case_inputs
from conformance.dut import RefvitDUT
from refvit.dumpfmt import hex_bytes
folder = sys.argv[1]
meta, inputs = read_case_inputs(folder)
out = np.asarray(getattr(RefvitDUT(), meta["op"])(*inputs.values(), **meta["params"]))
if meta["op"] in ("conv2d", "block"):
    open(folder + "/" + meta["output"]["files"]["hex"], "wb").write(hex_bytes(out))
else:
    np.save(folder + "/" + meta["output"]["files"]["npy"], out)
"""

EXTERNAL_CASES = ["requantize_ties_int8_single", "conv1x1_ties_cin1_cout4_n64_shift33_double",
                  "softmax_n197_ties_single", "block_c48_h3_n18_b2_single"]


def test_external_command_round_trip(tmp_path):
    script = tmp_path / "sim.py"
    script.write_text(SIMULATOR)
    dut = ExternalCommandDUT(f"{sys.executable} {script}", workdir=tmp_path / "work")
    results = run_cases(dut, [s for s in select("quick") if s.name in EXTERNAL_CASES])
    assert [(r.case, r.status) for r in results] == [(n, PASS) for n in sorted(EXTERNAL_CASES, key=[
        s.name for s in select("quick")].index)], [r.message for r in results]
    assert list((tmp_path / "work").iterdir()) == []                 # case folders cleaned up


def test_external_command_failures_are_errors(tmp_path):
    crash = ExternalCommandDUT(f"{sys.executable} -c 'import sys; sys.exit(3)'")
    r = conformance.run_case(crash, get_case("gelu_sweep_all256"))
    assert r.status == "ERROR" and "exited with status 3" in r.message
    silent = ExternalCommandDUT(f"{sys.executable} -c pass {{dir}}")
    r = conformance.run_case(silent, get_case("gelu_sweep_all256"))
    assert r.status == "ERROR" and "produced no output" in r.message


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie may linger where nothing reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir() or sys.platform == "win32", reason="needs POSIX and /proc")
def test_external_command_timeout_kills_the_process_group(tmp_path):
    """A simulator wrapper that hangs is killed with its children, and the runner does not wait for them."""
    import os
    import signal
    import time
    pidfile = tmp_path / "child.pid"
    script = tmp_path / "hang.sh"
    script.write_text(f"sleep 30 &\necho $! > {pidfile}\nwait\n")
    t0 = time.monotonic()
    r = conformance.run_case(ExternalCommandDUT(f"sh {script}", timeout=1), get_case("gelu_sweep_all256"))
    elapsed = time.monotonic() - t0
    pid = int(pidfile.read_text())
    try:
        assert r.status == "ERROR" and "timed out after 1 s" in r.message and "process group" in r.message, r
        assert elapsed < 15
        deadline = time.monotonic() + 5
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(pid), "the command's child survived the timeout"
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- the command line

def my_hex_int(path, dtype):
    bits = np.dtype(dtype).itemsize * 8
    vals = [int(v, 16) for v in path.read_text().split()]
    return [v - (1 << bits) if np.dtype(dtype).kind == "i" and v >= 1 << (bits - 1) else v for v in vals]


@pytest.mark.slow
def test_write_then_read_back_reproduces_expected(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "conformance", "write", str(tmp_path / "g"), "--formats", "npy,hex"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "g" / "index.json").read_text())
    assert [c["name"] for c in index["cases"]] == [s.name for s in select("quick")]
    for entry in index["cases"]:
        folder = tmp_path / "g" / entry["folder"]
        meta = json.loads((folder / "case.json").read_text())
        case = get_case(entry["name"])
        exp = meta["expected"]
        assert exp["dtype"] == case.expected.dtype.name and exp["shape"] == list(case.expected.shape)
        assert my_hex_int(folder / exp["files"]["hex"], exp["dtype"]) == case.expected.reshape(-1).tolist()
        assert np.array_equal(np.load(folder / exp["files"]["npy"]), case.expected)
        assert meta["params"] == case.params and meta["op"] == case.op
        first = meta["inputs"][0]
        assert my_hex_int(folder / first["files"]["hex"], first["dtype"]) == \
            np.asarray(case.inputs[first["name"]]).reshape(-1).tolist()


def test_cli_run_list_and_exit_codes(tmp_path, capsys):
    (tmp_path / "mydut.py").write_text("import numpy as np\nfrom conformance import RefvitDUT\n"
                                       "class Wrap(RefvitDUT):\n"
                                       "    def gelu(self, x, table):\n"
                                       "        return (table.astype(np.int16)[x.astype(np.int64) + 128] + 1)"
                                       ".astype(np.int8)\n")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "conformance", "run", "--filter", "gelu_sweep"]
    ok = subprocess.run(run + ["--dut", "conformance.dut:RefvitDUT"], cwd=tmp_path, env=env, capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "1 passed, 0 failed, 0 errors" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run(run + ["--dut", "mydut:Wrap"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "FAIL gelu [gelu_sweep_all256]: MISMATCH" in bad.stdout, bad.stdout + bad.stderr
    assert conformance_main(["run", "--dut", "nosuchmodule:X"]) == 2
    assert conformance_main(["list", "--filter", "zzz_nothing"]) == 2
    capsys.readouterr()
    assert conformance_main(["list", "--set", "full", "--filter", "conv1x1_cin3072"]) == 0
    assert "conv1x1_cin3072_cout768_n197_single  (conv2d)" in capsys.readouterr().out


def test_cli_dut_that_cannot_be_created_is_a_clean_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "conf_ctor_dut.py").write_text(
        "from conformance import RefvitDUT\n"
        "class NoDevice(RefvitDUT):\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('no device on /dev/fpga0')\n"
        "class NotADut:\n"
        "    pass\n")
    (tmp_path / "conf_import_dut.py").write_text("raise SystemError('vendor library missing')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for spec, says in (("conf_ctor_dut:NoDevice", "NoDevice() raised RuntimeError: no device on /dev/fpga0"),
                       ("conf_ctor_dut:NotADut", "is not a conformance DUT"),
                       ("conf_ctor_dut:Missing", "has no attribute 'Missing'"),
                       ("conf_import_dut:X", "raised SystemError: vendor library missing")):
        capsys.readouterr()
        assert conformance_main(["run", "--dut", spec, "--filter", "gelu_sweep"]) == 2, spec
        err = capsys.readouterr().err
        assert err.startswith("conformance: error: ") and says in err and err.count("\n") == 1, err
    for m in ("conf_ctor_dut", "conf_import_dut"):
        sys.modules.pop(m, None)
    assert conformance_main(["run", "--cmd", "true", "--timeout", "0"]) == 2


# ---------------------------------------------------------------- the command line as a CI citizen

JUNIT_DUT = """import numpy as np
from conformance import DUT, RefvitDUT
from refvit import int_kernels as K
class Mixed(DUT):
    attention_scores = staticmethod(K.attention_scores)
    def gelu(self, x, table):
        if x.shape[1] == 256:
            raise RuntimeError("sweep unsupported")
        return (K.gelu(x, table).astype(np.int16) + 1).clip(-128, 127).astype(np.int8)
"""


def test_cli_junit_skip_and_reference(tmp_path):
    import xml.etree.ElementTree as ET
    (tmp_path / "junit_dut.py").write_text(JUNIT_DUT)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "conformance", "run", "--filter", "_", "--ops", "gelu,attention_scores",
           "--ops", "softmax", "--rounding", "single"]
    proc = subprocess.run(run + ["--dut", "junit_dut:Mixed", "--junit", "out.xml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    specs = [s for s in select("quick") if s.op in ("gelu", "attention_scores", "softmax")
             and get_case(s.name).params.get("rounding", SINGLE_ROUND) == SINGLE_ROUND]
    want = {s.name: ("skipped" if s.op == "softmax" else "error" if s.name.startswith("gelu") and "sweep" in s.name
                     else "failure" if s.op == "gelu" else None) for s in specs}
    suite = ET.parse(tmp_path / "out.xml").getroot().find("testsuite")
    got = {}
    for tc in suite.findall("testcase"):
        kids = list(tc)
        assert len(kids) <= 1 and tc.get("classname") == f"conformance.{get_case(tc.get('name')).op}"
        got[tc.get("name")] = kids[0].tag if kids else None
        if kids and kids[0].tag == "failure":
            assert kids[0].get("type") == "MISMATCH" and "largest difference 1" in kids[0].text
        if kids and kids[0].tag == "error":
            assert "RuntimeError: sweep unsupported" in kids[0].get("message")
        if kids and kids[0].tag == "skipped":
            assert kids[0].get("message").endswith("Mixed does not implement softmax")
    assert got == want
    counts = {k: list(want.values()).count(v) for k, v in (("failures", "failure"), ("errors", "error"),
                                                           ("skipped", "skipped"))}
    assert {k: int(suite.get(k)) for k in counts} == counts and int(suite.get("tests")) == len(want)
    n_pass = list(want.values()).count(None)
    assert (f"{n_pass} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
            f"({len(want)} cases); skipped, not implemented by the DUT: softmax") in proc.stdout
    ref = subprocess.run(run + ["--dut", "reference"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ref.returncode == 0 and f"{len(want)} passed, 0 failed, 0 errors, 0 skipped" in ref.stdout, ref.stderr
    nothing = subprocess.run([sys.executable, "-m", "conformance", "run", "--ops", "softmax", "--dut",
                              "junit_dut:Mixed"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert nothing.returncode == 1 and "no case ran" in nothing.stderr


def test_cli_run_without_a_dut_says_what_to_pass(capsys):
    assert conformance_main(["run", "--filter", "gelu_sweep"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dut module:Class" in err and "--dut reference" in err and "--cmd" in err
    assert conformance_main(["list", "--rounding", "half"]) == 2
    assert "unknown rounding mode 'half'" in capsys.readouterr().err


def test_cli_list_into_a_closed_pipe_is_quiet():
    proc = subprocess.Popen([sys.executable, "-m", "conformance", "list", "--set", "full"], cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()                         # the reader is gone before the first line (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and err == ""


def test_cli_write_leaves_no_stale_cases(tmp_path, capsys):
    out = tmp_path / "cases"
    assert conformance_main(["write", str(out), "--filter", "gelu_sweep"]) == 0
    assert conformance_main(["write", str(out), "--filter", "concat_tokens"]) == 0
    index = json.loads((out / "index.json").read_text())
    names = [c["name"] for c in index["cases"]]
    assert names == [s.name for s in select("quick") if "concat_tokens" in s.name]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["index.json"])      # gelu_* is gone
    assert [p.name for p in tmp_path.iterdir()] == ["cases"]                              # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask                                  # not private
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert conformance_main(["write", str(mine), "--filter", "gelu_sweep"]) == 2
    assert "refusing to replace it" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert conformance_main(["write", str(empty), "--filter", "gelu_sweep"]) == 0
    assert (empty / "gelu_sweep_all256" / "case.json").is_file()


def test_the_documented_fail_message_is_the_runners():
    """docs/golden-format.md quotes the half-to-even adapter's message: it is what the runner says today."""
    import re
    text = (REPO / "docs" / "golden-format.md").read_text()
    quoted = re.search(r"`(FAIL requantize \[requantize_ties_int8_single\]: [^`]*)`", text).group(1)
    assert conformance.run_case(HalfToEvenDUT(), get_case("requantize_ties_int8_single")).message == quoted
