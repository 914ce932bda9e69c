"""Power-of-two scales on real data: the embedded Fashion-MNIST DeiT quantized as `pot8` with the covering rule
(refvit's: the smallest 2^k with 127 * 2^k >= amax) and with the MSE rule (per calibrated tensor, of the two powers
of two around amax / 127 the one with the smaller quantization MSE on the calibration images), against float and
refvit-int8. Calibration as bench/eval_schemes.py (percentile 99.99 on the first --calib test images).

    python bench/eval_pot.py [--calib 512] [--limit N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refvit import graph as G  # noqa: E402
from refvit import int_model, model_conv  # noqa: E402
from refvit.constants import pot_scale  # noqa: E402
from refvit.intmath import int_range, round_half_away_from_zero  # noqa: E402
from refvit.models import load_model  # noqa: E402
from refvit.preprocess import fmnist_transform  # noqa: E402
from refvit.quantize import activation_ranges, observe, quantize_model  # noqa: E402
from refvit.report import sqnr_by_op  # noqa: E402

SHARED = ROOT.parent / "shared"
BATCH = 250


def mse_ranges(model, graph, ranges: dict, calib: list) -> dict:
    """ranges with each calibrated tensor's amax replaced by qmax * 2^k, 2^k the MSE-minimising of the cover and
    half of it (a power of two times qmax is its own cover, so quantize_model then uses exactly 2^k)."""
    seen: dict = {}
    for x in calib:
        trace: dict = {}
        model_conv.forward(model.params, np.asarray(x, np.float32), model.config, trace)
        for name, t in observe(graph, trace).items():
            seen.setdefault(name, []).append(np.asarray(t, np.float64).ravel())
    dtypes = {op.name: op.dtype for op in graph} | {"input": "int8"}
    out = dict(ranges)
    for name, amax in ranges.items():
        lo, hi = int_range(np.dtype(dtypes[name]))
        data = np.concatenate(seen[name])
        cover = float(pot_scale(max(amax, 1e-8), hi))

        def mse(s):
            q = np.clip(round_half_away_from_zero(data / s), lo, hi)
            return float(np.mean((q * s - data) ** 2))
        out[name] = hi * min((cover, cover / 2), key=mse)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    with np.load(SHARED / "data" / "fmnist_test.npz") as z:
        images, labels = z["images"][:args.limit], z["labels"][:args.limit].astype(np.int64)
    model = load_model(None, form="conv")
    pf = np.concatenate([model.logits(fmnist_transform(images[i:i + BATCH])).argmax(1)
                         for i in range(0, len(images), BATCH)])
    calib = [fmnist_transform(images[i:i + 64]) for i in range(0, args.calib, 64)]
    graph8, graph_pot = (G.build_graph(model.config, scheme=G.SCHEMES[n]) for n in ("refvit-int8", "pot8"))
    ranges = activation_ranges(model.params, model.config, calib, graph=graph_pot)
    models = {"refvit-int8": quantize_model(model.params, model.config, ranges, head_mode=model.head_mode,
                                            graph=graph8),
              "pot8 (cover)": quantize_model(model.params, model.config, ranges, head_mode=model.head_mode,
                                             graph=graph_pot, scheme=G.SCHEMES["pot8"]),
              "pot8 (mse)": quantize_model(model.params, model.config, mse_ranges(model, graph_pot, ranges, calib[:2]),
                                           head_mode=model.head_mode, graph=graph_pot, scheme=G.SCHEMES["pot8"])}
    print(f"{len(images)} images; float top-1 {100 * (pf == labels).mean():.2f}%")
    probe = fmnist_transform(images[args.calib:args.calib + 128])
    sq = {name: sqnr_by_op(qm, model.params, probe) for name, qm in models.items()}
    loss = {op: sq["refvit-int8"][op] - sq["pot8 (cover)"][op] for op in sq["pot8 (cover)"] if op in sq["refvit-int8"]}
    print("SQNR (dB) on 128 held-out images, the ops where pot8 (cover) loses most against refvit-int8:")
    for op in sorted(loss, key=loss.get, reverse=True)[:8]:
        print(f"  {op:26} int8 {sq['refvit-int8'][op]:5.1f}  pot8 cover {sq['pot8 (cover)'][op]:5.1f}  "
              f"pot8 mse {sq['pot8 (mse)'].get(op, float('nan')):5.1f}")
    print("median SQNR: " + ", ".join(f"{n} {np.median(list(v.values())):.1f}" for n, v in sq.items()), flush=True)
    for name, qm in models.items():
        t = time.perf_counter()
        pi = np.concatenate([int_model.logits_int8_model(qm, fmnist_transform(images[i:i + BATCH]))[0].argmax(1)
                             for i in range(0, len(images), BATCH)])
        print(f"{name}: integer top-1 {100 * (pi == labels).mean():.2f}% (drop "
              f"{100 * ((pf == labels).mean() - (pi == labels).mean()):.2f} pt), agreement "
              f"{100 * (pf == pi).mean():.2f}%  [{time.perf_counter() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
