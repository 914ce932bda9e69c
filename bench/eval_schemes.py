"""Accuracy of every named integer scheme on real data (prints the README's schemes table).

The embedded Fashion-MNIST DeiT, calibrated (percentile 99.99, the default) on the first --calib test images of
../shared/data/fmnist_test.npz; float and integer top-1 over all 10,000 test images and over the held-out
ones (not used for calibration), top-1 agreement, and the SQNR of every integer tensor against the float
model's (dequantized; min and median over ops, on 256 held-out images).

    python bench/eval_schemes.py [--schemes ibert,ivit] [--calib 512] [--limit N] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refvit import int_model  # noqa: E402
from refvit.graph import SCHEMES  # noqa: E402
from refvit.models import load_model  # noqa: E402
from refvit.preprocess import fmnist_transform  # noqa: E402
from refvit.quantize import quantize  # noqa: E402
from refvit.report import sqnr_by_op  # noqa: E402

SHARED = ROOT.parent / "shared"
BATCH = 250


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated scheme names")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--limit", type=int, default=None, help="only the first N test images")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with np.load(SHARED / "data" / "fmnist_test.npz") as z:
        images, labels = z["images"][:args.limit], z["labels"][:args.limit].astype(np.int64)
    model = load_model(None, form="conv")
    t = time.perf_counter()
    pf = np.concatenate([model.logits(fmnist_transform(images[i:i + BATCH])).argmax(1)
                         for i in range(0, len(images), BATCH)])
    print(f"float: {len(images)} images in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    held = np.arange(len(labels)) >= args.calib
    probe = fmnist_transform(images[args.calib:args.calib + 256])
    rows = []
    for name in args.schemes.split(","):
        t = time.perf_counter()
        calib = (fmnist_transform(images[i:i + 64]) for i in range(0, args.calib, 64))
        qm = quantize(model.params, model.config, calib, head_mode=model.head_mode, scheme=SCHEMES[name],
                      source=f"Fashion-MNIST test images 0..{args.calib - 1}")
        pi = np.concatenate([int_model.logits_int8_model(qm, fmnist_transform(images[i:i + BATCH]))[0].argmax(1)
                             for i in range(0, len(images), BATCH)])
        sq = np.array(list(sqnr_by_op(qm, model.params, probe).values()))
        row = {"scheme": name, "images": len(images), "float_top1": float((pf == labels).mean()),
               "int_top1": float((pi == labels).mean()), "agreement": float((pf == pi).mean()),
               "held_out": int(held.sum()), "float_top1_held_out": float((pf == labels)[held].mean()),
               "int_top1_held_out": float((pi == labels)[held].mean()),
               "sqnr_db_min": float(sq.min()), "sqnr_db_median": float(np.median(sq)),
               "seconds": round(time.perf_counter() - t, 1)}
        rows.append(row)
        print(f"{name}: int top-1 {row['int_top1']:.4f} (float {row['float_top1']:.4f}), agreement "
              f"{row['agreement']:.4f}, SQNR min {row['sqnr_db_min']:.1f} dB, {row['seconds']} s",
              file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| scheme | float top-1 | integer top-1 | drop | agreement | held-out float / integer | SQNR min / median (dB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {100 * r['float_top1']:.2f}% | {100 * r['int_top1']:.2f}% | "
              f"{100 * (r['float_top1'] - r['int_top1']):.2f} pt | {100 * r['agreement']:.2f}% | "
              f"{100 * r['float_top1_held_out']:.2f}% / {100 * r['int_top1_held_out']:.2f}% ({r['held_out']}) | "
              f"{r['sqnr_db_min']:.1f} / {r['sqnr_db_median']:.1f} |")


if __name__ == "__main__":
    main()
