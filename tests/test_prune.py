"""Token pruning (HeatViT / EViT selector): the setting, the integer kernels against a Python-int reference,
the float forms against each other, the graph's static shapes, keep rate 1 against the unpruned golden bits,
golden + check with a changed kept index, the quantized file, the CLI, and the conformance cases' design."""
from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction

import numpy as np
import pytest

from conformance.cases import get_case
from refvit import golden, int_model, model_conv, model_token
from refvit.check import compare_dumps
from weights_tools.convert import token_to_conv
from refvit.cli import EXAMPLES, main
from refvit.config import DeiTConfig
from refvit.graph import build_graph
from refvit.int_kernels_prune import prune_tokens, select_tokens
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.models import default_int8_path, random_params
from refvit.preprocess import PRESETS, open_image
from refvit.prune import PruneError, keep_count, parse_prune, prune_plan, select_float
from refvit.qfile import load_quantized, save_quantized
from refvit.resolve import resolve_model

FMNIST = DeiTConfig(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10, distilled=True)
STAGES = "1:0.7,3:0.5"


# ---------------------------------------------------------------- the setting

def test_keep_count_reads_the_decimal_exactly():
    assert math.ceil(0.28 * 25) == 8 and math.ceil(0.56 * 25) == 15     # float products overshoot ...
    assert keep_count(0.28, 25) == 7 and keep_count(0.56, 25) == 14     # ... the exact decimal does not
    assert keep_count(0.7, 64) == 45 and keep_count(0.5, 64) == 32 and keep_count(1.0, 64) == 64
    assert keep_count(0.01, 5) == 1 and keep_count(1e-9, 1) == 1       # at least one token
    assert keep_count(0.3333, 3) == 1 and keep_count(0.3334, 3) == 2


def test_parse_and_plan():
    assert parse_prune("3:0.7, 1:0.5") == ((1, 0.5), (3, 0.7))
    assert parse_prune({2: 1}) == ((2, 1.0),) and parse_prune("none") == () == parse_prune(None)
    for bad, msg in (("1:0", r"\(0, 1\]"), ("1:1.5", r"\(0, 1\]"), ("1:x", "not a number"), ("1", "BLOCK:KEEP"),
                     ("1:0.5,1:0.7", "twice"), ("-1:0.5", ">= 0")):
        with pytest.raises(PruneError, match=msg):
            parse_prune(bad)
    with pytest.raises(PruneError, match="blocks 0..5"):
        prune_plan("6:0.5", 6, 64)
    # the embedded model, 1:0.7,3:0.7,5:0.7 (counted by hand): 64 -> 45 + 1, 46 -> 33 + 1, 34 -> 24 + 1
    plan = prune_plan("1:0.7,3:0.7,5:0.7", 6, 64)
    assert [(s.block, s.patches, s.keep, s.patches_out) for s in plan] == [(1, 64, 45, 46), (3, 46, 33, 34),
                                                                           (5, 34, 24, 25)]
    assert [s.patches_out for s in prune_plan("0:1.0,1:0.99", 2, 10)] == [10, 10]   # k = n: no package token


# ---------------------------------------------------------------- integer kernels vs Python ints

def ref_select(p, keep, prefix):
    """Python ints: rank by (score desc, position asc), keep the first `keep`, ascending token positions."""
    out = []
    for b in range(p.shape[0]):
        scores = [int(sum(int(v) for v in p[b, :, 0, prefix + j])) for j in range(p.shape[3] - prefix)]
        ranked = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        out.append(sorted(prefix + j for j in ranked[:keep]))
    return out, scores


def ref_round(q: Fraction, rounding: str) -> int:
    """Round an exact rational: SINGLE_ROUND half up, DOUBLE_ROUND half away from zero."""
    if rounding == SINGLE_ROUND:
        return int((q + Fraction(1, 2)).__floor__())
    mag = int((abs(q) + Fraction(1, 2)).__floor__())
    return mag if q >= 0 else -mag


def ref_prune(x, p, index, prefix, rounding):
    b_, c_, _, n_tok = x.shape
    rows = []
    for b in range(b_):
        kept = list(index[b])
        if len(kept) == n_tok - prefix:
            rows.append(x[b, :, 0, :].astype(int).tolist())
            continue
        dropped = [t for t in range(prefix, n_tok) if t not in kept]
        w = {t: sum(int(v) for v in p[b, :, 0, t]) for t in dropped}
        if sum(w.values()) == 0:
            w = dict.fromkeys(dropped, 1)
        total = sum(w.values())
        package = [ref_round(Fraction(sum(w[t] * int(x[b, c, 0, t]) for t in dropped), total), rounding)
                   for c in range(c_)]
        rows.append([[int(x[b, c, 0, t]) for t in list(range(prefix)) + kept] + [package[c]] for c in range(c_)])
    return rows


@pytest.mark.parametrize("rounding", [SINGLE_ROUND, DOUBLE_ROUND])
def test_kernels_match_python_int_reference(rounding):
    rng = np.random.default_rng(11)
    for trial in range(40):
        b, h, prefix, n = int(rng.integers(1, 3)), int(rng.integers(1, 5)), int(rng.integers(1, 3)), int(rng.integers(1, 12))
        n_tok, c = prefix + n, int(rng.integers(1, 6))
        p = rng.integers(0, 128, (b, h, n_tok, n_tok)).astype(np.int8)
        top = [0, 1, 2, 127][trial % 4]                                  # 0: all-zero scores; 1, 2: many ties
        p[:, :, 0, prefix:] = rng.integers(0, top + 1, (b, h, n))
        keep = int(rng.integers(1, n + 1))
        dtype = np.int16 if trial % 3 == 0 else np.int8
        lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
        x = rng.integers(lo, int(hi) + 1, (b, c, 1, n_tok)).astype(dtype)
        want_index, _ = ref_select(p, keep, prefix)
        index = select_tokens(p, keep=keep, num_prefix=prefix)
        assert index.dtype == np.int32 and index.tolist() == want_index, trial
        out = prune_tokens(x, p, index, num_prefix=prefix, rounding=rounding)
        assert out.dtype == dtype and out.shape == (b, c, 1, prefix + keep + (keep < n))
        assert out[:, :, 0, :].tolist() == ref_prune(x, p, index, prefix, rounding), trial


def test_package_rounding_modes_differ_only_on_negative_ties():
    """The spec's worked example: dropped scores 0, 0 (a plain average) of -3 and -4 -> -3.5."""
    p = np.zeros((1, 1, 5, 5), np.int8)
    p[0, 0, 0, 1:] = [3, 0, 2, 0]
    x = np.array([5, 10, -3, 7, -4], np.int8).reshape(1, 1, 1, 5)
    index = select_tokens(p, keep=2, num_prefix=1)
    assert index.tolist() == [[1, 3]]
    assert prune_tokens(x, p, index, num_prefix=1, rounding=SINGLE_ROUND).ravel().tolist() == [5, 10, 7, -3]
    assert prune_tokens(x, p, index, num_prefix=1, rounding=DOUBLE_ROUND).ravel().tolist() == [5, 10, 7, -4]
    p[0, 0, 0, 1:] = [3, 1, 2, 2]                 # position 3 beats 4 on the tie; -11 / 3 -> -4
    index = select_tokens(p, keep=2, num_prefix=1)
    assert index.tolist() == [[1, 3]]
    assert prune_tokens(x, p, index, num_prefix=1).ravel().tolist() == [5, 10, 7, -4]


def test_kernels_check_their_arguments():
    p = np.zeros((1, 2, 6, 6), np.int8)
    x = np.zeros((1, 4, 1, 6), np.int8)
    with pytest.raises(ValueError, match="keep must be in"):
        select_tokens(p, keep=0, num_prefix=1)
    with pytest.raises(ValueError, match=r"p \(probabilities"):
        select_tokens(np.full((1, 2, 6, 6), -1, np.int8), keep=2, num_prefix=1)
    for bad, msg in (([[3, 2]], "increasing"), ([[0, 2]], "index"), ([[2, 6]], "index"), ([[1, 1]], "increasing")):
        with pytest.raises(ValueError, match=msg):
            prune_tokens(x, p, np.array(bad, np.int32), num_prefix=1)
    with pytest.raises(ValueError, match="int32"):
        prune_tokens(x, p, np.array([[1, 2]], np.int64), num_prefix=1)


# ---------------------------------------------------------------- the float forms

def ref_select_float(x, attn, keep_rate, prefix):
    """Loops: scores, ranking and the weighted average token by token (float64)."""
    b_, n_tok, c = x.shape
    n = n_tok - prefix
    k = keep_count(keep_rate, n)
    out = []
    for b in range(b_):
        score = [float(sum(attn[b, h, 0, prefix + j] for h in range(attn.shape[1]))) for j in range(n)]
        ranked = sorted(range(n), key=lambda j: (-score[j], j))
        kept, dropped = sorted(ranked[:k]), sorted(ranked[k:])
        rows = [x[b, t] for t in range(prefix)] + [x[b, prefix + j] for j in kept]
        if dropped:
            w = [score[j] for j in dropped] if sum(score[j] for j in dropped) > 0 else [1.0] * len(dropped)
            rows.append(sum(wi * x[b, prefix + j] for wi, j in zip(w, dropped)) / sum(w))
        out.append(np.stack(rows))
    return np.stack(out)


def test_select_float_matches_a_loop():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 11, 4))
    attn = rng.random((2, 3, 11, 11))
    attn[1, :, 0, 1:] = np.round(attn[1, :, 0, 1:] * 2) / 2           # ties
    for rate in (0.3, 0.7, 1.0):
        np.testing.assert_allclose(select_float(x, attn, rate, 1), ref_select_float(x, attn, rate, 1), rtol=0,
                                   atol=1e-12)
    attn[:, :, 0, 1:] = 0                                              # all-zero scores: plain average
    np.testing.assert_allclose(select_float(x, attn, 0.5, 1)[:, -1], x[:, 6:].mean(axis=1), atol=1e-12)


@pytest.mark.parametrize("cfg, prune", [
    (DeiTConfig(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10, distilled=True),
     "0:0.5,2:0.3,3:0.9"),
    (DeiTConfig(img_size=48, patch_size=16, embed_dim=32, depth=3, num_heads=4, num_classes=5), "0:0.2,1:0.5,2:0.01"),
    (DeiTConfig(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, mlp_ratio=3.0, num_classes=7),
     "0:0.6,1:0.6"),                                                   # (a selection in the last block alone
])                                                                      # cannot change the cls token's logits)
def test_float_token_and_conv_forms_agree(cfg, prune):
    params = {k: v.astype(np.float64) for k, v in random_params(cfg, "mean" if cfg.distilled else "cls", 2).items()}
    x = np.random.default_rng(4).standard_normal((3, 3, cfg.img_size, cfg.img_size))
    token = model_token.forward(params, x, cfg, prune=prune)
    conv = model_conv.forward(token_to_conv(params), x, cfg, prune=prune)
    assert np.abs(token - conv).max() <= 1e-9
    unpruned = model_token.forward(params, x, cfg)
    assert np.abs(token - unpruned).max() > 1e-3                       # the selection changes the logits
    full = ",".join(f"{b}:1.0" for b, _ in parse_prune(prune))
    assert np.array_equal(model_token.forward(params, x, cfg, prune=full), unpruned)


# ---------------------------------------------------------------- the graph and the integer model

def test_graph_shapes_are_static_and_the_default_graph_unchanged():
    assert build_graph(FMNIST, prune=()) == build_graph(FMNIST) == build_graph(FMNIST, prune="none")
    g = build_graph(FMNIST, prune="1:0.7,3:0.7,5:0.7")
    by = {op.name: op for op in g}
    assert by["blocks.1.select"].shape == ("B", 45) and by["blocks.1.select"].dtype == "int32"
    assert by["blocks.1.pruned"].shape == ("B", 192, 1, 48) and by["blocks.1.pruned"].scale == "blocks.1.residual1.scale"
    assert by["blocks.1.norm2"].inputs == {"x": "blocks.1.pruned"} and by["blocks.1.residual2"].inputs["a"] == "blocks.1.pruned"
    assert by["blocks.2.attn.softmax"].shape == ("B", 3, 48, 48) and by["blocks.5.mlp.gelu"].shape == ("B", 768, 1, 27)
    assert all(d != "N" for op in g for d in op.shape)                 # every dimension a number (or the batch)
    names = [op.name for op in g]
    assert names.index("blocks.3.select") == names.index("blocks.3.residual1") + 1
    assert len(g) == len(build_graph(FMNIST)) + 6


@pytest.fixture(scope="module")
def shipped():
    return load_quantized(default_int8_path())


def _tensors(d):
    m = json.loads((d / "manifest.json").read_text())
    return {name: np.load(d / e["files"]["npy"]) for name, e in m["tensors"].items()}, m


def test_keep_rate_one_gives_the_unpruned_bits(shipped, tmp_path):
    xq = golden.seed_input(7, (2, 3, 32, 32))
    golden.write_golden(shipped, xq, tmp_path / "plain")
    golden.write_golden(shipped.with_prune("0:1.0,2:1.0,5:1.0"), xq, tmp_path / "one")
    plain, _ = _tensors(tmp_path / "plain")
    one, m = _tensors(tmp_path / "one")
    assert set(one) - set(plain) == {f"blocks.{i}.{t}" for i in (0, 2, 5) for t in ("select", "pruned")}
    for name, arr in plain.items():
        assert arr.dtype == one[name].dtype and np.array_equal(arr, one[name]), name
    assert np.array_equal(one["blocks.2.select"], np.tile(np.arange(2, 66, dtype=np.int32), (2, 1)))
    assert np.array_equal(one["blocks.2.pruned"], plain["blocks.2.residual1"])
    assert m["quantization"]["prune"]["static_shapes"] is True


def test_golden_check_and_a_changed_kept_index(shipped, tmp_path, capsys):
    qm = shipped.with_prune(STAGES)
    golden.write_golden(qm, golden.seed_input(3, (2, 3, 32, 32)), tmp_path / "g")
    assert compare_dumps(tmp_path / "g", tmp_path / "g").ok
    shutil.copytree(tmp_path / "g", tmp_path / "dev")
    f = tmp_path / "dev" / "tensors" / "blocks.3.select.npy"
    index = np.load(f)
    dropped = sorted(set(range(2, 48)) - set(index[1].tolist()))
    index[1, 4] = dropped[0]                                           # the device keeps another token
    np.save(f, np.sort(index, axis=1))
    report = compare_dumps(tmp_path / "g", tmp_path / "dev")
    first = report.first_divergence
    assert first.op_name == "blocks.3.select" and first.diff.index[0] == 1
    assert all(r.ok for r in report.results[:first.op_index])
    assert main(["check", str(tmp_path / "g"), str(tmp_path / "dev")]) == 1
    assert "first divergent op: " in capsys.readouterr().out


def test_integer_model_runs_pruned_with_less_work_and_sane_logits(shipped):
    x = np.stack([PRESETS["fmnist"](open_image(f)) for f in sorted(EXAMPLES.glob("*.png"))])  # (6, 3, 32, 32)
    full = int_model.logits_int8_model(shipped, x)[0]
    pruned = int_model.logits_int8_model(shipped.with_prune("1:0.9,3:0.9,5:0.9"), x)[0]
    assert pruned.shape == full.shape and not np.array_equal(pruned, full)
    assert (pruned.argmax(1) == full.argmax(1)).mean() >= 0.8           # mild pruning keeps most decisions


# ---------------------------------------------------------------- the quantized file and the CLI

def test_quantize_records_the_setting_and_rounding_keeps_it(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--calib", str(EXAMPLES), "--prune", STAGES, "--out", str(out), "--quiet"]) == 0
    qm = load_quantized(out)
    plan = prune_plan(STAGES, qm.config.depth, qm.config.num_patches)
    assert [(s["block"], s["keep"]) for s in qm.prune_stages()] == [(s.block, s.keep) for s in plan]
    assert qm.metadata()["prune"]["stages"] == qm.prune_stages() and "prune" not in qm.calibration
    assert [(s.block, s.keep) for s in prune_plan(qm.prune, qm.config.depth, qm.config.num_patches)] == \
        [(s.block, s.keep) for s in plan]                                    # the records' pruning, as a setting
    assert [op.name for op in qm.graph if op.op == "token_select"] == ["blocks.1.select", "blocks.3.select"]
    r = resolve_model(model=out, rounding=DOUBLE_ROUND)                  # the graph is rebuilt: pruning stays
    assert [op.attrs["rounding"] for op in r.qm.graph if op.op == "token_prune"] == [DOUBLE_ROUND] * 2
    assert not any(op.op == "token_select" for op in resolve_model(model=out, prune="none").qm.graph)
    save_quantized(qm.with_prune("2:0.5"), tmp_path / "r.safetensors")
    assert load_quantized(tmp_path / "r.safetensors").prune_stages()[0]["keep"] == 32
    for argv in (["classify", "--prune", STAGES], ["classify", "--int8", "--prune", STAGES, "--json"],
                 ["classify", "--model", str(out), str(sorted(EXAMPLES.glob("*.png"))[0])]):
        assert main(argv) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["classify", "--prune", "6:0.5"], "block 6 does not exist"),
    (["classify", "--int8", "--prune", "1:0"], "keep rate must be a number in (0, 1]"),
    (["golden", "--seed", "1", "--out", "unused", "--prune", "1-0.5"], "is not BLOCK:KEEP"),
])
def test_bad_prune_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("refvit: error: ") and message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- the conformance cases are what they say

def _scores(p, prefix):
    return p[:, :, 0, prefix:].astype(np.int64).sum(axis=1)


def test_conformance_cases_have_their_properties():
    case = get_case("select_tokens_ties_h3_n34_p2_k10_b2")
    s = np.sort(_scores(case.inputs["p"], 2), axis=1)[:, ::-1]
    assert np.all(s[:, 9] == s[:, 10])                                  # the cut splits a tie in every image
    case = get_case("select_tokens_allzero_h3_n18_p1_k5_b2")
    assert np.all(_scores(case.inputs["p"], 1)[0] == 0)
    assert _scores(get_case("select_tokens_max_h12_n50_p1_k20_b1").inputs["p"], 1).max() > 127
    assert get_case("select_tokens_random_h3_n66_p2_k1_b2").expected.shape == (2, 1)
    kall = get_case("prune_tokens_random_c48_h3_n18_p2_k16_b2_single")
    assert np.array_equal(kall.expected, kall.inputs["x"])               # k = all: the tokens unchanged
    single, double = (get_case(f"prune_tokens_pair_c16_h3_n18_p1_k15_b2_{m}") for m in ("single", "double"))
    x, index = single.inputs["x"], single.inputs["index"]
    for b in range(2):                                                  # two dropped tokens of equal score
        dropped = sorted(set(range(1, 18)) - set(index[b].tolist()))
        sums = x[b, :, 0, dropped].astype(int).sum(axis=0)
        assert len(dropped) == 2 and np.any((sums % 2 == 1) & (sums < 0))   # negative half ties: modes differ
    assert not np.array_equal(single.expected, double.expected)
