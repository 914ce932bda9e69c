"""Every DeiT a user can download (issue 21): DeiT-III (layer scale, no_embed_class), timm's plain ViT and
Hugging Face's ViTForImageClassification, Hugging Face preprocessing -- against the peers' own outputs in
../shared/peer, against independent algebra on non-trivial random weights, and through the integer model."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from conformance.cases import Case
from conformance.dut import RefvitDUT
from conformance.runner import check
from refvit import graph as G
from refvit import int_model, model_conv, model_token
from refvit.cli import main
from refvit.config import DeiTConfig, preset
from refvit.models import load_model, random_params
from refvit.preprocess import (PRESETS, Preprocess, PreprocessError, from_hf_processor, hf_rescale_normalize,
                               resolve_preprocess)
from refvit.quantize import quantize
from weights_tools import CheckpointError, load_checkpoint, to_hf_names, write_safetensors
from weights_tools.convert import token_to_conv

from ckptfiles import timm_config_json, write_dir
from conftest import PEER_DIR, SHARED
import torchfile

DEIT3 = "timm_deit3_custom_i64p8d96h3l3_seed0"
VIT = "timm_vit_custom_i64p8d64h2l2_seed0"
HF_VIT = "hf_ViTForImageClassification_i64p8d64h2l2_seed0"
HF_DEIT = "hf_DeiTForImageClassificationWithTeacher_d192_l12_seed0_hfproc"
TINY3 = DeiTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10, layer_scale=True,
                   no_embed_class=True)


def peer_npz(name: str) -> dict:
    with np.load(PEER_DIR / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def photos(names) -> list:
    return [SHARED / "images" / "imagenet" / str(n) for n in names]


def nontrivial(cfg: DeiTConfig, seed: int = 0) -> dict:
    """Random float64 weights with non-zero biases, LayerNorm gains away from 1, layer scales in [0.05, 1]."""
    p = {k: v.astype(np.float64) for k, v in random_params(cfg, rng=seed).items()}
    rng = np.random.default_rng(seed + 100)
    for k in p:
        if k.endswith(".gamma"):
            p[k] = rng.uniform(0.05, 1.0, p[k].shape)
    return p


# ---------------------------------------------------------------- the peers: timm and transformers themselves

QUICK_FORM = {DEIT3: "token", VIT: "conv", HF_VIT: "token", HF_DEIT: "conv"}   # each peer's form in the quick run


@pytest.mark.shared
@pytest.mark.parametrize("name, form", [pytest.param(n, f, id=f"{f}-{n}", marks=() if f == q else pytest.mark.slow)
                                        for n, q in QUICK_FORM.items() for f in ("token", "conv")])
def test_logits_equal_the_peers(name, form):
    z = peer_npz(name)
    m = load_model(PEER_DIR / name, form=form)
    assert np.abs(m.logits(z["inputs"]) - z["logits"]).max() < 1e-5


@pytest.mark.shared
def test_deit3_is_read_as_deit3_and_its_block_traces_equal_timms():
    ckpt = load_checkpoint(PEER_DIR / DEIT3)
    assert ckpt.config.layer_scale and ckpt.config.no_embed_class and ckpt.config.num_tokens == 65
    assert ckpt.family == "DeiT-III, timm deit3_small_patch16_224"
    z = peer_npz(DEIT3)
    trace = {}
    model_token.forward(ckpt.params, z["inputs"][:2], ckpt.config, trace)
    for key in ("patch_embed", "blocks.0", "blocks.1", "blocks.2"):
        assert np.abs(trace[key] - z[f"trace.{key}"]).max() < 1e-5, key


@pytest.mark.shared
@pytest.mark.parametrize("name, family", [(VIT, "DeiT / ViT, timm vit_tiny_patch16_224"),
                                          (HF_VIT, "DeiT / ViT, Hugging Face ViT"),
                                          (HF_DEIT, "DeiT (distilled), Hugging Face DeiT")])
def test_vit_families_are_named(name, family):
    ckpt = load_checkpoint(PEER_DIR / name)
    assert ckpt.family == family
    if name == HF_VIT:   # no distillation token, HF's LayerNorm eps, no pooler
        assert not ckpt.config.distilled and ckpt.config.ln_eps == 1e-12 and ckpt.head_mode == "cls"


@pytest.mark.shared
def test_timm_vit_takes_its_augreg_normalisation_from_config_json():
    z = peer_npz(VIT)
    m = load_model(PEER_DIR / VIT)
    assert m.preprocess.mean == (0.5, 0.5, 0.5) and m.preprocess.std == (0.5, 0.5, 0.5)
    assert np.array_equal(m.preprocess.images(photos(z["images"])), z["inputs"])


@pytest.mark.shared
@pytest.mark.parametrize("name", [HF_VIT, HF_DEIT])
def test_hf_processor_pixels(name):
    """The arithmetic after the resize is bit-exact (the processor's uint8 levels, recovered from its output,
    go through hf_rescale_normalize to the same float32); Pillow's resize differs from torchvision's by one
    uint8 level at a few pixels, which moves the logits by ~1e-4 at most."""
    z = peer_npz(name)
    m = load_model(PEER_DIR / name)
    pp = m.preprocess
    assert pp.kind == "hf" and pp.name.endswith("preprocessor_config.json")
    f = pp.hf["rescale_factor"]
    levels = np.rint(z["inputs"].astype(np.float64) * 0.5 / f + 0.5 / f)           # mean = std = 0.5 here
    again = np.stack([hf_rescale_normalize(u.transpose(1, 2, 0).astype(np.uint8), pp.hf, pp.mean, pp.std)
                      for u in levels])
    assert np.array_equal(again, z["inputs"])
    ours = pp.images(photos(z["images"]))
    diff = np.abs(ours - z["inputs"])
    assert diff.max() <= 2 * f + 1e-6 and (diff > 1e-6).mean() < 1e-3              # one level, rarely
    assert np.abs(m.logits(ours) - z["logits"]).max() < 5e-4


@pytest.mark.shared
def test_hf_deit_processor_resizes_to_256_then_crops_224():
    pp = load_model(PEER_DIR / HF_DEIT).preprocess
    assert pp.hf["size"] == (256, 256) and pp.hf["crop_size"] == (224, 224) and pp.interpolation == "bicubic"
    assert pp.mean == pp.std == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- non-trivial weights, independent algebra

@pytest.mark.parametrize("cfg", [TINY3, TINY3.replace(distilled=True), TINY3.replace(layer_scale=False),
                                 TINY3.replace(no_embed_class=False)])
def test_token_and_conv_forms_agree_in_float64(cfg):
    p = nontrivial(cfg, 1)
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32))
    assert np.abs(model_token.forward(p, x, cfg) - model_conv.forward(token_to_conv(p), x, cfg)).max() < 1e-11


def test_layer_scale_is_a_per_channel_scale_of_proj_and_fc2():
    """A DeiT-III equals the plain DeiT whose attn.proj and mlp.fc2 rows (and biases) are scaled by gamma and
    whose position embedding has a zero row for the class token (so the class token gets nothing added)."""
    p = nontrivial(TINY3, 3)
    plain = TINY3.replace(layer_scale=False, no_embed_class=False)
    q = {k: v for k, v in p.items() if not k.endswith(".gamma")}
    for i in range(TINY3.depth):
        for conv, ls in (("attn.proj", "ls1"), ("mlp.fc2", "ls2")):
            g = p[f"blocks.{i}.{ls}.gamma"]
            q[f"blocks.{i}.{conv}.weight"] = g[:, None] * p[f"blocks.{i}.{conv}.weight"]
            q[f"blocks.{i}.{conv}.bias"] = g * p[f"blocks.{i}.{conv}.bias"]
    q["pos_embed"] = np.concatenate([np.zeros((1, 1, 48)), p["pos_embed"]], axis=1)
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32))
    want = model_token.forward(q, x, plain)
    assert np.abs(model_token.forward(p, x, TINY3) - want).max() < 1e-11
    assert np.abs(model_conv.forward(token_to_conv(p), x, TINY3) - want).max() < 1e-11
    dropped = {k: v for k, v in p.items() if not k.endswith(".gamma")}
    assert np.abs(model_token.forward(dropped, x, TINY3) - want).max() > 1e-3   # the test can fail


def test_conv_trace_records_proj_and_fc2_after_the_layer_scale():
    p = nontrivial(TINY3, 5)
    x = np.random.default_rng(6).standard_normal((1, 3, 32, 32))
    tr = {}
    model_conv.forward(token_to_conv(p), x, TINY3, tr)
    assert tr["embed"].shape == (1, 48, 1, 16) and tr["tokens"].shape == (1, 48, 1, 17)
    assert np.abs(tr["tokens"] + tr["blocks.0.attn.proj"] - tr["blocks.0.residual1"]).max() < 1e-12
    h = model_conv.conv2d(tr["blocks.0.mlp.gelu"], token_to_conv(p)["blocks.0.mlp.fc2.weight"], p["blocks.0.mlp.fc2.bias"])
    assert np.abs(h * p["blocks.0.ls2.gamma"].reshape(1, -1, 1, 1) - tr["blocks.0.mlp.fc2"]).max() < 1e-12


# ---------------------------------------------------------------- checkpoint layouts and refusals

def test_official_deit3_pth_layout(tmp_path):
    """facebookresearch/deit's release files: torch.save({'model': state_dict}), layer scales named gamma_1/2."""
    p = {k: v.astype(np.float32) for k, v in nontrivial(TINY3, 7).items()}
    official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in p.items()}
    torchfile.save_zip(tmp_path / "deit_3_tiny.pth", {"model": torchfile.state_dict(official)})
    ckpt = load_checkpoint(tmp_path / "deit_3_tiny.pth", num_heads=3)
    assert ckpt.config == TINY3 and ckpt.family == "DeiT-III, timm names"
    assert all(np.array_equal(ckpt.params[k], v) for k, v in p.items()) and ckpt.params.keys() == p.keys()


def test_deit3_hub_layout_and_bare_state_dict(tmp_path):
    p = random_params(TINY3, rng=8)
    hub = write_dir(tmp_path / "hub", p, timm_config_json(TINY3, "deit3_small_patch16_224.fb_in22k_ft_in1k"))
    assert load_checkpoint(hub).config == TINY3
    assert load_checkpoint(write_dir(tmp_path / "bare", p), num_heads=3).config == TINY3   # from the tensors
    plain = {k: v for k, v in p.items() if not k.endswith(".gamma")}
    with pytest.raises(CheckpointError, match="missing: blocks.0.ls1.gamma, blocks.0.ls2.gamma"):
        load_checkpoint(write_dir(tmp_path / "nols", plain, timm_config_json(TINY3, "deit3_small_patch16_224")))


def test_presets_know_deit3_and_plain_vit():
    assert preset("deit3_base_patch16_384.fb_in22k_ft_in1k") == DeiTConfig(img_size=384, embed_dim=768, num_heads=12,
                                                                           layer_scale=True, no_embed_class=True)
    assert preset("vit_base_patch16_224.augreg2_in21k_ft_in1k") == DeiTConfig(embed_dim=768, num_heads=12)
    assert preset("deit3_huge_patch14_224").patch_size == 14 and preset("vit_small_patch32_384").grid == 12


def test_hf_vit_names_and_config(tmp_path):
    cfg = DeiTConfig(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4, ln_eps=1e-12)
    p = random_params(cfg, rng=9)
    names = to_hf_names(p, prefix="vit.")
    assert "vit.embeddings.position_embeddings" in names and "classifier.weight" in names
    (tmp_path / "hf").mkdir()
    write_safetensors(tmp_path / "hf" / "model.safetensors", names)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({
        "model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 128, "layer_norm_eps": 1e-12, "qkv_bias": True,
        "num_labels": 4}))
    ckpt = load_checkpoint(tmp_path / "hf")
    assert ckpt.config == cfg and all(np.array_equal(ckpt.params[k], v) for k, v in p.items())


def _timm_with(p: dict, **extra) -> dict:
    return {**p, **{k: np.zeros(s, np.float32) for k, s in extra.items()}}


@pytest.mark.parametrize("change, feature", [
    (lambda p: _timm_with({k: v for k, v in p.items() if not k.startswith("norm.")}, **{"fc_norm.weight": (48,),
                                                                                    "fc_norm.bias": (48,)}),
     "fc_norm (global average pooling)"),
    (lambda p: _timm_with(p, reg_token=(1, 4, 48)), "register tokens"),
    (lambda p: _timm_with(p, **{"blocks.0.attn.relative_position_bias_table": (49, 3)}), "relative position"),
    (lambda p: _timm_with(p, **{"head.pre_logits.fc.weight": (48, 48)}), "pre-logits layer"),
    (lambda p: _timm_with(p, **{"norm_pre.weight": (48,)}), "pre-norm"),
    (lambda p: {k: v for k, v in p.items() if k != "cls_token"}, "no class token"),
])
def test_vit_features_refvit_does_not_compute_are_named(tmp_path, change, feature):
    p = random_params(TINY3.replace(layer_scale=False, no_embed_class=False), rng=10)
    with pytest.raises(CheckpointError, match=re.escape(feature) + ".*which refvit does not compute"):
        load_checkpoint(write_dir(tmp_path / "m", change(p)), num_heads=3)


@pytest.mark.parametrize("arch, feature", [("vit_base_patch16_reg4_gap_256", "global average pooling"),
                                           ("vit_base_patch16_clip_224.openai", "pre-norm"),
                                           ("vit_so400m_patch14_siglip_224", "without a class token")])
def test_vit_architectures_with_other_features_are_named(tmp_path, arch, feature):
    cfg = TINY3.replace(layer_scale=False, no_embed_class=False)
    path = write_dir(tmp_path / "m", random_params(cfg, rng=11), timm_config_json(cfg, arch))
    with pytest.raises(CheckpointError, match=f"architecture {arch} is a ViT with .*{feature}"):
        load_checkpoint(path)


# ---------------------------------------------------------------- Hugging Face preprocessing as data

VIT_PROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                 "image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2,
                 "rescale_factor": 1 / 255, "size": {"height": 32, "width": 32}}


def test_hf_processor_is_read_recorded_and_selectable(tmp_path):
    pp = from_hf_processor(VIT_PROCESSOR)
    assert pp.kind == "hf" and pp.input_size == 32 and pp.interpolation == "bilinear" and pp.hf["size"] == (32, 32)
    assert Preprocess.from_dict(json.loads(json.dumps(pp.to_dict()))) == pp        # as quantized files record it
    assert "hf" not in PRESETS["imagenet"].to_dict()                                 # other pipelines unchanged
    (tmp_path / "pp.json").write_text(json.dumps(VIT_PROCESSOR))
    assert resolve_preprocess(str(tmp_path / "pp.json")).hf == pp.hf
    hf = resolve_preprocess("hf").for_model(32)
    assert hf.hf["size"] is None and hf.size == 32 and hf.mean == (0.5, 0.5, 0.5)
    shortest = from_hf_processor({"size": {"shortest_edge": 40}, "do_center_crop": True,
                                  "crop_size": {"height": 32, "width": 32}, "resample": 3})
    img = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)   # H 50, W 80
    from PIL import Image
    out = shortest(Image.fromarray(img))
    resized = np.asarray(Image.fromarray(img).resize((64, 40), Image.BICUBIC))       # short side 40, long int(40*80/50)
    top, left = 4, 16
    want = (resized[top:top + 32, left:left + 32].astype(np.float32).transpose(2, 0, 1) - np.float32(127.5)) \
        / np.float32(127.5)
    assert np.array_equal(out, want)


@pytest.mark.parametrize("change, message", [
    ({"crop_pct": 0.9}, "'crop_pct' is not understood by refvit"),
    ({"size": {"height": 32, "width": 48}}, "makes 48x32 .* square ones"),
    ({"resample": 7}, "resample must be one of PIL's codes"),
    ({"image_processor_type": "CLIPImageProcessor"}, "'CLIPImageProcessor' is not supported"),
    ({"do_center_crop": True}, "no crop_size"),
])
def test_bad_hf_processors_are_named(change, message):
    with pytest.raises(PreprocessError, match=message):
        from_hf_processor(VIT_PROCESSOR | change)


def test_pretrained_cfg_wins_over_a_processor_file_and_says_so(tmp_path, capsys):
    cfg = TINY3
    d = write_dir(tmp_path / "m", random_params(cfg, rng=12), timm_config_json(cfg, "deit3_small_patch16_224"))
    (d / "preprocessor_config.json").write_text(json.dumps(VIT_PROCESSOR))
    m = load_model(d)
    assert m.preprocess.name == "pretrained_cfg" and "preprocessor_config.json not used" in m.preprocess_note
    (d / "config.json").unlink()
    assert load_model(d, num_heads=3).preprocess.kind == "hf"


# ---------------------------------------------------------------- the integer model

@pytest.fixture(scope="module")
def deit3_int():
    p = nontrivial(TINY3, 13)
    calib = np.random.default_rng(14).standard_normal((6, 3, 32, 32)).astype(np.float32)
    return p, calib


@pytest.mark.parametrize("scheme", list(G.SCHEMES))
def test_integer_deit3_tracks_float_in_every_scheme(deit3_int, scheme):
    p, calib = deit3_int
    pc = token_to_conv({k: v.astype(np.float32) for k, v in p.items()})
    qm = quantize(pc, TINY3, [calib], head_mode="cls", method="max", scheme=G.SCHEMES[scheme])
    ops = {op.name: op for op in qm.graph}
    assert ops["embed"].inputs == {"a": "patch_embed"} and ops["tokens"].inputs == {"patches": "embed"}
    logits, scale = int_model.logits_int8_model(qm, calib)
    ref = model_conv.forward(pc, calib, TINY3)
    assert np.corrcoef(logits.ravel() * scale, ref.ravel())[0, 1] > 0.97
    no_ls = quantize({k: v for k, v in pc.items() if not k.endswith(".gamma")}, TINY3.replace(layer_scale=False),
                     [calib], head_mode="cls", method="max", scheme=G.SCHEMES[scheme])
    assert np.corrcoef(int_model.logits_int8_model(no_ls, calib)[0].ravel(), ref.ravel())[0, 1] < \
        np.corrcoef(logits.ravel(), ref.ravel())[0, 1]


def test_conformance_block_and_model_cases_on_deit3(deit3_int):
    p, calib = deit3_int
    qm = quantize(token_to_conv({k: v.astype(np.float32) for k, v in p.items()}), TINY3, [calib],
                  head_mode="cls", method="max")
    xq = int_model.quantize_input(qm, calib[:2])
    trace = int_model.Trace()
    logits = int_model.forward_int(qm, xq, trace)
    block = G.block_graph(qm.graph, 0)
    consts = {c: qm.tensors[f"blocks.0.{c}" if f"blocks.0.{c}" in qm.tensors else c]
              for c in G.required_constants(block) if c not in G.BOUNDARY_CONSTANTS}
    cases = [Case("deit3_block", "block", {"x": trace.tensors["tokens"], "constants": consts},
                  {"graph": [op.to_dict() for op in block]}, trace.tensors["blocks.0.residual2"]),
             Case("deit3_model", "model", {"x": xq, "constants": {k: qm.tensors[k] for k in
                                                                    G.required_constants(qm.graph)}},
                  {"graph": [op.to_dict() for op in qm.graph]}, logits)]
    for case in cases:
        check(RefvitDUT(), case)
        broken = dataclasses.replace(case, expected=case.expected + 1)
        with pytest.raises(AssertionError):
            check(RefvitDUT(), broken)


@pytest.mark.shared
def test_golden_and_check_on_deit3(tmp_path, capsys):
    d = write_dir(tmp_path / "m", random_params(TINY3, rng=15),
                  timm_config_json(TINY3, "deit3_small_patch16_224", crop_pct=1.0))
    image = str(photos(["imagenet_00_243.jpg"])[0])
    assert main(["quantize", "--weights", str(d), "--calib", image, "--out", str(tmp_path / "q.safetensors"),
                 "--quiet"]) == 0
    assert main(["golden", "--model", str(tmp_path / "q.safetensors"), "--image", image, "--out",
                 str(tmp_path / "g")]) == 0
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["input"]["preprocess"]["name"] == "pretrained_cfg"
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in (tmp_path / "g").rglob("*"):
        if f.is_file():
            target = copy / f.relative_to(tmp_path / "g")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    capsys.readouterr()
    assert main(["check", str(tmp_path / "g"), str(copy)]) == 0
    assert "PASS" in capsys.readouterr().out


def test_tosa_reading_of_deit3_equals_refvit(deit3_int):
    from refvit import export_tosa as E
    from tosa_reference import run_program
    p, calib = deit3_int
    qm = quantize(token_to_conv({k: v.astype(np.float32) for k, v in p.items()}), TINY3, [calib],
                  head_mode="cls", method="max", scheme=G.SCHEMES["tosa-int32"])
    x = int_model.quantize_input(qm, calib[:1])
    tr = G.Trace()
    G.run_graph(qm.graph, qm.tensors, x, tr)
    results = run_program(E.export_tosa(qm, batch=1, outputs="all"), x)
    assert all(np.array_equal(results[n], tr.tensors[n]) for n in results) and "tokens" in results


@pytest.mark.slow
def test_iree_runs_deit3_bit_exact(deit3_int):
    why = "IREE is not installed (pip install 'refvit[tosa]'): the DeiT-III cross-check by IREE is skipped"
    ic, ir = pytest.importorskip("iree.compiler", reason=why), pytest.importorskip("iree.runtime", reason=why)
    from refvit import export_tosa as E
    p, calib = deit3_int
    qm = quantize(token_to_conv({k: v.astype(np.float32) for k, v in p.items()}), TINY3, [calib],
                  head_mode="cls", method="max", scheme=G.SCHEMES["tosa-int32"])
    x = int_model.quantize_input(qm, calib[:1])
    vmfb = ic.compile_str(E.export_tosa(qm, batch=1).to_mlir("deit3"), target_backends=["llvm-cpu"],
                          input_type="tosa", extra_args=["--iree-llvmcpu-target-cpu=generic"])
    out = getattr(ir.load_vm_flatbuffer(vmfb, driver="local-sync"), "deit3")(x)
    assert np.array_equal(np.asarray(out).reshape(1, -1), int_model.forward_int(qm, x))


@pytest.mark.shared
def test_hf_pipeline_is_recorded_in_the_quantized_file_and_used_from_it(tmp_path, capsys):
    from refvit.qfile import load_quantized
    from refvit.resolve import resolve_model
    cfg = DeiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4, ln_eps=1e-12)
    d = tmp_path / "hf"
    d.mkdir()
    write_safetensors(d / "model.safetensors", to_hf_names(random_params(cfg, rng=16), prefix="vit."))
    (d / "config.json").write_text(json.dumps({"model_type": "vit", "num_attention_heads": 2, "layer_norm_eps": 1e-12}))
    (d / "preprocessor_config.json").write_text(json.dumps(VIT_PROCESSOR))
    image = str(photos(["imagenet_00_243.jpg"])[0])
    assert main(["quantize", "--weights", str(d), "--calib", image, "--out", str(tmp_path / "q.safetensors"),
                 "--quiet"]) == 0
    recorded = load_quantized(tmp_path / "q.safetensors").calibration["preprocess"]
    assert recorded["kind"] == "hf" and recorded["name"] == "preprocessor_config.json"
    assert recorded["hf"]["size"] == [32, 32] and recorded["interpolation"] == "bilinear"
    r = resolve_model(model=tmp_path / "q.safetensors")
    assert r.preprocess == from_hf_processor(VIT_PROCESSOR) and r.preprocess.kind == "hf"


def test_conformance_suite_has_deit3_block_and_model_cases():
    """The suite itself carries DeiT-III graphs (a team's DUT is tested on them, not only refvit's tests)."""
    import conformance
    names = {s.name for s in conformance.select("quick") if "deit3" in s.name}
    assert names == {"block_deit3_c48_h3_n17_b2_single", "model_deit3_c48_d2_h3_img32_p8_b2_single",
                     "model_deit3_c48_d2_h3_img32_p8_b2_double"}
    model = conformance.get_case("model_deit3_c48_d2_h3_img32_p8_b2_single")
    order = [op["name"] for op in model.params["graph"]][:3]
    assert order == ["patch_embed", "embed", "tokens"]                  # pos_embed on the patches, then the cls token
    block = conformance.get_case("block_deit3_c48_h3_n17_b2_single")
    assert block.inputs["x"].shape == (2, 48, 1, 17)                    # 16 patches + cls, no dist token
    for name in names:
        conformance.check(conformance.RefvitDUT(), name)
