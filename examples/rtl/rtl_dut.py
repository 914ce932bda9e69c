"""A conformance DUT whose ops run on the RTL of hdl/ in a simulator: the adapter pattern to copy.

    python -m conformance run --dut rtl_dut:RtlDUT --filter requantize_     # from examples/rtl/

conformance.DUT has one method per integer op of docs/spec.md, with refvit's signature and semantics. This
adapter implements the four its hardware has and leaves the others to the base class (NotImplementedError:
the runner reports those cases as not implemented by the DUT):

  apply_scale, requantize  -> refvit_requant_array (8 requantizers; apply_scale is the int32 output mode)
  conv2d                   -> refvit_mm_tile (8 x 8 MAC array): a 1x1 conv is the matmul weight (Cout, Cin)
                              x tokens (Cin, B*H*W); a k x k patch conv (stride k) is the same matmul on
                              host-side im2col columns (Cin*k*k, B*H/k*W/k), the order (c, u, v) of the weight
  gelu                     -> refvit_table_unit (the table loaded through its write port, 8 lookups a clock)

Each method does three things, and a team's own adapter does the same:
  1. check that the arguments fit the hardware (port widths, the spec's preconditions the RTL relies on):
     out of range is a ValueError, never a silently truncated field;
  2. reshape them into what the hardware streams (flat vectors, matrices) and run the simulation;
  3. return the output with refvit's dtype and shape, after checking the hardware's values fit that dtype.
The conformance runner compares the result with refvit's, exactly, and names the case and the first
differing element on a mismatch.

TiesDownRtlDUT is the same RTL built with the REFVIT_RTL_BUG_TIES_DOWN define (requantization ties rounded
down): the suite must FAIL it. Set REFVIT_RTL_BUILD_DIR to choose where builds go (default ./sim_build).
"""
from __future__ import annotations

import os

import numpy as np

import conformance
from refvit.intmath import DOUBLE_ROUND, ROUNDING_MODES, SINGLE_ROUND, int_range

from rtl_sim import RTL_BUG_TIES_DOWN, Simulation

OUT_DTYPES = ("int8", "int16", "int32")          # the requantizer's output modes
INT32_MIN, INT32_MAX = int_range(np.int32)


def _require(arr, lo: int, hi: int, what: str) -> np.ndarray:
    """arr as int64 after checking lo <= arr <= hi (the field fits its port)."""
    a = np.asarray(arr)
    if a.dtype.kind not in "iu":
        raise ValueError(f"rtl: {what} must be an integer array, got {a.dtype}")
    if a.size and (int(a.min()) < lo or int(a.max()) > hi):
        raise ValueError(f"rtl: {what} must be in [{lo}, {hi}], got [{int(a.min())}, {int(a.max())}]")
    return a.astype(np.int64)


def _require_dtype(arr, dtype, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"rtl: {what} must be {np.dtype(dtype)}, got {a.dtype}")
    return a


def _out_dtype(out_dtype) -> np.dtype:
    dt = np.dtype(out_dtype)
    if dt.name not in OUT_DTYPES:
        raise NotImplementedError(f"rtl requantizer: out_dtype {dt} (it has {', '.join(OUT_DTYPES)})")
    return dt


def _as(out: np.ndarray, dtype, shape) -> np.ndarray:
    """The hardware's int32 words as refvit's dtype; a value outside the dtype is the hardware's bug, reported
    as an error rather than wrapped."""
    lo, hi = int_range(dtype)
    if out.size and (int(out.min()) < lo or int(out.max()) > hi):
        raise conformance.DUTError(f"rtl: output values in [{out.min()}, {out.max()}] do not fit {np.dtype(dtype)}")
    return out.astype(dtype).reshape(shape)


def _scale_args(value, multiplier, shift):
    """apply_scale's TOSA domain, which the requantizer relies on; broadcast like refvit does."""
    value = _require(value, INT32_MIN, INT32_MAX, "value (int32)")
    multiplier = _require(multiplier, 0, INT32_MAX, "multiplier")
    shift = _require(shift, 2, 62, "shift")
    value, multiplier, shift = np.broadcast_arrays(value, multiplier, shift)
    small = shift <= 31
    limit = np.left_shift(np.int64(1), np.where(small, shift - 1, 0))
    if np.any(small & ((value < -limit) | (value >= limit))):
        raise ValueError("rtl: value must satisfy -2^(shift-1) <= value < 2^(shift-1) (apply_scale's domain)")
    return value, multiplier, shift


def im2col(x: np.ndarray, k: int) -> np.ndarray:
    """int8 (B, Cin, H, W), stride = kernel k -> columns (Cin*k*k, B*Ho*Wo) in the weight's (c, u, v) order."""
    b, c, h, w = x.shape
    ho, wo = h // k, w // k
    patches = x.reshape(b, c, ho, k, wo, k).transpose(1, 3, 5, 0, 2, 4)       # (Cin, k, k, B, Ho, Wo)
    return patches.reshape(c * k * k, b * ho * wo)


class RtlDUT(conformance.DUT):
    """refvit's ops on the example RTL, simulated with cocotb (Icarus Verilog by default)."""

    defines: dict = {}

    def __init__(self, simulator: str = "icarus", build_dir=None, parameters=None):
        self.sim = Simulation(simulator, build_dir=build_dir or os.environ.get("REFVIT_RTL_BUILD_DIR"),
                              defines=self.defines, parameters=parameters)

    def _double_round(self, unit: str, rounding: str) -> int:
        """The requantizers' double_round input for `rounding`; NotImplementedError for DOUBLE_ROUND on a build
        without it (HAS_DOUBLE_ROUND = 0 ignores the input: it would silently round once)."""
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"rtl: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
        if rounding == DOUBLE_ROUND and not self.sim.parameters[unit].get("HAS_DOUBLE_ROUND", 1):
            raise NotImplementedError(f"rtl {unit}: DOUBLE_ROUND (this build has HAS_DOUBLE_ROUND = 0)")
        return int(rounding == DOUBLE_ROUND)

    # -- requantizer ---------------------------------------------------------------------------------
    def _requant(self, value, multiplier, shift, out_dtype, rounding) -> np.ndarray:
        value, multiplier, shift = _scale_args(value, multiplier, shift)
        out = self.sim.run("requant", {"value": value.astype(np.int32).ravel(),
                                       "multiplier": multiplier.astype(np.int32).ravel(),
                                       "shift": shift.astype(np.uint8).ravel()},
                           out_dtype=out_dtype.name, double_round=self._double_round("requant", rounding))
        return _as(out, out_dtype, value.shape)

    def apply_scale(self, value, multiplier, shift, rounding=SINGLE_ROUND):
        """The requantizer in its int32 mode, which never clamps (|apply_scale| <= 2^30)."""
        return self._requant(value, multiplier, shift, np.dtype(np.int32), rounding).astype(np.int64)

    def requantize(self, value, multiplier, shift, out_dtype=np.int8, rounding=SINGLE_ROUND):
        return self._requant(value, multiplier, shift, _out_dtype(out_dtype), rounding)

    # -- matmul tile -----------------------------------------------------------------------------------
    def conv2d(self, x, weight, bias, multiplier, shift, *, rounding=SINGLE_ROUND, out_dtype=np.int8):
        x = _require_dtype(x, np.int8, "x")
        weight = _require_dtype(weight, np.int8, "weight")
        bias = _require_dtype(bias, np.int32, "bias")
        dt = _out_dtype(out_dtype)
        cout, cin, k, k2 = weight.shape
        b, c, h, w = x.shape
        if k != k2 or c != cin or h % k or w % k or bias.shape != (cout,):
            raise ValueError(f"rtl conv2d: x {x.shape}, weight {weight.shape}, bias {bias.shape} do not fit")
        _require(weight, -127, 127, "weight")
        terms = cin * k * k
        headroom = INT32_MAX - terms * 128 * 127      # the spec's bias bound: the int32 accumulator never wraps
        _require(bias, -headroom, headroom, "bias (accumulator headroom)")
        multiplier = _require(np.broadcast_to(multiplier, (cout,)), 0, INT32_MAX, "multiplier")
        shift = _require(np.broadcast_to(shift, (cout,)), 2, 62, "shift")
        # apply_scale's value domain (|acc| < 2^(shift-1), a limit only for shift <= 31) depends on the data; the
        # requantizer's 64-bit datapath rounds any int32 acc exactly, so it is not checked here (refvit is stricter).
        act = im2col(x, k)                                                    # (terms, B*Ho*Wo)
        out = self.sim.run("mm", {"act": act, "weight": weight.reshape(cout, terms), "bias": bias,
                                  "multiplier": multiplier.astype(np.int32), "shift": shift.astype(np.uint8)},
                           out_dtype=dt.name, double_round=self._double_round("mm", rounding))  # (Cout, B*Ho*Wo)
        ho, wo = h // k, w // k
        return _as(out.reshape(cout, b, ho, wo).transpose(1, 0, 2, 3), dt, (b, cout, ho, wo))

    # -- table unit ------------------------------------------------------------------------------------
    def gelu(self, x, table):
        x = _require_dtype(x, np.int8, "x")
        table = _require_dtype(table, np.int8, "table")
        if table.shape != (256,):
            raise ValueError(f"rtl gelu: table must have shape (256,), got {table.shape}")
        out = self.sim.run("table", {"x": x.ravel(), "table": table})
        return _as(out, np.int8, x.shape)


class TiesDownRtlDUT(RtlDUT):
    """The broken build: requantization ties rounded down (REFVIT_RTL_BUG_TIES_DOWN). Must FAIL."""

    defines = {RTL_BUG_TIES_DOWN: 1}
