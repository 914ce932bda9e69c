"""Speed and memory of refvit on DeiT-Tiny/Small/Base (random weights at trained scales: timing does
not depend on the values). Prints figures; asserts nothing.

    python bench/bench.py [--models deit_base_patch16_224,...] [--batch 1,8]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refvit import int_model, model_conv, model_token  # noqa: E402
from refvit.config import preset  # noqa: E402
from refvit.intmath import int_matmul  # noqa: E402
from refvit.quantize import quantize  # noqa: E402
from refvit.checkpoints.convert import token_to_conv  # noqa: E402
from refvit.checkpoints.load import expected_shapes  # noqa: E402


def random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    head_mode = "mean" if cfg.distilled else "cls"
    p = {}
    for k, shape in expected_shapes(cfg, head_mode).items():
        std = np.prod(shape[1:]) ** -0.5 if k.endswith("weight") and len(shape) >= 2 else 0.1
        p[k] = (rng.standard_normal(shape) * std).astype(np.float32)
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            p[k] += 1
    return p, head_mode


def timed(fn, repeat=3):
    fn()  # warm up (page faults, BLAS threads)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_gemm():
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (197, 768), dtype=np.int8)
    b = rng.integers(-127, 128, (768, 3072), dtype=np.int8)
    t_blas = timed(lambda: int_matmul(a, b))
    t_int = timed(lambda: np.matmul(a.astype(np.int64), b.astype(np.int64)), repeat=1)
    assert np.array_equal(int_matmul(a, b), np.matmul(a.astype(np.int64), b.astype(np.int64)))
    flops = 2 * 197 * 768 * 3072
    print(f"int GEMM 197x768x3072: int_matmul (float32 BLAS, exact) {t_blas * 1e3:.1f} ms "
          f"({flops / t_blas / 1e9:.1f} GOP/s); numpy int64 matmul {t_int * 1e3:.0f} ms "
          f"({flops / t_int / 1e9:.2f} GOP/s); speed-up x{t_int / t_blas:.0f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224")
    ap.add_argument("--batch", default="1,8")
    args = ap.parse_args(argv)
    bench_gemm()
    for name in args.models.split(","):
        cfg = preset(name)
        p, head_mode = random_params(cfg)
        cp = token_to_conv(p)
        rng = np.random.default_rng(1)
        calib = rng.standard_normal((4, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
        t = time.perf_counter()
        qm = quantize(cp, cfg, [calib], head_mode=head_mode, method="max")
        t_quant = time.perf_counter() - t
        print(f"\n{name}: {sum(v.size for v in p.values()) / 1e6:.1f} M params; quantize (4 calibration "
              f"images) {t_quant:.1f} s")
        for bs in (int(b) for b in args.batch.split(",")):
            x = rng.standard_normal((bs, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
            t_tok = timed(lambda: model_token.forward(p, x, cfg))
            t_conv = timed(lambda: model_conv.forward(cp, x, cfg))
            t_int = timed(lambda: int_model.logits_int8_model(qm, x))
            t_trace = timed(lambda: int_model.logits_int8_model(qm, x, int_model.Trace()), repeat=1)
            print(f"  batch {bs}: per image  float token {t_tok / bs:.3f} s | float conv {t_conv / bs:.3f} s | "
                  f"INT8 {t_int / bs:.3f} s (x{t_int / t_conv:.1f} of float conv) | INT8 with full trace "
                  f"{t_trace / bs:.3f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
