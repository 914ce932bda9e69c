"""Golden vectors for hardware teams: every intermediate tensor and constant of one integer forward pass.

`write_golden` runs the graph of a QuantizedModel with a Trace and writes, under an output folder,
    tensors/<tensor name>.<fmt>     every op output (and the int8 input) in execution order
    constants/<constant name>.<fmt> every model constant (float64 scales: .npy only)
    manifest.json                   the graph's op records as they are, and an entry per tensor and constant
in the formats of refvit.dumpfmt. docs/golden-format.md describes the manifest (schema version 2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import refvit

from . import int_model
from .dumpfmt import HEX_DIGITS, check_formats, jsonable, manifest_json, sha256_bytes, write_array
from .quantize import QuantizedModel

SCHEMA = "refvit-golden"
SCHEMA_VERSION = 2
SEED_GENERATOR = "numpy PCG64: np.random.default_rng(seed).integers(-128, 128, shape, dtype=np.int8)"
# constants whose values go into the manifest too (small integers a team reads by eye)
_VALUE_SUFFIXES = (".multiplier", ".shift", ".multiplier_a", ".multiplier_b", ".eps_int")


def seed_input(seed: int, shape) -> np.ndarray:
    """The synthetic int8 input of `--seed`: uniform over [-128, 127], see SEED_GENERATOR."""
    return np.random.default_rng(seed).integers(-128, 128, size=tuple(shape), dtype=np.int8)


def tensor_scale(qm: QuantizedModel, scale_name: str | None) -> float | None:
    """The real scale a record names for its output (None: several scales, or a file that lacks it)."""
    if scale_name is None or scale_name not in qm.tensors:
        return None
    return float(qm.tensors[scale_name])


def write_golden(qm: QuantizedModel, xq: np.ndarray, out_dir, formats=("npy",), input_source: dict | None = None,
                 model_source: dict | None = None, preprocess: dict | None = None) -> dict:
    """Run the integer model on int8 input xq (B, C, H, W) with a trace; dump everything; return the manifest."""
    formats = check_formats(formats)
    out = Path(out_dir)
    trace = int_model.Trace()
    logits = int_model.forward_int(qm, xq, trace)
    records = {op.name: op for op in trace.ops}

    tensors = {}
    for name, arr in trace.tensors.items():
        layout = trace.layouts[name]
        files = write_array(arr, out / "tensors", name, formats, layout)
        op = records.get(name)
        tensors[name] = {"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "layout": layout,
                         "producer": op.name if op else None,
                         "scale": tensor_scale(qm, op.scale if op else "input.scale"),
                         "files": {f: f"tensors/{p}" for f, p in files.items()}}
    constants = {}
    for name, arr in qm.tensors.items():
        arr = np.asarray(arr)
        files = write_array(arr, out / "constants", name, formats)
        entry = {"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                 "files": {f: f"constants/{p}" for f, p in files.items()}}
        if arr.dtype.kind == "f" or name.endswith(_VALUE_SUFFIXES):
            entry["value"] = jsonable(arr)
        constants[name] = entry
    ops = [{"index": i, **op.to_dict()} for i, op in enumerate(trace.ops)]   # the graph's records as they are

    input_bytes = np.ascontiguousarray(xq).tobytes()
    manifest = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "refvit_version": refvit.__version__,
        "model": {"config": qm.config.to_dict(), "head_mode": qm.head_mode, "source": model_source or {}},
        "quantization": {"scheme": qm.scheme.name, "scheme_choices": qm.scheme.to_dict(), "rounding": qm.rounding,
                         "calibration": jsonable(qm.calibration)},
        "input": {"tensor": "input", "dtype": xq.dtype.name, "shape": list(xq.shape),
                  "scale": float(qm.tensors["input.scale"]), "sha256_int8": sha256_bytes(input_bytes),
                  "source": input_source or {"kind": "array"}, "preprocess": preprocess},
        "output": {"tensor": trace.ops[-1].name, "logits_shape": list(logits.shape),
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
