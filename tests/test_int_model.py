"""The integer DeiT as a whole (refvit.int_model): integer-only trace, exact GEMMs, batch invariance, its input
checks, agreement with the float model. (The quantizer: test_quantize.py; the file: test_qfile.py.)"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refvit import int_kernels as K
from refvit import int_model as im
from refvit import model_conv
from refvit.config import DeiTConfig
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.quantize import quantize
from weights_tools.convert import token_to_conv
from refvit.models import random_params


def random_model(cfg: DeiTConfig, seed=0, head_mode="mean"):
    """Random DeiT weights at a trained network's scales (refvit.models.random_params), in the conv form."""
    return token_to_conv(random_params(cfg, head_mode, seed))


def images(cfg: DeiTConfig, n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)


def test_trace_is_integer_only_and_in_execution_order(tiny):
    x, qm = tiny.x, tiny.qm
    tr = im.Trace()
    logits, scale = im.logits_int8_model(qm, x, tr)
    assert logits.dtype == np.int16 and logits.shape == (6, tiny.config.num_classes) and scale > 0
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
    x, qm = tiny.x, tiny.qm
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
    x, qm = tiny.x, tiny.qm
    tr_all, tr_one = im.Trace(), im.Trace()
    im.logits_int8_model(qm, x, tr_all)
    im.logits_int8_model(qm, x[4:5], tr_one)
    for name, t in tr_one.tensors.items():
        assert np.array_equal(t, tr_all.tensors[name][4:5]), name


def test_int8_logits_track_float_logits(tiny):
    cp, x, qm = tiny.conv, tiny.x, tiny.qm
    li, s = im.logits_int8_model(qm, x)
    lf = model_conv.forward(cp, x, tiny.config)
    cos = float(np.sum(li * s * lf) / np.linalg.norm(li * s) / np.linalg.norm(lf))
    assert cos > 0.98, cos


def test_forward_int_rejects_bad_input(tiny):
    x, qm = tiny.x, tiny.qm
    with pytest.raises(ValueError, match="int8"):
        im.forward_int(qm, x)                         # float input
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        im.forward_int(qm, np.zeros((1, 3, 16, 16), np.int8))


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
