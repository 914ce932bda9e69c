"""The token pruning kernels written as docs/spec.md, "Token pruning": the class token's attention scores, the
selection by rank, and the package token by an exact rounded division. Plain int64 NumPy and Python ints; same
signatures and outputs as `refvit.int_kernels_prune`.
"""
from __future__ import annotations

import numpy as np

from refvit.reference.arith import DOUBLE_ROUND, ROUNDING_MODES, SINGLE_ROUND, require
from refvit.reference.kernels import MAX_TOKENS, PROB_ONE, array_arg, in_range, scalar_arg

MAX_SELECT_HEADS = 1 << 16


def cls_attention_scores(p, num_prefix, fn: str = "cls_attention_scores") -> np.ndarray:
    """docs/spec.md, Token pruning, cls_attention_scores: p int8 (B, Hh, N, N) -> int64 (B, N - P):

    score[b, j] = sum over h in [0, Hh) of p[b, h, 0, P + j]        for j in [0, n)
    """
    array_arg(p, fn, "p", np.int8, 4)
    B, Hh, Nq, N = p.shape
    require(Nq == N and N <= MAX_TOKENS and Hh <= MAX_SELECT_HEADS, fn, f"p must be (B, Hh, N, N), got {p.shape}")
    P = scalar_arg(num_prefix, fn, "num_prefix", 1, N - 1)
    row = p[:, :, 0, P:].astype(np.int64)                               # (B, Hh, n): the cls query's row
    require(in_range(row, 0, PROB_ONE), fn, "p must be in [0, 127] (probabilities at scale 1/127)")
    return row.sum(axis=1)                                              # (B, n)


def select_tokens(p, *, keep, num_prefix) -> np.ndarray:
    """docs/spec.md, Token pruning, select_tokens -> int32 (B, keep): token j is kept iff fewer than `keep`
    tokens i rank before it, i.e. have score_i > score_j, or score_i == score_j and i < j; the kept
    positions P + j in increasing order."""
    fn = "select_tokens"
    score = cls_attention_scores(p, num_prefix, fn)                     # (B, n)
    B, n = score.shape
    P = int(num_prefix)
    keep = scalar_arg(keep, fn, "keep", 1, n)
    index = np.empty((B, keep), np.int32)
    j = np.arange(n)
    for b in range(B):
        s = score[b]
        before = (s[:, None] > s[None, :]) | ((s[:, None] == s[None, :]) & (j[:, None] < j[None, :]))  # [i, j]
        rank = before.sum(axis=0)                                       # rank[j]: how many tokens rank before j
        index[b] = P + j[rank < keep]                                   # ascending positions
    return index


def divide_round(num: int, den: int, rounding: str = SINGLE_ROUND) -> int:
    """docs/spec.md, Token pruning, divide_round: num / den (den > 0) rounded, a tie as the rounding mode rounds:

    SINGLE_ROUND: floor((2 num + den) / (2 den))                        # half up
    DOUBLE_ROUND: sign(num) * floor((2 |num| + den) / (2 den))          # half away from zero
    """
    require(rounding in ROUNDING_MODES and den > 0, "divide_round", "rounding mode and den > 0 required")
    if rounding == DOUBLE_ROUND:
        sign = (num > 0) - (num < 0)
        return sign * ((2 * abs(num) + den) // (2 * den))
    return (2 * num + den) // (2 * den)


def prune_tokens(x, p, index, *, num_prefix, rounding: str = SINGLE_ROUND) -> np.ndarray:
    """docs/spec.md, Token pruning, prune_tokens -> x's dtype (B, C, 1, P + k + 1), or x when k = n:

    D = [P, N) minus index[b, :]
    w[t] = score[b, t - P] for t in D ; W = sum of w[t] over D
    if W == 0: w[t] = 1 for t in D ; W = n - k
    num[c] = sum over t in D of w[t] * x[b, c, 0, t]
    package[c] = divide_round(num[c], W, rounding)
    out[b, :, 0, :] = [ x[b, :, 0, 0..P-1] | x[b, :, 0, index[b, 0]] ... x[b, :, 0, index[b, k-1]] | package ]
    """
    fn = "prune_tokens"
    array_arg(x, fn, "x", (np.int8, np.int16), 4)
    require(rounding in ROUNDING_MODES, fn, f"rounding must be one of {ROUNDING_MODES}")
    score = cls_attention_scores(p, num_prefix, fn)                     # (B, n)
    B, C, one, N = x.shape
    P = int(num_prefix)
    n = N - P
    require(one == 1 and p.shape[0] == B and p.shape[2] == N, fn, f"x {x.shape} and p {p.shape} must agree on B, N")
    array_arg(index, fn, "index", np.int32, 2)
    k = index.shape[1]
    require(index.shape[0] == B and 1 <= k <= n, fn, f"index must be (B, k) with 1 <= k <= {n}, got {index.shape}")
    require(in_range(index, P, N - 1) and np.all(np.diff(index, axis=1) > 0), fn,
            "index must hold increasing patch token positions")
    if k == n:
        return x.copy()                                                 # nothing dropped: no package token
    out = np.empty((B, C, 1, P + k + 1), x.dtype)
    for b in range(B):
        kept = [int(t) for t in index[b]]
        dropped = [t for t in range(P, N) if t not in kept]
        w = {t: int(score[b, t - P]) for t in dropped}
        W = sum(w.values())
        if W == 0:
            w = {t: 1 for t in dropped}
            W = n - k
        for c in range(C):
            num = sum(w[t] * int(x[b, c, 0, t]) for t in dropped)
            out[b, c, 0, P + k] = divide_round(num, W, rounding)         # in [min x, max x]: fits x's dtype
        out[b, :, 0, :P] = x[b, :, 0, :P]
        for i, t in enumerate(kept):
            out[b, :, 0, P + i] = x[b, :, 0, t]
    return out
