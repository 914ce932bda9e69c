"""Golden vectors for hardware teams: every intermediate tensor and constant of one integer forward pass.

`write_golden` runs the graph of a QuantizedModel with a Trace and writes, under an output folder,
    tensors/<tensor name>.<fmt>     every op output (and the int8 input) in execution order
    constants/<constant name>.<fmt> every model constant (float64 scales: .npy only)
    manifest.json                   the graph's op records as they are, and an entry per tensor and constant
in the formats of refvit.dumpfmt. docs/golden-format.md describes the manifest (schema version 2).

Options (each adds to the manifest only when used: a dump without them is what it always was):
    internals      what each kernel computes inside its op (its registry row's internals), named `<op>.<internal>`
    ops            shell patterns: only the matching ops (outputs, internals), the tensors they read and the
                   constants they use
    hex_width      packed hex lines (dumpfmt.hex_lines); c_prefix, c_split: C identifiers, one .c + one .h
    float_tensors  the float conv form's tensors under the same names, float/<name>.npy (float32)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import refvit

from . import int_model
from .dumpfmt import (HEX_DIGITS, DumpFormatError, c_identifier, check_c_prefix, check_formats, file_sha256,
                      hex_lanes, jsonable, manifest_json, read_array, sha256_bytes, write_array, write_c_pair)
from . import registry as R
from .graph import select_ops
from .qfile import QuantizedModel

SCHEMA = "refvit-golden"
SCHEMA_VERSION = 2
SEED_GENERATOR = "numpy PCG64: np.random.default_rng(seed).integers(-128, 128, shape, dtype=np.int8)"
SEED_GENERATOR16 = "numpy PCG64: np.random.default_rng(seed).integers(-32768, 32768, shape, dtype=np.int16)"
INPUT_FORMATS = ("npy", "hex", "bin")   # a team's own int8 input (read_input)
HEX_PACKING = ("hex_width bits per line: lanes = floor(hex_width / element bits) elements (at least 1); element i "
               "in lane i % lanes, lane 0 the least significant (rightmost) digits; the last line's unused lanes 0")
C_SPLIT_STEM = "golden"          # c_split: <prefix>golden.c (the data) and <prefix>golden.h (extern declarations)
PROGRESS_STEPS = 10              # progress reports per dump (plus the last)


def states_value(name: str, arr: np.ndarray) -> bool:
    """Constants whose values go into the manifest too (numbers a team reads by eye): real scales, scalars,
    and every rescale (multiplier*, shift*) argument of a registry row, per channel too."""
    return arr.dtype.kind == "f" or arr.ndim == 0 or name.endswith(R.rescale_constant_suffixes() + (".eps_int",))


def seed_input(seed: int, shape, dtype=np.int8) -> np.ndarray:
    """The synthetic input of `--seed`: uniform over the dtype's range, int8 (SEED_GENERATOR) or int16 for 16-bit
    activations (SEED_GENERATOR16)."""
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(lo, hi + 1, size=tuple(shape), dtype=dtype)


def seed_generator(dtype) -> str:
    return SEED_GENERATOR16 if np.dtype(dtype) == np.int16 else SEED_GENERATOR


def read_input(path, cfg, hex_width: int | None = None, dtype=np.int8) -> np.ndarray:
    """A team's own int8 input (int16 for 16-bit activations: `dtype`) in the model's layout (B, C, H, W): a .npy
    of that dtype, shape (B, C, H, W) or
    (C, H, W); or .hex ($readmemh: one element per line, or packed lines of hex_width bits as `golden
    --hex-width` writes them) / .bin (raw), row-major, B from the element count."""
    path = Path(path)
    chw = (cfg.in_chans, cfg.img_size, cfg.img_size)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in INPUT_FORMATS:
        raise DumpFormatError(f"{path}: an input tensor is .npy, .hex or .bin, got {path.suffix or 'no extension'}")
    dtype = np.dtype(dtype)
    arr = read_array(path, dtype, hex_width=hex_width)           # npy as saved; hex / bin: dtype (n,)
    if arr.dtype != dtype:
        raise DumpFormatError(f"{path}: the input must be {dtype} (the model's quantized input), got {arr.dtype}",
                              "dtype")
    per_image = int(np.prod(chw))
    if fmt == "hex" and arr.size % per_image:                     # packed: the last line's unused lanes are 0
        whole = arr.size // per_image * per_image
        if arr.size - whole < hex_lanes(dtype, hex_width) and not arr[whole:].any():
            arr = arr[:whole]
    if fmt != "npy":
        if arr.size == 0 or arr.size % per_image:
            raise DumpFormatError(f"{path}: {arr.size} {dtype} elements is not a whole number of images (C, H, W) = "
                                  f"{chw}, {per_image} elements each", "shape")
        arr = arr.reshape((-1,) + chw)                            # (B, C, H, W)
    elif arr.shape == chw:
        arr = arr[None]                                           # (1, C, H, W)
    if arr.ndim != 4 or arr.shape[1:] != chw or arr.shape[0] == 0:
        raise DumpFormatError(f"{path}: shape {arr.shape}, the model's input is (B, {', '.join(map(str, chw))})",
                              "shape")
    return np.ascontiguousarray(arr)


def tensor_scale(qm: QuantizedModel, scale_name: str | None) -> float | None:
    """The real scale a record names for its output (None: several scales, or a file that lacks it)."""
    if scale_name is None or scale_name not in qm.tensors:
        return None
    return float(qm.tensors[scale_name])


def select_dump(qm: QuantizedModel, trace: int_model.Trace, patterns=None) -> tuple[list, list, list]:
    """(ops, tensor names, constant names) of a dump, in execution order: everything, or for shell `patterns`
    the matching ops, their internals and outputs, the tensors they read and the constants they name."""
    if patterns is None:
        return list(trace.ops), list(trace.tensors), list(qm.tensors)
    ops = list(select_ops(trace.ops, patterns))
    if not ops:
        raise ValueError(f"no op matches {', '.join(patterns)} (op names such as {qm.graph[0].name}, blocks.0.*)")
    wanted = {t for op in ops for t in (*op.inputs.values(), *trace.internals.get(op.name, {}).values(), op.name)}
    named = {c for op in ops for c in (*op.constants.values(), op.scale, op.weight_scale) if c}
    return ops, [t for t in trace.tensors if t in wanted], [c for c in qm.tensors if c in named]


def _ticker(progress, total: int):
    """n -> progress(n, total, 'file') at most PROGRESS_STEPS + 1 times over `total` files (no progress: no-op)."""
    step = max(1, total // PROGRESS_STEPS)

    def tick(n: int) -> None:
        if progress and (n % step == 0 or n == total):
            progress(n, total, "file")
    return tick


def write_golden(qm: QuantizedModel, xq: np.ndarray, out_dir, formats=("npy",), input_source: dict | None = None,
                 model_source: dict | None = None, preprocess: dict | None = None, *, internals: bool = False,
                 ops=None, hex_width: int | None = None, c_prefix: str = "", c_split: bool = False,
                 float_tensors: dict | None = None, float_source: dict | None = None, progress=None,
                 kernels: str = "fast") -> dict:
    """Run the integer model on int8 input xq (B, C, H, W) with a trace; dump everything; return the manifest.

    internals: also each kernel's internals (refvit.registry rows); ops: shell patterns selecting ops; hex_width:
    bits per packed hex line; c_prefix: before every C identifier; c_split: one .c with the data and one .h
    with extern declarations instead of a header per array; float_tensors: {tensor name: float array} written
    as float/<name>.npy (float32), float_source: what they are; progress(n, total, unit) as files are written;
    kernels: "fast" or "reference" (refvit.reference: the same bytes, slower)."""
    formats = check_formats(formats)
    check_c_prefix(c_prefix)
    out = Path(out_dir)
    trace = int_model.Trace()
    logits = int_model.forward_int(qm, xq, trace, internals=internals, kernels=kernels)
    patterns = None if ops is None else tuple(ops)
    selected, names, const_names = select_dump(qm, trace, patterns)
    floats = {n: np.asarray(float_tensors[n], np.float32) for n in names if n in (float_tensors or {})}
    arrays = _Arrays(out, formats, hex_width, c_prefix, c_split)
    tick, written = _ticker(progress, len(names) + len(floats) + len(const_names)), 0

    records = {op.name: op for op in trace.ops}
    owner = {t: op for op in trace.ops for t in trace.internals.get(op.name, {}).values()}
    tensors = {}
    for name in names:
        arr, layout = trace.tensors[name], trace.layouts[name]
        op, inside = records.get(name), owner.get(name)
        entry = {"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "layout": layout,
                 "producer": (op or inside).name if (op or inside) else None}
        if inside is not None:
            entry["internal"] = name[len(inside.name) + 1:]
        entry["scale"] = None if inside else tensor_scale(qm, op.scale if op else "input.scale")
        tensors[name] = entry | arrays.write("tensors", name, arr, layout)
        if name in floats:
            tensors[name]["float"] = arrays.write_float(name, floats[name])
        written += 1 + (name in floats)
        tick(written)
    constants = {}
    for name in const_names:
        arr = np.asarray(qm.tensors[name])
        entry = {"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape)} | arrays.write("constants", name, arr)
        if states_value(name, arr):
            entry["value"] = jsonable(arr)
        constants[name] = entry
        written += 1
        tick(written)
    arrays.finish()

    manifest = _manifest(qm, xq, logits, trace, formats, input_source, model_source, preprocess)
    position = {op.name: i for i, op in enumerate(trace.ops)}
    manifest["ops"] = [_op_entry(op, position[op.name], trace, internals) for op in selected]
    manifest |= {"tensors": tensors, "constants": constants}
    if internals:
        manifest["internals"] = _internals_summary(trace)
    if patterns is not None:
        manifest["selection"] = {"ops": list(patterns), "ops_dumped": len(selected), "ops_in_graph": len(trace.ops)}
    if floats:
        manifest["float"] = {"dtype": "float32", "folder": "float", "source": float_source or {},
                             "not_available": [n for n in names if n not in floats and n not in owner]}
    arrays.describe(manifest["encoding"])
    manifest["file_sha256"] = folder_sha256(out)
    (out / "manifest.json").write_text(manifest_json(manifest))
    return manifest


def folder_sha256(folder: Path) -> dict:
    """{path relative to folder (posix): sha256 of its bytes} of every file under folder, sorted by path: what
    `refvit check` verifies before it compares a device (manifest.json itself is not in it)."""
    files = sorted(f for f in Path(folder).rglob("*") if f.is_file() and f.name != "manifest.json")
    return {f.relative_to(folder).as_posix(): file_sha256(f) for f in files}


class _Arrays:
    """Writes arrays in the dump's formats and returns their manifest fields; with c_split, collects the C
    arrays for one .c/.h pair written by `finish`."""

    def __init__(self, out: Path, formats: tuple, hex_width, c_prefix: str, c_split: bool):
        self.out, self.formats, self.hex_width, self.c_prefix = out, formats, hex_width, c_prefix
        self.c_split = c_split and "h" in formats
        self.c_named = bool(c_prefix or c_split) and "h" in formats    # entries name their C symbol
        self.per_array = tuple(f for f in formats if not (self.c_split and f == "h"))
        self.c_arrays: list = []

    def write(self, folder: str, name: str, arr: np.ndarray, layout: str = "") -> dict:
        """{'files': {fmt: path}} (+ 'hex_lanes', 'c_symbol' when those options are on)."""
        files = write_array(arr, self.out / folder, name, self.per_array, layout, self.hex_width, self.c_prefix)
        fields = {"files": {f: f"{folder}/{p}" for f, p in files.items()}}
        if self.hex_width and "hex" in files:
            fields["hex_lanes"] = hex_lanes(arr.dtype, self.hex_width)
        if self.c_named and arr.dtype.kind != "f":
            fields["c_symbol"] = c_identifier(name, self.c_prefix)
            if self.c_split:
                self.c_arrays.append((name, arr, layout))
                fields["files"] |= {"c": self.c_file("c"), "h": self.c_file("h")}
        return fields

    def write_float(self, name: str, arr: np.ndarray) -> str:
        (self.out / "float").mkdir(parents=True, exist_ok=True)
        np.save(self.out / "float" / f"{name}.npy", arr, allow_pickle=False)
        return f"float/{name}.npy"

    def c_file(self, ext: str) -> str:
        return f"{self.c_prefix}{C_SPLIT_STEM}.{ext}"

    def finish(self) -> None:
        if self.c_split:
            write_c_pair(self.out, self.c_arrays, self.c_prefix, C_SPLIT_STEM)

    def describe(self, encoding: dict) -> None:
        if self.hex_width and "hex" in self.formats:
            encoding |= {"hex_width": self.hex_width, "hex_packing": HEX_PACKING}
        if self.c_named:
            encoding["c"] = {"prefix": self.c_prefix, "identifier": "prefix + the name with every character outside "
                             "[A-Za-z0-9_] replaced by _ (t_ first if it would start with a digit)",
                             "layout": ("split: const definitions in " + self.c_file("c") + ", extern declarations in "
                                        + self.c_file("h")) if self.c_split else "one static const header per array"}


def _manifest(qm: QuantizedModel, xq, logits, trace, formats, input_source, model_source, preprocess) -> dict:
    input_bytes = np.ascontiguousarray(xq).tobytes()
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "refvit_version": refvit.__version__,
        "docs": {"format": "golden-format.md", "spec": "spec.md", "where": refvit.DOCS_NOTE},
        "model": {"config": qm.config.to_dict(), "head_mode": qm.head_mode, "source": model_source or {}},
        "quantization": {"scheme": qm.scheme.name, "scheme_choices": qm.scheme.to_dict(), "rounding": qm.rounding,
                         "calibration": jsonable(qm.calibration),
                         **({"prune": qm.metadata()["prune"]} if qm.prune_stages() else {})},
        "input": {"tensor": "input", "dtype": xq.dtype.name, "shape": list(xq.shape),
                  "scale": float(qm.tensors["input.scale"]), "sha256_int8": sha256_bytes(input_bytes),
                  "source": input_source or {"kind": "array"}, "preprocess": preprocess},
        "output": {"tensor": trace.ops[-1].name, "logits_shape": list(logits.shape),
                   "dtype": logits.dtype.name, "scale": float(qm.tensors["logits.scale"]),
                   "logits": logits.tolist() if logits.size <= 10000 else None},
        "formats": list(formats),
        "encoding": {"hex": "one element per line, two's complement, fixed width, lowercase, row-major",
                     "hex_digits": HEX_DIGITS, "bin": "little-endian two's complement, row-major, no header",
                     "h": "static const <stdint type> <sanitized name>[N], row-major; the shape as #define "
                          "<NAME>_NDIM, <NAME>_DIM0 .., <NAME>_COUNT (NAME: the identifier upper-cased)",
                     "bool": "a bool array (a flag constant such as pot_rows) is written as uint8 0 / 1: 2 hex "
                             "digits, one byte in .bin, uint8_t in C; its entry keeps dtype bool"},
    }


def _op_entry(op, index: int, trace, internals: bool) -> dict:
    """The graph's record as it is, with its position `index` (and, with internals, {internal: tensor})."""
    entry = {"index": index, **op.to_dict()}
    if internals and R.row(op.op, op.variant).internals:
        entry["internals"] = dict(trace.internals.get(op.name, {}))
    return entry


def _internals_summary(trace) -> dict:
    """Which kernels of this graph expose internals, and which have none (their output is all they compute)."""
    rows = [R.row(*k) for k in dict.fromkeys((op.op, op.variant) for op in trace.ops)]
    return {"kernels": {r.kernel_name: list(r.internals) for r in rows if r.internals},
            "not_available": [r.kernel_name for r in rows if not r.internals],
            "spec": "docs/spec.md, Internals of the ops (golden --internals)"}
