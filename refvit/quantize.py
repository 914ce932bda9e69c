"""Offline post-training quantization of the conv-form DeiT: the only place floats meet the integer model.

One walk over the integer graph (refvit.graph): the float conv form is observed under the graph's op names,
every tensor gets its real scale, and each op record gets its constants for its variant (docs/spec.md,
Part 3 "Quantization scheme" for the default scheme, Part 4 for the others). The default scheme:
- weights: symmetric per output channel, int8 in [-127, 127], s_w[c] = max|W[c]| / 127;
- biases: int32 at scale s_in * s_w[c];
- activations: symmetric per tensor, int8, s = amax / 127 with amax calibrated on real inputs by
  `max` (largest |x| seen) or `percentile` (mean over calibration batches of the p-th percentile of |x|);
  q, k and v are three tensors (three scales) even though one conv makes them;
- every real rescale s_a / s_b becomes an integer multiplier and shift (intmath.quantize_multiplier);
- the logits are int16 at scale amax(logits) / 32767.
All rounding of reals to integers is round-half-away-from-zero (never numpy's half-to-even).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import constants as C
from . import graph as G
from . import int_kernels as K
from . import model_conv
from . import registry as R
from .config import DeiTConfig
from .constants import QuantizationError, head_weights
from .intmath import SINGLE_ROUND, int_range
from .qfile import QuantizedModel

CALIBRATION_METHODS = ("max", "percentile")
DEFAULT_PERCENTILE = 99.99
LOGIT_DTYPE = np.int16

__all__ = ["CALIBRATION_METHODS", "DEFAULT_PERCENTILE", "AccBound", "QuantizationError", "QuantizedModel",
           "accumulator_bounds", "activation_ranges", "check_accumulators", "head_weights", "observe", "quantize",
           "quantize_model", "tensor_scales"]


# ---------------------------------------------------------------------------------------------
# calibration: the float conv form, observed under the graph's op names
# ---------------------------------------------------------------------------------------------

def _amax(x: np.ndarray, method: str, percentile: float) -> float:
    a = np.abs(x).ravel()
    return float(a.max()) if method == "max" else float(np.percentile(a, percentile))


def observe(graph, float_trace: dict) -> dict:
    """The float tensor of every op of `graph`: the float conv form's tensor of the same name, or, for a
    data-movement op (q, k, v, head_input), the same data movement applied to the float tensors."""
    seen = {"input": float_trace["input"]}
    for op in graph:
        if op.name in float_trace:
            seen[op.name] = float_trace[op.name]
        elif R.row(op.op, op.variant).data_movement:
            seen[op.name] = R.row(op.op, op.variant).kernel(**{a: seen[t] for a, t in op.inputs.items()}, **op.attrs)
    return seen


def activation_ranges(params_conv: dict, cfg: DeiTConfig, batches, method: str = "percentile",
                      percentile: float = DEFAULT_PERCENTILE, progress=None, graph=None) -> dict:
    """amax of the input and of every op with `calibrate` over calibration batches of float images (B, 3, H, W).

    `max`: the largest |x| over all batches; `percentile`: the mean over batches of each batch's p-th
    percentile of |x| (the model's input and output always use max: they are not clipped).
    """
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"unknown calibration method {method!r}; choose from {CALIBRATION_METHODS}")
    graph = graph or G.build_graph(cfg)
    names = ["input"] + [op.name for op in graph if op.calibrate]
    unclipped = ("input", graph[-1].name)
    stats: dict = {}
    n = 0
    for x in batches:
        trace: dict = {}
        model_conv.forward(params_conv, np.asarray(x, np.float32), cfg, trace)
        seen = observe(graph, trace)
        for name in names:
            m = "max" if name in unclipped else method
            a = _amax(seen[name], m, percentile)
            stats[name] = max(stats.get(name, 0.0), a) if m == "max" else stats.get(name, 0.0) + a
        n += 1
        if progress:
            progress(n)
    if n == 0:
        raise QuantizationError("no calibration data: give at least one image")
    return {k: (v if k in unclipped or method == "max" else v / n) for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------
# scales and constants: one walk over the records, each row's rules (refvit.registry, refvit.constants)
# ---------------------------------------------------------------------------------------------

def tensor_scales(graph, cfg: DeiTConfig, ranges: dict, p: dict, options: dict | None = None) -> dict:
    """The real scale of every tensor of the graph (None for the fused qkv output, which has three).

    Calibrated ops: amax / 127 (int16: / 32767); the patch embedding shares its scale with the cls/dist
    tokens it is concatenated with. Every other op: its registry row's scale rule (data movement keeps its
    input's scale, scores are at s_q * s_k, probabilities at 1/127, pruned tokens keep x's), or none."""
    options = options or {}
    prefix = C.prefix_tokens(p, cfg)
    s = {"input": C.activation_scale(ranges["input"], G.input_dtype(graph), options)}
    for op in graph:
        rule = R.row(op.op, op.variant).scale
        if op.calibrate:
            amax = ranges[op.name]
            if any(o.op == "concat_tokens" and o.inputs.get("patches") == op.name for o in graph):
                amax = max(amax, float(np.abs(prefix).max()))                       # tokens share one scale
            s[op.name] = C.activation_scale(amax, np.dtype(op.dtype), options)
        else:
            s[op.name] = rule(op, s) if rule else None
    return s


def quantize_model(params_conv: dict, cfg: DeiTConfig, ranges: dict, *, head_mode: str, graph=None,
                   calibration: dict | None = None, scheme: G.Scheme = G.DEFAULT_SCHEME) -> QuantizedModel:
    """Turn conv-form float parameters and calibrated activation ranges into a QuantizedModel: one walk over
    the graph (default: the scheme's, SINGLE_ROUND), each record's constants by its registry row from the
    scales of its inputs and output."""
    graph = graph or G.build_graph(cfg, SINGLE_ROUND, scheme)
    p = {k: np.asarray(v, np.float64) for k, v in params_conv.items()}
    s = tensor_scales(graph, cfg, ranges, p, scheme.options())
    ctx = C.Context(cfg, p, s, {op.name: op for op in graph}, scheme.options())
    T = {"input.scale": s["input"]}
    for op in graph:
        row = R.row(op.op, op.variant)
        if row.constants:
            T |= row.constants(op, ctx)
    for op in graph:
        if op.calibrate:
            T[op.scale] = s[op.name]
    T["attn.softmax.scale"] = next((s[op.name] for op in graph if op.op == "softmax"), 1.0 / K.PROB_ONE)
    T = {k: (np.asarray(v, np.float64) if isinstance(v, float) else v) for k, v in T.items()}
    if scheme.acc_bits < 32 and scheme.acc_overflow == "error":
        check_accumulators(graph, T, scheme.acc_bits)                               # the proof, or the refusal
    return QuantizedModel(cfg, head_mode, dict(calibration or {}), T, graph, scheme.name, scheme.options())


def quantize(params_conv: dict, cfg: DeiTConfig, calib_batches, *, head_mode: str, method: str = "percentile",
             percentile: float = DEFAULT_PERCENTILE, rounding: str = SINGLE_ROUND, progress=None,
             source: str = "", preprocess: dict | None = None, scheme: G.Scheme | None = None) -> QuantizedModel:
    """Calibrate on float image batches, then quantize. The one entry point most callers need: the graph is
    built once (its records carry the rounding mode and the scheme's variants; `QuantizedModel.with_prune`
    adds token pruning, which needs no constants).
    `preprocess` (a Preprocess.to_dict()) is the input pipeline the scales are calibrated for: recorded."""
    scheme = scheme or G.DEFAULT_SCHEME
    graph = G.build_graph(cfg, rounding, scheme)
    seen = []

    def counted(batches):
        for x in batches:
            seen.append(len(x))
            yield x

    ranges = activation_ranges(params_conv, cfg, counted(calib_batches), method, percentile, progress, graph)
    calibration = {"method": method, "source": source, "images": sum(seen)}
    if preprocess:
        calibration["preprocess"] = preprocess
    if method == "percentile":
        calibration["percentile"] = percentile
    return quantize_model(params_conv, cfg, ranges, head_mode=head_mode, graph=graph, calibration=calibration,
                          scheme=scheme)


# ---------------------------------------------------------------------------------------------
# the accumulator width proof (scheme parameter acc_bits; docs/spec.md Part 6, "The accumulator proof")
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AccBound:
    """The exact range [lo, hi] of one accumulator over every input its operands' dtypes allow: a conv's output
    channel (channel) or all of an attention product (channel None). Both ends are reached by some input."""
    op: str
    kind: str
    channel: int | None
    lo: int
    hi: int

    @property
    def bits(self) -> int:
        """The narrowest two's complement width holding [lo, hi]."""
        return max(self.hi.bit_length(), (-self.lo - 1).bit_length()) + 1


def _operand_range(graph, name: str) -> tuple:
    dtype = "int8" if name == "input" else next(o.dtype for o in graph if o.name == name)
    return int_range(np.dtype(dtype))


def accumulator_bounds(graph, constants: dict) -> list:
    """AccBound of every accumulator of the graph: per output channel of each conv (bias + sum w x, x over its
    dtype's range: hi = bias + x_hi P + |x_lo| N, lo = bias + x_lo P - x_hi N with P, N the sums of the positive
    and of the absolute negative weights), and per attention product (q . k over D: [-D 128 127, D 128^2];
    sum_j p v over N tokens, p in [0, 127]: [-N 127 128, N 127^2])."""
    by_name = {o.name: o for o in graph}
    out = []
    for op in graph:
        if op.op == "conv2d":
            w = np.asarray(constants[op.constants["weight"]], np.int64)
            w = w.reshape(w.shape[0], -1)                                               # (Cout, Cin k k)
            pos, neg = np.maximum(w, 0).sum(axis=1), np.maximum(-w, 0).sum(axis=1)     # (Cout,)
            bias = np.asarray(constants[op.constants["bias"]], np.int64)               # (Cout,)
            x_lo, x_hi = _operand_range(graph, op.inputs["x"])
            hi, lo = bias + x_hi * pos - x_lo * neg, bias + x_lo * pos - x_hi * neg    # (Cout,)
            out += [AccBound(op.name, "conv", c, int(lo[c]), int(hi[c])) for c in range(w.shape[0])]
        elif op.op == "attention_scores":
            d = by_name[op.inputs["q"]].shape[2]                                       # (B, Hh, D, N)
            out.append(AccBound(op.name, "q.k", None, -d * 128 * 127, d * 128 * 128))
        elif op.op == "attention_context":
            n = by_name[op.inputs["v"]].shape[3]                                       # (B, Hh, D, N)
            out.append(AccBound(op.name, "p.v", None, -n * 127 * 128, n * 127 * 127))
    return out


def check_accumulators(graph, constants: dict, acc_bits: int) -> list:
    """The accumulator bounds; a QuantizationError naming the first op and channel whose bound needs more than
    acc_bits bits (acc_overflow 'error': refvit never computes a value the hardware could not hold)."""
    bounds = accumulator_bounds(graph, constants)
    for b in bounds:
        if b.bits > acc_bits:
            where = f"output channel {b.channel}" if b.channel is not None else f"every {b.kind} product"
            raise QuantizationError(
                f"{b.op}: {where}: worst-case accumulator [{b.lo}, {b.hi}] needs {b.bits} bits, more than acc_bits "
                f"{acc_bits}; use acc_overflow saturate | wrap to compute the overflow as such hardware does, or a "
                f"wider accumulator")
    return bounds
