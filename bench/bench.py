"""Speed and memory of refvit on random-init DeiT-S and DeiT-B (timing does not depend on the values).

Prints ratios measured side by side: for each model and batch size the float token form, the float
conv form, the integer model (`int_model.forward_int`) and, when torch and timm are importable, PyTorch
eager float32 run interleaved (A, B, C, A, B, C, ...) and the medians are compared. Also: the time of
`quantize` (calibration + constants), the peak RSS of a DeiT-B integer forward in a fresh process, and one
exact int8 GEMM through `int_matmul` against numpy's int64 matmul. Ratios are given for wall-clock and
for CPU time (process_time), the latter being what other load on a shared machine disturbs least.
Asserts nothing.

    python bench/bench.py [--quick] [--json] [--repeats N] [--threads N] [--models a,b] [--batch 1,8]

BLAS threads: --threads (default 1, or OPENBLAS_NUM_THREADS when set) is applied to OpenBLAS / OpenMP /
MKL before numpy loads, and to torch. One thread gives reproducible ratios on a shared 2-core machine:
with 2 threads, OpenBLAS workers that lose their core to another process stall whole GEMMs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("deit_small_patch16_224", "deit_base_patch16_224")
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="DeiT-S only, fewer repeats, no GEMM / RSS subprocess")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    ap.add_argument("--repeats", type=int, help="timed runs per form (default 7, --quick 3)")
    ap.add_argument("--threads", type=int, help="BLAS threads (default: $OPENBLAS_NUM_THREADS, else 1)")
    ap.add_argument("--models", help=f"comma-separated presets (default {','.join(MODELS)})")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--calib", default="2x4", help="calibration batches x images (default 2x4)")
    ap.add_argument("--method", default="percentile", help="calibration method (default percentile, the CLI's)")
    ap.add_argument("--rss-child", nargs=2, metavar=("QFILE", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is None:
        args.threads = int(os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.models is None:
        args.models = MODELS[0] if args.quick else ",".join(MODELS)
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before numpy loads: BLAS reads these once
    for var in THREAD_VARS:
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT))

from refvit import int_model, model_conv, model_token, models  # noqa: E402
from weights_tools.convert import token_to_conv  # noqa: E402
from refvit.config import preset  # noqa: E402
from refvit.intmath import int_matmul  # noqa: E402
from refvit.qfile import load_quantized, save_quantized  # noqa: E402
from refvit.quantize import quantize  # noqa: E402


def random_params(cfg, seed=0):
    """timm-named float32 parameters at trained-like scales (refvit.models.random_params) and the head mode."""
    head_mode = "mean" if cfg.distilled else "cls"
    return models.random_params(cfg, head_mode, seed), head_mode


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """({name: median wall s}, {name: median CPU s}); one warm-up each, then `repeats` rounds running every fn
    once, in a rotating order. CPU time (this process, all threads) is what a busy machine disturbs least."""
    for fn in fns.values():
        fn()
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = lambda d: {name: float(np.median(ts)) for name, ts in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def torch_model(name, p):
    """timm's eager float32 model with the same parameters, or the reason it cannot be had."""
    try:
        import torch
        import timm
    except ImportError as e:
        return None, f"skipped: {e.name} not installed"
    torch.set_num_threads(ARGS.threads)
    model = timm.create_model(name, pretrained=False).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in p.items()})

    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x))
    return run, f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} thread(s)"


def peak_rss_child(qfile: str, batch: int) -> dict:
    """Runs in a fresh process: load the quantized model, one integer forward; VmHWM before and after."""
    def vm(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0
    qm = load_quantized(qfile)
    cfg = qm.config
    x = np.random.default_rng(2).standard_normal((batch, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    xq = int_model.quantize_input(qm, x)
    loaded = vm("VmHWM")
    int_model.forward_int(qm, xq)
    return {"batch": batch, "loaded_bytes": loaded, "peak_bytes": vm("VmHWM")}


def measure_rss(qm, batches) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.safetensors"
        save_quantized(qm, path)
        out = []
        for b in batches:
            r = subprocess.run([sys.executable, __file__, "--threads", str(ARGS.threads), "--rss-child", str(path),
                                str(b)], capture_output=True, text=True, check=True)
            out.append(json.loads(r.stdout))
        return out


def bench_gemm() -> dict:
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (197, 768), dtype=np.int8)
    b = rng.integers(-127, 128, (768, 3072), dtype=np.int8)
    want = np.matmul(a.astype(np.int64), b.astype(np.int64))
    assert np.array_equal(int_matmul(a, b), want)
    t = interleaved({"int_matmul": lambda: int_matmul(a, b)}, 5)[0]["int_matmul"]
    t0 = time.perf_counter()
    np.matmul(a.astype(np.int64), b.astype(np.int64))
    t64 = time.perf_counter() - t0
    return {"shape": "197x768x3072", "int_matmul_s": t, "int64_matmul_s": t64}


def bench_model(name: str, log) -> dict:
    cfg = preset(name)
    p, head_mode = random_params(cfg)
    tp = model_token.cast_params(p)  # both forms prepared as `refvit.models.load_model` prepares them
    cp = token_to_conv(tp)
    rng = np.random.default_rng(1)
    nb, ni = (int(v) for v in ARGS.calib.split("x"))
    calib = [rng.standard_normal((ni, 3, cfg.img_size, cfg.img_size)).astype(np.float32) for _ in range(nb)]
    t0 = time.perf_counter()
    qm = quantize(cp, cfg, calib, head_mode=head_mode, method=ARGS.method)
    t_quant = time.perf_counter() - t0
    res = {"model": name, "params_m": sum(v.size for v in p.values()) / 1e6,
           "quantize_s": t_quant, "quantize_calibration": f"{nb} batches x {ni} images, {ARGS.method}", "batches": []}
    log(f"\n{name}: {res['params_m']:.1f} M params; quantize ({res['quantize_calibration']}) {t_quant:.1f} s")
    run_torch, torch_note = torch_model(name, p)
    res["torch"] = torch_note
    for bs in (int(b) for b in ARGS.batch.split(",")):
        x = rng.standard_normal((bs, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
        xq = int_model.quantize_input(qm, x)
        fns = {"float_token": lambda: model_token.forward(tp, x, cfg),
               "float_conv": lambda: model_conv.forward(cp, x, cfg),
               "int": lambda: int_model.forward_int(qm, xq)}
        if run_torch is not None:
            fns["torch"] = lambda: run_torch(x)
        t, c = interleaved(fns, ARGS.repeats)
        row = {"batch": bs, "median_s": t, "median_cpu_s": c, "int_over_float_conv": t["int"] / t["float_conv"],
               "int_over_float_conv_cpu": c["int"] / c["float_conv"]}
        if "torch" in t:
            row["float_token_over_torch"] = t["float_token"] / t["torch"]
            row["float_conv_over_torch"] = t["float_conv"] / t["torch"]
        res["batches"].append(row)
        per = " | ".join(f"{k} {v / bs * 1e3:.0f}" for k, v in t.items())
        log(f"  batch {bs}: ms per image (wall, median of {ARGS.repeats}): {per}")
        log(f"    int / float conv = {row['int_over_float_conv']:.2f}x wall, {row['int_over_float_conv_cpu']:.2f}x CPU"
            + (f"; float token / torch = {row['float_token_over_torch']:.2f}x, float conv / torch = "
               f"{row['float_conv_over_torch']:.2f}x" if "torch" in t else f"; torch: {torch_note}"))
    if not ARGS.quick and name == "deit_base_patch16_224":
        res["rss"] = measure_rss(qm, [1, 8])
        for r in res["rss"]:
            log(f"  peak RSS, integer forward at batch {r['batch']} in a fresh process: "
                f"{r['peak_bytes'] / 2**20:.0f} MiB (model loaded: {r['loaded_bytes'] / 2**20:.0f} MiB)")
    return res


def main():
    if ARGS.rss_child:
        print(json.dumps(peak_rss_child(ARGS.rss_child[0], int(ARGS.rss_child[1]))))
        return
    log = (lambda *a: None) if ARGS.json else (lambda *a: print(*a, flush=True))
    report = {"threads": ARGS.threads, "thread_env": {v: os.environ.get(v) for v in THREAD_VARS},
              "numpy": np.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
              "repeats": ARGS.repeats, "models": []}
    log(f"refvit bench: numpy {np.__version__}, {os.cpu_count()} CPUs, BLAS threads {ARGS.threads} "
        f"({', '.join(f'{v}={os.environ.get(v)}' for v in THREAD_VARS)}); medians of {ARGS.repeats} interleaved runs")
    if not ARGS.quick:
        g = bench_gemm()
        report["gemm"] = g
        log(f"exact int8 GEMM {g['shape']}: int_matmul (float32 BLAS) {g['int_matmul_s'] * 1e3:.1f} ms, "
            f"numpy int64 matmul {g['int64_matmul_s'] * 1e3:.0f} ms (x{g['int64_matmul_s'] / g['int_matmul_s']:.0f})")
    for name in ARGS.models.split(","):
        report["models"].append(bench_model(name, log))
    log("\nratios int / float conv (wall, CPU):  " + "  ".join(
        f"{m['model'].split('_')[1]} b{b['batch']} {b['int_over_float_conv']:.2f}x {b['int_over_float_conv_cpu']:.2f}x"
        for m in report["models"] for b in m["batches"]))
    if ARGS.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
