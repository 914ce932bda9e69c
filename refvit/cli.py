"""Command line: `python -m refvit <command>`. One function pair per subcommand (add its arguments, run it)
and one registration list, COMMANDS; a new subcommand is a new pair and a new row. Every model comes from
refvit.resolve.resolve_model; every user error ends in one line `refvit: error: ...` and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import check, golden, int_model
from .checkpoints import CheckpointError
from .config import ConfigError
from .dumpfmt import FORMATS, DumpFormatError, check_formats
from .functional import softmax
from .graph import SCHEME_NOTES, SCHEMES, GraphError, resolve_scheme
from .intmath import ROUNDING_MODES
from .labels import DATA, default_model_info
from .preprocess import PRESETS, ImageError, PreprocessError
from .qfile import save_quantized
from .quantize import CALIBRATION_METHODS, DEFAULT_PERCENTILE, QuantizationError
from .resolve import DEFAULT_METHOD, Resolved, ResolveError, expand_images, resolve_model

EXAMPLES = DATA / "examples"
BATCH = 16  # images per forward pass: bounds memory for long image lists


class UsageError(ValueError):
    """A command line that asks for something impossible (e.g. --top 0)."""


USER_ERRORS = (UsageError, CheckpointError, ConfigError, ImageError, PreprocessError, QuantizationError, ResolveError,
               GraphError, DumpFormatError, check.CheckUsageError, OSError)  # one line, exit code 2


def default_model_note() -> str:
    card, c = default_model_info(), default_model_info()["config"]
    return (f"using the embedded default: DeiT (d{c['embed_dim']}, {c['depth']} layers) trained with timm on "
            f"{card['trained_on']}, test top-1 {100 * card['test_accuracy_float_timm']:.1f}%")


def progress_printer(what: str, quiet: bool = False):
    """A progress callback for long work: one overwritten line on a terminal, a line per step in a log."""
    if quiet:
        return None
    tty = sys.stderr.isatty()

    def show(n, total=None, unit="batch"):
        of = f"/{total}" if total else ""
        print(f"{chr(13) if tty else ''}{what}: {unit} {n}{of}", end="" if tty else "\n", file=sys.stderr, flush=True)
    return show


# ---------------------------------------------------------------- shared options

def add_model_args(p: argparse.ArgumentParser, *, quantized: bool = True, calib: bool = True) -> None:
    """--weights [--num-heads --arch] [--model] --preprocess [--calib --method --percentile --rounding]."""
    p.add_argument("--weights", metavar="FILE_OR_DIR",
                   help="float DeiT checkpoint: .safetensors / .pth / .bin (timm or Hugging Face names) or a "
                        "directory with model.safetensors [+ config.json]; default: the embedded Fashion-MNIST model")
    p.add_argument("--num-heads", type=int, metavar="N", help="attention heads of --weights (when no config says)")
    p.add_argument("--arch", metavar="NAME", help="timm DeiT name of --weights, e.g. deit_small_patch16_224")
    if quantized:
        p.add_argument("--model", metavar="Q", help="a quantized model file from `refvit quantize`")
    p.add_argument("--preprocess", metavar="NAME_OR_JSON",
                   help=f"input pipeline: {' | '.join(PRESETS)} | FILE.json (docs/preprocessing.md); default: "
                        "recorded in --model, the checkpoint's pretrained_cfg, else imagenet (fmnist for the "
                        "embedded model)")
    p.add_argument("--prune", metavar="BLOCK:KEEP[,...]",
                   help="token pruning (EViT / HeatViT selector): in each BLOCK (from 0), after its attention, keep "
                        "ceil(KEEP * patches) patch tokens most attended by the class token and fold the rest into "
                        "one package token, e.g. 1:0.7,3:0.7,5:0.7; 'none' drops a --model's recorded pruning")
    if calib:
        p.add_argument("--calib", nargs="+", metavar="IMG_OR_DIR",
                       help="calibration images (files, folders, or a Fashion-MNIST .npz) for quantizing --weights")
        p.add_argument("--method", choices=CALIBRATION_METHODS, default=DEFAULT_METHOD,
                       help=f"activation range calibration (default: {DEFAULT_METHOD})")
        p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                       help=f"the percentile for --method percentile (default {DEFAULT_PERCENTILE})")
        p.add_argument("--rounding", choices=ROUNDING_MODES,
                       help="requantization rounding: TOSA SINGLE_ROUND (default) or gemmlowp DOUBLE_ROUND")
        p.add_argument("--scheme", metavar="NAME_OR_JSON",
                       help=f"integer scheme for quantizing: {' | '.join(SCHEMES)} | FILE.json (see `refvit schemes`; "
                            "default refvit-int8)")


def _check_model_args(args) -> None:
    if getattr(args, "num_heads", None) is not None and args.num_heads < 1:
        raise UsageError(f"--num-heads must be at least 1, got {args.num_heads}")
    if hasattr(args, "percentile") and not 0 < args.percentile <= 100:
        raise UsageError(f"--percentile must be in (0, 100], got {args.percentile}")
    if getattr(args, "model", None) and (args.num_heads is not None or args.arch):
        raise UsageError("--num-heads and --arch describe --weights; a quantized --model carries its config")


def resolve_from_args(args, *, int8: bool, form: str = "conv", calib_fallback=None, progress=None,
                      max_images: int = 512) -> Resolved:
    _check_model_args(args)
    return resolve_model(weights=args.weights, model=getattr(args, "model", None), int8=int8, form=form,
                         preprocess=args.preprocess, num_heads=args.num_heads, arch=args.arch,
                         calib=getattr(args, "calib", None), calib_fallback=calib_fallback,
                         method=getattr(args, "method", DEFAULT_METHOD),
                         percentile=getattr(args, "percentile", DEFAULT_PERCENTILE),
                         rounding=getattr(args, "rounding", None), max_images=max_images, progress=progress,
                         scheme=resolve_scheme(args.scheme) if getattr(args, "scheme", None) else None,
                         prune=getattr(args, "prune", None))


def describe(r: Resolved) -> dict:
    out = {"source": r.source, "head_mode": r.head_mode, "config": r.config.to_dict(),
           "preprocess": r.preprocess.to_dict(), "notes": r.notes}
    if r.float_model is not None:
        out |= {"naming": r.float_model.source, "form": r.float_model.form, "heads": r.float_model.heads_note}
    if r.qm is not None:
        out["int8"] = r.qm.metadata()
    return out


# ---------------------------------------------------------------- classify

def add_classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMG",
                   help="image files; with neither IMG nor --weights, the bundled Fashion-MNIST examples")
    add_model_args(p)
    p.add_argument("--form", choices=("token", "conv"), default="token",
                   help="float model: token form (B, N, C) or NCHW-conv form (B, C, 1, N); same numbers")
    p.add_argument("--int8", action="store_true",
                   help="run the integer model: the embedded default's quantized file, or --weights quantized "
                        "on the fly (calibrated on --calib, else on the images themselves); implied by --model")
    p.add_argument("--top", type=int, default=5, metavar="K", help="how many classes to show (default: 5)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def top_k(probs: np.ndarray, k: int, names: list) -> list:
    order = np.argsort(-probs, kind="stable")[:k]  # stable: ties keep the lower index first, as argmax
    return [{"index": int(i), "name": names[i], "probability": float(probs[i])} for i in order]


def classify_images(r: Resolved, images: list, k: int, int8: bool) -> list:
    """[{'image': path, 'top': [{'index', 'name', 'probability'}...]}...], batch by batch; int8: the logits
    are the integer model's (int16 times their scale)."""
    results = []
    for start in range(0, len(images), BATCH):
        paths = images[start:start + BATCH]
        x = r.images(paths)                                                         # (B, 3, H, W)
        if int8:
            li, scale = int_model.logits_int8_model(r.qm, x)
            logits = li * scale
        else:
            logits = r.float_model.logits(x).astype(np.float64)
        if not np.all(np.isfinite(logits)):
            raise UsageError(f"the model's logits are not finite for {paths[0]}...: its weights overflow float32 "
                             f"in the forward pass")
        probs = softmax(logits, axis=-1)
        results += [{"image": str(p), "top": top_k(pr, k, r.class_names)} for p, pr in zip(paths, probs)]
    return results


def run_classify(args) -> int:
    """classify images: top-K classes with their probabilities (softmax of the logits)"""
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    images = expand_images(args.images)
    if not images:
        if args.weights is not None or args.model is not None:
            raise UsageError("no images given (the bundled examples go with the embedded default model only)")
        images = sorted(EXAMPLES.glob("*.png"))
    int8 = args.int8 or args.model is not None
    if args.calib and not int8:
        raise UsageError("--calib calibrates the integer model: add --int8")
    r = resolve_from_args(args, int8=int8, form=args.form, calib_fallback=lambda cfg: images)
    if r.is_default:  # say so: a user who forgot --weights must not mistake these for ImageNet classes
        print(default_model_note() + (" (INT8)" if int8 else ""), file=sys.stderr if args.json else sys.stdout)
    if not args.json:  # what was assumed or done: the header (with --json: in the JSON)
        for note in r.notes:
            print(f"note: {note}")
    results = classify_images(r, images, min(args.top, len(r.class_names)), int8)
    if args.json:
        print(json.dumps({"model": describe(r), "results": results}, indent=1))
    else:
        for res in results:
            print(res["image"])
            for rank, t in enumerate(res["top"], 1):
                print(f"  {rank}. {100 * t['probability']:6.2f}%  {t['index']:4d}  {t['name']}")
    return 0


# ---------------------------------------------------------------- quantize

def add_quantize_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, quantized=False)
    p.set_defaults(calib=None)
    p.add_argument("--out", required=True, metavar="Q.safetensors", help="the quantized model file to write")
    p.add_argument("--max-images", type=int, default=512, metavar="N",
                   help="use at most N calibration images (default 512)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run_quantize(args) -> int:
    """quantize a float checkpoint to an integer model file, calibrating activations on real images"""
    if args.max_images < 1:
        raise UsageError(f"--max-images must be at least 1, got {args.max_images}")
    if not args.calib:
        raise UsageError("--calib is required: calibration images, folders, or a Fashion-MNIST .npz")
    show = progress_printer("calibrating", args.quiet)
    r = resolve_from_args(args, int8=True, progress=show, max_images=args.max_images)
    if show and sys.stderr.isatty():
        print(file=sys.stderr)
    write_atomically(args.out, lambda tmp: save_quantized(r.qm, tmp))
    cal = r.qm.calibration
    print(f"wrote {args.out}: {sum(np.asarray(v).size for v in r.qm.tensors.values()):,} constants in "
          f"{len(r.qm.tensors)} tensors; {cal['method']} calibration on {cal.get('images', '?')} images; "
          f"rounding {r.qm.rounding}; preprocessing {r.preprocess.name}")
    return 0


def write_atomically(target, write) -> None:
    """write(tmp_path) beside the target, then rename over it; only a regular file (or nothing) is replaced."""
    target = Path(target)
    if target.exists() and not target.is_file():
        raise UsageError(f"--out {target} exists and is not a regular file; refusing to replace it")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise UsageError(f"--out {target}: cannot write into {target.parent} (missing or not writable)")
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------- info

def add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", metavar="FILE_OR_DIR",
                   help="DeiT checkpoint (float, or a quantized file); default: the embedded model")
    p.add_argument("--num-heads", type=int, metavar="N", help="attention heads (when no config says)")
    p.add_argument("--arch", metavar="NAME", help="timm DeiT name, e.g. deit_small_patch16_224")
    p.add_argument("--preprocess", metavar="NAME_OR_JSON", help="input pipeline to report (see classify)")


def run_info(args) -> int:
    """describe a checkpoint: config, head mode, naming, heads, preprocessing, parameter count"""
    from .qfile import is_quantized_file
    quantized = args.checkpoint is not None and is_quantized_file(args.checkpoint)
    args.weights, args.model = (None, args.checkpoint) if quantized else (args.checkpoint, None)
    r = resolve_from_args(args, int8=False, form="token")
    c = r.config
    print(f"file:        {r.source['path']}" + ("  (embedded default)" if r.is_default else ""))
    if r.float_model is not None:
        fm = r.float_model
        print(f"naming:      {fm.source} ({'timm' if fm.source == 'timm' else 'Hugging Face'} parameter names)")
        print(f"parameters:  {sum(a.size for a in fm.params.values()):,} in {len(fm.params)} tensors")
        if fm.heads_note:
            print(f"heads:       {fm.heads_note}")
    else:
        q = r.qm
        print(f"quantized:   {q.scheme.name}, rounding {q.rounding}, {len(q.graph)} ops, "
              f"{sum(np.asarray(v).size for v in q.tensors.values()):,} constants; calibration {q.calibration.get('method')}")
    print(f"head mode:   {r.head_mode} "
          f"({'mean of head(cls) and head_dist(dist)' if r.head_mode == 'mean' else 'head(cls)'})")
    pp = r.preprocess
    print(f"preprocess:  {pp.name}: " + ", ".join(f"{k} {v}" for k, v in pp.to_dict().items() if k != "name"))
    print("config:")
    for name, value in c.to_dict().items():
        print(f"  {name:12} {value}")
    print(f"  {'tokens':12} {c.num_tokens} ({c.num_patches} patches of {c.patch_size}x{c.patch_size} "
          f"+ {c.num_prefix_tokens} prefix), head_dim {c.head_dim}, mlp hidden {c.hidden_dim}")
    return 0


# ---------------------------------------------------------------- golden

def add_golden_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    inp = p.add_mutually_exclusive_group()
    inp.add_argument("--image", nargs="+", metavar="IMG", help="input image(s), one batch, preprocessed as the model "
                     "expects")
    inp.add_argument("--seed", type=int, metavar="S", help=f"synthetic int8 input: {golden.SEED_GENERATOR}")
    p.add_argument("--batch", type=int, metavar="B", help="batch size of a --seed input (default 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--formats", default="npy", help=f"comma-separated subset of {','.join(FORMATS)} (npy always)")


def run_golden(args) -> int:
    """dump every intermediate integer tensor and constant of one forward pass (golden vectors)"""
    t0 = time.perf_counter()
    formats = check_formats(f for f in args.formats.split(",") if f)
    if args.batch is not None and args.image:
        raise UsageError("--batch sizes a --seed input; with --image the batch is the number of images")
    batch = 1 if args.batch is None else args.batch
    if batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}")
    seed = 0 if args.seed is None else args.seed

    def seed_calibration(cfg):  # a seed has no float image: read its int8 values as the float range of images
        x = golden.seed_input(seed, (batch, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32) / 64
        return x, "the seed input itself read as float int8/64 (no --calib given)"
    r = resolve_from_args(args, int8=True, calib_fallback=(lambda cfg: args.image) if args.image else seed_calibration)
    cfg = r.config
    if args.image:
        xq = int_model.quantize_input(r.qm, r.images(args.image))
        input_source = {"kind": "image", "files": [golden_file(p) for p in args.image]}
    else:
        xq = golden.seed_input(seed, (batch, cfg.in_chans, cfg.img_size, cfg.img_size))
        input_source = {"kind": "seed", "seed": seed, "generator": golden.SEED_GENERATOR, "shape": list(xq.shape)}
    manifest = golden.write_golden(r.qm, xq, args.out, formats, input_source, r.source,
                                   r.preprocess.to_dict() if args.image else None)
    print(f"wrote {len(manifest['tensors'])} tensors ({len(manifest['ops'])} ops) and {len(manifest['constants'])} "
          f"constants as {','.join(formats)} to {args.out} in {time.perf_counter() - t0:.1f} s")
    print(f"input sha256 (int8 bytes): {manifest['input']['sha256_int8']}; rounding {r.qm.rounding}")
    logits = np.asarray(manifest["output"]["logits"] or [])
    for b, row in enumerate(logits[:4]):
        top = np.argsort(-row, kind="stable")[:5]
        print(f"image {b}: top-5 classes {top.tolist()} (int16 logits {row[top].tolist()}, "
              f"scale {manifest['output']['scale']:.6g})")
    return 0


def golden_file(path) -> dict:
    from .resolve import file_source
    src = file_source("image", path)
    return {"path": src["path"], "sha256": src["sha256"]}


# ---------------------------------------------------------------- check

def add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("golden_dir", metavar="GOLDEN_DIR", help="folder written by `refvit golden`")
    p.add_argument("actual_dir", metavar="ACTUAL_DIR", help="the device's dumps (npy/hex/bin, flat or in tensors/)")


def run_check(args) -> int:
    """compare a device's tensor dumps with a golden dump: first divergent op and element (exit 1 if any differ)"""
    report = check.compare_dumps(args.golden_dir, args.actual_dir)
    print(report.format())
    return 0 if report.ok else 1


# ---------------------------------------------------------------- eval

def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="an ImageFolder tree, a folder with labels.json/.txt/.csv, or a "
                   "Fashion-MNIST .npz (images, labels)")
    add_model_args(p)
    p.add_argument("--int8", action="store_true", help="also run the integer model (implied by --model)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="local worker processes (default 1)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on a Dask distributed cluster (pip install "
                   "'refvit[dask]'), e.g. tcp://10.0.0.1:8786")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run_eval(args) -> int:
    """evaluate a data set: float and integer top-1 and their agreement, streamed, on local or Dask workers"""
    from .evaluate import evaluate, open_dataset
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.scheduler and args.workers != 1:
        raise UsageError("--workers is for local processes; a --scheduler cluster has its own workers")
    data = open_dataset(args.data, args.limit)
    r = resolve_from_args(args, int8=args.int8 or args.model is not None, form="token")
    if int(data.labels.max(initial=0)) >= r.config.num_classes or int(data.labels.min(initial=0)) < 0:
        raise UsageError(f"{args.data}: labels run up to {int(data.labels.max())}, the model has "
                         f"{r.config.num_classes} classes")
    show = progress_printer(f"evaluating {len(data)} images", args.quiet)
    res = evaluate(r, data, workers=args.workers, scheduler=args.scheduler, progress=show)
    if show and sys.stderr.isatty():
        print(file=sys.stderr)
    res["model"] = {"source": r.source, "notes": r.notes,
                    "int8": r.qm.metadata() if r.qm is not None else None}
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    pct = (lambda v: "-" if v is None else f"{100 * v:.2f}%")
    print(f"{res['images']} images of {args.data} ({res['dataset']['kind']}) in {res['seconds']} s")
    print(f"float top-1 {pct(res['float_top1'])}   integer top-1 {pct(res['int_top1'])}   "
          f"agreement {pct(res['agreement'])}")
    if res.get("int_predictions_sha256"):
        print(f"integer predictions sha256 {res['int_predictions_sha256']}")
    return 0


# ---------------------------------------------------------------- schemes

def add_schemes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="a JSON list of objects: name, choices, note")


def run_schemes(args) -> int:
    """list the named integer schemes and what each one chooses"""
    rows = [{"name": name, **{k: v for k, v in sc.to_dict().items() if k != "name"}, "note": SCHEME_NOTES[name]}
            for name, sc in SCHEMES.items()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    keys = ("conv", "layernorm", "softmax", "gelu", "residual")
    print(f"{'name':16}" + "".join(f"{k:11}" for k in keys) + "note")
    for r in rows:
        extra = (f" (pot_fraction {r['pot_fraction']})" if r["conv"] == "mixed-pot" else "") + \
                (f" (gelu_delta {r['gelu_delta']})" if r["gelu_delta"] != 1.0 else "")
        print(f"{r['name']:16}" + "".join(f"{r[k]:11}" for k in keys) + r["note"] + extra)
    print("\nA JSON file with these keys (any subset; the rest default to refvit-int8's) is a scheme too: "
          "quantize --scheme my_scheme.json")
    return 0


# ---------------------------------------------------------------- registration and entry point

COMMANDS = [  # (name, add its arguments, run it); the run function's docstring is the help line
    ("classify", add_classify_args, run_classify),
    ("info", add_info_args, run_info),
    ("quantize", add_quantize_args, run_quantize),
    ("golden", add_golden_args, run_golden),
    ("check", add_check_args, run_check),
    ("eval", add_eval_args, run_eval),
    ("schemes", add_schemes_args, run_schemes),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refvit", description="Golden NumPy reference of DeiT (float and integer).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add_args, run in COMMANDS:
        help_line = run.__doc__.strip()
        p = sub.add_parser(name, help=help_line, description=help_line[0].upper() + help_line[1:] + ".")
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and its message; --help exits 0
        return e.code
    try:
        return args.run(args)
    except BrokenPipeError:  # `refvit classify | head`: the reader left; end quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except USER_ERRORS as e:
        print(f"refvit: error: {e}", file=sys.stderr)
        return 2
