"""load_checkpoint: a DeiT checkpoint (.safetensors or torch.save file; timm or Hugging Face names; with or
without a config.json) -> timm-named float32 params, a config, and how its number of heads was decided.

Files are recognised by their content: torch's zip and legacy formats (weights_tools.pth), else
safetensors. A directory holds model.safetensors or pytorch_model.bin, and maybe config.json in one of two
layouts: Hugging Face transformers' (`model_type` "deit" or "vit", `hidden_size`, `num_attention_heads`, ...) or
timm's hub layout as `timm.models._hub.save_for_hf` writes it (`architecture`, `model_args`,
`pretrained_cfg`), read as timm reads it: the architecture's defaults, then pretrained_cfg's input size and
classes, the top-level num_classes, then model_args.

The number of attention heads is not in the tensor shapes. In order: num_heads (`--num-heads`), arch
(`--arch`, a DeiT preset or timm architecture name), config.json, and last the DeiT preset of the width
(192, 384, 768 -> 3, 6, 12 heads), said so in `heads_note`; any other width with nothing stating the heads is
a CheckpointError saying how to pass them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import (
    ARCHS, HEADS_BY_WIDTH, MAX_HIDDEN_DIM, MAX_IMG_SIZE, MAX_IN_CHANS, ConfigError, DeiTConfig, check_field, infer_config,
    preset, preset_for_width, unsupported_feature,
)

from .errors import CheckpointError
from .names import detect_naming, hf_names_for, hf_prefix_of, hf_to_timm, official_to_timm
from .pth import read_torch, torch_format
from .safetensors_io import read_safetensors

# 'cls': logits = head(cls token). 'mean': (head(cls) + head_dist(dist)) / 2, as timm distilled models and
# HF DeiTForImageClassificationWithTeacher do at inference.
HEAD_MODES = ("cls", "mean")
TIMM_LN_EPS = 1e-6
HF_LN_EPS = 1e-12
HF_MODEL_TYPES = ("deit", "vit")   # config.json model_type: DeiT (with a distillation token), ViT (without)
MAX_CONFIG_JSON_BYTES = 16 * 2**20   # config.json (Hugging Face's with 1000 labels is 46 kB)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # looked for in a directory, in this order
_BLOCK_INDEX = re.compile(r"blocks\.(\d{1,9})\.")
_LISTED = 12  # names shown per kind of mismatch


@dataclass(frozen=True, eq=False)
class Checkpoint:
    config: DeiTConfig  # config.distilled: the token sequence carries a dist token
    params: dict        # timm names -> float32 arrays
    source: str         # naming: 'timm' | 'hf'
    head_mode: str      # 'cls' | 'mean'
    path: Path          # the weights file read
    heads_note: str = ""                # how the number of heads was decided, for people
    pretrained_cfg: dict | None = None  # timm's pretrained_cfg from config.json (checked, otherwise raw)
    arch: str | None = None             # --arch, else config.json's timm architecture
    file_format: str = "safetensors"    # 'safetensors' | 'torch-zip' | 'torch-legacy'
    names_prefix: str = ""              # HF checkpoints: the backbone prefix ('deit.', 'vit.' or '')

    @property
    def family(self) -> str:
        """The model family, for people: the config's (DeiT, DeiT-III, ...) and where its names come from."""
        arch = (self.arch or "").split(".", 1)[0]
        if self.source == "hf":
            where = {"deit.": "Hugging Face DeiT", "vit.": "Hugging Face ViT"}.get(self.names_prefix, "Hugging Face")
        else:
            where = f"timm {arch}" if arch else "timm names"
        return f"{self.config.family}, {where}"


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
              "pos_embed": (1, config.num_pos_tokens, c), "patch_embed.proj.weight": (c, config.in_chans, p, p),
              "patch_embed.proj.bias": (c,)}
    for i in range(config.depth):
        b = f"blocks.{i}"
        shapes |= _norm(f"{b}.norm1", c) | _linear(f"{b}.attn.qkv", 3 * c, c, config.qkv_bias)
        shapes |= _linear(f"{b}.attn.proj", c, c) | _norm(f"{b}.norm2", c)
        shapes |= _linear(f"{b}.mlp.fc1", config.hidden_dim, c) | _linear(f"{b}.mlp.fc2", c, config.hidden_dim)
        if config.layer_scale:
            shapes |= {f"{b}.ls1.gamma": (c,), f"{b}.ls2.gamma": (c,)}
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


def _short(text, n: int = 120) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + "..."


def _brief(value) -> str:
    return _short(repr(value))


# ---------------------------------------------------------------- files

def _locate(path: Path) -> tuple:
    """-> (the weights file, the config.json beside it or None)."""
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise CheckpointError(f"{path}: directory holds no {' or '.join(WEIGHT_FILES)}")
        path = found[0]
    config_json = path.parent / "config.json"
    return path, (config_json if config_json.is_file() else None)


def read_tensors(path) -> tuple[dict, str]:
    """Any supported weights file -> ({name: array}, format), by its content: 'torch-zip', 'torch-legacy' or
    'safetensors'. A file named .pth/.pt/.bin/.ckpt that is neither torch format says so."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    kind = torch_format(path)
    if kind is not None or path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt"):
        return read_torch(path)
    return read_safetensors(path)[0], "safetensors"


def _read_json(path: Path) -> dict:
    size = path.stat().st_size
    if size > MAX_CONFIG_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is above the {MAX_CONFIG_JSON_BYTES}-byte limit for a "
                              "config.json")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read as JSON ({_short(e)})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: cannot read as JSON (nested too deeply)") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(d).__name__}")
    if d.get("model_type", "deit") not in HF_MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type is {_brief(d['model_type'])}, not 'deit' or 'vit' (refvit computes "
                              "DeiT and the plain ViT)")
    return d


@dataclass
class _Stated:
    """What a config.json says."""
    fields: dict                    # DeiTConfig fields (no num_heads)
    heads: int | None = None
    heads_note: str = ""
    arch: str | None = None
    pretrained_cfg: dict | None = None
    model_type: str | None = None   # Hugging Face's: 'deit' or 'vit'


def _square(path, key: str, v, pair: bool = True):
    """An int, or (pair: for a size) a [n, n] pair (both layouts allow (h, w) sizes; refvit needs square ones)."""
    if pair and isinstance(v, list) and len(v) == 2 and v[0] == v[1]:
        v = v[0]
    if not isinstance(v, int) or isinstance(v, bool):
        raise CheckpointError(f"{path}: {key} must be an integer, got {_brief(v)}")
    return v


def _field(path, key: str, name: str, v):
    """A DeiTConfig field's value from config.json key `key`, checked against its bound."""
    try:
        return check_field(name, v)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {key}: {e}") from None


# ---------------------------------------------------------------- Hugging Face config.json

# HF config.json key -> DeiTConfig field, for the integer fields
_HF_INT_KEYS = (("image_size", "img_size"), ("patch_size", "patch_size"), ("num_channels", "in_chans"),
                ("hidden_size", "embed_dim"), ("num_hidden_layers", "depth"), ("num_attention_heads", "num_heads"))


def _hf_json(path: Path, d: dict, has_head: bool) -> _Stated:
    """The DeiTConfig fields an HF config.json states."""
    fields = {f: _field(path, k, f, _square(path, k, d[k])) for k, f in _HF_INT_KEYS if k in d}
    if "intermediate_size" in d:
        hidden = _square(path, "intermediate_size", d["intermediate_size"])
        if not 1 <= hidden <= MAX_HIDDEN_DIM:
            raise CheckpointError(f"{path}: intermediate_size must be in [1, {MAX_HIDDEN_DIM}] (MAX_HIDDEN_DIM in "
                                  f"weights_tools.config), got {_brief(hidden)}")
        if "embed_dim" in fields:
            fields["mlp_ratio"] = _field(path, "intermediate_size", "mlp_ratio", hidden / fields["embed_dim"])
        else:
            fields["intermediate_size"] = hidden  # the ratio is set once the width is known
    if "qkv_bias" in d:
        fields["qkv_bias"] = _field(path, "qkv_bias", "qkv_bias", d["qkv_bias"])
    if "layer_norm_eps" in d:
        eps = d["layer_norm_eps"]
        if isinstance(eps, int) and not isinstance(eps, bool) and abs(eps) > 1e300:
            eps = math.inf
        fields["ln_eps"] = float(_field(path, "layer_norm_eps", "ln_eps", eps))
    if has_head and isinstance(d.get("id2label"), dict):
        fields["num_classes"] = _field(path, "id2label", "num_classes", len(d["id2label"]))
    elif has_head and "num_labels" in d:
        fields["num_classes"] = _field(path, "num_labels", "num_classes", _square(path, "num_labels", d["num_labels"]))
    heads = fields.pop("num_heads", None)
    return _Stated(fields, heads, "from config.json (num_attention_heads)" if heads is not None else "",
                   model_type=d.get("model_type"))


# ---------------------------------------------------------------- timm's config.json (save_for_hf)

_TIMM_INT_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "num_classes")
# model_args that do not change the eval-mode network (dropout rates, init, dynamic sizes at the native size)
_TIMM_IGNORED_ARGS = {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                      "drop_path_rate", "weight_init", "fix_init", "dynamic_img_size", "dynamic_img_pad"}
# model_args that would change the network: accepted only with the values refvit computes; -> the feature
_TIMM_DEIT_ARGS = {"class_token": ((True,), "no class token"), "global_pool": (("token",), "global average pooling"),
                   "reg_tokens": ((0,), "register tokens"), "pre_norm": ((False,), "a pre-norm (norm_pre)"),
                   "fc_norm": ((None, False), "fc_norm (a norm after pooling)"),
                   "qk_norm": ((False,), "query/key normalisation"), "final_norm": ((True,), "no final norm"),
                   "proj_bias": ((True,), "projections without bias")}
# model_args that are DeiTConfig fields under another name: init_values (a number: layer scale), no_embed_class


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_pretrained_cfg(path, cfg) -> dict:
    """timm's pretrained_cfg: the entries that drive preprocessing, checked against bounds; returned raw."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: pretrained_cfg must be an object, got {type(cfg).__name__}")
    for key in ("input_size", "test_input_size"):
        v = cfg.get(key)
        if v is None:
            continue
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(a, int) and not isinstance(a, bool)
                                                             for a in v)):
            raise CheckpointError(f"{path}: pretrained_cfg.{key} must be [channels, height, width], got {_brief(v)}")
        if not (1 <= v[0] <= MAX_IN_CHANS and 1 <= v[1] <= MAX_IMG_SIZE and 1 <= v[2] <= MAX_IMG_SIZE):
            raise CheckpointError(f"{path}: pretrained_cfg.{key} {v} is out of bounds (channels 1 to {MAX_IN_CHANS}, "
                                  f"sides 1 to {MAX_IMG_SIZE})")
    for key in ("crop_pct", "test_crop_pct"):
        v = cfg.get(key)
        if v is not None and not (_number(v) and 0 < v <= 1):
            raise CheckpointError(f"{path}: pretrained_cfg.{key} must be a number in (0, 1], got {_brief(v)}")
    for key in ("interpolation", "crop_mode"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, str) and len(v) <= 32):
            raise CheckpointError(f"{path}: pretrained_cfg.{key} must be a short string, got {_brief(v)}")
    channels = (cfg.get("input_size") or [None])[0]
    for key in ("mean", "std"):
        v = cfg.get(key)
        if v is None:
            continue
        if not (isinstance(v, list) and 1 <= len(v) <= MAX_IN_CHANS and all(_number(a) for a in v)):
            raise CheckpointError(f"{path}: pretrained_cfg.{key} must be a list of finite numbers, got {_brief(v)}")
        if channels is not None and len(v) not in (1, channels):
            raise CheckpointError(f"{path}: pretrained_cfg.{key} has {len(v)} values for {channels} channels")
        if key == "std" and min(v) <= 0:
            raise CheckpointError(f"{path}: pretrained_cfg.std must be positive, got {_brief(v)}")
    return dict(cfg)


def _timm_json(path: Path, d: dict) -> _Stated:
    """timm's hub config.json, read as timm builds the model from it: the architecture's defaults, then
    pretrained_cfg's input size (when fixed_input_size) and channels and num_classes, the top-level
    num_classes, then model_args."""
    arch = d["architecture"]
    if not (isinstance(arch, str) and arch):
        raise CheckpointError(f"{path}: architecture must be a timm model name, got {_brief(arch)}")
    if "pretrained_cfg" in d:
        pcfg = d["pretrained_cfg"]
    else:  # timm's older layout: the pretrained_cfg entries at the top level
        pcfg = {k: v for k, v in d.items() if k not in ("architecture", "num_features", "model_args")}
    pcfg = _check_pretrained_cfg(path, pcfg)
    model_args = d.get("model_args", {})
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{path}: model_args must be an object, got {type(model_args).__name__}")

    fields, heads, note = {}, None, ""
    name = arch.split(".", 1)[0]
    if unsupported_feature(name) and name not in ARCHS:
        raise CheckpointError(f"{path}: architecture {_short(arch, 60)} is a ViT with {unsupported_feature(name)}, "
                              "which refvit does not compute")
    if name in ARCHS:
        arch_cfg = ARCHS[name]
        fields = {k: v for k, v in dataclasses.asdict(arch_cfg).items() if k not in ("num_heads", "ln_eps")}
        heads, note = arch_cfg.num_heads, f"from config.json (architecture {_short(arch, 60)})"
    if pcfg.get("input_size") is not None:
        fields["in_chans"] = pcfg["input_size"][0]
        if pcfg.get("fixed_input_size") is True:
            fields["img_size"] = _field(path, "pretrained_cfg.input_size", "img_size",
                                        _square(path, "pretrained_cfg.input_size", pcfg["input_size"][1:]))
    for key, where in ((pcfg.get("num_classes"), "pretrained_cfg.num_classes"), (d.get("num_classes"), "num_classes")):
        if key is not None and not (isinstance(key, int) and not isinstance(key, bool) and key < 0):
            fields["num_classes"] = _field(path, where, "num_classes", key)  # timm ignores a negative default
    for key, v in model_args.items():
        where = f"model_args.{_short(key, 40)}"
        if key in _TIMM_INT_ARGS:                       # only the sizes may be (h, w) pairs in timm
            v = _field(path, where, key, _square(path, where, v, pair=key in ("img_size", "patch_size")))
            if key == "num_heads":
                heads, note = v, "from config.json (model_args.num_heads)"
            else:
                fields[key] = v
        elif key in ("mlp_ratio", "qkv_bias", "no_embed_class"):
            fields[key] = _field(path, where, key, v)
        elif key == "init_values":                      # timm's LayerScale: a number, or None for none
            if v is not None and not _number(v):
                raise CheckpointError(f"{path}: {where} must be a number or null, got {_brief(v)}")
            fields["layer_scale"] = v is not None
        elif key in _TIMM_DEIT_ARGS:
            values, feature = _TIMM_DEIT_ARGS[key]
            if not any(v is a or (type(v) is type(a) and v == a) for a in values):
                raise CheckpointError(f"{path}: {where} = {_brief(v)} is not supported: it means {feature}, which "
                                      f"refvit does not compute ({key} {' or '.join(map(json.dumps, values))})")
        elif key not in _TIMM_IGNORED_ARGS:
            raise CheckpointError(f"{path}: {where} is not understood by refvit (it may change the network; refvit "
                                  "implements DeiT)")
    return _Stated(fields, heads, note, arch, pcfg)


# ---------------------------------------------------------------- config and heads

_SHAPE_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "mlp_ratio", "qkv_bias", "num_classes",
                 "distilled", "layer_scale", "no_embed_class")


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


def _resolve_heads(width: int, num_heads, arch, stated: _Stated) -> tuple:
    """-> (heads, note), or (None, the error message) when nothing says and the width is no preset's."""
    said = f" (config.json says {stated.heads})" if stated.heads is not None else ""
    arch_cfg = None
    if arch is not None:
        arch_cfg = preset(arch)
        if arch_cfg.embed_dim != width:
            raise ConfigError(f"--arch {_short(arch, 60)} is a width-{arch_cfg.embed_dim} model, the checkpoint's "
                              f"width is {width}")
        if num_heads is not None and num_heads != arch_cfg.num_heads:
            raise ConfigError(f"--num-heads {_brief(num_heads)} and --arch {_short(arch, 60)} "
                              f"({arch_cfg.num_heads} heads) disagree")
    if num_heads is not None:
        return check_field("num_heads", num_heads), "from --num-heads" + said
    if arch_cfg is not None:
        return arch_cfg.num_heads, f"from --arch {_short(arch, 60)}" + said
    if stated.heads is not None:
        return stated.heads, stated.heads_note
    guess = preset_for_width(width)
    if guess is not None:
        heads = HEADS_BY_WIDTH[width]
        return heads, f"assumed preset {guess} (width {width} -> {heads} heads); pass --num-heads or --arch if wrong"
    return None, (f"the number of attention heads is unknown: the tensors do not tell it, nothing states it, and "
                  f"width {width} is not a DeiT preset width ({', '.join(map(str, HEADS_BY_WIDTH))}); pass "
                  f"--num-heads N (N divides {width}) or --arch NAME (a timm DeiT architecture), or put config.json "
                  "beside the weights")


def _config(stated: _Stated, shapes: dict, source: str, has_head: bool, ln_eps, hf_prefix: str = "") -> dict:
    """DeiTConfig fields but num_heads: what config.json states, the rest from the tensor shapes, so a
    config.json that disagrees with the tensors shows up as misshapen parameters. Every HF DeiT has a
    distillation token (even DeiTForImageClassification, which reads logits from the cls token only); no
    HF ViT has one; without a config.json or a backbone prefix the tensors tell."""
    fields = dict(stated.fields)
    hidden = fields.pop("intermediate_size", None)
    if source == "hf":
        kind = stated.model_type or {"deit.": "deit", "vit.": "vit"}.get(hf_prefix)
        if kind is not None:
            fields["distilled"] = kind == "deit"
        fields |= {"layer_scale": False, "no_embed_class": False}   # neither exists in transformers' DeiT / ViT
        if not has_head:
            fields["num_classes"] = 0
    if not set(_SHAPE_FIELDS) <= fields.keys() or hidden is not None:
        inferred = dataclasses.asdict(_infer(shapes, ln_eps=1.0, num_heads=1))
        fields = {k: inferred[k] for k in _SHAPE_FIELDS} | fields
    if hidden is not None:
        fields["mlp_ratio"] = check_field("mlp_ratio", hidden / fields["embed_dim"])
    if ln_eps is not None or "ln_eps" not in fields:
        fields["ln_eps"] = ln_eps if ln_eps is not None else (HF_LN_EPS if source == "hf" else TIMM_LN_EPS)
    return fields


# ---------------------------------------------------------------- validation

def _listed(names: list) -> str:
    shown = [_short(n, 200) for n in names[:_LISTED]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _fmt(shape) -> str:
    return str(tuple(int(d) for d in shape))


def _mismatches(params: dict, expected: dict, hf_prefix) -> list:
    """Each problem as 'kind: name, name, ...'; HF names are added to the missing ones from HF files."""
    teacher = "head_dist.weight" in expected

    def named(n):
        if hf_prefix is None:
            return n
        return f"{n} (HF {' + '.join(hf_names_for(n, teacher=teacher, prefix=hf_prefix) or (n,))})"

    found = {
        "missing": [named(n) for n in expected if n not in params],
        "unexpected": [n for n in params if n not in expected],
        "wrong shape": [f"{n} {_fmt(params[n].shape)}, expected {_fmt(s)}"
                        for n, s in expected.items() if n in params and params[n].shape != s],
        "not floating point": [f"{n} ({params[n].dtype})" for n in params
                               if not np.issubdtype(params[n].dtype, np.floating)],
    }
    return [f"{kind}: {_listed(names)}" for kind, names in found.items() if names]


def _non_finite(params: dict) -> str:
    """'' or a one-line account of the NaN and infinite weights, naming the first tensor that has any."""
    bad = []
    for name, a in params.items():
        finite = np.isfinite(a)
        if not finite.all():
            n_nan = int(np.isnan(a).sum())
            bad.append((name, n_nan, int(finite.size - finite.sum()) - n_nan))
    if not bad:
        return ""
    name, n_nan, n_inf = bad[0]
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    return (f"tensor {name!r} holds {n_nan} NaN and {n_inf} infinite values{more}; refvit does not run on "
            "non-finite weights (every output would be NaN)")


def _describe(config: DeiTConfig, head_mode: str) -> str:
    return (f"img {config.img_size}, patch {config.patch_size}, dim {config.embed_dim}, depth {config.depth}, "
            f"{config.num_classes} classes, {'distilled' if config.distilled else 'not distilled'}, "
            f"head_mode {head_mode!r}")


# Tensors (timm names) of ViT variants refvit does not compute -> the feature they mean.
_UNSUPPORTED_TENSORS = (
    (re.compile(r"fc_norm\."), "it has fc_norm (global average pooling)"),
    (re.compile(r"reg_token"), "it has register tokens (reg_token)"),
    (re.compile(r".*(relative_position|rel_pos)"), "it has a relative position embedding"),
    (re.compile(r"(head\.)?pre_logits\."), "it has a pre-logits layer"),
    (re.compile(r"norm_pre\."), "it has a pre-norm (norm_pre)"),
    (re.compile(r".*\.(q_norm|k_norm)\."), "it has query/key normalisation"),
    (re.compile(r"attn_pool\."), "it has attention pooling (a MAP head)"),
)


def unsupported_tensors(params: dict) -> str:
    """'' or what a ViT variant's tensors show that refvit does not compute (named for the message)."""
    for regex, feature in _UNSUPPORTED_TENSORS:
        hit = next((n for n in params if regex.match(n)), None)
        if hit is not None:
            return f"{feature}: tensor {_short(hit, 80)!r}"
    if "cls_token" not in params and "pos_embed" in params and "blocks.0.attn.qkv.weight" in params \
            and not any(n.startswith("head_dist") or n == "dist_token" for n in params):
        return "it has no class token (no cls_token: its head pools the patch tokens)"
    return ""


def load_checkpoint(path, *, num_heads: int | None = None, arch: str | None = None,
                    ln_eps: float | None = None) -> Checkpoint:
    """Load a DeiT from a .safetensors, .pth, .pt or .bin file, or a directory holding model.safetensors or
    pytorch_model.bin (+ config.json, Hugging Face's or timm's layout).

    timm or HF names are detected and mapped to timm names; the config comes from config.json when there is
    one, what it leaves out from the shapes (eps 1e-6 timm, 1e-12 HF). Heads: num_heads, else the preset
    `arch`, else config.json, else the DeiT preset of the width (said in heads_note), else CheckpointError.
    ln_eps overrides. Every missing, unexpected or misshapen parameter is reported by name in one
    CheckpointError; NaN or infinite weights are refused, naming the tensor."""
    file, config_json = _locate(Path(path))
    tensors, file_format = read_tensors(file)
    with _about(file):
        source = detect_naming(tensors)
        params = hf_to_timm(tensors) if source == "hf" else official_to_timm(tensors)
    feature = unsupported_tensors(params)
    if feature:
        raise CheckpointError(f"{file}: {feature}, which refvit does not compute (it computes DeiT, DeiT-III and the "
                              "plain ViT: class token, token pooling)")
    shapes = {n: a.shape for n, a in params.items()}
    has_head = any(n.split(".")[0] in ("head", "head_dist") for n in params)
    stated = _Stated({})
    if config_json is not None:
        d = _read_json(config_json)
        stated = _timm_json(config_json, d) if "architecture" in d else _hf_json(config_json, d, has_head)
    with _about(file):
        hf_prefix = hf_prefix_of(tensors) if source == "hf" else None
        fields = _config(stated, shapes, source, has_head, ln_eps, hf_prefix or "")
        heads, note = _resolve_heads(fields["embed_dim"], num_heads, arch, stated)
        try:
            config = DeiTConfig(**fields, num_heads=heads or 1)
        except ConfigError as e:
            raise ConfigError(f"{e} (heads {note})" if heads else str(e)) from None
        head_mode = "mean" if any(n.startswith("head_dist.") for n in params) else "cls"
        expected = expected_shapes(config, head_mode)
    problems = _mismatches(params, expected, hf_prefix)
    if problems:
        raise CheckpointError(f"{file}: parameters do not match the DeiT config "
                              f"({_describe(config, head_mode)}): {'; '.join(problems)}")
    if heads is None:
        raise CheckpointError(f"{file}: {note}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        params = {n: a.astype(np.float32, copy=False) for n, a in params.items()}
    bad = _non_finite(params)
    if bad:
        raise CheckpointError(f"{file}: {bad}")
    return Checkpoint(config=config, params=params, source=source, head_mode=head_mode, path=file,
                      heads_note=note, pretrained_cfg=stated.pretrained_cfg,
                      arch=arch if arch is not None else stated.arch, file_format=file_format, names_prefix=hf_prefix or "")
