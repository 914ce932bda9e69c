"""Float DeiT in the token form (B, N, C), as timm's VisionTransformer / VisionTransformerDistilled.

DeiT-III (timm's `deit3_*`) as timm computes it: with `config.layer_scale` each branch is multiplied by its
layer scale (`blocks.i.ls1.gamma` after the attention, `ls2.gamma` after the MLP) before its residual add;
with `config.no_embed_class` the position embedding (1, Np, C) is added to the patch tokens before the
prefix tokens are prepended.

Pure functions over a dict of parameters keyed by timm's checkpoint names. Linear weights are
(out, in) as in the checkpoint. A dist token in the sequence comes from `config.distilled`; the
logits are the cls head alone, or the mean of head(cls) and head_dist(dist) when the parameters
hold `head_dist.*` (what timm and Hugging Face do at inference).
"""
from __future__ import annotations

import numpy as np

from .config import DeiTConfig
from .functional import attend, gelu, layer_norm
from .prune import prune_plan, select_float


def linear(x, w, b):  # x (..., in), w (out, in), b (out,) -> (..., out)
    y = x.reshape(-1, x.shape[-1]) @ w.T                                           # one GEMM: (rows, out)
    y += b                                                                         # numpy would loop over B
    return y.reshape(*x.shape[:-1], w.shape[0])


def patch_embed(p, x, cfg: DeiTConfig):  # x (B, 3, H, W) -> (B, Np, C)
    B, P, g = x.shape[0], cfg.patch_size, cfg.grid
    patches = x.reshape(B, cfg.in_chans, g, P, g, P).transpose(0, 2, 4, 1, 3, 5)  # (B, g, g, 3, P, P)
    patches = patches.reshape(B, g * g, cfg.in_chans * P * P)                      # (B, Np, 3*P*P)
    w = p["patch_embed.proj.weight"].reshape(cfg.embed_dim, -1)                    # (C, 3*P*P)
    return linear(patches, w, p["patch_embed.proj.bias"])                          # (B, Np, C)


def embed(p, x, cfg: DeiTConfig):  # x (B, 3, H, W) -> (B, N, C)
    tokens = patch_embed(p, x, cfg)                                                # (B, Np, C)
    B, C = tokens.shape[0], cfg.embed_dim
    prefix = [p["cls_token"]] + ([p["dist_token"]] if cfg.distilled else [])
    prefix = np.broadcast_to(np.concatenate(prefix, axis=1), (B, len(prefix), C))  # (B, 1|2, C)
    if cfg.no_embed_class:                                                         # DeiT-III: patches only
        return np.concatenate([prefix, tokens + p["pos_embed"]], axis=1)           # (B, N, C)
    return np.concatenate([prefix, tokens], axis=1) + p["pos_embed"]               # (B, N, C)


def layer_scale(p, name, h):  # h (B, N, C) -> h * gamma (C,), as timm's LayerScale; h itself without one
    return h * p[name] if name in p else h


def attention(p, pre, x, cfg: DeiTConfig, probs: bool = False):  # x (B, N, C) -> ((B, N, C), (B, Hh, N, N) | None)
    """The attention and, with probs, its probabilities (token pruning reads them)."""
    B, N, C = x.shape
    Hh, D = cfg.num_heads, cfg.head_dim
    qkv = linear(x, p[pre + "qkv.weight"], p.get(pre + "qkv.bias", 0))             # (B, N, 3C)
    q, k, v = qkv.reshape(B, N, 3, Hh, D).transpose(2, 0, 3, 1, 4)                 # 3 x (B, Hh, N, D) views
    o = np.empty((B, N, Hh, D), x.dtype)                                           # heads side by side
    a = attend(q * np.asarray(D ** -0.5, x.dtype), k.transpose(0, 1, 3, 2), v,     # q scaled as timm
               o.transpose(0, 2, 1, 3), probs)                                     # (B, Hh, N, N) | None
    return linear(o.reshape(B, N, C), p[pre + "proj.weight"], p[pre + "proj.bias"]), a


def mlp(p, pre, x):  # x (B, N, C) -> (B, N, C)
    h = gelu(linear(x, p[pre + "fc1.weight"], p[pre + "fc1.bias"]))                # (B, N, 4C)
    return linear(h, p[pre + "fc2.weight"], p[pre + "fc2.bias"])


def block(p, i, x, cfg: DeiTConfig, keep_rate: float | None = None):  # x (B, N, C) -> (B, N', C)
    """One block; with a keep_rate, the token selection (refvit.prune) after the attention's residual add."""
    pre = f"blocks.{i}."
    ln = lambda y, name: layer_norm(y, p[pre + name + ".weight"], p[pre + name + ".bias"], cfg.ln_eps)
    h, a = attention(p, pre + "attn.", ln(x, "norm1"), cfg, keep_rate is not None) # (B, N, C), (B, Hh, N, N)
    x = x + layer_scale(p, pre + "ls1.gamma", h)
    if keep_rate is not None:
        x = select_float(x, a, keep_rate, cfg.num_prefix_tokens)                   # (B, P + k [+ 1], C)
    return x + layer_scale(p, pre + "ls2.gamma", mlp(p, pre + "mlp.", ln(x, "norm2")))


def head(p, x):  # x (B, N, C) final-normed -> logits (B, K)
    logits = linear(x[:, 0], p["head.weight"], p["head.bias"])                     # (B, K)
    if "head_dist.weight" in p:
        logits = (logits + linear(x[:, 1], p["head_dist.weight"], p["head_dist.bias"])) / 2
    return logits


def forward_features(p, x, cfg: DeiTConfig, trace: dict | None = None, prune=()):  # (B, 3, H, W) -> (B, N', C)
    rates = {s.block: s for s in prune_plan(prune, cfg.depth, cfg.num_patches)}
    x = embed(p, x, cfg)
    for i in range(cfg.depth):
        x = block(p, i, x, cfg, rates.get(i))
        if trace is not None:
            trace[f"blocks.{i}"] = x
    return layer_norm(x, p["norm.weight"], p["norm.bias"], cfg.ln_eps)


def forward(p, x, cfg: DeiTConfig, trace: dict | None = None, prune=()):  # (B, 3, H, W) -> (B, K)
    """Logits of the token-form DeiT; `p` in x's float dtype (see `cast_params`). `prune`: token pruning
    stages, ((block, keep_rate), ...) or 'BLOCK:KEEP,...' (refvit.prune); () runs every token."""
    if trace is not None:
        trace["patch_embed"] = patch_embed(p, x, cfg)
    return head(p, forward_features(p, x, cfg, trace, prune))


def cast_params(p: dict, dtype=np.float32) -> dict:
    """The parameters in `dtype`, prepared once for `forward`: the blocks' Linear weights (out, in) are stored
    column major, so the `w.T` of `linear` is a C-contiguous (in, out) matrix and its GEMM runs BLAS's NN
    kernel (6-8% faster than NT at 197 rows here, the same bits: tests/test_float_models.py). The heads keep
    row-major order (a B-row product goes to GEMV, whose two layouts round differently). Shapes and values
    are unchanged; C-ordered parameters work too."""
    return {k: (np.asfortranarray if _is_block_linear(k, v) else np.asarray)(v, dtype=dtype) for k, v in p.items()}


def _is_block_linear(name: str, v) -> bool:
    return name.startswith("blocks.") and name.endswith(".weight") and np.ndim(v) == 2
