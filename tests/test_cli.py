"""The command line, run in-process through main(argv), plus one run of `python -m refvit`."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file  # the reference reader, independent of ours

from refvit.cli import EXAMPLES, default_model_note, main
from refvit.config import preset
from refvit.labels import class_names, default_model_info, imagenet_classes
from refvit.models import load_model
from refvit.preprocess import fmnist_transform

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def example_index_and_label(path: Path):
    """fmnist_test_0004_shirt.png -> (4, 'shirt')."""
    m = re.fullmatch(r"fmnist_test_(\d{4})_(\w+)\.png", path.name)
    assert m, path.name
    return int(m.group(1)), m.group(2)


def test_examples_are_the_named_fmnist_test_images(shared):
    with np.load(shared / "data" / "fmnist_test.npz") as z:
        images, labels = z["images"], z["labels"]
    classes = default_model_info()["classes"]
    paths = sorted(EXAMPLES.glob("*.png"))
    assert len(paths) >= 5 and len({example_index_and_label(p)[1] for p in paths}) == len(paths)
    for p in paths:
        i, label = example_index_and_label(p)
        assert np.array_equal(np.asarray(Image.open(p)), images[i])
        assert re.sub(r"\W+", "_", classes[labels[i]].lower()) == label


def test_classify_default_examples(capsys, shared):
    code, out, err = run(capsys, "classify")
    assert code == 0, err
    assert out.splitlines()[0] == default_model_note()
    assert "Fashion-MNIST" in out and "86.2%" in out
    # top-1 of each example equals the model's argmax on the same test image taken from the npz
    with np.load(shared / "data" / "fmnist_test.npz") as z:
        images = z["images"]
    model = load_model(None)
    paths = sorted(EXAMPLES.glob("*.png"))
    expected = model.logits(fmnist_transform(images[[example_index_and_label(p)[0] for p in paths]])).argmax(1)
    for p, k in zip(paths, expected):
        first = out.split(str(p) + "\n")[1].splitlines()[0]          # "  1.  66.97%     9  Ankle boot"
        rank, _, index, name = re.fullmatch(r"\s+(\d+)\.\s+([\d.]+)%\s+(\d+)\s+(.+)", first).groups()
        assert (rank, int(index), name) == ("1", k, model.class_names[k])


def test_class_names(shared):
    rows = [line.split("\t") for line in (shared / "imagenet" / "imagenet1k_classes.tsv").read_text().splitlines()]
    assert class_names(1000) == imagenet_classes() == [r[2] for r in rows[1:]]
    assert class_names(3) == ["class 0", "class 1", "class 2"]
    assert class_names(10, default_model=True)[9] == "Ankle boot"


def test_classify_json_peer_conv(capsys, peers, imagenet_photos):
    peer, i = peers["timm_tiny_distilled"], 3
    code, out, err = run(capsys, "classify", imagenet_photos[i], "--weights", peer.weights,
                         "--form", "conv", "--top", "3", "--json")
    assert code == 0, err
    doc = json.loads(out)  # stdout is pure JSON
    assert doc["model"]["form"] == "conv" and doc["model"]["head_mode"] == "mean"
    (result,) = doc["results"]
    assert result["image"] == str(imagenet_photos[i])
    top = result["top"]
    assert len(top) == 3
    assert top[0]["index"] == int(np.argmax(peer.logits[i]))
    assert [t["name"] for t in top] == [imagenet_classes()[t["index"]] for t in top]
    probs = [t["probability"] for t in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    logits = peer.logits[i].astype(np.float64)  # softmax from the peer's own logits
    want = np.exp(logits[top[0]["index"]] - logits.max()) / np.exp(logits - logits.max()).sum()
    assert abs(probs[0] - want) < 1e-5
    assert "embedded default" not in out + err


def test_info_timm_file(capsys, peers):
    path = peers["timm_tiny"].weights
    code, out, err = run(capsys, "info", path)
    assert code == 0, err
    cfg = preset("deit_tiny_patch16_224")
    for field in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes"):
        assert re.search(rf"^\s+{field}\s+{getattr(cfg, field)}$", out, re.M), field
    assert "naming:      timm" in out and "head mode:   cls" in out
    n = sum(a.size for a in load_file(str(path)).values())
    assert f"parameters:  {n:,}" in out


def test_info_hf_dir(capsys, peers):
    path = peers["hf_with_teacher"].weights
    code, out, err = run(capsys, "info", path)
    assert code == 0, err
    hf = json.loads((path / "config.json").read_text())
    assert re.search(rf"^\s+embed_dim\s+{hf['hidden_size']}$", out, re.M)
    assert re.search(rf"^\s+depth\s+{hf['num_hidden_layers']}$", out, re.M)
    assert re.search(rf"^\s+ln_eps\s+{hf['layer_norm_eps']}$", out, re.M)
    assert "naming:      hf" in out and "head mode:   mean" in out
    n = sum(a.size for a in load_file(str(path / "model.safetensors")).values())
    assert f"parameters:  {n:,}" in out


def assert_user_error(code, out, err, *names):
    assert code == 2
    assert err.startswith("refvit: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in err


def test_error_missing_image(capsys, tmp_path):
    assert_user_error(*run(capsys, "classify", tmp_path / "no_such_photo.jpg"), "no_such_photo.jpg", "not found")


def test_error_not_an_image(capsys, tmp_path):
    path = tmp_path / "readme.png"
    path.write_text("plain text, not a picture")
    assert_user_error(*run(capsys, "classify", path), "readme.png", "cannot read image")


def test_error_corrupt_weights(capsys, tmp_path, imagenet_photos):
    path = tmp_path / "broken.safetensors"
    path.write_bytes((40).to_bytes(8, "little") + b"{not json")
    assert_user_error(*run(capsys, "classify", imagenet_photos[0], "--weights", path), "broken.safetensors",
                      "not a valid safetensors file")


def test_error_missing_weights(capsys, tmp_path, imagenet_photos):
    path = tmp_path / "absent.safetensors"
    assert_user_error(*run(capsys, "classify", imagenet_photos[0], "--weights", path), "absent.safetensors",
                      "no such file")
    assert_user_error(*run(capsys, "info", path), "absent.safetensors", "no such file")


def test_error_bad_usage(capsys, tmp_path):
    assert_user_error(*run(capsys, "classify", "--top", "0"), "--top")
    assert_user_error(*run(capsys, "classify", "--weights", tmp_path / "w.safetensors"), "no images")
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_module_entry_point():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "refvit", "classify", "--top", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == default_model_note()
    assert proc.stdout.count(".png\n") == len(list(EXAMPLES.glob("*.png")))
