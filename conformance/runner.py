"""Run conformance cases against a DUT: PASS / FAIL / ERROR / SKIP per case, exact integer comparison.

FAIL: the output has the wrong dtype or shape (checked before values) or differing values; the message
names the op, the case, the count of mismatches, the first mismatching element, the largest difference,
the case's inputs at that element and the case's note.
ERROR: the DUT raised, or produced no output.
SKIP: the DUT does not implement a method the case needs (`missing_methods`): its method is still the stub
of `conformance.DUT`. Block and model cases need every per-op method their graph calls (pure data movement
excepted); a DUT that also inherits `RefvitDUT` (`class Mine(MyDUT, conformance.RefvitDUT)`) gets refvit's
for the rest, and runs them all.

From pytest in another project (docs/golden-format.md, "From pytest"):

    import conformance
    from my_device import MyDUT

    @conformance.parametrize_cases("quick", dut=MyDUT)     # one test per case; SKIP the ops MyDUT lacks
    def test_conformance(case):
        conformance.check(MyDUT(), case)
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refvit.check import CheckUsageError, Diff, compare_arrays, load_manifest
from refvit.dumpfmt import read_array
from refvit.graph import graph_from_dicts, op_from_manifest

from .cases import Case, get_case, select
from .dut import DUT

PASS, FAIL, ERROR, SKIP = "PASS", "FAIL", "ERROR", "SKIP"
STATUSES = (PASS, FAIL, ERROR, SKIP)
COMPOSITES = ("block", "model")      # cases that run a graph with the DUT's per-op methods


@dataclass(frozen=True)
class Result:
    case: str
    op: str
    status: str
    message: str = ""
    seconds: float = 0.0
    kind: str = ""          # FAIL: the comparison's status (MISMATCH, BAD DTYPE, BAD SHAPE); ERROR: what failed
    missing: tuple = ()     # SKIP: the methods the DUT lacks

    def line(self) -> str:
        if self.status == SKIP:
            return f"SKIP  {self.case} ({self.op}, not implemented by the DUT)"
        return f"{self.status:5s} {self.case} ({self.op}, {self.seconds:.2f} s)" + \
            (f"\n      {self.message}" if self.message else "")


# ---------------------------------------------------------------------------------------------
# what a DUT implements
# ---------------------------------------------------------------------------------------------

def _dut_class(dut) -> type:
    return dut if isinstance(dut, type) else type(dut)


def _is_stub(fn) -> bool:
    """fn (a function or a bound method) is one of conformance.DUT's method stubs."""
    func = getattr(fn, "__func__", fn)
    return bool(getattr(func, "not_implemented", False)) or func is getattr(DUT, getattr(func, "__name__", ""), None)


def implements(dut, method: str) -> bool:
    """The DUT (a class or an instance) has its own `method`: it is defined and is not conformance.DUT's stub
    (decided by the function the class resolves, never by calling it)."""
    if not isinstance(dut, type) and method in getattr(dut, "__dict__", {}):
        return True
    found = getattr(_dut_class(dut), method, None)
    return callable(found) and not _is_stub(found)


def runs_whole_cases(dut) -> bool:
    """The DUT overrides run_case (ExternalCommandDUT, a simulator wrapper): it takes every case itself."""
    return implements(dut, "run_case") or not issubclass(_dut_class(dut), DUT)


def method_for(dut, op):
    """What computes an op record on this DUT (DUT.kernel_for: its method named Op.kernel, or refvit's own for
    pure data movement it lacks), or None when that is still conformance.DUT's stub. dut: class or instance."""
    fn = DUT.kernel_for(dut, op)
    return None if _is_stub(fn) else fn


def missing_methods(dut, case) -> list:
    """The methods `case` (a Case or a CaseSpec) needs that the DUT does not implement: its op; for block and
    model cases that the DUT does not override, every per-op method their graph calls (pure data movement
    excepted: refvit's serves), in first-use order. [] when the DUT can run the case."""
    if runs_whole_cases(dut) or implements(dut, case.op):
        return []
    if case.op not in COMPOSITES:
        return [case.op]
    graph = graph_from_dicts(list((case if isinstance(case, Case) else get_case(case.name)).params["graph"]))
    return list(dict.fromkeys(op.kernel for op in graph if method_for(dut, op) is None))


def skip_reason(dut, case, missing: list) -> str:
    name = _dut_class(dut).__name__
    if case.op not in COMPOSITES:
        return f"{name} does not implement {case.op}"
    return (f"{name} does not implement {', '.join(missing)}, which this {case.op}'s graph calls (inherit "
            f"conformance.RefvitDUT too, `class Mine({name}, conformance.RefvitDUT)`, to use refvit's for them)")


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------

def _readonly_view(value):
    """A read-only view of an array (a DUT cannot write through it, nor make it writeable when the case's own
    array is read-only, as get_case makes it); dicts and lists are rebuilt, so a DUT that edits its constants
    dict or its params changes only its own copy."""
    if isinstance(value, np.ndarray):
        view = value.view()
        view.flags.writeable = False
        return view
    if isinstance(value, dict):
        return {k: _readonly_view(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_readonly_view(v) for v in value]
    return value


def handout(case: Case) -> Case:
    """What a DUT is given: the same case with read-only views of its arrays in fresh containers."""
    return dataclasses.replace(case, inputs=_readonly_view(case.inputs), params=_readonly_view(case.params),
                               expected=_readonly_view(case.expected))


def call_dut(dut, case: Case):
    """The DUT's output for the case: its run_case when it overrides it, else its method named `case.op` called
    directly (what DUT.run_case does), so an exception's traceback starts at the DUT's own code."""
    __tracebackhide__ = True
    given = handout(case)
    if runs_whole_cases(dut):
        return dut.run_case(given)
    return getattr(dut, case.op)(*given.inputs.values(), **given.params)


# the inputs of an op that index to one output element: ELEMENT (broadcast to the output's shape) or CHANNEL
# (one per output channel, axis 1); 0-d inputs (scalar constants) apply to every element and are always shown
ELEMENT, CHANNEL = "element", "channel"
_SCALED = {"value": ELEMENT, "multiplier": ELEMENT, "shift": ELEMENT}
_CONV = {"bias": CHANNEL, "multiplier": CHANNEL, "shift": CHANNEL, "pot_rows": CHANNEL}
_LAYERNORM = {"x": ELEMENT, "gamma": CHANNEL, "bias": CHANNEL, "multiplier": CHANNEL, "shift": CHANNEL}
ELEMENT_INPUTS = {
    "apply_scale": _SCALED, "requantize": _SCALED, "conv2d": _CONV, "conv2d_w4": _CONV, "conv2d_mixed_pot": _CONV,
    "add": {"a": ELEMENT, "b": ELEMENT}, "add_wide": {"a": ELEMENT, "b": ELEMENT}, "gelu": {"x": ELEMENT},
    "gelu_poly": {"x": ELEMENT}, "gelu_shift": {"x": ELEMENT}, "softmax": {"scores": ELEMENT},
    "softmax_poly": {"scores": ELEMENT}, "softmax_shift": {"scores": ELEMENT}, "layernorm": _LAYERNORM,
    "layernorm_int32": _LAYERNORM, "layernorm_wide": _LAYERNORM,
}


def inputs_at(case: Case, index: tuple) -> str:
    """The case's inputs at output element `index`, as `name=value` (per-channel ones as `name[c]=value`)."""
    roles, shape, parts = ELEMENT_INPUTS.get(case.op, {}), case.expected.shape, []
    for name, value in case.inputs.items():
        if isinstance(value, dict):
            continue
        arr, role = np.asarray(value), roles.get(name)
        try:
            if arr.ndim == 0:
                parts.append(f"{name}={arr.item()}")
            elif role == ELEMENT:
                parts.append(f"{name}={np.broadcast_to(arr, shape)[index].item()}")
            elif role == CHANNEL and len(index) > 1 and arr.shape == (shape[1],):
                parts.append(f"{name}[{index[1]}]={arr[index[1]].item()}")
        except (ValueError, IndexError):       # an input that does not line up with this output: not shown
            continue
    return ", ".join(parts)


def failure_message(case: Case, diff: Diff) -> str:
    """`FAIL op [case]: STATUS: detail`; for differing values also the largest difference, the inputs at the
    first differing element and the case's note."""
    msg = f"FAIL {case.op} [{case.name}]: {diff.status}: {diff.describe()}"
    if diff.mismatches:
        msg += f"; largest difference {diff.max_abs_diff}"
        there = inputs_at(case, diff.index)
        if there:
            msg += f"; inputs there: {there}"
    return msg + (f"; case note: {case.note}" if case.note else "")


def run_case(dut, case: Case) -> Result:
    """One case against one DUT. The DUT gets read-only arrays (see `handout`): writing into them is its ERROR.
    A case needing a method the DUT does not implement is SKIP (missing_methods)."""
    t0 = time.perf_counter()
    where = f"{case.op} [{case.name}]"
    missing = missing_methods(dut, case)
    if missing:
        return Result(case.name, case.op, SKIP, f"SKIP {where}: {skip_reason(dut, case, missing)}",
                      missing=tuple(missing))
    try:
        actual = call_dut(dut, case)
    except Exception as e:   # the DUT's own failure, whatever it is, is this case's ERROR
        return Result(case.name, case.op, ERROR, f"ERROR {where}: DUT raised {type(e).__name__}: {e}",
                      time.perf_counter() - t0, type(e).__name__)
    seconds = time.perf_counter() - t0
    if actual is None:
        return Result(case.name, case.op, ERROR, f"ERROR {where}: DUT produced no output", seconds, "no output")
    diff = compare_arrays(case.expected, actual)
    if diff.ok:
        return Result(case.name, case.op, PASS, "", seconds)
    return Result(case.name, case.op, FAIL, failure_message(case, diff), seconds, diff.status)


def run_cases(dut, specs, on_result=None) -> list:
    """Build and run each CaseSpec in turn; on_result(result) is called after each (progress printing).
    Per-op cases the DUT cannot run are SKIP without being built."""
    results = []
    for spec in specs:
        if spec.op not in COMPOSITES and missing_methods(dut, spec):
            result = Result(spec.name, spec.op, SKIP,
                            f"SKIP {spec.op} [{spec.name}]: {skip_reason(dut, spec, [spec.op])}", missing=(spec.op,))
        else:
            try:
                case = get_case(spec.name)
            except Exception as e:   # a case that cannot be built is the suite's bug: report, keep going
                result = Result(spec.name, spec.op, ERROR,
                                f"ERROR {spec.op} [{spec.name}]: case build failed: {e!r}", kind="case build")
            else:
                result = run_case(dut, case)
        results.append(result)
        if on_result:
            on_result(result)
    return results


def skipped_methods(results) -> list:
    """The methods the skipped cases needed, in first-seen order."""
    return list(dict.fromkeys(m for r in results if r.status == SKIP for m in r.missing))


def summarize(results) -> str:
    """`N passed, N failed, N errors, N skipped (M cases)`, and the methods the skipped cases needed."""
    n = {s: sum(r.status == s for r in results) for s in STATUSES}
    line = f"{n[PASS]} passed, {n[FAIL]} failed, {n[ERROR]} errors, {n[SKIP]} skipped ({len(results)} cases)"
    if n[SKIP]:
        line += f"; skipped, not implemented by the DUT: {', '.join(skipped_methods(results))}"
    return line


def junit_xml(results, suite: str = "conformance") -> str:
    """JUnit XML for CI dashboards: one <testsuite>, one <testcase> per case (classname `conformance.<op>`,
    name = the case), with a <failure> (FAIL), <error> (ERROR) or <skipped> (SKIP) element carrying the
    message; counts and seconds on the suite."""
    import xml.etree.ElementTree as ET
    n = {s: sum(r.status == s for r in results) for s in STATUSES}
    total = sum(r.seconds for r in results)
    root = ET.Element("testsuites", name=suite, tests=str(len(results)), failures=str(n[FAIL]),
                      errors=str(n[ERROR]), skipped=str(n[SKIP]), time=f"{total:.3f}")
    node = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)), failures=str(n[FAIL]),
                         errors=str(n[ERROR]), skipped=str(n[SKIP]), time=f"{total:.3f}")
    child = {FAIL: "failure", ERROR: "error", SKIP: "skipped"}
    for r in results:
        case = ET.SubElement(node, "testcase", classname=f"conformance.{r.op}", name=r.case, time=f"{r.seconds:.3f}")
        if r.status in child:
            element = ET.SubElement(case, child[r.status], message=r.message)
            if r.status != SKIP:
                element.set("type", r.kind or r.status)
                element.text = r.message
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# ---------------------------------------------------------------------------------------------
# pytest
# ---------------------------------------------------------------------------------------------

def check(dut, case) -> None:
    """pytest helper: run one case; return when it passes.

    case: a Case or a case name. A mismatch (dtype, shape or values) raises AssertionError with the FAIL
    message (first element, largest difference, inputs there, case note); the DUT's own exception propagates
    as it is, with its own traceback (not rewritten into an assertion); a case needing a method the DUT does
    not implement is skipped (pytest.skip, with the reason). The suite's own frames are hidden from pytest's
    tracebacks (__tracebackhide__)."""
    __tracebackhide__ = True
    case = get_case(case) if isinstance(case, str) else case
    missing = missing_methods(dut, case)
    if missing:
        import pytest
        pytest.skip(skip_reason(dut, case, missing))
    actual = call_dut(dut, case)
    if actual is None:
        raise AssertionError(f"ERROR {case.op} [{case.name}]: DUT produced no output")
    diff = compare_arrays(case.expected, actual)
    if not diff.ok:
        raise AssertionError(failure_message(case, diff))


def pytest_cases(set_name: str = "quick", filter: str | None = None, *, dut=None, ops=None,
                 rounding: str | None = None) -> list:
    """The cases of a set as pytest params, id = case name (built lazily by `check`), narrowed as
    `select(set_name, filter, ops=ops, rounding=rounding)`. dut (a DUT class or instance): per-op cases of
    methods it does not implement carry a skip mark with the reason (block and model cases are decided by
    `check`, which knows their graph)."""
    import pytest
    params = []
    for spec in select(set_name, filter, ops=ops, rounding=rounding):
        missing = [] if dut is None or spec.op in COMPOSITES else missing_methods(dut, spec)
        marks = [pytest.mark.skip(reason=skip_reason(dut, spec, missing))] if missing else []
        params.append(pytest.param(spec.name, id=spec.name, marks=marks))
    return params


def parametrize_cases(set_name: str = "quick", filter: str | None = None, *, dut=None, ops=None,
                      rounding: str | None = None):
    """`@parametrize_cases("quick", dut=MyDUT, ops=..., rounding=...)` ==
    `@pytest.mark.parametrize("case", pytest_cases(...))`: one test per case, named by it."""
    import pytest
    return pytest.mark.parametrize("case", pytest_cases(set_name, filter, dut=dut, ops=ops, rounding=rounding))


# ---------------------------------------------------------------------------------------------
# one op of a golden dump (`refvit golden`)
# ---------------------------------------------------------------------------------------------

def _golden_array(folder: Path, entry: dict) -> np.ndarray:
    files = entry["files"]
    if "npy" in files:
        return read_array(folder / files["npy"])
    fmt = next(f for f in ("hex", "bin") if f in files)
    return read_array(folder / files[fmt], np.dtype(entry["dtype"]), tuple(entry["shape"]))


def golden_op_arguments(golden_dir, name: str) -> tuple:
    """(Op, keyword arguments, expected output) of the manifest op `name` of a golden folder: its input tensors
    and constants by kernel argument name, read from the folder, then its attrs (rounding, out_dtype as
    strings, as conformance cases pass them); the expected output is its dumped tensor."""
    folder = Path(golden_dir)
    manifest = load_manifest(folder)
    entries = {e.get("name"): e for e in manifest["ops"]}
    if name not in entries:
        shown = ", ".join(list(entries)[:5])
        raise CheckUsageError(f"{folder / 'manifest.json'} has no op {name!r} (ops such as {shown})")
    op = op_from_manifest(entries[name])
    tables = (("tensor", manifest["tensors"], op.inputs), ("constant", manifest.get("constants", {}), op.constants))
    args = {}
    for kind, table, names in tables:
        for arg, stored in names.items():
            if stored not in table:
                raise CheckUsageError(f"golden folder {folder} lacks {kind} {stored!r}, which op {name!r} reads "
                                      f"(a `golden --ops` subset without it?)")
            args[arg] = _golden_array(folder, table[stored])
    return op, args | dict(op.attrs), _golden_array(folder, manifest["tensors"][op.name])


def run_golden_op(golden_dir, name: str, dut_or_fn, *, atol: int = 0) -> Diff:
    """Run one op of a golden dump on a DUT, or on a plain function, and compare it with the dumped output.

    The op's inputs and constants are read from the folder (golden_op_arguments); dut_or_fn is a DUT (its
    method for the op's (op, variant): `Op.kernel`; pure data movement falls back to refvit's) or a function
    taking the kernel's keyword arguments. The result is reshaped (row-major, same elements) to the record's
    shape when the element count agrees, then compared (refvit.check.compare_arrays; `Diff.ok`). The DUT's
    exceptions propagate; a DUT that does not implement the method raises NotImplementedError before running.
    Anything that is not a conformance.DUT is called as the function."""
    __tracebackhide__ = True
    op, args, expected = golden_op_arguments(golden_dir, name)
    fn = method_for(dut_or_fn, op) if isinstance(dut_or_fn, DUT) else dut_or_fn
    if fn is None:
        raise NotImplementedError(f"{_dut_class(dut_or_fn).__name__} does not implement {op.kernel}, the method "
                                  f"of op {name!r} ({op.op}, {op.variant})")
    actual = np.asarray(fn(**_readonly_view(args)))
    if actual.size == expected.size:
        actual = actual.reshape(expected.shape)                   # the record's layout, same elements
    return compare_arrays(expected, actual, atol)
