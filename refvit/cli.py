"""Command line: `python -m refvit <command>`. One function pair per subcommand (add its arguments, run it)
and one registration list, COMMANDS; a new subcommand is a new pair and a new row. Every model comes from
refvit.resolve.resolve_model; every user error ends in one line `refvit: error: ...` and exit code 2."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import refvit

from . import check, golden, int_model, parallel, registry as R, report
from .errors import RefvitError, UsageError
from .outfiles import current_umask, write_atomically, write_folder_atomically
from .dumpfmt import FORMATS, check_formats, file_sha256
from .evaluate import check_classes, evaluate, open_dataset
from .export_tosa import OUTPUTS, export_tosa
from .functional import softmax
from .graph import KERNEL_SETS, PARAMETERS, SCHEME_NOTES, SCHEMES, input_dtype, resolve_scheme, select_ops
from .intmath import ROUNDING_MODES
from .labels import DATA, default_model_info
from .models import load_model
from .preprocess import PRESETS
from .qfile import is_quantized_file, save_quantized
from .quantize import CALIBRATION_METHODS, DEFAULT_PERCENTILE
from .resolve import DEFAULT_METHOD, Resolved, calibration_batches, expand_images, file_source, resolve_model

EXAMPLES = DATA / "examples"
BATCH = 16  # images per forward pass: bounds memory for long image lists


USER_ERRORS = (RefvitError, OSError)   # one line `refvit: error: ...`, exit code 2 (refvit.errors)


def default_model_note() -> str:
    card, c = default_model_info(), default_model_info()["config"]
    return (f"using the embedded default: DeiT (d{c['embed_dim']}, {c['depth']} layers) trained with timm on "
            f"{card['trained_on']}, test top-1 {100 * card['test_accuracy_float_timm']:.1f}%")


def progress_bar(n: int, total: int | None, width: int = 24) -> str:
    """'[#########...............] ' for n of total steps ('' when the total is unknown)."""
    if not total:
        return ""
    done = min(width, width * n // total)
    return "[" + "#" * done + "." * (width - done) + "] "


def progress_printer(what: str, quiet: bool = False):
    """A progress callback for long work: a bar redrawn in place on a terminal, a plain line per step in a log."""
    if quiet:
        return None
    tty = sys.stderr.isatty()

    def show(n, total=None, unit="batch"):
        of = f"/{total}" if total else ""
        line = f"\r{what}: {progress_bar(n, total)}{unit} {n}{of}" if tty else f"{what}: {unit} {n}{of}\n"
        print(line, end="", file=sys.stderr, flush=True)
    return show


# ---------------------------------------------------------------- shared options

def add_model_args(p: argparse.ArgumentParser, *, quantized: bool = True, calib: bool = True) -> None:
    """--weights [--num-heads --arch] [--model] --preprocess [--calib --method --percentile --rounding]."""
    p.add_argument("--weights", metavar="FILE_OR_DIR",
                   help="float DeiT checkpoint: .safetensors / .pth / .bin (timm or Hugging Face names) or a "
                        "directory with model.safetensors [+ config.json]; default: the embedded Fashion-MNIST model")
    p.add_argument("--num-heads", type=int, metavar="N", help="attention heads of --weights (when no config says)")
    p.add_argument("--arch", metavar="NAME", help="timm architecture of --weights (DeiT, DeiT-III or ViT), e.g. "
                   "deit_small_patch16_224, deit3_small_patch16_224, vit_small_patch16_224")
    if quantized:
        p.add_argument("--model", metavar="Q", help="a quantized model file from `refvit quantize`")
    p.add_argument("--preprocess", metavar="NAME_OR_JSON",
                   help=f"input pipeline: {' | '.join(PRESETS)} | FILE.json (docs/preprocessing.md); default: "
                        "recorded in --model, the checkpoint's pretrained_cfg, else imagenet (fmnist for the "
                        "embedded model)")
    p.add_argument("--prune", metavar="BLOCK:KEEP[,...][,order=O][,package=P]",
                   help="token pruning (EViT / HeatViT selector): in each BLOCK (from 0), after its attention, keep "
                        "ceil(KEEP * patches) patch tokens most attended by the class token and fold the rest into "
                        "one package token, e.g. 1:0.7,3:0.7,5:0.7; order=position (default) | score (EViT's code) "
                        "orders the kept tokens, package=mean (default, HeatViT) | weighted-sum (EViT's code) "
                        "makes the package token; 'none' drops a --model's recorded pruning")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for BLAS and the elementwise passes (same results at any count; default: "
                        "$REFVIT_THREADS, else the BLAS thread count, e.g. $OPENBLAS_NUM_THREADS, else every core)")
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
    r = resolve_model(weights=args.weights, model=getattr(args, "model", None), int8=int8, form=form,
                         preprocess=args.preprocess, num_heads=args.num_heads, arch=args.arch,
                         calib=getattr(args, "calib", None), calib_fallback=calib_fallback,
                         method=getattr(args, "method", DEFAULT_METHOD),
                         percentile=getattr(args, "percentile", DEFAULT_PERCENTILE),
                         rounding=getattr(args, "rounding", None), max_images=max_images, progress=progress,
                         scheme=resolve_scheme(args.scheme) if getattr(args, "scheme", None) else None,
                         prune=getattr(args, "prune", None))
    return replace(r, kernels=getattr(args, "kernels", "fast"))


def add_kernels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", choices=tuple(KERNEL_SETS), default="fast",
                   help="integer kernels: fast (default) or reference (refvit.reference, the spec's plain "
                        "pseudocode as code: the same bits, slower)")


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
    add_kernels_arg(p)


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
            li, scale = int_model.logits_int8_model(r.qm, x, kernels=r.kernels)
            logits = li * scale
        else:
            logits = r.float_model.logits(x).astype(np.float64)
        if not np.all(np.isfinite(logits)):
            raise UsageError(f"the model's logits are not finite for {paths[0]}...: its weights overflow float32 "
                             f"in the forward pass")
        probs = softmax(logits, axis=-1)
        results += [{"image": str(p), "top": top_k(pr, k, r.class_names)} for p, pr in zip(paths, probs)]
    return results


def images_or_examples(args) -> list:
    """The images named on the command line (files and folders, expand_images), or, when none is named at all,
    the bundled examples -- for the embedded default model only. A named folder without images is an error,
    never a reason to fall back to the examples."""
    if args.images:
        return expand_images(args.images)
    if args.weights is not None or args.model is not None:
        raise UsageError("no images given (the bundled examples go with the embedded default model only)")
    return sorted(EXAMPLES.glob("*.png"))


def run_classify(args) -> int:
    """classify images: top-K classes with their probabilities (softmax of the logits)"""
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    images = images_or_examples(args)
    int8 = args.int8 or args.model is not None
    if args.calib and not int8:
        raise UsageError("--calib calibrates the integer model: add --int8")
    r = resolve_from_args(args, int8=int8, form=args.form, calib_fallback=lambda cfg: images)
    if _quantized_on_the_fly(r):
        calib = args.calib or images
        warn_saturation(r.qm, next(iter(calibration_batches(r.preprocess, calib, BATCH))), r.qm.calibration["images"])
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
    qm = replace(r.qm, calibration=r.qm.calibration | {"source": calibration_record(args.calib, args.max_images),
                                                       "float_checkpoint": checkpoint_record(r)})
    write_atomically(args.out, lambda tmp: save_quantized(qm, tmp))
    warn_saturation(qm, next(iter(calibration_batches(r.preprocess, args.calib, BATCH))), r.qm.calibration["images"])
    cal = qm.calibration
    print(f"wrote {args.out}: {sum(np.asarray(v).size for v in qm.tensors.values()):,} constants in "
          f"{len(qm.tensors)} tensors; {cal['method']} calibration on {cal.get('images', '?')} images; "
          f"scheme {qm.scheme.name}; rounding {qm.rounding}; preprocessing {r.preprocess.name}")
    return 0


def warn_saturation(qm, x, calibrated_on) -> None:
    """One line on stderr when the integer logits reach their dtype's limit on calibration images x (B, 3, H, W)."""
    sat = report.output_saturation(qm, x)
    if sat:
        print(report.saturation_warning(sat, calibrated_on), file=sys.stderr)


def _quantized_on_the_fly(r: Resolved) -> bool:
    return r.qm is not None and any(n.startswith("quantized on the fly") for n in r.notes)


def checkpoint_record(r: Resolved) -> dict:
    """What a quantized file records of the float checkpoint it came from: its file name and sha256
    (`report` / `golden --float` refuse other --weights)."""
    return {"name": Path(r.source["path"]).name, "sha256": r.source["sha256"]}


def calibration_record(paths, limit: int) -> list:
    """The calibration data, by name and content rather than by a path on this machine, in the order
    calibration_batches reads it (.npz sets first, then image files and folders, `limit` images in all): per
    --calib entry {name, images (how many were read from it), sha256}: a file hashed whole; a folder by the
    images read from it, sha256 over the lines '<path inside the folder>\\0<file sha256>\\n'."""
    out, left = [], limit
    paths = sorted(map(Path, paths), key=lambda p: p.suffix != ".npz")          # stable: npz first, order kept
    for p in paths:
        if p.is_dir():
            files = expand_images([p])[:left]
            h = hashlib.sha256()
            for f in files:
                h.update(f"{f.relative_to(p).as_posix()}\0{file_sha256(f)}\n".encode())
            out.append({"name": p.name, "images": len(files), "sha256": h.hexdigest(),
                        "sha256_of": "lines '<path inside the folder>\\0<sha256 of the file>\\n', in order"})
            left -= len(files)
            continue
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                used = min(left, len(z["images"]))
        else:
            used = min(left, 1)
        out.append({"name": p.name, "images": used, "sha256": file_sha256(p)})
        left -= used
    return out


# ---------------------------------------------------------------- info

def add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", metavar="FILE_OR_DIR",
                   help="DeiT checkpoint (float, or a quantized file); default: the embedded model")
    p.add_argument("--num-heads", type=int, metavar="N", help="attention heads (when no config says)")
    p.add_argument("--arch", metavar="NAME", help="timm architecture (DeiT, DeiT-III or ViT), e.g. "
                   "deit3_small_patch16_224")
    p.add_argument("--preprocess", metavar="NAME_OR_JSON", help="input pipeline to report (see classify)")
    p.add_argument("--docs", action="store_true", help="print the folder of refvit's docs (spec.md, golden-format.md, "
                   "...; shipped with the package) and its files, and nothing else")


def print_docs() -> int:
    folder = refvit.docs_dir()
    if folder is None:
        raise UsageError("refvit's docs are not installed with this copy of the package (they ship in the wheel as "
                         "refvit/docs)")
    print(folder)
    for f in sorted(folder.glob("*.md")):
        print(f"  {f.name}")
    return 0


def run_info(args) -> int:
    """describe a checkpoint: config, head mode, naming, heads, preprocessing, parameter count (--docs: where the docs are)"""
    if args.docs:
        if args.checkpoint or args.num_heads is not None or args.arch or args.preprocess:
            raise UsageError("--docs prints where the docs are; it takes no checkpoint or model options")
        return print_docs()
    quantized = args.checkpoint is not None and is_quantized_file(args.checkpoint)
    args.weights, args.model = (None, args.checkpoint) if quantized else (args.checkpoint, None)
    r = resolve_from_args(args, int8=False, form="token")
    c = r.config
    print(f"file:        {r.source['path']}" + ("  (embedded default)" if r.is_default else ""))
    if r.float_model is not None:
        fm = r.float_model
        print(f"family:      {fm.family}")
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
    print(f"preprocess:  {pp.name}: " + ", ".join(f"{k} {v}" for k, v in pp.relevant().items()))
    print("config:")
    for name, value in c.to_dict().items():
        print(f"  {name:12} {value}")
    print(f"  {'tokens':12} {c.num_tokens} ({c.num_patches} patches of {c.patch_size}x{c.patch_size} "
          f"+ {c.num_prefix_tokens} prefix), head_dim {c.head_dim}, mlp hidden {c.hidden_dim}")
    return 0


# ---------------------------------------------------------------- golden

def add_input_args(p: argparse.ArgumentParser) -> None:
    """The input of one forward pass (golden, iree-check): --image | --seed | --input, and --batch."""
    inp = p.add_mutually_exclusive_group()
    inp.add_argument("--image", nargs="+", metavar="IMG", help="input image(s) or folders of them: one batch, "
                     "preprocessed as the model expects")
    inp.add_argument("--seed", type=int, metavar="S", help=f"synthetic int8 input: {golden.SEED_GENERATOR} "
                     f"(16-bit activations: {golden.SEED_GENERATOR16})")
    inp.add_argument("--input", metavar="X.npy|X.hex|X.bin", help="your own int8 input tensor in the model's input "
                     "layout (B, C, H, W), row-major (hex/bin: B from the element count)")
    p.add_argument("--batch", type=int, metavar="B", help="batch size of a --seed input (default 1)")


def add_golden_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_input_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--formats", default="npy", help=f"comma-separated subset of {','.join(FORMATS)} (npy always)")
    p.add_argument("--internals", action="store_true", help="also dump what each op computes inside, as "
                   f"<op>.<internal> (docs/spec.md, Internals of the ops): {R.internals_help()}")
    add_kernels_arg(p)
    p.add_argument("--ops", metavar="GLOB[,GLOB]", help="dump only the matching ops (with the tensors they read and "
                   "the constants they use), e.g. 'blocks.0.*,head'")
    p.add_argument("--hex-width", type=int, metavar="BITS", help="packed hex: BITS per line (a power of two, 8 to "
                   "4096), several elements per line, the first in the least significant digits; of the hex "
                   "files written, and of a --input X.hex")
    p.add_argument("--c-prefix", default="", metavar="NAME", help="prefix of every C identifier (with h in --formats)")
    p.add_argument("--c-split", action="store_true", help="C output as one golden.c with the data and one golden.h "
                   "with extern declarations, instead of a header per array")
    p.add_argument("--float", action="store_true", help="also dump the float model's tensors under the same names, "
                   "float/<name>.npy (float32); needs the float weights (--weights, with --model if given)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


HEX_WIDTHS = tuple(1 << k for k in range(3, 13))   # --hex-width: 8 .. 4096


def run_golden(args) -> int:
    """dump every intermediate integer tensor and constant of one forward pass (golden vectors)"""
    t0 = time.perf_counter()
    formats = check_formats(f for f in args.formats.split(",") if f)
    _check_golden_args(args, formats)
    patterns = _patterns(args.ops)
    r, images, (xq, x, input_source) = _model_and_input(args)
    if patterns and not select_ops(r.qm.graph, patterns):
        raise UsageError(f"--ops {args.ops} matches no op of the graph (names such as {r.qm.graph[0].name}, "
                         f"blocks.0.attn.*, head)")
    floats = report.float_tensors(r.qm, r.float_model.params, x) if args.float else None
    writing = progress_printer(f"writing {args.out}", args.quiet)
    manifest = write_folder_atomically(args.out, lambda tmp: golden.write_golden(
        r.qm, xq, tmp, formats, input_source, r.source, r.preprocess.to_dict() if images else None,
        internals=args.internals, ops=patterns, hex_width=args.hex_width, c_prefix=args.c_prefix, c_split=args.c_split,
        float_tensors=floats, float_source=_float_source(args, images), progress=writing, kernels=args.kernels))
    _end_progress(writing)
    for note in r.notes:
        print(f"note: {note}")
    inside = sum(len(op.get("internals", {})) for op in manifest["ops"])
    print(f"wrote {len(manifest['tensors'])} tensors ({len(manifest['ops'])} ops"
          + (f" of {manifest['selection']['ops_in_graph']}" if patterns else "")
          + (f", {inside} internals" if args.internals else "") + f") and {len(manifest['constants'])} constants as "
          f"{','.join(formats)}" + (" + float" if args.float else "") + f" to {args.out} in "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"input sha256 ({manifest['input']['dtype']} bytes): {manifest['input']['sha256_int8']}; rounding {r.qm.rounding}")
    logits = np.asarray(manifest["output"]["logits"] or [])
    for b, row in enumerate(logits[:4]):
        top = np.argsort(-row, kind="stable")[:5]
        print(f"image {b}: top-5 classes {top.tolist()} (int16 logits {row[top].tolist()}, "
              f"scale {manifest['output']['scale']:.6g})")
    return 0


def _model_and_input(args) -> tuple:
    """(the integer model (with the float one for --float), the --image files or None, (int8 input (B, C, H, W),
    its float form or None, the manifest's input source)) of golden and iree-check."""
    batch = 1 if args.batch is None else args.batch
    seed = 0 if args.seed is None else args.seed
    images = expand_images(args.image) if args.image else None

    def int8_calibration(cfg):  # a seed or an int8 file has no float image: its int8 values read as float int8/64
        dt = _scheme_input_dtype(args)                              # (int16 ones of 16-bit activations: / 16384)
        x = (golden.read_input(args.input, cfg, args.hex_width, dt) if args.input else
             golden.seed_input(seed, (batch, cfg.in_chans, cfg.img_size, cfg.img_size), dt)).astype(np.float32)
        x /= 64 if dt == np.int8 else 16384
        return x, (f"the {'--input' if args.input else 'seed'} input itself read as float {dt.name}/"
                   f"{64 if dt == np.int8 else 16384} (no --calib given)")
    calib = progress_printer("calibrating", args.quiet)
    fallback = (lambda cfg: images) if images else int8_calibration
    r = _float_and_int(args, "golden --float", fallback, calib) if args.float else \
        resolve_from_args(args, int8=True, calib_fallback=fallback, progress=calib)
    _end_progress(calib)
    return r, images, _golden_input(args, r, images, seed, batch)


def _scheme_input_dtype(args) -> np.dtype:
    """The input dtype of the scheme --scheme names (int16 with act_bits 16), before any model exists."""
    scheme = resolve_scheme(args.scheme) if getattr(args, "scheme", None) else None
    return np.dtype(np.int16 if scheme is not None and scheme.act_bits == 16 else np.int8)


def _check_input_args(args) -> None:
    """--batch only with --seed, and at least 1; --seed non-negative."""
    given = "--image" if args.image else "--input" if args.input else None
    if args.batch is not None and given:
        raise UsageError(f"--batch sizes a --seed input; with {given} the batch is "
                         f"{'the number of images' if args.image else 'in the file'}")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer (numpy's default_rng), got {args.seed}")


def _check_golden_args(args, formats) -> None:
    """Every option that cannot apply to this command line is an error, not silently ignored."""
    _check_input_args(args)
    packed_input = args.input is not None and str(args.input).lower().endswith(".hex")
    if args.hex_width is not None and "hex" not in formats and not packed_input:
        raise UsageError("--hex-width packs hex lines: add hex to --formats (or give a packed --input X.hex)")
    if args.hex_width is not None and args.hex_width not in HEX_WIDTHS:
        raise UsageError(f"--hex-width must be a power of two from 8 to 4096 bits, got {args.hex_width}")
    if (args.c_prefix or args.c_split) and "h" not in formats:
        raise UsageError(f"{'--c-prefix' if args.c_prefix else '--c-split'} is for C output: add h to --formats")
    _check_not_quantizing(args)
    if args.preprocess is not None and not (args.image or args.calib):
        raise UsageError("--preprocess applies to images: give --image (or --calib with --weights)")


def _check_not_quantizing(args) -> None:
    """--calib, --method, --percentile and --scheme quantize --weights: with --model they cannot apply."""
    if args.model is None:
        return
    quantizing = [o for o, on in (("--calib", args.calib is not None), ("--method", args.method != DEFAULT_METHOD),
                                  ("--percentile", args.percentile != DEFAULT_PERCENTILE),
                                  ("--scheme", args.scheme is not None)) if on]
    if quantizing:
        raise UsageError(f"{', '.join(quantizing)} {'is' if len(quantizing) == 1 else 'are'} for quantizing "
                         f"--weights; --model {args.model} is already quantized")


def _patterns(text: str | None) -> tuple | None:
    """'a.*,b' -> ('a.*', 'b'); None stays None."""
    if text is None:
        return None
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise UsageError("--ops needs at least one pattern, e.g. 'blocks.0.*'")
    return patterns


def _golden_input(args, r: Resolved, images, seed: int, batch: int) -> tuple:
    """(int8 input (B, C, H, W), the float input the float model sees or None, the manifest's input source)."""
    cfg = r.config
    if images:
        x = r.images(images)                                                        # (B, 3, H, W) float32
        return int_model.quantize_input(r.qm, x), x, {"kind": "image", "files": [golden_file(p) for p in images]}
    dt = input_dtype(r.qm.graph)                                                    # int8, or int16 (Part 7)
    if args.input:
        xq = golden.read_input(args.input, cfg, args.hex_width, dt)
        src = golden_file(args.input)
        source = {"kind": "file", "path": src["path"], "sha256": src["sha256"], "shape": list(xq.shape)}
    else:
        xq = golden.seed_input(seed, (batch, cfg.in_chans, cfg.img_size, cfg.img_size), dt)
        source = {"kind": "seed", "seed": seed, "generator": golden.seed_generator(dt), "shape": list(xq.shape)}
    x = (xq.astype(np.float32) * np.float32(r.qm.tensors["input.scale"])) if args.float else None
    return xq, x, source


def _float_source(args, images) -> dict | None:
    if not args.float:
        return None
    return {"model": "the float conv form (refvit.model_conv) of the float weights, traced under the graph's names "
                     "(refvit.quantize.observe)",
            "input": "the float images, before quantize_input" if images else
                     "the int8 input dequantized: input * input.scale"}


def _end_progress(show) -> None:
    """End a progress line that was overwritten in place on a terminal."""
    if show and sys.stderr.isatty():
        print(file=sys.stderr)


def golden_file(path) -> dict:
    src = file_source("image", path)
    return {"path": src["path"], "sha256": src["sha256"]}


# ---------------------------------------------------------------- check

def add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("golden_dir", metavar="GOLDEN_DIR", help="folder written by `refvit golden`")
    p.add_argument("actual_dir", metavar="ACTUAL_DIR", help="the device's dumps (npy/hex/bin, flat or in tensors/)")
    p.add_argument("--ops", metavar="GLOB[,GLOB]", help="compare only the matching ops (their internals and outputs)")
    p.add_argument("--present", action="store_true", help="compare only what the device dumped; list the rest "
                   "as not compared instead of MISSING")
    p.add_argument("--atol", type=int, default=0, metavar="N", help="differences of at most N (integer LSB) are "
                   "reported as WITHIN N LSB, apart from exact matches, and pass (default 0: exact)")
    p.add_argument("--format", choices=check.DUMP_FORMATS, help="read only this format from the device (a missing "
                   "file is MISSING, never read in another format); default: npy, then hex, then bin")
    p.add_argument("--hex-width", type=int, metavar="BITS", help="the device's hex lines are packed, BITS per line "
                   "(as golden --hex-width)")
    p.add_argument("--json", action="store_true", help="the report as JSON: per tensor status, differing elements, "
                   "largest difference, first differing index with both values, file read")


def run_check(args) -> int:
    """compare a device's tensor dumps with a golden dump: first divergent op and element (exit 1 if any differ)"""
    if args.atol < 0:
        raise UsageError(f"--atol must be a non-negative integer, got {args.atol}")
    if args.hex_width is not None and args.hex_width not in HEX_WIDTHS:
        raise UsageError(f"--hex-width must be a power of two from 8 to 4096 bits, got {args.hex_width}")
    result = check.compare_dumps(args.golden_dir, args.actual_dir, ops=_patterns(args.ops), present=args.present,
                                 atol=args.atol, formats=(args.format,) if args.format else check.DUMP_FORMATS,
                                 hex_width=args.hex_width)
    print(result.to_json() if args.json else result.format())
    return 0 if result.ok else 1


# ---------------------------------------------------------------- report

def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMG_OR_DIR",
                   help="images or folders of them; default: the bundled examples (embedded default model only)")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--plot", metavar="FILE.png", help=f"also draw it as a PNG (matplotlib: {report.PLOT_EXTRA})")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run_report(args) -> int:
    """per-op SQNR of the integer model against the float model: where the quantization error comes from"""
    if args.plot and not report.plot_available():
        raise UsageError(f"--plot needs matplotlib, which is not installed: {report.PLOT_EXTRA}")
    _need_float_weights(args, "report")
    _check_not_quantizing(args)
    images = images_or_examples(args)
    calib = progress_printer("calibrating", args.quiet)
    r = _float_and_int(args, "report", lambda cfg: images, calib)
    _end_progress(calib)
    if _quantized_on_the_fly(r):
        warn_saturation(r.qm, next(iter(calibration_batches(r.preprocess, args.calib or images, BATCH))),
                        r.qm.calibration["images"])
    show = progress_printer(f"report on {len(images)} images", args.quiet)
    batches = (r.images(images[i:i + BATCH]) for i in range(0, len(images), BATCH))
    rows = report.sqnr_report(r.qm, r.float_model.params, batches,
                              show and (lambda n: show(min(n * BATCH, len(images)), len(images), "image")))
    _end_progress(show)
    if args.plot:
        report.plot_sqnr(rows, args.plot, f"SQNR per op, {r.qm.scheme.name}, {len(images)} images")
    if args.json:
        print(json.dumps({"model": describe(r), "images": [str(p) for p in images], "ops": rows,
                          "lowest": report.lowest(rows), "not_reported": report.not_reported(r.qm.graph, rows),
                          "plot": args.plot}, indent=1))
        return 0
    if r.is_default:
        print(default_model_note() + " (INT8)")
    for note in r.notes:
        print(f"note: {note}")
    print(f"SQNR of the integer model ({r.qm.scheme.name}, {r.qm.rounding}) against the float model, each op's "
          f"output dequantized at its scale, over {len(images)} images")
    print(report.format_table(rows, report.not_reported(r.qm.graph, rows)))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _float_and_int(args, what: str, calib_fallback=None, progress=None) -> Resolved:
    """The integer model with the float weights it came from: --model Q with --weights W, --weights W quantized
    on the fly, or the embedded default with its shipped quantized file."""
    if args.model is None:
        return resolve_from_args(args, int8=True, calib_fallback=calib_fallback, progress=progress)
    _need_float_weights(args, what)
    r = resolve_model(model=args.model, preprocess=args.preprocess, rounding=args.rounding)
    fm = load_model(args.weights, form="conv", num_heads=args.num_heads, arch=args.arch)
    if fm.config.to_dict() != r.config.to_dict() or fm.head_mode != r.head_mode:
        raise UsageError(f"--weights {args.weights} is not the model --model {args.model} was quantized from "
                         f"(config or head mode differ)")
    recorded = (r.qm.calibration.get("float_checkpoint") or {}).get("sha256")
    given = file_sha256(fm.path)
    if recorded is not None and recorded != given:
        raise UsageError(f"--weights {args.weights} is not the checkpoint --model {args.model} was quantized from "
                         f"(sha256 {given[:12]}..., the file records {recorded[:12]}...)")
    notes = [] if recorded else [f"--model {args.model} does not record the float checkpoint it came from (quantized "
                                 f"by an older refvit): cannot verify that --weights {args.weights} is it"]
    return replace(r, float_model=fm, notes=r.notes + notes)


def _need_float_weights(args, what: str) -> None:
    if args.model is not None and args.weights is None:
        raise UsageError(f"{what} needs the float weights, which a quantized file does not hold: give --weights W "
                         f"(the checkpoint --model was quantized from) with --model")


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
    add_kernels_arg(p)


def run_eval(args) -> int:
    """evaluate a data set: float and integer top-1 and their agreement, streamed, on local or Dask workers"""
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.scheduler and args.workers != 1:
        raise UsageError("--workers is for local processes; a --scheduler cluster has its own workers")
    data = open_dataset(args.data, args.limit)
    r = resolve_from_args(args, int8=args.int8 or args.model is not None, form="token")
    check_classes(data, r.config.num_classes)
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
    rows = [{"name": name, **{k: v for k, v in sc.parameters().items() if k != "name"}, "note": SCHEME_NOTES[name]}
            for name, sc in SCHEMES.items()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    keys = ("conv", "layernorm", "softmax", "gelu", "residual", "weights", "scales", "acc_bits")
    width = {k: max(len(k), *(len(str(r[k])) for r in rows)) + 1 for k in keys}   # columns as wide as their values
    print(f"{'name':16}" + "".join(f"{k:{width[k]}}" for k in keys) + "note")
    for r in rows:
        extra = (f" (pot_fraction {r['pot_fraction']})" if r["conv"] == "mixed-pot" else "") + \
                (f" (gelu_delta {r['gelu_delta']})" if r["gelu_delta"] != 1.0 else "") + \
                (f" (acc_overflow {r['acc_overflow']})" if r["acc_overflow"] != "error" else "")
        print(f"{r['name']:16}" + "".join(f"{r[k]!s:{width[k]}}" for k in keys) + r["note"] + extra)
    print("\nA JSON file with these keys (any subset; the rest default to refvit-int8's) is a scheme too: "
          "quantize --scheme my_scheme.json. Parameters: " + "; ".join(
              f"{k} {' | '.join(map(str, v[1])) if k != 'acc_bits' else f'{v[1][0]}..{v[1][-1]}'} (default {v[0]})"
              for k, v in PARAMETERS.items()))
    return 0


# ---------------------------------------------------------------- export-tosa

def add_export_tosa_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--out", required=True, metavar="MODEL.mlir", help="the MLIR file to write")
    p.add_argument("--outputs", choices=OUTPUTS, default="logits",
                   help="logits (default): the int16 logits only; all: every tensor of the integer model, named "
                        "as in the golden manifest, the logits last")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="images per call (static shapes; default 1)")


def run_export_tosa(args) -> int:
    """write the integer model as TOSA (MLIR tosa dialect) for compiler flows: int8 input to int16 logits"""
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    r = resolve_from_args(args, int8=True)
    program = export_tosa(r.qm, args.batch, args.outputs)
    text = program.to_mlir()
    write_atomically(args.out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {args.out}: {len(program.ops)} TOSA ops, {len(program.results)} result(s), "
          f"{len(text) / 1e6:.1f} MB; scheme {r.qm.scheme.name}, rounding {r.qm.rounding}, batch {args.batch}")
    return 0


# ---------------------------------------------------------------- iree-check

IREE_COMPILE_FLAGS = ("--iree-input-type=tosa", "--iree-hal-target-backends=llvm-cpu",
                      "--iree-llvmcpu-target-cpu=generic")   # generic: portable code, no host-CPU warning
IREE_RUN_FLAGS = ("--device=local-sync", "--function=main")
IREE_EXTRA = "pip install 'refvit[tosa]'"


def add_iree_check_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_input_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="work folder (absent, empty, or an earlier "
                   "iree-check's): golden/ (the golden dump), model.mlir, model.vmfb, device/ (IREE's dump of every "
                   "tensor), commands.sh (the IREE commands, to rerun by hand)")
    p.add_argument("--json", action="store_true", help="the check report as JSON (as check --json)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(float=False, hex_width=None)       # golden's options that iree-check does not take


def iree_tool(name: str) -> str:
    """The path of an IREE command line tool (the `tosa` extra installs them beside the Python interpreter)."""
    found = shutil.which(name) or next((str(c) for c in [Path(sys.executable).parent / name] if c.is_file()), None)
    if found is None:
        raise UsageError(f"{name} not found: IREE's compiler and runtime tools come with {IREE_EXTRA}")
    return found


def iree_commands(results: list, input_npy: str) -> list:
    """[iree-compile ..., iree-run-module ...] for model.mlir in the current folder: compile to model.vmfb for the
    CPU, then run it on `input_npy` writing result i to device/tensors/<name i>.npy (every output, in order)."""
    compile_cmd = [iree_tool("iree-compile"), *IREE_COMPILE_FLAGS, "model.mlir", "-o", "model.vmfb"]
    run_cmd = [iree_tool("iree-run-module"), "--module=model.vmfb", *IREE_RUN_FLAGS, f"--input=@{input_npy}",
               *(f"--output=@device/tensors/{name}.npy" for name in results)]
    return [compile_cmd, run_cmd]


def run_tool(cmd: list, cwd: Path, show) -> None:
    """Run one external command in cwd; a failure is one line naming the tool and its last words."""
    name = Path(cmd[0]).name
    if show:
        show(f"running {name}")
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        last = next((ln for ln in reversed((done.stderr or done.stdout).splitlines()) if ln.strip()), "")
        raise UsageError(f"{name} failed (exit {done.returncode}): {last.strip()[:300]}")


def _earlier_iree_work(folder: Path) -> bool:
    return (folder / "commands.sh").is_file() and (folder / "golden" / "manifest.json").is_file()


def run_iree_check(args) -> int:
    """run the integer model in IREE (export-tosa, iree-compile, iree-run-module with every output) and check every tensor against a golden dump"""
    _check_input_args(args)
    steps = None if args.quiet else (lambda what: print(f"iree-check: {what}", file=sys.stderr, flush=True))
    r, images, (xq, _, input_source) = _model_and_input(args)
    program = export_tosa(r.qm, len(xq), "all")       # refuses a scheme TOSA cannot express, before any work
    commands = iree_commands([name for name, _ in program.results], "golden/tensors/input.npy")

    def work(tmp: Path) -> None:
        if steps:
            steps("writing the golden dump and the TOSA export")
        golden.write_golden(r.qm, xq, tmp / "golden", ("npy",), input_source, r.source,
                            r.preprocess.to_dict() if images else None)
        (tmp / "model.mlir").write_text(program.to_mlir())
        (tmp / "device" / "tensors").mkdir(parents=True)
        (tmp / "commands.sh").write_text("#!/bin/sh\n# written by `refvit iree-check`: compile model.mlir with IREE, "
                                         "run it, dump every tensor\nset -e\ncd \"$(dirname \"$0\")\"\n"
                                         + "".join(shlex.join(c) + "\n" for c in commands))
        os.chmod(tmp / "commands.sh", 0o777 & ~current_umask())
        for cmd in commands:
            run_tool(cmd, tmp, steps)
    write_folder_atomically(args.out, work, earlier=_earlier_iree_work, what="iree-check work folder")
    result = check.compare_dumps(Path(args.out) / "golden", Path(args.out) / "device")
    print(result.to_json() if args.json else result.format())
    return 0 if result.ok else 1


# ---------------------------------------------------------------- registration and entry point

COMMANDS = [  # (name, add its arguments, run it); the run function's docstring is the help line
    ("classify", add_classify_args, run_classify),
    ("info", add_info_args, run_info),
    ("quantize", add_quantize_args, run_quantize),
    ("golden", add_golden_args, run_golden),
    ("check", add_check_args, run_check),
    ("report", add_report_args, run_report),
    ("eval", add_eval_args, run_eval),
    ("schemes", add_schemes_args, run_schemes),
    ("export-tosa", add_export_tosa_args, run_export_tosa),
    ("iree-check", add_iree_check_args, run_iree_check),
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
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be at least 1, got {args.threads}")
            parallel.set_threads(args.threads)
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
