"""A conformance case as a folder: case.json + its inputs (and expected output) as npy / hex / bin files.

The same layout serves the external-command DUT (the program reads the inputs and writes `out.npy` or
`out.hex`) and `python -m conformance write` (golden files with `expected.*`, for teams without Python).
File encodings are refvit's golden formats (refvit/dumpfmt.py, docs/golden-format.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import refvit
from refvit.dumpfmt import DumpFormatError, read_array, write_array

CASE_SCHEMA = "refvit-conformance-case"
CASE_SCHEMA_VERSION = 1
OUTPUT_NAME = "out"
EXPECTED_NAME = "expected"


def _entry(arr: np.ndarray, name: str, files: dict, prefix: str = "") -> dict:
    return {"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
            "files": {f: prefix + p for f, p in files.items()}}


def write_case(case, folder, formats=("npy", "hex"), with_expected: bool = True) -> dict:
    """Write the case into `folder`; return (and write) its case.json content."""
    folder = Path(folder)
    inputs = []
    for name, value in case.inputs.items():
        if isinstance(value, dict):   # a named group of constants (block / model): a subfolder
            entries = [_entry(np.asarray(a), k, write_array(np.asarray(a), folder / name, k, formats), f"{name}/")
                       for k, a in value.items()]
            inputs.append({"name": name, "kind": "group", "entries": entries})
        else:
            arr = np.asarray(value)
            inputs.append(_entry(arr, name, write_array(arr, folder, name, formats)))
    exp = case.expected
    output = {"name": OUTPUT_NAME, "dtype": exp.dtype.name, "shape": list(exp.shape),
              "files": {f: f"{OUTPUT_NAME}.{f}" for f in ("npy", "hex", "bin")}}
    meta = {"schema": CASE_SCHEMA, "schema_version": CASE_SCHEMA_VERSION, "refvit_version": refvit.__version__,
            "name": case.name, "op": case.op, "note": case.note, "inputs": inputs, "params": case.params,
            "output": output}
    if with_expected:
        meta["expected"] = _entry(exp, EXPECTED_NAME, write_array(exp, folder, EXPECTED_NAME, formats))
    (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_output(folder, output: dict):
    """The DUT's output in `folder` (npy, hex or bin as named in case.json), or None when there is none.

    hex/bin take dtype and shape from the case; a file of the wrong size raises DumpFormatError."""
    for fmt in ("npy", "hex", "bin"):
        path = Path(folder) / output["files"][fmt]
        if path.is_file():
            return read_array(path, np.dtype(output["dtype"]), tuple(output["shape"]))
    return None


def read_case_inputs(folder) -> tuple[dict, dict]:
    """(case.json, {input name: array or {constant name: array}}) of a case folder: what a DUT program reads."""
    folder = Path(folder)
    meta = json.loads((folder / "case.json").read_text())

    def load(e):
        return read_array(folder / e["files"]["npy"]) if "npy" in e["files"] else \
            read_array(folder / next(iter(e["files"].values())), np.dtype(e["dtype"]), tuple(e["shape"]))
    inputs = {}
    for e in meta["inputs"]:
        inputs[e["name"]] = {c["name"]: load(c) for c in e["entries"]} if e.get("kind") == "group" else load(e)
    return meta, inputs


__all__ = ["write_case", "read_output", "read_case_inputs", "DumpFormatError", "OUTPUT_NAME", "EXPECTED_NAME"]
