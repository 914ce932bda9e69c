"""The quantizer (refvit.quantize): calibration (max, percentile), the real scale of every tensor, the integer
constants of each op (per-channel int8 weights, int32 biases, multipliers and shifts, the bias headroom), the
classifier as one conv, and what a QuantizedModel records.

Expected values are computed here from the float weights and the calibrated ranges: codes and biases by
Python's own rounding (half away from zero, written out), multipliers from exact fractions."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from refvit import graph as G
from refvit import int_model as im
from refvit import model_conv
from refvit.config import DeiTConfig
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.quantize import QuantizationError, activation_ranges, head_weights, quantize, quantize_model, tensor_scales


def round_away(v: float) -> int:
    """Round half away from zero, on one Python float."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def multiplier_of(ratio: float) -> tuple[int, int]:
    """(multiplier, shift) with multiplier in [2^30, 2^31): ratio * 2^shift rounded half up, exactly."""
    shift = 31 - math.frexp(ratio)[1]
    m = math.floor(Fraction(ratio) * 2 ** shift + Fraction(1, 2))
    return (1 << 30, shift - 1) if m == 1 << 31 else (m, shift)


@pytest.fixture(scope="module")
def ranges(tiny):
    """The calibrated ranges of the tiny model (its calibration: two batches, percentile)."""
    return activation_ranges(tiny.conv, tiny.config, [tiny.x[:3], tiny.x[3:]], "percentile")


# ---------------------------------------------------------------- calibration

def test_calibration_methods_differ_as_defined(tiny):
    cfg, cp = tiny.config, tiny.conv
    batches = [tiny.x[:2], tiny.x[2:4], tiny.x[4:]]
    r_max = activation_ranges(cp, cfg, batches, "max")
    r_pct = activation_ranges(cp, cfg, batches, "percentile", percentile=90.0)
    # independent recomputation of one tensor's statistics from the float trace
    stats = []
    for x in batches:
        tr = {}
        model_conv.forward(cp, x, cfg, tr)
        stats.append(np.abs(tr["blocks.1.mlp.fc1"]))
    assert r_max["blocks.1.mlp.fc1"] == pytest.approx(max(float(s.max()) for s in stats))
    assert r_pct["blocks.1.mlp.fc1"] == pytest.approx(np.mean([np.percentile(s, 90.0) for s in stats]))
    assert r_pct["blocks.1.mlp.fc1"] < r_max["blocks.1.mlp.fc1"]
    assert r_pct["input"] == r_max["input"] == pytest.approx(float(np.abs(tiny.x).max()))   # never clipped
    assert r_pct["head"] == r_max["head"]                                                  # nor the logits
    calibrated = {op.name for op in G.build_graph(cfg) if op.calibrate}
    assert set(r_max) == calibrated | {"input"} and "blocks.0.attn.scores" not in calibrated


def test_the_calibration_is_recorded(tiny, make_tiny):
    assert tiny.qm.calibration == {"method": "percentile", "source": "", "images": 6, "percentile": 99.99}
    assert make_tiny(method="max").qm.calibration == {"method": "max", "source": "", "images": 6}


def test_quantizer_errors(tiny):
    cfg, cp, x = tiny.config, tiny.conv, tiny.x[:1]
    with pytest.raises(QuantizationError, match="calibration method 'entropy'"):
        quantize(cp, cfg, [x], head_mode="mean", method="entropy")
    with pytest.raises(QuantizationError, match="no calibration data"):
        quantize(cp, cfg, [], head_mode="mean")
    with pytest.raises(G.GraphError, match="rounding mode 'HALF_EVEN'"):      # the one check (refvit.graph)
        quantize(cp, cfg, [x], head_mode="mean", rounding="HALF_EVEN")
    with pytest.raises(G.GraphError, match="rounding mode 'HALF_EVEN'"):
        tiny.qm.with_rounding("HALF_EVEN")


# ---------------------------------------------------------------- the scale of every tensor

def test_tensor_scales_follow_the_rules(tiny, ranges):
    """Calibrated: amax / 127 (the int16 logits: / 32767); scores at s_q * s_k; probabilities at 1/127; the
    fused qkv output has none; data movement keeps its input's scale."""
    cfg = tiny.config
    graph = G.build_graph(cfg)
    p = {k: np.asarray(v, np.float64) for k, v in tiny.conv.items()}
    s = tensor_scales(graph, cfg, ranges, p)
    assert s["input"] == ranges["input"] / 127
    assert s["blocks.1.mlp.fc1"] == ranges["blocks.1.mlp.fc1"] / 127
    assert s["head"] == ranges["head"] / 32767
    for i in range(cfg.depth):
        b = f"blocks.{i}.attn"
        assert s[f"{b}.q"] == ranges[f"{b}.q"] / 127 and s[f"{b}.k"] == ranges[f"{b}.k"] / 127
        assert s[f"{b}.scores"] == s[f"{b}.q"] * s[f"{b}.k"]
        assert s[f"{b}.softmax"] == 1 / 127 and s[f"{b}.qkv"] is None
    assert s["head_input"] == s["norm"]
    assert set(s) == {"input"} | {op.name for op in graph}


def test_the_patch_embedding_shares_one_scale_with_the_prefix_tokens(tiny, ranges):
    """The concatenation [cls; dist; patches] is one int8 tensor: its scale covers the tokens too."""
    cfg = tiny.config
    p = {k: np.asarray(v, np.float64) for k, v in tiny.conv.items()}
    graph = G.build_graph(cfg)
    s = tensor_scales(graph, cfg, ranges, p)
    prefix_max = max(float(np.abs(p["cls_token"]).max()), float(np.abs(p["dist_token"]).max()))
    assert s["patch_embed"] == max(ranges["patch_embed"], prefix_max) / 127 and s["tokens"] == s["patch_embed"]
    big = dict(p, dist_token=p["dist_token"] * 0 + np.where(np.arange(cfg.embed_dim) == 3, -40.0, 0.0).reshape(
        p["dist_token"].shape))
    assert 40.0 > ranges["patch_embed"]
    s2 = tensor_scales(graph, cfg, ranges, big)
    assert s2["patch_embed"] == 40.0 / 127 == s2["tokens"]
    qm = quantize_model(big, cfg, ranges, head_mode="mean")
    prefix = qm.tensors[next(op for op in qm.graph if op.op == "concat_tokens").constants["prefix"]]
    assert prefix.dtype == np.int8 and prefix.shape == (1, cfg.embed_dim, 1, 2)   # conv form: tokens on axis 3
    assert prefix[0, 3, 0, 1] == -127 and not np.delete(prefix[0, :, 0, 1], 3).any()    # the dist token
    cls = p["cls_token"].reshape(-1)
    assert prefix[0, :, 0, 0].tolist() == [round_away(v / (40.0 / 127)) for v in cls.tolist()]


# ---------------------------------------------------------------- the constants of the ops

def test_per_channel_weights_biases_and_rescale_by_hand(tiny):
    """fc1 of block 0: s_w[c] = max|W[c]| / 127, codes round(W / s_w) in [-127, 127], bias round(b / (s_in s_w)),
    and (multiplier, shift) of s_in * s_w[c] / s_out, each row by itself."""
    T, cp = tiny.qm.tensors, tiny.conv
    w = np.asarray(cp["blocks.0.mlp.fc1.weight"], np.float64)            # (Cout, Cin, 1, 1)
    b = np.asarray(cp["blocks.0.mlp.fc1.bias"], np.float64)
    s_in, s_out = float(T["blocks.0.norm2.scale"]), float(T["blocks.0.mlp.fc1.scale"])
    codes, bias = T["blocks.0.mlp.fc1.weight"], T["blocks.0.mlp.fc1.bias"]
    assert codes.dtype == np.int8 and codes.shape == w.shape and bias.dtype == np.int32
    for c in range(w.shape[0]):
        row = w[c].reshape(-1).tolist()
        s_w = max(abs(v) for v in row) / 127
        assert T["blocks.0.mlp.fc1.weight_scale"][c] == s_w
        assert codes[c].reshape(-1).tolist() == [round_away(v / s_w) for v in row], c
        assert int(bias[c]) == round_away(float(b[c]) / (s_in * s_w)), c
        m, sh = multiplier_of(s_in * s_w / s_out)
        assert (int(T["blocks.0.mlp.fc1.multiplier"][c]), int(T["blocks.0.mlp.fc1.shift"][c])) == (m, sh), c
    assert np.abs(codes.reshape(w.shape[0], -1)).max(axis=1).tolist() == [127] * w.shape[0]


def test_the_fused_qkv_conv_requantizes_each_part_to_its_own_scale(tiny):
    T, C = tiny.qm.tensors, tiny.config.embed_dim
    s_in = float(T["blocks.1.norm1.scale"])
    s_w = T["blocks.1.attn.qkv.weight_scale"]
    for part, name in enumerate("qkv"):
        s_out = float(T[f"blocks.1.attn.{name}.scale"])
        for c in (part * C, part * C + C - 1):
            m, sh = multiplier_of(s_in * float(s_w[c]) / s_out)
            assert (int(T["blocks.1.attn.qkv.multiplier"][c]), int(T["blocks.1.attn.qkv.shift"][c])) == (m, sh)


def test_an_all_zero_weight_row_gets_codes_zero(tiny, ranges):
    p = dict(tiny.conv)
    w = np.array(p["blocks.0.attn.proj.weight"])
    w[5] = 0
    qm = quantize_model(dict(p, **{"blocks.0.attn.proj.weight": w}), tiny.config, ranges, head_mode="mean")
    assert not qm.tensors["blocks.0.attn.proj.weight"][5].any()
    assert qm.tensors["blocks.0.attn.proj.weight_scale"][5] > 0


def test_a_bias_beyond_the_accumulator_headroom_is_an_error(tiny, ranges):
    """The bias must leave room for Cin * 128 * 127 of products in int32: bias codes up to
    2^31 - 1 - Cin * 128 * 127 quantize, one more is refused."""
    cfg, p = tiny.config, dict(tiny.conv)
    T = tiny.qm.tensors
    cin = cfg.embed_dim
    headroom = 2 ** 31 - 1 - cin * 128 * 127
    s_acc = float(T["blocks.0.norm2.scale"]) * float(T["blocks.0.mlp.fc1.weight_scale"][0])

    def with_bias0(code):
        b = np.array(p["blocks.0.mlp.fc1.bias"], np.float64)
        b[0] = code * s_acc
        assert round_away(b[0] / s_acc) == code
        return quantize_model(dict(p, **{"blocks.0.mlp.fc1.bias": b}), cfg, ranges, head_mode="mean")
    assert int(with_bias0(headroom).tensors["blocks.0.mlp.fc1.bias"][0]) == headroom
    assert int(with_bias0(-headroom).tensors["blocks.0.mlp.fc1.bias"][0]) == -headroom
    with pytest.raises(QuantizationError, match=r"blocks\.0\.mlp\.fc1: bias does not fit the int32 accumulator"):
        with_bias0(headroom + 1)


def test_required_constants_are_exactly_what_the_quantizer_makes(tiny):
    qm = tiny.qm
    integer = {k for k, v in qm.tensors.items() if np.asarray(v).dtype.kind in "iub"}
    needed = set(G.required_constants(qm.graph))
    assert integer == needed - set(G.BOUNDARY_CONSTANTS)
    assert set(G.BOUNDARY_CONSTANTS) <= set(qm.tensors)
    # every op's reporting scale names a float constant of the model, except the fused qkv output
    for op in qm.graph:
        assert op.scale is None and op.name.endswith("attn.qkv") or qm.tensors[op.scale].dtype == np.float64


# ---------------------------------------------------------------- the classifier as one conv

CFG2 = DeiTConfig(img_size=16, patch_size=8, embed_dim=4, depth=1, num_heads=1, num_classes=3, distilled=True)


def test_head_weights_mean_is_the_mean_of_the_two_heads_and_cls_ignores_dist():
    rng = np.random.default_rng(4)
    K, C = CFG2.num_classes, CFG2.embed_dim
    p = {"head.weight": rng.standard_normal((K, C, 1, 1)), "head.bias": rng.standard_normal(K),
         "head_dist.weight": rng.standard_normal((K, C, 1, 1)), "head_dist.bias": rng.standard_normal(K)}
    cls, dist = rng.standard_normal(C), rng.standard_normal(C)
    w, b = head_weights(p, CFG2)
    assert w.shape == (K, 2 * C, 1, 1)
    both = w[:, :, 0, 0] @ np.concatenate([cls, dist]) + b
    heads = (p["head.weight"][:, :, 0, 0] @ cls + p["head.bias"] + p["head_dist.weight"][:, :, 0, 0] @ dist
             + p["head_dist.bias"]) / 2
    np.testing.assert_allclose(both, heads, rtol=1e-12)
    only = {k: v for k, v in p.items() if not k.startswith("head_dist")}   # a 'cls' head on a distilled DeiT
    w, b = head_weights(only, CFG2)
    assert w.shape == (K, 2 * C, 1, 1) and not w[:, C:].any() and np.array_equal(b, p["head.bias"])
    assert np.array_equal(w[:, :C], p["head.weight"])
    plain = DeiTConfig(**{**CFG2.to_dict(), "distilled": False})
    w, b = head_weights(only, plain)
    assert np.array_equal(w, p["head.weight"]) and np.array_equal(b, p["head.bias"])


# ---------------------------------------------------------------- rounding modes

def test_rounding_modes_are_recorded_and_both_run(tiny, make_tiny):
    x = tiny.x
    single, double = tiny.qm, make_tiny(rounding=DOUBLE_ROUND).qm             # SINGLE_ROUND is the default
    assert single.metadata()["rounding"] == SINGLE_ROUND and double.metadata()["rounding"] == DOUBLE_ROUND
    assert all(np.array_equal(single.tensors[k], v) for k, v in double.tensors.items())   # constants alike
    tr_s, tr_d = im.Trace(), im.Trace()
    im.logits_int8_model(single, x, tr_s)
    im.logits_int8_model(double, x, tr_d)
    assert all(op.attrs.get("rounding", DOUBLE_ROUND) == DOUBLE_ROUND for op in tr_d.ops)
    # same constants, so any difference comes from the rounding rule alone; it must stay small
    diff = np.abs(tr_s.tensors["blocks.0.norm1"].astype(int) - tr_d.tensors["blocks.0.norm1"])
    assert diff.max() <= 1
    assert double.with_rounding(SINGLE_ROUND).graph == single.graph
