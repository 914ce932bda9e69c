"""Float DeiT in the NCHW-conv form (B, C, 1, N): the restructuring of arXiv 2602.06300 for
accelerators that only run 4-D convolutions.

Every Linear is a 1x1 Conv2d (weight (out, in, 1, 1)), the patch embedding is a P x P conv with stride
P, LayerNorm is rebuilt from conv-friendly ops (channel mean as a 1x1 conv with weight 1/C, subtract,
square, 1x1 mean conv, add eps, rsqrt, multiply, then gamma/beta as a depthwise 1x1 conv), and
attention splits heads along C. Parameters keep timm's names, in the shapes made by
`weights_tools.convert.token_to_conv`; the same weights, no retraining. Activations are (B, C, H, W)
arrays held channels-last in memory (conv2d's output layout): a matter of speed, never of values.

DeiT-III as in model_token: the layer scale (C,) multiplies each branch per channel, and the trace records
`blocks.i.attn.proj` / `blocks.i.mlp.fc2` after it (the integer model folds it into those convs, docs/spec.md);
with no_embed_class the position embedding is added to the patches, recorded as `embed`, before the prefix.
"""
from __future__ import annotations

import numpy as np

from .config import DeiTConfig
from .functional import attend, gelu, layer_norm_rows
from .prune import prune_plan, select_float


def conv2d(x, w, b=None, stride: int = 1):
    """Conv2d with kernel k == stride (non-overlapping, no padding). x (B, Cin, H, W), w (Cout, Cin, k, k).

    One GEMM over all images and positions (numpy's batched small GEMMs are ~5x slower), with positions as
    rows: the result is a (B, Cout, Ho, Wo) view of a channels-last (B, Ho, Wo, Cout) array, which the next
    1x1 conv reads as its (B*N, Cin) matrix without a copy. A weight whose (Cin, Cout) transpose is
    C-contiguous (token_to_conv of `model_token.cast_params`, as `refvit.models.load_model` prepares them)
    makes it BLAS's NN GEMM (6-8% faster than NT at 197 rows here)."""
    B, Cin, H, W = x.shape
    Cout, _, k, _ = w.shape
    Ho, Wo = H // k, W // k
    cols = x.reshape(B, Cin, Ho, k, Wo, k).transpose(0, 2, 4, 1, 3, 5)          # (B, Ho, Wo, Cin, k, k)
    y = cols.reshape(B * Ho * Wo, Cin * k * k) @ w.reshape(Cout, Cin * k * k).T  # (B*Ho*Wo, Cout)
    if b is not None:
        y += b
    return y.reshape(B, Ho, Wo, Cout).transpose(0, 3, 1, 2)                     # (B, Cout, Ho, Wo) view


def channels_last(B: int, C: int, N: int, dtype) -> np.ndarray:
    """An uninitialized (B, C, 1, N) array in channels-last memory, the layout conv2d produces."""
    return np.empty((B, 1, N, C), dtype).transpose(0, 3, 1, 2)


def _positions(a):  # (B, C, H, W) -> its (B*H*W, C) matrix: a view for channels-last memory, else a copy
    return a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])


def layer_norm_conv(x, w, b, eps):  # x (B, C, H, W) normalized over C -> (B, C, H, W) channels-last
    """Channel mean and variance as 1x1 convs with weight 1/C (the GEMVs conv2d makes of them: one call over
    the B*H*W positions), subtract, square, rsqrt, multiply, then gamma/beta as a depthwise 1x1 conv; all fused
    per block of positions on refvit.parallel's threads (functional.layer_norm_rows: the same bits)."""
    B, C, H, W = x.shape
    d = np.empty((B, H, W, C), x.dtype).transpose(0, 3, 1, 2)                   # channels-last
    layer_norm_rows(_positions(x), _positions(d), B * H * W, w.reshape(-1), b, eps)
    return d


def _record(trace, name, x):
    """Keep an intermediate for calibration/inspection; names are the integer model's tensor names."""
    if trace is not None:
        trace[name] = x
    return x


def embed(p, x, cfg: DeiTConfig, trace=None):  # x (B, 3, H, W) -> (B, C, 1, N)
    y = conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], cfg.patch_size)  # (B, C, g, g)
    B, C = y.shape[:2]
    tokens = _record(trace, "patch_embed", y.reshape(B, C, 1, cfg.num_patches))  # (B, C, 1, Np)
    prefix = [p["cls_token"]] + ([p["dist_token"]] if cfg.distilled else [])    # each (1, C, 1, 1)
    prefix = np.broadcast_to(np.concatenate(prefix, axis=3), (B, C, 1, len(prefix)))
    x = channels_last(B, C, cfg.num_tokens, y.dtype)                             # (B, C, 1, N)
    if cfg.no_embed_class:                                                       # DeiT-III: patches only
        tokens = _record(trace, "embed", tokens + p["pos_embed"])                # (B, C, 1, Np)
        x[...] = np.concatenate([prefix, tokens], axis=3)                        # (B, C, 1, N)
        return _record(trace, "tokens", x)
    np.add(np.concatenate([prefix, tokens], axis=3), p["pos_embed"], out=x)
    return _record(trace, "embed", x)


def layer_scale(p, name, h):  # h (B, C, 1, N) -> h * gamma per channel (timm's LayerScale); h without one
    return h * p[name].reshape(1, -1, 1, 1) if name in p else h


def split_heads(x, num_heads):  # (B, C, 1, N) -> (B, Hh, D, N)
    B, C, _, N = x.shape
    return x.reshape(B, num_heads, C // num_heads, N)


def attention(p, pre, x, cfg: DeiTConfig, trace=None, probs: bool = False):
    """x (B, C, 1, N) -> (B, C, 1, N) and, with probs, the probabilities (B, Hh, N, N) [query, key] (else None)."""
    B, C, _, N = x.shape
    qkv = _record(trace, pre + "qkv", conv2d(x, p[pre + "qkv.weight"], p.get(pre + "qkv.bias")))  # (B, 3C, 1, N)
    q, k, v = (split_heads(t, cfg.num_heads) for t in np.split(qkv, 3, axis=1))  # 3 x (B, Hh, D, N)
    q = q * np.asarray(cfg.head_dim ** -0.5, x.dtype)                            # (B, Hh, D, N), scaled as timm
    o = channels_last(B, C, N, x.dtype)                                          # (B, C, 1, N)
    a = attend(q.transpose(0, 1, 3, 2), k, v.transpose(0, 1, 3, 2),              # scores (N, N) [query, key]
               split_heads(o, cfg.num_heads).transpose(0, 1, 3, 2), probs)       # (B, Hh, N, N) | None
    o = _record(trace, pre + "context", o)                                       # (B, C, 1, N)
    h = layer_scale(p, pre[:-len("attn.")] + "ls1.gamma", conv2d(o, p[pre + "proj.weight"], p[pre + "proj.bias"]))
    return _record(trace, pre + "proj", h), a                                     # (B, C, 1, N)


def mlp(p, pre, x, trace=None):  # x (B, C, 1, N) -> (B, C, 1, N)
    h = _record(trace, pre + "fc1", conv2d(x, p[pre + "fc1.weight"], p[pre + "fc1.bias"]))  # (B, 4C, 1, N)
    h = _record(trace, pre + "gelu", gelu(h))
    h = layer_scale(p, pre[:-len("mlp.")] + "ls2.gamma", conv2d(h, p[pre + "fc2.weight"], p[pre + "fc2.bias"]))
    return _record(trace, pre + "fc2", h)                                          # (B, C, 1, N)


def select_conv(x, attn, keep_rate: float, num_prefix: int):  # x (B, C, 1, N) -> (B, C, 1, P + k [+ 1])
    """The token selection of refvit.prune on conv-form tokens (the same arithmetic on the (B, N, C) view)."""
    kept = select_float(x[:, :, 0, :].transpose(0, 2, 1), attn, keep_rate, num_prefix)  # (B, N', C)
    return kept.transpose(0, 2, 1)[:, :, None, :]                                  # (B, C, 1, N')


def block(p, i, x, cfg: DeiTConfig, trace=None, keep_rate: float | None = None):  # (B, C, 1, N) -> (B, C, 1, N')
    """One block; with a keep_rate, the token selection (refvit.prune) after the attention's residual add."""
    pre = f"blocks.{i}."
    ln = lambda y, name: _record(trace, pre + name, layer_norm_conv(
        y, p[pre + name + ".weight"], p[pre + name + ".bias"], cfg.ln_eps))
    h, a = attention(p, pre + "attn.", ln(x, "norm1"), cfg, trace, keep_rate is not None)  # (B, C, 1, N), (B, Hh, N, N)
    x = _record(trace, pre + "residual1", x + h)
    if keep_rate is not None:
        x = _record(trace, pre + "pruned", select_conv(x, a, keep_rate, cfg.num_prefix_tokens))  # (B, C, 1, N')
    return _record(trace, pre + "residual2", x + mlp(p, pre + "mlp.", ln(x, "norm2"), trace))


def head(p, x):  # x (B, C, 1, N) final-normed -> logits (B, K)
    logits = conv2d(x[..., 0:1], p["head.weight"], p["head.bias"])                # (B, K, 1, 1)
    if "head_dist.weight" in p:
        logits = (logits + conv2d(x[..., 1:2], p["head_dist.weight"], p["head_dist.bias"])) / 2
    return logits[:, :, 0, 0]


def forward_features(p, x, cfg: DeiTConfig, trace: dict | None = None, prune=()):  # (B, 3, H, W) -> (B, C, 1, N')
    rates = {s.block: s for s in prune_plan(prune, cfg.depth, cfg.num_patches)}
    x = embed(p, _record(trace, "input", x), cfg, trace)
    for i in range(cfg.depth):
        x = block(p, i, x, cfg, trace, rates.get(i))
    return _record(trace, "norm", layer_norm_conv(x, p["norm.weight"], p["norm.bias"], cfg.ln_eps))


def forward(p, x, cfg: DeiTConfig, trace: dict | None = None, prune=()):  # (B, 3, H, W) -> (B, K)
    """Logits of the conv-form DeiT; `p` from `token_to_conv`, in x's float dtype. `trace`, if a dict,
    receives every intermediate under the integer graph's op names (block output: residual2; logits: head;
    a selection's tokens: pruned). `prune`: token pruning stages as in model_token.forward."""
    return _record(trace, "head", head(p, forward_features(p, x, cfg, trace, prune)))
