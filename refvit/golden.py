"""Golden vectors for hardware teams: every intermediate tensor and constant of one integer forward pass.

`write_golden` runs the integer model with a Trace and writes, under an output folder,
    tensors/<tensor name>.<fmt>     every op output (and the int8 input) in execution order
    constants/<constant name>.<fmt> every model constant (float64 scales: .npy only)
    manifest.json                   schema below / docs/golden-format.md
in the formats
    npy  NumPy .npy (always written)
    hex  Verilog $readmemh: one element per line, two's complement, fixed width per dtype, row-major
    bin  raw little-endian two's complement, row-major, no header
    h    C header: `static const int8_t name[N] = {...};` with the shape in a comment.
The readers of the same formats (`read_array`) are here too, so `refvit check` and the conformance
suite decode exactly what this module encodes.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np

import refvit

from . import int_model
from .intmath import ROUNDING_MODES
from .quantize import SCHEME, QuantizedModel

SCHEMA = "refvit-golden"
SCHEMA_VERSION = 1
FORMATS = ("npy", "hex", "bin", "h")
SEED_GENERATOR = "numpy PCG64: np.random.default_rng(seed).integers(-128, 128, shape, dtype=np.int8)"

# hex digits per element: two per byte of the two's complement (or unsigned) representation
HEX_DIGITS = {"int8": 2, "uint8": 2, "int16": 4, "uint16": 4, "int32": 8, "int64": 16}
C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "uint16": "uint16_t",
           "int32": "int32_t", "int64": "int64_t"}
# constants whose values go into the manifest too (small integers a team reads by eye)
_VALUE_SUFFIXES = (".multiplier", ".shift", ".multiplier_a", ".multiplier_b", ".eps_int")


class DumpFormatError(ValueError):
    """A dump file that cannot be decoded as the dtype/shape the manifest states; the message names the file.

    kind: 'shape' (wrong element count), 'dtype' (wrong element width) or 'format' (not decodable)."""

    def __init__(self, message: str, kind: str = "format"):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------------------------
# encoders (vectorized: DeiT-Base dumps hold ~10^8 elements)
# ---------------------------------------------------------------------------------------------

def _int_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.name not in HEX_DIGITS:
        raise ValueError(f"integer dump formats need one of {sorted(HEX_DIGITS)}, got dtype {dt}")
    return dt


_HEX_PAIRS = np.array([list(f"{i:02x}".encode()) for i in range(256)], np.uint8)   # byte -> 2 ASCII digits


def hex_bytes(arr: np.ndarray) -> bytes:
    """$readmemh text: one element per line, 2*itemsize lowercase hex digits of its two's complement."""
    dt = _int_dtype(arr.dtype)
    n = dt.itemsize
    be = np.ascontiguousarray(arr, dtype=dt.newbyteorder(">")).view(np.uint8).reshape(-1, n)  # MSB first
    lines = np.empty((be.shape[0], 2 * n + 1), np.uint8)
    lines[:, :-1] = _HEX_PAIRS[be].reshape(-1, 2 * n)
    lines[:, -1] = ord("\n")
    return lines.tobytes()


def bin_bytes(arr: np.ndarray) -> bytes:
    """Raw little-endian two's complement, row-major."""
    dt = _int_dtype(arr.dtype)
    return np.ascontiguousarray(arr, dtype=dt.newbyteorder("<")).tobytes()


def c_identifier(name: str) -> str:
    """A C identifier for a tensor name: 'blocks.0.attn.qkv' -> 'blocks_0_attn_qkv'."""
    ident = re.sub(r"[^0-9A-Za-z_]", "_", name)
    return ident if ident and not ident[0].isdigit() else "t_" + ident


def _decimal_columns(flat: np.ndarray) -> np.ndarray:
    """Right-aligned decimal text of integers as a (N, width) uint8 array of ASCII (no per-element Python loop)."""
    info = np.iinfo(flat.dtype)
    width = max(len(str(int(info.min))), len(str(int(info.max))) + 1)
    neg = flat < 0
    rest = np.where(neg, -(flat.astype(np.int64) + 1), flat).astype(np.uint64) + neg   # |x|, no int64 overflow
    out = np.full((flat.size, width), ord(" "), np.uint8)
    ndigits = np.zeros(flat.size, np.int64)
    for col in range(width - 1, 0, -1):                  # column 0 is left for the sign of the widest value
        live = (rest > 0) | (col == width - 1)           # the units digit is always written
        out[:, col] = np.where(live, (rest % np.uint64(10)).astype(np.uint8) + ord("0"), out[:, col])
        ndigits += live
        rest //= np.uint64(10)
    rows = np.nonzero(neg)[0]
    out[rows, width - 1 - ndigits[rows]] = ord("-")
    return out


def c_header_text(arr: np.ndarray, name: str, layout: str = "", per_line: int = 16) -> str:
    """`static const <type> <ident>[N] = {...};` with name, dtype, shape and layout in a comment."""
    dt = _int_dtype(arr.dtype)
    ident = c_identifier(name)
    flat = np.ascontiguousarray(arr).reshape(-1)
    n, rows = flat.size, -(-flat.size // per_line)
    cols = _decimal_columns(flat)
    items = np.full((rows * per_line, cols.shape[1] + 2), ord(" "), np.uint8)   # padded to whole lines
    items[:n, :-2], items[:n, -2] = cols, ord(",")
    lines = np.full((rows, 4 + per_line * items.shape[1] + 1), ord(" "), np.uint8)
    lines[:, 4:-1] = items.reshape(rows, -1)
    lines[:, -1] = ord("\n")
    body = lines.tobytes().decode("ascii")
    cut = body.rfind(",")
    body = (body[:cut] + body[cut + 1:]).rstrip() + "\n"                         # no comma after the last element
    guard = ident.upper() + "_H"
    return (f"/* {name}: {dt.name}, shape {tuple(arr.shape)}, {n} elements, "
            f"{layout or 'row-major'}; generated by refvit {refvit.__version__} */\n"
            f"#ifndef {guard}\n#define {guard}\n#include <stdint.h>\n\n"
            f"static const {C_TYPES[dt.name]} {ident}[{n}] = {{\n{body}}};\n\n#endif /* {guard} */\n")


def write_array(arr: np.ndarray, folder: Path, name: str, formats=("npy",), layout: str = "") -> dict:
    """Write arr as folder/name.<fmt> for each format (floats: npy only) -> {fmt: file name}."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"tensor name {name!r} cannot be a file name")
    arr = np.asarray(arr)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for fmt in formats:
        if fmt != "npy" and arr.dtype.kind == "f":
            continue
        path = folder / f"{name}.{fmt}"
        if fmt == "npy":
            np.save(path, arr, allow_pickle=False)
        elif fmt == "hex":
            path.write_bytes(hex_bytes(arr))
        elif fmt == "bin":
            path.write_bytes(bin_bytes(arr))
        elif fmt == "h":
            path.write_text(c_header_text(arr, name, layout))
        else:
            raise ValueError(f"unknown dump format {fmt!r}; choose from {FORMATS}")
        files[fmt] = path.name
    return files


# ---------------------------------------------------------------------------------------------
# decoders
# ---------------------------------------------------------------------------------------------

_NIBBLE = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _NIBBLE[ord(chr(_c).upper())] = _i


def _hex_tokens_slow(data: bytes, path) -> list:
    """Whitespace-separated tokens, `//` comments removed ($readmemh syntax without @address lines)."""
    tokens = []
    for lineno, line in enumerate(data.decode("ascii", "replace").splitlines(), 1):
        line = line.split("//", 1)[0].strip()
        if line.startswith("@"):
            raise DumpFormatError(f"{path}:{lineno}: @address lines are not supported; write elements in order")
        tokens += line.split()
    return tokens


def parse_hex(data: bytes, dtype, count: int, path="<hex>") -> np.ndarray:
    """Decode $readmemh text into `count` elements of `dtype` (two's complement; a token may have fewer digits)."""
    dt = _int_dtype(dtype)
    digits = HEX_DIGITS[dt.name]
    unsigned = np.dtype(f"u{dt.itemsize}")
    if len(data) == count * (digits + 1) and (count == 0 or data[digits::digits + 1] == b"\n" * count):
        chars = np.frombuffer(data, np.uint8).reshape(count, digits + 1)[:, :digits]   # the canonical layout
    else:
        tokens = _hex_tokens_slow(data, path)
        if len(tokens) != count:
            raise DumpFormatError(f"{path}: {len(tokens)} hex elements, expected {count}", "shape")
        long = [t for t in tokens if len(t) > digits]
        if long:
            raise DumpFormatError(f"{path}: hex element {long[0]!r} has more than {digits} digits ({dt.name})",
                                  "dtype")
        chars = np.frombuffer(b"".join(t.encode().rjust(digits, b"0") for t in tokens) or b"", np.uint8)
        chars = chars.reshape(count, digits)
    nibbles = _NIBBLE[chars]
    if nibbles.size and nibbles.max() == 255:
        row = int(np.nonzero((nibbles == 255).any(axis=1))[0][0])
        raise DumpFormatError(f"{path}: element {row} ({bytes(chars[row]).decode('ascii', 'replace')!r}) is not hex")
    value = np.zeros(count, np.uint64)
    for j in range(digits):
        value = (value << np.uint64(4)) | nibbles[:, j].astype(np.uint64)
    return value.astype(unsigned).view(dt) if dt.kind == "i" else value.astype(dt)


def parse_bin(data: bytes, dtype, count: int, path="<bin>") -> np.ndarray:
    dt = _int_dtype(dtype)
    if len(data) != count * dt.itemsize:
        width = len(data) // count if count and len(data) % count == 0 else 0
        kind = "dtype" if width in (1, 2, 4, 8) else "shape"     # right count of elements of another width
        raise DumpFormatError(f"{path}: {len(data)} bytes, expected {count} {dt.name} elements = "
                              f"{count * dt.itemsize} bytes", kind)
    return np.frombuffer(data, dt.newbyteorder("<")).astype(dt)


def read_array(path, dtype=None, shape=None) -> np.ndarray:
    """Read a .npy (dtype/shape from the file) or a .hex/.bin (dtype and shape required) dump."""
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    try:
        if fmt == "npy":
            return np.load(path, allow_pickle=False)
        if fmt not in ("hex", "bin"):
            raise DumpFormatError(f"{path}: unknown dump format {fmt!r} (readable: npy, hex, bin)")
        if dtype is None or shape is None:
            raise ValueError(f"read_array: {path} is {fmt}: give its dtype and shape")
        count = int(np.prod(shape, dtype=np.int64))
        parse = parse_hex if fmt == "hex" else parse_bin
        return parse(path.read_bytes(), dtype, count, path).reshape(shape)
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, DumpFormatError):
            raise
        raise DumpFormatError(f"{path}: cannot read: {e}") from None


# ---------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------

def _jsonable(v):
    """numpy scalars/arrays and dtypes -> JSON values."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.dtype):
        return v.name
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def tensor_scale(qm: QuantizedModel, name: str, op: str | None) -> float | None:
    """Real scale of a traced tensor, or None where it has no single scale (the fused qkv output)."""
    T = qm.tensors
    aliases = {"input": "input.scale", "tokens": "patch_embed.scale", "head_input": "norm.scale",
               "head": "logits.scale"}
    if op == "softmax":
        return float(T["attn.softmax.scale"])
    if op == "attention_scores":                       # q.k at scale s_q * s_k
        blk = name.rsplit(".", 1)[0]
        return float(T[f"{blk}.q.scale"]) * float(T[f"{blk}.k.scale"])
    key = aliases.get(name, f"{name}.scale")
    return float(T[key]) if key in T else None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seed_input(seed: int, shape) -> np.ndarray:
    """The synthetic int8 input of `--seed`: uniform over [-128, 127], see SEED_GENERATOR."""
    return np.random.default_rng(seed).integers(-128, 128, size=tuple(shape), dtype=np.int8)


def check_formats(formats) -> tuple:
    formats = tuple(dict.fromkeys(("npy",) + tuple(formats)))        # npy always, order kept, no repeats
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown dump format(s) {unknown}; choose from {', '.join(FORMATS)}")
    return formats


def write_golden(qm: QuantizedModel, xq: np.ndarray, out_dir, formats=("npy",), input_source: dict | None = None,
                 model_source: dict | None = None) -> dict:
    """Run the integer model on int8 input xq (B, C, H, W) with a trace; dump everything; return the manifest."""
    formats = check_formats(formats)
    out = Path(out_dir)
    trace = int_model.Trace()
    logits = int_model.forward_int(qm, xq, trace)
    producer = {o: rec.op for rec in trace.ops for o in rec.outputs}

    tensors = {}
    for name, arr in trace.tensors.items():
        layout = trace.layouts[name]
        files = write_array(arr, out / "tensors", name, formats, layout)
        tensors[name] = {"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "layout": layout,
                         "scale": tensor_scale(qm, name, producer.get(name)),
                         "files": {f: f"tensors/{p}" for f, p in files.items()}}
    constants = {}
    for name, arr in qm.tensors.items():
        arr = np.asarray(arr)
        files = write_array(arr, out / "constants", name, formats)
        entry = {"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                 "files": {f: f"constants/{p}" for f, p in files.items()}}
        if arr.dtype.kind == "f" or name.endswith(_VALUE_SUFFIXES):
            entry["value"] = _jsonable(arr)
        constants[name] = entry

    ops = []
    for index, rec in enumerate(trace.ops):
        out_dtype = trace.tensors[rec.outputs[0]].dtype.name
        entry = {"index": index, "name": rec.name, "op": rec.op,
                 "inputs": [tensors[t] for t in rec.inputs], "outputs": [tensors[t] for t in rec.outputs],
                 "constants": [constants[c] for c in rec.constants],
                 "attrs": _jsonable({"out_dtype": out_dtype, **rec.attrs})}
        if f"{rec.name}.weight_scale" in qm.tensors:    # per-channel real weight scales of conv / layernorm
            entry["weight_scale"] = constants[f"{rec.name}.weight_scale"]
        ops.append(entry)

    input_bytes = np.ascontiguousarray(xq).tobytes()
    manifest = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "refvit_version": refvit.__version__,
        "model": {"config": qm.config.to_dict(), "head_mode": qm.head_mode, "source": model_source or {}},
        "quantization": {"scheme": SCHEME, "rounding": qm.rounding, "calibration": _jsonable(qm.calibration)},
        "input": {"tensor": "input", "dtype": xq.dtype.name, "shape": list(xq.shape),
                  "scale": float(qm.tensors["input.scale"]), "sha256_int8": sha256_bytes(input_bytes),
                  "source": input_source or {"kind": "array"}},
        "output": {"tensor": trace.ops[-1].outputs[0], "logits_shape": list(logits.shape),
                   "dtype": logits.dtype.name, "scale": float(qm.tensors["logits.scale"]),
                   "logits": logits.tolist() if logits.size <= 10000 else None},
        "formats": list(formats),
        "encoding": {"hex": "one element per line, two's complement, fixed width, lowercase, row-major",
                     "hex_digits": HEX_DIGITS, "bin": "little-endian two's complement, row-major, no header",
                     "h": "static const <stdint type> <sanitized name>[N], row-major"},
        "ops": ops, "tensors": tensors, "constants": constants,
    }
    (out / "manifest.json").write_text(manifest_json(manifest))
    return manifest


def manifest_json(manifest: dict) -> str:
    """Indented JSON with every list of scalars on one line (shapes, per-channel multipliers)."""
    text = json.dumps(manifest, indent=1)
    flat = re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + re.sub(r"\n\s*", " ", m.group(1)).strip() + "]", text)
    return flat + "\n"


# ---------------------------------------------------------------------------------------------
# CLI: python -m refvit golden
# ---------------------------------------------------------------------------------------------

class GoldenError(ValueError):
    """A usage problem of `refvit golden` (bad option combination, unreadable model or image)."""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("golden", help="dump every intermediate integer tensor and constant (golden vectors)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="W", help="float checkpoint (.safetensors, timm/HF): quantized on the fly")
    src.add_argument("--model", metavar="Q", help="quantized model file (refvit quantize output)")
    inp = p.add_mutually_exclusive_group()
    inp.add_argument("--image", metavar="IMG", help="input image (preprocessed as the model expects)")
    inp.add_argument("--seed", type=int, metavar="S", help=f"synthetic int8 input: {SEED_GENERATOR}")
    p.add_argument("--batch", type=int, default=1, help="batch size of a --seed input (default 1)")
    p.add_argument("--calib", nargs="+", metavar="IMG", help="calibration images for --weights "
                   "(default: the input itself)")
    p.add_argument("--preprocess", choices=("timm", "fmnist"), help="image pipeline (default: fmnist for the "
                   "embedded Fashion-MNIST model, timm eval otherwise)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--formats", default="npy", help=f"comma-separated subset of {','.join(FORMATS)} (npy always)")
    p.add_argument("--rounding", choices=ROUNDING_MODES, help="rounding mode (default: the model's, "
                   "SINGLE_ROUND when quantizing)")
    p.set_defaults(func=run, run=run)   # refvit.cli dispatches on args.run
    return p


def _file_source(path) -> dict:
    path = Path(path)
    return {"path": str(path), "sha256": sha256_bytes(path.read_bytes())}


def _preprocess(paths, pipeline: str, img_size: int) -> np.ndarray:
    """Image files -> float32 (B, 3, H, W) through the chosen pipeline."""
    from . import preprocess as pp
    imgs = [pp.open_image(p) for p in paths]
    if pipeline == "fmnist":
        x = pp.fmnist_transform(np.stack([pp.grayscale_28(im) for im in imgs]))
        if x.shape[-1] != img_size:
            raise GoldenError(f"the fmnist pipeline makes 32x32 images but the model expects {img_size}x{img_size}")
        return x
    return np.stack([pp.timm_eval_transform(im, img_size) for im in imgs])


def _resolve_model(args):
    """-> (QuantizedModel or None, float model (config, params, head_mode) or None, model source, pipeline)."""
    from refvit.checkpoints import load_checkpoint
    from refvit.qfile import is_quantized_file, load_quantized
    if args.model or args.weights:
        path = Path(args.model or args.weights)
        if not path.exists():
            raise GoldenError(f"model file not found: {path}")
        source = {"kind": "quantized" if args.model else "float", **_file_source(path)}
        if args.model:
            return load_quantized(path), None, source, "timm"
        if is_quantized_file(path):
            raise GoldenError(f"{path} is a quantized model: pass it with --model")
        return None, load_checkpoint(path), source, "timm"
    from .models import default_int8_path
    source = {"kind": "default", "note": "embedded Fashion-MNIST DeiT, quantized (refvit/data)",
              **_file_source(default_int8_path())}
    return load_quantized(default_int8_path()), None, source, "fmnist"


def _quantize(ckpt, calib_x: np.ndarray, calib_note: str, rounding: str) -> QuantizedModel:
    from refvit.checkpoints.convert import token_to_conv
    from .quantize import quantize
    return quantize(token_to_conv(ckpt.params), ckpt.config, [calib_x], head_mode=ckpt.head_mode,
                    method="max", rounding=rounding, source=calib_note)


def build_golden_inputs(args):
    """-> (QuantizedModel, int8 input, input source dict, model source dict) for the parsed CLI arguments."""
    qm, ckpt, model_source, default_pipeline = _resolve_model(args)
    cfg = qm.config if qm is not None else ckpt.config
    pipeline = args.preprocess or default_pipeline
    shape = (args.batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    if args.batch < 1:
        raise GoldenError(f"--batch must be >= 1, got {args.batch}")
    x_float = None
    if args.image:
        x_float = _preprocess([args.image], pipeline, cfg.img_size)
        input_source = {"kind": "image", "preprocess": pipeline, **_file_source(args.image)}
    else:
        seed = 0 if args.seed is None else args.seed
        input_source = {"kind": "seed", "seed": seed, "generator": SEED_GENERATOR, "shape": list(shape)}
    if qm is None:
        rounding = args.rounding or ROUNDING_MODES[0]
        if args.calib:
            calib, note = _preprocess(args.calib, pipeline, cfg.img_size), f"{len(args.calib)} calibration images"
        elif x_float is not None:
            calib, note = x_float, "the input image itself (no --calib given)"
        else:   # a seed input has no float image: read the int8 values as the float range of normalized images
            calib = seed_input(input_source["seed"], shape).astype(np.float32) / 64
            note = "the seed input itself read as float int8/64 (no --calib given)"
        qm = _quantize(ckpt, calib, note, rounding)
    elif args.rounding and args.rounding != qm.rounding:   # the constants do not depend on the mode
        qm = dataclasses.replace(qm, rounding=args.rounding)
    xq = int_model.quantize_input(qm, x_float) if x_float is not None else seed_input(input_source["seed"], shape)
    return qm, xq, input_source, model_source


def run(args) -> int:
    from refvit.checkpoints import CheckpointError
    from .preprocess import ImageError
    t0 = time.perf_counter()
    try:
        formats = check_formats(f for f in args.formats.split(",") if f)
        qm, xq, input_source, model_source = build_golden_inputs(args)
        manifest = write_golden(qm, xq, args.out, formats, input_source, model_source)
    except (GoldenError, CheckpointError, ImageError, OSError, ValueError) as e:
        print(f"refvit golden: error: {e}")
        return 2
    n_const = len(manifest["constants"])
    print(f"wrote {len(manifest['tensors'])} tensors ({len(manifest['ops'])} ops) and {n_const} constants "
          f"as {','.join(formats)} to {args.out} in {time.perf_counter() - t0:.1f} s")
    print(f"input sha256 (int8 bytes): {manifest['input']['sha256_int8']}; rounding {qm.rounding}")
    logits = np.asarray(manifest["output"]["logits"] or [])
    for b, row in enumerate(logits[:4]):
        top = np.argsort(-row, kind="stable")[:5]
        print(f"image {b}: top-5 classes {top.tolist()} (int16 logits {row[top].tolist()}, "
              f"scale {manifest['output']['scale']:.6g})")
    return 0
