"""The conformance suite as another project imports it: tests/conformance_user/ (a partial device model and
its own pytest module, no conftest) run as a pytest session of its own, with the pass / skip counts
asserted; and what a DUT's failure looks like in that project's pytest output."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import conformance
from refvit.intmath import SINGLE_ROUND

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
USER = Path(__file__).resolve().parent / "conformance_user"


@pytest.fixture
def user_project(pytester, monkeypatch):
    """A copy of tests/conformance_user in pytester's folder; the subprocess imports this tree's packages."""
    for name in ("my_device.py", "test_my_device.py"):
        shutil.copy(USER / name, pytester.path / name)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return pytester


def _quick_counts():
    """Counted from the case list and the built cases' own params (not from select's filters)."""
    quick = [s for s in conformance.all_specs() if s.quick]
    mine = [s for s in quick if s.op in ("apply_scale", "requantize")]
    single = [s for s in quick if s.op == "requantize"
              and conformance.get_case(s.name).params["rounding"] == SINGLE_ROUND]
    blocks = [s for s in quick if s.op == "block"]
    return len(quick), len(mine), len(single), len(blocks)


@pytest.mark.slow   # ~3.5 s: the user project's whole quick session (the failure test below runs it quick)
def test_user_project_counts(user_project):
    n, mine, single, blocks = _quick_counts()
    assert mine >= 16 and 0 < single < mine and blocks >= 4
    result = user_project.runpytest_subprocess("-p", "no:cacheprovider", "-rs", "-v")
    result.assert_outcomes(passed=mine + single + blocks, skipped=n - mine)
    out = result.stdout.str()
    assert "test_conformance[requantize_ties_int8_double] PASSED" in out             # ids are the case names
    assert "test_conformance[conv1x1_cin192_cout576_n197_single] SKIPPED" in out
    assert "MyDUT does not implement conv2d" in out                                  # the reason, per op
    assert "MyDUT does not implement layernorm, conv2d" in out and "conformance.RefvitDUT" in out   # a block's


BROKEN = '''
import numpy as np
import conformance
from refvit import int_kernels as K


class Crashing(conformance.RefvitDUT):
    def gelu(self, x, table):
        raise ZeroDivisionError("device fell over")


class OffByOne(conformance.RefvitDUT):
    def gelu(self, x, table):
        return (K.gelu(x, table).astype(np.int16) + (np.asarray(x) == 5)).astype(np.int8)


@conformance.parametrize_cases("quick", dut=Crashing, filter="gelu_sweep")
def test_crash(case):
    conformance.check(Crashing(), case)


@conformance.parametrize_cases("quick", dut=OffByOne, filter="gelu_sweep")
def test_mismatch(case):
    conformance.check(OffByOne(), case)
'''


def test_user_project_sees_the_dut_failure_not_the_library(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(test_broken=BROKEN)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--tb=long")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    # the DUT's own exception and the line that raised it, not an AssertionError made from it
    assert "ZeroDivisionError: device fell over" in out and 'raise ZeroDivisionError("device fell over")' in out
    assert "AssertionError: ERROR" not in out
    # the mismatch: first element, largest difference, the input there (x = 5 at index (0, 133, 0, 0))
    case = conformance.get_case("gelu_sweep_all256")
    first = int(case.inputs["x"].reshape(-1).tolist().index(5))
    assert f"first at index (0, {first}, 0, 0)" in out and "largest difference 1" in out
    assert "inputs there: x=5" in out
    assert "conformance/runner.py" not in out and "conformance/cases.py" not in out   # library frames hidden

