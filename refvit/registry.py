"""The op registry: one row per (op, variant) of the integer graph, holding everything that is true of it.

A row names the fast kernel (the default; its `__name__` is the conformance DUT's method), the reference
kernel (`refvit.reference`, the spec's pseudocode as code, normative; the fast one is tested equal to it),
which kernel arguments are tensors (the rest are constants), how its offline constants are made from the
scales (`refvit.constants`), its output scale rule when that scale is not calibrated, what the kernel computes
inside (`golden --internals`), its TOSA emitter or the reason it has none, and its spec section. Everything
else reads the rows: the graph builder and the interpreter (`refvit.graph`), the quantizer, the golden dump,
the TOSA export, the conformance DUT and its reference outputs, the CLI help. An unknown (op, variant) is an
`UnknownOpError` everywhere.

Adding a variant: a kernel, a reference kernel, a spec section and one `register(OpVariant(...))`
(docs/architecture.md, "Where to add an op or a variant"). tests/test_registry.py registers a toy variant in
the test file alone and runs it through every layer.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import constants as C
from . import int_kernels as K
from . import int_kernels_prune as KP
from . import int_kernels_authors as KA
from .reference import authors as RH
from . import int_kernels_variants as KV
from . import int_kernels_a16 as KA16
from .errors import RefvitError
from .reference import kernels as RK
from .reference import params as RPA
from .reference import prune as RP
from .reference import variants as RV
from .reference import a16 as RA16

# Layouts of internals (docs/spec.md "Internals of the ops"). OUTPUT: as many elements as the op's output, in
# its order, reshaped to the record's shape and layout (a conv's acc, the merged-head context acc).
OUTPUT = None
PER_TOKEN = "NCHW (B,1,1,N) per token"
PER_ROW = "(B,Hh,N,1) per query row"


class GraphError(RefvitError):
    """A graph record that cannot be built, read or executed (unknown op, missing tensor, bad shape)."""


class UnknownOpError(GraphError):
    """An (op, variant) that no registry row describes, or a row that contradicts the registry."""


@dataclass(frozen=True)
class OpVariant:
    """Everything that is true of one (op, variant).

    inputs: the kernel's tensor arguments in its argument order; its other positional arguments are constants
    (named `<op name>.<argument>` unless `constant_names` says otherwise: '{name}' is the op's name).
    constants: offline (op record, refvit.constants.Context) -> {constant name: array}; None: none.
    scale: (op record, scales) -> the output's real scale when the record does not calibrate it; None: none.
    internals: {internal: layout} that the kernel fills in its `internals` dict when given one.
    tosa: the name of the emitter in refvit.export_tosa (or an emitter function); no_tosa: why there is none.
    cases: the conformance case family: None when the suite's own families (conformance/cases.py) name the
    kernel, or a function () -> [(name, inputs, params, note, quick)] for a variant registered elsewhere.
    quantizer_options: the scheme options its own constants read besides the scales (e.g. 'pot_fraction'; the
    table of spec Part 3 lists them); the options every variant's constants follow (`scales`, `weights`) are
    not repeated."""
    op: str
    variant: str
    kernel: Callable
    reference: Callable
    inputs: tuple
    summary: str
    spec: str
    constants: Callable | None = None
    scale: Callable | None = None
    constant_names: dict = field(default_factory=dict)
    internals: dict = field(default_factory=dict)
    tosa: str | Callable | None = None
    no_tosa: str | None = None
    cases: Callable | None = None
    data_movement: bool = False
    quantizer_options: tuple = ()

    @property
    def key(self) -> tuple:
        return (self.op, self.variant)

    @property
    def kernel_name(self) -> str:
        """The name of the function that computes it: refvit's, and a conformance DUT's method."""
        return self.kernel.__name__

    def _params(self) -> list:
        return [p for p in inspect.signature(self.kernel).parameters.values() if p.name != "internals"]

    @property
    def positional_args(self) -> tuple:
        """The kernel's tensor and constant arguments, in its argument order."""
        return tuple(p.name for p in self._params() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))

    @property
    def constant_args(self) -> tuple:
        """The kernel's constant arguments, in its argument order."""
        return tuple(p.name for p in self._params()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in self.inputs)

    @property
    def attrs(self) -> tuple:
        """The kernel's keyword-only arguments (a record's attrs)."""
        return tuple(p.name for p in self._params() if p.kind == p.KEYWORD_ONLY)

    @property
    def takes_rounding(self) -> bool:
        return "rounding" in self.attrs

    def constant_name(self, op_name: str, arg: str) -> str:
        return self.constant_names.get(arg, "{name}." + arg).format(name=op_name)

    def check(self) -> None:
        """The row against its kernels: every input is a kernel argument, the reference takes the same
        arguments, a TOSA emitter or the reason, internals only where the kernel takes the dict."""
        def fail(why):
            raise UnknownOpError(f"registry row {self.op}/{self.variant}: {why}")
        names = [p.name for p in self._params()]
        missing = [a for a in self.inputs if a not in names]
        if missing:
            fail(f"inputs {missing} are not arguments of {self.kernel_name}")
        ref = [p.name for p in inspect.signature(self.reference).parameters.values() if p.name != "internals"]
        if ref != names:
            fail(f"reference kernel {getattr(self.reference, '__name__', self.reference)}{ref} and kernel "
                 f"{self.kernel_name}{names} differ")
        if (self.tosa is None) == (self.no_tosa is None):
            fail("give exactly one of tosa (an emitter) and no_tosa (why there is none)")
        if self.internals and "internals" not in inspect.signature(self.kernel).parameters:
            fail(f"lists internals but {self.kernel_name} takes no internals dict")
        unknown = [a for a in self.constant_names if a not in self.constant_args]
        if unknown:
            fail(f"constant_names {unknown} are not constant arguments of {self.kernel_name}")


_ROWS: dict = {}
_generation = [0]


def register(row: OpVariant) -> OpVariant:
    """Add a row (checked); its kernel name must be new unless the row shares its kernel with another."""
    if row.key in _ROWS:
        raise UnknownOpError(f"op {row.op!r} variant {row.variant!r} is registered already")
    row.check()
    for other in _ROWS.values():
        if other.kernel_name == row.kernel_name and other.kernel is not row.kernel:
            raise UnknownOpError(f"kernel name {row.kernel_name!r} of {row.op}/{row.variant} is taken by "
                                 f"{other.op}/{other.variant}")
    _ROWS[row.key] = row
    _generation[0] += 1
    return row


def unregister(op: str, variant: str) -> None:
    del _ROWS[(op, variant)]
    _generation[0] += 1


@contextmanager
def registered(row: OpVariant):
    """A row registered for the duration of a with-block (tests)."""
    register(row)
    try:
        yield row
    finally:
        unregister(row.op, row.variant)


def generation() -> int:
    """Changes whenever a row is added or removed (caches keyed on it stay true)."""
    return _generation[0]


def rows() -> tuple:
    return tuple(_ROWS.values())


def row(op: str, variant: str) -> OpVariant:
    try:
        return _ROWS[(op, variant)]
    except KeyError:
        raise UnknownOpError(f"unknown op {op!r} variant {variant!r}; known: "
                             f"{', '.join(f'{o}/{v}' for o, v in _ROWS)}") from None


def variants(op: str) -> list:
    return [v for o, v in _ROWS if o == op]


def by_kernel_name(name: str) -> OpVariant:
    for r in _ROWS.values():
        if r.kernel_name == name:
            return r
    raise UnknownOpError(f"no registered op variant has the kernel {name!r}")


def markdown_table() -> str:
    """The rows as the Markdown table of docs/spec.md Part 3 ("The op registry"; tests/test_docs.py keeps the
    spec's copy equal to this)."""
    lines = ["| op | variant | kernel (DUT method) | tensor inputs | constants | attrs | internals | scheme options "
             "| TOSA | specified in |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in _ROWS.values():
        lines.append(f"| `{r.op}` | `{r.variant}` | `{r.kernel_name}` | {', '.join(r.inputs)} | "
                     f"{', '.join(r.constant_args) or '—'} | {', '.join(r.attrs) or '—'} | "
                     f"{', '.join(r.internals) or '—'} | {', '.join(r.quantizer_options) or '—'} | "
                     f"{'yes' if r.tosa else 'no'} | {r.spec} |")
    return "\n".join(lines)


def internals_help() -> str:
    """What `golden --internals` dumps, by kernel (the CLI help text)."""
    return "; ".join(f"{r.kernel_name}: {', '.join(r.internals)}" for r in _ROWS.values() if r.internals)


def rescale_constant_suffixes() -> tuple:
    """`.<argument>` of every rescale constant (multiplier*, shift*) of a row: the golden manifest states their
    values (and those of every scalar constant)."""
    return tuple(sorted({"." + a for r in _ROWS.values() for a in r.constant_args
                         if a.startswith(("multiplier", "shift"))}))


# ---------------------------------------------------------------------------------------------
# data movement (no arithmetic): the two ops the graph adds besides the kernels
# ---------------------------------------------------------------------------------------------

def split_qkv(qkv: np.ndarray, *, part: int, num_heads: int) -> np.ndarray:
    """(B, 3C, 1, N) -> q (part 0), k (1) or v (2) as (B, Hh, D, N): a channel slice, then split_heads."""
    C3 = qkv.shape[1] // 3
    return K.split_heads(qkv[:, part * C3:(part + 1) * C3], num_heads)       # (B, Hh, D, N)


def gather_prefix(x: np.ndarray, *, num_prefix: int) -> np.ndarray:
    """(B, C, 1, N) -> (B, P*C, 1, 1): the cls [and dist] token columns stacked along channels."""
    B, Cw = x.shape[:2]
    return np.ascontiguousarray(x[:, :, 0, :num_prefix].transpose(0, 2, 1)).reshape(B, num_prefix * Cw, 1, 1)


# ---------------------------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------------------------

_CONV = "int8 x (B, Cin, H, W), stride = kernel k -> out_dtype (B, Cout, H/k, W/k); per-channel requantize"
_LN = {"sum": PER_TOKEN, "d": OUTPUT, "sumsq": PER_TOKEN, "root": PER_TOKEN, "recip": PER_TOKEN,
       "t": OUTPUT, "acc": OUTPUT}
_SOFTMAX_TAIL = {"exp": OUTPUT, "sum": PER_ROW, "recip": PER_ROW}
_NO_64 = "and TOSA has no 64-bit integer type"

for _row in (
    OpVariant("conv2d", "w8", K.conv2d, RK.conv2d, ("x",), _CONV, "Part 2, conv2d",
              constants=C.conv_constants, internals={"acc": OUTPUT}, tosa="_conv2d"),
    OpVariant("conv2d", "w4", KV.conv2d_w4, RV.conv2d_w4, ("x",),
              "conv2d with 4-bit weight codes in [-7, 7] (stored as int8), one requantization per channel",
              "Part 4, conv2d_w4", constants=C.conv_w4_constants, internals={"acc": OUTPUT}, tosa="_conv2d"),
    OpVariant("conv2d", "mixed-pot", KV.conv2d_mixed_pot, RV.conv2d_mixed_pot, ("x",),
              "conv2d whose rows flagged in pot_rows (bool (Cout,)) hold only 0, +-2^k (k <= 6), the rest int8",
              "Part 4, conv2d_mixed_pot", constants=C.conv_mixed_pot_constants, internals={"acc": OUTPUT},
              tosa="_conv2d", quantizer_options=("pot_fraction",)),
    OpVariant("layernorm", "int64", K.layernorm, RK.layernorm, ("x",),
              "Integer LayerNorm over channels of int8 (B, C, H, W) -> int8",
              "Part 2, layernorm", constants=C.layernorm_constants, constant_names={"gamma": "{name}.weight"},
              internals=_LN, no_tosa="its sum of squares reaches 2^50 and its square root takes a 62-bit value, "
              + _NO_64 + " (layernorm 'int32' has 32-bit intermediates)"),
    OpVariant("layernorm", "int32", KV.layernorm_int32, RV.layernorm_int32, ("x",),
              "LayerNorm with every intermediate in 32 bits: int8 or int16 (B, C, H, W) -> int8",
              "Part 4, layernorm_int32", constants=C.layernorm_int32_constants,
              constant_names={"gamma": "{name}.weight"},
              internals={"sum": PER_TOKEN, "d": OUTPUT, "k": PER_TOKEN, "ds": OUTPUT, "sumsq": PER_TOKEN,
                         "root": PER_TOKEN, "recip": PER_TOKEN, "t": OUTPUT, "acc": OUTPUT},
              tosa="_layernorm_int32"),
    OpVariant("layernorm", "wide", KV.layernorm_wide, RV.layernorm_wide, ("x",),
              "Part 2's layernorm on int8 or int16 (B, C, H, W) -> int8",
              "Part 4, layernorm_wide", constants=C.layernorm_constants, constant_names={"gamma": "{name}.weight"},
              internals=_LN, no_tosa="its sum of squares reaches 2^61 (int16 input) and its square root a 62-bit "
              "value, " + _NO_64 + " (layernorm 'int32' has 32-bit intermediates)"),
    OpVariant("split_heads", "channels", split_qkv, RK.split_qkv, ("qkv",),
              "(B, 3C, 1, N) -> q, k or v (part 0, 1, 2) as (B, Hh, D, N)", "Part 3, split_heads",
              scale=None, tosa="_split_heads", data_movement=True),
    OpVariant("attention_scores", "int32", K.attention_scores, RK.attention_scores, ("q", "k"),
              "int8 (B, Hh, D, N) x2 -> int32 (B, Hh, N, N)",
              "Part 2, attention_scores", scale=C.scale_of_product, tosa="_attention_scores"),
    OpVariant("softmax", "table", K.softmax, RK.softmax, ("scores",),
              "int32 (..., N) -> int8 probabilities at scale 1/127 over the last axis", "Part 2, softmax",
              constants=C.softmax_table_constants, scale=C.scale_of_probabilities,
              constant_names={"exp_table": "exp_table"},
              internals={"index": OUTPUT, **_SOFTMAX_TAIL}, tosa="_softmax_table"),
    OpVariant("softmax", "poly", KV.softmax_poly, RV.softmax_poly, ("scores",),
              "Softmax with I-BERT's i-exp at 2^-14: int32 (..., N) -> int8 probabilities at 1/127",
              "Part 4, softmax_poly", constants=C.softmax_exp_constants, scale=C.scale_of_probabilities,
              internals={"diff": OUTPUT, **_SOFTMAX_TAIL}, tosa="_softmax_poly"),
    OpVariant("softmax", "shift", KV.softmax_shift, RV.softmax_shift, ("scores",),
              "Softmax with I-ViT's ShiftExp (Shiftmax) at 2^-14: int32 (..., N) -> int8 probabilities at 1/127",
              "Part 4, softmax_shift", constants=C.softmax_exp_constants, scale=C.scale_of_probabilities,
              internals={"diff": OUTPUT, **_SOFTMAX_TAIL}, tosa="_softmax_shift"),
    OpVariant("attention_context", "int32", K.attention_context, RK.attention_context, ("p", "v"),
              "int8 p (B, Hh, N, N), v (B, Hh, D, N) -> int8 (B, Hh, D, N)", "Part 2, attention_context",
              constants=C.context_constants, internals={"acc": OUTPUT}, tosa="_attention_context"),
    OpVariant("add", "int8", K.add, RK.add, ("a", "b"),
              "saturate(rounding_shift_right(a*multiplier_a + b*multiplier_b, shift)); b broadcasts to a",
              "Part 2, add", constants=C.add_constants, tosa="_add_int8"),
    OpVariant("add", "int16", KV.add_wide, RV.add_wide, ("a", "b"),
              "Part 2's add on int8 or int16 operands, out_dtype int16 or int8; b broadcasts to a",
              "Part 4, add_wide", constants=C.add_constants,
              no_tosa="an int16 operand times a 31-bit multiplier reaches 2^46, " + _NO_64
              + " (the int8 add is realized exactly in 32 bits)"),
    OpVariant("gelu", "table", K.gelu, RK.gelu, ("x",), "table[x + 128], int8", "Part 2, gelu",
              constants=C.gelu_table_constants, tosa="_gelu_table"),
    OpVariant("gelu", "poly", KV.gelu_poly, RV.gelu_poly, ("x",),
              "I-BERT i-GELU (HeatViT delta folded into c_1 and the rescale): int8 x, any shape -> int8",
              "Part 4, gelu_poly", constants=C.gelu_poly_constants, tosa="_gelu_poly",
              quantizer_options=("gelu_delta",)),
    OpVariant("gelu", "shift", KV.gelu_shift, RV.gelu_shift, ("x",),
              "I-ViT ShiftGELU x * sigmoid(1.702 x) with exp through shifts: int8 x, any shape -> int8",
              "Part 4, gelu_shift", constants=C.gelu_shift_constants, tosa="_gelu_shift"),
    OpVariant("concat_tokens", "prefix", K.concat_tokens, RK.concat_tokens, ("patches",),
              "int8 prefix (1, C, 1, P) broadcast over B, patches (B, C, 1, Np) -> (B, C, 1, P + Np)",
              "Part 2, concat_tokens", constants=C.concat_constants, scale=C.scale_of_first_input,
              constant_names={"prefix": "prefix_tokens"}, tosa="_concat_tokens"),
    OpVariant("gather_prefix", "channels", gather_prefix, RK.gather_prefix, ("x",),
              "(B, C, 1, N) -> (B, P*C, 1, 1): the prefix token columns stacked along channels",
              "Part 3, gather_prefix", scale=C.scale_of_first_input, tosa="_gather_prefix", data_movement=True),
    OpVariant("token_select", "cls_attention", KP.select_tokens, RP.select_tokens, ("p",),
              "int8 p (B, Hh, N, N) -> int32 (B, keep): positions of the patch tokens with the largest sum over "
              "heads of p[:, h, 0, j] (ties: lower position first), ascending", "Token pruning, select_tokens",
              no_tosa="token pruning is not exported (a data-dependent gather)"),
    OpVariant("token_prune", "package", KP.prune_tokens, RP.prune_tokens, ("x", "p", "index"),
              "x (B, C, 1, N), p, index (B, k) -> (B, C, 1, P + k + 1): prefix, kept tokens, the score-weighted "
              "average of the dropped ones (exact quotient, ties by the rounding mode)", "Token pruning, prune_tokens",
              scale=C.scale_of_x, no_tosa="token pruning is not exported (a data-dependent gather)"),
):
    register(_row)


# ---------------------------------------------------------------------------------------------
# the authors' code (issue 19): I-BERT's released kernels, I-ViT's 16-bit Shiftmax, EViT's pruning options
# ---------------------------------------------------------------------------------------------

_PRUNE_NO_TOSA = "token pruning is not exported (a data-dependent gather)"
for _row in (
    OpVariant("gelu", "poly-ibert-code", KA.gelu_poly_ibert_code, RH.gelu_poly_ibert_code, ("x",),
              "i-GELU as I-BERT's code computes it (erf argument unit s_in / 1.4142): int8 x, any shape -> int8",
              "Part 4, gelu_poly_ibert_code", constants=C.gelu_poly_ibert_code_constants, tosa="_gelu_poly"),
    OpVariant("softmax", "poly-ibert-code", KA.softmax_poly_ibert_code, RH.softmax_poly_ibert_code, ("scores",),
              "Softmax with I-BERT's code i-exp (x0 = -0.6931, 0.35815147 x^2 + 0.96963238 x + 1) at 2^-14: "
              "int32 (..., N) -> int8 probabilities at 1/127", "Part 4, softmax_poly_ibert_code",
              constants=C.softmax_exp_constants, scale=C.scale_of_probabilities,
              internals={"diff": OUTPUT, **_SOFTMAX_TAIL}, tosa="_softmax_poly_ibert_code"),
    OpVariant("softmax", "shift16", KA.softmax_shift16, RH.softmax_shift16, ("scores",),
              "Shiftmax with I-ViT's 16-bit output: int32 (..., N) -> int16 probabilities in [0, 32767] at 2^-15",
              "Part 4, softmax_shift16", constants=C.softmax_exp_constants, scale=C.scale_of_probabilities16,
              internals={"diff": OUTPUT, **_SOFTMAX_TAIL},
              no_tosa="no emitter written yet (its output stage is an int32 MUL by (2^31 - 1) // sum and a "
              "16-bit shift, which TOSA can express)"),
    OpVariant("attention_context", "p16", KA.attention_context_p16, RH.attention_context_p16, ("p", "v"),
              "int16 p (B, Hh, N, N) at 2^-15, int8 v (B, Hh, D, N) -> int8 (B, Hh, D, N); N <= 512",
              "Part 4, attention_context_p16", constants=C.context_p16_constants, internals={"acc": OUTPUT},
              no_tosa="TOSA's int16 x int8 MATMUL does not exist (int16 x int16 gives int48) and no emitter "
              "is written for the int16 x int16 form"),
    OpVariant("layernorm", "ibert-code", KA.layernorm_ibert_code, RH.layernorm_ibert_code, ("x",),
              "LayerNorm as I-BERT's code normalises (integer mean, no eps, 2^31 // isqrt(var)), Part 2's "
              "gamma/beta tail: int8 (B, C, H, W) -> int8", "Part 4, layernorm_ibert_code",
              constants=C.layernorm_ibert_code_constants, constant_names={"gamma": "{name}.weight"},
              internals={"sum": PER_TOKEN, "mean": PER_TOKEN, "y": OUTPUT, "sumsq": PER_TOKEN, "root": PER_TOKEN,
                         "recip": PER_TOKEN, "norm": OUTPUT, "t": OUTPUT, "acc": OUTPUT},
              no_tosa="no emitter is written (y * (2^31 // std) reaches 2^31, one bit beyond int32; TOSA could "
              "take it as y (factor >> 1) + floor(y (factor & 1) / 2), and var < 2^28 in 32-bit isqrt)"),
    OpVariant("token_select", "cls_attention-score-order", KA.select_tokens_score_order, RH.select_tokens_score_order, ("p",),
              "int8 p (B, Hh, N, N) -> int32 (B, keep): cls_attention's kept positions in score order (larger "
              "score first, ties: lower position first), as EViT's top-k", "Token pruning, select_tokens_score_order",
              no_tosa=_PRUNE_NO_TOSA),
    OpVariant("token_prune", "mean-any-order", KA.prune_tokens_mean_any_order, RH.prune_tokens_mean_any_order, ("x", "p", "index"),
              "token_prune 'package' with the kept tokens in the index's order (any order of distinct positions)",
              "Token pruning, prune_tokens_mean_any_order", scale=C.scale_of_x, no_tosa=_PRUNE_NO_TOSA),
    OpVariant("token_prune", "weighted-sum", KA.prune_tokens_weighted_sum, RH.prune_tokens_weighted_sum, ("x", "p", "index"),
              "x (B, C, 1, N), p, index (B, k) (any order) -> (B, C, 1, P + k + 1): prefix, kept tokens, EViT's "
              "package: the dropped tokens' sum weighted by the head-mean cls attention, not normalised",
              "Token pruning, prune_tokens_weighted_sum", scale=C.scale_of_x, no_tosa=_PRUNE_NO_TOSA),
):
    register(_row)

# scheme parameters (issue 19; docs/spec.md Part 6)
register(OpVariant("conv2d", "pot", KV.conv2d_pot, RPA.conv2d_pot, ("x",),
                   "conv2d with power-of-two scales: int32 acc, a rounding right shift per channel (no multiplier)",
                   "Part 6, conv2d_pot", constants=C.conv_pot_constants, internals={"acc": OUTPUT},
                   tosa="_conv2d_pot"))
_NARROW = "TOSA's accumulators are 32 (int8) or 48 bits (int16) wide; a narrower one that saturates or wraps " \
          "has no TOSA operator"
_NARROW_ACC = {"acc_exact": OUTPUT, "acc": OUTPUT}
for _row in (
    OpVariant("conv2d", "acc-narrow", KV.conv2d_narrow, RPA.conv2d_narrow, ("x",),
              "conv2d whose accumulator has acc_bits bits and saturates or wraps (acc_overflow), then requantize",
              "Part 6, conv2d_narrow", constants=C.conv_constants, internals=_NARROW_ACC, no_tosa=_NARROW),
    OpVariant("attention_scores", "acc-narrow", KV.attention_scores_narrow, RPA.attention_scores_narrow, ("q", "k"),
              "q . k accumulated in acc_bits bits, saturating or wrapping -> int32 (B, Hh, N, N)",
              "Part 6, attention_scores_narrow", scale=C.scale_of_product, no_tosa=_NARROW),
    OpVariant("attention_context", "acc-narrow", KV.attention_context_narrow, RPA.attention_context_narrow,
              ("p", "v"), "sum_j p v accumulated in acc_bits bits, saturating or wrapping, then requantize -> int8",
              "Part 6, attention_context_narrow", constants=C.context_constants, internals=_NARROW_ACC,
              no_tosa=_NARROW),
    OpVariant("softmax", "table-n", KV.softmax_table_n, RPA.softmax_table_n, ("scores",),
              "Part 2's table softmax with an exp table of 64 ... 4096 entries at index step 2^-b: int32 (..., N) "
              "-> int8 probabilities at 1/127", "Part 6, softmax_table_n", constants=C.softmax_table_n_constants,
              scale=C.scale_of_probabilities, constant_names={"exp_table": "exp_table"},
              internals={"index": OUTPUT, **_SOFTMAX_TAIL}, quantizer_options=("exp_table_size", "exp_index_bits"),
              tosa="_softmax_table_n"),
    OpVariant("gelu", "table-n", KV.gelu_table_n, RPA.gelu_table_n, ("x",),
              "table[(x + 128) >> log2(256 / L)], L = 16 ... 256 entries: int8 x, any shape -> int8",
              "Part 6, gelu_table_n", constants=C.gelu_table_n_constants, quantizer_options=("gelu_table_size",),
              tosa="_gelu_table_n"),
):
    register(_row)


# 16-bit activations (act_bits 16, the scheme a16w8; docs/spec.md Part 7): int16 x int8 into int48 accumulators
A16 = "a16"
_NO_TOSA_A16 = ("no a16 graph can be exported, since its LayerNorm needs 64-bit intermediates (layernorm_a16); TOSA's "
                "int16 x int8 CONV2D, int16 MATMUL into int48 and RESCALE with a 16-bit multiplier would express "
                "this op, but no emitter is written for a graph that cannot export whole")
for _row in (
    OpVariant("conv2d", A16, KA16.conv2d_a16, RA16.conv2d_a16, ("x",),
              "int16 x (B, Cin, H, W), int8 weights, int64 bias, int48 acc -> out_dtype; per-channel apply_scale_16",
              "Part 7, conv2d_a16", constants=C.conv_a16_constants, internals={"acc": OUTPUT}, no_tosa=_NO_TOSA_A16),
    OpVariant("attention_scores", A16, KA16.attention_scores_a16, RA16.attention_scores_a16, ("q", "k"),
              "int16 (B, Hh, D, N) x2 -> int64 (B, Hh, N, N), an int48 value", "Part 7, attention_scores_a16",
              scale=C.scale_of_product, no_tosa=_NO_TOSA_A16),
    OpVariant("softmax", A16, KA16.softmax_a16, RA16.softmax_a16, ("scores",),
              "int48 scores (..., N) -> int16 probabilities in [0, 32767] at 1/32767 (Part 6's exp table, "
              "apply_scale_16 front end)", "Part 7, softmax_a16", constants=C.softmax_a16_constants,
              scale=C.scale_of_probabilities_a16, constant_names={"exp_table": "exp_table"},
              internals={"index": OUTPUT, **_SOFTMAX_TAIL}, quantizer_options=("exp_table_size", "exp_index_bits"),
              no_tosa=_NO_TOSA_A16),
    OpVariant("attention_context", A16, KA16.attention_context_a16, RA16.attention_context_a16, ("p", "v"),
              "int16 p (B, Hh, N, N) at 1/32767, int16 v (B, Hh, D, N) -> int16 (B, Hh, D, N); int48 acc",
              "Part 7, attention_context_a16", constants=C.context_a16_constants, internals={"acc": OUTPUT},
              no_tosa=_NO_TOSA_A16),
    OpVariant("layernorm", A16, KA16.layernorm_a16, RA16.layernorm_a16, ("x",),
              "Part 4's layernorm_wide on int16 (B, C, H, W) -> int16", "Part 7, layernorm_a16",
              constants=C.layernorm_constants, constant_names={"gamma": "{name}.weight"}, internals=_LN,
              no_tosa="its sum of squares reaches 2^61 and its square root a 62-bit value, " + _NO_64),
    OpVariant("gelu", A16, KA16.gelu_a16, RA16.gelu_a16, ("x",), "table[x + 32768], int16 (65536 entries)",
              "Part 7, gelu_a16", constants=C.gelu_a16_constants,
              no_tosa="not emitted yet: TOSA TABLE on int16 has 513 interpolated entries, not a 65536-entry table"),
):
    register(_row)
