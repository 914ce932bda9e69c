"""refvit conformance suite: deterministic cases per integer op of the INT8 DeiT spec, a DUT interface,
and a runner usable from pytest or `python -m conformance`. See docs/golden-format.md."""
from .cases import SETS, Case, CaseSpec, all_specs, get_case, select
from .dut import DUT, OPS, DUTError, ExternalCommandDUT, RefvitDUT
from .runner import ERROR, FAIL, PASS, Result, check, parametrize_cases, pytest_cases, run_case, run_cases, summarize

__all__ = ["SETS", "Case", "CaseSpec", "all_specs", "get_case", "select", "DUT", "OPS", "DUTError",
           "ExternalCommandDUT", "RefvitDUT", "PASS", "FAIL", "ERROR", "Result", "check",
           "parametrize_cases", "pytest_cases", "run_case", "run_cases", "summarize"]
