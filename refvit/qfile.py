"""Quantized model files: a QuantizedModel as .safetensors (integer constants + float64 scales) with the
config, head mode, scheme, rounding mode and calibration in the metadata under the key 'refvit'."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from refvit.config import ConfigError, DeiTConfig
from refvit.intmath import ROUNDING_MODES
from refvit.quantize import QuantizedModel

from refvit.checkpoints import CheckpointError
from refvit.checkpoints.safetensors_io import read_safetensors, write_safetensors

FORMAT = "refvit-int8"
FORMAT_VERSION = 1


def save_quantized(qm: QuantizedModel, path) -> Path:
    path = Path(path)
    # safetensors' writer stores 0-d arrays as shape (1,): name them so loading restores them.
    scalars = sorted(k for k, v in qm.tensors.items() if np.ndim(v) == 0)
    meta = dict(qm.metadata(), format_version=FORMAT_VERSION, scalars=scalars)
    write_safetensors(path, qm.tensors, {"refvit": json.dumps(meta, sort_keys=True)})
    return path


def is_quantized_file(path) -> bool:
    try:
        _, meta = read_safetensors(path)
    except CheckpointError:
        return False
    return "refvit" in meta


def load_quantized(path) -> QuantizedModel:
    """Read a file written by `save_quantized`; every problem is a CheckpointError naming the file."""
    tensors, meta = read_safetensors(path)
    if "refvit" not in meta:
        raise CheckpointError(f"{path}: not a refvit quantized model (no 'refvit' metadata); "
                              f"quantize a float checkpoint with `python -m refvit quantize`")
    try:
        m = json.loads(meta["refvit"])
        if m.get("format") != FORMAT:
            raise ValueError(f"format is {m.get('format')!r}, expected {FORMAT!r}")
        if m.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {m.get('format_version')!r} is not {FORMAT_VERSION}")
        if m.get("rounding") not in ROUNDING_MODES:
            raise ValueError(f"rounding {m.get('rounding')!r} is not one of {ROUNDING_MODES}")
        cfg = DeiTConfig.from_dict(m["config"])
        for name in m.get("scalars", []):
            tensors[name] = tensors[name].reshape(())
        qm = QuantizedModel(cfg, m["head_mode"], m["rounding"], m.get("calibration", {}), tensors)
    except (ValueError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: bad refvit metadata: {e}") from None
    missing = sorted(set(required_constants(cfg)) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: quantized model lacks {len(missing)} constants: {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    return qm


def required_constants(cfg: DeiTConfig) -> list:
    """Names the integer forward reads (not the scales, which are for reporting)."""
    conv = ("weight", "bias", "multiplier", "shift")
    ln = conv + ("eps_int",)
    add = ("multiplier_a", "multiplier_b", "shift")
    names = ["input.scale", "exp_table", "prefix_tokens", "pos_embed", "logits.scale"]
    names += [f"patch_embed.{c}" for c in conv] + [f"embed.{c}" for c in add] + [f"norm.{c}" for c in ln]
    names += [f"head.{c}" for c in conv]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        for op in ("norm1", "norm2"):
            names += [f"{b}{op}.{c}" for c in ln]
        for op in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            names += [f"{b}{op}.{c}" for c in conv]
        for op in ("residual1", "residual2"):
            names += [f"{b}{op}.{c}" for c in add]
        names += [f"{b}attn.softmax.multiplier", f"{b}attn.softmax.shift", f"{b}attn.context.multiplier",
                  f"{b}attn.context.shift", f"{b}mlp.gelu.table"]
    return names
