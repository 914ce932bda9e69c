"""export-tosa: the integer graph as TOSA (MLIR tosa dialect), checked two ways against refvit's interpreter.

1. tests/tosa_reference.py, a NumPy reading of the TOSA specification's pseudocode, runs the exported op
   list with every REQUIRE checked (RESCALE's value range, shift ranges, no int32 overflow): each emitter
   on hand-made extreme inputs against refvit's kernel and against Python integers, and whole models.
2. IREE (iree-base-compiler / iree-base-runtime, the `tosa` extra), an independent compiler, compiles the
   MLIR text for the CPU and runs it: every tensor of the embedded model and of a DeiT-Tiny-sized random
   checkpoint equals refvit's, both rounding modes, and an export with one RESCALE shift off by one is caught.
   Skipped, saying so, when iree.compiler is not importable (CI installs it).
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from refvit import graph as G
from refvit import int_kernels as K
from refvit import int_kernels_authors as KA
from refvit import int_kernels_variants as KV
from refvit import int_model
from refvit import export_tosa as E
from refvit.cli import main
from refvit.config import DeiTConfig
from weights_tools.convert import token_to_conv
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND, quantize_multiplier
from refvit.models import load_model, random_params
from refvit.preprocess import fmnist_transform
from refvit.qfile import save_quantized
from refvit.quantize import quantize
from tosa_reference import TosaRequireError, run_program

ROUNDINGS = (SINGLE_ROUND, DOUBLE_ROUND)
POT_TOSA = {"name": "pot8-tosa", "conv": "pot", "scales": "pot", "layernorm": "int32", "softmax": "poly"}  # a scheme
GELU64_TOSA = {"name": "tosa-gelu64", "layernorm": "int32", "softmax": "poly", "gelu_table_size": 64}   # gelu table-n
EXP1024_TOSA = {"name": "tosa-exp1024", "layernorm": "int32", "exp_table_size": 1024, "exp_index_bits": 6}  # softmax
#   JSON: pot8 (power-of-two scales, shift-only convs) with tosa-int32's LayerNorm and softmax, which TOSA expresses
BROKEN_OP = "blocks.0.attn.context"       # the op whose RESCALE shift the broken export moves by one
IREE_FLAGS = ["--iree-llvmcpu-target-cpu=generic"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def record(op: str, variant: str, **attrs) -> G.Op:
    return G.Op("t", op, variant, {}, {}, attrs, "int8", (), "")


def constants(**values) -> dict:
    """{argument: (constant name, array)} as the exporter passes them."""
    return {k: (f"t.{k}", np.asarray(v)) for k, v in values.items()}


def run_emitter(emit, op, inputs: dict, c: dict, ctx=None) -> np.ndarray:
    """One emitter on hand-made input values {name: array} (internal layouts), run by the TOSA reading."""
    em = E._Emitter()
    values = [E.Value(n, a.shape, str(a.dtype)) for n, a in inputs.items()]
    out, _ = emit(em, op, ctx or {}, *values, c)
    prog = E.TosaProgram(values[0], em.ops, [("out", out)])
    return run_program(prog, inputs[values[0].name], {v.name: inputs[v.name] for v in values[1:]})["out"]


def first_difference(results: dict, trace) -> str | None:
    """The first tensor (in execution order) whose dtype, shape or bits differ from refvit's trace."""
    for name, got in results.items():
        want = trace.tensors[name]
        if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
            return name
    return None


def traced(qm, x) -> G.Trace:
    tr = G.Trace()
    G.run_graph(qm.graph, qm.tensors, x, tr)
    return tr


def break_shift(mlir: str, op_name: str = BROKEN_OP) -> str:
    """The MLIR with the scalar RESCALE shift constant of `op_name` raised by one."""
    pattern = rf'(%{re.escape(op_name)}\.shift = "tosa\.const"\(\) <\{{values = dense<)(\d+)(>)'
    out, n = re.subn(pattern, lambda m: f"{m[1]}{int(m[2]) + 1}{m[3]}", mlir)
    assert n == 1, f"no shift constant of {op_name} in the MLIR"
    return out


@pytest.fixture(scope="module")
def fmnist(shared):
    with np.load(shared / "data" / "fmnist_test.npz") as z:
        return z["images"][:16]


@pytest.fixture(scope="module")
def embedded(fmnist):
    """The embedded Fashion-MNIST DeiT (conv form), quantized with tosa-int32 on 8 test images (returned as
    `quantize_with(scheme, rounding)` for other schemes too); input: 3 other images, int8."""
    m = load_model(None, form="conv")

    def quantize_with(scheme, rounding=SINGLE_ROUND):
        return quantize(m.params, m.config, [fmnist_transform(fmnist[:8])], head_mode=m.head_mode, scheme=scheme,
                        rounding=rounding)
    qm = quantize_with(G.SCHEMES["tosa-int32"])
    return quantize_with, qm, int_model.quantize_input(qm, fmnist_transform(fmnist[8:11]))


# ---------------------------------------------------------------------------------------------
# the emitters, one by one, on extreme inputs (TOSA reading vs refvit's kernels and Python integers)
# ---------------------------------------------------------------------------------------------

def add_reference(a, b, ma, mb, s) -> np.ndarray:
    """Part 2 add in Python integers: saturate(floor((a*ma + b*mb + 2^(s-1)) / 2^s), int8)."""
    out = [max(-128, min(127, (int(x) * ma + int(y) * mb + (1 << (s - 1))) >> s)) for x, y in zip(a.ravel(), b.ravel())]
    return np.array(out, np.int8).reshape(a.shape)


@pytest.mark.parametrize("s", [17, 18, 30, 31, 32, 33, 47, 48])
def test_add_is_exact_in_32_bits(s):
    rng = np.random.default_rng(s)
    a = rng.integers(-128, 128, (2, 1, 40, 16), dtype=np.int8)
    b = rng.integers(-128, 128, (2, 1, 40, 16), dtype=np.int8)
    a[0, 0, 0], b[0, 0, 0] = -128, 127                                              # the extremes, every pairing
    a[0, 0, 1], b[0, 0, 1] = 127, 127
    a[0, 0, 2], b[0, 0, 2] = -128, -128
    for ma, mb in [(0, 0), ((1 << 31) - 1, (1 << 31) - 1), (1 << 16, (1 << 16) - 1),
                   *rng.integers(0, 1 << 31, (4, 2)).tolist()]:
        c = constants(multiplier_a=np.int32(ma), multiplier_b=np.int32(mb), shift=np.int8(s))
        got = run_emitter(E._add_int8, record("add", "int8"), {"a": a, "b": b}, c)
        want = add_reference(a, b, ma, mb, s)
        assert np.array_equal(got, want), (ma, mb, s)
        assert np.array_equal(want, K.add(a, b, ma, mb, s))


def test_add_outside_its_shift_range_is_refused():
    a = np.zeros((1, 1, 2, 2), np.int8)
    for s in (16, 49):
        with pytest.raises(E.TosaExportError, match=r"outside \[17, 48\]"):
            run_emitter(E._add_int8, record("add", "int8"), {"a": a, "b": a},
                        constants(multiplier_a=np.int32(1), multiplier_b=np.int32(1), shift=np.int8(s)))


def layernorm_rows(C: int, rng) -> np.ndarray:
    """int8 (B=1, 1, rows, C): Gaussian rows, constant rows, one outlier among equals, alternating extremes."""
    rows = [np.clip(rng.normal(0, sd, C), -128, 127) for sd in (1, 5, 40, 200)]
    rows += [np.full(C, v) for v in (-128, 0, 127)]
    rows += [np.r_[127, np.full(C - 1, -128)], np.r_[-128, np.full(C - 1, 3)], np.resize([-128, 127], C)]
    rows += [np.r_[np.zeros(C - 1), 1]]
    return np.round(np.array(rows)).astype(np.int8)[None, None]


@pytest.mark.parametrize("C,eps", [(4, (1, 0)), (192, (2831, 0)), (768, (176947200, 4)), (768, ((1 << 29) - 1, 30))])
def test_layernorm_int32_matches_kernel(C, eps):
    rng = np.random.default_rng(C)
    x = layernorm_rows(C, rng)                                                      # (1, 1, rows, C)
    gamma = rng.integers(-127, 128, C).astype(np.int8)
    bias = rng.integers(-(1 << 30), 1 << 30, C).astype(np.int32)
    pairs = [quantize_multiplier(s) for s in rng.uniform(1e-8, 1e-5, C)]
    m, sh = np.array([p[0] for p in pairs], np.int32), np.array([p[1] for p in pairs], np.int8)
    c = constants(eps_int=np.int64(eps[0]), eps_shift=np.int64(eps[1]), gamma=gamma, bias=bias, multiplier=m, shift=sh)
    for rounding in ROUNDINGS:
        got = run_emitter(E._layernorm_int32, record("layernorm", "int32", rounding=rounding), {"x": x}, c)
        want = KV.layernorm_int32(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), eps[0], eps[1], gamma, bias, m, sh,
                                  rounding=rounding)                                # refvit layout (1, C, 1, rows)
        assert np.array_equal(got, want.transpose(0, 2, 3, 1)), rounding


def score_rows(D: int, N: int, rng) -> np.ndarray:
    """int32 scores (R, N, N) inside attention_scores' range [-D*128*127, D*128*128], extremes included."""
    lo, hi = -D * 128 * 127, D * 128 * 128
    s = rng.integers(lo, hi + 1, (3, N, N)).astype(np.int32)
    s[1] = rng.integers(-200, 200, (N, N))                                          # small differences
    s[2, 0] = [hi] + [lo] * (N - 1)                                                 # the largest difference
    s[2, 1] = 7                                                                     # a constant row
    return s


@pytest.mark.parametrize("variant", ["poly", "shift", "table"])
@pytest.mark.parametrize("sigma", [1e-5, 3e-4, 0.004, 0.03, 0.5])
def test_softmax_matches_kernel(variant, sigma):
    D, N = 64, 37
    scores = score_rows(D, N, np.random.default_rng(int(sigma * 1e6)))
    emit, kernel, c = softmax_case(variant, sigma)
    m, s = int(c["multiplier"][1]), int(c["shift"][1])
    for rounding in ROUNDINGS:
        got = run_emitter(emit, record("softmax", variant, rounding=rounding), {"s": scores}, c, {"head_dim": D})
        want = kernel(scores, m, s, *([c["exp_table"][1]] if variant == "table" else []), rounding=rounding)
        assert np.array_equal(got, want), (variant, sigma, rounding)


@pytest.mark.parametrize("size,bits", [(64, 2), (1024, 6), (4096, 8)])
@pytest.mark.parametrize("sigma", [3e-4, 0.004, 0.03])
def test_softmax_table_n_matches_kernel(size, bits, sigma):
    """Part 6's exp table of L entries at 2^-b through GATHER: every output equals softmax_table_n, both roundings."""
    D, N = 64, 37
    scores = score_rows(D, N, np.random.default_rng(int(sigma * 1e6) + size))
    m, s = quantize_multiplier(2 ** bits * sigma)
    table = KV.make_exp_table_n(size, bits)
    c = constants(multiplier=np.int32(m), shift=np.int8(s), exp_table=table)
    for rounding in ROUNDINGS:
        got = run_emitter(E._softmax_table_n, record("softmax", "table-n", rounding=rounding), {"s": scores}, c,
                          {"head_dim": D})
        assert np.array_equal(got, KV.softmax_table_n(scores, m, s, table, rounding=rounding)), (size, sigma, rounding)


def softmax_case(variant: str, sigma: float):
    """(emitter, refvit kernel, constants) of a softmax variant for the real logit per score unit sigma."""
    if variant == "table":
        m, s = quantize_multiplier(16 * sigma)
        return E._softmax_table, K.softmax, constants(multiplier=np.int32(m), shift=np.int8(s),
                                                      exp_table=K.make_exp_table())
    m, s = KV.softmax_exp_multiplier(sigma)
    emit, kernel = {"poly": (E._softmax_poly, KV.softmax_poly), "shift": (E._softmax_shift, KV.softmax_shift)}[variant]
    return emit, kernel, constants(multiplier=np.int32(m), shift=np.int8(s))


def test_table_softmax_outside_rescale_domain_is_refused():
    """16 sigma = 2^10 = 2^30 * 2^-20: shift 20, so score differences from 2^19 on (D = 64 allows up to
    64 * 32640) are outside RESCALE's (and apply_scale's) domain."""
    D, N = 64, 37
    emit, kernel, c = softmax_case("table", 64.0)
    assert int(c["shift"][1]) == 20
    scores = score_rows(D, N, np.random.default_rng(1))
    with pytest.raises(E.TosaExportError, match=r"RESCALE needs \|max - s\| < 2\^\(shift-1\)"):
        run_emitter(emit, record("softmax", "table", rounding=SINGLE_ROUND), {"s": scores}, c, {"head_dim": D})
    with pytest.raises(ValueError, match="shift-1"):                              # refvit refuses such rows too
        kernel(scores, int(c["multiplier"][1]), 20, c["exp_table"][1])


@pytest.mark.parametrize("scale_in,scale_out", [(0.005, 0.004), (0.05, 0.05), (0.3, 0.1)])
def test_gelu_variants_match_kernels_on_every_int8(scale_in, scale_out):
    x = np.arange(-128, 128, dtype=np.int8).reshape(1, 1, 16, 16)
    cases = [("poly", E._gelu_poly, KV.gelu_poly, KV.gelu_poly_constants(scale_in, scale_out)),
             ("shift", E._gelu_shift, KV.gelu_shift, KV.gelu_shift_constants(scale_in, scale_out))]
    for variant, emit, kernel, consts in cases:
        c = constants(**{k: np.int64(v) for k, v in consts.items()})
        for rounding in ROUNDINGS:
            got = run_emitter(emit, record("gelu", variant, rounding=rounding), {"x": x}, c)
            assert np.array_equal(got, kernel(x, **consts, rounding=rounding)), (variant, rounding)
    table = K.make_gelu_table(scale_in, scale_out)
    assert np.array_equal(run_emitter(E._gelu_table, record("gelu", "table"), {"x": x}, constants(table=table)),
                          K.gelu(x, table))
    for size in KV.GELU_TABLE_SIZES:                                               # Part 6's sizes, every int8 x
        table = KV.make_gelu_table_n(scale_in, scale_out, size)
        got = run_emitter(E._gelu_table_n, record("gelu", "table-n"), {"x": x}, constants(table=table))
        want = [int(table[(v + 128) // (256 // size)]) for v in range(-128, 128)]   # Python ints, the spec's line
        assert got.ravel().tolist() == want and np.array_equal(got, KV.gelu_table_n(x, table)), size


@pytest.mark.parametrize("hi", [198 * 32768, 1 << 30])
def test_recip_long_division_is_floor(hi):
    """floor(2^40 / sigma) in 32-bit steps (8-bit chunks for N = 198 keys, 1-bit chunks up to 2^30)."""
    sigma = [22856, 22857, 32768, 65535, 1 << 20, hi - 1, hi, 3 * 7 * 11 * 13 * 17 * 19 * 23 % hi]
    sigma = np.array([v for v in sigma if 22856 <= v <= hi], np.int32).reshape(1, -1, 1)
    em = E._Emitter()
    v = E.Value("sigma", sigma.shape, "int32")
    q = E._recip_pow2(em, record("softmax", "poly"), v, 40, 22856, hi)
    got = run_program(E.TosaProgram(v, em.ops, [("q", q)]), sigma)["q"]
    assert got.ravel().tolist() == [(1 << 40) // int(s) for s in sigma.ravel()]
    assert sum(op.opcode == "intdiv" for op in em.ops) == {198 * 32768: 3, 1 << 30: 11}[hi]


def pot_reference(acc: int, shift: int, rounding: str, bits: int) -> int:
    """Part 6 pot_shift in Python integers, saturated: a left shift for shift <= 0; for shift > 0 round(acc / 2^shift),
    ties up (SINGLE_ROUND) or away from zero (DOUBLE_ROUND, on |acc|)."""
    if shift <= 0:
        y = acc << -shift
    elif rounding == SINGLE_ROUND:
        y = (acc + (1 << (shift - 1))) >> shift
    else:
        y = (1 if acc >= 0 else -1) * ((abs(acc) + (1 << (shift - 1))) >> shift)
    return max(-(1 << (bits - 1)), min((1 << (bits - 1)) - 1, y))


def pot_channels():
    """(weight (Cout, 1, 1, 1), bias (Cout,), shift (Cout,)) of a 1x1 conv on one input channel: acc = w x + b with
    x over all 256 int8 values, so a w = 1 channel sees 256 consecutive accumulators around b (every residue mod
    2^shift up to shift 8; ties at 0.5, -0.5, 3.5, -3.5 and their neighbours for larger shifts), and channels with
    w = -+127 reach the extremes +-(2^31 - 1), at every shift in [-31, 31]."""
    lim = (1 << 31) - 1 - 128 * 127                                                 # part 2's bias headroom
    rows = []
    for s in range(-31, 32):
        tie = 1 << (s - 1) if s >= 1 else 0
        rows += [(1, b, s) for b in {0, *(tie + m * (1 << max(s, 0)) for m in (-4, -1, 0, 3))} if abs(b) <= lim]
        rows += [(-127, lim, s), (127, -lim, s)]                                    # acc reaches +-(2^31 - 1)
    w, b, s = map(np.array, zip(*rows))
    return w.astype(np.int8).reshape(-1, 1, 1, 1), b.astype(np.int32), s.astype(np.int8)


@pytest.mark.parametrize("dtype", ["int8", "int16"])
def test_conv2d_pot_matches_kernel_at_every_shift(dtype):
    """conv2d/pot (RESCALE 2^30, 30 + s', a clamp where the value condition needs it; DOUBLE_ROUND's ties away
    from zero as acc - [acc < 0]) against refvit's conv2d_pot and Python integers, every REQUIRE checked."""
    w, bias, shift = pot_channels()
    x = np.arange(-128, 128, dtype=np.int8).reshape(1, 16, 16, 1)                  # NHWC
    acc = w.reshape(1, -1).astype(np.int64) * x.reshape(-1, 1) + bias                # (256, Cout), the accumulators
    assert acc.max() == (1 << 31) - 1 and acc.min() == -(1 << 31) + 1
    c = constants(weight=w, bias=bias, shift=shift)
    for rounding in ROUNDINGS:
        op = G.Op("t", "conv2d", "pot", {}, {}, {"rounding": rounding}, dtype, (), "")
        got = run_emitter(E._conv2d_pot, op, {"x": x}, c)                           # (1, 1, 256, Cout) tokens
        want = KV.conv2d_pot(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), w, bias, shift, rounding=rounding,
                             out_dtype=np.dtype(dtype))                             # (1, Cout, 16, 16)
        assert np.array_equal(got.reshape(256, -1), want.reshape(-1, 256).T), rounding
        py = [[pot_reference(int(a), int(s), rounding, 8 * np.dtype(dtype).itemsize) for a, s in zip(row, shift)]
              for row in acc]
        assert np.array_equal(got.reshape(256, -1), np.array(py)), rounding


def test_conv2d_pot_rescale_constants():
    """The RESCALE shift 30 + max(s, -bits) stays in TOSA's [2, 62] for every s in [-31, 31] and the clamp H makes
    R(+-H) saturate: R(v, t) = floor(v / 2^t + 1/2) evaluated on Python integers."""
    for bits in (8, 16):
        shifts = np.arange(-31, 32)
        rs, clamp = E.pot_rescale_shifts(shifts, bits)
        assert rs.min() == 30 - bits and rs.max() == 61
        for s, t, h in zip(shifts.tolist(), (rs - 30).tolist(), clamp.tolist()):
            r = (lambda v: (v * (1 << 30) + (1 << (t + 29))) >> (t + 30))            # apply_scale_32(v, 2^30, 30 + t)
            assert -(1 << (t + 29)) <= -h and h < 1 << (t + 29)                       # RESCALE's value condition
            assert h == (1 << 31) - 1 or (r(h) >= (1 << (bits - 1)) - 1 and r(-h) <= -(1 << (bits - 1))), (s, bits)


def test_conv2d_pot_outside_its_shift_range_is_refused():
    x = np.zeros((1, 1, 1, 1), np.int8)
    c = constants(weight=np.ones((2, 1, 1, 1), np.int8), bias=np.zeros(2, np.int32), shift=np.array([3, 32], np.int8))
    with pytest.raises(E.TosaExportError, match=r"op 't' \(conv2d_pot\): shift must be in \[-31, 31\], got \[3, 32\]"):
        run_emitter(E._conv2d_pot, record("conv2d", "pot", rounding=SINGLE_ROUND), {"x": x}, c)


def test_tosa_double_round_is_not_pot_shift():
    """Why the emitter does not use TOSA's double_round: RESCALE(acc, 2^30, s + 30, double_round) adds 2^30 before
    the shift when s >= 2, and rounds acc = 2^(s-1) - 1 (mod 2^s), acc >= 0, up; pot_shift rounds it down."""
    from tosa_reference import _apply_scale_32
    op = E.TosaOp("rescale", (), {}, E.Value("v", (), "int32"), "t")
    for s in (2, 3, 17, 30, 31):
        acc = np.array([v for v in ((1 << (s - 1)) - 1 + k * (1 << s) for k in (0, 1, 5)) if v < 1 << 31], np.int64)
        tosa = _apply_scale_32(acc, 1 << 30, s + 30, True, op)
        assert (tosa == KV.pot_shift(acc, np.int64(s), DOUBLE_ROUND) + 1).all(), s


def test_rescale_precondition_refused_when_unprovable():
    op = record("conv2d", "w8")
    E._require_rescale_domain(op, np.array([(1 << 30) - 1, 3]), np.array([31, 3]), "acc")   # holds
    with pytest.raises(E.TosaExportError, match="can reach 1073741824 with shift 31"):
        E._require_rescale_domain(op, np.array([1 << 30, 5]), np.array([31, 40]), "acc")


def test_the_tosa_reading_checks_preconditions():
    """The reading raises where TOSA says REQUIRE (so the model-level runs above check something)."""
    v = E.Value("v", (1, 4), "int32")
    cases = [(lambda em: em.rescale(v, 1 << 30, 3, "int8", SINGLE_ROUND), "value outside"),    # |5| >= 2^2
             (lambda em: em.mul(v, em.const(np.array([[1 << 30]]), "int32")), "product"),     # 5 * 2^30
             (lambda em: em.ars(v, em.scalar(32, 2), round=False), r"shift outside \[0, 31\]"),
             (lambda em: em.binary("add", v, em.scalar((1 << 31) - 1, 2)), "result leaves int32")]
    for build, message in cases:
        em = E._Emitter()
        out = build(em)
        with pytest.raises(TosaRequireError, match=message):
            run_program(E.TosaProgram(v, em.ops, [("out", out)]), np.array([[5, 0, -1, 2]], np.int32))


# ---------------------------------------------------------------------------------------------
# schemes: which export, and the refusal names the first op and why
# ---------------------------------------------------------------------------------------------

FIRST_REFUSED = {  # scheme -> (first record TOSA cannot express, a word of the reason); from the scheme table
    "refvit-int8": ("blocks.0.norm1", "2^50"),
    "ivit": ("blocks.0.norm1", "2^50"),
    "ivit-paper": ("blocks.0.norm1", "2^50"),
    "ibert": ("blocks.0.norm1", "2^31"),
    "w4a8": ("blocks.0.norm1", "2^50"),
    "mixed-pot": ("blocks.0.norm1", "2^50"),
    "int16-residual": ("embed", "2^46"),
    "pot8": ("blocks.0.norm1", "2^50"),
    "a16w8": ("patch_embed", "int48"),
}


@pytest.mark.parametrize("name", list(G.SCHEMES))
def test_refusal_names_the_first_inexpressible_op(name):
    cfg = DeiTConfig(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=3)
    graph = G.build_graph(cfg, SINGLE_ROUND, G.SCHEMES[name])
    if name not in FIRST_REFUSED:
        E.check_exportable(graph, name)                                            # tosa-int32, ibert-paper
        return
    op, why = FIRST_REFUSED[name]
    with pytest.raises(E.TosaExportError) as e:
        E.check_exportable(graph, name)
    assert f"scheme {name}: op '{op}'" in str(e.value) and why in str(e.value) and "--scheme tosa-int32" in str(e.value)


# ---------------------------------------------------------------------------------------------
# whole models through the TOSA reading
# ---------------------------------------------------------------------------------------------

@pytest.mark.shared
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_embedded_model_tosa_reading_equals_refvit(embedded, rounding):
    _, qm, x = embedded
    qm = qm.with_rounding(rounding)
    tr = traced(qm, x)
    program = E.export_tosa(qm, batch=len(x), outputs="all")
    results = run_program(program, x)
    assert list(results) == [op.name for op in qm.graph]                           # every tensor, in order
    assert first_difference(results, tr) is None
    logits_only = E.export_tosa(qm, batch=len(x))
    assert [n for n, _ in logits_only.results] == ["head"]
    assert np.array_equal(run_program(logits_only, x)["head"], tr.tensors["head"])


@pytest.mark.shared
def test_pot_scheme_json_exports_and_the_tosa_reading_equals_refvit(embedded, tmp_path):
    """pot8 with the 32-bit LayerNorm and the i-exp softmax (a scheme JSON file) exports in both rounding modes;
    every tensor through the TOSA reading equals refvit's. pot8 itself stops at its int64 LayerNorm."""
    quantize_with, _, x = embedded
    path = tmp_path / "pot8-tosa.json"
    path.write_text(json.dumps(POT_TOSA))
    for rounding in ROUNDINGS:
        qm = quantize_with(G.resolve_scheme(str(path)), rounding)
        assert {op.variant for op in qm.graph if op.op == "conv2d"} == {"pot"}
        program = E.export_tosa(qm, batch=len(x), outputs="all")
        assert sum(op.loc == "head" and op.opcode == "rescale" for op in program.ops) == 1
        assert first_difference(run_program(program, x), traced(qm, x)) is None, rounding


@pytest.mark.shared
@pytest.mark.parametrize("scheme, op", [pytest.param(GELU64_TOSA, "gelu", marks=pytest.mark.slow),
                                        (EXP1024_TOSA, "softmax")], ids=["gelu64", "exp1024"])
def test_table_n_schemes_export_and_the_tosa_reading_equals_refvit(embedded, scheme, op):
    """tosa-int32 with a 64-entry GELU table (gelu_table_n: one 256-entry TABLE of repeated entries) or a 1024-entry
    exp table at 2^-6 (softmax_table_n: GATHER), both roundings, every tensor."""
    quantize_with, _, x = embedded
    for rounding in ROUNDINGS:
        qm = quantize_with(G.resolve_scheme(scheme), rounding)
        assert {r.variant for r in qm.graph if r.op == op} == {"table-n"}
        program = E.export_tosa(qm, batch=len(x), outputs="all")
        assert first_difference(run_program(program, x), traced(qm, x)) is None, rounding


@pytest.mark.shared
def test_broken_export_is_caught_by_the_tosa_reading(embedded):
    _, qm, x = embedded
    program = E.export_tosa(qm, batch=len(x), outputs="all")
    [i] = [i for i, op in enumerate(program.ops) if op.result.name == f"{BROKEN_OP}.shift"]
    op = program.ops[i]
    program.ops[i] = E.TosaOp(op.opcode, op.operands, {"values": op.attrs["values"] + 1}, op.result, op.loc)
    assert first_difference(run_program(program, x), traced(qm, x)) == BROKEN_OP


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

@pytest.mark.shared
def test_cli_writes_mlir(embedded, tmp_path, capsys):
    _, qm, _ = embedded
    save_quantized(qm, tmp_path / "q.safetensors")
    for outputs, count in (("logits", 1), ("all", len(qm.graph))):
        out = tmp_path / f"{outputs}.mlir"
        assert main(["export-tosa", "--model", str(tmp_path / "q.safetensors"), "--out", str(out),
                     "--outputs", outputs, "--batch", "2"]) == 0
        text = out.read_text()
        assert "func.func @main(%input: tensor<2x3x32x32xi8>)" in text
        assert text.count("refvit.name = ") == count and '"tosa.rescale"' in text
        assert f"wrote {out}" in capsys.readouterr().out


def test_cli_refuses_the_default_scheme(tmp_path, capsys):
    code = main(["export-tosa", "--out", str(tmp_path / "m.mlir")])                # the shipped refvit-int8 model
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("refvit: error: scheme refvit-int8: op "
                                                                 "'blocks.0.norm1'"), err
    assert not (tmp_path / "m.mlir").exists()
    assert main(["export-tosa", "--out", str(tmp_path / "m.mlir"), "--batch", "0"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# IREE: an independent compiler runs the exported MLIR
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def iree():
    """IREE's compiler and runtime, or a skip that says how to install them."""
    why = "IREE is not installed (pip install 'refvit[tosa]'): the cross-check by an independent compiler is skipped"
    return pytest.importorskip("iree.compiler", reason=why), pytest.importorskip("iree.runtime", reason=why)


def iree_run(iree, module_text: str, calls: dict) -> tuple[dict, float]:
    """Compile MLIR text (several functions) for llvm-cpu from TOSA, call each {function: input};
    -> ({function: [result arrays]}, compile seconds)."""
    ic, ir = iree
    t = time.perf_counter()
    vmfb = ic.compile_str(module_text, target_backends=["llvm-cpu"], input_type="tosa", extra_args=IREE_FLAGS)
    seconds = time.perf_counter() - t
    module = ir.load_vm_flatbuffer(vmfb, driver="local-sync")
    out = {}
    for fn, x in calls.items():
        res = getattr(module, fn)(x)
        out[fn] = [np.asarray(r) for r in (res if isinstance(res, (list, tuple)) else [res])]
    return out, seconds


def named(program: E.TosaProgram, arrays: list) -> dict:
    return {name: a for (name, _), a in zip(program.results, arrays)}


@pytest.mark.slow
@pytest.mark.shared
def test_iree_runs_the_embedded_model_bit_exact(iree, embedded):
    """One module: tosa-int32 in both rounding modes with every tensor, the same with one RESCALE shift off by
    one, and the other variants that TOSA expresses (table softmax by GATHER, shift GELU, 4-bit weights)."""
    quantize_with, qm, x = embedded
    models = {"single": qm, "double": qm.with_rounding(DOUBLE_ROUND),
              "variants": quantize_with(G.Scheme("t", layernorm="int32", softmax="table", gelu="shift", conv="w4"),
                                        DOUBLE_ROUND)}
    programs = {fn: E.export_tosa(q, batch=len(x), outputs="all") for fn, q in models.items()}
    texts = [p.to_mlir(fn) for fn, p in programs.items()]
    texts.append(break_shift(programs["single"].to_mlir("broken")))
    out, seconds = iree_run(iree, "\n".join(texts), {fn: x for fn in [*programs, "broken"]})
    print(f"\nIREE compiled {len(texts)} exports of the embedded model in {seconds:.1f} s")
    for fn, program in programs.items():
        assert first_difference(named(program, out[fn]), traced(models[fn], x)) is None, fn
    assert first_difference(named(programs["single"], out["broken"]), traced(qm, x)) == BROKEN_OP


@pytest.mark.slow
@pytest.mark.shared
def test_iree_runs_conv2d_pot_bit_exact(iree, embedded):
    """conv2d/pot in IREE: the pot8-tosa scheme on the embedded model (both rounding modes, every tensor), and
    the hand-made 1x1 conv of every shift in [-31, 31] with ties and +-(2^31 - 1) accumulators (int8 and int16
    out, both rounding modes) against refvit's conv2d_pot."""
    quantize_with, _, x = embedded
    models = {f"pot_{r.split('_')[0].lower()}": quantize_with(G.resolve_scheme(POT_TOSA), r) for r in ROUNDINGS}
    programs = {fn: E.export_tosa(q, batch=len(x), outputs="all") for fn, q in models.items()}
    w, bias, shift = pot_channels()
    xc = np.arange(-128, 128, dtype=np.int8).reshape(1, 16, 16, 1)                # NHWC
    wants = {}
    for rounding in ROUNDINGS:
        for dtype in ("int8", "int16"):
            em = E._Emitter()
            v = E.Value("x", xc.shape, "int8")
            op = G.Op("t", "conv2d", "pot", {}, {}, {"rounding": rounding}, dtype, (), "")
            out, _ = E._conv2d_pot(em, op, {}, v, constants(weight=w, bias=bias, shift=shift))
            fn = f"conv_{rounding.split('_')[0].lower()}_{dtype}"
            programs[fn] = E.TosaProgram(v, em.ops, [("out", out)])
            wants[fn] = KV.conv2d_pot(np.ascontiguousarray(xc.transpose(0, 3, 1, 2)), w, bias, shift,
                                      rounding=rounding, out_dtype=np.dtype(dtype)).reshape(-1, 256).T
    calls = {fn: (x if fn in models else xc) for fn in programs}
    out, seconds = iree_run(iree, "\n".join(p.to_mlir(fn) for fn, p in programs.items()), calls)
    print(f"\nIREE compiled {len(programs)} conv2d/pot programs in {seconds:.1f} s (pot8-tosa: "
          f"{len(programs['pot_single'].ops)} TOSA ops with every tensor)")
    for fn, program in programs.items():
        if fn in models:
            assert first_difference(named(program, out[fn]), traced(models[fn], x)) is None, fn
        else:
            assert np.array_equal(out[fn][0].reshape(256, -1), wants[fn]), fn


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["tosa-int32"])
def test_iree_runs_deit_tiny_bit_exact(iree, scheme):
    """DeiT-Tiny (224 px, d192, 12 layers, 1000 classes), random weights, tosa-int32, batch 2: every tensor in both
    rounding modes. Prints the compile time and the MLIR size. (pot8-tosa ran here bit-exact too, once: 5,011 /
    5,113 TOSA ops; the suite runs it on the embedded model, test_iree_runs_conv2d_pot_bit_exact, to stay in CI's
    time.)"""
    cfg = DeiTConfig()
    rng = np.random.default_rng(0)
    qm = quantize(token_to_conv(random_params(cfg, "cls", 0)), cfg, [rng.standard_normal((2, 3, 224, 224))],
                  head_mode="cls", scheme=G.resolve_scheme(scheme))
    x = int_model.quantize_input(qm, rng.standard_normal((2, 3, 224, 224)))
    models = {"single": qm, "double": qm.with_rounding(DOUBLE_ROUND)}
    programs = {fn: E.export_tosa(q, batch=2, outputs="all") for fn, q in models.items()}
    texts = {fn: p.to_mlir(fn) for fn, p in programs.items()}
    out, seconds = iree_run(iree, "\n".join(texts.values()), {fn: x for fn in programs})
    print(f"\nDeiT-Tiny ({qm.scheme.name}): MLIR {len(texts['single']) / 1e6:.1f} MB per export "
          f"({len(programs['single'].ops)} TOSA ops); IREE compiled both exports in {seconds:.1f} s")
    for fn, program in programs.items():
        assert first_difference(named(program, out[fn]), traced(models[fn], x)) is None, fn


# ---------------------------------------------------------------------------------------------
# the authors' code variants (issue 19)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1e-5, 3e-4, 0.004, 0.03, 0.5])
def test_softmax_poly_ibert_code_matches_kernel(sigma):
    D = 64
    scores = score_rows(D, 37, np.random.default_rng(int(sigma * 1e6)))
    m, s = KV.softmax_exp_multiplier(sigma)
    c = constants(multiplier=np.int32(m), shift=np.int8(s))
    for rounding in ROUNDINGS:
        got = run_emitter(E._softmax_poly_ibert_code, record("softmax", "poly-ibert-code", rounding=rounding),
                          {"s": scores}, c, {"head_dim": D})
        assert np.array_equal(got, KA.softmax_poly_ibert_code(scores, m, s, rounding=rounding)), (sigma, rounding)


@pytest.mark.parametrize("scale_in,scale_out", [(0.005, 0.004), (0.02, 0.02), (0.3, 0.1)])
def test_gelu_poly_ibert_code_exports_with_the_poly_emitter(scale_in, scale_out):
    x = np.arange(-128, 128, dtype=np.int8).reshape(1, 1, 16, 16)
    consts = KA.gelu_poly_ibert_code_constants(scale_in, scale_out)
    c = constants(**{k: np.int64(v) for k, v in consts.items()})
    for rounding in ROUNDINGS:
        got = run_emitter(E._gelu_poly, record("gelu", "poly-ibert-code", rounding=rounding), {"x": x}, c)
        assert np.array_equal(got, KA.gelu_poly_ibert_code(x, **consts, rounding=rounding))


def test_which_authors_variants_export():
    """The code's i-exp and i-GELU export (a scheme with them and the 32-bit LayerNorm passes); the code's
    IntLayerNorm and the 16-bit Shiftmax have no emitter (their rows' no_tosa)."""
    cfg = DeiTConfig(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=3)
    code = G.Scheme("ibert-code-tosa", layernorm="int32", softmax="poly-ibert-code", gelu="poly-ibert-code")
    E.check_exportable(G.build_graph(cfg, SINGLE_ROUND, code), code.name)
    shift16 = G.Scheme("s16", layernorm="int32", softmax="shift16")
    with pytest.raises(E.TosaExportError, match="op 'blocks.0.attn.softmax'"):
        E.check_exportable(G.build_graph(cfg, SINGLE_ROUND, shift16), shift16.name)
