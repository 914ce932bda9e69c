"""The reference kernels: docs/spec.md's pseudocode as plain integer code, the normative executable form.

One function per (op, variant) of the op registry (`refvit.registry`: each row's `reference`), with the fast
kernel's name, signature, output dtype and shape and `internals`, so `run_graph(graph, constants, x,
kernels=refvit.graph.reference_kernels)` (`--kernels reference`) runs a graph on them. Plain int64 NumPy
(sums of products as int64 `einsum`) and Python ints: no float arithmetic on values, no chunked float BLAS,
no cached tables; each function's docstring names its spec section. The fast kernels (`refvit.intmath`,
`refvit.int_kernels*`) are the default and are tested equal to these (tests/test_reference_kernels.py).

Modules: `arith` (Part 1: saturate, rounding_shift_right, apply_scale in both rounding modes, requantize,
isqrt), `kernels` (Part 2, and Part 3's split_qkv / gather_prefix), `variants` (Part 4), `prune` (Token pruning).
"""
