"""Speed and memory of refvit on random-init DeiT-S and DeiT-B (timing does not depend on the values).

Prints figures measured side by side in one run: for each model and batch size the float token form, the
float conv form, the integer model (`int_model.forward_int`) and, when torch and timm are importable,
PyTorch eager float32, at every thread count of --threads (default 1,2), all interleaved (round r runs every
(threads, form) pair once, in a rotating order) and compared by medians. Per thread count: the ratios
integer / float conv and float / torch, and the fraction of this machine's float32 GEMM throughput (a large
square np.matmul, measured in the same rounds) that each form reaches (the model's GEMM flops / its time);
across thread counts: the speed-up of every form from the first count to each other one. Also: the time of
`quantize`, the peak RSS of a DeiT-B integer forward in a fresh process, and one exact int8 GEMM through
`int_matmul` against numpy's int64 matmul. Ratios are given for wall-clock and for CPU time (process_time).
The load average (/proc/loadavg) is printed before and after: on a shared machine the multi-thread figures
mean little when the load is near the core count. Asserts nothing.

    python bench/bench.py [--quick] [--json] [--repeats N] [--threads 1,2] [--models a,b] [--batch 1,8]

Threads: refvit.parallel.set_threads(n) sets both refvit's pool and numpy's OpenBLAS between runs (and torch's
intra-op threads), so one process measures every count; OpenBLAS is started with the largest count.
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
GEMM_N = 2048                     # the square float32 GEMM that stands for the machine's BLAS throughput


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="DeiT-S only, fewer repeats, no GEMM / RSS subprocess")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 7, --quick 3)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts measured side by side "
                                                     "(default 1,2; the first is the base of the speed-ups)")
    ap.add_argument("--models", help=f"comma-separated presets (default {','.join(MODELS)})")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--calib", default="2x4", help="calibration batches x images (default 2x4)")
    ap.add_argument("--method", default="percentile", help="calibration method (default percentile, the CLI's)")
    ap.add_argument("--rss-child", nargs=2, metavar=("QFILE", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.thread_counts = [int(t) for t in args.threads.split(",")]
    if not args.thread_counts or min(args.thread_counts) < 1:
        ap.error(f"--threads must be positive counts, got {args.threads!r}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.models is None:
        args.models = MODELS[0] if args.quick else ",".join(MODELS)
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before numpy loads: OpenBLAS starts with the largest count, set_threads lowers it
    for var in THREAD_VARS:
        os.environ[var] = str(max(ARGS.thread_counts))
    os.environ.pop("REFVIT_THREADS", None)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # as `import refvit` sets it when it loads numpy first

import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT))

from refvit import int_model, model_conv, model_token, models, parallel  # noqa: E402
from weights_tools.convert import token_to_conv  # noqa: E402
from refvit.config import preset  # noqa: E402
from refvit.intmath import int_matmul  # noqa: E402
from refvit.qfile import load_quantized, save_quantized  # noqa: E402
from refvit.quantize import quantize  # noqa: E402

TORCH = None                       # the torch module once imported (its thread count follows set_threads)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def set_threads(n: int) -> None:
    parallel.set_threads(n)                       # refvit's pool and numpy's OpenBLAS
    if TORCH is not None:
        TORCH.set_num_threads(n)


def random_params(cfg, seed=0):
    """timm-named float32 parameters at trained-like scales (refvit.models.random_params) and the head mode."""
    head_mode = "mean" if cfg.distilled else "cls"
    return models.random_params(cfg, head_mode, seed), head_mode


def gemm_flops(cfg) -> float:
    """Multiply-add flops (2 per MAC) of one image's GEMMs: patch embedding, qkv, q k^T, p v, proj, MLP, head."""
    n, c, h = cfg.num_tokens, cfg.embed_dim, cfg.hidden_dim
    patch = cfg.num_patches * c * cfg.in_chans * cfg.patch_size ** 2
    block = n * c * 3 * c + 2 * n * n * c + n * c * c + 2 * n * c * h
    return 2.0 * (patch + cfg.depth * block + c * cfg.num_classes)


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """({(threads, name): median wall s}, {...: median CPU s}) for fns {name: fn} at every thread count of
    --threads: one warm-up each, then `repeats` rounds running every (threads, name) pair once, in a rotating
    order. CPU time (this process, all threads) is what a busy machine disturbs least."""
    keys = [(t, name) for t in ARGS.thread_counts for name in fns]
    for t, name in keys:
        set_threads(t)
        fns[name]()
    wall, cpu = {k: [] for k in keys}, {k: [] for k in keys}
    for r in range(repeats):
        for t, name in keys[r % len(keys):] + keys[:r % len(keys)]:
            set_threads(t)
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            wall[(t, name)].append(time.perf_counter() - w)
            cpu[(t, name)].append(time.process_time() - c)
    med = lambda d: {k: float(np.median(ts)) for k, ts in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def torch_model(name, p):
    """timm's eager float32 model with the same parameters, or the reason it cannot be had."""
    global TORCH
    try:
        import torch
        import timm
    except ImportError as e:
        return None, f"skipped: {e.name} not installed"
    TORCH = torch
    model = timm.create_model(name, pretrained=False).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in p.items()})

    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x))
    return run, f"torch {torch.__version__}, timm {timm.__version__}"


def peak_rss_child(qfile: str, batch: int) -> dict:
    """Runs in a fresh process: load the quantized model, one integer forward; VmHWM before and after."""
    def vm(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0
    set_threads(max(ARGS.thread_counts))
    qm = load_quantized(qfile)
    cfg = qm.config
    x = np.random.default_rng(2).standard_normal((batch, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    xq = int_model.quantize_input(qm, x)
    loaded = vm("VmHWM")
    int_model.forward_int(qm, xq)
    return {"batch": batch, "threads": parallel.threads(), "loaded_bytes": loaded, "peak_bytes": vm("VmHWM")}


def measure_rss(qm, batches) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.safetensors"
        save_quantized(qm, path)
        out = []
        for b in batches:
            r = subprocess.run([sys.executable, __file__, "--threads", ARGS.threads, "--rss-child", str(path),
                                str(b)], capture_output=True, text=True, check=True)
            out.append(json.loads(r.stdout))
        return out


def bench_int_gemm() -> dict:
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (197, 768), dtype=np.int8)
    b = rng.integers(-127, 128, (768, 3072), dtype=np.int8)
    want = np.matmul(a.astype(np.int64), b.astype(np.int64))
    assert np.array_equal(int_matmul(a, b), want)
    set_threads(ARGS.thread_counts[0])
    t = interleaved({"int_matmul": lambda: int_matmul(a, b)}, 5)[0][(ARGS.thread_counts[0], "int_matmul")]
    t0 = time.perf_counter()
    np.matmul(a.astype(np.int64), b.astype(np.int64))
    t64 = time.perf_counter() - t0
    return {"shape": "197x768x3072", "threads": ARGS.thread_counts[0], "int_matmul_s": t, "int64_matmul_s": t64}


def bench_model(name: str, log) -> dict:
    cfg = preset(name)
    p, head_mode = random_params(cfg)
    tp = model_token.cast_params(p)  # both forms prepared as `refvit.models.load_model` prepares them
    cp = token_to_conv(tp)
    rng = np.random.default_rng(1)
    nb, ni = (int(v) for v in ARGS.calib.split("x"))
    calib = [rng.standard_normal((ni, 3, cfg.img_size, cfg.img_size)).astype(np.float32) for _ in range(nb)]
    set_threads(ARGS.thread_counts[0])
    t0 = time.perf_counter()
    qm = quantize(cp, cfg, calib, head_mode=head_mode, method=ARGS.method)
    t_quant = time.perf_counter() - t0
    flops = gemm_flops(cfg)
    res = {"model": name, "params_m": sum(v.size for v in p.values()) / 1e6, "gemm_gflop_per_image": flops / 1e9,
           "quantize_s": t_quant, "quantize_threads": ARGS.thread_counts[0],
           "quantize_calibration": f"{nb} batches x {ni} images, {ARGS.method}", "batches": []}
    log(f"\n{name}: {res['params_m']:.1f} M params, {flops / 1e9:.1f} GFLOP of GEMMs an image; quantize "
        f"({res['quantize_calibration']}, {ARGS.thread_counts[0]} thread(s)) {t_quant:.1f} s")
    run_torch, torch_note = torch_model(name, p)
    res["torch"] = torch_note
    a = np.random.default_rng(3).standard_normal((GEMM_N, GEMM_N)).astype(np.float32)
    for bs in (int(b) for b in ARGS.batch.split(",")):
        x = rng.standard_normal((bs, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
        xq = int_model.quantize_input(qm, x)
        fns = {"float_token": lambda: model_token.forward(tp, x, cfg),
               "float_conv": lambda: model_conv.forward(cp, x, cfg),
               "int": lambda: int_model.forward_int(qm, xq)}
        if run_torch is not None:
            fns["torch"] = lambda: run_torch(x)
        fns["gemm"] = lambda: a @ a
        wall, cpu = interleaved(fns, ARGS.repeats)
        forms = [f for f in fns if f != "gemm"]
        row = {"batch": bs, "threads": {}}
        for t in ARGS.thread_counts:
            peak = 2.0 * GEMM_N ** 3 / wall[(t, "gemm")]
            r = {"median_s": {f: wall[(t, f)] for f in forms}, "median_cpu_s": {f: cpu[(t, f)] for f in forms},
                 "gemm_gflops": peak / 1e9,
                 "fraction_of_gemm_peak": {f: flops * bs / wall[(t, f)] / peak for f in forms},
                 "int_over_float_conv": wall[(t, "int")] / wall[(t, "float_conv")],
                 "int_over_float_conv_cpu": cpu[(t, "int")] / cpu[(t, "float_conv")]}
            if "torch" in forms:
                r["float_token_over_torch"] = wall[(t, "float_token")] / wall[(t, "torch")]
                r["float_conv_over_torch"] = wall[(t, "float_conv")] / wall[(t, "torch")]
            row["threads"][t] = r
        t0 = ARGS.thread_counts[0]
        row["speedup"] = {t: {f: wall[(t0, f)] / wall[(t, f)] for f in forms + ["gemm"]}
                          for t in ARGS.thread_counts[1:]}
        res["batches"].append(row)
        log(f"  batch {bs} (load average {load_average()}): ms per image, median of {ARGS.repeats} "
            f"[fraction of the {GEMM_N}^3 float32 GEMM's throughput]")
        for t, r in row["threads"].items():
            per = " | ".join(f"{f} {r['median_s'][f] / bs * 1e3:.0f} [{r['fraction_of_gemm_peak'][f]:.0%}]"
                             for f in forms)
            log(f"    {t} thread(s): {per} | GEMM {r['gemm_gflops']:.0f} GFLOP/s")
            log(f"      int / float conv = {r['int_over_float_conv']:.2f}x wall, {r['int_over_float_conv_cpu']:.2f}x CPU"
                + (f"; float token / torch = {r['float_token_over_torch']:.2f}x, float conv / torch = "
                   f"{r['float_conv_over_torch']:.2f}x" if "torch" in forms else f"; torch: {torch_note}"))
        for t, s in row["speedup"].items():
            log(f"    speed-up {t0} -> {t} threads: " + " | ".join(f"{f} {v:.2f}x" for f, v in s.items()))
    if not ARGS.quick and name == "deit_base_patch16_224":
        res["rss"] = measure_rss(qm, [1, 8])
        for r in res["rss"]:
            log(f"  peak RSS, integer forward at batch {r['batch']} ({r['threads']} threads) in a fresh process: "
                f"{r['peak_bytes'] / 2**20:.0f} MiB (model loaded: {r['loaded_bytes'] / 2**20:.0f} MiB)")
    return res


def main():
    if ARGS.rss_child:
        print(json.dumps(peak_rss_child(ARGS.rss_child[0], int(ARGS.rss_child[1]))))
        return
    log = (lambda *a: None) if ARGS.json else (lambda *a: print(*a, flush=True))
    report = {"threads": ARGS.thread_counts, "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
              "numpy": np.__version__, "python": platform.python_version(),
              "cpus": os.cpu_count(), "repeats": ARGS.repeats, "load_average_start": load_average(), "models": []}
    log(f"refvit bench: numpy {np.__version__}, {os.cpu_count()} CPUs, threads {ARGS.threads} (BLAS and refvit's "
        f"pool, switched between runs; OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}); medians "
        f"of {ARGS.repeats} interleaved rounds; load average "
        f"{report['load_average_start']}")
    if not ARGS.quick:
        g = bench_int_gemm()
        report["int_gemm"] = g
        log(f"exact int8 GEMM {g['shape']} ({g['threads']} thread(s)): int_matmul (float32 BLAS) "
            f"{g['int_matmul_s'] * 1e3:.1f} ms, numpy int64 matmul {g['int64_matmul_s'] * 1e3:.0f} ms "
            f"(x{g['int64_matmul_s'] / g['int_matmul_s']:.0f})")
    for name in ARGS.models.split(","):
        report["models"].append(bench_model(name, log))
    report["load_average_end"] = load_average()
    log(f"\nload average at the end: {report['load_average_end']}")
    for t in ARGS.thread_counts:
        log(f"ratios int / float conv at {t} thread(s) (wall, CPU):  " + "  ".join(
            f"{m['model'].split('_')[1]} b{b['batch']} {b['threads'][t]['int_over_float_conv']:.2f}x "
            f"{b['threads'][t]['int_over_float_conv_cpu']:.2f}x" for m in report["models"] for b in m["batches"]))
    if ARGS.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
