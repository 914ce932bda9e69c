"""The integer DeiT as data: an ordered list of op records, one builder, one interpreter.

`build_graph(config, rounding, scheme)` makes the list of `Op` records (docs/spec.md, Part 3, "Graph");
`run_graph(graph, constants, x, trace)` executes it with the kernels of `refvit.int_kernels` (or a
device's own per-op methods, for the conformance suite) and records every output when tracing. Everything
else is derived from the records: the constants a model needs (`required_constants`), the golden
manifest's op list (`Op.to_dict`), the conformance suite's block and model cases, and the quantizer's
calibration walk (the float conv form records its tensors under the same names).

Adding an op: a kernel, a reference kernel, a section in docs/spec.md, a row in `refvit.registry`, and a
line in the builder (docs/architecture.md, "Where to add an op or a variant").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase

import numpy as np

from . import registry as R
from .config import DeiTConfig, named_or_json
from .intmath import ROUNDING_MODES, SINGLE_ROUND
from .prune import prune_plan
from .registry import OUTPUT, GraphError, UnknownOpError

# Layouts (the letters of docs/spec.md): B images, C width, N tokens, Hh heads, D head width, K classes.
IMAGE = "NCHW (B,C,H,W)"
TOKENS = "NCHW (B,C,1,N)"
HEADS = "(B,Hh,D,N)"
SCORES = "(B,Hh,N,N) [query, key]"
PREFIX = "NCHW (B,P*C,1,1)"
LOGITS = "NCHW (B,K,1,1)"
KEPT = "(B,k) [kept token positions, ascending]"
KEPT_BY_SCORE = "(B,k) [kept token positions, score order]"
# the softmax variants whose probabilities are not int8: (dtype, the attention_context variant that reads them)
PROBABILITIES = {"shift16": ("int16", "p16"), R.A16: ("int16", R.A16)}
# prune setting (order, package) -> (token_select variant, token_prune variant) (docs/spec.md, "Token pruning")
PRUNE_VARIANTS = {("position", "mean"): ("cls_attention", "package"),
                  ("score", "mean"): ("cls_attention-score-order", "mean-any-order"),
                  ("position", "weighted-sum"): ("cls_attention", "weighted-sum"),
                  ("score", "weighted-sum"): ("cls_attention-score-order", "weighted-sum")}
BATCH = "B"                     # the batch dimension in a record's shape


# ---------------------------------------------------------------------------------------------
# the record
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    """One integer op: its output tensor carries its name.

    inputs / constants map the kernel's argument names to tensor / constant names, in the kernel's
    argument order (so `add`'s operand `a` and `b` are named). attrs are the kernel's keyword arguments.
    scale / weight_scale name the float64 constants that give the output's real scale and the per-channel
    real weight scales (reporting only; never read by the integer path); `calibrate` says the quantizer
    calibrates that scale on the float conv form's tensor of the same name."""
    name: str
    op: str                      # op type (the kernel family)
    variant: str                 # which integerization of it (docs/spec.md); (op, variant) picks the kernel
    inputs: dict
    constants: dict
    attrs: dict
    dtype: str                   # output dtype
    shape: tuple                 # output shape, BATCH for the batch dimension
    layout: str
    scale: str | None = None
    weight_scale: str | None = None
    calibrate: bool = False      # its scale comes from the float model's tensor of the same name

    @property
    def kernel(self) -> str:
        """The name of the function that computes it (refvit's, and a DUT's method)."""
        return kernel_name(self.op, self.variant)

    def shape_for(self, batch: int) -> tuple:
        return tuple(batch if d == BATCH else d for d in self.shape)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Op":
        """A record as stored in a file: every field's type checked (a file is untrusted input)."""
        if not isinstance(d, dict) or set(d) - set(cls.__dataclass_fields__) or not {
                "name", "op", "variant", "inputs", "constants", "attrs", "dtype", "shape", "layout"} <= set(d):
            raise GraphError(f"bad op record {str(d)[:120]}: fields must be {sorted(cls.__dataclass_fields__)}")
        name = d["name"]

        def bad(why):
            raise GraphError(f"bad op record {str(name)[:60]!r}: {why}")
        for key in ("name", "op", "variant", "dtype", "layout"):
            if not isinstance(d[key], str):
                bad(f"{key} must be a string, got {d[key]!r}"[:160])
        for key in ("inputs", "constants"):
            if not (isinstance(d[key], dict) and all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in d[key].items())):
                bad(f"{key} must map argument names to names")
        if not isinstance(d["attrs"], dict) or not all(isinstance(k, str) for k in d["attrs"]):
            bad("attrs must be an object")
        shape = d["shape"]
        if not (isinstance(shape, list) and shape and all(
                (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2**31) or v == BATCH for v in shape)):
            bad(f"shape must be a list of positive integers and {BATCH!r}, got {shape!r}"[:160])
        for key in ("scale", "weight_scale"):
            if d.get(key) is not None and not isinstance(d[key], str):
                bad(f"{key} must be a constant name or null")
        if not isinstance(d.get("calibrate", False), bool):
            bad("calibrate must be true or false")
        try:
            np.dtype(d["dtype"])
        except TypeError:
            bad(f"dtype {d['dtype']!r} is not a numpy dtype")
        return cls(**{**d, "shape": tuple(shape), "inputs": dict(d["inputs"]), "constants": dict(d["constants"]),
                      "attrs": dict(d["attrs"])})


def kernel_name(op: str, variant: str) -> str:
    """The name of the function that computes (op, variant) (an UnknownOpError for an unknown pair)."""
    return R.row(op, variant).kernel_name


def check_rounding(rounding: str) -> str:
    """The one check of a rounding mode name."""
    if rounding not in ROUNDING_MODES:
        raise GraphError(f"unknown rounding mode {rounding!r}; choose from {ROUNDING_MODES}")
    return rounding


# ---------------------------------------------------------------------------------------------
# the builder
# ---------------------------------------------------------------------------------------------

SCHEME_FIELDS = {"conv": "conv2d", "layernorm": "layernorm", "softmax": "softmax", "gelu": "gelu",
                 "residual": "add"}   # scheme field -> the op whose variant it picks


@dataclass(frozen=True)
class Scheme:
    """Which integerization each op family uses (docs/spec.md, Parts 2 and 4); today's INT8 scheme is the default.

    conv: the weights of the block convs (qkv, proj, fc1, fc2; the patch embedding and the head stay w8):
    w8 | w4 | mixed-pot (with `pot_fraction` of each layer's rows as powers of two). layernorm: int64 | int32
    | wide (int64, int8 or int16 input). softmax and gelu: table | poly | shift (gelu poly with `gelu_delta`).
    residual: the residual stream, int8 | int16 (the adds' outputs and the LayerNorms' inputs)."""
    name: str = "refvit-int8"
    conv: str = "w8"
    layernorm: str = "int64"
    softmax: str = "table"
    gelu: str = "table"
    residual: str = "int8"
    pot_fraction: float = 0.0
    gelu_delta: float = 1.0
    # scheme parameters (issue 19; docs/spec.md Part 6): a field at its default is left out of to_dict() and
    # options(), so the schemes made before them keep their files and records exactly
    weights: str = "per-channel"
    scales: str = "float"
    acc_bits: int = 32
    acc_overflow: str = "error"
    exp_table_size: int = 256
    exp_index_bits: int = 4
    gelu_table_size: int = 256
    act_bits: int = 8
    softmax_bits: int = 8

    def __post_init__(self):
        for fld, op in SCHEME_FIELDS.items():
            variant = getattr(self, fld)
            if variant not in R.variants(op):
                raise GraphError(f"scheme {self.name!r}: {op} variant {variant!r} is not one of {R.variants(op)}")
        if self.residual == "int16" and self.layernorm in ("int64", "ibert-code"):
            raise GraphError(f"scheme {self.name!r}: an int16 residual stream needs a LayerNorm that reads int16 "
                             f"(layernorm 'wide' or 'int32')")
        if not (isinstance(self.pot_fraction, (int, float)) and 0 <= self.pot_fraction <= 1):
            raise GraphError(f"scheme {self.name!r}: pot_fraction must be in [0, 1], got {self.pot_fraction!r}")
        if not (isinstance(self.gelu_delta, (int, float)) and 0 < self.gelu_delta <= 4):
            raise GraphError(f"scheme {self.name!r}: gelu_delta must be in (0, 4], got {self.gelu_delta!r}")
        _check_parameters(self)

    def to_dict(self) -> dict:
        """The fields, the scheme parameters only where they differ from their defaults."""
        return {k: v for k, v in asdict(self).items() if k not in PARAMETERS or v != PARAMETERS[k][0]}

    def parameters(self) -> dict:
        """Every field, the parameters included (`schemes --json`)."""
        return asdict(self)

    def options(self) -> dict:
        """The quantizer options (what the offline constants read besides the scales)."""
        return {"pot_fraction": self.pot_fraction, "gelu_delta": self.gelu_delta} | {
            k: v for k, v in asdict(self).items() if k in PARAMETERS and v != PARAMETERS[k][0]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        if not isinstance(d, dict):
            raise GraphError(f"a scheme is a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise GraphError(f"unknown scheme keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


# scheme parameter -> (default, allowed values); docs/spec.md Part 6
PARAMETERS = {"weights": ("per-channel", ("per-channel", "per-tensor")),
              "scales": ("float", ("float", "pot")),
              "acc_bits": (32, tuple(range(16, 33))),
              "acc_overflow": ("error", ("error", "saturate", "wrap")),
              "exp_table_size": (256, tuple(1 << k for k in range(6, 13))),
              "exp_index_bits": (4, tuple(range(0, 9))),
              "gelu_table_size": (256, tuple(1 << k for k in range(4, 9))),
              "act_bits": (8, (8, 16)),
              "softmax_bits": (8, (8, 16))}
SIZED_TABLE = "table-n"                  # the softmax / gelu variant of a table size other than part 2's
NARROW = "acc-narrow"                    # the variant of conv2d / attention_scores / attention_context (acc_overflow)
PER_CHANNEL_ONLY = ("w4", "mixed-pot")   # conv variants whose offline rule is per channel by definition
A16 = R.A16                              # the variant of every arithmetic op with act_bits 16 (Part 7)
A16_FIELDS = {"conv": "w8", "layernorm": "wide", "softmax": "table", "gelu": "table", "residual": "int16"}


def _check_parameters(sc: "Scheme") -> None:
    """The scheme parameters' values and combinations (one-line GraphErrors)."""
    for key, (_, allowed) in PARAMETERS.items():
        v = getattr(sc, key)
        if isinstance(v, bool) or v not in allowed:
            shown = (f"an integer in [{allowed[0]}, {allowed[-1]}]" if key in ("acc_bits", "exp_index_bits")
                     else " | ".join(map(str, allowed)))
            raise GraphError(f"scheme {sc.name!r}: {key} must be {shown}, got {v!r}")
    if sc.weights == "per-tensor" and sc.conv in PER_CHANNEL_ONLY:
        raise GraphError(f"scheme {sc.name!r}: conv {sc.conv!r} has a per-channel weight rule; per-tensor weights "
                         f"need conv 'w8' or 'pot'")
    for fld, sized in (("softmax", (sc.exp_table_size, sc.exp_index_bits) != (256, 4)),
                       ("gelu", sc.gelu_table_size != 256)):
        if getattr(sc, fld) == SIZED_TABLE:
            raise GraphError(f"scheme {sc.name!r}: {fld} {SIZED_TABLE!r} is chosen by the table size parameters, "
                             f"not by name")
        if sized and getattr(sc, fld) != "table":
            raise GraphError(f"scheme {sc.name!r}: a {fld} table size or index step needs {fld} 'table', got "
                             f"{getattr(sc, fld)!r}")
    if sc.conv == NARROW:
        raise GraphError(f"scheme {sc.name!r}: conv {NARROW!r} is chosen by acc_overflow saturate | wrap, not by name")
    if sc.acc_overflow != "error" and (sc.acc_bits == 32 or sc.conv != "w8"):
        raise GraphError(f"scheme {sc.name!r}: acc_overflow {sc.acc_overflow!r} needs acc_bits below 32 and conv "
                         f"'w8' (got acc_bits {sc.acc_bits}, conv {sc.conv!r})")
    for fld in SCHEME_FIELDS:
        if getattr(sc, fld) == A16:
            raise GraphError(f"scheme {sc.name!r}: {fld} {A16!r} is chosen by act_bits 16, not by name")
    if sc.act_bits == 16:
        need = A16_FIELDS | {"scales": "float", "acc_bits": 32, "softmax_bits": 16}
        wrong = {k: getattr(sc, k) for k, v in need.items() if getattr(sc, k) != v}
        if wrong:
            raise GraphError(f"scheme {sc.name!r}: act_bits 16 (Part 7) is defined with " + ", ".join(
                f"{k} {v!r}" for k, v in need.items()) + " (acc_bits 32: its accumulators are int48, not narrowed); "
                "got " + ", ".join(f"{k} {v!r}" for k, v in wrong.items()))
    elif sc.softmax_bits == 16 and sc.softmax not in ("shift", "shift16"):
        raise GraphError(f"scheme {sc.name!r}: 16-bit probabilities with int8 activations are defined for I-ViT's "
                         f"Shiftmax (softmax 'shift'); with softmax {sc.softmax!r} they need act_bits 16")
    if (sc.scales == "pot") != (sc.conv == "pot"):
        raise GraphError(f"scheme {sc.name!r}: power-of-two scales (scales 'pot') and the shift-only conv (conv "
                         f"'pot') go together; got scales {sc.scales!r} with conv {sc.conv!r}")


def scheme_of(graph, name: str, options: dict | None = None) -> Scheme:
    """The scheme a graph's records describe: each field's variant as its records have it (the block convs
    for `conv`: the patch embedding and the head stay w8), plus the quantizer options the constants were made
    with. The records are the truth; a scheme is their summary."""
    choices = {}
    for fld, op in SCHEME_FIELDS.items():
        found = {r.variant for r in graph if r.op == op and (fld != "conv" or r.name.startswith("blocks."))}
        if len(found) > 1:
            raise GraphError(f"the graph mixes {op} variants {sorted(found)}; a scheme has one")
        if found:
            choices[fld] = found.pop()
    if choices.get("conv") == NARROW:           # chosen by the options' acc_overflow: the weights are w8
        choices["conv"] = "w8"
    for fld, v in A16_FIELDS.items():           # chosen by the options' act_bits 16
        if choices.get(fld) == A16:
            choices[fld] = v
    for fld in ("softmax", "gelu"):             # chosen by the options' table sizes
        if choices.get(fld) == SIZED_TABLE:
            choices[fld] = "table"
    return Scheme(name=name, **choices, **(options or {}))


DEFAULT_SCHEME = Scheme()
SCHEMES = {s.name: s for s in (  # the named schemes (`python -m refvit schemes`)
    DEFAULT_SCHEME,
    Scheme("ibert", layernorm="ibert-code", softmax="poly-ibert-code", gelu="poly-ibert-code"),
    Scheme("ibert-paper", layernorm="int32", softmax="poly", gelu="poly"),
    Scheme("ivit", softmax="shift16", gelu="shift"),
    Scheme("ivit-paper", softmax="shift", gelu="shift"),
    Scheme("int16-residual", layernorm="wide", residual="int16"),
    Scheme("w4a8", conv="w4"),
    Scheme("mixed-pot", conv="mixed-pot", pot_fraction=0.5),
    Scheme("tosa-int32", layernorm="int32", softmax="poly"),
    Scheme("pot8", conv="pot", scales="pot"),
    Scheme("a16w8", layernorm="wide", residual="int16", act_bits=16, softmax_bits=16, exp_table_size=4096,
           exp_index_bits=8),
)}
SCHEME_NOTES = {
    "refvit-int8": "int8 everywhere; table GELU and exp; int64 LayerNorm; W8 per channel",
    "ibert": "I-BERT as its released code computes: i-GELU with k = 1.4142, i-exp with x0 = -0.6931 and the "
             "expanded polynomial, IntLayerNorm (integer mean, no eps, exact integer sqrt)",
    "ibert-paper": "I-BERT's paper formulas: i-GELU and i-exp (second-order polynomials), LayerNorm with 32-bit "
                   "intermediates",
    "ivit": "I-ViT as its DeiT runs: ShiftGELU and Shiftmax with 16-bit probabilities (int16 x int8 context)",
    "ivit-paper": "I-ViT's paper: ShiftGELU and Shiftmax (exp through shifts), 8-bit probabilities",
    "int16-residual": "int16 residual stream (symmetric per tensor), as TFLite's 16x8 mode; int64 LayerNorm on int16",
    "w4a8": "4-bit weights [-7, 7] per channel in the block convs (operand reordering: one requantization after)",
    "mixed-pot": "Auto-ViT-Acc: half of each block conv's rows as signed powers of two, the rest int8",
    "tosa-int32": "every op in TOSA's 32-bit integer types (export-tosa): int32 LayerNorm, i-exp softmax, table GELU",
    "pot8": "int8, every activation and weight scale a power of two (fixed-point positions, as FPGA DPUs): conv "
            "requantization a rounding shift, no multiplier",
    "a16w8": "int16 activations everywhere, int8 weights per channel, int48 accumulators rescaled with a 16-bit "
             "multiplier (TFLite's 16x8 mode, TOSA's int16 ops); 16-bit softmax (4096-entry exp table at 2^-8), "
             "65536-entry GELU table",
}


def resolve_scheme(spec) -> Scheme:
    """A named scheme, a JSON file describing one (any subset of the fields), a dict, or a Scheme."""
    if isinstance(spec, Scheme):
        return spec
    if isinstance(spec, dict):
        return Scheme.from_dict(spec)
    preset, d, stem = named_or_json(spec, SCHEMES, "scheme", GraphError)
    return preset or Scheme.from_dict({"name": stem, **d})


@dataclass
class _Builder:
    cfg: DeiTConfig
    rounding: str
    scheme: Scheme
    ops: list = field(default_factory=list)
    stages: dict = field(default_factory=dict)   # block -> refvit.prune.Stage: the token selections
    tokens: int = 0                              # N of the tokens built so far (0: the config's)

    def __post_init__(self):
        self.tokens = self.tokens or self.cfg.num_tokens

    @property
    def stream_dtype(self) -> str:
        """The residual stream's dtype (the adds' outputs)."""
        return "int16" if self.scheme.residual == "int16" else "int8"

    @property
    def a16(self) -> bool:
        """16-bit activations (Part 7): every arithmetic op is its 'a16' variant."""
        return self.scheme.act_bits == 16

    @property
    def act_dtype(self) -> str:
        """The dtype of the activations (every op output but scores, selections and logits)."""
        return "int16" if self.a16 else "int8"

    def add(self, name, op, variant, inputs, attrs=None, constants=None, *, shape, dtype=None, layout=TOKENS,
            scale="", weight_scale=None, calibrate=None):
        """Append a record of (op, variant): its constants named by the registry row (constants: {argument:
        name} overrides), `rounding` when the kernel takes one. dtype None: the activations' dtype. scale "" is
        the op's own calibrated scale `<name>.scale`."""
        dtype = dtype or self.act_dtype
        row, given = R.row(op, variant), dict(constants or {})
        consts = {a: given.get(a) or row.constant_name(name, a) for a in row.positional_args
                  if a in given or a in row.constant_args}                                   # kernel argument order
        given_attrs = ({"rounding": self.rounding} if row.takes_rounding else {}) | (attrs or {})
        attrs = {a: given_attrs[a] for a in row.attrs if a in given_attrs}                   # kernel keyword order
        own = scale == ""
        self.ops.append(Op(name, op, variant, dict(inputs), consts, attrs, dtype, tuple(shape), layout,
                           f"{name}.scale" if own else scale, weight_scale, own if calibrate is None else calibrate))
        return name

    def narrow(self, variant: str) -> tuple:
        """(variant, attrs) of an accumulating op: the 'acc-narrow' row, with acc_bits and acc_overflow, when the
        scheme's accumulator is narrower than 32 bits and saturates or wraps (docs/spec.md Part 6)."""
        sc = self.scheme
        if self.a16:
            return A16, {}
        if sc.acc_bits < 32 and sc.acc_overflow != "error":
            return NARROW, {"acc_bits": sc.acc_bits, "acc_overflow": sc.acc_overflow}
        return variant, {}

    def sized(self, fld: str) -> str:
        """The softmax / gelu variant: 'a16' with act_bits 16, 'table-n' for a table size or index step other than
        part 2's, 'shift16' for softmax 'shift' with softmax_bits 16."""
        sc = self.scheme
        if self.a16:
            return A16
        if fld == "softmax" and sc.softmax == "shift" and sc.softmax_bits == 16:
            return "shift16"
        sized = (sc.exp_table_size, sc.exp_index_bits) != (256, 4) if fld == "softmax" else sc.gelu_table_size != 256
        return SIZED_TABLE if sized else getattr(sc, fld)

    def conv(self, name, x, cout, *, spatial=None, dtype=None, layout=TOKENS, scale="", calibrate=None,
             variant=None):
        variant, acc = self.narrow(variant or self.scheme.conv)
        dtype = dtype or self.act_dtype
        return self.add(name, "conv2d", variant, {"x": x}, {"out_dtype": dtype} | acc,
                        shape=(BATCH, cout, 1, spatial or self.tokens), dtype=dtype, layout=layout, scale=scale,
                        weight_scale=f"{name}.weight_scale", calibrate=calibrate)

    def layernorm(self, name, x):
        return self.add(name, "layernorm", A16 if self.a16 else self.scheme.layernorm, {"x": x},
                        shape=(BATCH, self.cfg.embed_dim, 1, self.tokens), weight_scale=f"{name}.weight_scale")

    def residual(self, name, a, b, b_constant=False, out_dtype=None):
        """a + b at the residual stream's width (or out_dtype); b a tensor, or (b_constant) a constant's name."""
        v = self.scheme.residual
        out_dtype = out_dtype or self.stream_dtype
        return self.add(name, "add", v, {"a": a} if b_constant else {"a": a, "b": b},
                        {"out_dtype": out_dtype} if v == "int16" else {}, {"b": b} if b_constant else None,
                        dtype=out_dtype, shape=(BATCH, self.cfg.embed_dim, 1, self.tokens))

    def select(self, b, x, p, stage) -> str:
        """Token pruning in block prefix b (docs/spec.md, "Token pruning"): `select`, the kept positions (B, k)
        from the probabilities p, then `pruned`, the tokens x (B, C, 1, N) -> (B, C, 1, P + k [+ 1])."""
        P = self.cfg.num_prefix_tokens
        if self.sized("softmax") in PROBABILITIES:
            raise GraphError(f"token pruning reads int8 probabilities; the softmax {self.sized('softmax')!r} of scheme "
                             f"{self.scheme.name!r} gives {PROBABILITIES[self.sized('softmax')][0]}")
        select, prune = PRUNE_VARIANTS[(stage.order, stage.package)]
        index = self.add(b + "select", "token_select", select, {"p": p},
                         {"keep": stage.keep, "num_prefix": P}, shape=(BATCH, stage.keep), dtype="int32",
                         layout=KEPT if stage.order == "position" else KEPT_BY_SCORE, scale=None,
                         calibrate=False)                                            # (B, k) int32
        self.tokens = P + stage.patches_out
        return self.add(b + "pruned", "token_prune", prune, {"x": x, "p": p, "index": index},
                        {"num_prefix": P}, shape=(BATCH, self.cfg.embed_dim, 1, self.tokens),
                        dtype=self.stream_dtype, scale=f"{x}.scale", calibrate=False)  # (B, C, 1, N'), x's scale


def _block(g: _Builder, i: int, x: str) -> str:
    """One transformer block on tokens x (B, C, 1, N); returns the name of its output."""
    cfg, b = g.cfg, f"blocks.{i}."
    C, N, Hh, D = cfg.embed_dim, g.tokens, cfg.num_heads, cfg.head_dim
    h = g.layernorm(b + "norm1", x)                                                 # (B, C, 1, N)
    qkv = g.conv(b + "attn.qkv", h, 3 * C, scale=None)                              # (B, 3C, 1, N), 3 scales
    q, k, v = (g.add(b + f"attn.{t}", "split_heads", "channels", {"qkv": qkv},
                     {"part": j, "num_heads": Hh}, shape=(BATCH, Hh, D, N), layout=HEADS)
               for j, t in enumerate("qkv"))                                        # 3 x (B, Hh, D, N)
    av, aa = g.narrow("int32")                                                      # the accumulators' row
    s = g.add(b + "attn.scores", "attention_scores", av, {"q": q, "k": k}, aa, shape=(BATCH, Hh, N, N),
              dtype="int64" if g.a16 else "int32", layout=SCORES, calibrate=False)  # (B, Hh, N, N) at s_q*s_k
    p_dtype, context = PROBABILITIES.get(g.sized("softmax"), ("int8", "int32"))
    if context not in ("int32", R.A16) and av == NARROW:
        raise GraphError(f"scheme {g.scheme.name!r}: a narrow accumulator (acc_bits {g.scheme.acc_bits}) is not "
                         f"defined for {g.scheme.softmax!r}'s {p_dtype} probabilities")
    p = g.add(b + "attn.softmax", "softmax", g.sized("softmax"), {"scores": s}, shape=(BATCH, Hh, N, N),
              layout=SCORES, dtype=p_dtype, scale="attn.softmax.scale")             # (B, Hh, N, N) at 1/127 (int16: 2^-15)
    o = g.add(b + "attn.context", "attention_context", context if context != "int32" else av, {"p": p, "v": v}, aa,
              shape=(BATCH, C, 1, N))                                               # (B, C, 1, N) = merged heads
    o = g.conv(b + "attn.proj", o, C)                                               # (B, C, 1, N)
    x = g.residual(b + "residual1", x, o)                                           # (B, C, 1, N)
    if i in g.stages:
        x = g.select(b, x, p, g.stages[i])                                          # (B, C, 1, N'), N' = g.tokens
    h = g.layernorm(b + "norm2", x)                                                 # (B, C, 1, N')
    h = g.conv(b + "mlp.fc1", h, cfg.hidden_dim)                                    # (B, 4C, 1, N')
    h = g.add(b + "mlp.gelu", "gelu", g.sized("gelu"), {"x": h},
              shape=(BATCH, cfg.hidden_dim, 1, g.tokens))                           # (B, 4C, 1, N')
    h = g.conv(b + "mlp.fc2", h, C)                                                 # (B, C, 1, N')
    return g.residual(b + "residual2", x, h)                                        # (B, C, 1, N')


def build_graph(cfg: DeiTConfig, rounding: str = SINGLE_ROUND, scheme: Scheme = DEFAULT_SCHEME, prune=()) -> tuple:
    """The integer DeiT of `cfg` as a tuple of Op records in execution order (input tensor: 'input').

    prune: token pruning stages ((block, keep_rate), ... or 'BLOCK:KEEP,...', refvit.prune): each adds the
    records `blocks.i.select` and `blocks.i.pruned` after `blocks.i.residual1`; every shape stays static."""
    stages = {s.block: s for s in prune_plan(prune, cfg.depth, cfg.num_patches)}
    g = _Builder(cfg, check_rounding(rounding), scheme, stages=stages)
    C, Np, N, P = cfg.embed_dim, cfg.num_patches, cfg.num_tokens, cfg.num_prefix_tokens
    t = g.conv("patch_embed", "input", C, spatial=Np, variant=_edge_conv(scheme))                 # (B, C, 1, Np) = (B, C, g, g)
    if cfg.no_embed_class:   # DeiT-III: pos_embed on the patches (int8, what concat_tokens takes), then the prefix
        g.tokens = Np
        t = g.residual("embed", t, "pos_embed", b_constant=True, out_dtype=g.act_dtype)  # (B, C, 1, Np)
        g.tokens = N
        x = g.add("tokens", "concat_tokens", "prefix", {"patches": t}, shape=(BATCH, C, 1, N),
                  scale="embed.scale")                                              # (B, C, 1, N)
    else:
        t = g.add("tokens", "concat_tokens", "prefix", {"patches": t}, shape=(BATCH, C, 1, N),
                  scale="patch_embed.scale")                                        # (B, C, 1, N)
        x = g.residual("embed", t, "pos_embed", b_constant=True)                    # (B, C, 1, N)
    for i in range(cfg.depth):
        x = _block(g, i, x)
    x = g.layernorm("norm", x)                                                      # (B, C, 1, N')
    h = g.add("head_input", "gather_prefix", "channels", {"x": x}, {"num_prefix": P},
              shape=(BATCH, P * C, 1, 1), layout=PREFIX, scale="norm.scale")        # (B, P*C, 1, 1)
    g.conv("head", h, cfg.num_classes, spatial=1, dtype="int16", layout=LOGITS, scale="logits.scale", calibrate=True,
           variant=_edge_conv(scheme))
    return tuple(g.ops)


def _edge_conv(scheme: Scheme) -> str:
    """The variant of the patch embedding and the head: w8 (8-bit weights), shift-only with pot scales, a16 with
    16-bit activations."""
    return A16 if scheme.act_bits == 16 else "pot" if scheme.scales == "pot" else "w8"


MANIFEST_FIELDS = ("index", "internals")   # what a golden manifest's op entry adds to the record


def op_from_manifest(entry: dict) -> Op:
    """A golden manifest's op entry (docs/golden-format.md) -> its Op: the record as it is, without the fields
    the manifest adds (`index`, its position in the graph; `internals`, its internal tensors); checked as
    Op.from_dict checks a record. A plain record reads the same."""
    if not isinstance(entry, dict):
        raise GraphError(f"bad op record {str(entry)[:120]}: not an object")
    return Op.from_dict({k: v for k, v in entry.items() if k not in MANIFEST_FIELDS})


def graph_from_dicts(records, *, open_inputs: bool = False) -> tuple:
    """Op records as stored in a quantized file, a golden manifest (op_from_manifest) or a conformance case ->
    a graph (each record checked). open_inputs: a part of a graph, such as a `golden --ops` subset: a tensor
    that no record writes is an input of the part (fed from outside), not an error; a tensor read before
    the record that writes it still is."""
    if not isinstance(records, list) or not records:
        raise GraphError("a graph is a non-empty list of op records")
    ops = tuple(op_from_manifest(r) for r in records)
    seen = {"input"} | ({t for op in ops for t in op.inputs.values()} - {op.name for op in ops} if open_inputs
                        else set())
    for op in ops:
        kernel_name(op.op, op.variant)
        missing = [t for t in op.inputs.values() if t not in seen]
        if missing:
            raise GraphError(f"op {op.name!r} reads {missing[0]!r} before any op writes it")
        if op.name in seen:
            raise GraphError(f"op name {op.name!r} is written twice")
        seen.add(op.name)
    return ops



# ---------------------------------------------------------------------------------------------
# what is derived from a graph
# ---------------------------------------------------------------------------------------------

BOUNDARY_CONSTANTS = ("input.scale", "logits.scale")   # the float model boundary: quantize_input, dequantize


def input_dtype(graph) -> np.dtype:
    """The dtype of the model's input tensor 'input': int16 when the record that reads it is a 16-bit-activation
    ('a16') record (Part 7), else int8."""
    readers = [op for op in graph if "input" in op.inputs.values()]
    return np.dtype(np.int16 if any(op.variant == A16 for op in readers) else np.int8)


def required_constants(graph) -> list:
    """Every constant a model with this graph must carry: the ops' integer constants, then the boundary scales."""
    names = dict.fromkeys(c for op in graph for c in op.constants.values())
    return list(names) + [c for c in BOUNDARY_CONSTANTS if c not in names]


def select_ops(graph, patterns) -> tuple:
    """The ops whose names match any shell-style pattern ('blocks.0.*', 'head')."""
    return tuple(op for op in graph if any(fnmatchcase(op.name, p) for p in patterns))


def block_graph(graph, index: int) -> tuple:
    """The records of block `index` alone, in names relative to it ('norm1', 'attn.qkv.weight', ...; shared
    constants such as 'exp_table' keep theirs); the block's input tensor is 'input'."""
    prefix = f"blocks.{index}."
    ops = [op for op in graph if op.name.startswith(prefix)]
    if not ops:
        raise GraphError(f"the graph has no block {index}")
    produced = {op.name for op in ops}
    outside = {t for op in ops for t in op.inputs.values() if t not in produced}
    if len(outside) != 1:
        raise GraphError(f"block {index} reads {sorted(outside)}; expected one input tensor")

    def rel(name):
        return "input" if name in outside else (name[len(prefix):] if name and name.startswith(prefix) else name)
    return tuple(replace(op, name=rel(op.name), inputs={a: rel(t) for a, t in op.inputs.items()},
                         constants={a: rel(c) for a, c in op.constants.items()}, scale=rel(op.scale),
                         weight_scale=rel(op.weight_scale)) for op in ops)


# ---------------------------------------------------------------------------------------------
# the interpreter
# ---------------------------------------------------------------------------------------------

@dataclass
class Trace:
    """Every tensor of one run, by name, in execution order ('input' first), and the records that made them."""
    ops: list = field(default_factory=list)
    tensors: dict = field(default_factory=dict)   # name -> ndarray
    layouts: dict = field(default_factory=dict)   # name -> layout string
    internals: dict = field(default_factory=dict)  # op name -> {internal: tensor name} (run_graph(internals=True))


def fast_kernels(op: Op):
    """The default: each record's fast kernel (tested equal to its reference kernel)."""
    return R.row(op.op, op.variant).kernel


def reference_kernels(op: Op):
    """The normative plain kernels of refvit.reference (docs/spec.md's pseudocode as code)."""
    row = R.row(op.op, op.variant)
    if row.reference is None:
        raise UnknownOpError(f"op {op.op}/{op.variant} has no reference kernel")
    return row.reference


KERNEL_SETS = {"fast": fast_kernels, "reference": reference_kernels}   # `--kernels`


def kernel_set(name: str):
    try:
        return KERNEL_SETS[name]
    except KeyError:
        raise GraphError(f"unknown kernel set {name!r}; choose from {sorted(KERNEL_SETS)}") from None


def run_graph(graph, constants: dict, x: np.ndarray, trace: Trace | None = None, kernels=fast_kernels,
              input_layout: str = IMAGE, internals: bool = False) -> np.ndarray:
    """Execute the records in order on input x; returns the last op's output.

    Each op calls its kernel with its inputs and constants as keyword arguments and its attrs; the output
    is reshaped (row-major, same bytes) to the record's shape and checked against its dtype. `kernels`
    maps a record to the function that computes it (refvit's by default; a DUT's methods in conformance).
    internals (with a trace): the kernels whose registry row lists internals also get an `internals` dict;
    what they put in it is traced as `<op>.<internal>`, just before the op's output."""
    env = {"input": x}
    last_use = {t: i for i, op in enumerate(graph) for t in op.inputs.values()}   # free tensors when done
    if trace is not None:
        trace.tensors["input"], trace.layouts["input"] = x, input_layout
    batch = x.shape[0]
    for i, op in enumerate(graph):
        args = {a: env[t] for a, t in op.inputs.items()}
        try:
            args |= {a: constants[c] for a, c in op.constants.items()}
        except KeyError as e:
            raise GraphError(f"op {op.name!r} needs constant {e.args[0]!r}, which the model lacks") from None
        attrs = {k: (np.dtype(v) if k == "out_dtype" else v) for k, v in op.attrs.items()}
        kept = {} if internals and trace is not None and R.row(op.op, op.variant).internals else None
        out = np.asarray(kernels(op)(**args, **attrs, **({} if kept is None else {"internals": kept})))
        want = op.shape_for(batch)
        if out.dtype != np.dtype(op.dtype) or out.size != int(np.prod(want)):
            raise GraphError(f"op {op.name!r} ({op.kernel}) gave {out.dtype} {out.shape}, "
                             f"its record says {op.dtype} {want}")
        out = out.reshape(want)                                                     # same bytes, the record's layout
        env[op.name] = out
        for t in set(op.inputs.values()):
            if last_use[t] == i:
                del env[t]
        if trace is not None:
            trace.ops.append(op)
            if kept is not None:
                _trace_internals(trace, op, kept, out, constants)
            trace.tensors[op.name], trace.layouts[op.name] = out, op.layout
    return out


def _trace_internals(trace: Trace, op: Op, kept: dict, out: np.ndarray, constants: dict) -> None:
    """Record a kernel's internals as `<op>.<internal>` in its row's order (OUTPUT ones in the output's shape)."""
    layouts = R.row(op.op, op.variant).internals
    unknown = sorted(set(kept) - set(layouts))
    if unknown:
        raise GraphError(f"op {op.name!r} ({op.kernel}) reported internals {unknown} that its registry row does "
                         f"not list")
    names = trace.internals.setdefault(op.name, {})
    for internal, layout in layouts.items():
        if internal in kept:
            arr, name = np.asarray(kept[internal]), f"{op.name}.{internal}"
            if name in trace.tensors or name in constants:
                raise GraphError(f"internal {name!r} of op {op.name!r} has the name of another tensor or constant")
            if layout is OUTPUT:
                arr, layout = arr.reshape(out.shape), op.layout                        # same elements, same order
            trace.tensors[name], trace.layouts[name], names[internal] = arr, layout, name
