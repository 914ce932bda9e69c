"""The accumulator proof of a quantized model (docs/spec.md Part 6): per accumulating op, the widest worst-case
accumulator (its channel and exact range) and the bits it needs, how many channels exceed --acc-bits, and the
largest |acc| actually reached on real images (golden internals, Fashion-MNIST test images).

    python bench/acc_bounds.py [--model refvit/data/fmnist_deit_int8.safetensors] [--acc-bits 24] [--images 256]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refvit import int_model  # noqa: E402
from refvit.graph import run_graph, Trace  # noqa: E402
from refvit.preprocess import fmnist_transform  # noqa: E402
from refvit.qfile import load_quantized  # noqa: E402
from refvit.quantize import accumulator_bounds  # noqa: E402

SHARED = ROOT.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "refvit" / "data" / "fmnist_deit_int8.safetensors"))
    ap.add_argument("--acc-bits", type=int, default=24)
    ap.add_argument("--images", type=int, default=256, help="real images for the observed maxima (0: none)")
    args = ap.parse_args()
    qm = load_quantized(args.model)
    bounds = accumulator_bounds(qm.graph, qm.tensors)
    seen: dict = {}
    if args.images:
        with np.load(SHARED / "data" / "fmnist_test.npz") as z:
            images = z["images"][:args.images]
        for i in range(0, len(images), 64):
            tr = Trace()
            run_graph(qm.graph, qm.tensors, int_model.quantize_input(qm, fmnist_transform(images[i:i + 64])), tr,
                      internals=True)
            for op in qm.graph:
                name = f"{op.name}.acc" if f"{op.name}.acc" in tr.tensors else op.name
                if op.op in ("conv2d", "attention_scores", "attention_context"):
                    seen[op.name] = max(seen.get(op.name, 0), int(np.abs(tr.tensors[name].astype(np.int64)).max()))
    print(f"{'op':24} {'kind':5} {'worst ch':>8} {'lo':>11} {'hi':>11} {'bits':>4} {'>' + str(args.acc_bits):>5}"
          f" {'seen max|acc|':>13} {'seen bits':>9}")
    for op in dict.fromkeys(b.op for b in bounds):
        rows = [b for b in bounds if b.op == op]
        w = max(rows, key=lambda b: b.bits * 2**40 + max(b.hi, -b.lo))
        over = sum(b.bits > args.acc_bits for b in rows)
        s = seen.get(op)
        print(f"{op:24} {w.kind:5} {'-' if w.channel is None else w.channel:>8} {w.lo:>11} {w.hi:>11} {w.bits:>4} "
              f"{over:>5} {'' if s is None else s:>13} {'' if s is None else s.bit_length() + 1:>9}")
    worst = max(b.bits for b in bounds)
    print(f"\nwidest worst case: {worst} bits; acc_bits {args.acc_bits}: "
          f"{'proved, nothing can overflow' if worst <= args.acc_bits else 'refused (acc_overflow error)'}")


if __name__ == "__main__":
    main()
