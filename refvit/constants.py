"""Offline constants of every op variant: real scales and float parameters -> the integer constants of a record.

The only place besides the model boundary where floats meet the integer model (docs/spec.md, Part 3
"Quantization scheme" for the default scheme, Part 4 for the others). Each op variant's row in
`refvit.registry` names one `*_constants(op, ctx)` function of this module (or its own); the quantizer calls
it once per record with a `Context`. All rounding of reals to integers is round-half-away-from-zero (never
numpy's half-to-even); every real ratio is formed in float64, left to right as written, and rounded once by
`quantize_multiplier` (docs/spec.md, "Offline constants").
- weights: symmetric per output channel, int8 in [-127, 127], s_w[c] = max|W[c]| / 127;
- biases: int32 at scale s_in * s_w[c];
- every real rescale s_a / s_b becomes an integer multiplier and shift (intmath.quantize_multiplier).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import int_kernels as K
from . import int_kernels_authors as KA
from . import int_kernels_variants as KV
from . import int_kernels_a16 as KA16
from .config import DeiTConfig
from .errors import RefvitError
from .intmath import (int_range, quantize_add_multipliers, quantize_multiplier, quantize_multiplier16,
                      quantize_multipliers, round_half_away_from_zero, saturate)


class QuantizationError(RefvitError):
    """Bad quantizer input: an unknown method or rounding mode, no calibration data, or constants that cannot
    be made from these scales (a bias beyond the accumulator headroom)."""


@dataclass(frozen=True)
class Context:
    """What the offline constants of one model are made from.

    cfg: the model's config; p: its conv-form float parameters (float64) by checkpoint name; s: the real scale
    of every tensor of the graph by name (None for the fused qkv output, which has three); by_name: the graph's
    records by name; options: the scheme's quantizer options (`pot_fraction`, `gelu_delta`, ...)."""
    cfg: DeiTConfig
    p: dict
    s: dict
    by_name: dict
    options: dict


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------

def scale_of(amax: float, dtype=np.int8) -> float:
    """The symmetric scale that maps amax to the dtype's largest code (an all-zero tensor: 1e-8 / qmax)."""
    return max(float(amax), 1e-8) / int_range(dtype)[1]


def quantize_tensor(x: np.ndarray, scale, dtype) -> np.ndarray:
    return saturate(round_half_away_from_zero(np.asarray(x, np.float64) / scale), dtype)


def multipliers(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m, s = quantize_multipliers(np.atleast_1d(scales))           # element for element quantize_multiplier
    return m.astype(np.int32), s.astype(np.int8)


def rescale(name: str, scale: float) -> dict:
    """One real rescale as `<name>.multiplier` (int32) and `<name>.shift` (int8) scalars."""
    m, s = quantize_multiplier(scale)
    return {f"{name}.multiplier": np.array(m, np.int32), f"{name}.shift": np.array(s, np.int8)}


def scalars(name: str, values: dict) -> dict:
    """Scalar integer constants of a kernel variant: multipliers int32, shifts int8, the rest int64."""
    def dtype(k):
        return np.int32 if k.startswith("multiplier") else np.int8 if k.startswith("shift") else np.int64
    return {f"{name}.{k}": np.array(v, dtype(k)) for k, v in values.items()}


def per_channel_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 weights in [-127, 127] and their scales (Cout,)."""
    w = np.asarray(w, np.float64)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    s_w = np.where(amax > 0, amax / 127.0, 1.0)                                   # all-zero row: any scale
    return quantize_tensor(w, s_w.reshape(-1, *[1] * (w.ndim - 1)), np.int8), s_w


def prefix_tokens(p: dict, cfg: DeiTConfig) -> np.ndarray:
    """The cls [and dist] tokens, (1, C, 1, P)."""
    return np.concatenate([p["cls_token"]] + ([p["dist_token"]] if cfg.distilled else []), axis=3)


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


LAYER_SCALES = {"attn.proj": "ls1.gamma", "mlp.fc2": "ls2.gamma"}   # a block's conv -> the layer scale after it


def float_conv(op, p: dict, cfg: DeiTConfig) -> tuple:
    """The float (weight, bias) a conv record quantizes: its checkpoint parameters by the record's name. A
    DeiT-III layer scale is folded into the conv before it (attn.proj: ls1, mlp.fc2: ls2): w' = gamma w,
    b' = gamma b per output channel, exactly the float branch (docs/spec.md, "Layer scale")."""
    if op.name == "head":
        return head_weights(p, cfg)
    key = "patch_embed.proj" if op.name == "patch_embed" else op.name
    w, b = p[f"{key}.weight"], p.get(f"{key}.bias")                          # (Cout, Cin, k, k), (Cout,)
    block, _, conv = op.name.partition(".")[2].partition(".")                 # 'blocks.3.attn.proj' -> '3', 'attn.proj'
    gamma = p.get(f"blocks.{block}.{LAYER_SCALES[conv]}") if conv in LAYER_SCALES else None
    if gamma is not None:                                                     # gamma (Cout,)
        w, b = gamma[:, None, None, None] * w, (None if b is None else gamma * b)  # (Cout, Cin, 1, 1), (Cout,)
    return w, b


# ---------------------------------------------------------------------------------------------
# the constants of each op variant: (op record, Context) -> {constant name: array}
# ---------------------------------------------------------------------------------------------

def _conv_out_scales(op, ctx: Context, cout: int):
    s_out = ctx.s[op.name]
    if s_out is None:   # the fused qkv conv: its output channels carry the scales of the three splits
        parts = sorted((o for o in ctx.by_name.values() if o.inputs.get("qkv") == op.name),
                       key=lambda o: o.attrs["part"])
        s_out = np.repeat([ctx.s[o.name] for o in parts], cout // len(parts))
    return s_out


def conv_constants(op, ctx: Context, weights=None) -> dict:
    """int8 weight codes, int32 bias at s_in*s_w, and the per-channel rescale s_in*s_w/s_out of one conv.
    weights: w -> (codes, per-channel scales[, extra constants by argument]); None: the scheme's `weights`
    and `scales` rule (per_channel_weight by default; WEIGHT_RULES)."""
    weights = weights or weight_rule(ctx.options)
    w, b = float_conv(op, ctx.p, ctx.cfg)
    wq, s_w, *extra = weights(w)
    s_acc = ctx.s[op.inputs["x"]] * s_w                                            # (Cout,)
    bias = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64)
    bq = round_half_away_from_zero(bias / s_acc)
    headroom = int_range(np.int32)[1] - int(np.prod(w.shape[1:])) * 128 * 127
    if np.abs(bq).max(initial=0) > headroom:
        raise QuantizationError(f"{op.name}: bias does not fit the int32 accumulator headroom at scale s_in*s_w")
    s_out = _conv_out_scales(op, ctx, w.shape[0])
    m, s = multipliers(s_acc / np.broadcast_to(s_out, s_acc.shape))
    name = op.name
    return {f"{name}.weight": wq, f"{name}.bias": bq.astype(np.int32), f"{name}.multiplier": m,
            f"{name}.shift": s, f"{name}.weight_scale": s_w} | {f"{name}.{k}": v for e in extra for k, v in e.items()}


def conv_w4_constants(op, ctx: Context) -> dict:
    return conv_constants(op, ctx, KV.per_channel_weight_w4)


def conv_mixed_pot_constants(op, ctx: Context) -> dict:
    def weights(w):
        codes, scales, pot_rows = KV.per_channel_weight_mixed_pot(w, ctx.options["pot_fraction"])
        return codes, scales, {"pot_rows": pot_rows}
    return conv_constants(op, ctx, weights)


def layernorm_constants(op, ctx: Context) -> dict:
    """LayerNorm: eps_int, gamma as int8 per-channel depthwise weights, beta as int32 bias at s_t*s_g.

    The kernel's normalized value is z = sqrt(C) * t * 2^-16, so t has scale s_t = sqrt(C) * 2^-16.
    s_g is raised where a small |gamma| with a large |beta| would overflow the bias headroom."""
    name, C, s_in = op.name, ctx.cfg.embed_dim, ctx.s[op.inputs["x"]]
    gamma = np.asarray(ctx.p[f"{name}.weight"], np.float64).ravel()
    beta = np.asarray(ctx.p[f"{name}.bias"], np.float64).ravel()
    s_t = math.sqrt(C) * 2.0 ** -K.LN_T_BITS
    headroom = (2 ** 31 - 1) - 127 * 2 ** K.LN_T_BITS
    s_g = np.maximum(np.abs(gamma) / 127.0, np.abs(beta) / (s_t * headroom) * 1.01)
    s_g = np.where(s_g > 0, s_g, 1.0)
    if ctx.options.get("scales", "float") == "pot":                               # the covering power of two
        s_g = pot_scale(s_g * 127, 127)
    m, s = multipliers(s_t * s_g / ctx.s[name])
    return {f"{name}.weight": quantize_tensor(gamma, s_g, np.int8),
            f"{name}.bias": round_half_away_from_zero(beta / (s_t * s_g)).astype(np.int32),
            f"{name}.multiplier": m, f"{name}.shift": s, f"{name}.weight_scale": s_g,
            f"{name}.eps_int": np.array(K.layernorm_eps_int(ctx.cfg.ln_eps, C, s_in), np.int64)}


def layernorm_int32_constants(op, ctx: Context) -> dict:
    """Part 2's LayerNorm constants, with eps as a pair (eps_int, eps_shift) for 32-bit intermediates."""
    eps_int, eps_shift = KV.layernorm_int32_eps(ctx.cfg.ln_eps, ctx.cfg.embed_dim, ctx.s[op.inputs["x"]])
    return layernorm_constants(op, ctx) | {f"{op.name}.eps_int": np.array(eps_int, np.int64),
                                           f"{op.name}.eps_shift": np.array(eps_shift, np.int64)}


def add_constants(op, ctx: Context) -> dict:
    """a + b: the two multipliers and the shift; a constant operand (the position embedding) is quantized
    per tensor at its own max."""
    T, scales = {}, []
    for arg in ("a", "b"):
        if arg in op.inputs:
            scales.append(ctx.s[op.inputs[arg]])
        else:
            c, dtype = op.constants[arg], activation_dtype(ctx.options)
            scales.append(activation_scale(np.abs(ctx.p[c]).max(), dtype, ctx.options))
            T |= {c: quantize_tensor(ctx.p[c], scales[-1], dtype), f"{c}.scale": scales[-1]}
    ma, mb, s = quantize_add_multipliers(*scales, ctx.s[op.name])
    return T | {f"{op.name}.multiplier_a": np.array(ma, np.int32), f"{op.name}.multiplier_b": np.array(mb, np.int32),
                f"{op.name}.shift": np.array(s, np.int8)}


def concat_constants(op, ctx: Context) -> dict:
    return {op.constants["prefix"]: quantize_tensor(prefix_tokens(ctx.p, ctx.cfg), ctx.s[op.name],
                                                    activation_dtype(ctx.options))}


def _logit_scale(op, ctx: Context) -> float:
    """The real logit of one score unit: s_q * s_k / sqrt(D)."""
    return ctx.s[op.inputs["scores"]] * ctx.cfg.head_dim ** -0.5


def softmax_table_constants(op, ctx: Context) -> dict:
    T = rescale(op.name, _logit_scale(op, ctx) * 2 ** K.EXP_INDEX_BITS)
    T[op.constants["exp_table"]] = K.make_exp_table()
    return T | {f"{op.inputs['scores']}.scale": ctx.s[op.inputs["scores"]]}


def softmax_exp_constants(op, ctx: Context) -> dict:
    """poly and shift: score differences in units of 2^-14."""
    T = scalars(op.name, dict(zip(("multiplier", "shift"), KV.softmax_exp_multiplier(_logit_scale(op, ctx)))))
    return T | {f"{op.inputs['scores']}.scale": ctx.s[op.inputs["scores"]]}


def context_constants(op, ctx: Context) -> dict:
    return rescale(op.name, ctx.s[op.inputs["v"]] / K.PROB_ONE / ctx.s[op.name])


def gelu_table_constants(op, ctx: Context) -> dict:
    return {op.constants["table"]: K.make_gelu_table(ctx.s[op.inputs["x"]], ctx.s[op.name])}


def gelu_poly_constants(op, ctx: Context) -> dict:
    return scalars(op.name, KV.gelu_poly_constants(ctx.s[op.inputs["x"]], ctx.s[op.name], ctx.options["gelu_delta"]))


def gelu_shift_constants(op, ctx: Context) -> dict:
    return scalars(op.name, KV.gelu_shift_constants(ctx.s[op.inputs["x"]], ctx.s[op.name]))


# ---------------------------------------------------------------------------------------------
# scale rules of the ops whose output scale is not calibrated: (op record, scales) -> real scale
# ---------------------------------------------------------------------------------------------

def scale_of_first_input(op, s: dict) -> float:
    """Data movement and concatenation keep their (first) input's scale."""
    return s[next(iter(op.inputs.values()))]


def scale_of_x(op, s: dict) -> float:
    return s[op.inputs["x"]]


def scale_of_product(op, s: dict) -> float:
    """q . k at s_q * s_k."""
    return s[op.inputs["q"]] * s[op.inputs["k"]]


def scale_of_probabilities(op, s: dict) -> float:
    return 1.0 / K.PROB_ONE


# ---------------------------------------------------------------------------------------------
# the authors' code variants (issue 19): refvit/int_kernels_authors.py
# ---------------------------------------------------------------------------------------------

def gelu_poly_ibert_code_constants(op, ctx: Context) -> dict:
    """i-GELU as I-BERT's code: the erf argument unit s_in / 1.4142."""
    return scalars(op.name, KA.gelu_poly_ibert_code_constants(ctx.s[op.inputs["x"]], ctx.s[op.name]))


def layernorm_ibert_code_constants(op, ctx: Context) -> dict:
    """Part 2's gamma / beta tail constants (t has the same scale); no eps (I-BERT's integer path has none)."""
    return {k: v for k, v in layernorm_constants(op, ctx).items() if k != f"{op.name}.eps_int"}


def context_p16_constants(op, ctx: Context) -> dict:
    """The context of int16 probabilities at 2^-15: one rescale s_v 2^-15 / s_out."""
    return rescale(op.name, ctx.s[op.inputs["v"]] / KA.PROB16_ONE / ctx.s[op.name])


def scale_of_probabilities16(op, s: dict) -> float:
    return 1.0 / KA.PROB16_ONE


# ---------------------------------------------------------------------------------------------
# scheme parameters (issue 19; docs/spec.md Part 6): weight granularity, power-of-two scales
# ---------------------------------------------------------------------------------------------

def per_tensor_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-tensor int8 weights in [-127, 127]: one scale max|W| / 127 for every output channel,
    returned as (Cout,) equal scales (the rescale stays one (multiplier, shift) per channel)."""
    w = np.asarray(w, np.float64)
    amax = float(np.abs(w).max(initial=0.0))
    s_w = np.full(w.shape[0], amax / 127.0 if amax > 0 else 1.0)                  # (Cout,) all equal
    return quantize_tensor(w, s_w.reshape(-1, *[1] * (w.ndim - 1)), np.int8), s_w


def weight_rule(options: dict):
    """The offline int8 weight rule a scheme's options ask for: w -> (codes, scales (Cout,))."""
    pot = options.get("scales", "float") == "pot"
    per_tensor = options.get("weights", "per-channel") == "per-tensor"
    if not pot:
        return per_tensor_weight if per_tensor else per_channel_weight

    def pot_weight(w):
        w = np.asarray(w, np.float64)
        flat = np.abs(w.reshape(w.shape[0], -1))                                   # (Cout, K)
        amax = np.full(w.shape[0], flat.max(initial=0.0)) if per_tensor else flat.max(axis=1, initial=0.0)
        s_w = pot_scale(amax, 127)                                                 # (Cout,) powers of two
        return quantize_tensor(w, s_w.reshape(-1, *[1] * (w.ndim - 1)), np.int8), s_w
    return pot_weight


def pot_scale(amax, qmax: int) -> np.ndarray:
    """The smallest power of two 2^k with qmax * 2^k >= amax (amax 0: 2^-30): every value up to amax is
    representable without clipping (docs/spec.md, "Power-of-two scales: the calibration rule")."""
    a = np.maximum(np.asarray(amax, np.float64), 2.0 ** -30 * qmax)
    m, e = np.frexp(a / qmax)                                                      # a/qmax = m 2^e, m in [0.5, 1)
    k = np.where(m == 0.5, e - 1, e)                                               # exact powers of two stay
    return np.ldexp(1.0, k.astype(np.int64))


def pot_exponent(scale) -> np.ndarray:
    """k of an exact power of two 2^k (ValueError otherwise): frexp gives the mantissa 1/2 exactly."""
    m, e = np.frexp(np.asarray(scale, np.float64))
    if not np.all(m == 0.5):
        raise QuantizationError(f"scale {np.asarray(scale).ravel()[~(m == 0.5).ravel()][:1]} is not a power of two")
    return (e - 1).astype(np.int64)


def conv_pot_constants(op, ctx: Context) -> dict:
    """conv2d_pot: part 3's codes and bias with power-of-two s_w (weight_rule), and shift[o] = -log2(s_in s_w[o] /
    s_out[o]) in place of (multiplier, shift): the rescale is exactly 2^-shift."""
    T = conv_constants(op, ctx)
    name = op.name
    s_w = T[f"{name}.weight_scale"]
    s_out = np.broadcast_to(_conv_out_scales(op, ctx, s_w.shape[0]), s_w.shape)
    shift = -(pot_exponent(ctx.s[op.inputs["x"]]) + pot_exponent(s_w) - pot_exponent(s_out))   # (Cout,)
    if np.abs(shift).max() > KV.POT_MAX_SHIFT:
        raise QuantizationError(f"{name}: power-of-two rescale 2^-shift needs shift in [-{KV.POT_MAX_SHIFT}, {KV.POT_MAX_SHIFT}], "
                                f"got [{int(shift.min())}, {int(shift.max())}]")
    del T[f"{name}.multiplier"]
    return T | {f"{name}.shift": shift.astype(np.int8)}


def activation_scale(amax: float, dtype, options: dict) -> float:
    """The real scale of a calibrated tensor: amax / qmax, or with scales 'pot' the covering power of two."""
    if options.get("scales", "float") == "pot":
        return float(pot_scale(max(float(amax), 1e-8), int_range(dtype)[1]))
    return scale_of(amax, dtype)


def softmax_table_n_constants(op, ctx: Context, rescale_rule=rescale) -> dict:
    """softmax_table_n: the rescale to units of 2^-b of a real score difference, the exp table of L entries
    (softmax_a16: the same with the 16-bit rescale, rescale16)."""
    b, size = ctx.options.get("exp_index_bits", 4), ctx.options.get("exp_table_size", 256)
    T = rescale_rule(op.name, _logit_scale(op, ctx) * 2 ** b)
    T[op.constants["exp_table"]] = KV.make_exp_table_n(size, b)
    return T | {f"{op.inputs['scores']}.scale": ctx.s[op.inputs["scores"]]}


def gelu_table_n_constants(op, ctx: Context) -> dict:
    return {op.constants["table"]: KV.make_gelu_table_n(ctx.s[op.inputs["x"]], ctx.s[op.name],
                                                        ctx.options.get("gelu_table_size", 256))}


# ---------------------------------------------------------------------------------------------
# 16-bit activations (act_bits 16, the scheme a16w8; docs/spec.md Part 7): int48 accumulators, apply_scale_16
# ---------------------------------------------------------------------------------------------

def activation_dtype(options: dict):
    """The dtype of every activation (and of the constants added to or concatenated with one): int8, or int16 with
    act_bits 16."""
    return np.int16 if options.get("act_bits", 8) == 16 else np.int8


def rescale16(name: str, scale: float) -> dict:
    """One real rescale as `<name>.multiplier` (int16, the 16-bit multiplier) and `<name>.shift` (int8) scalars."""
    m, s = quantize_multiplier16(scale)
    return {f"{name}.multiplier": np.array(m, np.int16), f"{name}.shift": np.array(s, np.int8)}


def conv_a16_constants(op, ctx: Context) -> dict:
    """conv2d_a16: part 3's int8 codes (the scheme's weight rule), an int64 bias at s_in*s_w within the int48
    headroom, and per channel the 16-bit rescale quantize_multiplier16(s_in*s_w/s_out)."""
    w, b = float_conv(op, ctx.p, ctx.cfg)
    wq, s_w = weight_rule(ctx.options)(w)
    s_acc = ctx.s[op.inputs["x"]] * s_w                                            # (Cout,)
    bias = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64)
    bq = round_half_away_from_zero(bias / s_acc)
    headroom = KA16.ACC48_MAX - int(np.prod(w.shape[1:])) * (1 << 15) * 127
    if np.abs(bq).max(initial=0) > headroom:
        raise QuantizationError(f"{op.name}: bias does not fit the int48 accumulator headroom at scale s_in*s_w")
    s_out = np.broadcast_to(_conv_out_scales(op, ctx, w.shape[0]), s_acc.shape)
    ms = [quantize_multiplier16(float(r)) for r in s_acc / s_out]
    name = op.name
    return {f"{name}.weight": wq, f"{name}.bias": bq.astype(np.int64),
            f"{name}.multiplier": np.array([m for m, _ in ms], np.int16),
            f"{name}.shift": np.array([s for _, s in ms], np.int8), f"{name}.weight_scale": s_w}


def softmax_a16_constants(op, ctx: Context) -> dict:
    """softmax_a16: the 16-bit rescale to units of 2^-b of a real score difference, Part 6's exp table (L, b)."""
    return softmax_table_n_constants(op, ctx, rescale16)


def context_a16_constants(op, ctx: Context) -> dict:
    """attention_context_a16: probabilities at 1/32767: one 16-bit rescale s_v / 32767 / s_out."""
    return rescale16(op.name, ctx.s[op.inputs["v"]] / KA16.PROB16_ONE / ctx.s[op.name])


def gelu_a16_constants(op, ctx: Context) -> dict:
    return {op.constants["table"]: KA16.make_gelu_table16(ctx.s[op.inputs["x"]], ctx.s[op.name])}


def scale_of_probabilities_a16(op, s: dict) -> float:
    return 1.0 / KA16.PROB16_ONE
