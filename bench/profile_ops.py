"""Where the float forms spend their time, op class by op class, against PyTorch eager (timm's model).

refvit's forms are timed by wrapping their building blocks (the outermost wrapped call owns the time of the
calls inside it: LayerNorm's GEMVs count as LayerNorm); torch by torch.profiler's self CPU time per aten op,
grouped the same way. Same random-init parameters and images, interleaved rounds, medians; milliseconds per
image. Needs torch and timm importable (installed aside: never a refvit dependency). Asserts nothing.

    python bench/profile_ops.py [--model deit_small_patch16_224] [--batch 8] [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--model", default="deit_small_patch16_224")
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--threads", type=int, default=1, help="BLAS / refvit / torch threads (default 1)")
ap.add_argument("--repeats", type=int, default=5)
ARGS = ap.parse_args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "REFVIT_THREADS"):
    os.environ[var] = str(ARGS.threads)
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # as `import refvit` sets it when it loads numpy first

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import timm  # noqa: E402

from refvit import model_conv, model_token, models  # noqa: E402
from refvit.config import preset  # noqa: E402
from weights_tools.convert import token_to_conv  # noqa: E402

CLASSES = ("GEMM (+ bias)", "attention core", "LayerNorm", "GELU", "other (adds, copies, embed, head)")
TORCH_CLASSES = {"aten::addmm": 0, "aten::mm": 0, "aten::bmm": 0, "aten::matmul": 0, "aten::linear": 0,
                 "aten::mkldnn_convolution": 0, "aten::convolution": 0, "aten::_convolution": 0,
                 "aten::scaled_dot_product_attention": 1, "aten::_scaled_dot_product_flash_attention_for_cpu": 1,
                 "aten::_scaled_dot_product_attention_math": 1, "aten::softmax": 1, "aten::_softmax": 1,
                 "aten::layer_norm": 2, "aten::native_layer_norm": 2, "aten::gelu": 3}


class Timer:
    """Wraps module functions; the outermost wrapped call on the stack owns the time."""
    def __init__(self):
        self.times, self.depth = defaultdict(float), 0

    def wrap(self, module, name, cls):
        fn = getattr(module, name)

        def timed(*a, **k):
            if self.depth:
                return fn(*a, **k)
            self.depth += 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.times[cls] += time.perf_counter() - t
                self.depth -= 1
        setattr(module, name, timed)


def refvit_profile(forward, wraps, x) -> dict:
    timer = Timer()
    saved = [(m, n, getattr(m, n)) for m, n, _ in wraps]
    for m, n, cls in wraps:
        timer.wrap(m, n, cls)
    try:
        t = time.perf_counter()
        forward(x)
        total = time.perf_counter() - t
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)
    out = {CLASSES[c]: timer.times[c] for c in range(4)}
    out[CLASSES[4]] = total - sum(out.values())
    out["total"] = total
    return out


def torch_profile(model, x) -> dict:
    from torch.profiler import ProfilerActivity, profile
    xt = torch.from_numpy(x)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        model(xt)
        total = time.perf_counter() - t
    out = dict.fromkeys(CLASSES, 0.0)
    for ev in prof.key_averages():
        c = TORCH_CLASSES.get(ev.key)
        if c is not None:
            out[CLASSES[c]] += ev.self_cpu_time_total / 1e6
    known = sum(out.values())
    out[CLASSES[4]] = total - known          # profiler overhead lands here too: compare totals unprofiled
    out["total"] = total
    return out


def main():
    torch.set_num_threads(ARGS.threads)
    cfg = preset(ARGS.model)
    p = models.random_params(cfg, "cls", 0)
    tp = model_token.cast_params(p)
    cp = token_to_conv(tp)
    model = timm.create_model(ARGS.model, pretrained=False).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in p.items()})
    x = np.random.default_rng(1).standard_normal((ARGS.batch, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    forms = {
        "refvit conv": lambda: refvit_profile(lambda v: model_conv.forward(cp, v, cfg), [
            (model_conv, "conv2d", 0), (model_conv, "attend", 1), (model_conv, "layer_norm_conv", 2),
            (model_conv, "gelu", 3)], x),
        "refvit token": lambda: refvit_profile(lambda v: model_token.forward(tp, v, cfg), [
            (model_token, "linear", 0), (model_token, "attend", 1), (model_token, "layer_norm", 2),
            (model_token, "gelu", 3)], x),
        "torch eager": lambda: torch_profile(model, x),
    }
    runs = defaultdict(list)
    for fn in forms.values():
        fn()                                                     # warm-up
    for r in range(ARGS.repeats):
        for name in list(forms)[r % 3:] + list(forms)[:r % 3]:
            runs[name].append(forms[name]())
    med = {name: {k: float(np.median([d[k] for d in ds])) * 1e3 / ARGS.batch for k in ds[0]}
           for name, ds in runs.items()}
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"{ARGS.model}, batch {ARGS.batch}, {ARGS.threads} thread(s), median of {ARGS.repeats}; ms per image; "
          f"torch {torch.__version__}, timm {timm.__version__}; load average {load}")
    names = list(med)
    print("| op class | " + " | ".join(names) + " | conv / torch |")
    print("|---|" + "---|" * (len(names) + 1))
    for k in CLASSES + ("total",):
        t = med["torch eager"][k]
        ratio = f"{med['refvit conv'][k] / t:.2f}x" if t else "-"
        print(f"| {k} | " + " | ".join(f"{med[n][k]:.1f}" for n in names) + f" | {ratio} |")


if __name__ == "__main__":
    main()
