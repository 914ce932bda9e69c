"""One model resolution (refvit.resolve.resolve_model): what each thing the user names resolves to -- the
embedded default (float, and its shipped quantized file), a quantized file, a float checkpoint quantized on the
fly -- with its preprocessing, class names and source; the options that change a quantized model (rounding,
pruning); the errors; and the calibration images (expand_images, calibration_batches)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from refvit.checkpoints import write_safetensors
from refvit.cli import EXAMPLES, main
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.labels import default_model_info
from refvit.models import default_int8_path, default_model_path
from refvit.preprocess import PRESETS, ImageError
from refvit.qfile import load_quantized, save_quantized
from refvit.quantize import quantize
from refvit.prune import prune_plan
from refvit.resolve import ResolveError, calibration_batches, expand_images, resolve_model


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """The tiny model's float weights (w.safetensors) and its quantized file (q.safetensors)."""
    d = tmp_path_factory.mktemp("resolve")
    write_safetensors(d / "w.safetensors", tiny.params)
    save_quantized(tiny.qm, d / "q.safetensors")
    return d


def same_tensors(a, b) -> bool:
    return set(a) == set(b) and all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


# ---------------------------------------------------------------- what resolves to what

def test_nothing_named_is_the_embedded_default_float_model():
    r = resolve_model()
    assert r.is_default and r.qm is None and r.float_model is not None and r.float_model.form == "token"
    assert r.source == {"kind": "default", "path": str(default_model_path()), "sha256": sha256(default_model_path())}
    assert r.class_names == default_model_info()["classes"] and r.preprocess == PRESETS["fmnist"]
    assert r.config.img_size == 32 and r.notes == []


def test_the_default_int8_model_is_the_shipped_file_unless_something_asks_otherwise():
    r = resolve_model(int8=True)
    assert r.source == {"kind": "default", "path": str(default_int8_path()), "sha256": sha256(default_int8_path())}
    assert same_tensors(r.qm.tensors, load_quantized(default_int8_path()).tensors)
    assert r.float_model.form == "conv" and "shipped quantized file" in r.notes[-1]
    with pytest.raises(ResolveError, match="quantizing needs calibration images"):
        resolve_model(int8=True, method="max")                            # asks for another calibration


def test_a_quantized_file_resolves_to_itself_with_its_recorded_pipeline(tiny, files):
    path = files / "q.safetensors"
    r = resolve_model(model=path)
    assert r.source == {"kind": "quantized", "path": str(path), "sha256": sha256(path)}
    assert r.float_model is None and r.config == tiny.config and r.head_mode == "mean"
    assert same_tensors(r.qm.tensors, tiny.qm.tensors) and r.qm.graph == tiny.qm.graph
    # nothing recorded: ImageNet's eval transform at the model's size; 7 classes are no named set
    assert r.preprocess == PRESETS["imagenet"].for_model(32)
    assert r.class_names == [f"class {i}" for i in range(7)]
    assert resolve_model(model=path, preprocess="fmnist").preprocess == PRESETS["fmnist"]


def test_rounding_and_pruning_on_a_quantized_file(tiny, files, tmp_path):
    path = files / "q.safetensors"
    r = resolve_model(model=path, rounding=DOUBLE_ROUND)
    assert r.qm.rounding == DOUBLE_ROUND and same_tensors(r.qm.tensors, tiny.qm.tensors)
    assert {op.attrs["rounding"] for op in r.qm.graph if "rounding" in op.attrs} == {DOUBLE_ROUND}
    pruned = resolve_model(model=path, prune="1:0.5").qm
    select = [op for op in pruned.graph if op.op == "token_select"]
    assert [op.name for op in select] == ["blocks.1.select"] and select[0].shape == ("B", 8)   # 16 patches * 0.5
    assert pruned.prune_stages() == [{"block": 1, "patches": 16, "keep": 8, "patches_out": 9}] and tiny.qm.prune == ()
    plan = prune_plan(pruned.prune, pruned.config.depth, pruned.config.num_patches)   # the records' pruning
    assert [(s.block, s.keep) for s in plan] == [(1, 8)]
    save_quantized(pruned, tmp_path / "p.safetensors")                   # a rounding change keeps the pruning
    again = resolve_model(model=tmp_path / "p.safetensors", rounding=DOUBLE_ROUND).qm
    assert again.graph == tiny.qm.with_rounding(DOUBLE_ROUND).with_prune("1:0.5").graph
    assert not any(op.op == "token_select" for op in resolve_model(model=tmp_path / "p.safetensors",
                                                                   prune="none").qm.graph)


def test_a_float_checkpoint_quantized_on_the_fly(tiny, files):
    path = files / "w.safetensors"
    r = resolve_model(weights=path, num_heads=3)
    assert r.source == {"kind": "float", "path": str(path), "sha256": sha256(path)}
    assert r.qm is None and r.config == tiny.config and r.head_mode == "mean"
    assert r.preprocess == PRESETS["imagenet"].for_model(32)
    with pytest.raises(ResolveError, match="quantizing needs calibration images: give --calib"):
        resolve_model(weights=path, num_heads=3, int8=True)
    q = resolve_model(weights=path, num_heads=3, int8=True, calib_fallback=lambda cfg: (tiny.x, "the test's images"))
    assert q.qm.calibration["source"] == "the test's images" and q.qm.calibration["images"] == 6
    assert q.qm.calibration["method"] == "percentile" and q.qm.rounding == SINGLE_ROUND
    assert q.notes[-1] == "quantized on the fly: percentile calibration on the test's images"
    # the weights as read back from the file, quantized on the same batch: the tiny model's weights' constants
    m = resolve_model(weights=path, num_heads=3, int8=True, method="max",
                      calib_fallback=lambda cfg: (tiny.x, "x")).qm
    assert m.calibration["method"] == "max" and m.calibration["preprocess"]["name"] == "imagenet"
    assert same_tensors(m.tensors, quantize(tiny.conv, tiny.config, [tiny.x], head_mode="mean", method="max").tensors)


def test_what_cannot_be_resolved_is_a_resolve_error(files, tmp_path):
    with pytest.raises(ResolveError, match="not both"):
        resolve_model(weights=files / "w.safetensors", model=files / "q.safetensors")
    with pytest.raises(ResolveError, match="model file not found: .*missing.safetensors"):
        resolve_model(model=tmp_path / "missing.safetensors")
    with pytest.raises(ResolveError, match="q.safetensors is a quantized model: pass it with --model"):
        resolve_model(weights=files / "q.safetensors")
    with pytest.raises(ValueError, match="block"):
        resolve_model(prune="9:0.5")                                      # the default has 6 blocks


# ---------------------------------------------------------------- calibration images

def test_expand_images_lists_a_folder_sorted_and_keeps_files(tmp_path):
    for name in ("b.png", "a.JPG", "c.txt", "d.webp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert expand_images([tmp_path]) == [tmp_path / "a.JPG", tmp_path / "b.png", tmp_path / "d.webp"]
    assert expand_images([tmp_path / "c.txt", tmp_path])[0] == tmp_path / "c.txt"


def test_calibration_batches_from_npz_and_images(tmp_path):
    fm = PRESETS["fmnist"]
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=gray)
    for i in range(3):
        Image.fromarray(gray[i]).save(tmp_path / f"img{i}.png")
    batches = list(calibration_batches(fm, [tmp_path / "set.npz"], batch=2))
    assert [b.shape for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    assert np.array_equal(np.concatenate(batches), fm.from_grayscale(gray))
    limited = list(calibration_batches(fm, [tmp_path / "set.npz", tmp_path], limit=6, batch=4))
    assert [len(b) for b in limited] == [4, 1, 1]                        # 5 from the set, then 1 image file
    assert np.array_equal(limited[2], fm.images([tmp_path / "img0.png"]))
    with pytest.raises(ImageError, match="grayscale-pad pipeline"):
        list(calibration_batches(PRESETS["imagenet"].for_model(32), [tmp_path / "set.npz"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no images in .*empty nor in its subfolders"):
        list(calibration_batches(fm, [tmp_path / "empty"]))


# ---------------------------------------------------------------- preprocessing through the commands

def test_golden_model_file_and_default_give_the_same_input(tmp_path, capsys):
    """The bug of refvit 0.1: `golden --model Q --image X` used the ImageNet pipeline whatever Q recorded."""
    image = sorted(EXAMPLES.glob("*.png"))[0]
    assert main(["golden", "--image", str(image), "--out", str(tmp_path / "a")]) == 0
    assert main(["golden", "--model", str(default_int8_path()), "--image", str(image), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert a["input"]["sha256_int8"] == b["input"]["sha256_int8"]
    assert a["input"]["preprocess"] == b["input"]["preprocess"] and a["input"]["preprocess"]["name"] == "fmnist"
    assert a["output"] == b["output"]
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


