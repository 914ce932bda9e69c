"""The integer DeiT as a whole: integer-only trace, exact GEMMs, batch invariance, file round trip,
agreement with the float model, and the quantizer's choices."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refvit import int_kernels as K
from refvit import int_model as im
from refvit import intmath, model_conv
from refvit.config import DeiTConfig
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.quantize import QuantizationError, activation_ranges, quantize
from weights_tools import CheckpointError
from weights_tools.convert import token_to_conv
from refvit.qfile import load_quantized, save_quantized
from refvit.models import random_params

TINY = DeiTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, distilled=True)


def random_model(cfg: DeiTConfig, seed=0, head_mode="mean"):
    """Random DeiT weights at a trained network's scales (refvit.models.random_params), in the conv form."""
    return token_to_conv(random_params(cfg, head_mode, seed))


def images(cfg: DeiTConfig, n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    cp = random_model(TINY)
    x = images(TINY, 6)
    return cp, x, quantize(cp, TINY, [x[:3], x[3:]], head_mode="mean")


def test_trace_is_integer_only_and_in_execution_order(tiny):
    _, x, qm = tiny
    tr = im.Trace()
    logits, scale = im.logits_int8_model(qm, x, tr)
    assert logits.dtype == np.int16 and logits.shape == (6, TINY.num_classes) and scale > 0
    seen = {"input"}
    for op in tr.ops:
        for name in op.inputs.values():
            assert name in seen, f"{op.name} reads {name} before it exists"
        seen.add(op.name)
    for name, t in tr.tensors.items():
        assert t.dtype.kind == "i", f"{name} is {t.dtype}: the integer model must stay integer"
    for op in tr.ops:
        for c in op.constants.values():
            assert np.asarray(qm.tensors[c]).dtype.kind in "iu", f"{op.name} uses float constant {c}"
    assert np.array_equal(tr.tensors["head"][:, :, 0, 0], logits)
    assert [op.name for op in tr.ops][-3:] == ["norm", "head_input", "head"]


def test_float_blas_gemms_equal_int64_reference_through_the_whole_model(tiny, monkeypatch):
    """int_matmul computes GEMMs with float32 BLAS; swapping in a plain int64 matmul changes no bit."""
    _, x, qm = tiny
    fast = im.logits_int8_model(qm, x)[0]
    calls = []

    def int64_matmul(a, b):
        calls.append(a.shape)
        return np.matmul(np.asarray(a, np.int64), np.asarray(b, np.int64))

    monkeypatch.setattr(K, "int_matmul_exact", int64_matmul)
    slow = im.logits_int8_model(qm, x)[0]
    assert calls, "the monkeypatch did not reach the kernels"
    assert np.array_equal(fast, slow)


def test_batch_invariance(tiny):
    _, x, qm = tiny
    tr_all, tr_one = im.Trace(), im.Trace()
    im.logits_int8_model(qm, x, tr_all)
    im.logits_int8_model(qm, x[4:5], tr_one)
    for name, t in tr_one.tensors.items():
        assert np.array_equal(t, tr_all.tensors[name][4:5]), name


def test_int8_logits_track_float_logits(tiny):
    cp, x, qm = tiny
    li, s = im.logits_int8_model(qm, x)
    lf = model_conv.forward(cp, x, TINY)
    cos = float(np.sum(li * s * lf) / np.linalg.norm(li * s) / np.linalg.norm(lf))
    assert cos > 0.98, cos


def test_rounding_modes_are_recorded_and_both_run(tiny):
    cp, x, _ = tiny
    single = quantize(cp, TINY, [x], head_mode="mean", rounding=SINGLE_ROUND)
    double = quantize(cp, TINY, [x], head_mode="mean", rounding=DOUBLE_ROUND)
    assert single.metadata()["rounding"] == SINGLE_ROUND and double.metadata()["rounding"] == DOUBLE_ROUND
    tr_s, tr_d = im.Trace(), im.Trace()
    im.logits_int8_model(single, x, tr_s)
    im.logits_int8_model(double, x, tr_d)
    assert all(op.attrs.get("rounding", DOUBLE_ROUND) == DOUBLE_ROUND for op in tr_d.ops)
    # same constants, so any difference comes from the rounding rule alone; it must stay small
    diff = np.abs(tr_s.tensors["blocks.0.norm1"].astype(int) - tr_d.tensors["blocks.0.norm1"])
    assert diff.max() <= 1


def test_quantized_file_round_trip_is_bit_identical(tiny, tmp_path):
    _, x, qm = tiny
    path = save_quantized(qm, tmp_path / "q.safetensors")
    qm2 = load_quantized(path)
    assert qm2.config == qm.config and qm2.rounding == qm.rounding and qm2.head_mode == qm.head_mode
    assert set(qm2.tensors) == set(qm.tensors)
    for k, v in qm.tensors.items():
        assert qm2.tensors[k].dtype == np.asarray(v).dtype and np.array_equal(qm2.tensors[k], v), k
    assert np.array_equal(im.logits_int8_model(qm2, x)[0], im.logits_int8_model(qm, x)[0])


def test_quantized_file_errors_name_the_problem(tiny, tmp_path):
    _, _, qm = tiny
    from weights_tools import write_safetensors
    plain = tmp_path / "float.safetensors"
    write_safetensors(plain, {"a": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="not a refvit quantized model"):
        load_quantized(plain)
    path = save_quantized(qm, tmp_path / "q.safetensors")
    from weights_tools import read_safetensors
    t, meta = read_safetensors(path)
    del t["blocks.1.mlp.gelu.table"]
    write_safetensors(tmp_path / "cut.safetensors", t, meta)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.gelu\.table"):
        load_quantized(tmp_path / "cut.safetensors")


def test_forward_int_rejects_bad_input(tiny):
    _, x, qm = tiny
    with pytest.raises(ValueError, match="int8"):
        im.forward_int(qm, x)                         # float input
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        im.forward_int(qm, np.zeros((1, 3, 16, 16), np.int8))


def test_quantizer_errors():
    cp = random_model(TINY)
    with pytest.raises(QuantizationError, match="calibration method"):
        quantize(cp, TINY, [images(TINY, 1)], head_mode="mean", method="entropy")
    with pytest.raises(QuantizationError, match="no calibration data"):
        quantize(cp, TINY, [], head_mode="mean")
    with pytest.raises(QuantizationError, match="rounding"):
        quantize(cp, TINY, [images(TINY, 1)], head_mode="mean", rounding="HALF_EVEN")


def test_calibration_methods_differ_as_defined():
    cp = random_model(TINY)
    batches = [images(TINY, 2, seed=s) for s in range(3)]
    r_max = activation_ranges(cp, TINY, batches, "max")
    r_pct = activation_ranges(cp, TINY, batches, "percentile", percentile=90.0)
    # independent recomputation of one tensor's statistics from the float trace
    stats = []
    for x in batches:
        tr = {}
        model_conv.forward(cp, x, TINY, tr)
        stats.append(np.abs(tr["blocks.1.mlp.fc1"]))
    assert r_max["blocks.1.mlp.fc1"] == pytest.approx(max(float(s.max()) for s in stats))
    assert r_pct["blocks.1.mlp.fc1"] == pytest.approx(np.mean([np.percentile(s, 90.0) for s in stats]))
    assert r_pct["input"] == r_max["input"]          # the input is never clipped


def test_weights_are_symmetric_per_channel_and_biases_at_product_scale(tiny):
    cp, _, qm = tiny
    T = qm.tensors
    w = T["blocks.0.mlp.fc1.weight"]
    assert w.dtype == np.int8 and w.min() >= -127
    assert np.all(np.abs(w.reshape(w.shape[0], -1)).max(axis=1) == 127)   # every row reaches 127
    s_w = T["blocks.0.mlp.fc1.weight_scale"]
    s_in = float(T["blocks.0.norm2.scale"])
    real = cp["blocks.0.mlp.fc1.bias"]
    assert T["blocks.0.mlp.fc1.bias"].dtype == np.int32
    assert np.all(np.abs(T["blocks.0.mlp.fc1.bias"] * s_in * s_w - real) <= 0.5 * s_in * s_w + 1e-12)


@settings(max_examples=8, deadline=None)
@given(st.sampled_from([(16, 4), (24, 8)]), st.integers(1, 3), st.sampled_from([1, 2, 4]),
       st.booleans(), st.integers(2, 11), st.sampled_from([SINGLE_ROUND, DOUBLE_ROUND]))
def test_random_configs_run_and_track_float(img_patch, heads, depth, distilled, classes, rounding):
    img, patch = img_patch
    cfg = DeiTConfig(img_size=img, patch_size=patch, embed_dim=12 * heads, depth=depth, num_heads=heads,
                     num_classes=classes, distilled=distilled)
    head_mode = "mean" if distilled else "cls"
    cp = random_model(cfg, seed=depth, head_mode=head_mode)
    x = images(cfg, 4, seed=heads)
    qm = quantize(cp, cfg, [x], head_mode=head_mode, rounding=rounding, method="max")
    li, s = im.logits_int8_model(qm, x)
    lf = model_conv.forward(cp, x, cfg)
    assert li.shape == lf.shape
    assert np.abs(li * s - lf).max() <= 0.15 * np.abs(lf).max() + 0.05
