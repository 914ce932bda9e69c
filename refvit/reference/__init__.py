"""The reference kernels: docs/spec.md's pseudocode as plain integer code, the normative executable form.

One function per (op, variant) of `refvit.graph.KERNELS`, with the fast kernel's name, signature, output
dtype and shape and `internals`, so `run_graph(graph, constants, x, kernels=kernel_of)` runs a graph on them.
Plain int64 NumPy (sums of products as int64 `einsum`) and Python ints: no float arithmetic on values, no
chunked float BLAS, no cached tables; each function's docstring names its spec section. The fast kernels
(`refvit.intmath`, `refvit.int_kernels*`) are the default and are tested equal to these
(tests/test_reference_kernels.py).

Modules: `arith` (Part 1: saturate, rounding_shift_right, apply_scale in both rounding modes, requantize,
isqrt), `kernels` (Part 2, and Part 3's split_qkv / gather_prefix), `variants` (Part 4), `prune` (Token pruning).
"""
from __future__ import annotations

from refvit.reference import kernels, prune, variants

REFERENCE_KERNELS = {  # (op, variant) -> reference kernel; the keys are refvit.graph.KERNELS'
    ("conv2d", "w8"): kernels.conv2d,
    ("conv2d", "w4"): variants.conv2d_w4,
    ("conv2d", "mixed-pot"): variants.conv2d_mixed_pot,
    ("layernorm", "int64"): kernels.layernorm,
    ("layernorm", "int32"): variants.layernorm_int32,
    ("layernorm", "wide"): variants.layernorm_wide,
    ("split_heads", "channels"): kernels.split_qkv,
    ("attention_scores", "int32"): kernels.attention_scores,
    ("softmax", "table"): kernels.softmax,
    ("softmax", "poly"): variants.softmax_poly,
    ("softmax", "shift"): variants.softmax_shift,
    ("attention_context", "int32"): kernels.attention_context,
    ("add", "int8"): kernels.add,
    ("add", "int16"): variants.add_wide,
    ("gelu", "table"): kernels.gelu,
    ("gelu", "poly"): variants.gelu_poly,
    ("gelu", "shift"): variants.gelu_shift,
    ("concat_tokens", "prefix"): kernels.concat_tokens,
    ("gather_prefix", "channels"): kernels.gather_prefix,
    ("token_select", "cls_attention"): prune.select_tokens,
    ("token_prune", "package"): prune.prune_tokens,
}


def kernel_of(op):
    """The reference kernel of an op record (anything with `.op` and `.variant`): run_graph's `kernels` argument."""
    try:
        return REFERENCE_KERNELS[(op.op, op.variant)]
    except KeyError:
        raise ValueError(f"no reference kernel for op {op.op!r} variant {op.variant!r}") from None
