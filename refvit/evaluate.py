"""Evaluation of whole data sets: float top-1, integer top-1 and their agreement, streamed in chunks, in this
process, in local worker processes (`workers`), or on a Dask distributed cluster (`scheduler`).

The integer predictions are identical bit for bit whatever the split: each image's integer logits depend on
that image alone (the integer model is batch invariant), chunks are fixed by the data set order, and the
results are put back in that order. Float predictions come from float BLAS and may differ in the last bits
of a logit between batch compositions, never in a way that the integer path can see.

Data sets (`open_dataset`):
- a Fashion-MNIST style `.npz` with `images` uint8 (N, h, w) and `labels` (N,) (a grayscale-pad pipeline);
- an ImageFolder tree (timm's and torchvision's layout): one folder per class, classes indexed in sorted
  folder-name order, the images of a class read from its folder and its subfolders (resolve.expand_images,
  as every command reads a folder), sorted by path; there must be one class folder per class of the model
  (`check_classes`): labels by position would not be the model's class indices otherwise;
- a folder of images with a labels file: `labels.json` ({file name: index} or {file name: {"index": i}}) or
  `labels.txt` / `labels.csv` / `labels.tsv` (lines `file name<comma, tab or space>index`).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import int_model, parallel
from .preprocess import ImageError
from .resolve import IMAGE_SUFFIXES, Resolved, expand_images

CHUNK = 256          # images per task: the unit of work and of memory (one chunk of images at a time)
BATCH = 64           # images per forward pass within a chunk
LABEL_FILES = ("labels.json", "labels.txt", "labels.csv", "labels.tsv")


class DatasetError(ImageError):
    """A data set that cannot be read (unknown layout, bad labels file)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    kind: str                    # 'npz' | 'imagefolder' | 'labels'
    path: Path
    labels: np.ndarray           # int64 (N,)
    files: tuple = ()            # image files (imagefolder, labels)
    arrays: np.ndarray | None = None   # uint8 (N, h, w) (npz)
    classes: tuple = ()          # class folder names (imagefolder)

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "images": len(self), "classes": len(self.classes) or None}

    def batch(self, r: Resolved, start: int, stop: int) -> np.ndarray:
        """Images start..stop-1 through the model's preprocessing -> float32 (B, 3, H, W)."""
        if self.arrays is not None:
            return r.preprocess.from_grayscale(self.arrays[start:stop])
        return r.preprocess.images(self.files[start:stop])


def _read_labels_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("expected a JSON object {file name: index}")
            return {k: int(v["index"] if isinstance(v, dict) else v) for k, v in raw.items()}
        out = {}
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.startswith("#"):
                parts = [p for p in re.split(r"[,\t ]+", line.strip()) if p]
                if len(parts) != 2:
                    raise ValueError(f"line {n}: expected 'file name, index', got {line!r}")
                out[parts[0]] = int(parts[1])
        return out
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"cannot read labels file {path}: {e}") from None


def open_dataset(path, limit: int | None = None) -> Dataset:
    """A data set by path (see the module docstring); `limit` keeps its first images."""
    path = Path(path)
    cut = slice(0, limit)
    if path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                images, labels = z["images"][cut], z["labels"][cut].astype(np.int64)
        except (OSError, KeyError, ValueError) as e:
            raise DatasetError(f"cannot read {path} as an .npz with 'images' and 'labels': {e}") from None
        if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(labels):
            raise DatasetError(f"{path}: 'images' must be uint8 (N, h, w) with one label each")
        return Dataset("npz", path, labels, arrays=images)
    if not path.is_dir():
        raise DatasetError(f"data set not found: {path} (an .npz file, an ImageFolder tree, or a folder with "
                           f"{' or '.join(LABEL_FILES)})")
    label_file = next((path / n for n in LABEL_FILES if (path / n).is_file()), None)
    if label_file is not None:
        labels = _read_labels_file(label_file)
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        missing = [f.name for f in files if f.name not in labels]
        if missing:
            raise DatasetError(f"{label_file} has no label for {len(missing)} image(s), e.g. {missing[0]}")
        files = files[cut]
        return Dataset("labels", path, np.array([labels[f.name] for f in files], np.int64), tuple(files))
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{path} holds neither class folders nor a labels file ({', '.join(LABEL_FILES)})")
    files, labels = [], []
    for i, c in enumerate(classes):
        imgs = expand_images([path / c])                  # recursive, as every command reads a folder
        files += imgs
        labels += [i] * len(imgs)
    if not files:
        raise DatasetError(f"{path}: no images in its class folders")
    return Dataset("imagefolder", path, np.array(labels, np.int64)[cut], tuple(files[cut]), classes=tuple(classes))


def check_classes(data: Dataset, num_classes: int) -> None:
    """The labels fit a model of num_classes classes: in range, and an ImageFolder tree has exactly one class
    folder per class (fewer folders would label by position, scoring near 0% without an error)."""
    if data.kind == "imagefolder" and len(data.classes) != num_classes:
        raise DatasetError(f"{data.path} has {len(data.classes)} class folders, the model has {num_classes} "
                           f"classes: ImageFolder labels are folder positions in sorted order, so they would not be "
                           f"the model's class indices; give one folder per class, or a folder with "
                           f"{' / '.join(LABEL_FILES)} giving each image's class index")
    if len(data) and (int(data.labels.max()) >= num_classes or int(data.labels.min()) < 0):
        raise DatasetError(f"{data.path}: labels run from {int(data.labels.min())} to {int(data.labels.max())}, "
                           f"the model has {num_classes} classes")


# ---------------------------------------------------------------------------------------------
# one chunk: what every worker runs
# ---------------------------------------------------------------------------------------------

def predict_chunk(r: Resolved, data: Dataset, start: int, stop: int) -> tuple:
    """(float top-1 or None, integer top-1 or None) of images start..stop-1, int64 arrays."""
    pf, pi = [], []
    for s in range(start, stop, BATCH):
        x = data.batch(r, s, min(stop, s + BATCH))                                  # (B, 3, H, W)
        if r.float_model is not None:
            pf.append(r.float_model.logits(x).argmax(axis=1))
        if r.qm is not None:
            pi.append(int_model.logits_int8_model(r.qm, x, kernels=r.kernels)[0].argmax(axis=1))   # first max
    cat = (lambda p: np.concatenate(p).astype(np.int64) if p else None)
    return cat(pf), cat(pi)


_WORKER: dict = {}


def _init_worker(r, data):
    """A local worker process: one thread (the workers already share the cores; same results at any count)."""
    parallel.set_threads(1)
    _WORKER["r"], _WORKER["data"] = r, data


def _worker_chunk(bounds):
    return bounds[0], predict_chunk(_WORKER["r"], _WORKER["data"], *bounds)


def _chunks(n: int, chunk: int) -> list:
    return [(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def _run_local(r, data, workers: int, progress, chunk: int):
    chunks = _chunks(len(data), chunk)
    if workers <= 1:
        for i, b in enumerate(chunks, 1):
            yield b[0], predict_chunk(r, data, *b)
            if progress:
                progress(i, len(chunks), "chunk")
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(r, data)) as pool:
        for i, res in enumerate(pool.imap_unordered(_worker_chunk, chunks), 1):
            yield res
            if progress:
                progress(i, len(chunks), "chunk")


def _run_dask(r, data, scheduler: str, progress, chunk: int):
    try:
        from dask.distributed import Client, as_completed
    except ImportError:
        raise DatasetError("--scheduler needs Dask: pip install 'refvit[dask]'") from None
    chunks = _chunks(len(data), chunk)
    with Client(scheduler) as client:
        rf, df = client.scatter([r, data], broadcast=True)
        futures = [client.submit(predict_chunk, rf, df, *b, key=f"refvit-chunk-{b[0]}-{b[1]}", pure=False)
                   for b in chunks]
        start_of = {f.key: b[0] for f, b in zip(futures, chunks)}
        for i, f in enumerate(as_completed(futures), 1):
            yield start_of[f.key], f.result()
            if progress:
                progress(i, len(chunks), "chunk")


def evaluate(r: Resolved, data: Dataset, *, workers: int = 1, scheduler: str | None = None, progress=None,
             chunk: int = CHUNK) -> dict:
    """Top-1 of the float and the integer model on `data`, their agreement, and a hash of the integer
    predictions (equal for every split of the work)."""
    t0 = time.perf_counter()
    n = len(data)
    pf = np.full(n, -1, np.int64) if r.float_model is not None else None
    pi = np.full(n, -1, np.int64) if r.qm is not None else None
    runs = _run_dask(r, data, scheduler, progress, chunk) if scheduler else _run_local(r, data, workers, progress, chunk)
    for start, (f, i) in runs:
        if pf is not None:
            pf[start:start + len(f)] = f
        if pi is not None:
            pi[start:start + len(i)] = i
    y = data.labels
    out = {"dataset": data.describe(), "images": n, "workers": workers if not scheduler else None,
           "scheduler": scheduler, "float_top1": None, "int_top1": None, "agreement": None}
    if pf is not None:
        out["float_top1"] = float((pf == y).mean())
    if pi is not None:
        out["int_top1"] = float((pi == y).mean())
        out["int_predictions_sha256"] = hashlib.sha256(pi.astype("<i8").tobytes()).hexdigest()
    if pf is not None and pi is not None:
        out["agreement"] = float((pf == pi).mean())
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
