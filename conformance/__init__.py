"""refvit conformance suite: deterministic cases per integer op of the INT8 DeiT spec, a DUT interface,
and a runner usable from pytest or `python -m conformance`. See docs/golden-format.md.

It comes with the `refvit` distribution (pip install refvit); the unrelated `conformance` project on PyPI
is not it."""
from .cases import ROUNDINGS, SETS, Case, CaseSpec, all_specs, get_case, select
from .dut import DUT, OPS, DUTError, ExternalCommandDUT, RefvitDUT
from .runner import (ERROR, FAIL, PASS, SKIP, Result, check, golden_op_arguments, implements, junit_xml,
                     missing_methods, parametrize_cases, pytest_cases, run_case, run_cases, run_golden_op, summarize)

__all__ = ["SETS", "ROUNDINGS", "Case", "CaseSpec", "all_specs", "get_case", "select", "DUT", "OPS", "DUTError",
           "ExternalCommandDUT", "RefvitDUT", "PASS", "FAIL", "ERROR", "SKIP", "Result", "check",
           "implements", "missing_methods", "parametrize_cases", "pytest_cases", "run_case", "run_cases",
           "summarize", "junit_xml", "run_golden_op", "golden_op_arguments"]
