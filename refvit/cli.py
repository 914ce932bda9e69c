"""Command line: `python -m refvit <command>`. One function pair per subcommand (add its arguments, run it)
and one registration list, COMMANDS; a new subcommand is a new pair and a new row."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from refvit.checkpoints import CheckpointError

from . import check, golden, int_model
from .config import ConfigError
from .functional import softmax
from .intmath import ROUNDING_MODES, SINGLE_ROUND
from .labels import DATA, default_model_info
from .models import FORMS, Model, calibration_batches, default_int8_path, load_model, model_for_quantized
from .preprocess import ImageError, open_image
from .quantize import CALIBRATION_METHODS, DEFAULT_PERCENTILE, QuantizationError, QuantizedModel, quantize

EXAMPLES = DATA / "examples"
BATCH = 16  # images per forward pass: bounds memory for long image lists
USER_ERRORS = (CheckpointError, ConfigError, ImageError, QuantizationError, OSError)  # reported in one line, exit code 2


class UsageError(ValueError):
    """A command line that asks for something impossible (e.g. --top 0)."""


def default_model_note() -> str:
    card, c = default_model_info(), default_model_info()["config"]
    return (f"using the embedded default: DeiT (d{c['embed_dim']}, {c['depth']} layers) trained with timm on "
            f"{card['trained_on']}, test top-1 {100 * card['test_accuracy_float_timm']:.1f}%")


def describe(model: Model) -> dict:
    return {"path": str(model.path), "naming": model.source, "head_mode": model.head_mode, "form": model.form,
            "embedded_default": model.is_default, "config": model.config.to_dict()}


# ---------------------------------------------------------------- classify

def add_classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMG",
                   help="image files; with neither IMG nor --weights, the bundled Fashion-MNIST examples")
    p.add_argument("--weights", metavar="FILE_OR_DIR",
                   help="DeiT .safetensors (timm or Hugging Face names), or a directory with model.safetensors "
                        "[+ config.json]; default: the embedded Fashion-MNIST model")
    p.add_argument("--form", choices=sorted(FORMS), default="token",
                   help="token form (B, N, C) or NCHW-conv form (B, C, 1, N); same numbers (default: token)")
    p.add_argument("--top", type=int, default=5, metavar="K", help="how many classes to show (default: 5)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.add_argument("--int8", action="store_true",
                   help="run the integer (INT8) model: the embedded default's quantized file, --model Q, or "
                        "--weights quantized on the fly (calibrated on --calib, else on the images themselves)")
    p.add_argument("--model", metavar="Q", help="a quantized model file from `refvit quantize` (implies --int8)")
    p.add_argument("--calib", nargs="+", metavar="IMG_OR_DIR",
                   help="calibration images for --int8 --weights (default: the images being classified)")


def top_k(probs: np.ndarray, k: int, names: list) -> list:
    order = np.argsort(-probs, kind="stable")[:k]  # stable: ties keep the lower index first, as argmax
    return [{"index": int(i), "name": names[i], "probability": float(probs[i])} for i in order]


def classify_images(model: Model, images: list, k: int, qm: QuantizedModel | None = None) -> list:
    """[{'image': path, 'top': [{'index', 'name', 'probability'}...]}...], batch by batch; with `qm`, the
    logits are the integer model's (int16 times their scale)."""
    results = []
    for start in range(0, len(images), BATCH):
        paths = images[start:start + BATCH]
        x = np.stack([model.preprocess(open_image(p)) for p in paths])
        if qm is None:
            logits = model.logits(x).astype(np.float64)
        else:
            li, scale = int_model.logits_int8_model(qm, x)
            logits = li * scale
        probs = softmax(logits, axis=-1)
        results += [{"image": str(p), "top": top_k(pr, k, model.class_names)} for p, pr in zip(paths, probs)]
    return results


def print_classification(results: list) -> None:
    for r in results:
        print(r["image"])
        for rank, t in enumerate(r["top"], 1):
            print(f"  {rank}. {100 * t['probability']:6.2f}%  {t['index']:4d}  {t['name']}")


def run_classify(args) -> int:
    """classify images: top-K classes with their probabilities (softmax of the logits)"""
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    images = args.images
    if not images:
        if args.weights is not None:
            raise UsageError("no images given (the bundled examples go with the embedded default model only)")
        images = sorted(EXAMPLES.glob("*.png"))
    if args.model and args.weights:
        raise UsageError("give --weights (float, quantized on the fly) or --model (quantized), not both")
    if args.model:  # a quantized file alone: config, pipeline and rounding are in it
        from refvit.qfile import load_quantized
        qm = load_quantized(args.model)
        model = model_for_quantized(qm, args.model)
    else:
        model = load_model(args.weights, form="conv" if args.int8 else args.form)
        qm = int8_model(model, args, images) if args.int8 else None
    if model.is_default:  # say so: a user who forgot --weights must not mistake these for ImageNet classes
        print(default_model_note() + (" (INT8)" if qm else ""), file=sys.stderr if args.json else sys.stdout)
    results = classify_images(model, images, min(args.top, len(model.class_names)), qm)
    if args.json:
        about = describe(model)
        if qm is not None:
            about["int8"] = qm.metadata()
        print(json.dumps({"model": about, "results": results}, indent=1))
    else:
        print_classification(results)
    return 0


def int8_model(model: Model, args, images: list) -> QuantizedModel:
    """The quantized model `classify --int8` runs: the embedded default's file, or --weights quantized now."""
    from refvit.qfile import load_quantized
    if model.is_default:
        return load_quantized(default_int8_path())
    calib = args.calib or images
    print(f"quantizing {model.path.name} on the fly, calibrated on {len(calib)} "
          f"{'--calib path(s)' if args.calib else 'of the images to classify'}", file=sys.stderr)
    return quantize(model.params, model.config, calibration_batches(model, calib), head_mode=model.head_mode,
                    method="percentile", source="on the fly: " + ", ".join(map(str, calib[:4])))


# ---------------------------------------------------------------- quantize

def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="FILE_OR_DIR", help="float DeiT checkpoint; default: the embedded model")
    p.add_argument("--calib", nargs="+", required=True, metavar="DIR_OR_FILES",
                   help="calibration images: files, folders of images, or (embedded model) a .npz with 'images' "
                        "uint8 (N, 28, 28) such as ../shared/data/fmnist_test.npz")
    p.add_argument("--out", required=True, metavar="Q.safetensors", help="the quantized model file to write")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="percentile",
                   help="activation range: 'max' |x| or the mean per-batch 'percentile' of |x| (default)")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                   help=f"the percentile for --method percentile (default {DEFAULT_PERCENTILE})")
    p.add_argument("--rounding", choices=ROUNDING_MODES, default=SINGLE_ROUND,
                   help="requantization rounding: TOSA SINGLE_ROUND (default) or gemmlowp DOUBLE_ROUND")
    p.add_argument("--max-images", type=int, default=512, metavar="N",
                   help="use at most N calibration images (default 512)")


def run_quantize(args) -> int:
    """quantize a float checkpoint to an INT8 model file, calibrating activations on real images"""
    from refvit.qfile import save_quantized
    if args.max_images < 1:
        raise UsageError(f"--max-images must be at least 1, got {args.max_images}")
    if not 0 < args.percentile <= 100:
        raise UsageError(f"--percentile must be in (0, 100], got {args.percentile}")
    model = load_model(args.weights, form="conv")
    seen = []

    def progress(n):
        tty = sys.stderr.isatty()  # overwrite one line on a terminal, one line per batch in a log
        print(f"{chr(13) if tty else ''}calibrating: batch {n} ({sum(seen)} images)", end="" if tty else "\n",
              file=sys.stderr, flush=True)

    def counted(batches):
        for x in batches:
            seen.append(len(x))
            yield x

    source = f"{', '.join(map(str, args.calib))} (at most {args.max_images} images)"
    qm = quantize(model.params, model.config, counted(calibration_batches(model, args.calib, args.max_images)),
                  head_mode=model.head_mode, method=args.method, percentile=args.percentile,
                  rounding=args.rounding, progress=progress, source=source,
                  preprocess="fmnist" if model.is_default else "timm")
    if sys.stderr.isatty():
        print(file=sys.stderr)
    qm.calibration["images"] = sum(seen)
    save_quantized(qm, args.out)
    print(f"wrote {args.out}: {sum(np.asarray(v).size for v in qm.tensors.values()):,} constants in "
          f"{len(qm.tensors)} tensors; {args.method} calibration on {sum(seen)} images; rounding {args.rounding}")
    return 0


# ---------------------------------------------------------------- info

def add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", nargs="?", metavar="FILE_OR_DIR",
                   help="DeiT .safetensors or a directory with model.safetensors [+ config.json]; "
                        "default: the embedded model")


def run_info(args) -> int:
    """describe a checkpoint: inferred config, head mode, naming, parameter count"""
    model = load_model(args.weights)
    c = model.config
    print(f"file:        {model.path}" + ("  (embedded default)" if model.is_default else ""))
    print(f"naming:      {model.source} ({'timm' if model.source == 'timm' else 'Hugging Face'} parameter names)")
    print(f"head mode:   {model.head_mode} "
          f"({'mean of head(cls) and head_dist(dist)' if model.head_mode == 'mean' else 'head(cls)'})")
    print(f"parameters:  {sum(a.size for a in model.params.values()):,} in {len(model.params)} tensors")
    print("config:")
    for name, value in c.to_dict().items():
        print(f"  {name:12} {value}")
    print(f"  {'tokens':12} {c.num_tokens} ({c.num_patches} patches of {c.patch_size}x{c.patch_size} "
          f"+ {c.num_prefix_tokens} prefix), head_dim {c.head_dim}, mlp hidden {c.hidden_dim}")
    return 0


# ---------------------------------------------------------------- registration and entry point

COMMANDS = [  # (name, add its arguments, run it); the run function's docstring is the help line
    ("classify", add_classify_args, run_classify),
    ("info", add_info_args, run_info),
    ("quantize", add_quantize_args, run_quantize),
]
REGISTERED = [golden.register, check.register]  # subcommands that build their own parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refvit", description="Golden NumPy reference of DeiT (float and INT8).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add_args, run in COMMANDS:
        help_line = run.__doc__.strip()
        p = sub.add_parser(name, help=help_line, description=help_line[0].upper() + help_line[1:] + ".")
        add_args(p)
        p.set_defaults(run=run)
    for register in REGISTERED:
        register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and its message; --help exits 0
        return e.code
    try:
        return args.run(args)
    except (UsageError, *USER_ERRORS) as e:
        print(f"refvit: error: {e}", file=sys.stderr)
        return 2
