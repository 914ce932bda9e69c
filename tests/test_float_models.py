"""Float DeiT against the peers (timm, Hugging Face), the trained Fashion-MNIST model, and itself:
token form vs conv form, the parameter converter, and erf/gelu accuracy."""
import json
import math
import time

import numpy as np
import pytest
from conftest import PEERS
from hypothesis import given, settings, strategies as st

from refvit import model_conv, model_token
from refvit.config import DeiTConfig
from refvit.functional import erf, gelu
from refvit.models import default_model_path, load_model
from refvit.preprocess import fmnist_transform
from weights_tools import expected_shapes
from weights_tools.convert import conv_to_token, token_to_conv

LOGITS_TOL = 1e-4   # float32, against the peers
TRACE_TOL = 2e-5    # float32 activations of magnitude ~4; measured ~3e-6
FORMS = {"token": lambda p: p, "conv": token_to_conv}
FORWARD = {"token": model_token.forward, "conv": model_conv.forward}


def max_err(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a, np.float64) - b).max())


# ---------------------------------------------------------------- peers

# every peer in both forms; the quick run (-m "not slow") takes a timm and a Hugging Face one, one form each
QUICK_PEER_FORMS = {("timm_tiny", "token"), ("hf_with_teacher", "conv")}


@pytest.mark.parametrize("name, form", [pytest.param(n, f, marks=() if (n, f) in QUICK_PEER_FORMS else pytest.mark.slow,
                                                     id=f"{n}-{f}") for n in PEERS for f in FORMS])
def test_logits_match_peer(peers, peer_inputs, name, form):
    peer = peers[name]
    ck = peer.checkpoint
    logits = FORWARD[form](FORMS[form](ck.params), peer_inputs, ck.config)
    assert logits.dtype == np.float32
    err = max_err(logits, peer.logits)
    print(f"\n{peer.name} {form} form: max abs err {err:.3g} over {peer.logits.size} logits")
    assert err <= LOGITS_TOL


def test_peer_head_modes(peers):
    """Distilled timm and HF WithTeacher average two heads; the plain HF class reads the cls token only
    (its checkpoint still has a dist token)."""
    modes = {name: (p.checkpoint.head_mode, p.checkpoint.config.distilled) for name, p in peers.items()}
    assert modes == {"timm_tiny": ("cls", False), "timm_tiny_distilled": ("mean", True),
                     "hf_with_teacher": ("mean", True), "hf_plain": ("cls", True)}


@pytest.mark.parametrize("name", ["timm_tiny", "timm_tiny_distilled"])
def test_trace_matches_timm(peers, peer_inputs, name):
    peer, trace = peers[name], {}
    ck = peer.checkpoint
    model_token.forward(ck.params, peer_inputs[:2], ck.config, trace=trace)
    stages = ["patch_embed"] + [f"blocks.{i}" for i in range(ck.config.depth)]
    assert sorted(trace) == sorted(stages)
    errs = {s: max_err(trace[s], peer.outputs[f"trace.{s}"]) for s in stages}
    print(f"\n{name} trace: worst stage {max(errs, key=errs.get)} max abs err {max(errs.values()):.3g}")
    assert all(e <= TRACE_TOL for e in errs.values()), errs


# ---------------------------------------------------------------- the trained Fashion-MNIST model

@pytest.fixture(scope="module")
def fmnist(shared):
    card = json.loads((shared / "models" / "fmnist_deit_d192_l6_h3_p4_distilled.json").read_text())
    with np.load(shared / "data" / "fmnist_test.npz") as z:
        return card, z["images"], z["labels"]


@pytest.fixture(scope="module")
def fmnist_logits(fmnist):
    """Logits of the embedded model for all 10,000 test images, in batches small enough to stay in cache."""
    _, images, _ = fmnist
    model = load_model(None)
    start = time.perf_counter()
    out = np.concatenate([model.logits(fmnist_transform(images[i:i + 50])) for i in range(0, len(images), 50)])
    print(f"\nfmnist: 10,000 test images in {time.perf_counter() - start:.1f} s")
    return out


def test_embedded_model_is_the_shared_one(shared):
    assert default_model_path().read_bytes() == (shared / "models" /
                                                 "fmnist_deit_d192_l6_h3_p4_distilled.safetensors").read_bytes()


def test_embedded_model_card_matches_weights(fmnist):
    card, _, _ = fmnist
    model = load_model(None)
    assert model.config == DeiTConfig(
        img_size=card["img_size"], patch_size=card["patch_size"], in_chans=card["in_chans"],
        embed_dim=card["embed_dim"], depth=card["depth"], num_heads=card["num_heads"], mlp_ratio=card["mlp_ratio"],
        qkv_bias=card["qkv_bias"], ln_eps=card["layernorm_eps"], num_classes=card["num_classes"],
        distilled=card["distilled"])
    assert model.head_mode == "mean"


def ref_logits(card) -> np.ndarray:
    ref = np.asarray(card["ref_logits"], np.float32)
    assert ref.shape == (card["n_ref"], card["num_classes"])
    return ref


def test_fmnist_ref_logits_first_images(fmnist):
    """The quick run's share of the next test: the first two batches of 50 (the same batches as fmnist_logits)."""
    card, images, _ = fmnist
    ref = ref_logits(card)[:100]
    model = load_model(None)
    mine = np.concatenate([model.logits(fmnist_transform(images[i:i + 50])) for i in range(0, len(ref), 50)])
    err = max_err(mine, ref)
    print(f"\nfmnist ref_logits (first {len(ref)} images): max abs err {err:.3g}")
    assert err <= LOGITS_TOL


@pytest.mark.slow   # all 1,000 reference images, read from the 10,000 logits the top-1 test computes too
def test_fmnist_ref_logits(fmnist, fmnist_logits):
    card, _, _ = fmnist
    ref = ref_logits(card)
    err = max_err(fmnist_logits[:len(ref)], ref)
    print(f"\nfmnist ref_logits ({len(ref)} images): max abs err {err:.3g}")
    assert err <= LOGITS_TOL


@pytest.mark.slow
def test_fmnist_top1_equals_timm(fmnist, fmnist_logits):
    card, _, labels = fmnist
    correct = int((fmnist_logits.argmax(axis=1) == labels).sum())
    print(f"\nfmnist top-1: {correct} / {len(labels)} = {correct / len(labels):.4f} "
          f"(timm: {card['test_accuracy_float_timm']:.4f})")
    assert correct == round(card["test_accuracy_float_timm"] * len(labels))  # float32 accuracy: to the image


def test_embedded_card_states_timm_accuracy(fmnist):
    card, _, _ = fmnist
    ours = json.loads((default_model_path().parent / "fmnist_deit.json").read_text())
    assert ours["test_accuracy_float_timm"] == card["test_accuracy_float_timm"]


# ---------------------------------------------------------------- token form == conv form

@st.composite
def small_models(draw):
    """A random small DeiT config and random weights for it (float64), with a random input batch."""
    patch = draw(st.integers(1, 4))
    heads = draw(st.integers(1, 3))
    distilled = draw(st.booleans())
    cfg = DeiTConfig(
        img_size=patch * draw(st.integers(1, 4)), patch_size=patch, embed_dim=heads * draw(st.integers(1, 6)),
        depth=draw(st.integers(1, 3)), num_heads=heads, mlp_ratio=draw(st.sampled_from([1.0, 1.5, 2.0, 4.0])),
        qkv_bias=draw(st.booleans()), num_classes=draw(st.integers(1, 7)), distilled=distilled)
    head_mode = "mean" if distilled and draw(st.booleans()) else "cls"
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = {n: rng.normal(0.0, 0.5, s) for n, s in expected_shapes(cfg, head_mode).items()}
    x = rng.normal(0.0, 1.0, (draw(st.integers(1, 3)), cfg.in_chans, cfg.img_size, cfg.img_size))
    return cfg, params, x


@settings(max_examples=25, deadline=None)
@given(small_models())
def test_token_form_equals_conv_form_float64(model):
    cfg, params, x = model
    token = model_token.forward(params, x, cfg)
    conv = model_conv.forward(token_to_conv(params), x, cfg)
    assert token.dtype == conv.dtype == np.float64
    assert token.shape == (x.shape[0], cfg.num_classes)
    assert max_err(token, conv) <= 1e-9


@settings(max_examples=25, deadline=None)
@given(small_models())
def test_converter_round_trip(model):
    _, params, _ = model
    conv = token_to_conv(params)
    back = conv_to_token(conv)
    assert back.keys() == params.keys()
    assert all(np.array_equal(back[n], params[n]) and back[n].shape == params[n].shape for n in params)
    assert all(conv[n].ndim == 4 for n in conv if n.endswith(("qkv.weight", "fc1.weight", "pos_embed")))


def test_cast_params_layout_changes_no_bit():
    # cast_params stores the blocks' Linear weights column major (an NN GEMM); the logits and every block's
    # output are the same bits as with row-major parameters, and the shapes and values are unchanged
    from refvit.config import preset
    from refvit.models import random_params
    cfg = preset("deit_tiny_patch16_224")
    p = random_params(cfg, "cls", 5)
    cast = model_token.cast_params(p)
    assert cast["blocks.0.mlp.fc1.weight"].flags.f_contiguous and not cast["blocks.0.mlp.fc1.weight"].flags.c_contiguous
    assert all(np.array_equal(cast[n], p[n]) and cast[n].shape == p[n].shape for n in p)
    x = np.random.default_rng(6).standard_normal((2, 3, 224, 224)).astype(np.float32)
    t_row, t_col = {}, {}
    assert np.array_equal(model_token.forward(p, x, cfg, t_row), model_token.forward(cast, x, cfg, t_col))
    assert all(np.array_equal(t_row[n], t_col[n]) for n in t_row)
    # the conv form of the cast parameters (as load_model prepares them): the same bits as row-major ones
    t_row, t_col = {}, {}
    assert np.array_equal(model_conv.forward(token_to_conv(p), x, cfg, t_row),
                          model_conv.forward(token_to_conv(cast), x, cfg, t_col))
    assert all(np.array_equal(t_row[n], t_col[n]) for n in t_row)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attend_against_a_direct_softmax(dtype):
    # attend on strided views (as both forms call it) against softmax(q k^T) v written out in float64
    from refvit.functional import attend
    rng = np.random.default_rng(11)
    B, Hh, N, D = 3, 2, 7, 5
    qkv = (rng.standard_normal((B, N, 3, Hh, D)) * 3).astype(dtype)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)                                          # 3 x (B, Hh, N, D) views
    s = np.einsum("bhnd,bhmd->bhnm", q.astype(np.float64), k.astype(np.float64))
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    want_p = e / e.sum(axis=-1, keepdims=True)
    want_o = np.einsum("bhnm,bhmd->bhnd", want_p, v.astype(np.float64))
    out = np.full((B, N, Hh, D), np.nan, dtype)
    p = attend(q, k.transpose(0, 1, 3, 2), v, out.transpose(0, 2, 1, 3), probs=True)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    assert p.dtype == dtype and p.shape == (B, Hh, N, N)
    assert max_err(p, want_p) < tol and max_err(out.transpose(0, 2, 1, 3), want_o) < tol * 10
    assert attend(q, k.transpose(0, 1, 3, 2), v, np.empty((B, Hh, N, D), dtype)) is None


def test_converter_round_trip_real_checkpoint(peers):
    params = peers["timm_tiny_distilled"].checkpoint.params
    back = conv_to_token(token_to_conv(params))
    assert all(np.array_equal(back[n], params[n]) and back[n].dtype == params[n].dtype for n in params)


# ---------------------------------------------------------------- erf and gelu accuracy

GRID = np.concatenate([np.linspace(-7.0, 7.0, 200_001), [0.0, -0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 1e-30, -1e-8]])
EXACT_ERF = np.array([math.erf(v) for v in GRID])


def test_erf_float64_accuracy():
    err = max_err(erf(GRID), EXACT_ERF)
    print(f"\nerf float64: max abs err vs math.erf {err:.3g}")
    assert err < 4e-15


@pytest.mark.parametrize("dtype, tol", [(np.float64, 4e-15), (np.float32, 4e-7)])
def test_gelu_accuracy(dtype, tol):
    x = GRID.astype(dtype)
    exact = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])
    out = gelu(x)
    assert out.dtype == dtype
    rel = np.abs(out - exact) / np.maximum(1.0, np.abs(x))  # an erf error is scaled by |x| / 2
    print(f"\ngelu {np.dtype(dtype).name}: max abs err / max(1, |x|) {rel.max():.3g}")
    assert rel.max() < tol


def test_erf_special_values_and_symmetry():
    out = erf(np.array([np.inf, -np.inf, np.nan]))
    assert out[0] == 1.0 and out[1] == -1.0 and np.isnan(out[2])
    assert np.array_equal(erf(-GRID), -erf(GRID))  # odd, exactly


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_special_values_and_tails(dtype):
    out = gelu(np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 50.0, -50.0, 1e30, -1e30], dtype))
    assert out[0] == np.inf and np.isnan(out[2]) and out[3] == 0 and out[4] == 0
    assert out[5] == 50.0 and out[6] == 0 and out[7] == dtype(1e30) and out[8] == 0
    assert dtype == np.float64 or out[1] == 0  # float64: -inf * 0 is NaN, as torch


def test_gelu_float32_chunk_boundaries():
    # the float32 path works in chunks of scratch arrays: a size that is not a multiple of the chunk, and
    # a non-contiguous input, give the same values as elementwise evaluation on a contiguous copy
    x = np.random.default_rng(3).standard_normal(3 * (1 << 16) + 17).astype(np.float32) * 4
    whole = gelu(x)
    assert np.array_equal(whole[5:9], gelu(x[5:9]))
    assert np.array_equal(gelu(x[::-1]), whole[::-1])
    assert np.array_equal(gelu(x.reshape(-1, 1)[:, 0]), whole)
    # a transposed view (the conv form's channels-last activations) is read in its memory order, no copy
    m = x[:3 * (1 << 16)].reshape(3, 1 << 16)
    out = gelu(m.T)
    assert out.shape == m.T.shape and out.dtype == np.float32 and np.array_equal(out, whole[:m.size].reshape(m.shape).T)
