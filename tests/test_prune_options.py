"""Token pruning options (issue 19): `order: position|score` and `package: mean|weighted-sum` (EViT's code).

The setting's syntax and errors, the integer kernels against Python-int loops written from EViT's code (top-k in
score order, the unnormalised head-mean attention sum), the float selection against a loop, both float forms
against each other, the graph's records, the quantized file and golden manifest, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conformance.cases import random_quantized_model
from refvit import golden, int_model, model_conv, model_token
from refvit import int_kernels_authors as KA
from refvit.checkpoints.convert import token_to_conv
from refvit.cli import main
from refvit.config import DeiTConfig
from refvit.graph import SCHEMES, GraphError, build_graph
from refvit.int_kernels_prune import prune_tokens, select_tokens
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.models import random_params
from refvit.prune import PruneError, format_prune, parse_prune, prune_options, prune_plan, select_float
from refvit.qfile import load_quantized, save_quantized

CFG = DeiTConfig(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10, distilled=True)


# ---------------------------------------------------------------- the setting

def test_parse_options_and_defaults():
    assert parse_prune("1:0.7,3:0.5,order=score") == ((1, 0.7), (3, 0.5), ("order", "score"))
    assert parse_prune("package=weighted-sum,1:0.7,order=score") == ((1, 0.7), ("order", "score"),
                                                                      ("package", "weighted-sum"))
    assert parse_prune("1:0.7,order=position,package=mean") == ((1, 0.7),)          # the defaults are no options
    assert parse_prune({"1": 0.7, "order": "score"}) == ((1, 0.7), ("order", "score"))  # JSON form
    assert parse_prune([(1, 0.7), ("package", "weighted-sum")]) == ((1, 0.7), ("package", "weighted-sum"))
    assert prune_options("1:0.7") == {"order": "position", "package": "mean"}
    assert prune_options("1:0.7,order=score") == {"order": "score", "package": "mean"}
    assert format_prune("1:0.7,package=weighted-sum,order=score") == "1:0.7,order=score,package=weighted-sum"
    assert parse_prune(format_prune("1:0.7,order=score")) == parse_prune("1:0.7,order=score")
    stages = prune_plan("0:0.5,2:0.5,order=score,package=weighted-sum", 4, 64)
    assert [(s.order, s.package) for s in stages] == [("score", "weighted-sum")] * 2
    assert stages[0].to_dict() == {"block": 0, "keep_rate": 0.5, "patches": 64, "keep": 32, "patches_out": 33,
                                   "order": "score", "package": "weighted-sum"}
    assert "order" not in prune_plan("0:0.5", 4, 64)[0].to_dict()


@pytest.mark.parametrize("spec, message", [
    ("1:0.7,order=random", "order must be given once, one of position|score"),
    ("1:0.7,order=score,order=score", "order must be given once"),
    ("1:0.7,package=sum", "package must be given once, one of mean|weighted-sum"),
    ("order=score", "need at least one BLOCK:KEEP stage"),
    ("1:0.7,colour=red", "unknown option 'colour'; options: order=position|score, package=mean|weighted-sum"),
    ("1:0.7,0.5", "is not BLOCK:KEEP"),
])
def test_bad_options(spec, message):
    with pytest.raises(PruneError, match=message):
        parse_prune(spec)


def test_bad_option_on_the_command_line_is_one_line_exit_2(capsys):
    assert main(["classify", "--int8", "--prune", "1:0.7,order=best"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refvit: error: ") and "order must be given once" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- the integer kernels against EViT-style loops

def _probs(rng, b, h, n_tokens, ties=False):
    p = rng.integers(0, 128, (b, h, n_tokens, n_tokens)).astype(np.int8)
    if ties:
        p[:, :, 0, :] = rng.integers(0, 3, (b, h, n_tokens))
    return p


def _topk_loop(p, keep, prefix):
    """EViT's topk(sorted=True) on the head sum (the mean times Hh), ties to the lower position, in Python ints."""
    out = []
    for b in range(p.shape[0]):
        score = [sum(int(p[b, h, 0, prefix + j]) for h in range(p.shape[1])) for j in range(p.shape[3] - prefix)]
        order = sorted(range(len(score)), key=lambda j: (-score[j], j))
        out.append([prefix + j for j in order[:keep]])
    return np.array(out, np.int32)


def _weighted_sum_loop(x, p, index, prefix, rounding):
    """EViT's extra token sum_j a_j x_j, a_j = mean over heads of p / 127, rounded as divide_round: Python ints."""
    b_, c_, _, n_tokens = x.shape
    h_ = p.shape[1]
    out = np.zeros((b_, c_, 1, prefix + index.shape[1] + 1), np.int64)
    lo, hi = (-128, 127) if x.dtype == np.int8 else (-32768, 32767)
    for b in range(b_):
        dropped = [t for t in range(prefix, n_tokens) if t not in index[b].tolist()]
        for c in range(c_):
            num = sum(sum(int(p[b, h, 0, t]) for h in range(h_)) * int(x[b, c, 0, t]) for t in dropped)
            den = h_ * 127
            q, r = divmod(abs(num), den)
            if rounding == DOUBLE_ROUND:
                v = (1 if num >= 0 else -1) * (q + (2 * r >= den))
            else:
                q, r = divmod(num, den)
                v = q + (2 * r >= den)
            cols = [int(x[b, c, 0, t]) for t in range(prefix)] + [int(x[b, c, 0, t]) for t in index[b]]
            out[b, c, 0] = cols + [min(hi, max(lo, v))]
    return out.astype(x.dtype)


@pytest.mark.parametrize("rounding", [SINGLE_ROUND, DOUBLE_ROUND])
@pytest.mark.parametrize("ties", [False, True])
def test_kernels_match_evit_loops(rounding, ties):
    rng = np.random.default_rng(19 + ties)
    for b, h, n, prefix, keep, dtype in ((2, 3, 18, 1, 7, np.int8), (1, 2, 11, 2, 4, np.int16), (2, 4, 9, 1, 7, np.int8)):
        p = _probs(rng, b, h, n, ties)
        x = rng.integers(-128 if dtype == np.int8 else -32768, 128 if dtype == np.int8 else 32768,
                         (b, 5, 1, n)).astype(dtype)
        index = KA.select_tokens_score_order(p, keep=keep, num_prefix=prefix)
        assert index.tolist() == _topk_loop(p, keep, prefix).tolist()
        assert np.array_equal(np.sort(index, axis=1), select_tokens(p, keep=keep, num_prefix=prefix))  # same set
        got = KA.prune_tokens_weighted_sum(x, p, index, num_prefix=prefix, rounding=rounding)
        assert np.array_equal(got, _weighted_sum_loop(x, p, index, prefix, rounding))
        mean = KA.prune_tokens_mean_any_order(x, p, index, num_prefix=prefix, rounding=rounding)
        ascending = prune_tokens(x, p, np.sort(index, axis=1), num_prefix=prefix, rounding=rounding)
        assert np.array_equal(mean[..., -1], ascending[..., -1])                      # the same package
        assert np.array_equal(mean[..., prefix:-1], x[:, :, :, index[0]] if b == 1 else
                              np.stack([x[i, :, :, index[i]].transpose(1, 0, 2).reshape(5, 1, -1)
                                        for i in range(b)]))


def test_weighted_sum_saturates_and_keeps_everything_when_nothing_drops():
    p = np.full((1, 12, 6, 6), 127, np.int8)                           # scores beyond a softmax: sum a_j = 4
    x = np.full((1, 2, 1, 6), 127, np.int8)
    idx = KA.select_tokens_score_order(p, keep=1, num_prefix=1)
    assert KA.prune_tokens_weighted_sum(x, p, idx, num_prefix=1)[0, :, 0, -1].tolist() == [127, 127]
    full = KA.select_tokens_score_order(p, keep=5, num_prefix=1)
    assert np.array_equal(KA.prune_tokens_weighted_sum(x, p, full, num_prefix=1), x)


def test_kernels_check_their_index():
    p = np.zeros((1, 1, 5, 5), np.int8)
    x = np.zeros((1, 1, 1, 5), np.int8)
    for bad in ([[1, 1]], [[0, 2]], [[2, 5]]):
        with pytest.raises(ValueError, match="index"):
            KA.prune_tokens_weighted_sum(x, p, np.array(bad, np.int32), num_prefix=1)
    assert KA.prune_tokens_mean_any_order(x, p, np.array([[3, 1]], np.int32), num_prefix=1).shape == (1, 1, 1, 4)


# ---------------------------------------------------------------- the float forms

def _select_loop(x, attn, keep_rate, prefix, order, package):
    n = x.shape[1] - prefix
    k = -(-int(round(keep_rate * 1000)) * n // 1000)
    out = []
    for b in range(x.shape[0]):
        score = attn[b, :, 0, prefix:].sum(axis=0)
        ranked = sorted(range(n), key=lambda j: (-score[j], j))
        kept = ranked[:k] if order == "score" else sorted(ranked[:k])
        dropped = sorted(ranked[k:])
        if package == "weighted-sum":
            pack = sum(score[j] / attn.shape[1] * x[b, prefix + j] for j in dropped)
        else:
            pack = sum(score[j] * x[b, prefix + j] for j in dropped) / sum(score[j] for j in dropped)
        out.append(np.stack([x[b, t] for t in range(prefix)] + [x[b, prefix + j] for j in kept] + [pack]))
    return np.stack(out)


@pytest.mark.parametrize("order", ["position", "score"])
@pytest.mark.parametrize("package", ["mean", "weighted-sum"])
def test_select_float_options_match_a_loop(order, package):
    rng = np.random.default_rng(7)
    x, attn = rng.standard_normal((2, 11, 4)), rng.random((2, 3, 11, 11))
    got = select_float(x, attn, 0.4, 1, order, package)
    np.testing.assert_allclose(got, _select_loop(x, attn, 0.4, 1, order, package), rtol=0, atol=1e-12)
    stage = prune_plan(f"0:0.4,order={order},package={package}", 1, 10)[0]
    assert np.array_equal(select_float(x, attn, stage, 1), got)                     # a Stage carries its options


@pytest.mark.parametrize("prune", ["0:0.5,2:0.3,order=score", "0:0.5,2:0.3,package=weighted-sum",
                                   "0:0.5,2:0.3,order=score,package=weighted-sum"])
def test_float_forms_agree_with_options(prune):
    params = {k: v.astype(np.float64) for k, v in random_params(CFG, "mean", 2).items()}
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32))
    token = model_token.forward(params, x, CFG, prune=prune)
    conv = model_conv.forward(token_to_conv(params), x, CFG, prune=prune)
    assert np.abs(token - conv).max() <= 1e-9
    if "package" in prune:                                              # the package token changes the logits
        assert np.abs(token - model_token.forward(params, x, CFG, prune="0:0.5,2:0.3")).max() > 1e-6


# ---------------------------------------------------------------- graph, integer model, file, golden

def test_records_and_integer_model():
    graph = build_graph(CFG, prune="1:0.5,order=score,package=weighted-sum")
    sel, pruned = (next(op for op in graph if op.name == f"blocks.1.{n}") for n in ("select", "pruned"))
    assert (sel.variant, sel.kernel, pruned.variant, pruned.kernel) == (
        "cls_attention-score-order", "select_tokens_score_order", "weighted-sum", "prune_tokens_weighted_sum")
    assert sel.layout == "(B,k) [kept token positions, score order]"
    mean_score = next(op for op in build_graph(CFG, prune="1:0.5,order=score") if op.name == "blocks.1.pruned")
    assert mean_score.variant == "mean-any-order"
    with pytest.raises(GraphError, match="token pruning reads int8 probabilities"):
        build_graph(CFG, scheme=SCHEMES["ivit"], prune="1:0.5")


def test_file_and_golden_carry_the_options(tmp_path):
    qm = random_quantized_model(48, 2, 3, 32, 8, True, SINGLE_ROUND)[0]
    x = int_model.quantize_input(qm, random_quantized_model(48, 2, 3, 32, 8, True, SINGLE_ROUND)[1][:2])
    base = int_model.forward_int(qm.with_prune("0:0.5"), x)
    q = qm.with_prune("0:0.5,order=score,package=weighted-sum")
    assert q.prune == ((0, 0.46875), ("order", "score"), ("package", "weighted-sum"))
    assert not np.array_equal(int_model.forward_int(q, x), base)
    order_only = int_model.forward_int(qm.with_prune("0:0.5,order=score"), x)
    assert np.array_equal(order_only, base)       # the order of the kept tokens never reaches the logits here
    save_quantized(q, tmp_path / "q.safetensors")
    back = load_quantized(tmp_path / "q.safetensors")
    assert back.prune == q.prune and back.graph == q.graph
    m = golden.write_golden(back, x, tmp_path / "g")
    stage = m["quantization"]["prune"]["stages"][0]
    assert (stage["order"], stage["package"]) == ("score", "weighted-sum")
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["quantization"]["prune"]["stages"][0][
        "order"] == "score"
