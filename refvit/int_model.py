"""The integer DeiT: the conv form (B, C, 1, N) executed with refvit.int_kernels only.

Pure integer arithmetic from the int8 input to the int16 logits; every constant comes from a
QuantizedModel (refvit.quantize). With a Trace, every op is recorded in execution order with its
inputs, outputs and constants, which is what golden vectors and conformance checks are made of.
Reshapes between (B, C, g, g), (B, C, 1, N) and (B, Hh, D, N) keep the row-major byte order, so a
tensor is recorded once, in the layout named in its record.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import int_kernels as K
from .quantize import QuantizedModel

TOKENS = "NCHW (B,C,1,N)"
HEADS = "(B,Hh,D,N)"
SCORES = "(B,Hh,N,N) [query, key]"


@dataclass
class OpRecord:
    name: str            # op name == name of its output tensor
    op: str              # kernel name in refvit.int_kernels (or a data-movement op)
    inputs: list         # tensor names (earlier outputs, or 'input')
    constants: list      # constant names in QuantizedModel.tensors
    outputs: list        # tensor names
    attrs: dict = field(default_factory=dict)


@dataclass
class Trace:
    """Every intermediate integer tensor, and the ops that made them, in execution order."""
    ops: list = field(default_factory=list)
    tensors: dict = field(default_factory=dict)   # name -> ndarray
    layouts: dict = field(default_factory=dict)   # name -> layout string

    def record(self, name, op, inputs, constants, outputs: dict, layout: str, **attrs):
        self.ops.append(OpRecord(name, op, list(inputs), list(constants), list(outputs), attrs))
        for out_name, arr in outputs.items():
            self.tensors[out_name] = arr
            self.layouts[out_name] = layout


class _Run:
    """One forward pass: calls a kernel, records it when tracing, returns its output."""

    def __init__(self, qm: QuantizedModel, trace: Trace | None):
        self.T, self.rounding, self.trace = qm.tensors, qm.rounding, trace

    def __call__(self, name, op, fn, inputs: dict, constants: tuple, layout=TOKENS, **kw):
        out = fn(*inputs.values(), *(self.T[c] for c in constants), **kw)
        if self.trace is not None:
            attrs = {k: (np.dtype(v).name if k == "out_dtype" else v) for k, v in kw.items()}
            self.trace.record(name, op, inputs, constants, {name: out}, layout, **attrs)
        return out

    def conv(self, name, x_name, x, out_dtype=np.int8, layout=TOKENS):
        consts = tuple(f"{name}.{c}" for c in ("weight", "bias", "multiplier", "shift"))
        return self(name, "conv2d", K.conv2d, {x_name: x}, consts, layout, rounding=self.rounding,
                    out_dtype=out_dtype)

    def layernorm(self, name, x_name, x):
        consts = tuple(f"{name}.{c}" for c in ("eps_int", "weight", "bias", "multiplier", "shift"))
        return self(name, "layernorm", K.layernorm, {x_name: x}, consts, rounding=self.rounding)

    def add(self, name, a_name, a, b_name, b):
        """b is a tensor, or None when b_name is a constant (the position embedding)."""
        consts = tuple(f"{name}.{c}" for c in ("multiplier_a", "multiplier_b", "shift"))
        if b is None:
            return self(name, "add", K.add, {a_name: a}, (b_name,) + consts)
        return self(name, "add", K.add, {a_name: a, b_name: b}, consts)


def split_qkv(qkv: np.ndarray, part: int, num_heads: int) -> np.ndarray:
    """(B, 3C, 1, N) -> q (part 0), k (1) or v (2) as (B, Hh, D, N): a channel slice, then split_heads."""
    C = qkv.shape[1] // 3
    return K.split_heads(qkv[:, part * C:(part + 1) * C], num_heads)


def attention_context_merged(p, v, multiplier, shift, *, rounding):  # -> (B, C, 1, N)
    return K.merge_heads(K.attention_context(p, v, multiplier, shift, rounding=rounding))


def block(run: _Run, i: int, x_name: str, x: np.ndarray, num_heads: int):  # x int8 (B, C, 1, N)
    b = f"blocks.{i}."
    h = run.layernorm(b + "norm1", x_name, x)                                       # (B, C, 1, N)
    qkv = run.conv(b + "attn.qkv", b + "norm1", h)                                  # (B, 3C, 1, N)
    q, k, v = (run(b + f"attn.{t}", "split_heads", split_qkv, {b + "attn.qkv": qkv}, (), HEADS,
                   part=j, num_heads=num_heads) for j, t in enumerate("qkv"))         # 3 x (B, Hh, D, N)
    s = run(b + "attn.scores", "attention_scores", K.attention_scores,
            {b + "attn.q": q, b + "attn.k": k}, (), SCORES)                         # int32 (B, Hh, N, N)
    a = run(b + "attn.softmax", "softmax", K.softmax, {b + "attn.scores": s},
            (b + "attn.softmax.multiplier", b + "attn.softmax.shift", "exp_table"), SCORES,
            rounding=run.rounding)                                                  # int8 (B, Hh, N, N)
    o = run(b + "attn.context", "attention_context", attention_context_merged,
            {b + "attn.softmax": a, b + "attn.v": v},
            (b + "attn.context.multiplier", b + "attn.context.shift"), rounding=run.rounding)  # (B, C, 1, N)
    o = run.conv(b + "attn.proj", b + "attn.context", o)                            # (B, C, 1, N)
    x = run.add(b + "residual1", x_name, x, b + "attn.proj", o)
    h = run.layernorm(b + "norm2", b + "residual1", x)
    h = run.conv(b + "mlp.fc1", b + "norm2", h)                                     # (B, 4C, 1, N)
    h = run(b + "mlp.gelu", "gelu", K.gelu, {b + "mlp.fc1": h}, (b + "mlp.gelu.table",))
    h = run.conv(b + "mlp.fc2", b + "mlp.gelu", h)                                  # (B, C, 1, N)
    return run.add(b + "residual2", b + "residual1", x, b + "mlp.fc2", h)


def gather_prefix(x: np.ndarray, num_prefix: int) -> np.ndarray:
    """(B, C, 1, N) -> (B, P*C, 1, 1): the cls [and dist] token columns stacked along channels."""
    B, C = x.shape[:2]
    return np.ascontiguousarray(x[:, :, 0, :num_prefix].transpose(0, 2, 1)).reshape(B, num_prefix * C, 1, 1)


def forward_int(qm: QuantizedModel, xq: np.ndarray, trace: Trace | None = None) -> np.ndarray:
    """int8 input (B, in_chans, H, W) -> int16 logits (B, K), at scale qm.tensors['logits.scale']."""
    cfg = qm.config
    expect = (cfg.in_chans, cfg.img_size, cfg.img_size)
    if not (isinstance(xq, np.ndarray) and xq.dtype == np.int8 and xq.ndim == 4 and xq.shape[1:] == expect):
        raise ValueError(f"forward_int: input must be int8 (B, {', '.join(map(str, expect))}), "
                         f"got {getattr(xq, 'dtype', type(xq).__name__)} {getattr(xq, 'shape', '')}")
    if trace is not None:
        trace.tensors["input"], trace.layouts["input"] = xq, "NCHW (B,C,H,W)"
    run = _Run(qm, trace)
    B = xq.shape[0]
    t = run.conv("patch_embed", "input", xq)                                        # (B, C, g, g)
    t = t.reshape(B, cfg.embed_dim, 1, cfg.num_patches)                             # (B, C, 1, Np), same bytes
    if trace is not None:
        trace.tensors["patch_embed"], trace.layouts["patch_embed"] = t, TOKENS
    t = run("tokens", "concat_tokens", lambda patches, prefix: K.concat_tokens(prefix, patches),
            {"patch_embed": t}, ("prefix_tokens",))                                 # (B, C, 1, N)
    x = run.add("embed", "tokens", t, "pos_embed", None)                            # (B, C, 1, N)
    x_name = "embed"
    for i in range(cfg.depth):
        x = block(run, i, x_name, x, cfg.num_heads)
        x_name = f"blocks.{i}.residual2"
    x = run.layernorm("norm", x_name, x)
    h = run("head_input", "gather_prefix", gather_prefix, {"norm": x}, (), "NCHW (B,P*C,1,1)",
            num_prefix=cfg.num_prefix_tokens)
    logits = run.conv("head", "head_input", h, out_dtype=np.int16, layout="NCHW (B,K,1,1)")
    return logits[:, :, 0, 0]


def quantize_input(qm: QuantizedModel, x: np.ndarray) -> np.ndarray:
    """The model boundary: float image (B, 3, H, W) -> int8 at the calibrated input scale."""
    return K.quantize_input(np.asarray(x, np.float64), float(qm.tensors["input.scale"]))


def logits_int8_model(qm: QuantizedModel, x: np.ndarray, trace: Trace | None = None) -> tuple[np.ndarray, float]:
    """Float images -> (int16 logits, their real scale)."""
    return forward_int(qm, quantize_input(qm, x), trace), float(qm.tensors["logits.scale"])
