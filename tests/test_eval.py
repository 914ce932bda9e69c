"""refvit eval: data set layouts, streaming, and integer predictions identical whatever the split of the work
(in-process, local worker processes, a Dask LocalCluster)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from refvit import int_model
from refvit.cli import main
from refvit.evaluate import Dataset, DatasetError, evaluate, open_dataset
from refvit.models import default_int8_path, load_model
from refvit.qfile import load_quantized
from refvit.resolve import resolve_model


@pytest.fixture(scope="module")
def fmnist_small(shared, tmp_path_factory):
    """The first 96 real Fashion-MNIST test images as an .npz, an ImageFolder tree and a labelled folder."""
    with np.load(shared / "data" / "fmnist_test.npz") as z:
        images, labels = z["images"][:96], z["labels"][:96]
    root = tmp_path_factory.mktemp("fm")
    np.savez(root / "small.npz", images=images, labels=labels)
    names = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
    for i, (im, y) in enumerate(zip(images[:40], labels[:40])):
        (root / "tree" / f"{y}_{names[y]}").mkdir(parents=True, exist_ok=True)     # sorted = label order
        Image.fromarray(im).save(root / "tree" / f"{y}_{names[y]}" / f"{i:04d}.png")
        (root / "flat").mkdir(exist_ok=True)
        Image.fromarray(im).save(root / "flat" / f"img{i:04d}.png")
    (root / "flat" / "labels.txt").write_text("".join(f"img{i:04d}.png,{y}\n" for i, y in enumerate(labels[:40])))
    return root, images, labels.astype(np.int64)


def independent_predictions(images):
    """Float and integer top-1 computed directly in one batch (no chunks, no workers)."""
    fm, qm = load_model(None, form="conv"), load_quantized(default_int8_path())
    x = fm.preprocess.from_grayscale(images)                                    # (B, 3, 32, 32)
    return fm.logits(x).argmax(1), int_model.logits_int8_model(qm, x)[0].argmax(1)


@pytest.mark.slow   # ~4 s: two worker processes (the quick run checks the in-process path: test_eval_cli_json)
def test_npz_in_process_and_two_workers_agree_with_an_independent_loop(fmnist_small):
    root, images, labels = fmnist_small
    r = resolve_model(int8=True, form="conv")
    data = open_dataset(root / "small.npz")
    one = evaluate(r, data, workers=1, chunk=40)
    two = evaluate(r, data, workers=2, chunk=24)
    pf, pi = independent_predictions(images)
    assert one["int_predictions_sha256"] == two["int_predictions_sha256"]
    assert one["int_top1"] == two["int_top1"] == pytest.approx((pi == labels).mean())
    assert one["float_top1"] == pytest.approx((pf == labels).mean())
    assert one["agreement"] == pytest.approx((pf == pi).mean())


def test_folder_layouts_read_the_same_labels(fmnist_small):
    root, _, labels = fmnist_small
    tree, flat = open_dataset(root / "tree"), open_dataset(root / "flat")
    assert tree.kind == "imagefolder" and flat.kind == "labels"
    assert sorted(tree.labels.tolist()) == sorted(labels[:40].tolist())
    assert flat.labels.tolist() == labels[:40].tolist()
    assert len(open_dataset(root / "flat", limit=7)) == 7


def test_eval_cli_json(fmnist_small, capsys):
    root, images, labels = fmnist_small
    assert main(["eval", str(root / "flat"), "--int8", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    pf, pi = independent_predictions(images[:40])
    assert res["images"] == 40 and res["int_top1"] == pytest.approx((pi == labels[:40]).mean())
    assert res["float_top1"] == pytest.approx((pf == labels[:40]).mean())


def test_eval_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args, text in ((["eval", str(tmp_path / "nope")], "data set not found"),
                       (["eval", str(tmp_path / "empty")], "neither class folders nor a labels file"),
                       (["eval", str(tmp_path), "--workers", "0"], "--workers must be at least 1")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("refvit: error: ") and text in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "labels.json").write_text('{"b.png": 1}')
    with pytest.raises(DatasetError, match="no label for 1 image"):
        open_dataset(tmp_path / "bad")


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_integer_predictions(fmnist_small):
    distributed = pytest.importorskip("distributed", reason="the dask extra is not installed (pip install 'refvit[dask]')")
    root, _, _ = fmnist_small
    r = resolve_model(int8=True, form="conv")
    data = Dataset("npz", root / "small.npz", open_dataset(root / "small.npz").labels,
                   arrays=open_dataset(root / "small.npz").arrays)
    local = evaluate(r, data, chunk=40)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        remote = evaluate(r, data, scheduler=c.scheduler_address, chunk=24)
    assert remote["int_predictions_sha256"] == local["int_predictions_sha256"]
    assert remote["float_top1"] == local["float_top1"] and remote["agreement"] == local["agreement"]
