"""Convert parameters between the token form (timm shapes) and the NCHW-conv form.

The names stay timm's; only shapes change, and no value does (a reshape is exact):
  Linear weight (out, in)        <-> 1x1 conv weight (out, in, 1, 1)
  LayerNorm weight (C,)          <-> depthwise 1x1 conv weight (C, 1, 1, 1)   (bias stays (C,))
  cls_token / dist_token (1,1,C) <-> (1, C, 1, 1)
  pos_embed (1, N, C)            <-> (1, C, 1, N)
The patch-embedding conv weight (C, 3, P, P) and every bias are the same in both forms.
"""
from __future__ import annotations

import numpy as np

_LINEARS = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
_NORMS = ("norm1.weight", "norm2.weight")


def _kind(name: str) -> str:
    if name in ("cls_token", "dist_token"):
        return "token"
    if name == "pos_embed":
        return "pos"
    if name in ("head.weight", "head_dist.weight") or name.endswith(_LINEARS):
        return "linear"
    if name == "norm.weight" or name.endswith(_NORMS):
        return "norm"
    return "same"


def token_to_conv(params: dict) -> dict:
    """Token-form parameters (timm shapes) -> conv-form parameters (same names, same values)."""
    out = {}
    for name, v in params.items():
        kind = _kind(name)
        if kind == "linear":                             # (out, in) -> (out, in, 1, 1), in v's memory order
            out[name] = np.asarray(v)[:, :, None, None]  # (refvit.model_token.cast_params lays some out for speed)
            continue
        if kind == "norm":
            v = v[:, None, None, None]                   # (C,) -> (C, 1, 1, 1)
        elif kind in ("token", "pos"):
            v = v.transpose(0, 2, 1)[:, :, None, :]      # (1, N, C) -> (1, C, 1, N)
        out[name] = np.ascontiguousarray(v)
    return out


def conv_to_token(params: dict) -> dict:
    """Inverse of `token_to_conv`."""
    out = {}
    for name, v in params.items():
        kind = _kind(name)
        if kind == "linear":
            v = v[:, :, 0, 0]
        elif kind == "norm":
            v = v[:, 0, 0, 0]
        elif kind in ("token", "pos"):
            v = v[:, :, 0, :].transpose(0, 2, 1)
        out[name] = np.ascontiguousarray(v)
    return out
