"""The RTL example (examples/rtl/): refvit's conformance cases and one real layer through an RTL simulator.

The simulator tests need Icarus Verilog (`iverilog`) and cocotb (`pip install -e '.[rtl]'`); without them
they skip, saying which is missing. The adapter's own checks (arguments the hardware cannot take) need
neither. Expected values come from refvit's conformance cases and golden dumps, or from Python integers.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import conformance
from conformance import FAIL

REPO = Path(__file__).resolve().parents[1]
RTL = REPO / "examples" / "rtl"
if str(RTL) not in sys.path:
    sys.path.insert(0, str(RTL))

import rtl_dut  # noqa: E402  (examples/rtl, put on the path above)


def _missing() -> str | None:
    """Why the simulator cannot run here, or None."""
    if shutil.which("iverilog") is None or shutil.which("vvp") is None:
        return "Icarus Verilog is not installed (iverilog/vvp not on PATH; Debian: apt-get install iverilog)"
    if importlib.util.find_spec("cocotb") is None:
        return "cocotb is not installed (pip install -e '.[rtl]')"
    try:
        import find_libpython
        if find_libpython.find_libpython() is None:
            return "cocotb cannot embed Python here: no shared libpython found"
    except ImportError:
        pass
    return None


MISSING = _missing()
needs_sim = pytest.mark.skipif(MISSING is not None, reason=f"RTL simulation unavailable: {MISSING}")

# A subset that reaches every RTL feature: rounding ties in both modes, int8 / int16 / int32 (apply_scale)
# outputs, shifts 2..62, the int32 accumulator's extremes, bias, per-channel scales, a patch conv (im2col)
# and a table lookup. Each case is one simulator start (about a second) plus its clocks.
QUICK_CASES = ["apply_scale_ties_shift2to62_double", "requantize_saturate_int16_double",
               "gelu_randomtable_sweep_all256"]   # the requantizer and the table unit (the MAC tile: the quick head layer)
SLOW_CASES = ["requantize_ties_int8_single", "conv1x1_saturate_cin64_cout32_n16_double",
              "conv1x1_ties_cin1_cout4_n64_shift33_single",
              "apply_scale_ties_shift2to62_single", "apply_scale_random_single", "requantize_ties_int8_double",
              "requantize_shift2_single", "requantize_shift62_double", "requantize_maxacc_single",
              "requantize_maxacc_double", "conv1x1_maxacc_cin3072_cout8_n4_double", "conv1x1_allmax_cin3071_cout4_n4_single",
              "patchconv_k4_cin3_cout192_img32_single", "gelu_sweep_all256"]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rtl_build")


@pytest.fixture(scope="module")
def dut(build_dir):
    return rtl_dut.RtlDUT(build_dir=build_dir)


# ------------------------------------------------------------------ conformance cases on the RTL

@needs_sim
@pytest.mark.parametrize("case", QUICK_CASES)
def test_conformance_quick_subset_passes_on_the_rtl(dut, case):
    conformance.check(dut, case)


@needs_sim
@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
def test_conformance_more_cases_pass_on_the_rtl(dut, case):
    conformance.check(dut, case)


def _first_tie_flip(case) -> tuple:
    """(index, expected, ties-down value) of the first element where rounding a tie down changes the int8
    output: Python integers only, from the case's inputs."""
    v, m, s = (np.asarray(case.inputs[k]).tolist() for k in ("value", "multiplier", "shift"))
    for i, (value, mult, shift) in enumerate(zip(v, m, s)):
        prod, half = value * mult, 1 << (shift - 1)
        if prod % (1 << shift) == half:                                  # an exact tie
            up, down = (max(-128, min(127, y)) for y in ((prod + half) >> shift, (prod + half - 1) >> shift))
            if up != down:
                return i, up, down
    raise AssertionError("the case has no tie that changes the output")


@needs_sim
def test_broken_rtl_build_fails_naming_the_case_and_first_element(build_dir):
    """The REFVIT_RTL_BUG_TIES_DOWN build (ties rounded down) is caught, with the case and first mismatch."""
    name = "requantize_ties_int8_single"
    case = conformance.get_case(name)
    result = conformance.run_case(rtl_dut.TiesDownRtlDUT(build_dir=build_dir), case)
    index, expected, actual = _first_tie_flip(case)
    assert result.status == FAIL, result.line()
    assert f"requantize [{name}]" in result.message
    assert re.search(rf"\({index},\).*expected {expected}\b.*actual {actual}\b", result.message), result.message


@needs_sim
@pytest.mark.slow   # a second RTL build (~1.2 s); the quick run builds the RTL once
def test_broken_rtl_build_fails_from_the_command_line(build_dir):
    """The README's command with the broken build: exit 1, FAIL line with the case and its first element."""
    name = "conv1x1_ties_cin1_cout4_n64_shift33_single"
    pythonpath = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "REFVIT_RTL_BUILD_DIR": str(build_dir), "PYTHONPATH": os.pathsep.join(pythonpath)}
    proc = subprocess.run([sys.executable, "-m", "conformance", "run", "--dut", "rtl_dut:TiesDownRtlDUT",
                           "--filter", name], cwd=RTL, env=env, capture_output=True, text=True, timeout=300)
    case = conformance.get_case(name)
    x, w = case.inputs["x"][0, 0, 0, 0], case.inputs["weight"][0, 0, 0, 0]   # element (0, 0, 0, 0)
    acc = int(x) * int(w) + int(case.inputs["bias"][0])                     # Cin = 1
    mult, shift = int(case.inputs["multiplier"][0]), int(case.inputs["shift"][0])
    assert (acc * mult) % (1 << shift) == 1 << (shift - 1), "the case's element (0, 0, 0, 0) is a tie"
    expected = (acc * mult + (1 << (shift - 1))) >> shift
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL conv2d [{name}]" in proc.stdout
    assert re.search(rf"\(0, 0, 0, 0\).*expected {expected}\b.*actual {expected - 1}\b", proc.stdout), proc.stdout


# ------------------------------------------------------------------ one real layer, golden -> RTL -> check

def _run_layer(tmp_path, capfd, *args) -> tuple:
    import run_layer
    rc = run_layer.main(["--out", str(tmp_path), *args])
    return rc, capfd.readouterr().out


@needs_sim
def test_real_layer_head_through_the_rtl_passes_refvit_check(tmp_path, capfd):
    """The embedded model's classifier head (a 1x1 conv, 384 -> 10, int16 logits) from its golden dump."""
    rc, out = _run_layer(tmp_path, capfd, "--ops", "head", "--rows", "1", "--cols", "16")
    assert "[ 95] head (conv2d): OK (tensors/head.hex)" in out, out
    assert "summary: 1 OK of 1 tensors compared; PASS" in out
    assert rc == 0
    assert (tmp_path / "device" / "tensors" / "head.hex").read_text().count("\n") == 10


@needs_sim
@pytest.mark.slow
def test_real_layer_fc1_and_gelu_through_the_rtl_passes_refvit_check(tmp_path, capfd):
    """blocks.0.mlp.fc1 (192 -> 768 on 66 tokens, 9.7 M MACs) on the MAC array, then its GELU on the table unit,
    chained on the RTL's own outputs; `refvit check` against the golden dump."""
    rc, out = _run_layer(tmp_path, capfd)
    assert "blocks.0.mlp.fc1 (conv2d): OK (tensors/blocks.0.mlp.fc1.hex)" in out, out
    assert "blocks.0.mlp.gelu (gelu): OK (tensors/blocks.0.mlp.gelu.hex)" in out
    assert "summary: 2 OK of 2 tensors compared; PASS" in out
    assert rc == 0


# ------------------------------------------------------------------ the adapter's own checks (no simulator)

class _NoSim:
    def run(self, *args, **kwargs):
        raise AssertionError("the adapter should have refused before simulating")


@pytest.fixture
def offline_dut(tmp_path):
    d = rtl_dut.RtlDUT(build_dir=tmp_path)
    d.sim.run = _NoSim().run
    return d


@pytest.mark.parametrize("value, multiplier, shift, match", [
    (5, -1, 40, "multiplier"), (5, 1 << 31, 40, "multiplier"), (5, 3, 1, "shift"), (5, 3, 63, "shift"),
    (1 << 31, 3, 40, "value"), (8, 3, 4, "domain"), (-9, 3, 4, "domain")])
def test_adapter_refuses_what_the_ports_cannot_carry(offline_dut, value, multiplier, shift, match):
    with pytest.raises(ValueError, match=match):
        offline_dut.requantize(np.array([value], np.int64), np.array([multiplier], np.int64), np.array([shift]))


def test_adapter_refuses_unsupported_out_dtype_and_rounding(offline_dut, tmp_path):
    with pytest.raises(NotImplementedError, match="out_dtype"):
        offline_dut.requantize(np.array([5]), 3, 40, out_dtype=np.uint8)
    with pytest.raises(ValueError, match="rounding"):
        offline_dut.apply_scale(np.array([5]), 3, 40, rounding="HALF_EVEN")
    single_only = rtl_dut.RtlDUT(build_dir=tmp_path, parameters={"requant": {"HAS_DOUBLE_ROUND": 0}})
    single_only.sim.run = _NoSim().run
    with pytest.raises(NotImplementedError, match="HAS_DOUBLE_ROUND"):
        single_only.requantize(np.array([5]), 3, 40, rounding="DOUBLE_ROUND")


def test_im2col_matches_the_weight_order():
    """conv2d = weight (Cout, Cin*k*k) @ im2col(x): checked against a direct loop over the patch."""
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, (2, 3, 8, 12)).astype(np.int8)
    w = rng.integers(-127, 128, (5, 3, 4, 4)).astype(np.int8)
    got = w.reshape(5, -1).astype(np.int64) @ rtl_dut.im2col(x, 4).astype(np.int64)     # (Cout, B*Ho*Wo)
    want = np.zeros((5, 2, 2, 3), np.int64)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                patch = x[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].astype(np.int64)
                want[:, b, i, j] = (w.astype(np.int64) * patch).sum(axis=(1, 2, 3))
    assert np.array_equal(got, want.reshape(5, -1))


def test_refvit_does_not_depend_on_the_example():
    """The example is no dependency: neither refvit/ nor conformance/ imports it or cocotb."""
    import ast
    example = {p.stem for p in RTL.glob("*.py")} | {"cocotb", "cocotb_tools"}
    for pkg in ("refvit", "conformance"):
        for f in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                assert not {n.split(".")[0] for n in names} & example, f"{f} imports {names}"
