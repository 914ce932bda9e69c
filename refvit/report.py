"""Where the quantization error comes from: the SQNR of every integer tensor against the float model's tensor
of the same name (the float conv form, observed as the quantizer observes it), dequantized at its scale.

`float_tensors` is that float trace (also what `golden --float` dumps); `sqnr_by_op` the SQNR of one batch;
`sqnr_report` accumulates signal and noise over many batches (`refvit report`), `format_table` prints it and
`plot_sqnr` draws it (matplotlib, the optional extra `refvit[plot]`, imported only there).
"""
from __future__ import annotations

import importlib.util
import math
import re

import numpy as np

from . import int_model, model_conv
from .qfile import QuantizedModel
from .quantize import observe

PLOT_EXTRA = "pip install 'refvit[plot]'"
BAR_DB = 2.0                     # the text table's bar: one character per 2 dB


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2) in dB (inf when equal)."""
    ref = np.asarray(reference, np.float64)
    return _db(float(np.sum(ref ** 2)), float(np.sum((ref - approx) ** 2)))


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def float_tensors(qm: QuantizedModel, params_conv: dict, x: np.ndarray) -> dict:
    """{tensor name: float32 array} of the float conv form on float images x (B, 3, H, W), under the integer
    graph's names (quantize.observe), in the integer tensor's shape where the element counts agree."""
    x = np.asarray(x, np.float32)
    trace: dict = {}
    model_conv.forward(params_conv, x, qm.config, trace, prune=qm.prune)   # the same token selections
    shapes = {"input": x.shape} | {op.name: op.shape_for(x.shape[0]) for op in qm.graph}
    out = {}
    for name, f in observe(qm.graph, trace).items():
        f = np.asarray(f, np.float32)
        out[name] = f.reshape(shapes[name]) if f.size == int(np.prod(shapes[name])) else f
    return out


def sqnr_terms(qm: QuantizedModel, params_conv: dict, x: np.ndarray) -> dict:
    """{op name: (sum f^2, sum (f - q * scale)^2)} for every op whose output has one real scale and a float
    tensor of its size, on float images x (B, 3, H, W); q is the integer model's output of that op."""
    floats = float_tensors(qm, params_conv, x)
    trace = int_model.Trace()
    int_model.logits_int8_model(qm, x, trace)
    out = {}
    for op in qm.graph:
        f = floats.get(op.name)
        if f is None or op.scale is None or op.scale not in qm.tensors or f.size != trace.tensors[op.name].size:
            continue
        f = f.astype(np.float64).reshape(trace.tensors[op.name].shape)
        q = trace.tensors[op.name].astype(np.float64) * float(qm.tensors[op.scale])
        out[op.name] = (float(np.sum(f ** 2)), float(np.sum((f - q) ** 2)))
    return out


def sqnr_by_op(qm: QuantizedModel, params_conv: dict, x: np.ndarray) -> dict:
    """{op name: SQNR in dB} for every op whose output has one real scale, on float images x (B, 3, H, W)."""
    return {name: _db(*terms) for name, terms in sqnr_terms(qm, params_conv, x).items()}


def sqnr_report(qm: QuantizedModel, params_conv: dict, batches, progress=None) -> list:
    """Signal and noise summed over float batches (B, 3, H, W) -> one row per op in graph order:
    {index, name, op, variant, sqnr_db (None: exact), signal, noise}."""
    totals: dict = {}
    n = 0
    for x in batches:
        for name, (s, e) in sqnr_terms(qm, params_conv, x).items():
            a, b = totals.get(name, (0.0, 0.0))
            totals[name] = (a + s, b + e)
        n += 1
        if progress:
            progress(n)
    rows = []
    for i, op in enumerate(qm.graph):
        if op.name in totals:
            db = _db(*totals[op.name])
            rows.append({"index": i, "name": op.name, "op": op.op, "variant": op.variant,
                         "sqnr_db": None if math.isinf(db) else round(db, 3),
                         "signal": totals[op.name][0], "noise": totals[op.name][1]})
    return rows


def output_saturation(qm: QuantizedModel, x: np.ndarray) -> dict | None:
    """Whether the integer logits saturate on calibration images x (B, 3, H, W), or None. The logits are
    calibrated by max, so by design the one image with the largest logit lands at (or one rounding step from)
    the dtype's limit; more than one image at a limit, or half or more of the images checked (a calibration
    set of one or two images), means the range has no headroom. -> {tensor, dtype, limits, images_at_limit,
    images, values_at_limit, values}."""
    li, _ = int_model.logits_int8_model(qm, x)                                  # (B, K, 1, 1) int16
    info = np.iinfo(li.dtype)
    at = (li == info.max) | (li == info.min)                                     # (B, K, 1, 1)
    images = int(np.count_nonzero(at.reshape(len(x), -1).any(axis=1)))
    if images == 0 or (images == 1 and 2 * images < len(x)):
        return None
    return {"tensor": qm.graph[-1].name, "dtype": li.dtype.name, "limits": [int(info.min), int(info.max)],
            "images_at_limit": images, "images": int(len(x)), "values_at_limit": int(np.count_nonzero(at)),
            "values": int(li.size)}


def saturation_warning(sat: dict, calibration_images: int) -> str:
    """The one-line warning for output_saturation's finding (on the first sat['images'] of calibration_images)."""
    return (f"warning: the {sat['dtype']} logits ({sat['tensor']}) saturate on the calibration data itself: "
            f"{sat['images_at_limit']} of {sat['images']} images checked (of {calibration_images} calibration "
            f"images) have logits at {sat['limits'][0]} or {sat['limits'][1]}; the logit range has no headroom, so "
            f"larger logits on other inputs clip and tie: calibrate on more images")


def lowest(rows: list) -> dict | None:
    """The row with the lowest SQNR (None: every op exact, or no rows)."""
    finite = [r for r in rows if r["sqnr_db"] is not None]
    return min(finite, key=lambda r: r["sqnr_db"]) if finite else None


def not_reported(graph, rows: list) -> list:
    """The ops without a row (no float tensor of that name, or several output scales), blocks merged:
    'blocks.*.attn.scores'."""
    named = {r["name"] for r in rows}
    return list(dict.fromkeys(re.sub(r"^blocks\.\d+\.", "blocks.*.", op.name) for op in graph if op.name not in named))


def format_table(rows: list, omitted=()) -> str:
    """index, op, type, SQNR (dB) and a bar of one character per BAR_DB dB; then the ops left out and the lowest."""
    width = max([len(r["name"]) for r in rows] + [2])
    kinds = [f"{r['op']}/{r['variant']}" for r in rows]
    kind_width = max([len(k) for k in kinds] + [4])
    lines = [f"{'idx':>4}  {'op':{width}}  {'type':{kind_width}}  {'SQNR dB':>8}"]
    for r, kind in zip(rows, kinds):
        db = r["sqnr_db"]
        shown = "exact" if db is None else f"{db:8.2f}"
        bar = "" if db is None else "#" * max(0, int(db // BAR_DB))
        lines.append(f"{r['index']:4d}  {r['name']:{width}}  {kind:{kind_width}}  {shown:>8}  {bar}")
    if omitted:
        lines.append(f"not in the table (no float tensor of the same name, or several scales): {', '.join(omitted)}")
    low = lowest(rows)
    if low is not None:
        lines.append(f"lowest SQNR: [{low['index']}] {low['name']} ({low['op']}) {low['sqnr_db']:.2f} dB")
    return "\n".join(lines)


def plot_available() -> bool:
    """Whether matplotlib (the optional extra refvit[plot]) can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_sqnr(rows: list, path, title: str = "") -> None:
    """A PNG of SQNR (dB) per op in graph order (ImportError without matplotlib: PLOT_EXTRA installs it)."""
    import matplotlib                                 # the optional extra, imported only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [r for r in rows if r["sqnr_db"] is not None]
    kinds = list(dict.fromkeys(r["op"] for r in shown))                 # one colour per op type
    fig, ax = plt.subplots(figsize=(max(8.0, 0.12 * len(shown)), 4.5))
    for kind in kinds:
        at = [i for i, r in enumerate(shown) if r["op"] == kind]
        ax.bar(at, [shown[i]["sqnr_db"] for i in at], color=f"C{kinds.index(kind) % 10}", label=kind)
    ax.legend(fontsize=6, ncol=min(len(kinds), 5))
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([r["name"] for r in shown], rotation=90, fontsize=5)
    ax.set_ylabel("SQNR (dB), integer vs float")
    ax.set_title(title or "SQNR per op")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
