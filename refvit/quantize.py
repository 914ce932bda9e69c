"""Offline post-training quantization of the conv-form DeiT: the only place floats meet the integer model.

Scheme (docs/spec.md, "Quantization scheme"):
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
from dataclasses import dataclass, field

import numpy as np

from . import int_kernels as K
from . import model_conv
from .config import DeiTConfig
from .intmath import (ROUNDING_MODES, SINGLE_ROUND, int_range, quantize_add_multipliers, quantize_multiplier,
                      round_half_away_from_zero, saturate)

SCHEME = "int8 symmetric: weights per output channel [-127,127], activations per tensor; int32 bias; int16 logits"
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

    def metadata(self) -> dict:
        return {"format": "refvit-int8", "config": self.config.to_dict(), "head_mode": self.head_mode,
                "rounding": self.rounding, "scheme": SCHEME, "calibration": self.calibration}


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------

def _amax(x: np.ndarray, method: str, percentile: float) -> float:
    a = np.abs(x).ravel()
    return float(a.max()) if method == "max" else float(np.percentile(a, percentile))


def activation_ranges(params_conv: dict, cfg: DeiTConfig, batches, method: str = "percentile",
                      percentile: float = DEFAULT_PERCENTILE, progress=None) -> dict:
    """amax of every activation tensor over calibration batches of float images (B, 3, H, W).

    `max`: the largest |x| over all batches; `percentile`: the mean over batches of each batch's p-th
    percentile of |x| (the input and the logits always use max: they are not clipped).
    """
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"unknown calibration method {method!r}; choose from {CALIBRATION_METHODS}")
    C = cfg.embed_dim
    stats: dict = {}
    n = 0
    for x in batches:
        trace: dict = {}
        model_conv.forward(params_conv, np.asarray(x, np.float32), cfg, trace)
        for i in range(cfg.depth):  # q, k, v are separate tensors with separate scales
            qkv = trace.pop(f"blocks.{i}.attn.qkv")
            for j, part in enumerate("qkv"):
                trace[f"blocks.{i}.attn.{part}"] = qkv[:, j * C:(j + 1) * C]
        for name, t in trace.items():
            m = "max" if name in ("input", "logits") else method
            a = _amax(t, m, percentile)
            stats[name] = max(stats.get(name, 0.0), a) if m == "max" else stats.get(name, 0.0) + a
        n += 1
        if progress:
            progress(n)
    if n == 0:
        raise QuantizationError("no calibration data: give at least one image")
    return {k: (v if k in ("input", "logits") or method == "max" else v / n) for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------------------------

def _scale(amax: float, dtype=np.int8) -> float:
    return max(float(amax), 1e-8) / int_range(dtype)[1]


def _quantize_tensor(x: np.ndarray, scale, dtype) -> np.ndarray:
    return saturate(round_half_away_from_zero(np.asarray(x, np.float64) / scale), dtype)


def _multipliers(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = [quantize_multiplier(float(s)) for s in np.atleast_1d(scales)]
    return (np.array([m for m, _ in pairs], np.int32), np.array([s for _, s in pairs], np.int8))


def _per_channel_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 weights in [-127, 127] and their scales (Cout,)."""
    w = np.asarray(w, np.float64)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    s_w = np.where(amax > 0, amax / 127.0, 1.0)                                   # all-zero row: any scale
    return _quantize_tensor(w, s_w.reshape(-1, *[1] * (w.ndim - 1)), np.int8), s_w


def _conv_constants(name, w, b, s_in: float, s_out, out_dtype=np.int8) -> dict:
    """int8 weight, int32 bias at s_in*s_w, and the per-channel rescale s_in*s_w/s_out of one conv."""
    wq, s_w = _per_channel_weight(w)
    s_acc = s_in * s_w                                                             # (Cout,)
    bias = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64)
    bq = round_half_away_from_zero(bias / s_acc)
    lo, hi = int_range(np.int32)
    headroom = hi - int(np.prod(w.shape[1:])) * 128 * 127
    if np.abs(bq).max(initial=0) > headroom:
        raise QuantizationError(f"{name}: bias does not fit the int32 accumulator headroom at scale s_in*s_w")
    m, s = _multipliers(s_acc / np.broadcast_to(s_out, s_acc.shape))
    return {f"{name}.weight": wq, f"{name}.bias": bq.astype(np.int32), f"{name}.multiplier": m,
            f"{name}.shift": s, f"{name}.weight_scale": s_w}


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


def quantize_model(params_conv: dict, cfg: DeiTConfig, ranges: dict, *, head_mode: str,
                   rounding: str = SINGLE_ROUND, calibration: dict | None = None) -> QuantizedModel:
    """Turn conv-form float parameters and calibrated activation ranges into a QuantizedModel."""
    if rounding not in ROUNDING_MODES:
        raise QuantizationError(f"unknown rounding mode {rounding!r}; choose from {ROUNDING_MODES}")
    p = {k: np.asarray(v, np.float64) for k, v in params_conv.items()}
    C, P = cfg.embed_dim, cfg.num_prefix_tokens
    s = {k: _scale(v) for k, v in ranges.items()}                                  # activation scales
    prefix = np.concatenate([p["cls_token"]] + ([p["dist_token"]] if cfg.distilled else []), axis=3)
    s["patch_embed"] = _scale(max(ranges["patch_embed"], np.abs(prefix).max()))   # tokens share one scale
    s["logits"] = _scale(ranges["logits"], LOGIT_DTYPE)
    s_pos = _scale(np.abs(p["pos_embed"]).max())
    T = {"input.scale": s["input"], "exp_table": K.make_exp_table(),
         "prefix_tokens": _quantize_tensor(prefix, s["patch_embed"], np.int8),
         "pos_embed": _quantize_tensor(p["pos_embed"], s_pos, np.int8), "pos_embed.scale": s_pos}
    T |= _conv_constants("patch_embed", p["patch_embed.proj.weight"], p["patch_embed.proj.bias"],
                         s["input"], s["patch_embed"])
    T |= _add_constants("embed", s["patch_embed"], s_pos, s["embed"])
    x_scale = s["embed"]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        sq, sk, sv = (s[b + f"attn.{t}"] for t in "qkv")
        T |= _layernorm_constants(b + "norm1", p[b + "norm1.weight"], p[b + "norm1.bias"], cfg.ln_eps, C,
                                  x_scale, s[b + "norm1"])
        T |= _conv_constants(b + "attn.qkv", p[b + "attn.qkv.weight"], p.get(b + "attn.qkv.bias"),
                             s[b + "norm1"], np.repeat([sq, sk, sv], C))
        T |= _rescale_constants(b + "attn.softmax", sq * sk * cfg.head_dim ** -0.5 * 2 ** K.EXP_INDEX_BITS)
        T |= _rescale_constants(b + "attn.context", sv / K.PROB_ONE / s[b + "attn.context"])
        T |= _conv_constants(b + "attn.proj", p[b + "attn.proj.weight"], p[b + "attn.proj.bias"],
                             s[b + "attn.context"], s[b + "attn.proj"])
        T |= _add_constants(b + "residual1", x_scale, s[b + "attn.proj"], s[b + "residual1"])
        T |= _layernorm_constants(b + "norm2", p[b + "norm2.weight"], p[b + "norm2.bias"], cfg.ln_eps, C,
                                  s[b + "residual1"], s[b + "norm2"])
        T |= _conv_constants(b + "mlp.fc1", p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"],
                             s[b + "norm2"], s[b + "mlp.fc1"])
        T[b + "mlp.gelu.table"] = K.make_gelu_table(s[b + "mlp.fc1"], s[b + "mlp.gelu"])
        T |= _conv_constants(b + "mlp.fc2", p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"],
                             s[b + "mlp.gelu"], s[b + "mlp.fc2"])
        T |= _add_constants(b + "residual2", s[b + "residual1"], s[b + "mlp.fc2"], s[b + "residual2"])
        x_scale = s[b + "residual2"]
    T |= _layernorm_constants("norm", p["norm.weight"], p["norm.bias"], cfg.ln_eps, C, x_scale, s["norm"])
    hw, hb = head_weights(p, cfg)
    T |= _conv_constants("head", hw, hb, s["norm"], s["logits"], LOGIT_DTYPE)
    for name, v in s.items():
        T[f"{name}.scale"] = v
    T["attn.softmax.scale"] = 1.0 / K.PROB_ONE
    T = {k: (np.asarray(v, np.float64) if isinstance(v, float) else v) for k, v in T.items()}
    return QuantizedModel(cfg, head_mode, rounding, dict(calibration or {}), T)


def quantize(params_conv: dict, cfg: DeiTConfig, calib_batches, *, head_mode: str, method: str = "percentile",
             percentile: float = DEFAULT_PERCENTILE, rounding: str = SINGLE_ROUND, progress=None,
             source: str = "", preprocess: str | None = None) -> QuantizedModel:
    """Calibrate on float image batches, then quantize. The one entry point most callers need."""
    ranges = activation_ranges(params_conv, cfg, calib_batches, method, percentile, progress)
    calibration = {"method": method, "source": source}
    if preprocess:  # the input pipeline the scales were calibrated for ('timm' | 'fmnist')
        calibration["preprocess"] = preprocess
    if method == "percentile":
        calibration["percentile"] = percentile
    return quantize_model(params_conv, cfg, ranges, head_mode=head_mode, rounding=rounding, calibration=calibration)

