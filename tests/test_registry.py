"""The op registry (refvit/registry.py): every (op, variant) is one row, and a row is all it takes.

The proof: a toy GELU variant with its own table rule is defined in this file alone, registered, and run
through quantize -> quantized file round trip -> golden (internals, all four formats) -> check ->
conformance (its own cases, a DUT method) -> export-tosa, with no edit to any other module.
"""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

import conformance
from conformance.dut import DUT, OPS, REFERENCE_KERNELS, RefvitDUT
from refvit import golden, int_model
from refvit import registry as R
from refvit.cli import main
from refvit.config import DeiTConfig
from refvit.constants import Context
from refvit.graph import GraphError, Scheme, build_graph, input_dtype
from refvit.intmath import round_half_away_from_zero, saturate
from refvit.checkpoints.convert import token_to_conv
from refvit.models import random_params
from refvit.qfile import load_quantized, save_quantized
from refvit.quantize import quantize
from refvit.registry import OUTPUT, OpVariant, UnknownOpError

CFG = DeiTConfig(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=5, distilled=True)


# ---------------------------------------------------------------------------------------------
# the toy variant: GELU replaced by a ReLU table (its own table rule), with one internal
# ---------------------------------------------------------------------------------------------

def gelu_relu_table(x, table, *, internals=None):
    """out = table[x + 128] with table[i] = saturate(round(max((i - 128) * s_in, 0) / s_out)): a ReLU."""
    index = x.astype(np.int64) + 128                                              # [0, 255]
    if internals is not None:
        internals["index"] = index.astype(np.uint8)
    return table[index]


def gelu_relu_table_plain(x, table, *, internals=None):
    """The same, element by element with Python ints: the toy's reference kernel."""
    flat = [int(v) + 128 for v in np.asarray(x).ravel()]
    if internals is not None:
        internals["index"] = np.array(flat, np.uint8).reshape(np.shape(x))
    return np.array([int(table[i]) for i in flat], np.int8).reshape(np.shape(x))


def relu_table_constants(op, ctx: Context) -> dict:
    s_in, s_out = ctx.s[op.inputs["x"]], ctx.s[op.name]
    real = np.maximum((np.arange(256) - 128) * s_in, 0.0)                          # (256,)
    return {op.constants["table"]: saturate(round_half_away_from_zero(real / s_out), np.int8)}


def relu_cases():
    rng = np.random.default_rng(0)
    table = rng.integers(-128, 128, 256).astype(np.int8)
    yield ("gelu_relu_table_all256", {"x": np.arange(-128, 128, dtype=np.int8), "table": table}, {},
           "every int8 input once", True)
    yield ("gelu_relu_table_random", {"x": rng.integers(-128, 128, (2, 8, 1, 5)).astype(np.int8), "table": table},
           {}, "", False)


TOY = OpVariant("gelu", "relu-table", gelu_relu_table, gelu_relu_table_plain, ("x",),
                "ReLU as a 256-entry table (test toy)", "tests/test_registry.py", constants=relu_table_constants,
                internals={"index": OUTPUT}, tosa="_gelu_table", cases=relu_cases)


@pytest.fixture(scope="module")
def toy():
    with R.registered(TOY):
        yield TOY


@pytest.fixture(scope="module")
def toy_model(toy, tmp_path_factory):
    params = token_to_conv(random_params(CFG, "mean", 3))
    rng = np.random.default_rng(1)
    calib = [rng.standard_normal((2, 3, 16, 16)).astype(np.float32)]
    return quantize(params, CFG, calib, head_mode="mean", scheme=Scheme("toy", gelu="relu-table"))


def test_toy_variant_goes_through_every_layer(toy_model, tmp_path):
    qm = toy_model
    gelu = next(op for op in qm.graph if op.op == "gelu")
    assert (gelu.variant, gelu.kernel, list(gelu.constants)) == ("relu-table", "gelu_relu_table", ["table"])
    # its constants: the table by its own rule, checked against an independent computation
    s_in, s_out = float(qm.tensors["blocks.0.mlp.fc1.scale"]), float(qm.tensors["blocks.0.mlp.gelu.scale"])
    want = [max(-128, min(127, int(np.floor(abs(max((i - 128) * s_in, 0) / s_out) + 0.5)))) for i in range(256)]
    assert qm.tensors[gelu.constants["table"]].tolist() == want
    # quantized file round trip: the same records and constants, the scheme read back from the records
    save_quantized(qm, tmp_path / "toy.safetensors")
    back = load_quantized(tmp_path / "toy.safetensors")
    assert back.graph == qm.graph and back.scheme.gelu == "relu-table"
    assert all(np.array_equal(back.tensors[k], v) for k, v in qm.tensors.items())
    # golden with internals, all four formats, fast and reference kernels give the same bytes
    xq = golden.seed_input(5, (2, 3, 16, 16))
    m = golden.write_golden(back, xq, tmp_path / "g", formats=("npy", "hex", "bin", "h"), internals=True)
    golden.write_golden(back, xq, tmp_path / "g_ref", formats=("npy", "hex", "bin", "h"), internals=True,
                        kernels="reference")
    entry = next(o for o in m["ops"] if o["name"] == "blocks.0.mlp.gelu")
    assert entry["internals"] == {"index": "blocks.0.mlp.gelu.index"}
    assert m["internals"]["kernels"]["gelu_relu_table"] == ["index"]
    files = sorted(p.relative_to(tmp_path / "g") for p in (tmp_path / "g").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "g_ref") for p in (tmp_path / "g_ref").rglob("*") if p.is_file())
    for f in files:
        if f.name != "manifest.json":
            assert (tmp_path / "g" / f).read_bytes() == (tmp_path / "g_ref" / f).read_bytes(), f
    index = np.load(tmp_path / "g" / "tensors" / "blocks.0.mlp.gelu.index.npy")
    fc1 = np.load(tmp_path / "g" / "tensors" / "blocks.0.mlp.fc1.npy")
    assert np.array_equal(index, fc1.astype(np.int64) + 128)                            # the internal's meaning
    # check: the golden folder against itself passes, a changed gelu element is found at that op
    assert main(["check", str(tmp_path / "g"), str(tmp_path / "g_ref")]) == 0
    out = np.load(tmp_path / "g_ref" / "tensors" / "blocks.0.mlp.gelu.npy")
    out.flat[3] += 1
    np.save(tmp_path / "g_ref" / "tensors" / "blocks.0.mlp.gelu.npy", out)
    assert main(["check", str(tmp_path / "g"), str(tmp_path / "g_ref"), "--json"]) == 1


def test_toy_variant_in_conformance(toy):
    names = [s.name for s in conformance.select("full") if s.op == "gelu_relu_table"]
    assert names == ["gelu_relu_table_all256", "gelu_relu_table_random"]
    assert [s.name for s in conformance.select("quick") if s.op == "gelu_relu_table"] == ["gelu_relu_table_all256"]
    case = conformance.get_case("gelu_relu_table_all256")
    assert np.array_equal(case.expected, case.inputs["table"])                  # x + 128 runs over 0..255
    assert REFERENCE_KERNELS["gelu_relu_table"] is gelu_relu_table
    conformance.check(RefvitDUT(), case)

    class Mine(DUT):
        def gelu_relu_table(self, x, table):
            return np.asarray(table)[np.asarray(x, np.int64) + 128]

    class Broken(DUT):
        def gelu_relu_table(self, x, table):
            return np.asarray(table)[np.clip(np.asarray(x, np.int64) + 129, 0, 255)]

    conformance.check(Mine(), case)
    with pytest.raises(AssertionError, match="gelu_relu_table_all256"):
        conformance.check(Broken(), case)
    with pytest.raises(NotImplementedError):
        DUT().gelu_relu_table(case.inputs["x"], case.inputs["table"])


def test_toy_variant_exports_to_tosa_or_says_why(toy_model):
    from refvit.export_tosa import TosaExportError, export_tosa
    tosa_scheme = Scheme("toy-tosa", layernorm="int32", softmax="poly", gelu="relu-table")
    qm = toy_model.with_graph(build_graph(CFG, toy_model.rounding, tosa_scheme))    # same constants, TOSA's ops
    qm = quantize(token_to_conv(random_params(CFG, "mean", 3)), CFG,
                  [np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)], head_mode="mean",
                  scheme=tosa_scheme)
    mlir = export_tosa(qm).to_mlir()                                               # the row names _gelu_table
    assert "tosa.table" in mlir and 'loc("blocks.0.mlp.gelu")' in mlir
    no = OpVariant("gelu", "relu-none", gelu_relu_table, gelu_relu_table_plain, ("x",), "a toy without TOSA", "tests",
                   no_tosa="toy reason",
                   constants=relu_table_constants)
    with R.registered(no):
        qm = qm.with_graph(build_graph(CFG, qm.rounding, Scheme("t", layernorm="int32", softmax="poly",
                                                                gelu="relu-none")))
        with pytest.raises(TosaExportError, match="toy reason"):
            export_tosa(qm)


# ---------------------------------------------------------------------------------------------
# the registry itself
# ---------------------------------------------------------------------------------------------

def test_unknown_op_variant_is_an_error_everywhere():
    with pytest.raises(UnknownOpError, match="unknown op 'gelu' variant 'cubic'"):
        R.row("gelu", "cubic")
    with pytest.raises(GraphError, match="gelu variant 'cubic'"):
        Scheme("x", gelu="cubic")
    graph = [op.to_dict() for op in build_graph(CFG)]
    graph[5]["variant"] = "cubic"
    from refvit.graph import graph_from_dicts
    with pytest.raises(GraphError, match="unknown op"):
        graph_from_dicts(graph)


def test_rows_are_consistent_with_their_kernels():
    for r in R.rows():
        r.check()
        sig = inspect.signature(r.kernel)
        assert all(a in sig.parameters for a in r.inputs + r.constant_args), r.key
        assert (r.tosa is None) != (r.no_tosa is None), r.key
        assert r.spec, r.key
    kernel_names = [r.kernel_name for r in R.rows()]
    shared = {n for n in kernel_names if kernel_names.count(n) > 1}
    assert not shared, f"two rows with one kernel name: {shared}"


def test_register_refuses_bad_rows():
    with pytest.raises(UnknownOpError, match="registered already"):
        R.register(R.row("gelu", "table"))
    with pytest.raises(UnknownOpError, match="exactly one of tosa"):
        R.register(OpVariant("gelu", "x", gelu_relu_table, gelu_relu_table_plain, ("x",), "", "s"))
    with pytest.raises(UnknownOpError, match="not arguments"):
        R.register(OpVariant("gelu", "x", gelu_relu_table, gelu_relu_table_plain, ("y",), "", "s", no_tosa="n"))
    with pytest.raises(UnknownOpError, match="differ"):
        R.register(OpVariant("gelu", "x", gelu_relu_table, lambda x: x, ("x",), "", "s", no_tosa="n"))
    assert ("gelu", "x") not in {r.key for r in R.rows()}


def test_the_dut_has_a_method_per_row_with_the_kernels_signature():
    for r in R.rows():
        stub = getattr(DUT(), r.kernel_name)
        assert getattr(stub, "not_implemented", False), r.kernel_name
        assert list(inspect.signature(stub).parameters) == list(inspect.signature(r.kernel).parameters)
    assert {"apply_scale", "requantize", "select_tokens", "prune_tokens", "block", "model"} <= set(OPS)


def test_cli_help_lists_every_internal(capsys):
    assert main(["golden", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for r in R.rows():
        for internal in r.internals:
            assert f"{r.kernel_name}: " in text and internal in text


def test_internals_never_take_a_constant_or_tensor_name(small_models):
    for qm in small_models:
        trace = int_model.Trace()
        xq = golden.seed_input(1, (1, 3, qm.config.img_size, qm.config.img_size), input_dtype(qm.graph))
        int_model.forward_int(qm, xq, trace, internals=True)                   # run_graph raises on a clash
        inside = {n for names in trace.internals.values() for n in names.values()}
        assert not inside & set(qm.tensors), qm.scheme.name
        assert len(inside) == sum(len(v) for v in trace.internals.values())


@pytest.fixture(scope="module")
def small_models():
    from refvit.graph import SCHEMES
    params = token_to_conv(random_params(CFG, "mean", 2))
    calib = [np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)]
    return [quantize(params, CFG, calib, head_mode="mean", scheme=s) for s in SCHEMES.values()]


def test_manifest_states_every_scalar_constant(small_models, tmp_path):
    qm = next(q for q in small_models if q.scheme.name == "ibert-paper")
    m = golden.write_golden(qm, golden.seed_input(1, (1, 3, 16, 16)), tmp_path / "g")
    for name, entry in m["constants"].items():
        if entry["shape"] == [] or name.endswith((".multiplier", ".shift")):
            assert "value" in entry, name
    assert json.dumps(m["constants"]["blocks.0.mlp.gelu.c_b"]["value"])


def test_records_keep_kernel_argument_order_through_files(small_models, tmp_path):
    """docs/spec.md Part 3: inputs, constants and attrs in the kernel's argument order, also when read back."""
    qm = small_models[0]
    save_quantized(qm, tmp_path / "q.safetensors")
    for op in load_quantized(tmp_path / "q.safetensors").graph:
        r = R.row(op.op, op.variant)
        order = [a for a in r.positional_args if a in op.inputs or a in op.constants]
        assert list(op.inputs) + list(op.constants) == sorted(order, key=lambda a: (a not in op.inputs,
                                                                                     order.index(a))), op.name
        assert list(op.attrs) == [a for a in r.attrs if a in op.attrs], op.name


def test_architecture_where_to_add_a_variant_is_what_this_file_does():
    """docs/architecture.md lists four steps; this file's toy variant takes exactly those: a kernel, a
    reference kernel, a spec section (its row's `spec`), and one registry row, with no other module edited."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("## Where to add an op or a variant"):text.index("## Where to add a command")]
    steps = [line for line in section.splitlines() if line[:3] in {f"{i}. " for i in range(1, 10)}]
    assert [s.split("**")[1] for s in steps] == ["The kernel", "The reference kernel", "The spec section",
                                                 "The registry row"]
    for path in ("refvit/registry.py", "refvit/constants.py", "refvit/export_tosa.py", "tests/test_registry.py"):
        assert f"`{path}`" in section and (root / path).exists(), path
    assert TOY.kernel is gelu_relu_table and TOY.reference is gelu_relu_table_plain and TOY.spec


def test_internals_and_constants_have_distinct_c_identifiers(small_models, tmp_path, capsys):
    """docs/spec.md's defect 1: layernorm_int32's internal `k` once shared `blocks.i.normX.shift` with the
    constant; golden with internals and C output in one file (--c-split) must work for every scheme."""
    for qm in small_models:
        save_quantized(qm, tmp_path / f"{qm.scheme.name}.safetensors")
        out = tmp_path / f"g_{qm.scheme.name}"
        assert main(["golden", "--model", str(tmp_path / f"{qm.scheme.name}.safetensors"), "--seed", "1",
                     "--internals", "--formats", "npy,h", "--c-split", "--out", str(out), "--quiet"]) == 0, \
            capsys.readouterr().err
        assert (out / "golden.h").exists()
