"""refvit golden: dumps of the tiny random model decode back exactly, the integer path's golden bits are pinned,
inputs are reproducible. (Comparing dumps, `refvit check`: tests/test_check.py.)"""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import refvit
from refvit import dumpfmt, golden
from weights_tools import write_safetensors
from refvit.cli import main
from refvit.config import DeiTConfig
from refvit.models import random_params
from refvit.qfile import save_quantized

CFG = DeiTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, distilled=True)
ALL = ("npy", "hex", "bin", "h")


# ---------------------------------------------------------------- independent decoders (test-only)

def my_hex(path, dtype):
    bits = np.dtype(dtype).itemsize * 8
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and all(len(v) == bits // 4 for v in lines[:-1])   # fixed width, newline-terminated
    vals = [int(v, 16) for v in lines[:-1]]
    if np.dtype(dtype).kind == "i":
        vals = [v - (1 << bits) if v >= 1 << (bits - 1) else v for v in vals]
    return vals


def my_bin(path, dtype):
    size, signed = np.dtype(dtype).itemsize, np.dtype(dtype).kind == "i"
    data = path.read_bytes()
    return [int.from_bytes(data[i:i + size], "little", signed=signed) for i in range(0, len(data), size)]


def my_header_text(text):
    m = re.search(r"static const (\w+) (\w+)\[(\d+)\] = \{(.*?)\};", text, re.S)
    ctype, ident, n, body = m.groups()
    vals = [int(v) for v in body.split(",")]
    assert len(vals) == int(n)
    return ctype, ident, vals


def my_header(path):
    return my_header_text(path.read_text())


# ---------------------------------------------------------------- fixtures

def tiny_float_params(seed=0):
    return random_params(CFG, "mean", seed)


@pytest.fixture(scope="module")
def model(tiny):
    """The tiny quantized model (tests/conftest.py) and its int8 input of two images."""
    return tiny.qm, tiny.xq()


@pytest.fixture(scope="module")
def dump(tiny_golden):
    """(folder, manifest, trace, logits): the golden dump of `model` in all four formats, no internals."""
    return tiny_golden()


def golden_cli(args, capsys):
    code = main(["golden"] + args)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


# ---------------------------------------------------------------- encodings

def test_worked_example_bytes():
    """The example of docs/golden-format.md, byte by byte."""
    a = np.array([-128, 5, 127, 0, -1, -10], np.int8).reshape(1, 2, 1, 3)
    assert dumpfmt.hex_bytes(a) == b"80\n05\n7f\n00\nff\nf6\n"
    assert dumpfmt.bin_bytes(a) == bytes([0x80, 0x05, 0x7F, 0x00, 0xFF, 0xF6])
    ctype, ident, vals = my_header_text(dumpfmt.c_header_text(a, "blocks.0.x"))
    assert (ctype, ident, vals) == ("int8_t", "blocks_0_x", [-128, 5, 127, 0, -1, -10])
    assert dumpfmt.hex_bytes(np.array([-2, 40000], np.int32)) == b"fffffffe\n00009c40\n"
    assert dumpfmt.hex_bytes(np.array([65535], np.uint16)) == b"ffff\n"


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint16"])
def test_formats_round_trip_extremes(dtype, tmp_path):
    info = np.iinfo(dtype)
    a = np.array([info.min, info.max, 0, 1, info.max // 3, info.min // 7], dtype)
    files = dumpfmt.write_array(a, tmp_path, "v", ALL)
    assert my_hex(tmp_path / files["hex"], dtype) == a.tolist()
    assert my_bin(tmp_path / files["bin"], dtype) == a.tolist()
    assert my_header(tmp_path / files["h"])[2] == a.tolist()
    for fmt in ("npy", "hex", "bin"):
        back = dumpfmt.read_array(tmp_path / files[fmt], dtype, a.shape)
        assert back.dtype == a.dtype and back.tolist() == a.tolist()


def test_hex_reader_accepts_readmemh_variants_and_rejects_bad_files(tmp_path):
    assert dumpfmt.parse_hex(b"80 // min\n 5\r\n7F\nFFFF\n", "int16", 4).tolist() == [128, 5, 127, -1]
    with pytest.raises(dumpfmt.DumpFormatError, match="3 hex elements, expected 4") as e:
        dumpfmt.parse_hex(b"1\n2\n3\n", "int8", 4)
    assert e.value.kind == "shape"
    with pytest.raises(dumpfmt.DumpFormatError, match="more than 2 digits") as e:
        dumpfmt.parse_hex(b"0001\n", "int8", 1)
    assert e.value.kind == "dtype"
    with pytest.raises(dumpfmt.DumpFormatError, match="not hex"):
        dumpfmt.parse_hex(b"zz\n", "int8", 1)
    with pytest.raises(dumpfmt.DumpFormatError, match="6 bytes, expected 2 int32") as e:
        dumpfmt.parse_bin(b"\0" * 6, "int32", 2)
    assert e.value.kind == "shape"
    with pytest.raises(dumpfmt.DumpFormatError, match="16 bytes, expected 2 int32") as e:
        dumpfmt.parse_bin(b"\0" * 16, "int32", 2)                       # 2 elements of 8 bytes: wrong width
    assert e.value.kind == "dtype"
    with pytest.raises(ValueError, match="unknown dump format"):
        dumpfmt.write_array(np.zeros(2, np.int8), tmp_path, "x", ("csv",))


# ---------------------------------------------------------------- the golden dump

def test_manifest_matches_trace(dump, model):
    out, manifest, trace, logits = dump
    qm, xq = model
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["schema"] == "refvit-golden" and on_disk["schema_version"] == golden.SCHEMA_VERSION
    assert on_disk["refvit_version"] == refvit.__version__
    assert on_disk["model"]["config"] == qm.config.to_dict() and on_disk["model"]["head_mode"] == "mean"
    assert on_disk["quantization"]["rounding"] == qm.rounding
    assert on_disk["quantization"]["calibration"]["method"] == "percentile"
    assert on_disk["input"]["sha256_int8"] == hashlib.sha256(xq.tobytes()).hexdigest()
    assert on_disk["input"]["source"] == {"kind": "array", "note": "test"}
    assert on_disk["output"]["logits"] == logits.tolist()
    assert [op["name"] for op in on_disk["ops"]] == [r.name for r in trace.ops] == [r.name for r in qm.graph]
    for op, rec in zip(on_disk["ops"], trace.ops):
        assert {k: v for k, v in op.items() if k != "index"} == json.loads(json.dumps(rec.to_dict()))  # as it is
        assert all(t in on_disk["tensors"] for t in op["inputs"].values())
        assert all(c in on_disk["constants"] for c in op["constants"].values())
        t, arr = on_disk["tensors"][op["name"]], trace.tensors[op["name"]]
        assert (t["dtype"], t["shape"], t["layout"]) == (arr.dtype.name, list(arr.shape), trace.layouts[op["name"]])
        assert t["producer"] == op["name"] and set(t["files"]) == set(ALL)
        assert op["shape"] == ["B"] + list(arr.shape[1:]) and op["dtype"] == arr.dtype.name
        for c in op["constants"].values():
            if c.endswith((".multiplier", ".shift")):
                assert on_disk["constants"][c]["value"] == np.asarray(qm.tensors[c]).tolist()
        if "rounding" in rec.attrs:
            assert op["attrs"]["rounding"] == qm.rounding
    ops = {op["name"]: op for op in on_disk["ops"]}
    assert ops["blocks.0.residual2"]["inputs"] == {"a": "blocks.0.residual1", "b": "blocks.0.mlp.fc2"}
    assert ops["embed"]["inputs"] == {"a": "tokens"} and ops["embed"]["constants"]["b"] == "pos_embed"
    tensors = on_disk["tensors"]
    assert tensors["head"]["scale"] == float(qm.tensors["logits.scale"])
    assert tensors["blocks.0.attn.scores"]["scale"] == pytest.approx(
        float(qm.tensors["blocks.0.attn.q.scale"]) * float(qm.tensors["blocks.0.attn.k.scale"]))
    assert tensors["blocks.1.attn.softmax"]["scale"] == 1 / 127 and tensors["input"]["producer"] is None
    ws = ops["blocks.0.attn.qkv"]["weight_scale"]
    assert on_disk["constants"][ws]["value"] == qm.tensors["blocks.0.attn.qkv.weight_scale"].tolist()
    assert set(on_disk["constants"]) == set(qm.tensors)


def test_every_file_decodes_to_the_same_integers(dump, model):
    out, manifest, trace, _ = dump
    qm, _ = model
    entries = [(e, trace.tensors[n]) for n, e in manifest["tensors"].items()]
    entries += [(e, np.asarray(qm.tensors[n])) for n, e in manifest["constants"].items()]
    assert len(entries) == len(trace.tensors) + len(qm.tensors)
    for entry, arr in entries:
        files = entry["files"]
        npy = np.load(out / files["npy"])
        assert npy.dtype == arr.dtype and npy.shape == arr.shape and np.array_equal(npy, arr)
        if arr.dtype.kind == "f":
            assert set(files) == {"npy"}   # float scales: npy + manifest only
            continue
        flat = arr.reshape(-1).tolist()
        assert my_hex(out / files["hex"], arr.dtype) == flat, entry["name"]
        assert my_bin(out / files["bin"], arr.dtype) == flat, entry["name"]
        ctype, ident, vals = my_header(out / files["h"])
        assert vals == flat and ctype == dumpfmt.C_TYPES[arr.dtype.name]
        assert re.fullmatch(r"[A-Za-z_]\w*", ident)


# ---------------------------------------------------------------- the golden bits of the integer path

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


# ---------------------------------------------------------------- the CLI: inputs are reproducible

def test_seed_input_reproducible_with_quantized_model(model, tmp_path, capsys):
    qm, _ = model
    save_quantized(qm, tmp_path / "q.safetensors")
    shas = []
    for run in ("a", "b", "c"):
        seed = "7" if run != "c" else "8"
        code, text = golden_cli(["--model", str(tmp_path / "q.safetensors"), "--seed", seed, "--batch", "2",
                                 "--out", str(tmp_path / run), "--formats", "hex"], capsys)
        assert code == 0, text
        m = json.loads((tmp_path / run / "manifest.json").read_text())
        shas.append(m["input"]["sha256_int8"])
    assert shas[0] == shas[1] != shas[2]
    expect = np.random.default_rng(7).integers(-128, 128, (2, 3, 32, 32), dtype=np.int8)
    assert shas[0] == hashlib.sha256(expect.tobytes()).hexdigest()
    assert m["input"]["source"]["kind"] == "seed" and m["input"]["source"]["seed"] == 8
    assert m["model"]["source"]["kind"] == "quantized" and m["formats"] == ["npy", "hex"]


def test_image_input_reproducible_with_float_weights(tmp_path, capsys):
    write_safetensors(tmp_path / "w.safetensors", tiny_float_params(3))
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    manifests = []
    for run in ("a", "b"):
        code, text = golden_cli(["--weights", str(tmp_path / "w.safetensors"), "--num-heads", "3", "--image",
                                 str(tmp_path / "img.png"), "--out", str(tmp_path / run), "--rounding", "DOUBLE_ROUND"],
                                capsys)
        assert code == 0, text
        manifests.append(json.loads((tmp_path / run / "manifest.json").read_text()))
    a, b = manifests
    assert a["input"]["sha256_int8"] == b["input"]["sha256_int8"]
    assert a["input"]["source"]["files"][0]["sha256"] == hashlib.sha256((tmp_path / "img.png").read_bytes()).hexdigest()
    assert a["input"]["source"]["kind"] == "image" and a["input"]["preprocess"]["name"] == "imagenet"
    assert a["quantization"]["rounding"] == "DOUBLE_ROUND"
    assert a["quantization"]["calibration"]["method"] == "percentile"      # the one default of every command
    assert "img.png" in a["quantization"]["calibration"]["source"]
    assert a["output"]["logits"] == b["output"]["logits"]


def test_default_model_with_an_image(tmp_path, capsys):
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "g.png")
    code, text = golden_cli(["--image", str(tmp_path / "g.png"), "--out", str(tmp_path / "d")], capsys)
    assert code == 0, text
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["model"]["source"]["kind"] == "default" and m["input"]["preprocess"]["name"] == "fmnist"
    assert m["input"]["shape"] == [1, 3, 32, 32] and "top-5 classes" in text


def test_golden_cli_errors_are_clear(tmp_path, capsys):
    code, text = golden_cli(["--model", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "model file not found" in text
    code, text = golden_cli(["--model", str(tmp_path / "x"), "--out", str(tmp_path / "o"), "--formats", "csv"], capsys)
    assert code == 2 and "unknown dump format" in text
