"""golden and check as hardware teams use them (issue 9): internals, subsets, own inputs, packed hex, C output
options, the check report (--json, --atol, --present, --format), float dumps, `refvit report`, progress.

Every expected value is computed here, independently: internals from the op's input tensors and constants
with numpy int64 / Python ints, packed hex and C files by hand-written decoders, SQNR from a hand-written conv.
"""
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from refvit import dumpfmt, golden, report
from refvit import int_model as im
from weights_tools import write_safetensors
from refvit.cli import EXAMPLES, main
from refvit.config import DeiTConfig
from refvit.graph import Scheme
from refvit.models import random_params
from refvit.preprocess import PRESETS
from refvit.qfile import save_quantized

from goldenfiles import copy_tensors

TINY = DeiTConfig(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000)


def run(capsys, *argv):
    """`python -m refvit ARGV...` in-process -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def manifest_of(folder):
    return json.loads((folder / "manifest.json").read_text())


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def small(tiny):
    """The tiny quantized DeiT (tests/conftest.py), its float weights (token form) and a float batch of two."""
    return tiny.qm, tiny.params, tiny.x[:2]


@pytest.fixture(scope="module")
def files(small, tmp_path_factory):
    """w.safetensors (float), q.safetensors (quantized from it), two images a.png b.png in imgs/."""
    qm, params, _ = small
    d = tmp_path_factory.mktemp("files")
    write_safetensors(d / "w.safetensors", params)
    save_quantized(qm, d / "q.safetensors")
    (d / "imgs").mkdir()
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / "imgs" / f"{name}.png")
    return d


@pytest.fixture(scope="module")
def inside(tiny, tiny_golden):
    """A golden dump with internals of the tiny model on its own input (all formats)."""
    out, manifest, _, _ = tiny_golden(internals=True)
    return out, manifest, tiny.xq()


def load(folder, manifest, name):
    entry = manifest["tensors"].get(name) or manifest["constants"][name]
    return np.load(folder / entry["files"]["npy"])


# ---------------------------------------------------------------- independent recomputations of internals

def ref_conv_acc(x, w, b):
    """bias + sum_{c,u,v} x[b, c, i*k+u, j*k+v] * w[o, c, u, v], int64 (B, Cout, H/k, W/k)."""
    B, C, H, W = x.shape
    k = w.shape[2]
    cols = x.astype(np.int64).reshape(B, C, H // k, k, W // k, k)
    return np.einsum("bciujv,ocuv->boij", cols, w.astype(np.int64)) + b.astype(np.int64)[None, :, None, None]


def ref_layernorm(x, eps_int, gamma, bias):
    """The spec's layernorm_normalize + tail, position by position with Python ints."""
    xi = x.astype(np.int64)
    C = x.shape[1]
    total = xi.sum(axis=1, keepdims=True)
    d = C * xi - total
    sumsq = (d * d).sum(axis=1, keepdims=True)
    root = np.vectorize(lambda q: math.isqrt(int(q)), otypes=[np.int64])(sumsq + int(eps_int))
    recip = np.vectorize(lambda r: (1 << 40) // int(r), otypes=[np.int64])(root)
    t = (d * recip + (1 << 23)) >> 24                             # |d * recip| <= 2^40: exact in int64
    acc = t * gamma.astype(np.int64).reshape(1, C, 1, 1) + bias.astype(np.int64).reshape(1, C, 1, 1)
    return {"sum": total, "d": d, "sumsq": sumsq, "root": root, "recip": recip, "t": t, "acc": acc}


def ref_softmax(scores, multiplier, shift, table):
    """The spec's softmax steps with Python ints (SINGLE_ROUND)."""
    s = scores.astype(object)
    d = s.max(axis=-1, keepdims=True) - s
    m, sh = int(multiplier), int(shift)
    index = np.vectorize(lambda v: min(255, (v * m + (1 << (sh - 1))) >> sh), otypes=[object])(d)
    exp = np.vectorize(lambda i: int(table[i]), otypes=[object])(index)
    total = exp.sum(axis=-1, keepdims=True)
    recip = np.vectorize(lambda v: (1 << 40) // v, otypes=[object])(total)
    return {"index": index, "exp": exp, "sum": total, "recip": recip}


def test_internals_equal_an_independent_recomputation(inside, small):
    out, m, _ = inside
    qm = small[0]
    assert qm.rounding == "SINGLE_ROUND"
    checked = set()
    for op in m["ops"]:
        kind = op["op"]
        inp = {a: load(out, m, t) for a, t in op["inputs"].items()}
        const = {a: load(out, m, c) for a, c in op["constants"].items()}
        got = {i: load(out, m, t) for i, t in op.get("internals", {}).items()}
        if kind == "conv2d":
            want = {"acc": ref_conv_acc(inp["x"], const["weight"], const["bias"])}
        elif kind == "attention_context":
            want = {"acc": np.einsum("bhij,bhdj->bhdi", inp["p"].astype(np.int64), inp["v"].astype(np.int64))}
        elif kind == "layernorm":
            want = ref_layernorm(inp["x"], const["eps_int"], const["gamma"], const["bias"])
        elif kind == "softmax":
            want = ref_softmax(inp["scores"], const["multiplier"], const["shift"], const["exp_table"])
        else:
            assert "internals" not in op, op["name"]
            continue
        assert set(got) == set(want), op["name"]
        for name, w in want.items():
            g = got[name]
            assert g.dtype.kind in "iu" and g.size == w.size, (op["name"], name)
            assert g.reshape(-1).tolist() == np.asarray(w).reshape(-1).tolist(), (op["name"], name)
            entry = m["tensors"][f"{op['name']}.{name}"]
            assert entry["producer"] == op["name"] and entry["internal"] == name and entry["scale"] is None
        checked.add(kind)
    assert checked == {"conv2d", "attention_context", "layernorm", "softmax"}
    assert m["internals"]["not_available"] and "attention_scores" in m["internals"]["not_available"]


def test_internals_leave_every_output_unchanged_and_come_before_the_output(inside, small, tmp_path):
    out, m, xq = inside
    qm = small[0]
    plain = golden.write_golden(qm, xq, tmp_path / "plain")
    assert "internals" not in plain and all("internals" not in op for op in plain["ops"])
    for name in plain["tensors"]:
        assert np.array_equal(load(out, m, name), load(tmp_path / "plain", plain, name)), name
    order = list(m["tensors"])
    for op in m["ops"]:
        for t in op.get("internals", {}).values():
            assert order.index(t) < order.index(op["name"])


@pytest.mark.parametrize("scheme", [Scheme("ibert", layernorm="int32", softmax="poly", gelu="poly"),
                                    Scheme("ivit-w4", conv="w4", softmax="shift", gelu="shift")])
def test_scheme_variants_expose_internals_with_the_same_relations(small, make_tiny, scheme, tmp_path):
    x = small[2]
    qm = make_tiny(scheme=scheme).qm
    xq = im.quantize_input(qm, x)
    m = golden.write_golden(qm, xq, tmp_path / "g", internals=True)
    plain = im.forward_int(qm, xq)
    assert m["output"]["logits"] == plain.tolist()
    for op in m["ops"]:
        got = {i: load(tmp_path / "g", m, t).astype(np.int64) for i, t in op.get("internals", {}).items()}
        const = {a: load(tmp_path / "g", m, c) for a, c in op["constants"].items()}
        inp = {a: load(tmp_path / "g", m, t) for a, t in op["inputs"].items()}
        if op["op"] == "softmax":
            assert set(got) == {"diff", "exp", "sum", "recip"}
            assert np.array_equal(got["sum"], got["exp"].sum(axis=-1, keepdims=True))
            assert all(r == (1 << 40) // s for r, s in zip(got["recip"].ravel().tolist(), got["sum"].ravel().tolist()))
        elif op["op"] == "layernorm":
            C = inp["x"].shape[1]
            x64 = inp["x"].astype(np.int64)
            assert np.array_equal(got["d"], C * x64 - x64.sum(1, keepdims=True))
            assert np.array_equal(got["acc"], got["t"] * const["gamma"].astype(np.int64).reshape(1, C, 1, 1)
                                  + const["bias"].astype(np.int64).reshape(1, C, 1, 1))
        elif op["op"] == "conv2d":
            want = ref_conv_acc(inp["x"], const["weight"], const["bias"])
            assert np.array_equal(got["acc"].reshape(-1), want.reshape(-1))


# ---------------------------------------------------------------- subsets

def test_ops_subset_dumps_the_ops_their_inputs_and_constants_only(small, tmp_path):
    qm, _, x = small
    xq = im.quantize_input(qm, x)
    m = golden.write_golden(qm, xq, tmp_path, ("npy", "hex"), internals=True, ops=["blocks.1.attn.*", "head"])
    names = [op["name"] for op in m["ops"]]
    want = [op.name for op in qm.graph if op.name.startswith("blocks.1.attn.") or op.name == "head"]
    assert names == want and [op["index"] for op in m["ops"]] == [
        i for i, op in enumerate(qm.graph) if op.name in want]
    expected = set()
    for op in m["ops"]:
        expected |= set(op["inputs"].values()) | set(op.get("internals", {}).values()) | {op["name"]}
    assert set(m["tensors"]) == expected and "blocks.1.norm1" in expected and "blocks.0.mlp.fc1" not in expected
    named = {c for op in qm.graph if op.name in want for c in
             (*op.constants.values(), op.scale, op.weight_scale) if c}
    assert set(m["constants"]) == named
    on_disk = {p.name for p in (tmp_path / "tensors").iterdir()}
    assert on_disk == {f"{t}.{f}" for t in expected for f in ("npy", "hex")}
    assert m["selection"] == {"ops": ["blocks.1.attn.*", "head"], "ops_dumped": len(want),
                              "ops_in_graph": len(qm.graph)}


# ---------------------------------------------------------------- inputs

def test_own_input_npy_hex_bin_give_the_same_dump(files, small, tmp_path, capsys):
    qm = small[0]
    xq = np.random.default_rng(9).integers(-128, 128, (2, 3, 32, 32), dtype=np.int8)
    np.save(tmp_path / "x.npy", xq)
    (tmp_path / "x.hex").write_text("".join(f"{int(v) & 0xFF:02X}  // element\n" for v in xq.reshape(-1)))
    (tmp_path / "x.bin").write_bytes(xq.tobytes())
    shas = []
    for f in ("x.npy", "x.hex", "x.bin"):
        code, text, err = run(capsys, "golden", "--model", files / "q.safetensors", "--input", tmp_path / f,
                              "--out", tmp_path / f"g_{f}", "--quiet")
        assert code == 0, err
        m = manifest_of(tmp_path / f"g_{f}")
        assert m["input"]["source"]["kind"] == "file" and m["input"]["shape"] == [2, 3, 32, 32]
        shas.append(m["input"]["sha256_int8"])
    assert len(set(shas)) == 1
    assert m["output"]["logits"] == im.forward_int(qm, xq).tolist()
    np.save(tmp_path / "one.npy", xq[0])                                  # (C, H, W): a batch of one
    assert run(capsys, "golden", "--model", files / "q.safetensors", "--input", tmp_path / "one.npy",
               "--out", tmp_path / "one", "--quiet")[0] == 0
    assert manifest_of(tmp_path / "one")["input"]["shape"] == [1, 3, 32, 32]


@pytest.mark.parametrize("content, message", [
    (lambda p: np.save(p / "x.npy", np.zeros((1, 3, 32, 32), np.float32)), "must be int8"),
    (lambda p: np.save(p / "x.npy", np.zeros((1, 3, 28, 28), np.int8)), "(B, 3, 32, 32)"),
    (lambda p: (p / "x.bin").write_bytes(b"\0" * 3073), "not a whole number of images"),
    (lambda p: (p / "x.hex").write_text("zz\n"), "is not hex"),
])
def test_own_input_errors_name_the_problem(files, tmp_path, capsys, content, message):
    content(tmp_path)
    path = next(tmp_path.glob("x.*"))
    code, _, err = run(capsys, "golden", "--model", files / "q.safetensors", "--input", path, "--out", tmp_path / "g")
    assert code == 2 and message in err and err.startswith("refvit: error: ")


def test_several_images_make_one_batch_and_inapplicable_flags_are_errors(files, tmp_path, capsys):
    q, imgs = files / "q.safetensors", files / "imgs"
    assert run(capsys, "golden", "--model", q, "--image", imgs / "a.png", imgs / "b.png", "--out", tmp_path / "ab",
               "--quiet")[0] == 0
    assert run(capsys, "golden", "--model", q, "--image", imgs, "--out", tmp_path / "dir", "--quiet")[0] == 0
    a, d = manifest_of(tmp_path / "ab"), manifest_of(tmp_path / "dir")
    assert a["input"]["shape"][0] == 2 and a["input"]["sha256_int8"] == d["input"]["sha256_int8"]
    errors = [
        (["--image", imgs / "a.png", "--batch", "2"], "--batch sizes a --seed input"),
        (["--input", imgs / "a.png", "--batch", "2"], "--batch sizes a --seed input"),
        (["--seed", "1", "--hex-width", "32"], "add hex to --formats"),
        (["--seed", "1", "--formats", "hex", "--hex-width", "24"], "power of two"),
        (["--seed", "1", "--c-prefix", "x_"], "add h to --formats"),
        (["--seed", "1", "--formats", "h", "--c-prefix", "9x"], "not the start of a C identifier"),
        (["--seed", "1", "--calib", imgs], "--model"),
        (["--seed", "1", "--method", "max"], "already quantized"),
        (["--seed", "1", "--preprocess", "imagenet"], "--preprocess applies to images"),
        (["--seed", "1", "--float"], "needs the float weights"),
        (["--seed", "1", "--ops", "nope*"], "matches no op"),
    ]
    for extra, message in errors:
        code, _, err = run(capsys, "golden", "--model", q, "--out", tmp_path / "e", *extra)
        assert code == 2 and message in err, (extra, err)
    assert run(capsys, "golden", "--seed", "1", "--input", imgs / "a.png", "--out", tmp_path / "e")[0] == 2


# ---------------------------------------------------------------- formats

def my_packed_hex(text, bits, lanes, count):
    """Hand-written reader: each line holds `lanes` elements of `bits`, lane 0 in the low bits."""
    out = []
    for line in text.split("\n")[:-1]:
        assert len(line) == lanes * bits // 4
        word = int(line, 16)
        for lane in range(lanes):
            v = (word >> (lane * bits)) & ((1 << bits) - 1)
            out.append(v - (1 << bits) if v >= 1 << (bits - 1) else v)
    assert all(v == 0 for v in out[count:])                              # the last line's unused lanes
    return out[:count]


@pytest.mark.parametrize("width", [32, 128])
def test_packed_hex_lanes_and_check_reads_them(inside, small, tmp_path, capsys, width):
    qm, _, x = small
    xq = im.quantize_input(qm, x)
    m = golden.write_golden(qm, xq, tmp_path / "g", ("npy", "hex"), internals=True, hex_width=width)
    assert m["encoding"]["hex_width"] == width and "lane 0" in m["encoding"]["hex_packing"]
    seen = set()
    for name, e in list(m["tensors"].items()) + list(m["constants"].items()):
        if "hex" not in e["files"]:
            continue
        arr = np.load(tmp_path / "g" / e["files"]["npy"])
        bits = 8 * arr.dtype.itemsize
        lanes = max(1, width // bits)
        assert e["hex_lanes"] == lanes
        vals = my_packed_hex((tmp_path / "g" / e["files"]["hex"]).read_text(), bits, lanes, arr.size)
        unsigned = arr.dtype.kind == "u"
        want = arr.reshape(-1).astype(np.int64)
        if unsigned:
            want = np.where(want >= 1 << (bits - 1), want - (1 << bits), want)
        assert vals == want.tolist(), name
        seen.add(arr.dtype.name)
    assert {"int8", "int32", "int64", "uint8", "uint16"} <= seen
    device = tmp_path / "dev"
    copy_tensors(tmp_path / "g", device, fmt="hex")
    assert run(capsys, "check", tmp_path / "g", device, "--hex-width", width)[0] == 0
    code, _, err = run(capsys, "check", tmp_path / "g", device)              # without --hex-width: told to pass it
    assert code == 2 and err.startswith("refvit: error: ") and f"pass --hex-width {width}" in err, err


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "int64"])
def test_table_driven_text_is_python_formatting(dtype):
    """The table-driven C and hex text, byte for byte, against Python's own formatting of every element."""
    info = np.iinfo(dtype)
    edges = [info.min, info.max, 0, -1, 1, 9, 10, 99999, 100000, -100000, -9999, -10000, 2147483647]
    rng = np.random.default_rng(4)
    a = np.concatenate([np.array([v for v in edges if info.min <= v <= info.max], dtype),
                        rng.integers(info.min, info.max, 3000, dtype=dtype, endpoint=True)])
    width = max(len(str(int(info.min))), len(str(int(info.max))) + 1)
    items = [f"{int(v):>{width}}, " for v in a]
    lines = ["    " + "".join(items[i:i + 16]) for i in range(0, len(items), 16)]
    body = "\n".join(lines)[:-2] + "\n"                                 # no comma after the last element
    text = dumpfmt.c_header_text(a, "t.x")
    assert text.split("static const ")[1].split(" = {\n", 1)[1].split("};")[0] == body
    bits = 8 * a.dtype.itemsize
    assert dumpfmt.hex_bytes(a).decode() == "".join(f"{int(v) & ((1 << bits) - 1):0{bits // 4}x}\n" for v in a)


def parse_c_arrays(text, static):
    pattern = (r"static const" if static else r"(?m)^const") + r" (\w+) (\w+)\[(\d+)\] = \{(.*?)\};"
    out = {}
    for ctype, ident, n, body in re.findall(pattern, text, re.S):
        vals = [int(v) for v in body.replace("\n", " ").split(",") if v.strip()]
        assert len(vals) == int(n)
        out[ident] = (ctype, vals)
    return out


def test_c_prefix_per_header_and_split_pair(inside, small, tmp_path):
    qm, _, x = small
    xq = im.quantize_input(qm, x)
    m = golden.write_golden(qm, xq, tmp_path / "h", ("npy", "h"), c_prefix="deit_", ops=["blocks.0.norm1"])
    e = m["tensors"]["blocks.0.norm1"]
    assert e["c_symbol"] == "deit_blocks_0_norm1" and m["encoding"]["c"]["prefix"] == "deit_"
    arrays = parse_c_arrays((tmp_path / "h" / e["files"]["h"]).read_text(), static=True)
    values = np.load(tmp_path / "h" / e["files"]["npy"]).reshape(-1).tolist()
    assert arrays == {"deit_blocks_0_norm1": ("int8_t", values)}
    m = golden.write_golden(qm, xq, tmp_path / "s", ("npy", "h"), internals=True, c_prefix="g_", c_split=True)
    c_text, h_text = (tmp_path / "s" / "g_golden.c").read_text(), (tmp_path / "s" / "g_golden.h").read_text()
    defs = parse_c_arrays(c_text, static=False)
    decls = dict((ident, (ctype, int(n))) for ctype, ident, n in
                 re.findall(r"extern const (\w+) (\w+)\[(\d+)\];", h_text))
    ints = [(n, e) for n, e in list(m["tensors"].items()) + list(m["constants"].items()) if e["dtype"] != "float64"]
    assert len(defs) == len(decls) == len(ints)
    for name, e in ints:
        arr = np.load(tmp_path / "s" / e["files"]["npy"])
        ctype, vals = defs[e["c_symbol"]]
        assert e["files"]["c"] == "g_golden.c" and e["files"]["h"] == "g_golden.h"
        assert vals == arr.reshape(-1).astype(np.int64).tolist() and decls[e["c_symbol"]] == (ctype, arr.size), name
    assert not list((tmp_path / "s").glob("tensors/*.h"))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to compile the C output")
def test_c_split_compiles_pedantic_and_links(small, tmp_path):
    qm, _, x = small
    xq = im.quantize_input(qm, x)
    m = golden.write_golden(qm, xq, tmp_path, ("npy", "h"), internals=True, c_split=True,
                            ops=["blocks.0.norm1", "blocks.0.attn.softmax"])
    main_c = tmp_path / "main.c"
    main_c.write_text('#include <stdio.h>\n#include "golden.h"\nint main(void) {\n  long long s = 0; size_t i;\n'
                      '  for (i = 0; i < sizeof blocks_0_norm1_sumsq / sizeof blocks_0_norm1_sumsq[0]; i++) '
                      's += blocks_0_norm1_sumsq[i];\n  printf("%lld %d\\n", s, (int)blocks_0_attn_softmax_exp[7]);\n'
                      '  return 0;\n}\n')
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-o", str(tmp_path / "t"),
                    str(main_c), str(tmp_path / "golden.c")], check=True, capture_output=True)
    printed = subprocess.run([str(tmp_path / "t")], check=True, capture_output=True, text=True).stdout.split()
    sumsq = np.load(tmp_path / m["tensors"]["blocks.0.norm1.sumsq"]["files"]["npy"])
    exp = np.load(tmp_path / m["tensors"]["blocks.0.attn.softmax.exp"]["files"]["npy"])
    assert printed == [str(int(sumsq.astype(object).sum())), str(int(exp.reshape(-1)[7]))]


# ---------------------------------------------------------------- float dumps and the SQNR report

def ref_patch_embed(params, x):
    """The float patch embedding as a hand-written strided conv (float64): (B, C, 1, Np)."""
    w, b = params["patch_embed.proj.weight"].astype(np.float64), params["patch_embed.proj.bias"].astype(np.float64)
    B, _, H, W = x.shape
    k = w.shape[2]
    cols = x.astype(np.float64).reshape(B, 3, H // k, k, W // k, k)
    y = np.einsum("bciujv,ocuv->boij", cols, w) + b[None, :, None, None]
    return y.reshape(B, w.shape[0], 1, -1)


def imagenet_batch(folder):
    """The folder's images through ImageNet's eval transform at 32 px (what --weights W without a config uses)."""
    pipeline = PRESETS["imagenet"].for_model(32)
    return np.stack([pipeline(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])


def test_float_dump_under_the_same_names(files, small, tmp_path, capsys):
    qm, params, _ = small
    imgs = files / "imgs"
    code, _, err = run(capsys, "golden", "--model", files / "q.safetensors", "--weights", files / "w.safetensors",
                       "--num-heads", "3", "--image", imgs, "--float", "--out", tmp_path / "g", "--quiet")
    assert code == 0, err
    m = manifest_of(tmp_path / "g")
    f = np.load(tmp_path / "g" / m["tensors"]["patch_embed"]["float"])
    assert f.dtype == np.float32 and f.shape == tuple(m["tensors"]["patch_embed"]["shape"])
    x = imagenet_batch(imgs)
    assert np.allclose(f, ref_patch_embed(params, x), atol=1e-4)
    assert {"tokens", "blocks.0.attn.scores", "blocks.0.attn.softmax"} <= set(m["float"]["not_available"])
    assert "float" in m["tensors"]["blocks.1.mlp.gelu"] and "float" not in m["tensors"]["tokens"]
    code, _, err = run(capsys, "golden", "--model", files / "q.safetensors", "--weights", files / "w.safetensors",
                       "--num-heads", "2", "--seed", "1", "--float", "--out", tmp_path / "x")
    assert code == 2 and ("--num-heads" in err or "not the model" in err)


def test_report_table_json_and_plot(files, small, tmp_path, capsys, monkeypatch):
    qm, params, _ = small
    imgs = files / "imgs"
    base = ["report", imgs, "--model", files / "q.safetensors", "--weights", files / "w.safetensors",
            "--num-heads", "3"]
    code, out, err = run(capsys, *base, "--json")
    assert code == 0, err
    rep = json.loads(out)
    names = [r["name"] for r in rep["ops"]]
    assert names == [op.name for op in qm.graph if op.name in names] and "patch_embed" in names
    x = imagenet_batch(imgs)
    xq = im.quantize_input(qm, x)
    trace = im.Trace()
    im.forward_int(qm, xq, trace)
    f = ref_patch_embed(params, x)
    q = trace.tensors["patch_embed"].astype(np.float64) * float(qm.tensors["patch_embed.scale"])
    want = 10 * math.log10(float((f ** 2).sum()) / float(((f - q) ** 2).sum()))
    got = next(r for r in rep["ops"] if r["name"] == "patch_embed")["sqnr_db"]
    assert got == pytest.approx(want, abs=2e-3)
    assert "blocks.*.attn.scores" in rep["not_reported"]
    code, out, err = run(capsys, *base)
    assert code == 0 and "lowest SQNR: [" in out and "patch_embed" in out and "report on 2 images" in err
    assert run(capsys, *base, "--quiet")[2] == ""
    code, _, err = run(capsys, "report", imgs, "--model", files / "q.safetensors")
    assert code == 2 and "--weights W" in err
    monkeypatch.setattr(report, "plot_available", lambda: False)
    code, _, err = run(capsys, *base, "--plot", tmp_path / "p.png")
    assert code == 2 and "pip install 'refvit[plot]'" in err


@pytest.mark.skipif(not report.plot_available(), reason="matplotlib (refvit[plot]) is not installed")
def test_report_plot_writes_a_png(tmp_path, capsys):
    code, out, err = run(capsys, "report", "--plot", tmp_path / "sqnr.png", "--quiet")
    assert code == 0, err
    assert (tmp_path / "sqnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in out


# ---------------------------------------------------------------- progress, the embedded model, DeiT-Tiny size

def test_progress_on_stderr_and_quiet(tmp_path, capsys):
    code, _, err = run(capsys, "golden", "--seed", "2", "--out", tmp_path / "a")
    assert code == 0 and f"writing {tmp_path / 'a'}: file " in err
    code, _, err = run(capsys, "golden", "--seed", "2", "--out", tmp_path / "b", "--quiet")
    assert code == 0 and err == ""


def test_every_option_on_the_embedded_model(tmp_path, capsys):
    image = sorted(EXAMPLES.glob("*.png"))[0]
    code, out, err = run(capsys, "golden", "--image", image, "--internals", "--ops", "blocks.5.*,norm,head",
                         "--formats", "npy,hex,h", "--hex-width", "64", "--c-split", "--c-prefix", "fm_", "--float",
                         "--out", tmp_path / "g", "--quiet")
    assert code == 0, err
    m = manifest_of(tmp_path / "g")
    assert m["model"]["source"]["kind"] == "default" and m["selection"]["ops_dumped"] == 17
    norm = next(op for op in m["ops"] if op["name"] == "norm")
    x = np.load(tmp_path / "g" / "tensors" / "blocks.5.residual2.npy")
    c = {a: np.load(tmp_path / "g" / m["constants"][n]["files"]["npy"]) for a, n in norm["constants"].items()}
    want = ref_layernorm(x, c["eps_int"], c["gamma"], c["bias"])
    for name, t in norm["internals"].items():
        assert np.load(tmp_path / "g" / "tensors" / f"{t}.npy").reshape(-1).tolist() == want[name].reshape(-1).tolist()
    assert "float" in m["tensors"]["norm"] and (tmp_path / "g" / "fm_golden.c").is_file()
    device = tmp_path / "dev"
    copy_tensors(tmp_path / "g", device, {"norm.t", "norm.acc", "head"}, fmt="hex")
    code, out, _ = run(capsys, "check", tmp_path / "g", device, "--present", "--hex-width", "64", "--json")
    rep = json.loads(out)
    assert code == 0 and [r["tensor"] for r in rep["results"]] == ["norm.t", "norm.acc", "head"]
    code, out, err = run(capsys, "report", "--quiet")                      # the embedded default, shipped file
    assert code == 0 and "lowest SQNR" in out


def test_deit_tiny_sized_checkpoint_every_option(tmp_path, capsys):
    """A random DeiT-Tiny (224 px, d192, 12 blocks), quantized on the fly: internals of its last block equal an
    independent recomputation; a device with one accumulator off is caught at the accumulator."""
    write_safetensors(tmp_path / "w.safetensors", random_params(TINY, "cls", 0))
    code, out, err = run(capsys, "golden", "--weights", tmp_path / "w.safetensors", "--seed", "4", "--internals",
                         "--ops", "blocks.11.*", "--formats", "npy,hex,bin,h", "--hex-width", "128", "--c-split",
                         "--float", "--out", tmp_path / "g", "--quiet")
    assert code == 0, err
    m = manifest_of(tmp_path / "g")
    assert m["input"]["shape"] == [1, 3, 224, 224] and len(m["ops"]) == 15
    ops = {op["name"]: op for op in m["ops"]}
    g = tmp_path / "g"

    def arr(name):
        return np.load(g / (m["tensors"].get(name) or m["constants"][name])["files"]["npy"])
    fc1 = ops["blocks.11.mlp.fc1"]
    assert np.array_equal(arr("blocks.11.mlp.fc1.acc").reshape(-1), ref_conv_acc(
        arr(fc1["inputs"]["x"]), arr(fc1["constants"]["weight"]), arr(fc1["constants"]["bias"])).reshape(-1))
    sm = ops["blocks.11.attn.softmax"]
    want = ref_softmax(arr(sm["inputs"]["scores"])[:, :, :8], arr(sm["constants"]["multiplier"]),
                       arr(sm["constants"]["shift"]), arr(sm["constants"]["exp_table"]))
    for name in ("index", "exp", "sum", "recip"):
        assert arr(f"blocks.11.attn.softmax.{name}")[:, :, :8].reshape(-1).tolist() == want[name].reshape(-1).tolist()
    device = tmp_path / "dev"
    copy_tensors(g, device, fmt="bin")
    a = np.fromfile(device / "blocks.11.attn.proj.acc.bin", np.int32)
    a[100] += 1
    a.tofile(device / "blocks.11.attn.proj.acc.bin")
    code, out, _ = run(capsys, "check", g, device, "--format", "bin")
    assert code == 1 and "first divergent op: [176] blocks.11.attn.proj (conv2d), tensor blocks.11.attn.proj.acc" in out
