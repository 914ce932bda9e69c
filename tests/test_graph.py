"""The integer graph as data: records, what is derived from them, compatibility of the quantized file,
the shipped model's golden bits, one model resolution, and the layers of the code."""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from refvit import graph as G
from refvit import registry as R
from refvit import int_model as im
from refvit.checkpoints import CheckpointError, read_safetensors, write_safetensors
from refvit.checkpoints.convert import token_to_conv
from refvit.cli import EXAMPLES, main
from refvit.config import DeiTConfig
from refvit.models import default_int8_path, random_params
from refvit.qfile import load_quantized, save_quantized
from refvit.quantize import quantize

ROOT = Path(__file__).resolve().parents[1]
CFG = DeiTConfig(img_size=16, patch_size=8, embed_dim=24, depth=3, num_heads=2, num_classes=5, distilled=False)


@pytest.fixture(scope="module")
def small():
    x = np.random.default_rng(3).standard_normal((3, 3, 16, 16)).astype(np.float32)
    return quantize(token_to_conv(random_params(CFG, "cls", 1)), CFG, [x], head_mode="cls"), x


def test_records_round_trip_and_read_in_order():
    graph = G.build_graph(CFG)
    assert G.graph_from_dicts(json.loads(json.dumps([op.to_dict() for op in graph]))) == graph
    seen = {"input"}
    for op in graph:
        assert set(op.inputs.values()) <= seen, op.name
        seen.add(op.name)
        assert R.row(op.op, op.variant).kernel.__name__ == op.kernel
    assert [op.name for op in graph][-3:] == ["norm", "head_input", "head"]
    assert len(graph) == 3 + 15 * CFG.depth + 3     # patch_embed, tokens, embed; 15 per block; norm, head_input, head


def test_graph_from_dicts_rejects_bad_records():
    good = [op.to_dict() for op in G.build_graph(CFG)]
    with pytest.raises(G.GraphError, match="non-empty list"):
        G.graph_from_dicts([])
    with pytest.raises(G.GraphError, match="unknown op"):
        G.graph_from_dicts([dict(good[0], variant="w3")] + good[1:])
    with pytest.raises(G.GraphError, match="before any op writes it"):
        G.graph_from_dicts(good[1:])
    with pytest.raises(G.GraphError, match="written twice"):
        G.graph_from_dicts(good + [good[-1]])


def test_required_constants_are_exactly_what_the_quantizer_makes(small):
    qm, _ = small
    integer = {k for k, v in qm.tensors.items() if np.asarray(v).dtype.kind in "iu"}
    needed = set(G.required_constants(qm.graph))
    assert integer == needed - set(G.BOUNDARY_CONSTANTS)
    assert set(G.BOUNDARY_CONSTANTS) <= set(qm.tensors)
    # every op's reporting scale names a float constant of the model, except the fused qkv output
    for op in qm.graph:
        assert op.scale is None and op.name.endswith("attn.qkv") or qm.tensors[op.scale].dtype == np.float64


def test_interpreter_frees_tensors_but_trace_keeps_all(small):
    qm, x = small
    tr = im.Trace()
    a = im.logits_int8_model(qm, x, tr)[0]
    assert np.array_equal(a, im.logits_int8_model(qm, x)[0])
    assert list(tr.tensors) == ["input"] + [op.name for op in qm.graph]


def test_a_dut_style_kernel_table_runs_the_same_graph(small):
    """run_graph with another kernel table (as conformance DUTs do) gets the same bits when the kernels agree,
    and a different answer when one kernel differs."""
    qm, x = small
    xq = im.quantize_input(qm, x)
    ref = G.run_graph(qm.graph, qm.tensors, xq)
    calls = []

    def kernels(op):
        calls.append(op.kernel)
        return R.row(op.op, op.variant).kernel
    assert np.array_equal(G.run_graph(qm.graph, qm.tensors, xq, kernels=kernels), ref)
    assert len(calls) == len(qm.graph)

    def broken(op):
        fn = R.row(op.op, op.variant).kernel
        if op.op != "gelu":
            return fn
        return lambda x, table: np.roll(fn(x, table), 1)
    assert not np.array_equal(G.run_graph(qm.graph, qm.tensors, xq, kernels=broken), ref)


def test_block_graph_is_relative_and_runs_alone(small):
    qm, x = small
    tr = im.Trace()
    im.forward_int(qm, im.quantize_input(qm, x), tr)
    blk = G.block_graph(qm.graph, 1)
    assert blk[0].inputs == {"x": "input"} and blk[-1].name == "residual2"
    consts = {c: qm.tensors.get(f"blocks.1.{c}", qm.tensors.get(c)) for c in G.required_constants(blk)
              if c not in G.BOUNDARY_CONSTANTS}
    out = G.run_graph(blk, consts, tr.tensors["blocks.0.residual2"], input_layout=G.TOKENS)
    assert np.array_equal(out, tr.tensors["blocks.1.residual2"])


def test_version_1_file_loads_and_other_versions_are_refused(small, tmp_path):
    qm, x = small
    path = save_quantized(qm, tmp_path / "v2.safetensors")
    tensors, meta = read_safetensors(path)
    m = json.loads(meta["refvit"])
    assert m["format_version"] == 2 and len(m["graph"]) == len(qm.graph)
    v1 = {k: v for k, v in m.items() if k not in ("graph", "scheme_choices")} | {"format_version": 1}
    write_safetensors(tmp_path / "v1.safetensors", tensors, {"refvit": json.dumps(v1)})
    old = load_quantized(tmp_path / "v1.safetensors")
    assert old.graph == qm.graph
    assert np.array_equal(im.logits_int8_model(old, x)[0], im.logits_int8_model(qm, x)[0])
    write_safetensors(tmp_path / "v3.safetensors", tensors, {"refvit": json.dumps(m | {"format_version": 3})})
    with pytest.raises(CheckpointError, match="format_version 3"):
        load_quantized(tmp_path / "v3.safetensors")


def _dump_digest(folder: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in the manifest's order."""
    m = json.loads((folder / "manifest.json").read_text())
    h = hashlib.sha256()
    for name, t in m["tensors"].items():
        a = np.load(folder / t["files"]["npy"])
        h.update(f"{name}|{a.dtype.name}|{a.shape}|".encode() + a.tobytes())
    return h.hexdigest()


# Computed by refvit 0.1 (before the graph was data) with `golden --seed 7 --batch 2` on the model it shipped,
# kept as tests/data/fmnist_deit_int8_refvit0.1.safetensors (the shipped file has since been re-quantized:
# calibration runs the float conv form, whose float rounding changed): the integer path must not move a bit.
REFVIT01_MODEL = Path(__file__).parent / "data" / "fmnist_deit_int8_refvit0.1.safetensors"
SHIPPED_SEED7_DIGEST = "2d629ddce924ed4076dbc926c14ae35c90ac7473168432cac79471f6c69b8229"


def test_refvit01_model_golden_bits_are_pinned(tmp_path, capsys):
    assert main(["golden", "--model", str(REFVIT01_MODEL), "--seed", "7", "--batch", "2",
                 "--out", str(tmp_path / "g")]) == 0
    capsys.readouterr()
    assert _dump_digest(tmp_path / "g") == SHIPPED_SEED7_DIGEST


def test_golden_model_file_and_default_give_the_same_input(tmp_path, capsys):
    """The bug of refvit 0.1: `golden --model Q --image X` used the ImageNet pipeline whatever Q recorded."""
    image = sorted(EXAMPLES.glob("*.png"))[0]
    assert main(["golden", "--image", str(image), "--out", str(tmp_path / "a")]) == 0
    assert main(["golden", "--model", str(default_int8_path()), "--image", str(image), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert a["input"]["sha256_int8"] == b["input"]["sha256_int8"]
    assert a["input"]["preprocess"] == b["input"]["preprocess"] and a["input"]["preprocess"]["name"] == "fmnist"
    assert _dump_digest(tmp_path / "a") == _dump_digest(tmp_path / "b")


def test_preprocess_option_is_recorded_and_used(tmp_path, capsys):
    image = sorted(EXAMPLES.glob("*.png"))[0]
    spec = tmp_path / "pp.json"
    spec.write_text(json.dumps({"kind": "grayscale-pad", "input_size": 32, "source_size": 28, "pad": 2,
                                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    assert main(["golden", "--model", str(default_int8_path()), "--image", str(image), "--preprocess", str(spec),
                 "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["input"]["preprocess"]["mean"] == [0.5, 0.5, 0.5] and m["input"]["preprocess"]["name"] == "pp.json"
    assert main(["classify", "--preprocess", "imagenet2"]) == 2
    assert capsys.readouterr().err.startswith("refvit: error: unknown preprocessing 'imagenet2'")


# ---------------------------------------------------------------- the layers of the code

LAYERS = [  # lower index = lower layer; a module may import its own layer (no cycle) or lower ones
    ["refvit", "refvit.errors"],
    ["refvit.intmath", "refvit.config", "refvit.functional", "refvit.labels", "refvit.prune"],
    ["refvit.int_kernels", "refvit.int_kernels_variants", "refvit.int_kernels_authors", "refvit.int_kernels_prune",
     "refvit.reference_hw",
     "refvit.model_token",
     "refvit.model_conv", "refvit.preprocess", "refvit.dumpfmt", "refvit.checkpoints*", "refvit.constants"],
    ["refvit.registry"],
    ["refvit.graph"],
    ["refvit.qfile"],
    ["refvit.quantize", "refvit.int_model"],
    ["refvit.models", "refvit.resolve", "refvit.golden", "refvit.check", "refvit.evaluate", "refvit.report",
     "refvit.export_tosa",
     "conformance*"],
    ["refvit.cli", "refvit.__main__"],
]


def _rank(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == m or (m.endswith("*") and module.startswith(m[:-1])) for m in layer):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _imports() -> dict:
    mods = {}
    for pkg in ("refvit", "conformance"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    edges = {}
    for name, f in mods.items():
        here = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.split(".")[:len(here.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                found |= set(subs) if subs else {target}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        edges[name] = {m for m in found if m in mods and m != name}
    return edges


def test_imports_go_downward_and_have_no_cycle():
    edges = _imports()
    for a, targets in edges.items():
        for b in targets:
            assert _rank(b) <= _rank(a), f"{a} (layer {_rank(a)}) imports {b} (layer {_rank(b)})"
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in edges.get(n, ()):
            assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
            if m not in state:
                visit(m, path + [m])
        state[n] = "done"
    for n in edges:
        if n not in state:
            visit(n, [n])


def test_no_test_imports_another_test_file():
    for f in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.split(".")[0].startswith("test_") for n in names), f"{f.name} imports {names}"


@pytest.mark.parametrize("damage, message", [
    (lambda t, m: t.update({"blocks.0.mlp.fc1.multiplier": -t["blocks.0.mlp.fc1.multiplier"]}), "multiplier"),
    (lambda t, m: t.update({"blocks.1.attn.softmax.shift": np.array(70, np.int8)}), "shift"),
    (lambda t, m: t.update({"blocks.0.attn.proj.weight": t["blocks.0.attn.proj.weight"].astype(np.int16)}), "int8"),
    (lambda t, m: t.update({"blocks.0.norm2.bias": t["blocks.0.norm2.bias"][:-1]}), "bias"),
    (lambda t, m: t.update({"input.scale": np.array(float("nan"))}), "input.scale"),
    (lambda t, m: m.update({"head_mode": "mean"}), "head_mode"),
    (lambda t, m: m["config"].update({"num_classes": 6}), "classes"),
])
def test_quantized_file_constants_are_checked_at_load(small, tmp_path, capsys, damage, message):
    qm, _ = small
    t, meta = read_safetensors(save_quantized(qm, tmp_path / "q.safetensors"))
    m = json.loads(meta["refvit"])
    damage(t, m)
    write_safetensors(tmp_path / "bad.safetensors", t, {"refvit": json.dumps(m)})
    with pytest.raises(CheckpointError, match=message):
        load_quantized(tmp_path / "bad.safetensors")
    assert main(["classify", "--model", str(tmp_path / "bad.safetensors"), str(sorted(EXAMPLES.glob("*.png"))[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refvit: error: ") and len(err.strip().splitlines()) == 1 and "bad.safetensors" in err
