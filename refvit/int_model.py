"""The integer DeiT of a QuantizedModel: its graph (refvit.graph) run on its constants.

Pure integer arithmetic from the int8 input to the int16 logits. With a Trace, every op is recorded in
execution order with its inputs, outputs and constants, which is what golden vectors are made of.
"""
from __future__ import annotations

import numpy as np

from . import int_kernels as K
from .graph import Trace, input_dtype, kernel_set, run_graph
from .qfile import QuantizedModel

__all__ = ["Trace", "forward_int", "quantize_input", "logits_int8_model"]


def forward_int(qm: QuantizedModel, xq: np.ndarray, trace: Trace | None = None, internals: bool = False,
                kernels: str = "fast") -> np.ndarray:
    """int8 input (B, in_chans, H, W) (int16 with 16-bit activations) -> int16 logits (B, K), at scale
    qm.tensors['logits.scale'].

    internals: the trace also records what the kernels compute inside each op (their registry rows' internals).
    kernels: "fast" (default) or "reference" (refvit.reference, the normative plain kernels: same bits, slower)."""
    cfg = qm.config
    expect = (cfg.in_chans, cfg.img_size, cfg.img_size)
    dt = input_dtype(qm.graph)
    if not (isinstance(xq, np.ndarray) and xq.dtype == dt and xq.ndim == 4 and xq.shape[1:] == expect):
        raise ValueError(f"forward_int: input must be {dt} (B, {', '.join(map(str, expect))}), "
                         f"got {getattr(xq, 'dtype', type(xq).__name__)} {getattr(xq, 'shape', '')}")
    logits = run_graph(qm.graph, qm.tensors, xq, trace, kernel_set(kernels), internals=internals)        # (B, K, 1, 1)
    return logits.reshape(logits.shape[0], -1)                                      # (B, K)


def quantize_input(qm: QuantizedModel, x: np.ndarray) -> np.ndarray:
    """The model boundary: float image (B, 3, H, W) -> int8 (int16 with 16-bit activations) at the calibrated input
    scale."""
    return K.quantize_input(np.asarray(x, np.float64), float(qm.tensors["input.scale"]), input_dtype(qm.graph))


def logits_int8_model(qm: QuantizedModel, x: np.ndarray, trace: Trace | None = None,
                      kernels: str = "fast") -> tuple[np.ndarray, float]:
    """Float images -> (int16 logits, their real scale)."""
    return forward_int(qm, quantize_input(qm, x), trace, kernels=kernels), float(qm.tensors["logits.scale"])
