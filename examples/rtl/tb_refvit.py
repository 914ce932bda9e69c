"""cocotb testbench of the RTL in hdl/: runs one *job* through one toplevel and writes its output.

The host side (rtl_sim.Simulation.run) writes a job folder: `job.json` (unit, configuration) and `inputs.npz`
(the arrays), and starts the simulator with REFVIT_RTL_JOB=<folder>; the single cocotb test here, `run_job`,
streams the arrays through the toplevel clock by clock and writes `out.npy`. The arrays are already in the
hardware's terms (matrices, flat vectors); all conversion from refvit's kernel arguments is the adapter's job
(rtl_dut.py).

Units (toplevel):
  requant  refvit_requant_array   value, multiplier, shift (n,) -> out (n,) int32     LANES per clock
  mm       refvit_mm_tile         act (K, T) int8, weight (Cout, K) int8, bias, multiplier, shift (Cout,)
                                  -> out (Cout, T) int32, tiled ROWS tokens x COLS channels
  table    refvit_table_unit      table (256,), x (n,) int8 -> out (n,) int8              LANES per clock

Signals are driven just after a rising edge and sampled at the next one (registered outputs, so sampled
values are those of the previous clock); a beat moves on an edge where valid and ready are both high.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge

JOB_ENV = "REFVIT_RTL_JOB"
OUT_MODES = {"int8": 0, "int16": 1, "int32": 2}
LATENCY_MARGIN = 16        # clocks beyond a unit's own drain time before a missing output is an error


# ---- packing: lane l of a bus at bits [w*l, w*(l+1)), little-endian bytes of a row of fields ----------------

def pack_rows(fields: np.ndarray, dtype) -> list:
    """fields (n, L) -> n bus values (Python ints), lane l in the l-th field of width itemsize*8."""
    raw = np.ascontiguousarray(fields, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()   # two's complement
    step = fields.shape[1] * np.dtype(dtype).itemsize
    return [int.from_bytes(raw[i:i + step], "little") for i in range(0, len(raw), step)]


def unpack_rows(values: list, lanes: int, dtype) -> np.ndarray:
    """n bus values -> (n, lanes) fields of dtype (the inverse of pack_rows)."""
    dt = np.dtype(dtype).newbyteorder("<")
    raw = b"".join(v.to_bytes(lanes * dt.itemsize, "little") for v in values)
    return np.frombuffer(raw, dt).reshape(len(values), lanes).astype(dt.newbyteorder("="))


def lanes_of(a: np.ndarray, lanes: int, fill: int = 0) -> np.ndarray:
    """A flat array (n,) padded with `fill` to (ceil(n / lanes), lanes)."""
    rows = -(-a.size // lanes)
    out = np.full(rows * lanes, fill, a.dtype)
    out[:a.size] = a
    return out.reshape(rows, lanes)


# ---- clocking and streaming ----------------------------------------------------------------------------

async def start(dut, idle: dict):
    """Start the clock, hold reset for two clocks with the inputs idle; return just after a rising edge."""
    Clock(dut.clk, 10, unit="ns").start()
    for sig, value in idle.items():
        getattr(dut, sig).value = value
    dut.rst_n.value = 0
    await ClockCycles(dut.clk, 2)
    dut.rst_n.value = 1
    await RisingEdge(dut.clk)


async def stream(dut, beats, n_beats: int, n_out: int, out_bus: str, ready: str | None = None,
                 drain: int = 0) -> list:
    """Drive `beats` (an iterable of {signal: int}) with in_valid; collect n_out values of `out_bus` on the
    clocks where out_valid is high. With `ready`, a beat is held until the toplevel accepts it. Outputs missing
    `drain` + LATENCY_MARGIN clocks after the last beat are an error."""
    it = iter(beats)
    outs, sent = [], 0
    beat = next(it, None)
    clk, in_valid, out_valid, bus = dut.clk, dut.in_valid, dut.out_valid, getattr(dut, out_bus)
    in_ready = getattr(dut, ready) if ready else None
    idle = 0
    in_valid.value = 1
    while len(outs) < n_out:
        if beat is not None:
            for sig, value in beat.items():
                sig.value = value
        elif idle == 0:
            in_valid.value = 0
        await RisingEdge(clk)
        if out_valid.value:
            outs.append(bus.value.to_unsigned())
        if beat is not None and (in_ready is None or in_ready.value):
            sent += 1
            beat = next(it, None)
        elif beat is None:
            idle += 1
            assert idle <= drain + LATENCY_MARGIN, f"{out_bus}: {len(outs)} of {n_out} outputs after {sent} beats"
    assert sent == n_beats, f"sent {sent} of {n_beats} beats"
    in_valid.value = 0
    return outs


# ---- the units ----------------------------------------------------------------------------------------

async def run_requant(dut, cfg: dict, a: dict) -> np.ndarray:
    lanes = cfg["lanes"]
    value, mult = lanes_of(a["value"].astype(np.int32), lanes), lanes_of(a["multiplier"].astype(np.int32), lanes)
    shift = lanes_of(a["shift"].astype(np.uint8), lanes, fill=2)     # padding lanes: value 0, a legal shift
    await start(dut, {"in_valid": 0, "out_mode": OUT_MODES[cfg["out_dtype"]], "double_round": cfg["double_round"]})
    v, m, s = pack_rows(value, np.int32), pack_rows(mult, np.int32), pack_rows(shift, np.uint8)
    beats = ({dut.in_value: v[i], dut.in_multiplier: m[i], dut.in_shift: s[i]} for i in range(len(v)))
    outs = await stream(dut, beats, len(v), len(v), "out_value")
    return unpack_rows(outs, lanes, np.int32).reshape(-1)[:a["value"].size]


async def run_mm(dut, cfg: dict, a: dict) -> np.ndarray:
    rows, cols = cfg["rows"], cfg["cols"]
    act, weight = a["act"], a["weight"]                              # (K, T) int8, (Cout, K) int8
    (k, t), cout = act.shape, weight.shape[0]
    nt, nc = -(-t // rows), -(-cout // cols)
    act_p = np.zeros((k, nt * rows), np.int8)
    act_p[:, :t] = act
    w_p = np.zeros((nc * cols, k), np.int8)
    w_p[:cout] = weight
    consts = {n: np.zeros(nc * cols, np.int32) for n in ("bias", "multiplier")}
    shift = np.full(nc * cols, 2, np.uint8)                         # padding channels: legal, unused
    for n in consts:
        consts[n][:cout] = a[n]
    shift[:cout] = a["shift"]
    # bus values: act_bus[i][kk] = tokens i*rows .. of step kk; w_bus[j][kk] = channels j*cols .. of step kk
    act_bus = [pack_rows(act_p[:, i * rows:(i + 1) * rows], np.int8) for i in range(nt)]
    w_bus = [pack_rows(w_p[j * cols:(j + 1) * cols].T, np.int8) for j in range(nc)]
    bias_bus = pack_rows(consts["bias"].reshape(nc, cols), np.int32)
    mult_bus = pack_rows(consts["multiplier"].reshape(nc, cols), np.int32)
    shift_bus = pack_rows(shift.reshape(nc, cols), np.uint8)

    def beats():
        for i in range(nt):                                          # token tile
            for j in range(nc):                                      # channel tile
                for kk in range(k):                                  # reduction step
                    beat = {dut.in_act: act_bus[i][kk], dut.in_wgt: w_bus[j][kk],
                            dut.in_first: int(kk == 0), dut.in_last: int(kk == k - 1)}
                    if kk == 0:
                        beat |= {dut.in_bias: bias_bus[j], dut.in_multiplier: mult_bus[j], dut.in_shift: shift_bus[j]}
                    yield beat

    await start(dut, {"in_valid": 0, "in_first": 0, "in_last": 0, "out_mode": OUT_MODES[cfg["out_dtype"]],
                      "double_round": cfg["double_round"]})
    outs = await stream(dut, beats(), nt * nc * k, nt * nc * rows, "out_data", ready="in_ready",
                        drain=rows)
    tiles = unpack_rows(outs, cols, np.int32).reshape(nt, nc, rows, cols)   # [token tile, channel tile, r, q]
    return tiles.transpose(1, 3, 0, 2).reshape(nc * cols, nt * rows)[:cout, :t]


async def run_table(dut, cfg: dict, a: dict) -> np.ndarray:
    lanes, table = cfg["lanes"], a["table"]
    await start(dut, {"in_valid": 0, "tbl_we": 0})
    dut.tbl_we.value = 1                                             # load the table, one entry per clock
    for i, entry in enumerate(table.astype(np.uint8).tolist()):
        dut.tbl_addr.value, dut.tbl_wdata.value = i, entry
        await RisingEdge(dut.clk)
    dut.tbl_we.value = 0
    x = pack_rows(lanes_of(a["x"].astype(np.int8), lanes), np.int8)
    outs = await stream(dut, ({dut.in_x: v} for v in x), len(x), len(x), "out_y")
    return unpack_rows(outs, lanes, np.int8).reshape(-1)[:a["x"].size]


UNITS = {"requant": run_requant, "mm": run_mm, "table": run_table}


@cocotb.test()
async def run_job(dut):
    """The job in $REFVIT_RTL_JOB through this toplevel; writes out.npy there."""
    folder = Path(os.environ[JOB_ENV])
    cfg = json.loads((folder / "job.json").read_text())
    with np.load(folder / "inputs.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    out = await UNITS[cfg["unit"]](dut, cfg, arrays)
    np.save(folder / "out.npy", out)
