"""INT8 vs float accuracy on real data (prints figures; the README quotes them).

1. The embedded Fashion-MNIST DeiT over all 10,000 real test images of ../shared/data/fmnist_test.npz:
   float and INT8 top-1, their agreement, and the same on the images not used for calibration.
2. The random-init timm DeiT-Tiny of ../shared/peer with the 20 ImageNet photos: INT8 vs float top-1
   agreement and cosine similarity of the logits.

    python bench/eval_int8.py [--method percentile|max] [--rounding SINGLE_ROUND|DOUBLE_ROUND] [--calib 512]
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
from refvit.models import load_model  # noqa: E402
from refvit.preprocess import fmnist_transform, open_image, timm_eval_transform  # noqa: E402
from refvit.quantize import quantize  # noqa: E402

SHARED = ROOT.parent / "shared"
BATCH = 250


def batches(images, transform, size=BATCH):
    for i in range(0, len(images), size):
        yield transform(images[i:i + size])


def cosine(a, b):
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def eval_fmnist(args):
    data = np.load(SHARED / "data" / "fmnist_test.npz")
    images, labels = data["images"], data["labels"].astype(np.int64)
    model = load_model(None, form="conv")
    t = time.perf_counter()
    qm = quantize(model.params, model.config, batches(images[:args.calib], fmnist_transform, 64),
                  head_mode=model.head_mode, method=args.method, rounding=args.rounding,
                  source=f"Fashion-MNIST test images 0..{args.calib - 1}")
    t_quant = time.perf_counter() - t
    lf, li = [], []
    t = time.perf_counter()
    for x in batches(images, fmnist_transform):
        lf.append(model.logits(x).argmax(1))
    t_float = time.perf_counter() - t
    t = time.perf_counter()
    for x in batches(images, fmnist_transform):
        li.append(int_model.logits_int8_model(qm, x)[0].argmax(1))
    t_int = time.perf_counter() - t
    pf, pi = np.concatenate(lf), np.concatenate(li)
    held = np.arange(len(labels)) >= args.calib
    res = {
        "method": args.method, "rounding": args.rounding, "calibration_images": args.calib,
        "float_top1": float((pf == labels).mean()), "int8_top1": float((pi == labels).mean()),
        "agreement": float((pf == pi).mean()),
        "heldout_float_top1": float((pf == labels)[held].mean()), "heldout_int8_top1": float((pi == labels)[held].mean()),
        "seconds": {"quantize": round(t_quant, 1), "float_10k": round(t_float, 1), "int8_10k": round(t_int, 1)},
    }
    res["drop_points"] = round(100 * (res["float_top1"] - res["int8_top1"]), 2)
    return res


def eval_imagenet_tiny(args):
    name = "timm_deit_tiny_patch16_224_seed0"
    info = json.loads((SHARED / "peer" / f"{name}.json").read_text())
    model = load_model(SHARED / "peer" / f"{name}.safetensors", form="conv")
    x = np.stack([timm_eval_transform(open_image(SHARED / "images" / "imagenet" / f)) for f in info["images"]])
    qm = quantize(model.params, model.config, [x[:10]], head_mode=model.head_mode, method=args.method,
                  rounding=args.rounding, source="first 10 of the 20 ImageNet photos")
    lf = model.logits(x).astype(np.float64)
    li, s = int_model.logits_int8_model(qm, x)
    li = li * s
    cos = [cosine(a, b) for a, b in zip(li, lf)]
    return {"top1_agreement": float((li.argmax(1) == lf.argmax(1)).mean()),
            "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
            "heldout_top1_agreement": float((li.argmax(1) == lf.argmax(1))[10:].mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="percentile", choices=["percentile", "max"])
    ap.add_argument("--rounding", default="SINGLE_ROUND", choices=["SINGLE_ROUND", "DOUBLE_ROUND"])
    ap.add_argument("--calib", type=int, default=512, help="calibrate on the first N Fashion-MNIST test images")
    ap.add_argument("--skip-fmnist", action="store_true")
    args = ap.parse_args(argv)
    if not SHARED.is_dir():
        sys.exit(f"eval_int8: {SHARED} is missing (the shared data folder beside the repo)")
    if not args.skip_fmnist:
        print("Fashion-MNIST DeiT, all 10,000 test images:", json.dumps(eval_fmnist(args), indent=1), flush=True)
    print("timm DeiT-Tiny (random init), 20 ImageNet photos:", json.dumps(eval_imagenet_tiny(args), indent=1))


if __name__ == "__main__":
    main()
