"""Token pruning settings (HeatViT / EViT selector) as data, and the float selection both float forms share.

A prune setting is a tuple of stages `(block, keep_rate)`, blocks counted from 0, sorted, each at most once
(`parse_prune("3:0.7,6:0.7")`). At a stage the selection runs inside the block, after its attention and
residual add, before its MLP (where EViT does it): of the n patch tokens entering the block (the previous
stage's package token counts as one) it keeps k = `keep_count(keep_rate, n)`, ranked by the class token's
attention summed over heads, in their original order, and folds the others into one package token appended
after them. With k = n nothing is dropped and no package token is made. The token count after every stage
is fixed by the setting (`prune_plan`), so every tensor shape is static. docs/spec.md, "Token pruning".

The float forms (model_token, model_conv) call `select_float` on (B, N, C) tokens; the integer selector is
refvit/int_kernels_prune.py.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .config import ConfigError


class PruneError(ConfigError):
    """A prune setting that cannot be used: bad syntax, a keep rate outside (0, 1], a block the model lacks."""


@dataclass(frozen=True)
class Stage:
    """One selection: at `block`, `patches` patch tokens in, `keep` of them kept (+ a package token if any drop)."""
    block: int
    keep_rate: float
    patches: int
    keep: int

    @property
    def patches_out(self) -> int:
        """Patch tokens after the stage: the kept ones, plus the package token when some were dropped."""
        return self.keep + (self.keep < self.patches)

    def to_dict(self) -> dict:
        return {"block": self.block, "keep_rate": self.keep_rate, "patches": self.patches, "keep": self.keep,
                "patches_out": self.patches_out}


def _keep_rate(v, where: str) -> float:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise PruneError(f"{where}: keep rate {v!r} is not a number") from None
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not (math.isfinite(v) and 0 < v <= 1):
        raise PruneError(f"{where}: keep rate must be a number in (0, 1], got {v!r}")
    return float(v)


def _block(v, where: str) -> int:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
        raise PruneError(f"{where}: block must be an integer >= 0 (blocks count from 0), got {v!r}")
    return int(v)


def parse_prune(spec) -> tuple:
    """'BLOCK:KEEP[,BLOCK:KEEP...]', pairs (block, keep_rate) or {block: keep_rate} -> ((block, keep_rate), ...)
    sorted by block. None, '' and 'none' are no pruning: ()."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return ()
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            block, sep, rate = part.strip().partition(":")
            if not sep:
                raise PruneError(f"--prune: {part.strip()!r} is not BLOCK:KEEP (e.g. 3:0.7)")
            items.append((block.strip(), rate.strip()))
    elif isinstance(spec, dict):
        items = list(spec.items())
    else:
        try:
            items = [tuple(s) for s in spec]
        except TypeError:
            raise PruneError(f"a prune setting is 'BLOCK:KEEP,...' or (block, keep_rate) pairs, got {spec!r}") from None
    out = {}
    for item in items:
        if len(item) != 2:
            raise PruneError(f"a prune stage is (block, keep_rate), got {item!r}")
        block = _block(item[0], "--prune")
        if block in out:
            raise PruneError(f"--prune: block {block} is given twice")
        out[block] = _keep_rate(item[1], f"--prune block {block}")
    return tuple(sorted(out.items()))


def keep_count(keep_rate: float, patches: int) -> int:
    """k = ceil(keep_rate * patches), exactly: the keep rate is read as the shortest decimal that gives the
    float back (Python's repr: 0.7 is 7/10, not 0.6999999999999999555910790149937...), at least 1."""
    return max(1, math.ceil(Fraction(repr(float(keep_rate))) * patches))


def prune_plan(prune, depth: int, num_patches: int) -> tuple:
    """The stages of a prune setting for a model of `depth` blocks and `num_patches` patches: static counts."""
    stages, n = [], num_patches
    for block, rate in parse_prune(prune):
        if block >= depth:
            raise PruneError(f"--prune: block {block} does not exist; the model has blocks 0..{depth - 1}")
        stage = Stage(block, rate, n, keep_count(rate, n))
        stages.append(stage)
        n = stage.patches_out
    return tuple(stages)


def format_prune(prune) -> str:
    """((3, 0.7), (6, 0.7)) -> '3:0.7,6:0.7' (the --prune syntax); () -> 'none'."""
    return ",".join(f"{b}:{r!r}" for b, r in parse_prune(prune)) or "none"


# ---------------------------------------------------------------------------------------------
# the float selection (both float forms)
# ---------------------------------------------------------------------------------------------

def cls_scores_float(attn: np.ndarray, num_prefix: int) -> np.ndarray:
    """attn (B, Hh, N, N) [query, key] -> (B, n): the class token's attention to each patch token, summed over heads."""
    return attn[:, :, 0, num_prefix:].sum(axis=1)                                  # (B, n)


def select_float(x: np.ndarray, attn: np.ndarray, keep_rate: float, num_prefix: int) -> np.ndarray:
    """Float token selection on tokens x (B, N, C) with the block's attention probabilities attn (B, Hh, N, N):
    -> (B, P + k + 1, C): prefix tokens, the k kept patch tokens in their order, the package token (the dropped
    tokens' average weighted by their scores, a plain average if these are all 0); x itself when k = n."""
    P = num_prefix
    n = x.shape[1] - P
    k = keep_count(keep_rate, n)
    if k == n:
        return x
    score = cls_scores_float(attn, P)                                               # (B, n)
    order = np.argsort(-score, axis=1, kind="stable")                               # larger first, ties: lower index
    kept, dropped = np.sort(order[:, :k], axis=1), np.sort(order[:, k:], axis=1)    # (B, k), (B, n - k)
    patches = x[:, P:]                                                              # (B, n, C)
    w = np.take_along_axis(score, dropped, axis=1)                                  # (B, n - k)
    w = np.where(w.sum(axis=1, keepdims=True) > 0, w, np.ones_like(w))             # all zero: plain average
    drop = np.take_along_axis(patches, dropped[:, :, None], axis=1)                 # (B, n - k, C)
    package = (w[:, None, :] @ drop) / w.sum(axis=1)[:, None, None]                 # (B, 1, C)
    kept_tokens = np.take_along_axis(patches, kept[:, :, None], axis=1)             # (B, k, C)
    return np.concatenate([x[:, :P], kept_tokens, package.astype(x.dtype)], axis=1)  # (B, P + k + 1, C)
