"""One real layer of the embedded model through the RTL, end to end, as a verification flow does it:

    python run_layer.py --out /tmp/rtl_layer        # from examples/rtl/

1. `python -m refvit golden --model M --ops OPS --seed S --out OUT/golden`: the golden vectors of the chosen
   ops (default: blocks.0.mlp.fc1, the MLP's first 1x1 conv, 192 -> 768 channels on 66 tokens, and
   blocks.0.mlp.gelu, its GELU table lookup), with the tensors they read and the constants they use;
2. each op runs on the RTL (RtlDUT: conv2d on the MAC-array tile, gelu on the table unit), in the golden's
   execution order, reading what an earlier op of the run wrote (the RTL's own output), else the golden
   tensor; its output is written as a device dump, OUT/device/tensors/<op>.hex ($readmemh text, the
   layout and dtype of the manifest);
3. `python -m refvit check OUT/golden OUT/device`: op by op, exact; exit status 0 when all match.

--broken runs the REFVIT_RTL_BUG_TIES_DOWN build instead; it passes this layer (fc1 has no exact rounding tie:
real data almost never reaches the bug, which is why the conformance cases force ties).
The script replaces OUT/golden and OUT/device.
Speed: Icarus Verilog simulates about a million MACs per second or two; blocks.0.mlp.fc1 is 9.7 M MACs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import refvit
from refvit.dumpfmt import hex_bytes, read_array

from rtl_dut import RtlDUT, TiesDownRtlDUT

DEFAULT_MODEL = Path(refvit.__file__).resolve().parent / "data" / "fmnist_deit_int8.safetensors"
DEFAULT_OPS = "blocks.0.mlp.fc1,blocks.0.mlp.gelu"
RTL_KERNELS = {("conv2d", "w8"): "conv2d", ("gelu", "table"): "gelu"}   # (op, variant) -> the DUT's method


def refvit_cli(*args) -> list:
    return [sys.executable, "-m", "refvit", *map(str, args)]


def run_ops(golden: Path, device: Path, dut, log=print) -> list:
    """Every op of the golden manifest on `dut`, writing device/tensors/<op>.hex; the names written."""
    manifest = json.loads((golden / "manifest.json").read_text())
    produced = {}

    def tensor(name):
        if name in produced:
            return produced[name]
        return read_array(golden / manifest["tensors"][name]["files"]["npy"])

    def constant(name):
        return read_array(golden / manifest["constants"][name]["files"]["npy"])

    (device / "tensors").mkdir(parents=True, exist_ok=True)
    for op in manifest["ops"]:
        method = RTL_KERNELS.get((op["op"], op["variant"]))
        if method is None:
            log(f"[{op['index']:3d}] {op['name']} ({op['op']}/{op['variant']}): no RTL for it, not run")
            continue
        args = {arg: tensor(t) for arg, t in op["inputs"].items()}
        args |= {arg: constant(c) for arg, c in op["constants"].items()}
        attrs = {k: (np.dtype(v) if k == "out_dtype" else v) for k, v in op["attrs"].items()}
        t0 = time.perf_counter()
        out = getattr(dut, method)(**args, **attrs)
        produced[op["name"]] = out
        (device / "tensors" / f"{op['name']}.hex").write_bytes(hex_bytes(out))
        log(f"[{op['index']:3d}] {op['name']} ({op['op']}): {out.dtype} {out.shape} on the RTL in "
            f"{time.perf_counter() - t0:.1f} s")
    return list(produced)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="a real layer of the embedded model through the RTL, checked by "
                                            "`refvit check`")
    p.add_argument("--out", required=True, help="output folder (its golden/ and device/ are replaced)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="quantized model file (default: the embedded one)")
    p.add_argument("--ops", default=DEFAULT_OPS, help=f"golden --ops globs (default {DEFAULT_OPS})")
    p.add_argument("--seed", type=int, default=0, help="the golden's synthetic input seed (default 0)")
    p.add_argument("--rows", type=int, default=22, help="MAC array rows (tokens; default 22: 66 = 3 x 22)")
    p.add_argument("--cols", type=int, default=32, help="MAC array columns (output channels; default 32)")
    p.add_argument("--broken", action="store_true", help="the REFVIT_RTL_BUG_TIES_DOWN build (ties rounded down)")
    args = p.parse_args(argv)
    out = Path(args.out)
    golden, device = out / "golden", out / "device"
    for folder in (golden, device):
        shutil.rmtree(folder, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cmd = refvit_cli("golden", "--model", args.model, "--ops", args.ops, "--seed", args.seed, "--out", golden,
                     "--formats", "npy,hex", "--quiet")
    print("$ python", " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        return 2
    dut = (TiesDownRtlDUT if args.broken else RtlDUT)(parameters={"mm": {"ROWS": args.rows, "COLS": args.cols}})
    run_ops(golden, device, dut)
    cmd = refvit_cli("check", golden, device)
    print("$ python", " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
