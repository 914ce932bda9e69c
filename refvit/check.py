"""Compare a device's tensor dumps against a golden dump (`refvit golden`): `python -m refvit check GOLDEN ACTUAL`.

For every op of the golden manifest, in execution order, its internals (when the golden has them, `golden
--internals`) and then its output are looked up in ACTUAL (ACTUAL/tensors/<name>.<fmt> or ACTUAL/<name>.<fmt>,
fmt npy, hex or bin, or only the one format asked for; hex and bin take dtype and shape from the manifest).
dtype and shape are checked before values; values compare exactly, or within `atol` LSB (reported apart).
`ops` restricts the comparison to ops matching shell patterns, `present` to the tensors the device dumped;
what is not compared is listed, not failed. Every result names the file it read.
Exit status: 0 all compared tensors match (or are within atol), 1 any difference or missing file, 2 usage
error (bad folder, bad manifest, nothing to compare).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from .dumpfmt import DumpFormatError, file_sha256, packed_hex_note, read_array
from .errors import UsageError
from .golden import SCHEMA

OK, WITHIN, MISMATCH, MISSING, BAD_SHAPE, BAD_DTYPE, UNREADABLE = "OK", "WITHIN", "MISMATCH", "MISSING", \
    "BAD SHAPE", "BAD DTYPE", "UNREADABLE"
PASSING = (OK, WITHIN)
STATUS_ORDER = (OK, WITHIN, MISMATCH, BAD_DTYPE, BAD_SHAPE, UNREADABLE, MISSING)   # of the summary's counts
DUMP_FORMATS = ("npy", "hex", "bin")        # searched in this order
_KIND_STATUS = {"shape": BAD_SHAPE, "dtype": BAD_DTYPE, "format": UNREADABLE}
OUTSIDE_OPS, NOT_DUMPED = "outside --ops", "not dumped by the device"


class CheckUsageError(UsageError):
    """A golden or actual folder that cannot be compared at all (missing, no readable manifest, nothing to compare)."""


# ---------------------------------------------------------------------------------------------
# one array against another (shared with the conformance runner)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Diff:
    """The result of comparing one array with its expected value (`compare_arrays`; public API).

    `ok` is True for OK and WITHIN (every difference within atol); `describe()` is one line for a person;
    `to_dict()` the JSON form of `check --json`. index / expected / actual: the first differing element in
    row-major order (set when values were compared and differ)."""
    status: str                  # OK | WITHIN | BAD DTYPE | BAD SHAPE | MISMATCH (| MISSING | UNREADABLE)
    detail: str = ""
    mismatches: int = 0          # differing elements (WITHIN: all of them within atol)
    total: int = 0
    index: tuple = ()            # multi-index of the first differing element (row-major order)
    expected: int | None = None
    actual: int | None = None
    max_abs_diff: int | None = None   # largest |expected - actual| (OK: 0; None when values were not compared)

    @property
    def ok(self) -> bool:
        """The arrays agree: equal (OK), or every difference within atol (WITHIN)."""
        return self.status in PASSING

    def describe(self) -> str:
        if self.status not in (MISMATCH, WITHIN):
            return self.detail
        return (f"{self.mismatches} of {self.total} elements differ; first at index {self.index}: "
                f"expected {self.expected}, actual {self.actual}")

    def to_dict(self) -> dict:
        compared = self.status in (OK, WITHIN, MISMATCH)
        return {"status": self.status, "elements": self.total if compared else None,
                "differ": self.mismatches if compared else None, "max_abs_diff": self.max_abs_diff,
                "first": {"index": list(self.index), "expected": self.expected, "actual": self.actual}
                if self.mismatches else None, "detail": self.detail or None}


def _max_abs_diff(expected: np.ndarray, actual: np.ndarray, differ: np.ndarray) -> int:
    """max |expected - actual| over the differing elements, exactly (int64 below 64 bits, else Python ints)."""
    e, a = expected[differ], actual[differ]
    if expected.dtype.itemsize < 8:
        return int(np.abs(e.astype(np.int64) - a.astype(np.int64)).max())
    return max(abs(int(x) - int(y)) for x, y in zip(e.tolist(), a.tolist()))


def compare_arrays(expected: np.ndarray, actual, atol: int = 0) -> Diff:
    """Compare a device's array with the expected one, exactly (public API; `check` and the conformance runner
    use it): dtype first (BAD DTYPE), then shape (BAD SHAPE), then integer values (vectorized): OK when equal,
    WITHIN when every difference is at most `atol` (integers, LSB), else MISMATCH. The Diff names the first
    differing element (row-major), both values there, the count of differing elements and the largest
    difference; `Diff.ok` says whether it passes. No file is read: for arrays in memory."""
    if not isinstance(actual, np.ndarray):
        actual = np.asarray(actual)
    if actual.dtype.name != expected.dtype.name:
        return Diff(BAD_DTYPE, f"dtype {actual.dtype.name}, expected {expected.dtype.name}")
    if actual.shape != expected.shape:
        return Diff(BAD_SHAPE, f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    differ = expected != actual
    count = int(np.count_nonzero(differ))
    if count == 0:
        return Diff(OK, total=expected.size, max_abs_diff=0)
    first = int(np.argmax(differ.reshape(-1)))
    index = tuple(int(i) for i in np.unravel_index(first, expected.shape))
    largest = _max_abs_diff(expected, actual, differ)
    return Diff(WITHIN if largest <= atol else MISMATCH, mismatches=count, total=expected.size, index=index,
                expected=expected[index].item(), actual=actual[index].item(), max_abs_diff=largest)


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
    internal: str | None = None  # the op's internal this tensor is (golden --internals), None for its output

    @property
    def ok(self) -> bool:
        return self.diff.status in PASSING

    def line(self, atol: int = 0) -> str:
        head = f"[{self.op_index:3d}] {self.op_name} ({self.op_type})"
        if self.tensor != self.op_name:
            head += f" -> {self.tensor}"
        d = self.diff
        if d.status == OK:
            return f"{head}: OK ({self.file})"
        if d.status == WITHIN:
            return (f"{head}: WITHIN {atol} LSB ({d.mismatches} of {d.total} elements differ, by at most "
                    f"{d.max_abs_diff}) in {self.file}")
        if d.status == MISMATCH:
            return (f"{head}: MISMATCH ({d.mismatches} of {d.total} elements differ, largest difference "
                    f"{d.max_abs_diff}) in {self.file}")
        return f"{head}: {d.status} ({d.detail})" + (f" in {self.file}" if self.file else "")

    def to_dict(self) -> dict:
        return {"index": self.op_index, "op": self.op_name, "op_type": self.op_type, "tensor": self.tensor,
                "internal": self.internal, "file": self.file or None, **self.diff.to_dict()}


@dataclass
class Report:
    golden_dir: Path
    actual_dir: Path
    results: list
    not_compared: list = field(default_factory=list)   # (op index, op name, tensor, why)
    atol: int = 0
    ops: tuple | None = None     # the --ops patterns, if any

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def first_divergence(self) -> TensorResult | None:
        """The first tensor, in execution order, that is not an exact match (WITHIN counts: it differs)."""
        return next((r for r in self.results if r.diff.status != OK), None)

    def counts(self) -> dict:
        """{status: number of tensors}, in STATUS_ORDER."""
        statuses = [r.diff.status for r in self.results]
        return {s: statuses.count(s) for s in STATUS_ORDER if s in statuses}

    def summary(self) -> str:
        """One line: the count of each status, what was compared and what was not."""
        label = {WITHIN: f"WITHIN {self.atol} LSB"}
        counts = ", ".join(f"{n} {label.get(s, s)}" for s, n in self.counts().items())
        line = f"summary: {counts} of {len(self.results)} tensors compared"
        why: dict = {}
        for *_, reason in self.not_compared:
            why[reason] = why.get(reason, 0) + 1
        if why:
            line += "; not compared: " + ", ".join(f"{n} {reason}" for reason, n in why.items())
        return line + ("; PASS" if self.ok else "; FAIL")

    def format(self) -> str:
        lines = [r.line(self.atol) for r in self.results]
        dumped_not = [t for _, _, t, why in self.not_compared if why == NOT_DUMPED]
        if dumped_not:
            lines.append(f"not compared ({NOT_DUMPED}): " + ", ".join(dumped_not))
        first = self.first_divergence
        if first is None:
            lines.append(f"all {len(self.results)} tensors match")
        else:
            lines.append(f"first divergent op: [{first.op_index}] {first.op_name} ({first.op_type}), "
                         f"tensor {first.tensor}" + (f" (internal {first.internal})" if first.internal else ""))
            d = first.diff
            if d.status in (MISMATCH, WITHIN):
                lines.append(f"  first differing element: index {d.index}: expected {d.expected}, actual {d.actual}"
                             f" ({d.mismatches} of {d.total} elements differ, largest difference {d.max_abs_diff})")
            else:
                lines.append(f"  {d.status}: {d.detail}")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        first = self.first_divergence
        return {"golden": str(self.golden_dir), "actual": str(self.actual_dir), "atol": self.atol,
                "ops": list(self.ops) if self.ops else None, "ok": self.ok, "counts": self.counts(),
                "first_divergence": first.to_dict() if first else None,
                "results": [r.to_dict() for r in self.results],
                "not_compared": [{"index": i, "op": op, "tensor": t, "reason": why}
                                 for i, op, t, why in self.not_compared],
                "summary": self.summary()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


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
    verify_golden(Path(golden_dir), manifest)
    return manifest


def verify_golden(folder: Path, manifest: dict) -> None:
    """The golden folder agrees with its manifest: ops listed, every listed file inside the folder and
    present, every file hashing to the sha256 the manifest records for it (`file_sha256`, manifests written
    since it was added), and the int8 input's bytes hashing to the recorded sha256. A broken golden folder is
    a usage error (exit 2) that names the golden folder: it must never be reported as a device mismatch."""
    where = folder / "manifest.json"
    if not manifest["ops"]:
        raise CheckUsageError(f"{where} lists no ops")
    tensors = manifest.get("tensors")
    for i, op in enumerate(manifest["ops"]):
        if not (isinstance(op, dict) and isinstance(op.get("name"), str) and isinstance(op.get("op"), str)
                and isinstance(op.get("index"), int) and isinstance(tensors, dict) and op["name"] in tensors
                and isinstance(op.get("internals", {}), dict)):
            raise CheckUsageError(f"{where}: op entry {i} is malformed (needs index, name, op, and its tensor)")
    root = folder.resolve()
    try:
        entries = list(manifest["tensors"].values()) + list(manifest.get("constants", {}).values())
        for entry in entries:
            for rel in entry["files"].values():
                f = (folder / rel).resolve()
                if Path(rel).is_absolute() or root not in f.parents:
                    raise CheckUsageError(f"{where}: file {rel!r} of {entry['name']} points outside the golden folder")
                if not f.is_file():
                    raise CheckUsageError(f"golden folder {folder} is incomplete: {rel} (listed in the manifest) "
                                          f"is missing")
        _verify_file_hashes(folder, manifest.get("file_sha256", {}))
        inp = manifest["input"]
        if inp.get("tensor") in manifest["tensors"]:
            arr = read_array(folder / manifest["tensors"][inp["tensor"]]["files"]["npy"])
            if hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() != inp["sha256_int8"]:
                raise CheckUsageError(f"golden folder {folder}: its input tensor does not match the manifest's "
                                      f"sha256 (files from another run?)")
    except CheckUsageError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, OSError) as e:    # DumpFormatError is a ValueError
        raise CheckUsageError(f"{where}: malformed manifest or files ({type(e).__name__}: {e})"[:400]) from None


def _verify_file_hashes(folder: Path, hashes: dict) -> None:
    """Every file the manifest hashes still has those bytes; the first that does not is blamed on the golden side."""
    if not isinstance(hashes, dict):
        raise CheckUsageError(f"{folder / 'manifest.json'}: file_sha256 is not an object {{file: sha256}}")
    root = folder.resolve()
    for rel, digest in hashes.items():
        f = (folder / rel).resolve()
        if Path(rel).is_absolute() or root not in f.parents:
            raise CheckUsageError(f"{folder / 'manifest.json'}: file {rel!r} points outside the golden folder")
        if not f.is_file():
            raise CheckUsageError(f"golden folder {folder} is incomplete: {rel} (listed in the manifest) is missing")
        if file_sha256(f) != digest:
            raise CheckUsageError(f"golden folder {folder} was modified: {rel} no longer matches the sha256 its "
                                  f"manifest records (edited after `refvit golden` wrote it); the golden side is "
                                  f"broken, the device was not compared")


def find_dump(actual_dir: Path, name: str, formats=DUMP_FORMATS) -> Path | None:
    """The device's dump of tensor `name`: tensors/ subfolder first, then flat; in `formats` order (npy, hex,
    bin). A format not asked for is never read in its place."""
    for folder in (actual_dir / "tensors", actual_dir):
        for fmt in formats:
            path = folder / f"{name}.{fmt}"
            if path.is_file():
                return path
    return None


def _check_tensor(golden_dir: Path, actual_dir: Path, entry: dict, formats, atol: int,
                  hex_width: int | None) -> tuple[Diff, str]:
    name = entry["name"]
    path = find_dump(actual_dir, name, formats)
    if path is None:
        return Diff(MISSING, f"no {name}.{'/.'.join(formats)} in {actual_dir} or its tensors/ folder"), ""
    try:
        expected = read_array(golden_dir / entry["files"]["npy"])
    except DumpFormatError as e:
        raise CheckUsageError(f"golden dump unreadable: {e}") from None
    shown = str(path.relative_to(actual_dir))
    try:
        actual = read_array(path, expected.dtype, expected.shape, hex_width)
    except DumpFormatError as e:
        if path.suffix == ".hex" and packed_hex_note(path, expected.dtype, hex_width):   # not the device's fault
            raise CheckUsageError(f"the device's hex dumps are packed: {e}") from None
        return Diff(_KIND_STATUS[e.kind], str(e)), shown
    return compare_arrays(expected, actual, atol), shown


def _tensors_of(op: dict, manifest: dict) -> list:
    """(tensor entry, internal name or None) of an op, in computation order: its internals, then its output."""
    inside = [(manifest["tensors"][t], i) for i, t in (op.get("internals") or {}).items() if t in manifest["tensors"]]
    return inside + [(manifest["tensors"][op["name"]], None)]


def compare_dumps(golden_dir, actual_dir, *, ops=None, present: bool = False, atol: int = 0, formats=DUMP_FORMATS,
                  hex_width: int | None = None) -> Report:
    """Every op of the golden manifest, in execution order (its internals, then its output), against the
    device's dump. ops: shell patterns (only matching ops); present: only the tensors the device dumped;
    atol: differences up to atol are WITHIN (passing), not MISMATCH; formats: the device formats looked for;
    hex_width: the device's hex lines are packed (see dumpfmt.hex_lines)."""
    golden_dir, actual_dir = Path(golden_dir), Path(actual_dir)
    manifest = load_manifest(golden_dir)
    if not actual_dir.is_dir():
        raise CheckUsageError(f"actual dump folder not found: {actual_dir}")
    if atol < 0:
        raise CheckUsageError(f"atol must be a non-negative integer, got {atol}")
    patterns = tuple(ops) if ops else None
    results, skipped = [], []
    try:
        for op in manifest["ops"]:
            chosen = patterns is None or any(fnmatchcase(op["name"], p) for p in patterns)
            for entry, internal in _tensors_of(op, manifest):
                where = (op["index"], op["name"], entry["name"])
                if not chosen:
                    skipped.append((*where, OUTSIDE_OPS))
                elif present and find_dump(actual_dir, entry["name"], formats) is None:
                    skipped.append((*where, NOT_DUMPED))
                else:
                    diff, shown = _check_tensor(golden_dir, actual_dir, entry, formats, atol, hex_width)
                    results.append(TensorResult(op["index"], op["name"], op["op"], entry["name"], diff, shown,
                                                internal))
    except (KeyError, TypeError) as e:
        raise CheckUsageError(f"{golden_dir / 'manifest.json'}: malformed op entry ({e!r})") from None
    if patterns and not any(why != OUTSIDE_OPS for *_, why in skipped) and not results:
        raise CheckUsageError(f"no op of {golden_dir / 'manifest.json'} matches --ops {','.join(patterns)}")
    if not results:
        raise CheckUsageError(f"nothing to compare: no dump of any golden tensor ({'/'.join(formats)}) in "
                              f"{actual_dir} or its tensors/ folder")
    return Report(golden_dir, actual_dir, results, skipped, atol, patterns)
