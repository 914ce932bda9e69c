"""Integer kernels of token pruning (HeatViT / EViT selector); docs/spec.md, "Token pruning".

select_tokens: the k patch tokens the class token attends most, scored by the sum over heads of its int8
    softmax probabilities; larger score first, ties to the lower token position; returned in their original
    order as int32 token positions.
prune_tokens: the prefix tokens, the kept tokens, then one package token: the dropped tokens' average
    weighted by their scores (a plain average when all of them are 0), an exact quotient rounded as the
    model's rounding mode rounds a tie. No package token when nothing is dropped (k = n).

Pure integer arithmetic: scores are sums of at most 2^16 int8 values, the weighted sums go through
intmath.int_matmul (exact), and the division is an exact int64 floor division (bounds in the spec).
"""
from __future__ import annotations

import numpy as np

from refvit.int_kernels import MAX_TOKENS, PROB_ONE, _require_array, _require_range, _scalar_int
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND, _check_rounding, int_matmul

MAX_SELECT_HEADS = 1 << 16        # Hh: a score is <= Hh * 127 < 2^23, a package sum |num| <= 2^16 * 2^23 * 2^15


def cls_attention_scores(p, num_prefix, fn: str = "cls_attention_scores") -> np.ndarray:
    """int8 probabilities p (B, Hh, N, N) [query, key] -> int64 (B, N - P): score[b, j] = sum_h p[b, h, 0, P + j]."""
    _require_array(p, fn, "p", np.int8, 4, "(B, Hh, N, N)")
    b, h, n_q, n_k = p.shape
    if n_q != n_k or n_k > MAX_TOKENS or h > MAX_SELECT_HEADS:
        raise ValueError(f"{fn}: p must be (B, Hh, N, N) with N <= {MAX_TOKENS}, Hh <= {MAX_SELECT_HEADS}, got {p.shape}")
    prefix = _scalar_int(num_prefix, fn, "num_prefix")
    if not 1 <= prefix < n_k:
        raise ValueError(f"{fn}: num_prefix must be in [1, N - 1] = [1, {n_k - 1}], got {prefix}")
    row = p[:, :, 0, prefix:]                                                      # (B, Hh, n): the cls query row
    _require_range(row, 0, PROB_ONE, fn, "p (probabilities at scale 1/127)")
    return row.sum(axis=1, dtype=np.int64)                                         # (B, n), each in [0, Hh*127]


def select_tokens(p, *, keep, num_prefix) -> np.ndarray:
    """int8 p (B, Hh, N, N) -> int32 (B, keep): the positions (in [P, N), ascending) of the `keep` patch tokens
    with the largest scores; of equal scores the lower position ranks first."""
    fn = "select_tokens"
    score = cls_attention_scores(p, num_prefix, fn)                                 # (B, n)
    n, prefix = score.shape[1], int(num_prefix)
    k = _scalar_int(keep, fn, "keep")
    if not 1 <= k <= n:
        raise ValueError(f"{fn}: keep must be in [1, {n}] (the patch tokens), got {k}")
    order = np.argsort(-score, axis=1, kind="stable")                               # (B, n): score desc, position asc
    return (np.sort(order[:, :k], axis=1) + prefix).astype(np.int32)                # (B, k) token positions


def divide_round(num, den, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """The exact quotient num / den (den > 0) rounded to an integer, a tie as the rounding mode rounds one:
    SINGLE_ROUND half up (floor((2 num + den) / (2 den)), as rounding_shift_right), DOUBLE_ROUND half away from
    zero (as gemmlowp). int64 in and out; |2 num| + den must stay below 2^62 (the callers' bound)."""
    _check_rounding(rounding, "divide_round")
    num, den = np.asarray(num, np.int64), np.asarray(den, np.int64)
    if rounding == DOUBLE_ROUND:
        return np.sign(num) * ((2 * np.abs(num) + den) // (2 * den))
    return (2 * num + den) // (2 * den)                                             # numpy // is floor division


def _check_index(index, b: int, prefix: int, n_tokens: int, fn: str) -> np.ndarray:
    _require_array(index, fn, "index", np.int32, 2, "(B, k)")
    k = index.shape[1]
    if index.shape[0] != b or not 1 <= k <= n_tokens - prefix:
        raise ValueError(f"{fn}: index must be (B, k) = ({b}, 1..{n_tokens - prefix}), got {index.shape}")
    _require_range(index, prefix, n_tokens - 1, fn, "index (patch token positions)")
    if k > 1 and not np.all(np.diff(index, axis=1) > 0):
        raise ValueError(f"{fn}: index must be strictly increasing along each row (kept tokens in their order)")
    return index


def prune_args(x, p, num_prefix, rounding: str, fn: str) -> tuple:
    """The checks every package kernel makes: x int8 or int16 (B, C, 1, N), p (B, Hh, N, N) agreeing on B and N,
    a known rounding mode -> (the cls scores (B, n), B, N, P)."""
    if not isinstance(x, np.ndarray) or x.dtype not in (np.dtype(np.int8), np.dtype(np.int16)):
        raise ValueError(f"{fn}: x must be an int8 or int16 array, got {getattr(x, 'dtype', type(x).__name__)}")
    _require_array(x, fn, "x", x.dtype, 4, "(B, C, 1, N)")
    _check_rounding(rounding, fn)
    score = cls_attention_scores(p, num_prefix, fn)                                 # (B, n)
    b, _, one, n_tokens = x.shape
    if one != 1 or p.shape[0] != b or p.shape[2] != n_tokens:
        raise ValueError(f"{fn}: x (B, C, 1, N) = {x.shape} and p (B, Hh, N, N) = {p.shape} must agree on B and N")
    return score, b, n_tokens, int(num_prefix)


def prune_tokens(x, p, index, *, num_prefix, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """Tokens x (B, C, 1, N) int8 or int16, their block's probabilities p (B, Hh, N, N) and the kept positions
    index int32 (B, k) -> x's dtype (B, C, 1, P + k + 1): prefix, kept tokens, package token; x when k = n."""
    fn = "prune_tokens"
    score, b, n_tokens, prefix = prune_args(x, p, num_prefix, rounding, fn)          # (B, n)
    index = _check_index(index, b, prefix, n_tokens, fn)
    k, n = index.shape[1], n_tokens - prefix
    if k == n:
        return x.copy()                                                             # nothing dropped
    tokens = x[:, :, 0, :]                                                          # (B, C, N)
    rows = np.arange(b)[:, None]                                                    # (B, 1)
    dropped = np.ones((b, n_tokens), bool)                                          # (B, N)
    dropped[:, :prefix] = False
    dropped[rows, index] = False
    w = np.zeros((b, n_tokens), np.int64)                                           # (B, N) weights
    w[:, prefix:] = score
    w[~dropped] = 0                                                                 # only the dropped tokens weigh
    total = w.sum(axis=1)                                                           # (B,), <= n * Hh * 127
    flat = total == 0                                                               # all dropped scores 0:
    w[flat] = dropped[flat]                                                         # a plain average
    total[flat] = n - k
    num = int_matmul(tokens, w[:, :, None])[:, :, 0]                                # (B, C): sum_j w_j x[c, j]
    package = divide_round(num, total[:, None], rounding)                           # (B, C), inside x's range
    kept = np.take_along_axis(tokens, index[:, None, :].astype(np.intp), axis=2)    # (B, C, k)
    out = np.concatenate([tokens[:, :, :prefix], kept, package[:, :, None].astype(x.dtype)], axis=2)
    return out[:, :, None, :]                                                       # (B, C, 1, P + k + 1)
