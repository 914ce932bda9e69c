"""Hugging Face DeiT / ViT <-> timm parameter names: one table, read in both directions.

Hugging Face's ViT (`ViTForImageClassification`, backbone prefix `vit.`) names its tensors as DeiT does
(prefix `deit.`), without the distillation token; its classifier is `classifier` as in DeiTForImageClassification.

HF keeps q, k and v as three Linear layers; timm has one `qkv` Linear whose rows are [q; k; v]. So a table
row maps one timm name to the HF names whose tensors are concatenated along dim 0 to make it.
"""
from __future__ import annotations

import re

import numpy as np

from .errors import CheckpointError

HF_PREFIX = "deit."  # the backbone prefix in DeiTForImageClassification[WithTeacher]; DeiTModel has none
HF_VIT_PREFIX = "vit."  # ViTForImageClassification's; ViTModel has none
HF_PREFIXES = (HF_PREFIX, HF_VIT_PREFIX)

_QKV = tuple(f"encoder.layer.{{i}}.attention.attention.{x}.{{p}}" for x in ("query", "key", "value"))

# (timm name, HF names relative to HF_PREFIX). {i}: block index; {p}: weight or bias.
_BACKBONE = (
    ("cls_token", ("embeddings.cls_token",)),
    ("dist_token", ("embeddings.distillation_token",)),
    ("pos_embed", ("embeddings.position_embeddings",)),
    ("patch_embed.proj.{p}", ("embeddings.patch_embeddings.projection.{p}",)),
    ("blocks.{i}.norm1.{p}", ("encoder.layer.{i}.layernorm_before.{p}",)),
    ("blocks.{i}.attn.qkv.{p}", _QKV),
    ("blocks.{i}.attn.proj.{p}", ("encoder.layer.{i}.attention.output.dense.{p}",)),
    ("blocks.{i}.norm2.{p}", ("encoder.layer.{i}.layernorm_after.{p}",)),
    ("blocks.{i}.mlp.fc1.{p}", ("encoder.layer.{i}.intermediate.dense.{p}",)),
    ("blocks.{i}.mlp.fc2.{p}", ("encoder.layer.{i}.output.dense.{p}",)),
    ("norm.{p}", ("layernorm.{p}",)),
)
# Classifiers sit outside the prefix. DeiTForImageClassification has one; ...WithTeacher has two.
_HEADS_SINGLE = (("head.{p}", ("classifier.{p}",)),)
_HEADS_TEACHER = (("head.{p}", ("cls_classifier.{p}",)), ("head_dist.{p}", ("distillation_classifier.{p}",)))

# DeiTModel's pooler, tanh(dense(cls)), has no timm counterpart and plays no part in classification.
_DROPPED_HF = re.compile(r"(deit\.|vit\.)?pooler\.dense\.(weight|bias)")


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


def _rules(table, prefixed: bool) -> list:
    return [(_regex(timm), hf, prefixed) for timm, hf in table]


_TIMM_RULES_SINGLE = _rules(_BACKBONE, True) + _rules(_HEADS_SINGLE, False)
_TIMM_RULES_TEACHER = _rules(_BACKBONE, True) + _rules(_HEADS_TEACHER, False)
# HF name regex -> (timm template, index of this part, number of parts, backbone?)
_HF_RULES = [(_regex(hf), timm, k, len(hfs), prefixed)
             for table, prefixed in ((_BACKBONE, True), (_HEADS_SINGLE + _HEADS_TEACHER, False))
             for timm, hfs in table for k, hf in enumerate(hfs)]


def _unprefixed(name: str) -> str:
    for prefix in HF_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def hf_prefix_of(names) -> str:
    """The HF backbone prefix the names use: 'deit.', 'vit.' or '' (DeiTModel / ViTModel)."""
    return next((p for p in HF_PREFIXES if any(n.startswith(p) for n in names)), "")


# The official DeiT-III release (facebookresearch/deit models_v2.py) names the layer scales gamma_1, gamma_2;
# timm's checkpoint filter renames them ls1.gamma, ls2.gamma, and so does `official_to_timm`.
_OFFICIAL_GAMMA = re.compile(r"(blocks\.\d+\.)gamma_([12])")


def official_to_timm(tensors: dict) -> dict:
    """The official DeiT-III names (blocks.i.gamma_1 / gamma_2) -> timm's (blocks.i.ls1.gamma / ls2.gamma)."""
    out = {}
    for name, v in tensors.items():
        _put(out, _OFFICIAL_GAMMA.sub(r"\1ls\2.gamma", name), v, name)
    return out


def _match_hf(name: str):
    """HF name -> (timm name, part index, number of parts), or None if it is not an HF DeiT name."""
    for regex, timm, k, n, prefixed in _HF_RULES:
        m = regex.fullmatch(_unprefixed(name) if prefixed else name)
        if m:
            return timm.format(**m.groupdict()), k, n
    return None


def hf_names_for(timm_name: str, *, teacher: bool, prefix: str = HF_PREFIX):
    """The HF names (concatenated along dim 0) behind a timm name, or None if it is not a timm DeiT name.
    teacher: name the heads as DeiTForImageClassificationWithTeacher does (cls_/distillation_classifier)."""
    for regex, hfs, prefixed in (_TIMM_RULES_TEACHER if teacher else _TIMM_RULES_SINGLE):
        m = regex.fullmatch(timm_name)
        if m:
            return tuple((prefix if prefixed else "") + hf.format(**m.groupdict()) for hf in hfs)
    return None


def detect_naming(names) -> str:
    """'timm' or 'hf', from the parameter names; CheckpointError if neither or a mix."""
    names = list(names)
    hf = [n for n in names if _match_hf(n)]
    timm = [n for n in names if hf_names_for(n, teacher=True) or hf_names_for(n, teacher=False)]
    if hf and timm:
        raise CheckpointError(f"mixes Hugging Face names (e.g. {hf[0]!r}) and timm names (e.g. {timm[0]!r})")
    if not (hf or timm):
        shown = ", ".join(n if len(n) <= 100 else n[:100] + "..." for n in names[:5]) + (", ..." if len(names) > 5 else "")
        raise CheckpointError(f"no DeiT parameter names, neither timm nor Hugging Face (names: {shown or 'none'})")
    return "hf" if hf else "timm"


def _put(out: dict, name: str, value, source) -> None:
    if name in out:
        raise CheckpointError(f"two tensors map to {name!r} (the second is {source!r})")
    out[name] = value


def _concat(timm_name: str, hf_names: list, tensors: dict) -> np.ndarray:
    parts = [tensors[n] for n in hf_names]
    if any(p.ndim == 0 for p in parts) or len({p.shape[1:] for p in parts}) > 1:
        shapes = ", ".join(f"{n} {tensors[n].shape}" for n in hf_names)
        raise CheckpointError(f"cannot concatenate into {timm_name!r}: shapes differ beyond dim 0 ({shapes})")
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def hf_to_timm(tensors: dict) -> dict:
    """Rename HF DeiT / ViT tensors (with or without the 'deit.' / 'vit.' prefix) to timm names, concatenating q, k, v
    into qkv. Names that are not HF DeiT names, and q/k/v sets with a part missing, pass through unchanged
    so validation reports them as unexpected. The DeiTModel pooler is dropped."""
    groups = {}  # timm name -> HF name per part
    out = {}
    for name in tensors:
        hit = _match_hf(name)
        if hit is None:
            if not _DROPPED_HF.fullmatch(name):
                _put(out, name, tensors[name], name)
            continue
        timm, k, n = hit
        parts = groups.setdefault(timm, [None] * n)
        if parts[k] is not None:
            raise CheckpointError(f"both {parts[k]!r} and {name!r} map to {timm!r}")
        parts[k] = name
    for timm, hf_names in groups.items():
        if None in hf_names:
            for n in filter(None, hf_names):
                _put(out, n, tensors[n], n)
        else:
            _put(out, timm, _concat(timm, hf_names, tensors), hf_names[0])
    return out


def _split(timm_name: str, array: np.ndarray, n: int) -> list:
    if n == 1:
        return [array]
    if array.ndim == 0 or array.shape[0] % n:
        raise CheckpointError(f"cannot split {timm_name!r} of shape {array.shape} into {n} equal parts")
    return np.split(array, n, axis=0)


def to_hf_names(params: dict, *, prefix: str = HF_PREFIX) -> dict:
    """Rename timm DeiT params to HF names, splitting qkv into q, k, v. With a head_dist the heads are named
    as in DeiTForImageClassificationWithTeacher, otherwise as in DeiTForImageClassification.
    Unknown names pass through unchanged."""
    teacher = any(n.startswith("head_dist.") for n in params)
    out = {}
    for name, array in params.items():
        hf_names = hf_names_for(name, teacher=teacher, prefix=prefix) or (name,)
        for hf, part in zip(hf_names, _split(name, array, len(hf_names))):
            _put(out, hf, part, name)
    return out
