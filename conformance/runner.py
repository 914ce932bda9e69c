"""Run conformance cases against a DUT: PASS / FAIL / ERROR per case, exact integer comparison.

FAIL: the output has the wrong dtype or shape (checked before values) or differing values; the message
names the op, the case, the count of mismatches and the first mismatching element.
ERROR: the DUT raised, or produced no output.

From pytest in another project (the 5-line recipe):

    import conformance
    from my_device import MyDUT

    @conformance.parametrize_cases("quick")        # or pytest.mark.parametrize("case", conformance.pytest_cases())
    def test_conformance(case):
        conformance.check(MyDUT(), case)
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from refvit.check import OK, compare_arrays

from .cases import Case, get_case, select

PASS, FAIL, ERROR = "PASS", "FAIL", "ERROR"


@dataclass(frozen=True)
class Result:
    case: str
    op: str
    status: str
    message: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status:5s} {self.case} ({self.op}, {self.seconds:.2f} s)" + \
            (f"\n      {self.message}" if self.message else "")


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


def run_case(dut, case: Case) -> Result:
    """One case against one DUT. The DUT gets read-only arrays (see `handout`): writing into them is its ERROR."""
    t0 = time.perf_counter()
    where = f"{case.op} [{case.name}]"
    try:
        actual = dut.run_case(handout(case))
    except Exception as e:   # the DUT's own failure, whatever it is, is this case's ERROR
        return Result(case.name, case.op, ERROR, f"ERROR {where}: DUT raised {type(e).__name__}: {e}",
                      time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if actual is None:
        return Result(case.name, case.op, ERROR, f"ERROR {where}: DUT produced no output", seconds)
    diff = compare_arrays(case.expected, actual)
    if diff.status == OK:
        return Result(case.name, case.op, PASS, "", seconds)
    return Result(case.name, case.op, FAIL, f"FAIL {where}: {diff.status}: {diff.describe()}", seconds)


def run_cases(dut, specs, on_result=None) -> list:
    """Build and run each CaseSpec in turn; on_result(result) is called after each (progress printing)."""
    results = []
    for spec in specs:
        try:
            case = get_case(spec.name)
        except Exception as e:   # a case that cannot be built is the suite's bug: report, keep going
            result = Result(spec.name, spec.op, ERROR, f"ERROR {spec.op} [{spec.name}]: case build failed: {e!r}")
        else:
            result = run_case(dut, case)
        results.append(result)
        if on_result:
            on_result(result)
    return results


def summarize(results) -> str:
    n = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, ERROR)}
    return f"{n[PASS]} passed, {n[FAIL]} failed, {n[ERROR]} errors ({len(results)} cases)"


def check(dut, case) -> None:
    """pytest helper: raise AssertionError with the FAIL/ERROR message unless the case passes.

    case: a Case or a case name."""
    result = run_case(dut, get_case(case) if isinstance(case, str) else case)
    if result.status != PASS:
        raise AssertionError(result.message)


def pytest_cases(set_name: str = "quick", filter: str | None = None) -> list:
    """Case names of a set as pytest params (id = case name, built lazily by `check`)."""
    import pytest
    return [pytest.param(s.name, id=s.name) for s in select(set_name, filter)]


def parametrize_cases(set_name: str = "quick", filter: str | None = None):
    """`@parametrize_cases()` == `@pytest.mark.parametrize("case", pytest_cases(...))`."""
    import pytest
    return pytest.mark.parametrize("case", pytest_cases(set_name, filter))
