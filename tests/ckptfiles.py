"""Small synthetic DeiT checkpoints for the checkpoint tests: random weights of a given config, written as
timm .safetensors files, in timm's hub layout (config.json with architecture / model_args / pretrained_cfg,
as timm.models._hub.save_for_hf writes it) or in Hugging Face's layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from refvit import models
from weights_tools import expected_shapes, write_safetensors
from refvit.config import DeiTConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
PEER = SHARED / "peer"
CUSTOM_DIR = PEER / "timm_custom_i32p4d64h2l2_seed0"      # timm hub layout, 2 heads stated in config.json only
CUSTOM_NPZ = PEER / "timm_custom_i32p4d64h2l2_seed0.npz"  # timm's inputs and logits for it
CUSTOM_CONFIG = DeiTConfig(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                           num_classes=5)
TIMM_TINY = PEER / "timm_deit_tiny_patch16_224_seed0.safetensors"
TIMM_TINY_PTH = PEER / "pth" / "timm_deit_tiny_patch16_224_seed0.pth"
CUSTOM_LEGACY_PTH = PEER / "pth" / "timm_custom_i32p4d64h2l2_seed0.legacy.pth"


def tiny(**changes) -> DeiTConfig:
    """A tiny DeiT (img 8, patch 4, width 8, 2 blocks) with changes."""
    base = dict(img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3)
    return DeiTConfig(**(base | changes))


def random_params(config: DeiTConfig, seed: int = 0, scale: float = 0.5) -> dict:
    """refvit.models.random_params (the one random-weights builder), weights scaled by scale / 0.5."""
    head_mode = "mean" if config.distilled and config.num_classes else "cls"
    return models.random_params(config, head_mode, seed, weight_gain=scale / 0.5)


def timm_config_json(config: DeiTConfig, architecture: str = "deit_tiny_patch16_224", *, heads: bool = True,
                     **pretrained) -> dict:
    """config.json as timm's save_for_hf writes it for a model made with model_args (cf. the peer's)."""
    args = {"num_classes": config.num_classes, "embed_dim": config.embed_dim, "depth": config.depth,
            "img_size": [config.img_size, config.img_size], "patch_size": config.patch_size,
            "mlp_ratio": config.mlp_ratio, "in_chans": config.in_chans, "global_pool": "token"}
    if heads:
        args["num_heads"] = config.num_heads
    pcfg = {"tag": "test", "custom_load": False, "input_size": [config.in_chans, config.img_size, config.img_size],
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": config.num_classes,
            "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head"} | pretrained
    return {"architecture": architecture, "num_classes": config.num_classes, "num_features": config.embed_dim,
            "global_pool": "token", "model_args": args, "pretrained_cfg": pcfg}


def write_dir(directory: Path, params: dict, config_json: dict | str | None = None,
              weights: str = "model.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / weights, params)
    if config_json is not None:
        text = config_json if isinstance(config_json, str) else json.dumps(config_json)
        (directory / "config.json").write_text(text)
    return directory
