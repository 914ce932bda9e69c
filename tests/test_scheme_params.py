"""Scheme parameters (issue 19; docs/spec.md Part 6): per-tensor weights, power-of-two scales (`conv2d_pot`, the
scheme `pot8`), accumulator width proofs. Expected values are computed here independently (exact rationals, the
float parameters of the random model), never read back from the code under test. The existing named schemes'
bits: tests/test_scheme_digests.py."""
from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from conformance import FAIL, PASS, RefvitDUT, run_cases, select
from conformance.cases import PARAM_SCHEMES, random_quantized_model
from conformance.dut import REFERENCE_KERNELS
from refvit import int_kernels as K
from refvit import int_kernels_variants as KV
from refvit import int_model
from refvit.cli import main
from refvit.constants import float_conv, pot_scale
from refvit.graph import SCHEMES, GraphError, Scheme, resolve_scheme
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.reference import params as RPA

MODES = (SINGLE_ROUND, DOUBLE_ROUND)
CONVS = ("patch_embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "head")


def _model(scheme, rounding=SINGLE_ROUND):
    return random_quantized_model(48, 2, 3, 32, 8, True, rounding, scheme)


def _half_away(x):
    """round half away from zero, exact for the float64 values here (test-only; not np.round)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _exact_round(num: int, den_log2: int, rounding: str) -> int:
    """round(num / 2^den_log2) with exact rationals: SINGLE ties up, DOUBLE ties away from zero; a left shift
    for den_log2 < 0."""
    q = Fraction(num, 1) / Fraction(2) ** den_log2
    fl = q.numerator // q.denominator
    frac = q - fl
    if frac != Fraction(1, 2):
        return fl + (frac > Fraction(1, 2))
    return fl + 1 if (rounding == SINGLE_ROUND or q > 0) else fl


# ---------------------------------------------------------------------------------------------- scheme fields

def test_parameter_defaults_keep_old_schemes_files():
    """A parameter at its default is not in to_dict() / options() (so the old schemes' file metadata and
    options are unchanged); parameters() lists them all (`schemes --json`)."""
    old = SCHEMES["refvit-int8"]
    assert set(old.to_dict()) == {"name", "conv", "layernorm", "softmax", "gelu", "residual", "pot_fraction",
                                  "gelu_delta"}
    assert old.options() == {"pot_fraction": 0.0, "gelu_delta": 1.0}
    assert {"weights", "scales", "acc_bits", "acc_overflow"} <= set(old.parameters())
    pot8 = SCHEMES["pot8"]
    assert pot8.to_dict()["scales"] == "pot" and pot8.options()["scales"] == "pot"
    assert resolve_scheme(pot8.to_dict()) == pot8


@pytest.mark.parametrize("fields, message", [
    ({"weights": "per-row"}, "weights must be per-channel | per-tensor"),
    ({"weights": "per-tensor", "conv": "w4"}, "per-tensor weights need conv 'w8' or 'pot'"),
    ({"scales": "pot"}, "go together"),
    ({"conv": "pot"}, "go together"),
    ({"acc_bits": 40}, "acc_bits must be an integer in [16, 32]"),
    ({"acc_bits": True}, "acc_bits must be"),
    ({"acc_overflow": "clip"}, "acc_overflow must be error | saturate | wrap"),
])
def test_bad_parameters_are_one_line_errors(fields, message):
    with pytest.raises(GraphError, match=message.replace("[", r"\[").replace("]", r"\]").replace("|", r"\|")):
        Scheme(name="x", **fields)


def test_schemes_json_lists_the_parameters(capsys):
    assert main(["schemes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["pot8"]["scales"] == "pot" and rows["pot8"]["conv"] == "pot"
    assert all(rows[n]["weights"] == "per-channel" and rows[n]["acc_bits"] == 32 for n in rows)
    assert main(["schemes"]) == 0
    assert "acc_overflow error | saturate | wrap" in capsys.readouterr().out


def test_scheme_file_with_parameters(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"weights": "per-tensor", "acc_bits": 28}))
    sc = resolve_scheme(str(f))
    assert (sc.name, sc.weights, sc.acc_bits, sc.conv) == ("mine", "per-tensor", 28, "w8")


# ---------------------------------------------------------------------------------------------- per-tensor

def test_per_tensor_weights_are_one_scale_per_tensor():
    """Every conv: one weight scale max|W| / 127 over the whole tensor, codes round(W / s) (independent
    computation from the float parameters), some code reaching +-127; the records are the w8 ones."""
    qm, _ = _model(Scheme("pt", weights="per-tensor"))
    ref, _ = _model("refvit-int8")
    assert [(o.name, o.op, o.variant) for o in qm.graph] == [(o.name, o.op, o.variant) for o in ref.graph]
    for name in CONVS:
        s_w = qm.tensors[f"{name}.weight_scale"]
        w = qm.tensors[f"{name}.weight"]
        assert np.all(s_w == s_w[0]) and np.abs(w).max() == 127, name
        w_real = ref.tensors[f"{name}.weight"] * ref.tensors[f"{name}.weight_scale"][:, None, None, None]
        assert np.allclose(s_w[0], np.abs(w_real).max() / 127, rtol=0.01), name   # per-channel codes are rounded
        if name != "head":
            assert not np.all(ref.tensors[f"{name}.weight_scale"] == ref.tensors[f"{name}.weight_scale"][0])


def test_per_tensor_codes_from_the_float_weights():
    """The per-tensor codes are round_half_away(W / (max|W| / 127)) of the random model's float weights."""
    from conformance.cases import _rng   # the seed stream of random_quantized_model's float model
    from refvit.config import DeiTConfig
    from refvit.models import random_params
    from weights_tools.convert import token_to_conv
    cfg = DeiTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10, distilled=True)
    params = token_to_conv(random_params(cfg, "mean", _rng("model_48_2_3_32_8_True")))
    qm, _ = _model(Scheme("pt", weights="per-tensor"))
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for name in CONVS:
        op = next(o for o in qm.graph if o.name == name)
        w, _ = float_conv(op, p, cfg)
        s = np.abs(w).max() / 127
        assert qm.tensors[f"{name}.weight_scale"][0] == s
        assert np.array_equal(qm.tensors[f"{name}.weight"], _half_away(w / s).astype(np.int8)), name


# ---------------------------------------------------------------------------------------------- pot scales

@pytest.mark.parametrize("amax, qmax, want", [
    (127 * 2.0 ** -5, 127, 2.0 ** -5), (127 * 2.0 ** -5 * (1 + 2 ** -40), 127, 2.0 ** -4),
    (127 * 2.0 ** -5 * (1 - 2 ** -40), 127, 2.0 ** -5), (1.0, 127, 2.0 ** -6), (3.9, 127, 2.0 ** -5),
    (0.0, 127, 2.0 ** -30), (32767 * 8.0, 32767, 8.0), (100.0, 32767, 2.0 ** -8)])
def test_pot_scale_is_the_smallest_covering_power_of_two(amax, qmax, want):
    got = float(pot_scale(amax, qmax))
    assert got == want
    assert qmax * got >= amax and (amax == 0 or qmax * got / 2 < amax)


def _pow2(v) -> bool:
    m, _ = np.frexp(np.asarray(v, np.float64))
    return bool(np.all(m == 0.5))


@pytest.mark.parametrize("rounding", MODES)
def test_pot8_scales_are_powers_of_two_and_convs_shift_only(rounding):
    """pot8: every activation scale (calibrated, and the position embedding's) and every weight scale a power of
    two; every conv a conv2d_pot record with shift = -log2(s_in s_w / s_out) exactly, and no multiplier."""
    qm, _ = _model("pot8", rounding)
    T = qm.tensors
    scales = [k for k in T if k.endswith(".scale") and k != "attn.softmax.scale"]
    assert scales and all(_pow2(T[k]) for k in scales), [k for k in scales if not _pow2(T[k])]
    convs = [o for o in qm.graph if o.op == "conv2d"]
    assert {o.variant for o in convs} == {"pot"} and len(convs) == 10
    scale_of = {o.name: o.scale for o in qm.graph} | {"input": "input.scale"}
    for op in convs:
        assert f"{op.name}.multiplier" not in T and _pow2(T[f"{op.name}.weight_scale"])
        s_in = Fraction(float(T[scale_of[op.inputs["x"]]]))
        outs = ([Fraction(float(T[scale_of[f"{op.name.rsplit('.', 1)[0]}.{t}"]])) for t in "qkv"]
                if op.name.endswith("qkv") else [Fraction(float(T[op.scale]))])
        cout = T[f"{op.name}.shift"].shape[0]
        s_out = [outs[o * len(outs) // cout] for o in range(cout)]
        for o in range(cout):
            ratio = s_in * Fraction(float(T[f"{op.name}.weight_scale"][o])) / s_out[o]
            assert ratio == Fraction(2) ** -int(T[f"{op.name}.shift"][o]), (op.name, o)
    ln = [k for k in T if k.endswith("norm1.weight_scale") or k == "norm.weight_scale"]
    assert ln and all(_pow2(T[k]) for k in ln)


def test_pot_shift_against_exact_rationals():
    """pot_shift (fast and reference) is round(acc / 2^shift) of exact rationals: ties up (SINGLE) or away from
    zero (DOUBLE); a negative shift is an exact left shift. Every residue near a tie, both signs, the int32 ends."""
    acc = np.array([v for base in (0, 1 << 20, -(1 << 20)) for v in range(base - 20, base + 21)]
                   + [2 ** 31 - 1, -2 ** 31, -2 ** 31 + 1], np.int64)
    for shift in (-31, -3, -1, 0, 1, 2, 3, 4, 16, 30, 31):
        for rounding in MODES:
            want = np.array([_exact_round(int(a), shift, rounding) for a in acc])
            assert np.array_equal(KV.pot_shift(acc, np.int64(shift), rounding), want), (shift, rounding)
            assert np.array_equal(RPA.pot_shift(acc, np.int64(shift), rounding), want), (shift, rounding)


def test_conv2d_pot_fast_equals_reference_and_part2_under_single_round():
    """conv2d_pot: the fast kernel equals the reference one on every pot case; under SINGLE_ROUND it equals part 2's
    conv2d with multiplier 2^30 and shift + 30 (TOSA apply_scale on a power of two), not under DOUBLE_ROUND."""
    differs = []
    for spec in select("full", ops="conv2d_pot"):
        case = spec.build()
        args = list(case.inputs.values())
        fast = KV.conv2d_pot(*args, **case.params)
        assert np.array_equal(fast, case.expected) and fast.dtype == case.expected.dtype, spec.name
        x, w, b, s = args
        if s.min() >= -28:
            part2 = K.conv2d(x, w, b, np.full(s.shape, 1 << 30, np.int32), (s.astype(np.int64) + 30).astype(np.int8),
                             **case.params)
            same = np.array_equal(part2, fast)
            assert same or case.params["rounding"] == DOUBLE_ROUND, spec.name
            differs += [] if same else [spec.name]
    assert any("neartie" in n for n in differs), differs


def test_conv2d_pot_checks_its_arguments():
    x, w, b = np.zeros((1, 2, 1, 1), np.int8), np.ones((2, 2, 1, 1), np.int8), np.zeros(2, np.int32)
    for kernel in (KV.conv2d_pot, RPA.conv2d_pot):
        with pytest.raises(ValueError, match="conv2d_pot.*shift"):
            kernel(x, w, b, np.array([0, 32], np.int8))
        with pytest.raises(ValueError, match="conv2d_pot"):
            kernel(x, w.astype(np.int16), b, np.array([0, 1], np.int8))


# ---------------------------------------------------------------------------------------------- conformance

class _W8AsPot(RefvitDUT):
    """A multiply-then-shift requantizer asked for conv2d_pot: part 2's conv2d with multiplier 2^30."""
    def conv2d_pot(self, x, weight, bias, shift, *, rounding=SINGLE_ROUND, out_dtype=np.int8):
        m = np.full(shift.shape, 1 << 30, np.int32)
        return REFERENCE_KERNELS["conv2d"](x, weight, bias, m, (shift.astype(np.int64) + 30).astype(np.int8),
                                           rounding=rounding, out_dtype=out_dtype)


class _OtherRounding(RefvitDUT):
    """conv2d_pot with the other rounding of ties."""
    def conv2d_pot(self, x, weight, bias, shift, *, rounding=SINGLE_ROUND, out_dtype=np.int8):
        other = DOUBLE_ROUND if rounding == SINGLE_ROUND else SINGLE_ROUND
        return REFERENCE_KERNELS["conv2d_pot"](x, weight, bias, shift, rounding=other, out_dtype=out_dtype)


def _statuses(dut, specs) -> dict:
    return {r.case: r.status for r in run_cases(dut, specs)}


def test_pot_cases_fail_the_neighbouring_requantizers():
    specs = select("quick", ops="conv2d_pot")
    assert set(_statuses(RefvitDUT(), specs).values()) == {PASS}
    w8 = _statuses(_W8AsPot(), specs)
    assert FAIL in {w8[n] for n in w8 if n.endswith("_double")}
    # the superset fact: under SINGLE_ROUND 2^30 / (shift + 30) is the same value, where shift + 30 is in
    # apply_scale's domain (the maxacc case has shift -31)
    assert {n: w8[n] for n in w8 if n.endswith("_single")} == {
        n: "ERROR" if "maxacc" in n else PASS for n in w8 if n.endswith("_single")}
    other = _statuses(_OtherRounding(), specs)
    assert other["conv_pot_1x1_ties_cin1_cout4_n64_shift3_single"] == FAIL
    assert other["conv_pot_1x1_ties_cin1_cout4_n64_shift3_double"] == FAIL


def _model_dut(scheme):
    qm = _model(scheme)[0]

    class Neighbour(RefvitDUT):
        def model(self, x, constants, *, graph):
            return int_model.forward_int(qm, x)
    return Neighbour()


@pytest.mark.parametrize("required, neighbour", [
    ("pot8", SCHEMES["refvit-int8"]), ("refvit-int8", SCHEMES["pot8"]),
    ("pot8", Scheme("pot8-pt", conv="pot", scales="pot", weights="per-tensor")),
    ("pertensor", SCHEMES["refvit-int8"]), ("refvit-int8", Scheme("pt", weights="per-tensor"))])
def test_model_cases_fail_the_neighbouring_parameter(required, neighbour):
    """A model quantized with the neighbouring parameter value (same float model, calibration, rounding) fails
    the required scheme's model case."""
    name = ("model_c48_d2_h3_img32_p8_b2_single" if required == "refvit-int8"
            else f"model_{required}_c48_d2_h3_img32_p8_b2_single")
    assert required in PARAM_SCHEMES or required in SCHEMES
    st = _statuses(_model_dut(neighbour), [s for s in select("quick") if s.name == name])
    assert st == {name: FAIL}


# ---------------------------------------------------------------------------------------------- acc_bits

def test_accumulator_bounds_are_exact_and_reached():
    """The proof's range per conv channel is reached by the input it names (x = x_hi where w > 0 and x_lo where
    w < 0, and the reverse), computed here by the conv kernel itself on that input; q.k and p.v bounds by hand."""
    from refvit.quantize import accumulator_bounds
    qm, _ = _model("refvit-int8")
    bounds = accumulator_bounds(qm.graph, qm.tensors)
    by_op = {}
    for b in bounds:
        by_op.setdefault(b.op, []).append(b)
    assert len(by_op["blocks.0.mlp.fc2"]) == 48 and len(by_op["blocks.0.attn.scores"]) == 1
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head"):
        w, bias = qm.tensors[f"{name}.weight"], qm.tensors[f"{name}.bias"]
        for c in (0, 5, w.shape[0] - 1):
            row = w[c:c + 1]
            x_hi = np.where(row > 0, 127, -128).astype(np.int8).reshape(1, -1, 1, 1)
            x_lo = np.where(row > 0, -128, 127).astype(np.int8).reshape(1, -1, 1, 1)
            hi = int(K.conv2d_accumulate(x_hi, row, bias[c:c + 1]).ravel()[0])
            lo = int(K.conv2d_accumulate(x_lo, row, bias[c:c + 1]).ravel()[0])
            b = by_op[name][c]
            assert (b.lo, b.hi, b.channel) == (lo, hi, c)
            assert b.bits == next(n for n in range(2, 40) if -(1 << (n - 1)) <= lo and hi < 1 << (n - 1))
    d, n = 16, 18                                                                   # head dim, tokens
    assert (by_op["blocks.0.attn.scores"][0].lo, by_op["blocks.0.attn.scores"][0].hi) == (-d * 128 * 127, d * 16384)
    assert (by_op["blocks.0.attn.context"][0].lo, by_op["blocks.0.attn.context"][0].hi) == (-n * 127 * 128,
                                                                                          n * 127 * 127)


def test_narrow_accumulator_refusal_names_op_channel_and_bound():
    """acc_bits 24 proves (every bound of this model fits 22 bits); at 20 the quantizer refuses, naming the first
    accumulator in graph order that needs more; the error reaches the command line as one line."""
    from refvit.quantize import QuantizationError, accumulator_bounds
    qm24, _ = _model(Scheme("a24", acc_bits=24))
    ref, _ = _model("refvit-int8")
    assert all(np.array_equal(np.asarray(qm24.tensors[k]), np.asarray(v)) for k, v in ref.tensors.items())
    assert qm24.options["acc_bits"] == 24 and qm24.scheme.acc_bits == 24
    first = next(b for b in accumulator_bounds(ref.graph, ref.tensors) if b.bits > 20)
    with pytest.raises(QuantizationError) as e:
        _model(Scheme("a20", acc_bits=20))
    msg = str(e.value)
    assert msg.startswith(f"{first.op}: output channel {first.channel}: worst-case accumulator [{first.lo}, {first.hi}] "
                          f"needs {first.bits} bits, more than acc_bits 20")


def test_narrow_accumulator_against_modular_arithmetic():
    """saturate and wrap (fast and reference) against Python's integers: wrap keeps acc mod 2^bits in
    [-2^(bits-1), 2^(bits-1)), saturate clamps; around both ends, 16 to 32 bits."""
    for bits in (16, 17, 24, 31, 32):
        half = 1 << (bits - 1)
        vals = [v for e in (half, -half, 3 * half, -3 * half, 0) for v in range(e - 3, e + 4)]
        vals = [v for v in vals if -2 ** 31 <= v < 2 ** 31]
        acc = np.array(vals, np.int64)
        wrap = [((v + half) % (2 * half)) - half for v in vals]
        sat = [min(max(v, -half), half - 1) for v in vals]
        for fn in (KV.narrow_accumulator, RPA.narrow_accumulator):
            assert fn(acc, bits, "wrap").tolist() == wrap and fn(acc, bits, "saturate").tolist() == sat
            assert fn(acc, bits, "wrap").dtype == np.int32


def test_narrow_kernels_fast_equal_reference():
    from refvit import registry as R
    specs = [s for s in select("full") if s.op.endswith("_narrow")]
    assert len(specs) >= 20
    for spec in specs:
        case = spec.build()
        row = R.by_kernel_name(spec.op)
        fast, ref = row.kernel(*case.inputs.values(), **case.params), row.reference(*case.inputs.values(), **case.params)
        assert np.array_equal(fast, ref) and fast.dtype == ref.dtype, spec.name


def _exact_as(kernel: str):
    """A 32-bit (exact) datapath asked for a narrow kernel: part 2's kernel, the acc attributes ignored."""
    base = {"conv2d_narrow": "conv2d", "attention_scores_narrow": "attention_scores",
            "attention_context_narrow": "attention_context"}[kernel]

    def method(self, *args, acc_bits, acc_overflow, **kw):
        return REFERENCE_KERNELS[base](*args, **kw)
    return type(f"Exact_{kernel}", (RefvitDUT,), {kernel: method})()


def _other_overflow(kernel: str):
    def method(self, *args, acc_overflow, **kw):
        other = "wrap" if acc_overflow == "saturate" else "saturate"
        return REFERENCE_KERNELS[kernel](*args, acc_overflow=other, **kw)
    return type(f"Other_{kernel}", (RefvitDUT,), {kernel: method})()


@pytest.mark.parametrize("kernel", ["conv2d_narrow", "attention_scores_narrow", "attention_context_narrow"])
def test_narrow_cases_fail_the_neighbouring_accumulators(kernel):
    """Each narrow kernel's cases: refvit passes; a 32-bit datapath and the other overflow rule each fail some of
    the saturate and some of the wrap cases."""
    specs = select("quick", ops=kernel)
    assert set(_statuses(RefvitDUT(), specs).values()) == {PASS}
    for dut in (_exact_as(kernel), _other_overflow(kernel)):
        st = _statuses(dut, specs)
        for tag in ("_sat", "_wrap"):
            assert FAIL in {v for n, v in st.items() if tag in n}, (dut, tag, st)
        edge = {n: v for n, v in st.items() if "edge" in n}
        assert set(edge.values()) <= {FAIL}


@pytest.mark.parametrize("required, neighbour", [
    ("accsat16", Scheme("w", acc_bits=16, acc_overflow="wrap")),
    ("accwrap16", Scheme("s", acc_bits=16, acc_overflow="saturate")),
    ("accsat16", SCHEMES["refvit-int8"]), ("refvit-int8", Scheme("w", acc_bits=16, acc_overflow="wrap"))])
def test_narrow_model_cases_fail_the_neighbours(required, neighbour):
    name = ("model_c48_d2_h3_img32_p8_b2_single" if required == "refvit-int8"
            else f"model_{required}_c48_d2_h3_img32_p8_b2_single")
    assert _statuses(_model_dut(neighbour), [s for s in select("quick") if s.name == name]) == {name: FAIL}


def test_narrow_records_and_golden_internals(tmp_path):
    """acc_overflow wrap: every conv and attention product is an acc-narrow record carrying acc_bits and
    acc_overflow; the file round-trips; golden --internals dumps acc_exact and the wrapped acc, which differ
    exactly where acc_exact leaves the 16-bit range, by a multiple of 2^16."""
    from refvit import golden
    from refvit.qfile import load_quantized, save_quantized
    qm, calib = _model(Scheme("w16", acc_bits=16, acc_overflow="wrap"))
    narrow = [o for o in qm.graph if o.variant == "acc-narrow"]
    assert {o.op for o in narrow} == {"conv2d", "attention_scores", "attention_context"} and len(narrow) == 14
    assert all(o.attrs["acc_bits"] == 16 and o.attrs["acc_overflow"] == "wrap" for o in narrow)
    back = load_quantized(save_quantized(qm, tmp_path / "q.safetensors"))
    assert back.scheme == qm.scheme and back.scheme.conv == "w8" and back.scheme.acc_overflow == "wrap"
    xq = int_model.quantize_input(qm, calib[:2])
    m = golden.write_golden(qm, xq, tmp_path / "g", internals=True)
    exact = np.load(tmp_path / "g" / m["tensors"]["blocks.0.mlp.fc2.acc_exact"]["files"]["npy"]).astype(np.int64)
    acc = np.load(tmp_path / "g" / m["tensors"]["blocks.0.mlp.fc2.acc"]["files"]["npy"]).astype(np.int64)
    out = (exact < -(1 << 15)) | (exact >= 1 << 15)
    assert out.any() and np.array_equal(acc != exact, out) and np.all((acc - exact) % (1 << 16) == 0)
    assert np.all((acc >= -(1 << 15)) & (acc < 1 << 15))


def test_acc_overflow_needs_a_narrow_w8_accumulator():
    with pytest.raises(GraphError, match="needs acc_bits below 32"):
        Scheme("x", acc_overflow="wrap")
    with pytest.raises(GraphError, match="conv 'w8'"):
        Scheme("x", acc_bits=24, acc_overflow="wrap", conv="w4")
    with pytest.raises(GraphError, match="chosen by acc_overflow"):
        Scheme("x", conv="acc-narrow")


# ---------------------------------------------------------------------------------------------- table sizes

def test_table_builders_against_math_and_part2():
    """make_exp_table_n: round_half_away(2^15 exp(-i / 2^b)) (here from math.exp); (256, 4) is part 2's table.
    make_gelu_table_n: the GELU at each bucket's midpoint; 256 entries is part 2's table."""
    import math
    for size, bits in ((64, 0), (256, 4), (4096, 8), (128, 3)):
        want = [int(_half_away(32768 * math.exp(-i / 2 ** bits))) for i in range(size)]
        assert KV.make_exp_table_n(size, bits).tolist() == want and KV.make_exp_table_n(size, bits).dtype == np.uint16
    assert np.array_equal(KV.make_exp_table_n(256, 4), K.make_exp_table())
    for s_in, s_out in ((0.05, 0.02), (0.3, 0.3)):
        assert np.array_equal(KV.make_gelu_table_n(s_in, s_out, 256), K.make_gelu_table(s_in, s_out))
        for size in (16, 64):
            step = 256 // size
            mids = [(-128 + j * step + (step - 1) / 2) * s_in for j in range(size)]
            want = [max(-128, min(127, int(_half_away(0.5 * m * (1 + math.erf(m / math.sqrt(2))) / s_out))))
                    for m in mids]
            assert KV.make_gelu_table_n(s_in, s_out, size).tolist() == want


def test_gelu_table_n_indexes_buckets():
    x = np.arange(-128, 128, dtype=np.int8)
    for size in (16, 32, 256):
        table = (np.arange(size) - 128 * (size == 256)).astype(np.int8)              # entry j holds j (- 128)
        want = [(int(v) + 128) // (256 // size) - 128 * (size == 256) for v in x]
        for fn in (KV.gelu_table_n, RPA.gelu_table_n):
            assert fn(x, table).tolist() == want
    with pytest.raises(ValueError, match="gelu_table_n"):
        KV.gelu_table_n(x, np.zeros(48, np.int8))


def test_softmax_table_n_with_part2_table_is_part2_softmax():
    """The superset fact: with 256 entries at 2^-4, softmax_table_n computes part 2's softmax on its cases
    (where part 2 is defined); and the fast and reference kernels agree on every table-size case."""
    from refvit import registry as R
    for spec in select("quick", ops="softmax"):
        case = spec.build()
        if case.inputs["exp_table"].dtype != np.uint16:                             # part 2 also takes int32 tables
            continue
        try:
            want = K.softmax(*case.inputs.values(), **case.params)
        except (ValueError, OverflowError):
            continue
        assert np.array_equal(KV.softmax_table_n(*case.inputs.values(), **case.params), want), spec.name
    for op in ("softmax_table_n", "gelu_table_n"):
        row = R.by_kernel_name(op)
        for spec in select("full", ops=op):
            case = spec.build()
            fast, ref = row.kernel(*case.inputs.values(), **case.params), row.reference(*case.inputs.values(),
                                                                                       **case.params)
            assert np.array_equal(fast, ref) and np.array_equal(fast, case.expected), spec.name
    a = select("quick", filter="softmax_tablen_L64_b2_ties_n24_single")[0].build()
    b = select("quick", filter="softmax_tablen_L64_b2_ties_n24_double")[0].build()
    assert np.any(a.expected != b.expected)


class _Part2Table(RefvitDUT):
    """Part 2's 256-entry table at index step 2^-4 asked for softmax_table_n (the same real rescale)."""
    def softmax_table_n(self, scores, multiplier, shift, exp_table, *, rounding=SINGLE_ROUND):
        bits = next(b for b in range(9) if np.array_equal(KV.make_exp_table_n(len(exp_table), b), exp_table))
        return REFERENCE_KERNELS["softmax"](scores, multiplier, np.int8(int(shift) + bits - 4), K.make_exp_table(),
                                           rounding=rounding)


class _FullGelu(RefvitDUT):
    """The 256-entry GELU table at the case's scales asked for gelu_table_n."""
    def gelu_table_n(self, x, table):
        from conformance.cases import GELU_VARIANT_SCALES
        s_in, s_out = next((a, b) for a, b in GELU_VARIANT_SCALES
                           if np.array_equal(KV.make_gelu_table_n(a, b, len(table)), table))
        return REFERENCE_KERNELS["gelu"](x, K.make_gelu_table(s_in, s_out))


def test_table_size_cases_fail_part2s_tables():
    sm = _statuses(_Part2Table(), [s for s in select("quick", ops="softmax_table_n") if "randomtable" not in s.name])
    assert FAIL in sm.values() and all(v == FAIL for n, v in sm.items() if "_random_" in n), sm
    ge = _statuses(_FullGelu(), [s for s in select("quick", ops="gelu_table_n") if "randomtable" not in s.name])
    assert set(ge.values()) == {FAIL}, ge


@pytest.mark.parametrize("required, neighbour", [
    ("exp64b2-gelu64", SCHEMES["refvit-int8"]),
    ("exp64b2-gelu64", Scheme("e", exp_table_size=64, exp_index_bits=2)),
    ("exp64b2-gelu64", Scheme("g", gelu_table_size=64)),
    ("refvit-int8", Scheme("t", exp_table_size=64, exp_index_bits=2, gelu_table_size=64))])
def test_table_size_model_cases_fail_the_neighbours(required, neighbour):
    name = ("model_c48_d2_h3_img32_p8_b2_single" if required == "refvit-int8"
            else f"model_{required}_c48_d2_h3_img32_p8_b2_single")
    assert _statuses(_model_dut(neighbour), [s for s in select("quick") if s.name == name]) == {name: FAIL}


def test_table_size_records_and_errors(tmp_path):
    from refvit.qfile import load_quantized, save_quantized
    qm, _ = _model(Scheme("t", exp_table_size=1024, exp_index_bits=6, gelu_table_size=32))
    assert {(o.op, o.variant) for o in qm.graph if o.op in ("softmax", "gelu")} == {("softmax", "table-n"),
                                                                                   ("gelu", "table-n")}
    assert qm.tensors["exp_table"].shape == (1024,) and qm.tensors["blocks.0.mlp.gelu.table"].shape == (32,)
    back = load_quantized(save_quantized(qm, tmp_path / "q.safetensors"))
    assert back.scheme == qm.scheme and (back.scheme.softmax, back.scheme.exp_table_size) == ("table", 1024)
    for fields, message in (({"exp_table_size": 100}, "exp_table_size must be 64 | 128"),
                            ({"exp_index_bits": 9}, "exp_index_bits must be an integer in"),
                            ({"gelu_table_size": 512}, "gelu_table_size must be"),
                            ({"exp_table_size": 64, "softmax": "poly"}, "needs softmax 'table'"),
                            ({"gelu_table_size": 64, "gelu": "shift"}, "needs gelu 'table'"),
                            ({"softmax": "table-n"}, "chosen by the table size")):
        with pytest.raises(GraphError, match=message.replace("|", r"\|")):
            Scheme(name="x", **fields)
