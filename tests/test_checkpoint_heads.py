"""How load_checkpoint decides the number of attention heads (which tensor shapes do not tell), and timm's
hub config.json (architecture, model_args, pretrained_cfg) read as timm reads it.

Order: num_heads (--num-heads), arch (--arch), config.json, else the DeiT preset of the width (said so in
heads_note), else an error saying how to give them. The peer's custom timm model (width 64, 2 heads, in
config.json only) checks the whole path against timm's own logits."""
import json
import shutil

import numpy as np
import pytest

from ckptfiles import CUSTOM_CONFIG, CUSTOM_DIR, CUSTOM_NPZ, random_params, timm_config_json, tiny, write_dir
from refvit import model_token
from weights_tools import CheckpointError, load_checkpoint
from weights_tools.config import PRESETS, TIMM_ARCHS, ConfigError, preset

LOGITS_TOL = 1e-4  # float32, vs timm's logits


# ---------------------------------------------------------------- the peer's custom timm model

@pytest.fixture(scope="module")
def custom_npz(shared):
    with np.load(CUSTOM_NPZ) as z:
        return z["inputs"], z["logits"]


@pytest.mark.shared
def test_custom_timm_dir_config_from_config_json():
    ckpt = load_checkpoint(CUSTOM_DIR)
    assert ckpt.config == CUSTOM_CONFIG  # width 64: no preset, 2 heads from model_args
    assert ckpt.heads_note == "from config.json (model_args.num_heads)"
    assert ckpt.arch == "deit_tiny_patch16_224"  # timm's architecture; model_args override its defaults
    assert (ckpt.source, ckpt.head_mode, ckpt.file_format) == ("timm", "cls", "safetensors")
    assert ckpt.path == CUSTOM_DIR / "model.safetensors"
    raw = json.loads((CUSTOM_DIR / "config.json").read_text())["pretrained_cfg"]
    assert ckpt.pretrained_cfg == raw  # raw, for the preprocessing
    assert (ckpt.pretrained_cfg["input_size"], ckpt.pretrained_cfg["crop_pct"]) == ([3, 32, 32], 0.9)


@pytest.mark.shared
@pytest.mark.parametrize("weights", ["", "model.safetensors", "pytorch_model.bin"])
def test_custom_timm_logits_match_timm(custom_npz, weights):
    inputs, logits = custom_npz
    ckpt = load_checkpoint(CUSTOM_DIR / weights)
    assert ckpt.config.num_heads == 2
    err = float(np.abs(model_token.forward(ckpt.params, inputs, ckpt.config) - logits).max())
    print(f"\ncustom timm DeiT (w64 h2 l2) {weights or 'directory'} ({ckpt.file_format}), 20 images: "
          f"max abs logit error vs timm {err:.3g}")
    assert err < LOGITS_TOL


@pytest.mark.shared
def test_custom_timm_wrong_heads_are_detectable(custom_npz):
    """The error the issue is about: the same weights run with width/64 = 1 head, or 4, give other logits,
    by far more than the float32 error of the right heads."""
    inputs, logits = custom_npz
    ckpt = load_checkpoint(CUSTOM_DIR)
    right = float(np.abs(model_token.forward(ckpt.params, inputs, ckpt.config) - logits).max())
    for heads in (1, 4):
        wrong = load_checkpoint(CUSTOM_DIR, num_heads=heads)
        assert wrong.heads_note == "from --num-heads (config.json says 2)"
        err = float(np.abs(model_token.forward(wrong.params, inputs, wrong.config) - logits).max())
        print(f"\n{heads} heads instead of 2: max abs logit error {err:.3g} (2 heads: {right:.3g})")
        assert err > 1e-3 and err > 1000 * right


@pytest.mark.shared
def test_pytorch_model_bin_alone_in_a_directory(tmp_path):
    """A directory with pytorch_model.bin and config.json (no model.safetensors) is a checkpoint too."""
    for name in ("pytorch_model.bin", "config.json"):
        shutil.copy(CUSTOM_DIR / name, tmp_path / name)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == tmp_path / "pytorch_model.bin" and ckpt.file_format == "torch-zip"
    assert ckpt.config == CUSTOM_CONFIG
    reference = load_checkpoint(CUSTOM_DIR).params
    assert all(np.array_equal(ckpt.params[n], reference[n]) for n in reference) and ckpt.params.keys() == reference.keys()


# ---------------------------------------------------------------- the order: --num-heads, --arch, config.json, preset

def test_non_preset_width_without_heads_is_an_error_saying_how(tmp_path):
    for width, heads in ((96, 3), (128, 4)):  # the examples: width / 64 would be 1 and 2 heads
        path = write_dir(tmp_path / f"w{width}", random_params(tiny(embed_dim=width, num_heads=heads)))
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert str(path / "model.safetensors") in message and "\n" not in message
        assert f"width {width} is not a DeiT preset width (192, 384, 768)" in message
        assert f"--num-heads N (N divides {width})" in message and "--arch NAME" in message
        ckpt = load_checkpoint(path, num_heads=heads)
        assert ckpt.config.num_heads == heads and ckpt.heads_note == "from --num-heads"


@pytest.mark.parametrize("width, heads, name", [(192, 3, "deit_tiny"), (384, 6, "deit_small"), (768, 12, "deit_base")])
def test_preset_width_assumes_the_preset_and_says_so(tmp_path, width, heads, name):
    path = write_dir(tmp_path, random_params(tiny(embed_dim=width, num_heads=heads, depth=1, mlp_ratio=0.25)))
    ckpt = load_checkpoint(path)
    assert ckpt.config.num_heads == heads
    assert ckpt.heads_note == (f"assumed preset {name} (width {width} -> {heads} heads); "
                               "pass --num-heads or --arch if wrong")
    assert ckpt.arch is None and ckpt.pretrained_cfg is None


def test_arch_fixes_the_heads(tmp_path):
    path = write_dir(tmp_path, random_params(tiny(embed_dim=384, num_heads=6, depth=1, mlp_ratio=0.25)))
    for arch in ("deit_small_patch16_224", "deit_small_distilled_patch16_384", "deit_small_patch16_224.fb_in1k"):
        ckpt = load_checkpoint(path, arch=arch)
        assert ckpt.config.num_heads == 6 and ckpt.heads_note == f"from --arch {arch}" and ckpt.arch == arch
    assert load_checkpoint(path, arch="deit_small_patch16_224", num_heads=6).heads_note == "from --num-heads"


@pytest.mark.parametrize("kwargs, pattern", [
    ({"arch": "deit_base_patch16_224"}, "--arch deit_base_patch16_224 is a width-768 model, the checkpoint's width is 384"),
    ({"arch": "deit_small_patch16_224", "num_heads": 4}, r"--num-heads 4 and --arch deit_small_patch16_224 \(6 heads\) disagree"),
    ({"arch": "resnet50"}, "unknown preset 'resnet50'; known: deit_base_distilled_patch16_224"),
    ({"arch": "vit_base_patch16_reg4_gap_256"}, "is a ViT with global average pooling .*, which refvit does not compute"),
    ({"arch": "vit_large_patch16_224"}, "--arch vit_large_patch16_224 is a width-1024 model"),
    ({"num_heads": 5}, r"embed_dim 384 is not divisible by num_heads 5 \(heads from --num-heads\)"),
    ({"num_heads": 0}, r"num_heads must be in \[1, 64\]"),
    ({"num_heads": 2.0}, "num_heads must be an integer, got 2.0"),
])
def test_bad_heads_or_arch_are_named(tmp_path, kwargs, pattern):
    path = write_dir(tmp_path, random_params(tiny(embed_dim=384, num_heads=6, depth=1, mlp_ratio=0.25)))
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(path, **kwargs)
    assert str(path) in str(info.value)


def test_config_json_heads_and_the_overrides(tmp_path):
    config = tiny(embed_dim=128, num_heads=4)
    path = write_dir(tmp_path, random_params(config), timm_config_json(config))
    ckpt = load_checkpoint(path)
    assert ckpt.config == config and ckpt.heads_note == "from config.json (model_args.num_heads)"
    over = load_checkpoint(path, num_heads=8)
    assert over.config.num_heads == 8 and over.heads_note == "from --num-heads (config.json says 4)"


def test_hf_config_json_heads(tmp_path):
    from weights_tools import to_hf_names
    config = tiny(embed_dim=96, num_heads=3, distilled=True, ln_eps=1e-12)
    hf = {"model_type": "deit", "image_size": 8, "patch_size": 4, "num_channels": 3, "hidden_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 192, "qkv_bias": True,
          "layer_norm_eps": 1e-12, "id2label": {str(i): str(i) for i in range(3)}}
    path = write_dir(tmp_path, to_hf_names(random_params(config)), hf)
    ckpt = load_checkpoint(path)
    assert ckpt.config == config and ckpt.heads_note == "from config.json (num_attention_heads)"
    assert ckpt.pretrained_cfg is None and ckpt.arch is None


# ---------------------------------------------------------------- timm's config.json, read as timm reads it

def test_architecture_defaults_then_model_args(tmp_path):
    """model_args without num_heads: the architecture's heads (timm builds deit_small_patch16_224(**model_args))."""
    config = tiny(embed_dim=384, num_heads=6, depth=1, mlp_ratio=0.25)
    cfg = timm_config_json(config, "deit_small_patch16_224", heads=False)
    ckpt = load_checkpoint(write_dir(tmp_path, random_params(config), cfg))
    assert ckpt.config == config
    assert ckpt.heads_note == "from config.json (architecture deit_small_patch16_224)"
    # ... and with a width the architecture's heads do not divide, timm itself could not build it:
    config = tiny(embed_dim=64, num_heads=2)
    cfg = timm_config_json(config, "deit_tiny_patch16_224", heads=False)
    with pytest.raises(CheckpointError, match=r"embed_dim 64 is not divisible by num_heads 3 \(heads from config.json "
                                              r"\(architecture deit_tiny_patch16_224\)\)"):
        load_checkpoint(write_dir(tmp_path / "b", random_params(config), cfg))


def test_hub_config_without_model_args(tmp_path):
    """timm's hub config.json for a stock model: the architecture and num_classes; here a 10-class
    deit_tiny_distilled_patch16_224 fine-tune (12 blocks of width 192: the architecture gives everything)."""
    config = preset("deit_tiny_distilled_patch16_224").replace(num_classes=10)
    cfg = timm_config_json(config, "deit_tiny_distilled_patch16_224.fb_in1k")
    del cfg["model_args"]
    cfg["pretrained_cfg"]["num_classes"] = 1000  # the top-level num_classes wins, as in timm
    ckpt = load_checkpoint(write_dir(tmp_path, random_params(config, scale=0.02), cfg))
    assert ckpt.config == config and ckpt.head_mode == "mean"
    assert ckpt.heads_note == "from config.json (architecture deit_tiny_distilled_patch16_224.fb_in1k)"


def test_old_timm_layout_without_pretrained_cfg(tmp_path):
    """timm's older config.json: the pretrained_cfg entries at the top level beside architecture."""
    config = tiny(embed_dim=128, num_heads=4)
    new = timm_config_json(config)
    old = {"architecture": new["architecture"], "num_features": 128, **new["pretrained_cfg"],
           "model_args": new["model_args"]}
    ckpt = load_checkpoint(write_dir(tmp_path, random_params(config), old))
    assert ckpt.config == config and ckpt.pretrained_cfg["input_size"] == [3, 8, 8]
    assert "architecture" not in ckpt.pretrained_cfg


def test_fixed_input_size_gives_img_size(tmp_path):
    config = tiny(embed_dim=128, num_heads=4, img_size=12)
    cfg = timm_config_json(config)
    del cfg["model_args"]["img_size"]
    assert load_checkpoint(write_dir(tmp_path, random_params(config), cfg)).config == config
    cfg["pretrained_cfg"]["fixed_input_size"] = False  # then the architecture's 224 stands: tensors disagree
    with pytest.raises(CheckpointError, match=r"wrong shape: pos_embed \(1, 10, 128\), expected \(1, 3137, 128\)"):
        load_checkpoint(write_dir(tmp_path / "b", random_params(config), cfg))


@pytest.mark.parametrize("args, ok", [
    ({"drop_path_rate": 0.1, "drop_rate": 0.0, "weight_init": "jax"}, True),   # training-only
    ({"class_token": True, "no_embed_class": False, "fc_norm": None, "reg_tokens": 0}, True),  # DeiT's values
    ({"class_token": False}, False),      # no class token
    ({"global_pool": "avg"}, False),      # mean-pooled head
    ({"reg_tokens": 4}, False),           # register tokens
    ({"act_layer": "relu"}, False),       # unknown: might change the network
])
def test_model_args_that_change_the_network_are_refused(tmp_path, args, ok):
    config = tiny(embed_dim=128, num_heads=4)
    cfg = timm_config_json(config)
    cfg["model_args"] |= args
    path = write_dir(tmp_path, random_params(config), cfg)
    if ok:
        assert load_checkpoint(path).config == config
    else:
        with pytest.raises(CheckpointError, match=rf"config.json: model_args.{next(iter(args))}"):
            load_checkpoint(path)


def test_presets_cover_timm_deit_architectures():
    assert set(TIMM_ARCHS) <= set(PRESETS)
    assert preset("deit_base_distilled_patch16_384.fb_in1k") == PRESETS["deit_base_distilled_patch16_384"]
    assert [PRESETS[a].num_heads for a in ("deit_tiny_patch16_224", "deit_small_patch16_224",
                                           "deit_base_patch16_224")] == [3, 6, 12]
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("resnet50")
