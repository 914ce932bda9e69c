"""Compare a device's tensor dumps against a golden dump (`refvit golden`): `python -m refvit check GOLDEN ACTUAL`.

For every op of the golden manifest, in execution order, each output tensor is looked up in ACTUAL
(ACTUAL/tensors/<name>.<fmt> or ACTUAL/<name>.<fmt>, fmt npy, hex or bin; hex and bin take dtype and
shape from the manifest). dtype and shape are checked before values; values compare exactly.
Exit status: 0 all match, 1 any difference or missing file, 2 usage error (bad folder, bad manifest).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dumpfmt import DumpFormatError, read_array
from .golden import SCHEMA

OK, MISMATCH, MISSING, BAD_SHAPE, BAD_DTYPE, UNREADABLE = "OK", "MISMATCH", "MISSING", "BAD SHAPE", "BAD DTYPE", \
    "UNREADABLE"
DUMP_FORMATS = ("npy", "hex", "bin")        # searched in this order
_KIND_STATUS = {"shape": BAD_SHAPE, "dtype": BAD_DTYPE, "format": UNREADABLE}


class CheckUsageError(ValueError):
    """A golden or actual folder that cannot be compared at all (missing, no readable manifest)."""


# ---------------------------------------------------------------------------------------------
# one array against another (shared with the conformance runner)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Diff:
    status: str                  # OK | BAD DTYPE | BAD SHAPE | MISMATCH
    detail: str = ""
    mismatches: int = 0          # differing elements
    total: int = 0
    index: tuple = ()            # multi-index of the first differing element (row-major order)
    expected: int | None = None
    actual: int | None = None

    def describe(self) -> str:
        if self.status != MISMATCH:
            return self.detail
        return (f"{self.mismatches} of {self.total} elements differ; first at index {self.index}: "
                f"expected {self.expected}, actual {self.actual}")


def compare_arrays(expected: np.ndarray, actual) -> Diff:
    """dtype, then shape, then exact integer values (vectorized); reports the first differing element."""
    if not isinstance(actual, np.ndarray):
        actual = np.asarray(actual)
    if actual.dtype.name != expected.dtype.name:
        return Diff(BAD_DTYPE, f"dtype {actual.dtype.name}, expected {expected.dtype.name}")
    if actual.shape != expected.shape:
        return Diff(BAD_SHAPE, f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    differ = expected != actual
    count = int(np.count_nonzero(differ))
    if count == 0:
        return Diff(OK, total=expected.size)
    first = int(np.argmax(differ.reshape(-1)))
    index = tuple(int(i) for i in np.unravel_index(first, expected.shape))
    return Diff(MISMATCH, mismatches=count, total=expected.size, index=index,
                expected=expected[index].item(), actual=actual[index].item())


# ---------------------------------------------------------------------------------------------
# dumps against a golden manifest
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorResult:
    op_index: int
    op_name: str
    op_type: str
    tensor: str
    diff: Diff
    file: str = ""               # the device file compared ('' when missing)

    @property
    def ok(self) -> bool:
        return self.diff.status == OK

    def line(self) -> str:
        head = f"[{self.op_index:3d}] {self.op_name} ({self.op_type})"
        if self.tensor != self.op_name:
            head += f" -> {self.tensor}"
        d = self.diff
        if d.status == OK:
            return f"{head}: OK"
        if d.status == MISMATCH:
            return f"{head}: MISMATCH ({d.mismatches} of {d.total} elements differ) in {self.file}"
        return f"{head}: {d.status} ({d.detail})"


@dataclass
class Report:
    golden_dir: Path
    actual_dir: Path
    results: list

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def first_divergence(self) -> TensorResult | None:
        return next((r for r in self.results if not r.ok), None)

    def counts(self) -> dict:
        out: dict = {}
        for r in self.results:
            out[r.diff.status] = out.get(r.diff.status, 0) + 1
        return out

    def format(self) -> str:
        lines = [r.line() for r in self.results]
        first = self.first_divergence
        if first is None:
            lines.append(f"all {len(self.results)} op outputs match")
        else:
            lines.append(f"first divergent op: [{first.op_index}] {first.op_name} ({first.op_type}), "
                         f"tensor {first.tensor}")
            d = first.diff
            if d.status == MISMATCH:
                lines.append(f"  first differing element: index {d.index}: expected {d.expected}, actual {d.actual}"
                             f" ({d.mismatches} of {d.total} elements differ)")
            else:
                lines.append(f"  {d.status}: {d.detail}")
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        lines.append(f"summary: {counts} of {len(self.results)} op outputs")
        return "\n".join(lines)


def load_manifest(golden_dir) -> dict:
    path = Path(golden_dir) / "manifest.json"
    if not Path(golden_dir).is_dir():
        raise CheckUsageError(f"golden folder not found: {golden_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckUsageError(f"cannot read golden manifest {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or not isinstance(manifest.get("ops"), list):
        raise CheckUsageError(f"{path} is not a {SCHEMA} manifest (written by `refvit golden`)")
    return manifest


def find_dump(actual_dir: Path, name: str) -> Path | None:
    """The device's dump of tensor `name`: tensors/ subfolder first, then flat; npy, hex, bin."""
    for folder in (actual_dir / "tensors", actual_dir):
        for fmt in DUMP_FORMATS:
            path = folder / f"{name}.{fmt}"
            if path.is_file():
                return path
    return None


def _check_tensor(golden_dir: Path, actual_dir: Path, entry: dict) -> tuple[Diff, str]:
    name = entry["name"]
    path = find_dump(actual_dir, name)
    if path is None:
        return Diff(MISSING, f"no {name}.npy/.hex/.bin in {actual_dir} or its tensors/ folder"), ""
    try:
        expected = read_array(golden_dir / entry["files"]["npy"])
    except DumpFormatError as e:
        raise CheckUsageError(f"golden dump unreadable: {e}") from None
    shown = str(path.relative_to(actual_dir))
    try:
        actual = read_array(path, expected.dtype, expected.shape)
    except DumpFormatError as e:
        return Diff(_KIND_STATUS[e.kind], str(e)), shown
    return compare_arrays(expected, actual), shown


def compare_dumps(golden_dir, actual_dir) -> Report:
    """Every op output of the golden manifest, in execution order, against the device's dump."""
    golden_dir, actual_dir = Path(golden_dir), Path(actual_dir)
    manifest = load_manifest(golden_dir)
    if not actual_dir.is_dir():
        raise CheckUsageError(f"actual dump folder not found: {actual_dir}")
    results = []
    try:
        for op in manifest["ops"]:
            entry = manifest["tensors"][op["name"]]
            diff, shown = _check_tensor(golden_dir, actual_dir, entry)
            results.append(TensorResult(op["index"], op["name"], op["op"], entry["name"], diff, shown))
    except (KeyError, TypeError) as e:
        raise CheckUsageError(f"{golden_dir / 'manifest.json'}: malformed op entry ({e!r})") from None
    return Report(golden_dir, actual_dir, results)
