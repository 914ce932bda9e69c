"""Where the quantization error comes from: the SQNR of every integer tensor against the float model's tensor
of the same name (the float conv form, observed as the quantizer observes it), dequantized at its scale."""
from __future__ import annotations

import math

import numpy as np

from . import int_model, model_conv
from .quantize import QuantizedModel, observe


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2) in dB (inf when equal)."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - approx) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def sqnr_by_op(qm: QuantizedModel, params_conv: dict, x: np.ndarray) -> dict:
    """{op name: SQNR in dB} for every op whose output has one real scale, on float images x (B, 3, H, W)."""
    ftrace: dict = {}
    model_conv.forward(params_conv, np.asarray(x, np.float32), qm.config, ftrace)
    floats = observe(qm.graph, ftrace)
    trace = int_model.Trace()
    int_model.logits_int8_model(qm, x, trace)
    out = {}
    for op in qm.graph:
        if op.name in floats and op.scale is not None and op.scale in qm.tensors:
            f = np.asarray(floats[op.name], np.float64)
            q = trace.tensors[op.name].astype(np.float64) * float(qm.tensors[op.scale])
            out[op.name] = sqnr_db(f.reshape(q.shape), q)
    return out
