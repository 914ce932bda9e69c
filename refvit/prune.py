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


PRUNE_OPTIONS = {"order": ("position", "score"), "package": ("mean", "weighted-sum")}   # first: the default


@dataclass(frozen=True)
class Stage:
    """One selection: at `block`, `patches` patch tokens in, `keep` of them kept (+ a package token if any drop).
    order: the kept tokens in their `position` order or in `score` order (EViT's top-k); package: the dropped
    tokens' score-weighted `mean` or EViT's unnormalised `weighted-sum`."""
    block: int
    keep_rate: float
    patches: int
    keep: int
    order: str = "position"
    package: str = "mean"

    @property
    def patches_out(self) -> int:
        """Patch tokens after the stage: the kept ones, plus the package token when some were dropped."""
        return self.keep + (self.keep < self.patches)

    def to_dict(self) -> dict:
        return {"block": self.block, "keep_rate": self.keep_rate, "patches": self.patches, "keep": self.keep,
                "patches_out": self.patches_out} | {k: getattr(self, k) for k, (default, _) in PRUNE_OPTIONS.items()
                                                    if getattr(self, k) != default}


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
    """'BLOCK:KEEP[,BLOCK:KEEP...][,order=position|score][,package=mean|weighted-sum]', pairs (block,
    keep_rate) or {block: keep_rate} (options as ("order", "score") pairs or keys) -> ((block, keep_rate), ...)
    sorted by block, then the options that are not the default as (name, value) pairs. None, '' and 'none' are
    no pruning: ()."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return ()
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            name, eq, value = part.strip().partition("=")
            if eq:
                if name.strip() not in PRUNE_OPTIONS:
                    known = ", ".join(k + "=" + "|".join(v) for k, v in PRUNE_OPTIONS.items())
                    raise PruneError(f"--prune: unknown option {name.strip()!r}; options: {known}")
                items.append((name.strip(), value.strip()))
                continue
            block, sep, rate = part.strip().partition(":")
            if not sep:
                raise PruneError(f"--prune: {part.strip()!r} is not BLOCK:KEEP (e.g. 3:0.7) or an option "
                                 f"(order=position|score, package=mean|weighted-sum)")
            items.append((block.strip(), rate.strip()))
    elif isinstance(spec, dict):
        items = list(spec.items())
    else:
        try:
            items = [tuple(s) for s in spec]
        except TypeError:
            raise PruneError(f"a prune setting is 'BLOCK:KEEP,...' or (block, keep_rate) pairs, got {spec!r}") from None
    out, options = {}, {}
    for item in items:
        if len(item) != 2:
            raise PruneError(f"a prune stage is (block, keep_rate), got {item!r}")
        if isinstance(item[0], str) and item[0] in PRUNE_OPTIONS:
            name, value = item
            if value not in PRUNE_OPTIONS[name] or name in options:
                raise PruneError(f"--prune: {name} must be given once, one of {'|'.join(PRUNE_OPTIONS[name])}; "
                                 f"got {value!r}")
            options[name] = value
            continue
        block = _block(item[0], "--prune")
        if block in out:
            raise PruneError(f"--prune: block {block} is given twice")
        out[block] = _keep_rate(item[1], f"--prune block {block}")
    if options and not out:
        raise PruneError(f"--prune: options {sorted(options)} need at least one BLOCK:KEEP stage")
    return tuple(sorted(out.items())) + tuple((k, options[k]) for k, (default, _) in PRUNE_OPTIONS.items()
                                              if options.get(k, default) != default)


def prune_options(prune) -> dict:
    """{'order': ..., 'package': ...} of a prune setting (the defaults where it names none)."""
    given = {k: v for k, v in parse_prune(prune) if isinstance(k, str)}
    return {k: given.get(k, default) for k, (default, _) in PRUNE_OPTIONS.items()}


def keep_count(keep_rate: float, patches: int) -> int:
    """k = ceil(keep_rate * patches), exactly: the keep rate is read as the shortest decimal that gives the
    float back (Python's repr: 0.7 is 7/10, not 0.6999999999999999555910790149937...), at least 1."""
    return max(1, math.ceil(Fraction(repr(float(keep_rate))) * patches))


def prune_plan(prune, depth: int, num_patches: int) -> tuple:
    """The stages of a prune setting for a model of `depth` blocks and `num_patches` patches: static counts."""
    stages, n, options = [], num_patches, prune_options(prune)
    for block, rate in parse_prune(prune):
        if isinstance(block, str):
            continue                                                                # an option
        if block >= depth:
            raise PruneError(f"--prune: block {block} does not exist; the model has blocks 0..{depth - 1}")
        stage = Stage(block, rate, n, keep_count(rate, n), **options)
        stages.append(stage)
        n = stage.patches_out
    return tuple(stages)


def format_prune(prune) -> str:
    """((3, 0.7), (6, 0.7)) -> '3:0.7,6:0.7' (the --prune syntax, options as ',order=score'); () -> 'none'."""
    return ",".join(f"{b}={r}" if isinstance(b, str) else f"{b}:{r!r}" for b, r in parse_prune(prune)) or "none"


# ---------------------------------------------------------------------------------------------
# the float selection (both float forms)
# ---------------------------------------------------------------------------------------------

def cls_scores_float(attn: np.ndarray, num_prefix: int) -> np.ndarray:
    """attn (B, Hh, N, N) [query, key] -> (B, n): the class token's attention to each patch token, summed over heads."""
    return attn[:, :, 0, num_prefix:].sum(axis=1)                                  # (B, n)


def select_float(x: np.ndarray, attn: np.ndarray, keep_rate, num_prefix: int, order: str = "position",
                 package: str = "mean") -> np.ndarray:
    """Float token selection on tokens x (B, N, C) with the block's attention probabilities attn (B, Hh, N, N):
    -> (B, P + k + 1, C): prefix tokens, the k kept patch tokens (order `position`: in their order; `score`:
    larger score first, ties lower position first), the package token (`mean`: the dropped tokens' average
    weighted by their scores, a plain average if these are all 0; `weighted-sum`: EViT's sum of the dropped
    tokens weighted by the head-mean attention, not normalised); x itself when k = n. keep_rate: a float or a
    `Stage` (its keep rate and options)."""
    if isinstance(keep_rate, Stage):
        keep_rate, order, package = keep_rate.keep_rate, keep_rate.order, keep_rate.package
    P = num_prefix
    n = x.shape[1] - P
    k = keep_count(keep_rate, n)
    if k == n:
        return x
    score = cls_scores_float(attn, P)                                               # (B, n)
    ranked = np.argsort(-score, axis=1, kind="stable")                              # larger first, ties: lower index
    kept = ranked[:, :k] if order == "score" else np.sort(ranked[:, :k], axis=1)   # (B, k)
    dropped = np.sort(ranked[:, k:], axis=1)                                        # (B, n - k)
    patches = x[:, P:]                                                              # (B, n, C)
    w = np.take_along_axis(score, dropped, axis=1)                                  # (B, n - k)
    drop = np.take_along_axis(patches, dropped[:, :, None], axis=1)                 # (B, n - k, C)
    if package == "weighted-sum":
        pack = (w[:, None, :] @ drop) / attn.shape[1]                               # (B, 1, C): head mean, unnormalised
    else:
        w = np.where(w.sum(axis=1, keepdims=True) > 0, w, np.ones_like(w))         # all zero: plain average
        pack = (w[:, None, :] @ drop) / w.sum(axis=1)[:, None, None]                # (B, 1, C)
    kept_tokens = np.take_along_axis(patches, kept[:, :, None], axis=1)             # (B, k, C)
    return np.concatenate([x[:, :P], kept_tokens, pack.astype(x.dtype)], axis=1)    # (B, P + k + 1, C)
