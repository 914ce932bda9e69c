"""Token pruning (HeatViT / EViT selector): accuracy against compute on real data (prints the table).

The embedded Fashion-MNIST DeiT (6 blocks, 66 tokens) pruned in blocks 1, 3 and 5 at one keep rate
(--stages, --rates), float (conv form by default) and integer (the shipped quantized file, whose constants
do not depend on the pruning) over all 10,000 test images of ../shared/data/fmnist_test.npz: top-1, float/integer
agreement, the multiply-accumulates per image counted from the integer graph's records (relative to the
unpruned model) and refvit's own time for the 10,000 images.

    python bench/eval_prune.py [--stages 1,3,5] [--rates 1.0,0.9,0.7,0.5] [--form conv|token] [--limit N] [--json]

One BLAS thread unless the environment says otherwise (on a shared 2-core machine OpenBLAS's spinning
threads made the float model several times slower).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # before NumPy loads

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refvit import int_model  # noqa: E402
from refvit.models import default_int8_path, load_model  # noqa: E402
from refvit.preprocess import fmnist_transform  # noqa: E402
from refvit.prune import parse_prune, prune_plan  # noqa: E402
from refvit.qfile import load_quantized  # noqa: E402

SHARED = ROOT.parent / "shared"
BATCH = 250


def graph_macs(graph, tensors: dict) -> dict:
    """Multiply-accumulates of one image by op type, from the records' static shapes: conv2d Cout*Cin*k*k per
    output position; attention_scores and attention_context Hh*N*N*D; token_prune C per dropped token
    (the package's weighted sum). Elementwise ops, LayerNorm, softmax and the selection count none."""
    shapes = {op.name: op.shape_for(1) for op in graph}
    out = {}
    for op in graph:
        if op.op == "conv2d":
            w = np.shape(tensors[op.constants["weight"]])                            # (Cout, Cin, k, k)
            macs = int(np.prod(w)) * int(np.prod(op.shape_for(1)[2:]))
        elif op.op == "attention_scores":
            _, hh, d, n = shapes[op.inputs["q"]]                                     # (1, Hh, D, N)
            macs = hh * d * n * n
        elif op.op == "attention_context":
            _, hh, n, _ = shapes[op.inputs["p"]]                                     # (1, Hh, N, N)
            macs = shapes[op.inputs["v"]][2] * hh * n * n
        elif op.op == "token_prune":
            n_in, n_out = shapes[op.inputs["x"]][3], op.shape_for(1)[3]
            macs = op.shape_for(1)[1] * (n_in - n_out + 1) if n_out < n_in else 0   # C * dropped tokens
        else:
            continue
        out[op.op] = out.get(op.op, 0) + macs
    return out


def timed_predictions(fn, images) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    pred = np.concatenate([fn(fmnist_transform(images[i:i + BATCH])).argmax(1) for i in range(0, len(images), BATCH)])
    return pred, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="1,3,5", help="blocks (from 0) that prune, comma-separated")
    ap.add_argument("--rates", default="1.0,0.9,0.7,0.5", help="keep rates, one setting each")
    ap.add_argument("--form", choices=("conv", "token"), default="conv", help="float form (same numbers)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N test images")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with np.load(SHARED / "data" / "fmnist_test.npz") as z:
        images, labels = z["images"][:args.limit], z["labels"][:args.limit].astype(np.int64)
    model = load_model(None, form=args.form)
    shipped = load_quantized(default_int8_path())
    base = sum(graph_macs(shipped.graph, shipped.tensors).values())
    rows = []
    for rate in args.rates.split(","):
        prune = parse_prune(",".join(f"{b}:{rate}" for b in args.stages.split(",")))
        qm = shipped.with_prune(prune)
        macs = graph_macs(qm.graph, qm.tensors)
        pf, tf = timed_predictions(replace(model, prune=prune).logits, images)
        pi, ti = timed_predictions(lambda x: int_model.logits_int8_model(qm, x)[0], images)
        plan = prune_plan(prune, qm.config.depth, qm.config.num_patches)
        rows.append({"keep_rate": float(rate), "prune": ",".join(f"{b}:{r}" for b, r in prune),
                     "tokens": [qm.config.num_tokens] + [qm.config.num_prefix_tokens + s.patches_out for s in plan],
                     "macs_per_image": sum(macs.values()), "macs_relative": sum(macs.values()) / base,
                     "macs_by_op": macs, "images": len(images),
                     "float_top1": float((pf == labels).mean()), "int_top1": float((pi == labels).mean()),
                     "agreement": float((pf == pi).mean()), "float_seconds": round(tf, 1), "int_seconds": round(ti, 1)})
        print(f"keep {rate}: float {100 * rows[-1]['float_top1']:.2f}% ({tf:.0f} s), integer "
              f"{100 * rows[-1]['int_top1']:.2f}% ({ti:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"Fashion-MNIST DeiT, pruning in blocks {args.stages}, {len(images)} test images (float: {args.form} "
          f"form; integer: the shipped quantized file)\n")
    print("| keep rate | tokens (in, after each stage) | MACs / image | vs unpruned | float top-1 | integer top-1 "
          "| agreement | float time | integer time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['keep_rate']:.1f} | {' → '.join(map(str, r['tokens']))} | {r['macs_per_image'] / 1e6:.1f} M | "
              f"{100 * r['macs_relative']:.1f}% | {100 * r['float_top1']:.2f}% | {100 * r['int_top1']:.2f}% | "
              f"{100 * r['agreement']:.2f}% | {r['float_seconds']:.0f} s | {r['int_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
