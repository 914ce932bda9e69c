"""One model resolution: what the user named (a float checkpoint, a quantized file, or the embedded default)
-> a runnable model with its preprocessing and class names. Every command goes through `resolve_model`,
with the same defaults (calibration `DEFAULT_METHOD` everywhere, recorded in the quantized model).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from weights_tools import CheckpointError
from .config import DeiTConfig
from .graph import Scheme
from .intmath import SINGLE_ROUND
from .labels import class_names, default_model_info
from .models import Model, default_int8_path, load_model
from .preprocess import PRESETS, ImageError, Preprocess, PreprocessError, resolve_preprocess
from .prune import parse_prune, prune_plan
from .qfile import is_quantized_file, load_quantized
from .errors import RefvitError
from .qfile import QuantizedModel
from .quantize import DEFAULT_PERCENTILE, quantize

DEFAULT_METHOD = "percentile"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CALIB_BATCH = 32


class ResolveError(RefvitError):
    """What the user named cannot be made into a model (conflicting options, a quantized file given as weights)."""


@dataclass(frozen=True, eq=False)
class Resolved:
    config: DeiTConfig
    head_mode: str
    preprocess: Preprocess           # at the model's input size
    class_names: list
    source: dict                     # {'kind': 'default' | 'float' | 'quantized', 'path', 'sha256'}
    float_model: Model | None = None # the float weights (None for a quantized file used alone)
    qm: QuantizedModel | None = None # the integer model (None unless asked for, or a quantized file)
    notes: list = field(default_factory=list)   # what was assumed or done on the way, for the user
    kernels: str = "fast"            # the integer kernels: fast (default) or reference (refvit.graph.KERNEL_SETS)

    @property
    def is_default(self) -> bool:
        return self.source["kind"] == "default"

    def images(self, paths) -> np.ndarray:
        """Image files -> float32 (B, 3, H, W) through this model's preprocessing."""
        return self.preprocess.images(paths)


def file_source(kind: str, path) -> dict:
    path = Path(path)
    return {"kind": kind, "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def expand_images(paths) -> list:
    """Files and folders -> image files: the one reading of image folders for every command (classify,
    quantize --calib, golden --image, report, and eval's class folders). A folder gives the images in it and
    in its subfolders, recursively (an ImageFolder tree of class folders reads whole), sorted by their path
    inside it; a folder without any image is an ImageError, never an empty list."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted((q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()),
                           key=lambda q: q.relative_to(p).parts)
            if not found:
                raise ImageError(f"no images in {p} nor in its subfolders ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        else:
            out.append(p)
    return out


def calibration_batches(preprocess: Preprocess, paths, limit: int | None = None, batch: int = CALIB_BATCH):
    """Float batches (B, 3, H, W) from image files, folders, or .npz files holding 'images' uint8 (N, h, w)
    grayscale arrays (Fashion-MNIST, for a grayscale-pad pipeline)."""
    npz = [Path(p) for p in paths if str(p).endswith(".npz")]
    files = expand_images([p for p in paths if not str(p).endswith(".npz")])
    if npz and preprocess.kind != "grayscale-pad":
        raise ImageError(".npz calibration sets hold grayscale arrays (Fashion-MNIST): they fit a grayscale-pad "
                         "pipeline such as --preprocess fmnist only")
    arrays = []
    for f in npz:
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays.append(z["images"])
        except (OSError, KeyError, ValueError) as e:
            raise ImageError(f"cannot read calibration set {f}: {e}") from None
    images = np.concatenate(arrays) if arrays else np.zeros((0, preprocess.source_size, preprocess.source_size), np.uint8)
    if limit is not None:
        images = images[:limit]
        files = files[:max(0, limit - len(images))]
    if len(images) + len(files) == 0:
        raise ImageError("no calibration images found in " + ", ".join(map(str, paths)))
    for i in range(0, len(images), batch):
        yield preprocess.from_grayscale(images[i:i + batch])
    for i in range(0, len(files), batch):
        yield preprocess.images(files[i:i + batch])


def _recorded_preprocess(qm: QuantizedModel) -> tuple[Preprocess, bool]:
    """The pipeline a quantized model was calibrated for, and whether it is the embedded default's."""
    rec = qm.calibration.get("preprocess")
    if isinstance(rec, dict):
        pp = Preprocess.from_dict(rec)
    elif rec in ("fmnist", "timm", None):          # format version 1 recorded a name
        pp = PRESETS["fmnist" if rec == "fmnist" else "imagenet"]
    else:
        raise CheckpointError(f"quantized model records an unknown preprocessing {rec!r}")
    return pp, pp.kind == "grayscale-pad" and qm.config.num_classes == len(default_model_info()["classes"])


def _finish_int(qm: QuantizedModel, rounding: str | None, prune) -> QuantizedModel:
    """--rounding and --prune on an integer model: the constants stay; a rounding change rewrites the records
    (their pruning is kept), `prune` builds the graph again with that pruning (None: the records' own)."""
    if rounding and rounding != qm.rounding:
        qm = qm.with_rounding(rounding)
    return qm if prune is None else qm.with_prune(parse_prune(prune))


def resolve_model(*, weights=None, model=None, int8: bool = False, form: str = "token", preprocess=None,
                  num_heads: int | None = None, arch: str | None = None, calib=None, calib_fallback=None,
                  method: str = DEFAULT_METHOD, percentile: float = DEFAULT_PERCENTILE, rounding: str | None = None,
                  scheme: Scheme | None = None, max_images: int = 512, progress=None, prune=None) -> Resolved:
    """The one way a command turns its options into a model.

    weights: a float checkpoint (None: the embedded default); model: a quantized file (exclusive with
    weights). int8: also make the integer model -- the embedded default's shipped quantized file when
    nothing asks otherwise, else the float weights quantized now, calibrated on `calib` (image paths,
    folders, .npz) or, without it, on `calib_fallback(config)`: image paths (the images being classified), or a
    (float batch, description) pair.
    preprocess: a preset name, a JSON file or a Preprocess; default: recorded in the quantized file,
    the checkpoint's pretrained_cfg, ImageNet's eval transform, or the Fashion-MNIST pipeline for the default.
    prune: token pruning, 'BLOCK:KEEP,...' or ((block, keep_rate), ...) (refvit.prune), for the float model and
    the integer one (whose constants do not depend on it: calibration runs unpruned); None: none, or what a
    quantized file records."""
    if model is not None and weights is not None:
        raise ResolveError("give --weights (float, quantized on the fly) or --model (quantized), not both")
    pp = resolve_preprocess(preprocess) if preprocess is not None else None
    if model is not None:
        path = Path(model)
        if not path.exists():
            raise ResolveError(f"model file not found: {path}")
        qm = _finish_int(load_quantized(path), rounding, prune)
        recorded, default_classes = _recorded_preprocess(qm)
        return Resolved(qm.config, qm.head_mode, (pp or recorded).for_model(qm.config.img_size),
                        class_names(qm.config.num_classes, default_classes), file_source("quantized", path), qm=qm)
    if weights is not None and is_quantized_file(weights):
        raise ResolveError(f"{weights} is a quantized model: pass it with --model")
    fm = load_model(weights, form="conv" if int8 else form, preprocess=pp, num_heads=num_heads, arch=arch)
    if prune is not None:
        prune_plan(prune, fm.config.depth, fm.config.num_patches)                  # a bad block fails here
        fm = replace(fm, prune=parse_prune(prune))
    source = file_source("default" if fm.is_default else "float", fm.path)
    notes = [fm.heads_note] if fm.heads_note.startswith("assumed") else []
    notes += [fm.preprocess_note] if fm.preprocess_note else []
    qm = None
    if int8:
        asks_more = calib is not None or pp is not None or method != DEFAULT_METHOD or scheme is not None \
            or percentile != DEFAULT_PERCENTILE
        if fm.is_default and not asks_more:
            qm = load_quantized(default_int8_path())
            source = file_source("default", default_int8_path())
            notes.append("the embedded default's shipped quantized file")
        else:
            found = calib if calib is not None else (calib_fallback(fm.config) if calib_fallback else None)
            if found is None or len(found) == 0:
                raise ResolveError("quantizing needs calibration images: give --calib")
            if isinstance(found, tuple):      # (float batch (B, 3, H, W), what it is): e.g. a seed input
                batches, described = [found[0]], found[1]
            else:
                batches = calibration_batches(fm.preprocess, found, max_images)
                described = ", ".join(map(str, list(found)[:4])) + (" ..." if len(found) > 4 else "")
            qm = quantize(fm.params, fm.config, batches, head_mode=fm.head_mode, method=method,
                          percentile=percentile, rounding=rounding or SINGLE_ROUND, progress=progress,
                          source=described, preprocess=fm.preprocess.to_dict(), scheme=scheme)
            notes.append(f"quantized on the fly: {method} calibration on "
                         f"{'--calib' if calib is not None else described}")
        qm = _finish_int(qm, rounding, prune)
    return Resolved(fm.config, fm.head_mode, fm.preprocess, fm.class_names, source, float_model=fm, qm=qm,
                    notes=notes)


__all__ = ["DEFAULT_METHOD", "Resolved", "ResolveError", "resolve_model", "calibration_batches", "expand_images",
           "file_source", "PreprocessError"]
