"""load_checkpoint: a .safetensors DeiT (timm or Hugging Face names) -> timm-named float32 params + config."""
from __future__ import annotations

import json
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refvit.config import ConfigError, DeiTConfig, infer_config

from . import CheckpointError
from .names import HF_PREFIX, detect_naming, hf_names_for, hf_to_timm
from .safetensors_io import read_safetensors

# 'cls': logits = head(cls token). 'mean': (head(cls) + head_dist(dist)) / 2, as timm distilled models and
# HF DeiTForImageClassificationWithTeacher do at inference.
HEAD_MODES = ("cls", "mean")
TIMM_LN_EPS = 1e-6
HF_LN_EPS = 1e-12
_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    config: DeiTConfig  # config.distilled: the token sequence carries a dist token
    params: dict        # timm names -> float32 arrays
    source: str         # 'timm' | 'hf'
    head_mode: str      # 'cls' | 'mean'
    path: Path          # the .safetensors file read


def _linear(name: str, n_out: int, n_in: int, bias: bool = True) -> dict:
    return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if bias else {})}


def _norm(name: str, width: int) -> dict:
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def expected_shapes(config: DeiTConfig, head_mode: str = "cls") -> dict:
    """timm name -> shape of every parameter a DeiT with this config and head mode has (tokens as (1, n, C))."""
    if head_mode not in HEAD_MODES:
        raise ConfigError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    if head_mode == "mean" and not (config.distilled and config.num_classes):
        raise ConfigError("head_mode 'mean' averages head(cls) and head_dist(dist): "
                          "it needs a distilled config with num_classes > 0")
    c, p = config.embed_dim, config.patch_size
    shapes = {"cls_token": (1, 1, c), **({"dist_token": (1, 1, c)} if config.distilled else {}),
              "pos_embed": (1, config.num_tokens, c), "patch_embed.proj.weight": (c, config.in_chans, p, p),
              "patch_embed.proj.bias": (c,)}
    for i in range(config.depth):
        b = f"blocks.{i}"
        shapes |= _norm(f"{b}.norm1", c) | _linear(f"{b}.attn.qkv", 3 * c, c, config.qkv_bias)
        shapes |= _linear(f"{b}.attn.proj", c, c) | _norm(f"{b}.norm2", c)
        shapes |= _linear(f"{b}.mlp.fc1", config.hidden_dim, c) | _linear(f"{b}.mlp.fc2", c, config.hidden_dim)
    shapes |= _norm("norm", c)
    if config.num_classes:
        shapes |= _linear("head", config.num_classes, c)
    if head_mode == "mean":
        shapes |= _linear("head_dist", config.num_classes, c)
    return shapes


@contextmanager
def _about(path):
    """Re-raise config and naming errors as CheckpointError naming the file."""
    try:
        yield
    except (ConfigError, CheckpointError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _locate(path: Path) -> tuple:
    """-> (the .safetensors file, the config.json beside it or None)."""
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path.parent}: directory holds no model.safetensors")
    config_json = path.parent / "config.json"
    return path, (config_json if config_json.is_file() else None)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read as JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(d).__name__}")
    if d.get("model_type", "deit") != "deit":
        raise CheckpointError(f"{path}: model_type is {d['model_type']!r}, not 'deit'")
    return d


def _json_int(path, d: dict, key: str) -> int:
    v = d[key]
    if isinstance(v, list) and len(v) == 2 and v[0] == v[1]:  # HF allows (h, w) sizes; we need square
        v = v[0]
    if not isinstance(v, int) or isinstance(v, bool):
        raise CheckpointError(f"{path}: {key} must be an integer, got {v!r}")
    return v


# HF config.json key -> DeiTConfig field, for the integer fields
_HF_INT_KEYS = (("image_size", "img_size"), ("patch_size", "patch_size"), ("num_channels", "in_chans"),
                ("hidden_size", "embed_dim"), ("num_hidden_layers", "depth"), ("num_attention_heads", "num_heads"))


def _hf_json_fields(path: Path, d: dict, has_head: bool) -> dict:
    """The DeiTConfig fields an HF config.json states (plus its raw intermediate_size)."""
    fields = {f: _json_int(path, d, k) for k, f in _HF_INT_KEYS if k in d}
    if "intermediate_size" in d:
        fields["intermediate_size"] = _json_int(path, d, "intermediate_size")
    if "qkv_bias" in d:
        if not isinstance(d["qkv_bias"], bool):
            raise CheckpointError(f"{path}: qkv_bias must be true or false, got {d['qkv_bias']!r}")
        fields["qkv_bias"] = d["qkv_bias"]
    if "layer_norm_eps" in d:
        eps = d["layer_norm_eps"]
        if not isinstance(eps, (int, float)) or isinstance(eps, bool):
            raise CheckpointError(f"{path}: layer_norm_eps must be a number, got {eps!r}")
        fields["ln_eps"] = float(eps)
    if has_head and isinstance(d.get("id2label"), dict):
        fields["num_classes"] = len(d["id2label"])
    elif has_head and "num_labels" in d:
        fields["num_classes"] = _json_int(path, d, "num_labels")
    return fields


_SHAPE_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "mlp_ratio", "qkv_bias", "num_classes")


def _hf_config(config_json, shapes: dict, num_heads, ln_eps) -> DeiTConfig:
    """config.json states the config; what it leaves out comes from the tensor shapes, so a config.json
    that disagrees with the tensors shows up as misshapen parameters. Every HF DeiT has a distillation
    token (even DeiTForImageClassification, which reads logits from the cls token only): distilled=True."""
    has_head = any(n.split(".")[0] in ("head", "head_dist") for n in shapes)
    stated = _hf_json_fields(config_json, _read_json(config_json), has_head) if config_json else {}
    intermediate = stated.pop("intermediate_size", None)
    if intermediate is not None:
        stated["mlp_ratio"] = None  # set once embed_dim is known
    if not has_head:
        stated["num_classes"] = 0
    if not set(_SHAPE_FIELDS) <= stated.keys():
        inferred = _infer(shapes, ln_eps=HF_LN_EPS, num_heads=num_heads).to_dict()
        stated = {k: inferred[k] for k in _SHAPE_FIELDS} | stated
    if intermediate is not None:
        stated["mlp_ratio"] = intermediate / stated["embed_dim"]
    if num_heads is not None or "num_heads" not in stated:
        stated["num_heads"] = num_heads if num_heads is not None else max(1, stated["embed_dim"] // 64)
    if ln_eps is not None or "ln_eps" not in stated:
        stated["ln_eps"] = ln_eps if ln_eps is not None else HF_LN_EPS
    return DeiTConfig(**stated, distilled=True)


def _infer(shapes: dict, *, ln_eps: float, num_heads) -> DeiTConfig:
    """infer_config, made robust to a damaged file so that validation can name what is wrong: a head_dist
    implies a dist token and a head of its size; depth is 1 + the highest index of a block holding more
    than half as many tensors as the fullest block (a block missing its qkv still counts, a stray tensor
    does not add blocks)."""
    head_dist = shapes.get("head_dist.weight")
    implied = {} if head_dist is None else {"dist_token": (1, 1, 0), "head.weight": head_dist}
    config = infer_config(implied | shapes, ln_eps=ln_eps, num_heads=num_heads)
    per_block = Counter(int(m.group(1)) for m in map(_BLOCK_INDEX.match, shapes) if m)
    fullest = max(per_block.values(), default=0)
    depth = 1 + max((i for i, n in per_block.items() if 2 * n > fullest), default=-1)
    return config.replace(depth=max(config.depth, depth))


def _fmt(shape) -> str:
    return str(tuple(int(d) for d in shape))


def _mismatches(params: dict, expected: dict, hf_prefix) -> list:
    """Each problem as 'kind: name, name, ...'; HF names are added to the missing ones from HF files."""
    teacher = "head_dist.weight" in expected

    def named(n):
        if hf_prefix is None:
            return n
        return f"{n} (HF {' + '.join(hf_names_for(n, teacher=teacher, prefix=hf_prefix))})"

    found = {
        "missing": [named(n) for n in expected if n not in params],
        "unexpected": [n for n in params if n not in expected],
        "wrong shape": [f"{n} {_fmt(params[n].shape)}, expected {_fmt(s)}"
                        for n, s in expected.items() if n in params and params[n].shape != s],
        "not floating point": [f"{n} ({params[n].dtype})" for n in params
                               if not np.issubdtype(params[n].dtype, np.floating)],
    }
    return [f"{kind}: {', '.join(names)}" for kind, names in found.items() if names]


def _describe(config: DeiTConfig, head_mode: str) -> str:
    return (f"img {config.img_size}, patch {config.patch_size}, dim {config.embed_dim}, depth {config.depth}, "
            f"{config.num_classes} classes, {'distilled' if config.distilled else 'not distilled'}, "
            f"head_mode {head_mode!r}")


def load_checkpoint(path, *, num_heads: int | None = None, ln_eps: float | None = None) -> Checkpoint:
    """Load a DeiT from a .safetensors file, or a directory holding model.safetensors (+ config.json).

    timm or HF names are detected and mapped to timm names; the config comes from an HF config.json when
    there is one, else from the shapes (heads default to embed_dim // 64; eps 1e-6 timm, 1e-12 HF).
    num_heads / ln_eps override both. Every missing, unexpected or misshapen parameter is reported by name
    in one CheckpointError."""
    file, config_json = _locate(Path(path))
    tensors, _ = read_safetensors(file)
    with _about(file):
        source = detect_naming(tensors)
        params = hf_to_timm(tensors) if source == "hf" else tensors
        shapes = {n: a.shape for n, a in params.items()}
        if source == "hf":
            config = _hf_config(config_json, shapes, num_heads, ln_eps)
        else:
            config = _infer(shapes, ln_eps=TIMM_LN_EPS if ln_eps is None else ln_eps, num_heads=num_heads)
        head_mode = "mean" if any(n.startswith("head_dist.") for n in params) else "cls"
        expected = expected_shapes(config, head_mode)
    hf_prefix = (HF_PREFIX if any(n.startswith(HF_PREFIX) for n in tensors) else "") if source == "hf" else None
    problems = _mismatches(params, expected, hf_prefix)
    if problems:
        raise CheckpointError(f"{file}: parameters do not match the DeiT config "
                              f"({_describe(config, head_mode)}): {'; '.join(problems)}")
    params = {n: a.astype(np.float32, copy=False) for n, a in params.items()}
    return Checkpoint(config=config, params=params, source=source, head_mode=head_mode, path=file)
