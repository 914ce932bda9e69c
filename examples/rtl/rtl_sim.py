"""Build the RTL of hdl/ with cocotb's runner and run one job per call (the host side of tb_refvit.py).

    sim = Simulation()                                   # Icarus Verilog; builds under ./sim_build
    out = sim.run("requant", {"value": v, "multiplier": m, "shift": s}, out_dtype="int8", double_round=0)

Each toplevel is compiled once per build variant (defines and parameters) into its own folder and reused
while its sources are unchanged (cocotb's runner compares timestamps). A run writes the job into a fresh
temporary folder, starts the simulator there with the cocotb test module tb_refvit, and reads back out.npy;
the simulator's log goes to sim.log in that folder and its tail into the error when the run fails.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HDL = HERE / "hdl"
SOURCES = ("refvit_requant.sv", "refvit_mm_tile.sv", "refvit_table_unit.sv")
TEST_MODULE = "tb_refvit"
DEFAULT_BUILD_DIR = HERE / "sim_build"

# unit -> (toplevel, its build parameters)
UNITS = {
    "requant": ("refvit_requant_array", {"LANES": 8}),
    "mm": ("refvit_mm_tile", {"ROWS": 8, "COLS": 8}),
    "table": ("refvit_table_unit", {"LANES": 8}),
}
RTL_BUG_TIES_DOWN = "REFVIT_RTL_BUG_TIES_DOWN"   # the define of the deliberately broken requantizer


class SimulationError(RuntimeError):
    """The simulator could not be built or run, or the cocotb test failed."""


def _runner(simulator: str):
    """cocotb's runner for `simulator` (cocotb 2.x: cocotb_tools.runner), imported only when a simulation runs."""
    from cocotb_tools.runner import get_runner
    return get_runner(simulator)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no simulator log)"


class Simulation:
    """Runs jobs on the RTL. defines: Verilog defines of this build variant (e.g. {RTL_BUG_TIES_DOWN: 1});
    parameters: per-unit overrides of UNITS' parameters, e.g. {"mm": {"ROWS": 16}}."""

    def __init__(self, simulator: str = "icarus", build_dir=None, defines=None, parameters=None):
        self.simulator = simulator
        self.defines = dict(defines or {})
        unknown = sorted(set(parameters or {}) - set(UNITS))
        if unknown:
            raise ValueError(f"rtl: no unit {unknown[0]!r} (units: {', '.join(UNITS)})")
        self.parameters = {unit: {**params, **(parameters or {}).get(unit, {})} for unit, (_, params) in UNITS.items()}
        variant = "-".join(f"{k}={v}" for k, v in sorted(self.defines.items())) or "default"
        self.build_root = Path(build_dir or DEFAULT_BUILD_DIR) / simulator / variant
        self._runners = {}                     # unit -> its built cocotb runner (test() needs the build's state)

    def _build_dir(self, unit: str) -> Path:
        params = "_".join(f"{k}{v}" for k, v in sorted(self.parameters[unit].items()))
        return self.build_root / f"{UNITS[unit][0]}_{params}"

    def build(self, unit: str):
        """The unit's cocotb runner, built (once per Simulation; recompiled only when a source changed)."""
        if unit not in self._runners:
            build_dir = self._build_dir(unit)
            log = build_dir / "build.log"
            build_dir.mkdir(parents=True, exist_ok=True)
            runner = _runner(self.simulator)
            runner.log.setLevel(logging.ERROR)          # no "Running command ..." chatter; failures raise
            try:
                runner.build(
                    sources=[HDL / s for s in SOURCES], hdl_toplevel=UNITS[unit][0], build_dir=build_dir,
                    defines=self.defines, parameters=self.parameters[unit], timescale=("1ns", "1ps"),
                    log_file=log)
            except (Exception, SystemExit) as e:   # the runner exits on a missing simulator
                raise SimulationError(f"building {UNITS[unit][0]} failed ({e}):\n{_log_tail(log)}") from None
            self._runners[unit] = runner
        return self._runners[unit]

    def run(self, unit: str, arrays: dict, **config) -> np.ndarray:
        """Stream `arrays` through `unit` (see tb_refvit.py for each unit's arrays and config); its output."""
        runner = self.build(unit)
        params = {k.lower(): v for k, v in self.parameters[unit].items()}
        if str(HERE) not in sys.path:          # the runner passes sys.path to the simulator's Python
            sys.path.insert(0, str(HERE))
        folder = Path(tempfile.mkdtemp(prefix=f"refvit-rtl-{unit}-"))
        try:
            (folder / "job.json").write_text(json.dumps({"unit": unit, **params, **config}))
            np.savez(folder / "inputs.npz", **arrays)
            results = folder / "results.xml"
            try:
                runner.test(
                    test_module=TEST_MODULE, hdl_toplevel=UNITS[unit][0], test_dir=folder,
                    results_xml=str(results), extra_env={"REFVIT_RTL_JOB": str(folder)},
                    log_file=folder / "sim.log")
            except (Exception, SystemExit) as e:   # under pytest the runner exits when a test failed
                raise SimulationError(f"simulating {UNITS[unit][0]} failed ({type(e).__name__}: {e}):\n"
                                      f"{_log_tail(folder / 'sim.log')}") from None
            out = folder / "out.npy"
            if not out.is_file():
                raise SimulationError(f"simulating {UNITS[unit][0]}: the testbench wrote no output:\n"
                                      f"{_log_tail(folder / 'sim.log')}")
            return np.load(out)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
