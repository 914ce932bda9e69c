"""What a verification engineer hit using refvit's vectors in a testbench (issue 20), one test per edge:
golden integrity (a sha256 per file, the golden side verified first), files others can read (the umask),
formats (packed hex input, the --hex-width hint, shape #defines), wrong input is an error (empty folders,
ImageFolder trees read the same way everywhere, --seed -1, too few class folders), the saturation warning,
the float checkpoint and calibration data recorded by name and sha256, the docs shipped with the package, the
preprocessing JSON, and the IREE flow as one command (`refvit iree-check`)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import refvit
from refvit.cli import EXAMPLES, main
from refvit.preprocess import PRESETS, Preprocess
from refvit.qfile import load_quantized, save_quantized

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "refvit" / "data"
PULLOVER = EXAMPLES / "fmnist_test_0001_pullover.png"   # calibrated on alone, the top int16 logit clips
# sha256 of the shipped quantized file's data section (every tensor's bytes) before its metadata was rewritten
SHIPPED_DATA_SHA256 = "bf26abb567ebef51c6f2b19211964ed5223a29f52f0f115cb2e3e5fe5823a20c"


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code, err, text):
    assert code == 2 and err.startswith("refvit: error: ") and err.count("\n") == 1 and text in err, err
    assert "Error(" not in err                                                   # no Python repr


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def umask():
    """Set the process umask for a test, and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An ImageFolder tree of the bundled examples: two class folders, one with a nested subfolder."""
    root = tmp_path_factory.mktemp("tree")
    files = sorted(EXAMPLES.glob("*.png"))
    for i, f in enumerate(files):
        sub = root / ("a" if i < 3 else "b") / ("deep" if i == 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, sub / f.name)
    (root / "a" / "notes.txt").write_text("not an image")
    return root, files


# ---------------------------------------------------------------- golden integrity

def golden_dump(out, capsys, *extra):
    seed = [] if "--input" in extra else ["--seed", "5"]
    code, _, err = run(capsys, "golden", *seed, "--out", out, "--quiet", *extra)
    assert code == 0, err
    return json.loads((Path(out) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def plain_golden(tmp_path_factory):
    """golden_dump(out) with no options, made once: the tests that edit a dump edit a copy (copy_golden)."""
    out = tmp_path_factory.mktemp("plain") / "g"
    code = main(["golden", "--seed", "5", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def copy_golden(plain_golden, to) -> Path:
    shutil.copytree(plain_golden, to)
    return to


def test_manifest_has_the_sha256_of_every_file(tmp_path, capsys):
    m = golden_dump(tmp_path / "g", capsys, "--formats", "npy,hex,bin,h")
    on_disk = sorted(p.relative_to(tmp_path / "g").as_posix() for p in (tmp_path / "g").rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(m["file_sha256"]) == on_disk and len(on_disk) > 4 * 96
    assert all(m["file_sha256"][f] == sha256(tmp_path / "g" / f) for f in on_disk)


def test_check_blames_an_edited_golden_file_not_the_device(plain_golden, tmp_path, capsys):
    gold = copy_golden(plain_golden, tmp_path / "g")
    device = tmp_path / "dev"
    shutil.copytree(gold / "tensors", device)
    assert run(capsys, "check", gold, device)[0] == 0
    f = gold / "tensors" / "blocks.2.mlp.fc1.npy"
    a = np.load(f)
    a.reshape(-1)[7] ^= 1                                                        # same dtype and shape, one bit
    np.save(f, a)
    code, out, err = run(capsys, "check", gold, device)
    one_line_error(code, err, f"golden folder {gold} was modified: tensors/blocks.2.mlp.fc1.npy")
    assert "MISMATCH" not in out


def test_a_missing_golden_file_is_one_plain_line(plain_golden, tmp_path, capsys):
    gold = copy_golden(plain_golden, tmp_path / "g")
    (gold / "tensors" / "head.npy").unlink()
    code, _, err = run(capsys, "check", gold, gold / "tensors")
    one_line_error(code, err, f"golden folder {gold} is incomplete: tensors/head.npy (listed in the manifest) is "
                              f"missing")


# ---------------------------------------------------------------- files others can read

@pytest.mark.parametrize("mask, folder_mode, file_mode", [(0o022, 0o755, 0o644),
                                                          pytest.param(0o077, 0o700, 0o600, marks=pytest.mark.slow)])
def test_outputs_honour_the_umask(tmp_path, capsys, umask, mask, folder_mode, file_mode):
    umask(mask)
    golden_dump(tmp_path / "g", capsys)
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == folder_mode
    assert stat.S_IMODE((tmp_path / "g" / "tensors" / "input.npy").stat().st_mode) == file_mode
    code, _, err = run(capsys, "quantize", "--calib", EXAMPLES, "--out", tmp_path / "q.safetensors", "--quiet")
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "q.safetensors").stat().st_mode) == file_mode


# ---------------------------------------------------------------- formats

def test_golden_input_reads_the_packed_hex_golden_writes(tmp_path, capsys):
    first = golden_dump(tmp_path / "a", capsys, "--formats", "hex", "--hex-width", "128", "--batch", "2")
    packed = tmp_path / "a" / "tensors" / "input.hex"
    assert len(packed.read_text().splitlines()[0]) == 32                         # 16 int8 lanes per line
    again = golden_dump(tmp_path / "b", capsys, "--input", packed, "--hex-width", "128")
    assert again["input"]["sha256_int8"] == first["input"]["sha256_int8"]
    assert again["input"]["shape"] == [2, 3, 32, 32]
    code, _, err = run(capsys, "golden", "--input", packed, "--out", tmp_path / "c")
    one_line_error(code, err, "pass --hex-width 128")


def test_check_on_packed_hex_says_to_pass_hex_width(tmp_path, capsys):
    golden_dump(tmp_path / "g", capsys, "--formats", "hex", "--hex-width", "64")
    code, _, err = run(capsys, "check", tmp_path / "g", tmp_path / "g" / "tensors", "--format", "hex")
    one_line_error(code, err, "pass --hex-width 64")
    assert run(capsys, "check", tmp_path / "g", tmp_path / "g" / "tensors", "--format", "hex",
               "--hex-width", "64")[0] == 0


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to compile the C output")
@pytest.mark.parametrize("split", [False, True])
def test_c_headers_define_the_shape(tmp_path, capsys, split):
    m = golden_dump(tmp_path / "g", capsys, "--formats", "h", "--ops", "blocks.0.attn.*",
                    *(["--c-split"] if split else []))
    names = ["blocks.0.attn.scores", "blocks.0.attn.context.multiplier"]       # a 4-d tensor, a 0-d constant
    entries = [m["tensors"].get(n) or m["constants"][n] for n in names]
    checks, includes = [], set()
    for n, e in zip(names, entries):
        shape = np.load(tmp_path / "g" / e["files"]["npy"]).shape
        macro = re.sub(r"[^0-9A-Za-z_]", "_", n).upper()
        conds = [f"{macro}_NDIM == {len(shape)}", f"{macro}_COUNT == {int(np.prod(shape))}",
                 f"{macro}_COUNT == sizeof {macro.lower()} / sizeof {macro.lower()}[0]"]
        conds += [f"{macro}_DIM{i} == {d}" for i, d in enumerate(shape)]
        checks += [f"typedef char check_{macro}_{i}[({c}) ? 1 : -1];" for i, c in enumerate(conds)]
        includes.add(e["files"]["h"])
    src = tmp_path / "g" / "t.c"
    src.write_text("".join(f'#include "{h}"\n' for h in sorted(includes)) + "\n".join(checks)
                   + "\nint main(void) { return (int)blocks_0_attn_scores[0] * 0; }\n")
    cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-Wno-unused-local-typedefs",
           "-o", str(tmp_path / "t"), str(src)] + ([str(tmp_path / "g" / "golden.c")] if split else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- wrong input is an error

def test_an_empty_folder_is_an_error_everywhere(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    for args in (["classify", empty], ["report", empty, "--quiet"], ["golden", "--image", empty, "--out", tmp_path / "g"],
                 ["quantize", "--calib", empty, "--out", tmp_path / "q.safetensors"]):
        code, out, err = run(capsys, *args)
        one_line_error(code, err, f"no images in {empty}")
        assert "fmnist_test_" not in out                                        # never the bundled examples


def test_an_imagefolder_tree_is_read_recursively_by_every_command(tree, tmp_path, capsys):
    root, files = tree
    expected = sorted(str(p) for p in root.rglob("*.png"))
    assert len(expected) == len(files)
    code, out, err = run(capsys, "classify", root, "--json")
    assert code == 0, err
    assert sorted(r["image"] for r in json.loads(out)["results"]) == expected
    code, out, err = run(capsys, "report", root, "--json", "--quiet")
    assert code == 0, err
    assert sorted(json.loads(out)["images"]) == expected
    code, _, err = run(capsys, "golden", "--image", root, "--out", tmp_path / "g", "--quiet")
    assert code == 0, err
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert sorted(f["path"] for f in m["input"]["source"]["files"]) == expected
    code, out, err = run(capsys, "quantize", "--calib", root, "--out", tmp_path / "q.safetensors", "--quiet")
    assert code == 0 and f"on {len(files)} images" in out, err
    from refvit.evaluate import open_dataset
    data = open_dataset(root)
    assert data.kind == "imagefolder" and sorted(map(str, data.files)) == expected      # eval: the same reading
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_eval_refuses_fewer_class_folders_than_classes(tree, capsys):
    root, _ = tree
    code, _, err = run(capsys, "eval", root, "--quiet")
    one_line_error(code, err, "has 2 class folders, the model has 10 classes")


def test_golden_negative_seed_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "golden", "--seed", "-1", "--out", tmp_path / "g")
    one_line_error(code, err, "--seed must be a non-negative integer")
    assert not (tmp_path / "g").exists()


def test_saturating_logits_on_the_calibration_data_warn(tmp_path, capsys):
    code, _, err = run(capsys, "quantize", "--calib", PULLOVER, "--out", tmp_path / "one.safetensors", "--quiet")
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "saturate on the calibration data itself" in warnings[0], err
    from refvit import int_model
    from refvit.resolve import resolve_model
    r = resolve_model(model=tmp_path / "one.safetensors")                       # the file's own logits clip
    logits, _ = int_model.logits_int8_model(r.qm, r.images([PULLOVER]))
    assert int(np.abs(logits.astype(np.int64)).max()) >= 32767
    code, _, err = run(capsys, "quantize", "--calib", EXAMPLES, "--out", tmp_path / "six.safetensors", "--quiet")
    assert code == 0 and "warning" not in err, err


# ---------------------------------------------------------------- provenance by name and sha256

def test_quantized_file_records_checkpoint_and_data_by_sha256(tree, tmp_path, capsys):
    root, _ = tree
    npz = tmp_path / "cal.npz"
    np.savez(npz, images=np.zeros((3, 28, 28), np.uint8), labels=np.zeros(3))
    code, _, err = run(capsys, "quantize", "--calib", root, npz, "--out", tmp_path / "q.safetensors", "--quiet")
    assert code == 0, err                                                        # read: the .npz first
    cal = load_quantized(tmp_path / "q.safetensors").calibration
    assert cal["float_checkpoint"] == {"name": "fmnist_deit.safetensors", "sha256": sha256(DATA / "fmnist_deit.safetensors")}
    lines = "".join(f"{p.relative_to(root).as_posix()}\0{sha256(p)}\n" for p in sorted(
        root.rglob("*.png"), key=lambda p: p.relative_to(root).parts))
    assert cal["source"] == [{"name": "cal.npz", "images": 3, "sha256": sha256(npz)},
                             {"name": root.name, "images": 6, "sha256": hashlib.sha256(lines.encode()).hexdigest(),
                              "sha256_of": cal["source"][1]["sha256_of"]}] and cal["images"] == 9
    assert str(tmp_path) not in json.dumps(cal)                                  # no path of this machine
    code, _, err = run(capsys, "quantize", "--calib", npz, root, "--max-images", "5", "--out",
                       tmp_path / "q5.safetensors", "--quiet")
    assert code == 0, err
    cal = load_quantized(tmp_path / "q5.safetensors").calibration                # as many as were read
    assert [e["images"] for e in cal["source"]] == [3, 2] and cal["images"] == 5


def test_report_refuses_weights_the_model_was_not_quantized_from(tmp_path, capsys):
    from refvit.checkpoints.safetensors_io import read_safetensors, write_safetensors
    tensors, meta = read_safetensors(DATA / "fmnist_deit.safetensors")
    tensors["head.bias"] = tensors["head.bias"] + 1                              # same config, other weights
    write_safetensors(tmp_path / "other.safetensors", tensors, meta or None)
    assert run(capsys, "quantize", "--calib", EXAMPLES, "--out", tmp_path / "q.safetensors", "--quiet")[0] == 0
    base = ["report", EXAMPLES, "--model", tmp_path / "q.safetensors", "--quiet", "--json"]
    code, _, err = run(capsys, *base, "--weights", tmp_path / "other.safetensors")
    one_line_error(code, err, "is not the checkpoint --model")
    code, out, err = run(capsys, *base, "--weights", DATA / "fmnist_deit.safetensors")
    assert code == 0 and "cannot verify" not in out + err, err
    qm = load_quantized(tmp_path / "q.safetensors")                              # an older file: no record
    from dataclasses import replace
    save_quantized(replace(qm, calibration={k: v for k, v in qm.calibration.items() if k != "float_checkpoint"}),
                   tmp_path / "old.safetensors")
    code, out, err = run(capsys, "report", EXAMPLES, "--model", tmp_path / "old.safetensors", "--weights",
                         tmp_path / "other.safetensors", "--json", "--quiet")
    assert code == 0 and any("cannot verify that --weights" in n for n in json.loads(out)["model"]["notes"]), err
    code, out, err = run(capsys, "report", EXAMPLES, "--model", tmp_path / "old.safetensors", "--weights",
                         tmp_path / "other.safetensors", "--quiet")
    assert code == 0 and "note: --model" in out and "cannot verify that --weights" in out, err


def test_shipped_quantized_file_names_its_data_not_a_path(shared):
    cal = load_quantized(DATA / "fmnist_deit_int8.safetensors").calibration
    assert cal["source"] == [{"name": "fmnist_test.npz", "images": 512,
                              "sha256": sha256(shared / "data" / "fmnist_test.npz")}]
    assert cal["float_checkpoint"] == {"name": "fmnist_deit.safetensors",
                                       "sha256": sha256(DATA / "fmnist_deit.safetensors")}
    raw = (DATA / "fmnist_deit_int8.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert hashlib.sha256(raw[8 + n:]).hexdigest() == SHIPPED_DATA_SHA256        # tensors byte-identical


# ---------------------------------------------------------------- docs for wheel users

def test_docs_ship_as_package_data_and_info_prints_where(capsys):
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "refvit.docs" in conf["packages"] and conf["package-dir"]["refvit.docs"] == "docs"
    assert conf["package-data"]["refvit.docs"] == ["*.md"]
    assert refvit.docs_dir() == ROOT / "docs"                                    # a source checkout
    code, out, _ = run(capsys, "info", "--docs")
    lines = out.splitlines()
    assert code == 0 and lines[0] == str(ROOT / "docs") and "  spec.md" in lines and "  golden-format.md" in lines
    one_line_error(*run(capsys, "info", "--docs", DATA / "fmnist_deit.safetensors")[::2], "--docs")


def test_manifest_and_mlir_header_say_where_the_docs_are(plain_golden):
    m = json.loads((plain_golden / "manifest.json").read_text())
    assert m["docs"]["spec"] == "spec.md" and "refvit info --docs" in m["docs"]["where"]
    from refvit.export_tosa import export_tosa
    from refvit.graph import SCHEMES
    from refvit.resolve import resolve_model
    r = resolve_model(int8=True, calib=[PULLOVER], scheme=SCHEMES["tosa-int32"])
    header = [ln for ln in export_tosa(r.qm).to_mlir().splitlines() if ln.startswith("//")]
    assert any("refvit info --docs" in ln for ln in header)


@pytest.mark.slow
def test_the_wheel_holds_the_docs(tmp_path):
    src = tmp_path / "src"                                                       # build a copy: no build/ left here
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests",
                                                             "bench"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(tmp_path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"pip cannot build a wheel here: {done.stderr.strip().splitlines()[-1:]}")
    import zipfile
    [wheel] = tmp_path.glob("refvit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"refvit/docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= set(names)


# ---------------------------------------------------------------- preprocessing JSON

def test_preprocessing_json_shows_only_the_fields_its_pipeline_uses(capsys):
    imagenet, fmnist = PRESETS["imagenet"].for_model(224).to_dict(), PRESETS["fmnist"].to_dict()
    assert not {"source_size", "pad"} & set(imagenet) and {"crop_pct", "interpolation"} <= set(imagenet)
    assert not {"crop_pct", "crop_mode"} & set(fmnist) and {"source_size", "pad", "interpolation"} <= set(fmnist)
    for p in (PRESETS["imagenet"].for_model(224), PRESETS["fmnist"]):           # what it leaves out is unused
        back = Preprocess.from_dict(p.to_dict())
        img = Image.open(PULLOVER)
        assert np.array_equal(back(img), p(img)) and back.to_dict() == p.to_dict()
    code, out, _ = run(capsys, "classify", "--json", "--preprocess", "imagenet", "--weights",
                       DATA / "fmnist_deit.safetensors", "--num-heads", "3", PULLOVER)
    assert code == 0 and not {"source_size", "pad"} & set(json.loads(out)["model"]["preprocess"])


# ---------------------------------------------------------------- the IREE flow as one command

def test_iree_check_refuses_what_it_cannot_run(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "iree-check", "--seed", "0", "--out", tmp_path / "w", "--quiet")
    one_line_error(code, err, "scheme refvit-int8")                              # not expressible in TOSA
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    code, _, err = run(capsys, "iree-check", "--scheme", "tosa-int32", "--calib", PULLOVER, "--seed", "0",
                       "--out", tmp_path / "w", "--quiet")
    one_line_error(code, err, "iree-compile not found")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_iree_check_runs_every_tensor_through_iree(tmp_path, capsys):
    pytest.importorskip("iree.compiler", reason="IREE is not installed (pip install 'refvit[tosa]')")
    work = tmp_path / "w"
    code, out, err = run(capsys, "iree-check", "--scheme", "tosa-int32", "--calib", EXAMPLES, "--seed", "3",
                         "--batch", "2", "--out", work, "--json")
    assert code == 0, err
    report = json.loads(out)
    m = json.loads((work / "golden" / "manifest.json").read_text())
    assert report["ok"] and report["counts"] == {"OK": len(m["ops"])}
    for op in m["ops"]:                                                          # IREE's own files, read here
        assert np.array_equal(np.load(work / "device" / "tensors" / f"{op['name']}.npy"),
                              np.load(work / "golden" / m["tensors"][op["name"]]["files"]["npy"])), op["name"]
    commands = (work / "commands.sh").read_text()
    assert "--iree-llvmcpu-target-cpu=generic" in commands and commands.count("--output=@") == len(m["ops"])
    assert os.access(work / "commands.sh", os.X_OK)
    device = work / "device" / "tensors" / f"{m['ops'][40]['name']}.npy"       # a wrong device tensor is found
    a = np.load(device)
    a.reshape(-1)[0] += 1
    np.save(device, a)
    code, out, _ = run(capsys, "check", work / "golden", work / "device")
    assert code == 1 and f"first divergent op: [40] {m['ops'][40]['name']}" in out
