"""The quantized model and its file: a QuantizedModel is the integer graph (its op records, the one record
of rounding, pruning and every variant choice) and its constants; its file is .safetensors (integer
constants + float64 scales) with the config, head mode, scheme name, quantizer options, calibration and the
graph in the metadata under the key 'refvit': a quantized file is self-describing, graph + constants.

Versions: 2 (current) stores the graph; 1 (refvit 0.1) did not: its graph is rebuilt from the config
with the default scheme, which is what version-1 files were made with."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dataclasses import dataclass, field, replace

from refvit.checkpoints import CheckpointError
from refvit.checkpoints.safetensors_io import read_safetensors, read_safetensors_metadata, write_safetensors
from refvit.config import ConfigError, DeiTConfig
from refvit.graph import (BOUNDARY_CONSTANTS, DEFAULT_SCHEME, PRUNE_VARIANTS, SCHEME_NOTES, GraphError, Scheme,
                          build_graph, check_rounding, graph_from_dicts, input_dtype, required_constants, run_graph,
                          scheme_of)
from refvit.intmath import SINGLE_ROUND
from refvit.prune import parse_prune

FORMAT = "refvit-int8"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True, eq=False)
class QuantizedModel:
    """Integer constants of a quantized conv-form DeiT, keyed by op/tensor name, and its graph.

    `tensors` is flat and safetensors-ready: int8/int16/int32/int64/uint16 constants that the integer
    forward uses, and float64 `*.scale` entries (real scales, for reporting and dequantization only).
    `graph` is the one record of what runs: rounding, token pruning and every op variant are read from its
    records (`rounding`, `prune`, `scheme` are views of it). `scheme_name` and `options` (the quantizer
    options the constants were made with) are provenance."""
    config: DeiTConfig
    head_mode: str
    calibration: dict
    tensors: dict = field(repr=False)
    graph: tuple = field(repr=False)
    scheme_name: str = DEFAULT_SCHEME.name
    options: dict = field(default_factory=DEFAULT_SCHEME.options)

    def __post_init__(self):
        if not self.graph:
            raise GraphError("a quantized model needs its graph")
        self.rounding                                                               # one rounding, checked

    @property
    def rounding(self) -> str:
        """The records' rounding mode (every record that takes one has the same)."""
        modes = {op.attrs["rounding"] for op in self.graph if "rounding" in op.attrs}
        if len(modes) != 1:
            raise GraphError(f"the graph's records have rounding modes {sorted(modes)}; a model has one")
        return check_rounding(modes.pop())

    @property
    def scheme(self) -> Scheme:
        """The scheme the records describe (refvit.graph.scheme_of)."""
        return scheme_of(self.graph, self.scheme_name, self.options)

    @property
    def prune(self) -> tuple:
        """The token pruning the records carry: ((block, keep_rate), ...) that gives their keep counts again
        (keep_rate = (keep - 1/2) / patches in: refvit.prune.keep_count rounds it up to keep exactly)."""
        stages = self.prune_stages()
        out = tuple((s["block"], (s["keep"] - 0.5) / s["patches"]) for s in stages)
        options = tuple((k, s[k]) for s in stages[:1] for k in ("order", "package") if k in s)
        return parse_prune(out + options) if out else ()

    def tokens_in(self, select_op) -> int:
        """N, the tokens entering a selection: the last axis of the probabilities it reads."""
        p = next(op for op in self.graph if op.name == select_op.inputs["p"])
        return p.shape[-1]

    def prune_stages(self) -> list:
        """The selections as the records have them: block, patches in, kept, patches out (and the prune options
        `order` / `package` where they are not the defaults)."""
        out = []
        for op in self.graph:
            if op.op == "token_select":
                pruned = next(o for o in self.graph if o.op == "token_prune" and o.inputs["index"] == op.name)
                options = next((k for k, v in PRUNE_VARIANTS.items() if v == (op.variant, pruned.variant)),
                               ("position", "mean"))
                out.append({"block": int(op.name.split(".")[1]), "patches": self.tokens_in(op) - op.attrs["num_prefix"],
                            "keep": op.attrs["keep"], "patches_out": pruned.shape[-1] - op.attrs["num_prefix"]}
                           | {k: v for k, v, default in zip(("order", "package"), options, ("position", "mean"))
                              if v != default})
        return out

    def with_graph(self, graph) -> "QuantizedModel":
        return replace(self, graph=tuple(graph))

    def with_rounding(self, rounding: str) -> "QuantizedModel":
        """The same constants and records under another rounding mode (the constants do not depend on it;
        pruning and variants stay as recorded)."""
        check_rounding(rounding)
        return self.with_graph(replace(op, attrs={**op.attrs, "rounding": rounding}) if "rounding" in op.attrs
                               else op for op in self.graph)

    def with_prune(self, prune) -> "QuantizedModel":
        """The same constants, the graph built again with token pruning `prune` (refvit.prune; () none): a
        selection needs no constants and pruned tokens keep the residual stream's scale."""
        return self.with_graph(build_graph(self.config, self.rounding, self.scheme, prune=prune))

    def metadata(self) -> dict:
        stages = self.prune_stages()
        return {"format": FORMAT, "config": self.config.to_dict(), "head_mode": self.head_mode,
                "rounding": self.rounding, "scheme": self.scheme_name, "scheme_choices": self.scheme.to_dict(),
                "scheme_note": SCHEME_NOTES.get(self.scheme_name, "a custom scheme"),
                "calibration": self.calibration,
                **({"prune": {"static_shapes": True, "stages": stages}} if stages else {})}


def save_quantized(qm: QuantizedModel, path) -> Path:
    path = Path(path)
    # safetensors' writer stores 0-d arrays as shape (1,): name them so loading restores them.
    scalars = sorted(k for k, v in qm.tensors.items() if np.ndim(v) == 0)
    meta = dict(qm.metadata(), format_version=FORMAT_VERSION, scalars=scalars,
                graph=[op.to_dict() for op in qm.graph])
    write_safetensors(path, qm.tensors, {"refvit": json.dumps(meta)})   # key order kept: records name arguments in order
    return path


def is_quantized_file(path) -> bool:
    """A refvit quantized file (its header says so; no tensor is read)."""
    try:
        return "refvit" in read_safetensors_metadata(path)
    except (CheckpointError, OSError):
        return False


def load_quantized(path) -> QuantizedModel:
    """Read a file written by `save_quantized`; every problem is a CheckpointError naming the file."""
    tensors, meta = read_safetensors(path)
    if "refvit" not in meta:
        raise CheckpointError(f"{path}: not a refvit quantized model (no 'refvit' metadata); "
                              f"quantize a float checkpoint with `python -m refvit quantize`")
    try:
        m = json.loads(meta["refvit"])
        if m.get("format") != FORMAT:
            raise ValueError(f"format is {m.get('format')!r}, expected {FORMAT!r}")
        version = m.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"format_version {version!r} is not one this refvit reads ({READABLE_VERSIONS}); "
                             f"re-quantize the float checkpoint with `python -m refvit quantize`")
        cfg = DeiTConfig.from_dict(m["config"])
        for name in m.get("scalars", []):
            tensors[name] = tensors[name].reshape(())
        scheme = Scheme.from_dict(m["scheme_choices"]) if "scheme_choices" in m else DEFAULT_SCHEME
        graph = (graph_from_dicts(m["graph"]) if version >= 2       # version 1: the default scheme's graph
                 else build_graph(cfg, m.get("rounding", SINGLE_ROUND), DEFAULT_SCHEME))
        calibration = {k: v for k, v in m.get("calibration", {}).items() if k != "prune"}   # now read from the graph
        qm = QuantizedModel(cfg, m["head_mode"], calibration, tensors, graph, scheme.name, scheme.options())
        if m.get("rounding") != qm.rounding:
            raise ValueError(f"rounding {m.get('rounding')!r} is not the graph's {qm.rounding!r}")
    except (ValueError, KeyError, TypeError, ConfigError, GraphError) as e:
        raise CheckpointError(f"{path}: bad refvit metadata: {e}") from None
    missing = sorted(set(required_constants(qm.graph)) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: quantized model lacks {len(missing)} constants: {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    check_quantized(qm, path)
    return qm


def check_quantized(qm: QuantizedModel, path="<model>") -> None:
    """Checked once at load: the metadata against the tensors and the graph (classes, depth, head mode, input
    shape), the boundary scales, and every constant against its op -- one dry run of the graph on a zero image,
    in which every kernel checks the dtypes, shapes, ranges and multiplier/shift domains of its constants."""
    cfg, T = qm.config, qm.tensors
    problems = []
    if qm.head_mode not in ("cls", "mean") or (qm.head_mode == "mean" and not cfg.distilled):
        problems.append(f"head_mode {qm.head_mode!r} does not fit a {'distilled' if cfg.distilled else 'plain'} DeiT")
    depth = len({op.name.split(".")[1] for op in qm.graph if op.name.startswith("blocks.")})
    if depth != cfg.depth:
        problems.append(f"the graph has {depth} blocks, the config says depth {cfg.depth}")
    if qm.graph[-1].shape[1] != cfg.num_classes or np.shape(T.get("head.bias", ()))[:1] != (cfg.num_classes,):
        problems.append(f"the head does not give the config's {cfg.num_classes} classes")
    for name in BOUNDARY_CONSTANTS:
        v = np.asarray(T[name])
        if v.shape != () or v.dtype.kind != "f" or not (np.isfinite(v) and v > 0):
            problems.append(f"{name} must be one finite positive float, got {v.dtype} {v.shape}")
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}")
    try:
        run_graph(qm.graph, T, np.zeros((1, cfg.in_chans, cfg.img_size, cfg.img_size), input_dtype(qm.graph)))
    except (ValueError, OverflowError, TypeError, KeyError, GraphError) as e:
        raise CheckpointError(f"{path}: constants do not fit the graph: {e}") from None
