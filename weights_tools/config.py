"""DeiT configuration (weights_tools.config, re-exported by refvit.config): a frozen dataclass with stated bounds, the named presets (and timm's DeiT architecture
names), and inference from tensor shapes."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

from .errors import RefvitError


class ConfigError(RefvitError):
    """A configuration that cannot describe a DeiT (bad sizes, inconsistent shapes)."""


# Bounds, checked by DeiTConfig before anything is derived or allocated. Generous for every DeiT and ViT
# published (ViT-22B: width 6144, depth 48, 48 heads, MLP 24576), small enough that a config.json saying
# depth 10**9 is refused at once instead of building a billion-entry parameter table.
MAX_IMG_SIZE = 4096          # img_size, pixels per side
MAX_PATCH_SIZE = 512         # patch_size (and at most img_size)
MAX_IN_CHANS = 16            # in_chans
MAX_EMBED_DIM = 8192         # embed_dim, the width C
MAX_DEPTH = 256              # depth, transformer blocks
MAX_NUM_HEADS = 64           # num_heads (and a divisor of embed_dim)
MAX_HIDDEN_DIM = 65536       # round(embed_dim * mlp_ratio), the MLP width
MAX_NUM_CLASSES = 100_000    # num_classes (0: no head)
MAX_NUM_PATCHES = 4096       # (img_size / patch_size) ** 2, e.g. 1024 px at patch 16, 256 px at patch 4
MAX_LN_EPS = 1.0             # 0 < ln_eps <= 1

_INT_BOUNDS = {  # field -> (min, max)
    "img_size": (1, MAX_IMG_SIZE), "patch_size": (1, MAX_PATCH_SIZE), "in_chans": (1, MAX_IN_CHANS),
    "embed_dim": (1, MAX_EMBED_DIM), "depth": (1, MAX_DEPTH), "num_heads": (1, MAX_NUM_HEADS),
    "num_classes": (0, MAX_NUM_CLASSES),
}
_BOUND_NAMES = {"img_size": "MAX_IMG_SIZE", "patch_size": "MAX_PATCH_SIZE", "in_chans": "MAX_IN_CHANS",
                "embed_dim": "MAX_EMBED_DIM", "depth": "MAX_DEPTH", "num_heads": "MAX_NUM_HEADS",
                "num_classes": "MAX_NUM_CLASSES"}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_bool(v) -> bool:
    return isinstance(v, (bool, np.bool_))


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 100 else text[:100] + "..."


def check_field(name: str, v):
    """Check one DeiTConfig field's type and bound (before any use of it); -> the value, numpy scalars made
    Python ones. ConfigError names the field, the value and the bound."""
    if name in _INT_BOUNDS:
        low, high = _INT_BOUNDS[name]
        if not _is_int(v):
            raise ConfigError(f"{name} must be an integer, got {_short(v)}")
        if not low <= v <= high:
            raise ConfigError(f"{name} must be in [{low}, {high}] ({_BOUND_NAMES[name]} in weights_tools.config), "
                              f"got {_short(v)}")
        return int(v)
    if name in ("qkv_bias", "distilled", "layer_scale", "no_embed_class"):
        if not _is_bool(v):
            raise ConfigError(f"{name} must be true or false, got {_short(v)}")
        return bool(v)
    if name in ("mlp_ratio", "ln_eps"):
        if not (_is_real(v) and math.isfinite(v)):
            raise ConfigError(f"{name} must be a finite number, got {_short(v)}")
        if name == "ln_eps" and not 0 < v <= MAX_LN_EPS:
            raise ConfigError(f"ln_eps must be in (0, {MAX_LN_EPS}] (MAX_LN_EPS in weights_tools.config), got {v}")
        if name == "mlp_ratio" and not 0 < v <= MAX_HIDDEN_DIM:
            raise ConfigError(f"mlp_ratio must be in (0, {MAX_HIDDEN_DIM}], got {v}")
        return v
    raise ConfigError(f"unknown config field {_short(name)}")


@dataclass(frozen=True)
class DeiTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 192          # C, the width
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6          # timm; Hugging Face DeiT uses 1e-12
    num_classes: int = 1000
    distilled: bool = False
    layer_scale: bool = False     # DeiT-III: blocks.i.ls1.gamma, ls2.gamma scale each branch before its add
    no_embed_class: bool = False  # DeiT-III: pos_embed (1, Np, C) on the patches only, before the prefix tokens

    def __post_init__(self):
        """Types first, then each field against its bound, then the relations: nothing is derived from a
        value before it is known to be in range (ConfigError names the field and the bound)."""
        for f in dataclasses.fields(self):
            v = check_field(f.name, getattr(self, f.name))
            if type(v) is not type(getattr(self, f.name)):
                object.__setattr__(self, f.name, v)  # numpy integers and bools -> int, bool (JSON-friendly)
        if not 1 <= self.hidden_dim <= MAX_HIDDEN_DIM:
            raise ConfigError(f"mlp_ratio {self.mlp_ratio} gives {self.hidden_dim} hidden units: must be in "
                              f"[1, {MAX_HIDDEN_DIM}] (MAX_HIDDEN_DIM in weights_tools.config)")
        if self.patch_size > self.img_size or self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_patches > MAX_NUM_PATCHES:
            raise ConfigError(f"img_size {self.img_size} at patch_size {self.patch_size} makes {self.num_patches} "
                              f"patches, above {MAX_NUM_PATCHES} (MAX_NUM_PATCHES in weights_tools.config)")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def num_tokens(self) -> int:  # N
        return self.num_patches + self.num_prefix_tokens

    @property
    def num_pos_tokens(self) -> int:  # the position embedding's tokens
        return self.num_patches if self.no_embed_class else self.num_tokens

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return int(round(self.embed_dim * self.mlp_ratio))  # round: 49 * (1/49) is 0.999...

    def replace(self, **changes) -> "DeiTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields; the DeiT-III ones only when set, so a DeiT's dict is what it always was."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in _OPTIONAL_FIELDS or v}

    @property
    def family(self) -> str:
        """For people: 'DeiT-III' (layer scale, position embedding without the class token), 'DeiT
        (distilled)', or 'DeiT / ViT' (the plain architecture both share)."""
        if self.layer_scale or self.no_embed_class:
            return "DeiT-III" if self.layer_scale and self.no_embed_class else "ViT with " + " and ".join(
                n for n, on in (("layer scale", self.layer_scale), ("no_embed_class", self.no_embed_class)) if on)
        return "DeiT (distilled)" if self.distilled else "DeiT / ViT"

    @classmethod
    def from_dict(cls, d: dict) -> "DeiTConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config is a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(map(str, unknown))}")
        return cls(**d)


_OPTIONAL_FIELDS = ("layer_scale", "no_embed_class")


# ---------------------------------------------------------------- presets and timm architecture names

WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # DeiT size -> (width, heads)
HEADS_BY_WIDTH = {width: heads for width, heads in WIDTHS.values()}


def _presets() -> dict:
    out = {}
    for size, (width, heads) in WIDTHS.items():
        for img in (224, 384):
            for distilled in (False, True):
                name = f"deit_{size}{'_distilled' if distilled else ''}_patch16_{img}"
                out[name] = DeiTConfig(img_size=img, embed_dim=width, num_heads=heads, distilled=distilled)
    return out


PRESETS: dict = _presets()
# The DeiT architectures timm defines (timm/models/deit.py); every one is a preset. PRESETS also has the
# tiny/small 384 ones timm does not define.
TIMM_ARCHS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384",
              "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
              "deit_base_distilled_patch16_224", "deit_base_distilled_patch16_384")

# DeiT-III (timm/models/deit.py `deit3_*`, the official release's `deit_*_patch16_LS`): layer scale and
# no_embed_class; size -> (patch, width, depth, heads) and its image sizes.
DEIT3_SIZES = {"small": (16, 384, 12, 6, (224, 384)), "medium": (16, 512, 12, 8, (224,)),
               "base": (16, 768, 12, 12, (224, 384)), "large": (16, 1024, 24, 16, (224, 384)),
               "huge": (14, 1280, 32, 16, (224,))}
DEIT3_ARCHS = {f"deit3_{size}_patch{p}_{img}": DeiTConfig(img_size=img, patch_size=p, embed_dim=c, depth=d, num_heads=h,
                                                           layer_scale=True, no_embed_class=True)
               for size, (p, c, d, h, imgs) in DEIT3_SIZES.items() for img in imgs}
# timm's plain ViTs (timm/models/vision_transformer.py: class token, token pooling, no layer scale): the same
# network as a non-distilled DeiT. size -> (width, depth, heads); (patch, img) pairs timm defines.
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
             "huge": (1280, 32, 16)}
_VIT_NAMES = {"tiny": ((16, 224), (16, 384)), "small": ((16, 224), (16, 384), (32, 224), (32, 384), (8, 224)),
              "base": ((16, 224), (16, 384), (32, 224), (32, 384), (8, 224)),
              "large": ((16, 224), (16, 384), (32, 224), (32, 384)), "huge": ((14, 224),)}
VIT_ARCHS = {f"vit_{size}_patch{p}_{img}": DeiTConfig(img_size=img, patch_size=p, embed_dim=VIT_SIZES[size][0],
                                                       depth=VIT_SIZES[size][1], num_heads=VIT_SIZES[size][2])
             for size, pairs in _VIT_NAMES.items() for p, img in pairs}
ARCHS: dict = {**PRESETS, **DEIT3_ARCHS, **VIT_ARCHS}   # every architecture name `preset` knows

# Markers in timm architecture names of ViT variants refvit does not compute -> the feature, for the message.
UNSUPPORTED_NAME_MARKERS = (("_gap", "global average pooling (fc_norm)"), ("_reg", "register tokens"),
                            ("siglip", "attention pooling without a class token"), ("_clip", "a pre-norm (norm_pre)"),
                            ("_rpn", "no class token (residual post-norm, average pooling)"),
                            ("relpos", "relative position"), ("_rope", "rotary (relative) position"),
                            ("_ncls", "no class token"), ("_xp_", "parallel blocks"), ("_18x2", "parallel blocks"),
                            ("_parallel", "parallel blocks"), ("_dinov2", "a DINOv2 head"), ("_mae", "global average pooling"))


def preset(name: str) -> DeiTConfig:
    """A named DeiT config: a PRESETS name or a timm architecture name (DeiT, DeiT-III `deit3_*`, plain ViT
    `vit_*`), with or without timm's pretrained tag ('deit_small_patch16_224.fb_in1k')."""
    if not isinstance(name, str):
        raise ConfigError(f"a preset name is a string, got {type(name).__name__}")
    base = name.split(".", 1)[0]
    if base in ARCHS:
        return ARCHS[base]
    feature = unsupported_feature(base)
    if feature:
        raise ConfigError(f"{name[:100]!r} is a ViT with {feature}, which refvit does not compute")
    raise ConfigError(f"unknown preset {name[:100]!r}; known: {', '.join(sorted(PRESETS))}, the timm DeiT-III "
                      "deit3_* and plain ViT vit_{tiny,small,base,large,huge}_patchP_IMG names")


def unsupported_feature(arch: str) -> str:
    """The feature a timm architecture name says refvit does not compute ('' if none is known)."""
    return next((feature for marker, feature in UNSUPPORTED_NAME_MARKERS if marker in arch), "")


def preset_for_width(width: int) -> str | None:
    """The DeiT size whose width this is ('deit_tiny' for 192), or None."""
    for size, (w, _) in WIDTHS.items():
        if w == width:
            return f"deit_{size}"
    return None


# ---------------------------------------------------------------- inference from tensor shapes

def _shape(shapes: dict, key: str, rank: int, what: str) -> tuple:
    if key not in shapes:
        raise ConfigError(f"cannot infer config: missing key {key!r}")
    shape = tuple(shapes[key])
    if len(shape) != rank:
        raise ConfigError(f"{key!r} has shape {shape}, expected rank {rank} {what}")
    return shape


def infer_config(shapes: dict, ln_eps: float = 1e-6, num_heads: int | None = None) -> DeiTConfig:
    """Infer a DeiTConfig from the shapes of a checkpoint in timm names.

    `shapes` maps timm parameter names to shape tuples. The number of heads cannot be read from
    shapes: pass it when known; otherwise it is head_dim 64 as in every DeiT preset (embed_dim // 64,
    at least 1) — weights_tools.load_checkpoint decides it and says how. Every shape is checked
    for its rank and every size against the bounds before it is used.
    """
    c, in_chans, p, p2 = _shape(shapes, "patch_embed.proj.weight", 4, "(width, channels, patch, patch)")
    if p != p2:
        raise ConfigError(f"non-square patch {p}x{p2} in 'patch_embed.proj.weight' is not supported")
    if not 1 <= c <= MAX_EMBED_DIM:
        raise ConfigError(f"'patch_embed.proj.weight' has shape {(c, in_chans, p, p2)}: width {c} is not in "
                          f"[1, {MAX_EMBED_DIM}] (MAX_EMBED_DIM in weights_tools.config)")
    distilled = "dist_token" in shapes
    n_tokens = _shape(shapes, "pos_embed", 3, "(1, tokens, width)")[1]
    n_patches = n_tokens - (2 if distilled else 1)
    no_embed_class = not _is_square(n_patches) and _is_square(n_tokens)   # DeiT-III: patches only
    n_patches = n_tokens if no_embed_class else n_patches
    if n_patches <= 0 or n_patches > MAX_NUM_PATCHES:
        raise ConfigError(f"'pos_embed' has {n_tokens} tokens: the patch grid must hold 1 to {MAX_NUM_PATCHES} "
                          "patches (MAX_NUM_PATCHES in weights_tools.config)")
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise ConfigError(f"'pos_embed' has {n_tokens} tokens, which is not a square grid (plus prefix tokens)")
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in shapes:
        depth += 1
    if depth == 0:
        raise ConfigError("cannot infer config: no 'blocks.0.attn.qkv.weight'")
    hidden = _shape(shapes, "blocks.0.mlp.fc1.weight", 2, "(hidden, width)")[0]
    num_classes = _shape(shapes, "head.weight", 2, "(classes, width)")[0] if "head.weight" in shapes else 0
    if num_heads is None:
        num_heads = max(1, c // 64)
    return DeiTConfig(
        img_size=grid * p, patch_size=p, in_chans=in_chans, embed_dim=c, depth=depth,
        num_heads=num_heads, mlp_ratio=hidden / c, qkv_bias="blocks.0.attn.qkv.bias" in shapes,
        ln_eps=ln_eps, num_classes=num_classes, distilled=distilled,
        layer_scale="blocks.0.ls1.gamma" in shapes, no_embed_class=no_embed_class,
    )


def _is_square(n: int) -> bool:
    return n >= 1 and math.isqrt(n) ** 2 == n

