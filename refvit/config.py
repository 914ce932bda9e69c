"""DeiT configuration: a frozen dataclass, the named presets, and inference from tensor shapes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration that cannot describe a DeiT (bad sizes, inconsistent shapes)."""


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

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.hidden_dim <= 0:
            raise ConfigError(f"mlp_ratio {self.mlp_ratio} gives no hidden units")
        if not self.ln_eps > 0:
            raise ConfigError(f"ln_eps must be > 0, got {self.ln_eps}")

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
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return int(round(self.embed_dim * self.mlp_ratio))  # round: 49 * (1/49) is 0.999...

    def replace(self, **changes) -> "DeiTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)


_WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _presets() -> dict:
    out = {}
    for size, (width, heads) in _WIDTHS.items():
        for img in (224, 384):
            for distilled in (False, True):
                name = f"deit_{size}{'_distilled' if distilled else ''}_patch16_{img}"
                out[name] = DeiTConfig(img_size=img, embed_dim=width, num_heads=heads, distilled=distilled)
    return out


PRESETS: dict = _presets()


def preset(name: str) -> DeiTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def infer_config(shapes: dict, ln_eps: float = 1e-6, num_heads: int | None = None) -> DeiTConfig:
    """Infer a DeiTConfig from the shapes of a checkpoint in timm names.

    `shapes` maps timm parameter names to shape tuples. The number of heads cannot be read from
    shapes: pass it when known (Hugging Face config.json), otherwise it is head_dim 64 as in every
    DeiT preset (embed_dim // 64, at least 1).
    """
    def need(key):
        if key not in shapes:
            raise ConfigError(f"cannot infer config: missing key {key!r}")
        return tuple(shapes[key])

    c, in_chans, p, p2 = need("patch_embed.proj.weight")
    if p != p2:
        raise ConfigError(f"non-square patch {p}x{p2} in 'patch_embed.proj.weight' is not supported")
    distilled = "dist_token" in shapes
    n_tokens = need("pos_embed")[1]
    n_patches = n_tokens - (2 if distilled else 1)
    grid = int(round(n_patches ** 0.5))
    if grid * grid != n_patches or n_patches <= 0:
        raise ConfigError(f"'pos_embed' has {n_tokens} tokens, which is not a square grid plus prefix tokens")
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in shapes:
        depth += 1
    if depth == 0:
        raise ConfigError("cannot infer config: no 'blocks.0.attn.qkv.weight'")
    hidden = need("blocks.0.mlp.fc1.weight")[0]
    num_classes = shapes["head.weight"][0] if "head.weight" in shapes else 0
    if num_heads is None:
        num_heads = max(1, c // 64)
    return DeiTConfig(
        img_size=grid * p, patch_size=p, in_chans=in_chans, embed_dim=c, depth=depth,
        num_heads=num_heads, mlp_ratio=hidden / c, qkv_bias="blocks.0.attn.qkv.bias" in shapes,
        ln_eps=ln_eps, num_classes=num_classes, distilled=distilled,
    )
