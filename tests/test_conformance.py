"""The conformance suite: refvit passes its own cases; deliberately broken DUTs fail with a precise message."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import conformance
from conformance import FAIL, PASS, DUT, ExternalCommandDUT, RefvitDUT, get_case, run_cases, select
from conformance.__main__ import main as conformance_main
from refvit import int_kernels as K
from refvit import intmath
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- broken adapters: one thing wrong each

class HalfToEvenDUT(RefvitDUT):
    """np.round (ties to even) instead of the spec's ties toward +inf."""
    def requantize(self, value, multiplier, shift, out_dtype=np.int8, rounding=SINGLE_ROUND):
        exact = np.asarray(value, np.float64) * np.asarray(multiplier, np.float64) / 2.0 ** np.asarray(shift)
        return intmath.saturate(np.round(exact).astype(np.int64), out_dtype)


class ShiftOffByOneDUT(RefvitDUT):
    def conv2d(self, x, weight, bias, multiplier, shift, *, rounding=SINGLE_ROUND, out_dtype=np.int8):
        return K.conv2d(x, weight, bias, multiplier, np.asarray(shift) + 1, rounding=rounding, out_dtype=out_dtype)


class WrapAroundDUT(RefvitDUT):
    """A cast instead of saturation."""
    def requantize(self, value, multiplier, shift, out_dtype=np.int8, rounding=SINGLE_ROUND):
        return intmath.apply_scale(value, multiplier, shift, rounding).astype(out_dtype)


class FloatLayerNormDUT(RefvitDUT):
    """Float mean / variance / sqrt, then the spec's gamma, bias and requantize."""
    def layernorm(self, x, eps_int, gamma, bias, multiplier, shift, *, rounding=SINGLE_ROUND):
        c = x.shape[1]
        xf = x.astype(np.float64)
        d = c * (xf - xf.mean(axis=1, keepdims=True))
        t = np.round(2.0 ** 16 * d / np.sqrt((d * d).sum(axis=1, keepdims=True) + float(eps_int))).astype(np.int64)
        acc = t * gamma.astype(np.int64).reshape(1, c, 1, 1) + bias.astype(np.int64).reshape(1, c, 1, 1)
        m, s = (np.asarray(v, np.int64).reshape(1, c, 1, 1) for v in (multiplier, shift))
        return intmath.requantize(acc, m, s, np.int8, rounding)


class AlwaysDoubleRoundDUT(RefvitDUT):
    def conv2d(self, x, weight, bias, multiplier, shift, *, rounding=SINGLE_ROUND, out_dtype=np.int8):
        return K.conv2d(x, weight, bias, multiplier, shift, rounding=DOUBLE_ROUND, out_dtype=out_dtype)


BROKEN = [  # (adapter, op whose cases it breaks, a case that must FAIL)
    (HalfToEvenDUT, "requantize", "requantize_ties_int8_single"),
    (ShiftOffByOneDUT, "conv2d", "conv1x1_cin192_cout576_n197_single"),
    (WrapAroundDUT, "requantize", "requantize_saturate_int8_single"),
    (FloatLayerNormDUT, "layernorm", "layernorm_c192_n197_single"),
    (AlwaysDoubleRoundDUT, "conv2d", "conv1x1_ties_cin1_cout4_n64_shift33_single"),
]


# ---------------------------------------------------------------- refvit against its own suite

def test_quick_set_passes_on_refvit():
    results = run_cases(RefvitDUT(), select("quick"))
    assert len(results) >= 60
    assert [r.message for r in results if r.status != PASS] == []
    assert conformance.summarize(results).startswith(f"{len(results)} passed, 0 failed, 0 errors")


def test_every_op_has_quick_cases_and_names_are_unique():
    quick = select("quick")
    assert {s.op for s in quick} == set(conformance.OPS)
    full = [s.name for s in select("full")]
    assert len(set(full)) == len(full) and {s.name for s in quick} < set(full)
    for part in ("requantize_shift2_", "requantize_shift62_", "_ties_", "_saturate_", "allneg128", "all127",
                 "maxacc", "_single", "_double"):
        assert any(part in n for n in full), part


@conformance.parametrize_cases("quick", filter="softmax")   # the documented pytest recipe
def test_recipe_for_other_projects(case):
    conformance.check(RefvitDUT(), case)


def test_cases_are_deterministic():
    a = get_case("conv1x1_cin192_cout576_n197_single")
    get_case.cache_clear()
    b = get_case("conv1x1_cin192_cout576_n197_single")
    assert a is not b
    assert all(np.array_equal(a.inputs[k], b.inputs[k]) for k in a.inputs) and np.array_equal(a.expected, b.expected)


def test_tie_cases_really_are_ties():
    """Independent of refvit: value * multiplier is exactly an odd multiple of 2^(shift-1) (Python ints)."""
    for name in ("apply_scale_ties_shift2to62_single", "requantize_ties_int8_double"):
        c = get_case(name)
        v, m, s = (c.inputs[k].tolist() for k in ("value", "multiplier", "shift"))
        assert {2, 62} <= set(s)
        assert all((vi * mi) % (1 << si) == 1 << (si - 1) for vi, mi, si in zip(v, m, s))
        assert all(-(1 << (si - 1)) <= vi < (1 << (si - 1)) and 0 <= mi < 1 << 31 for vi, mi, si in zip(v, m, s))
    c = get_case("conv1x1_ties_cin1_cout4_n64_shift33_single")
    acc = c.inputs["x"].astype(np.int64)[0, 0, 0] * c.inputs["weight"].reshape(-1, 1) + c.inputs["bias"][:, None]
    assert np.all(acc % 8 == 4)                                      # acc * 2^30 / 2^33 = acc / 8: a tie
    single, double = c.expected, get_case("conv1x1_ties_cin1_cout4_n64_shift33_double").expected
    neg = (acc < 0).reshape(single.shape)
    assert np.all(single[neg] == double[neg] + 1) and np.all(single[~neg] == double[~neg])  # +inf vs away


# ---------------------------------------------------------------- broken DUTs fail, precisely

@pytest.mark.parametrize("adapter, op, must_fail", BROKEN, ids=[b[0].__name__ for b in BROKEN])
def test_broken_adapter_fails_with_a_precise_message(adapter, op, must_fail):
    dut = adapter()
    results = {r.case: r for r in run_cases(dut, [s for s in select("quick") if s.op == op])}
    failed = results[must_fail]
    assert failed.status == FAIL, failed
    msg = failed.message
    assert msg.startswith(f"FAIL {op} [{must_fail}]: MISMATCH: ")
    # the reported first element really is the first mismatch, with the right values and count
    case = get_case(must_fail)
    actual = dut.run_case(case)
    differ = actual != case.expected
    first = tuple(int(i) for i in np.argwhere(differ)[0])
    assert f"{int(differ.sum())} of {differ.size} elements differ" in msg
    assert f"first at index {first}: expected {case.expected[first]}, actual {actual[first]}" in msg


def test_composites_use_the_dut_kernels():
    """block / model cases are composed from the DUT's own methods: a broken layernorm breaks them too."""
    results = run_cases(FloatLayerNormDUT(), select("quick", "block_") + select("quick", "model_"))
    assert results and all(r.status == FAIL for r in results), [r.line() for r in results]


def test_dtype_and_shape_are_checked_before_values():
    class Int16Out(RefvitDUT):
        def gelu(self, x, table):
            return K.gelu(x, table).astype(np.int16)

    class Transposed(RefvitDUT):
        def gelu(self, x, table):
            return K.gelu(x, table).transpose(0, 3, 2, 1)
    case = get_case("gelu_c768_n197")
    assert conformance.run_case(Int16Out(), case).message.endswith("BAD DTYPE: dtype int16, expected int8")
    message = conformance.run_case(Transposed(), case).message
    assert "BAD SHAPE: shape (1, 197, 1, 768), expected (1, 768, 1, 197)" in message


def test_errors_are_reported_not_raised():
    class NoOutput(RefvitDUT):
        def gelu(self, x, table):
            return None
    r = conformance.run_case(DUT(), get_case("gelu_sweep_all256"))
    assert r.status == "ERROR" and "DUT raised NotImplementedError" in r.message
    r = conformance.run_case(NoOutput(), get_case("gelu_sweep_all256"))
    assert r.status == "ERROR" and "produced no output" in r.message
    with pytest.raises(AssertionError, match=r"ERROR gelu \[gelu_sweep_all256\]"):
        conformance.check(DUT(), "gelu_sweep_all256")


# ---------------------------------------------------------------- external command DUT

SIMULATOR = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import numpy as np
from conformance.casefiles import read_case_inputs
from conformance.dut import RefvitDUT
from refvit.golden import hex_bytes
folder = sys.argv[1]
meta, inputs = read_case_inputs(folder)
out = np.asarray(getattr(RefvitDUT(), meta["op"])(*inputs.values(), **meta["params"]))
if meta["op"] in ("conv2d", "block"):
    open(folder + "/" + meta["output"]["files"]["hex"], "wb").write(hex_bytes(out))
else:
    np.save(folder + "/" + meta["output"]["files"]["npy"], out)
"""

EXTERNAL_CASES = ["requantize_ties_int8_single", "conv1x1_ties_cin1_cout4_n64_shift33_double",
                  "softmax_n197_ties_single", "block_c48_h3_n18_b2_single"]


def test_external_command_round_trip(tmp_path):
    script = tmp_path / "sim.py"
    script.write_text(SIMULATOR)
    dut = ExternalCommandDUT(f"{sys.executable} {script}", workdir=tmp_path / "work")
    results = run_cases(dut, [s for s in select("quick") if s.name in EXTERNAL_CASES])
    assert [(r.case, r.status) for r in results] == [(n, PASS) for n in sorted(EXTERNAL_CASES, key=[
        s.name for s in select("quick")].index)], [r.message for r in results]
    assert list((tmp_path / "work").iterdir()) == []                 # case folders cleaned up


def test_external_command_failures_are_errors(tmp_path):
    crash = ExternalCommandDUT(f"{sys.executable} -c 'import sys; sys.exit(3)'")
    r = conformance.run_case(crash, get_case("gelu_sweep_all256"))
    assert r.status == "ERROR" and "exited with status 3" in r.message
    silent = ExternalCommandDUT(f"{sys.executable} -c pass {{dir}}")
    r = conformance.run_case(silent, get_case("gelu_sweep_all256"))
    assert r.status == "ERROR" and "produced no output" in r.message


# ---------------------------------------------------------------- the command line

def my_hex_int(path, dtype):
    bits = np.dtype(dtype).itemsize * 8
    vals = [int(v, 16) for v in path.read_text().split()]
    return [v - (1 << bits) if np.dtype(dtype).kind == "i" and v >= 1 << (bits - 1) else v for v in vals]


def test_write_then_read_back_reproduces_expected(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "conformance", "write", str(tmp_path / "g"), "--formats", "npy,hex"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "g" / "index.json").read_text())
    assert [c["name"] for c in index["cases"]] == [s.name for s in select("quick")]
    for entry in index["cases"]:
        folder = tmp_path / "g" / entry["folder"]
        meta = json.loads((folder / "case.json").read_text())
        case = get_case(entry["name"])
        exp = meta["expected"]
        assert exp["dtype"] == case.expected.dtype.name and exp["shape"] == list(case.expected.shape)
        assert my_hex_int(folder / exp["files"]["hex"], exp["dtype"]) == case.expected.reshape(-1).tolist()
        assert np.array_equal(np.load(folder / exp["files"]["npy"]), case.expected)
        assert meta["params"] == case.params and meta["op"] == case.op
        first = meta["inputs"][0]
        assert my_hex_int(folder / first["files"]["hex"], first["dtype"]) == \
            np.asarray(case.inputs[first["name"]]).reshape(-1).tolist()


def test_cli_run_list_and_exit_codes(tmp_path, capsys):
    (tmp_path / "mydut.py").write_text("import numpy as np\nfrom conformance import RefvitDUT\n"
                                       "class Wrap(RefvitDUT):\n"
                                       "    def gelu(self, x, table):\n"
                                       "        return (table.astype(np.int16)[x.astype(np.int64) + 128] + 1)"
                                       ".astype(np.int8)\n")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "conformance", "run", "--filter", "gelu_sweep"]
    ok = subprocess.run(run + ["--dut", "conformance.dut:RefvitDUT"], cwd=tmp_path, env=env, capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "1 passed, 0 failed, 0 errors" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run(run + ["--dut", "mydut:Wrap"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "FAIL gelu [gelu_sweep_all256]: MISMATCH" in bad.stdout, bad.stdout + bad.stderr
    assert conformance_main(["run", "--dut", "nosuchmodule:X"]) == 2
    assert conformance_main(["list", "--filter", "zzz_nothing"]) == 2
    capsys.readouterr()
    assert conformance_main(["list", "--set", "full", "--filter", "conv1x1_cin3072"]) == 0
    assert "conv1x1_cin3072_cout768_n197_single  (conv2d)" in capsys.readouterr().out
