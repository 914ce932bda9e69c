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

import math
from dataclasses import dataclass, field, replace

import numpy as np

from . import graph as G
from . import int_kernels as K
from . import int_kernels_variants as KV
from . import model_conv
from .config import DeiTConfig
from .intmath import (ROUNDING_MODES, SINGLE_ROUND, int_range, quantize_add_multipliers, quantize_multiplier,
                      quantize_multipliers, round_half_away_from_zero, saturate)

CALIBRATION_METHODS = ("max", "percentile")
DEFAULT_PERCENTILE = 99.99
LOGIT_DTYPE = np.int16


class QuantizationError(ValueError):
    """Bad quantizer input: an unknown method or rounding mode, or no calibration data."""


@dataclass(frozen=True, eq=False)
class QuantizedModel:
    """Integer constants and scales of a quantized conv-form DeiT, keyed by op/tensor name.

    `tensors` is flat and safetensors-ready: int8/int16/int32/int64/uint16 constants that the integer
    forward uses, and float64 `*.scale` entries (real scales, for reporting and dequantization only).
    """
    config: DeiTConfig
    head_mode: str
    rounding: str
    calibration: dict
    tensors: dict = field(repr=False)
    graph: tuple = field(repr=False, default=())        # the op records (refvit.graph); () = built from config
    scheme: G.Scheme = G.DEFAULT_SCHEME

    def __post_init__(self):
        if not self.graph:
            object.__setattr__(self, "graph", G.build_graph(self.config, self.rounding, self.scheme))

    def with_rounding(self, rounding: str) -> "QuantizedModel":
        """The same constants under another rounding mode (they do not depend on it): every record that
        takes a rounding mode gets this one."""
        if rounding not in ROUNDING_MODES:
            raise QuantizationError(f"unknown rounding mode {rounding!r}; choose from {ROUNDING_MODES}")
        graph = tuple(replace(op, attrs={**op.attrs, "rounding": rounding}) if "rounding" in op.attrs else op
                      for op in self.graph)
        return QuantizedModel(self.config, self.head_mode, rounding, self.calibration, self.tensors, graph,
                              self.scheme)

    def metadata(self) -> dict:
        return {"format": "refvit-int8", "config": self.config.to_dict(), "head_mode": self.head_mode,
                "rounding": self.rounding, "scheme": self.scheme.name, "scheme_choices": self.scheme.to_dict(),
                "scheme_note": G.SCHEME_NOTES.get(self.scheme.name, "a custom scheme"),
                "calibration": self.calibration}


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
        elif op.op in G.DATA_MOVEMENT:
            seen[op.name] = G.KERNELS[(op.op, op.variant)](**{a: seen[t] for a, t in op.inputs.items()}, **op.attrs)
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
# constants
# ---------------------------------------------------------------------------------------------

def _scale(amax: float, dtype=np.int8) -> float:
    return max(float(amax), 1e-8) / int_range(dtype)[1]


def _quantize_tensor(x: np.ndarray, scale, dtype) -> np.ndarray:
    return saturate(round_half_away_from_zero(np.asarray(x, np.float64) / scale), dtype)


def _multipliers(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m, s = quantize_multipliers(np.atleast_1d(scales))           # element for element quantize_multiplier
    return m.astype(np.int32), s.astype(np.int8)


def _per_channel_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 weights in [-127, 127] and their scales (Cout,)."""
    w = np.asarray(w, np.float64)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    s_w = np.where(amax > 0, amax / 127.0, 1.0)                                   # all-zero row: any scale
    return _quantize_tensor(w, s_w.reshape(-1, *[1] * (w.ndim - 1)), np.int8), s_w


def _weights_of(variant: str, scheme: G.Scheme):
    """The offline weight quantizer of a conv variant: w -> (int8 codes, per-channel scales, extra constants)."""
    if variant == "w8":
        return lambda w: (*_per_channel_weight(w), {})
    if variant == "w4":
        return lambda w: (*KV.per_channel_weight_w4(w), {})

    def mixed_pot(w):
        codes, scales, pot_rows = KV.per_channel_weight_mixed_pot(w, scheme.pot_fraction)
        return codes, scales, {"pot_rows": pot_rows}
    return mixed_pot


def _conv_constants(name, w, b, s_in: float, s_out, out_dtype=np.int8, weights=None) -> dict:
    """int8 weight codes, int32 bias at s_in*s_w, and the per-channel rescale s_in*s_w/s_out of one conv."""
    wq, s_w, extra = (weights or (lambda w: (*_per_channel_weight(w), {})))(w)
    s_acc = s_in * s_w                                                             # (Cout,)
    bias = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64)
    bq = round_half_away_from_zero(bias / s_acc)
    lo, hi = int_range(np.int32)
    headroom = hi - int(np.prod(w.shape[1:])) * 128 * 127
    if np.abs(bq).max(initial=0) > headroom:
        raise QuantizationError(f"{name}: bias does not fit the int32 accumulator headroom at scale s_in*s_w")
    m, s = _multipliers(s_acc / np.broadcast_to(s_out, s_acc.shape))
    return {f"{name}.weight": wq, f"{name}.bias": bq.astype(np.int32), f"{name}.multiplier": m,
            f"{name}.shift": s, f"{name}.weight_scale": s_w} | {f"{name}.{k}": v for k, v in extra.items()}


def _layernorm_constants(name, gamma, beta, eps, C: int, s_in: float, s_out: float) -> dict:
    """LayerNorm: eps_int, gamma as int8 per-channel depthwise weights, beta as int32 bias at s_t*s_g.

    The kernel's normalized value is z = sqrt(C) * t * 2^-16, so t has scale s_t = sqrt(C) * 2^-16.
    s_g is raised where a small |gamma| with a large |beta| would overflow the bias headroom."""
    gamma, beta = np.asarray(gamma, np.float64).ravel(), np.asarray(beta, np.float64).ravel()
    s_t = math.sqrt(C) * 2.0 ** -K.LN_T_BITS
    headroom = (2 ** 31 - 1) - 127 * 2 ** K.LN_T_BITS
    s_g = np.maximum(np.abs(gamma) / 127.0, np.abs(beta) / (s_t * headroom) * 1.01)
    s_g = np.where(s_g > 0, s_g, 1.0)
    m, s = _multipliers(s_t * s_g / s_out)
    return {f"{name}.weight": _quantize_tensor(gamma, s_g, np.int8),
            f"{name}.bias": round_half_away_from_zero(beta / (s_t * s_g)).astype(np.int32),
            f"{name}.multiplier": m, f"{name}.shift": s, f"{name}.weight_scale": s_g,
            f"{name}.eps_int": np.array(K.layernorm_eps_int(eps, C, s_in), np.int64)}


def _add_constants(name, s_a: float, s_b: float, s_out: float) -> dict:
    ma, mb, s = quantize_add_multipliers(s_a, s_b, s_out)
    return {f"{name}.multiplier_a": np.array(ma, np.int32), f"{name}.multiplier_b": np.array(mb, np.int32),
            f"{name}.shift": np.array(s, np.int8)}


def _rescale_constants(name, scale: float) -> dict:
    m, s = quantize_multiplier(scale)
    return {f"{name}.multiplier": np.array(m, np.int32), f"{name}.shift": np.array(s, np.int8)}


def head_weights(params_conv: dict, cfg: DeiTConfig) -> tuple[np.ndarray, np.ndarray]:
    """The classifier as ONE 1x1 conv over the prefix tokens stacked along channels, (K, P*C, 1, 1).

    'cls' head: W_head on the cls token. 'mean' head: [W_head, W_dist] / 2 on [cls; dist] and bias
    (b_head + b_dist) / 2 -- exactly the mean of the two heads, so one integer conv computes it."""
    w, b = params_conv["head.weight"], params_conv["head.bias"]                     # (K, C, 1, 1), (K,)
    P = cfg.num_prefix_tokens
    if "head_dist.weight" in params_conv:
        return (np.concatenate([w, params_conv["head_dist.weight"]], axis=1) / 2,
                (b + params_conv["head_dist.bias"]) / 2)
    pad = np.zeros((w.shape[0], (P - 1) * cfg.embed_dim, 1, 1), w.dtype)          # dist token unused
    return np.concatenate([w, pad], axis=1), b


def _float_conv(op: G.Op, p: dict, cfg: DeiTConfig) -> tuple:
    """The float (weight, bias) a conv record quantizes: its checkpoint parameters by the record's name. A
    DeiT-III layer scale is folded into the conv before it (attn.proj: ls1, mlp.fc2: ls2): w' = gamma w,
    b' = gamma b per output channel, exactly the float branch (docs/spec.md, "Layer scale")."""
    if op.name == "head":
        return head_weights(p, cfg)
    key = "patch_embed.proj" if op.name == "patch_embed" else op.name
    w, b = p[f"{key}.weight"], p.get(f"{key}.bias")                          # (Cout, Cin, k, k), (Cout,)
    block, _, conv = op.name.partition(".")[2].partition(".")                 # 'blocks.3.attn.proj' -> '3', 'attn.proj'
    gamma = p.get(f"blocks.{block}.{_LAYER_SCALES[conv]}") if conv in _LAYER_SCALES else None
    if gamma is not None:                                                     # gamma (Cout,)
        w, b = gamma[:, None, None, None] * w, (None if b is None else gamma * b)  # (Cout, Cin, 1, 1), (Cout,)
    return w, b


_LAYER_SCALES = {"attn.proj": "ls1.gamma", "mlp.fc2": "ls2.gamma"}   # a block's conv -> the layer scale after it


def tensor_scales(graph, cfg: DeiTConfig, ranges: dict, p: dict) -> dict:
    """The real scale of every tensor of the graph (None for the fused qkv output, which has three).

    Calibrated ops: amax / 127 (int16: / 32767). The patch embedding shares its scale with the cls/dist
    tokens it is concatenated with; data movement keeps its input's scale; scores are at s_q * s_k,
    probabilities at 1/127; tokens after a selection (token_prune) keep the residual stream's scale."""
    prefix = np.concatenate([p["cls_token"]] + ([p["dist_token"]] if cfg.distilled else []), axis=3)
    s = {"input": _scale(ranges["input"])}
    for op in graph:
        if op.calibrate:
            amax = ranges[op.name]
            if any(o.op == "concat_tokens" and o.inputs.get("patches") == op.name for o in graph):
                amax = max(amax, float(np.abs(prefix).max()))                       # tokens share one scale
            s[op.name] = _scale(amax, np.dtype(op.dtype))
        elif op.op in ("concat_tokens", "gather_prefix"):
            s[op.name] = s[next(iter(op.inputs.values()))]
        elif op.op == "token_prune":                                                # pruned tokens: x's scale
            s[op.name] = s[op.inputs["x"]]
        elif op.op == "attention_scores":
            s[op.name] = s[op.inputs["q"]] * s[op.inputs["k"]]
        elif op.op == "softmax":
            s[op.name] = 1.0 / K.PROB_ONE
        else:
            s[op.name] = None
    return s


def _scalars(name: str, values: dict) -> dict:
    """Scalar integer constants of a kernel variant: multipliers int32, shifts int8, the rest int64."""
    def dtype(k):
        return np.int32 if k.startswith("multiplier") else np.int8 if k.startswith("shift") else np.int64
    return {f"{name}.{k}": np.array(v, dtype(k)) for k, v in values.items()}


def _op_constants(op: G.Op, by_name: dict, s: dict, p: dict, cfg: DeiTConfig, scheme: G.Scheme) -> dict:
    """The integer constants (and their reporting scales) of one op record."""
    if op.op == "conv2d":
        w, b = _float_conv(op, p, cfg)
        s_out = s[op.name]
        if s_out is None:   # the fused qkv conv: its output channels carry the scales of the three splits
            parts = sorted((o for o in by_name.values() if o.inputs.get("qkv") == op.name),
                           key=lambda o: o.attrs["part"])
            s_out = np.repeat([s[o.name] for o in parts], w.shape[0] // len(parts))
        return _conv_constants(op.name, w, b, s[op.inputs["x"]], s_out, np.dtype(op.dtype),
                               _weights_of(op.variant, scheme))
    if op.op == "layernorm":
        T = _layernorm_constants(op.name, p[f"{op.name}.weight"], p[f"{op.name}.bias"], cfg.ln_eps,
                                 cfg.embed_dim, s[op.inputs["x"]], s[op.name])
        if op.variant == "int32":   # eps as a pair (eps_int, eps_shift) with 32-bit intermediates
            eps_int, eps_shift = KV.layernorm_int32_eps(cfg.ln_eps, cfg.embed_dim, s[op.inputs["x"]])
            T |= {f"{op.name}.eps_int": np.array(eps_int, np.int64), f"{op.name}.eps_shift": np.array(eps_shift, np.int64)}
        return T
    if op.op == "add":
        T, scales = {}, []
        for arg in ("a", "b"):
            if arg in op.inputs:
                scales.append(s[op.inputs[arg]])
            else:   # a constant operand (the position embedding), per tensor at its own max
                c = op.constants[arg]
                scales.append(_scale(np.abs(p[c]).max()))
                T |= {c: _quantize_tensor(p[c], scales[-1], np.int8), f"{c}.scale": scales[-1]}
        return T | _add_constants(op.name, *scales, s[op.name])
    if op.op == "concat_tokens":
        prefix = np.concatenate([p["cls_token"]] + ([p["dist_token"]] if cfg.distilled else []), axis=3)
        return {op.constants["prefix"]: _quantize_tensor(prefix, s[op.name], np.int8)}
    if op.op == "softmax":
        scores = by_name[op.inputs["scores"]]
        logit_scale = s[scores.name] * cfg.head_dim ** -0.5                   # the real logit of one score unit
        if op.variant == "table":
            T = _rescale_constants(op.name, logit_scale * 2 ** K.EXP_INDEX_BITS)
            T[op.constants["exp_table"]] = K.make_exp_table()
        else:                                                                  # poly, shift: differences in 2^-14
            T = _scalars(op.name, dict(zip(("multiplier", "shift"), KV.softmax_exp_multiplier(logit_scale))))
        return T | {f"{scores.name}.scale": s[scores.name]}
    if op.op == "attention_context":
        return _rescale_constants(op.name, s[op.inputs["v"]] / K.PROB_ONE / s[op.name])
    if op.op == "gelu":
        s_in = s[op.inputs["x"]]
        if op.variant == "poly":
            return _scalars(op.name, KV.gelu_poly_constants(s_in, s[op.name], scheme.gelu_delta))
        if op.variant == "shift":
            return _scalars(op.name, KV.gelu_shift_constants(s_in, s[op.name]))
        return {op.constants["table"]: K.make_gelu_table(s_in, s[op.name])}
    if op.op in ("attention_scores", "split_heads", "gather_prefix", "token_select", "token_prune"):
        return {}
    raise QuantizationError(f"the quantizer has no constants for op {op.op!r} ({op.name})")


def quantize_model(params_conv: dict, cfg: DeiTConfig, ranges: dict, *, head_mode: str,
                   rounding: str = SINGLE_ROUND, calibration: dict | None = None,
                   scheme: G.Scheme = G.DEFAULT_SCHEME) -> QuantizedModel:
    """Turn conv-form float parameters and calibrated activation ranges into a QuantizedModel: one walk over
    the graph, each op's constants from the scales of its inputs and output."""
    if rounding not in ROUNDING_MODES:
        raise QuantizationError(f"unknown rounding mode {rounding!r}; choose from {ROUNDING_MODES}")
    graph = G.build_graph(cfg, rounding, scheme)
    p = {k: np.asarray(v, np.float64) for k, v in params_conv.items()}
    s = tensor_scales(graph, cfg, ranges, p)
    by_name = {op.name: op for op in graph}
    T = {"input.scale": s["input"]}
    for op in graph:
        T |= _op_constants(op, by_name, s, p, cfg, scheme)
    for op in graph:
        if op.calibrate:
            T[op.scale] = s[op.name]
    T["attn.softmax.scale"] = 1.0 / K.PROB_ONE
    T = {k: (np.asarray(v, np.float64) if isinstance(v, float) else v) for k, v in T.items()}
    return QuantizedModel(cfg, head_mode, rounding, dict(calibration or {}), T, graph, scheme)


def quantize(params_conv: dict, cfg: DeiTConfig, calib_batches, *, head_mode: str, method: str = "percentile",
             percentile: float = DEFAULT_PERCENTILE, rounding: str = SINGLE_ROUND, progress=None,
             source: str = "", preprocess: dict | None = None, scheme: G.Scheme | None = None) -> QuantizedModel:
    """Calibrate on float image batches, then quantize. The one entry point most callers need.
    `preprocess` (a Preprocess.to_dict()) is the input pipeline the scales are calibrated for: recorded."""
    scheme = scheme or G.DEFAULT_SCHEME
    if rounding not in ROUNDING_MODES:
        raise QuantizationError(f"unknown rounding mode {rounding!r}; choose from {ROUNDING_MODES}")
    seen = []

    def counted(batches):
        for x in batches:
            seen.append(len(x))
            yield x

    ranges = activation_ranges(params_conv, cfg, counted(calib_batches), method, percentile, progress,
                               G.build_graph(cfg, rounding, scheme))
    calibration = {"method": method, "source": source, "images": sum(seen)}
    if preprocess:
        calibration["preprocess"] = preprocess
    if method == "percentile":
        calibration["percentile"] = percentile
    return quantize_model(params_conv, cfg, ranges, head_mode=head_mode, rounding=rounding, calibration=calibration,
                          scheme=scheme)

