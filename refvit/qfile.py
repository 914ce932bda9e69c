"""Quantized model files: a QuantizedModel as .safetensors (integer constants + float64 scales) with the
config, head mode, scheme, rounding mode, calibration and the integer graph (its op records) in the
metadata under the key 'refvit': a quantized file is self-describing, graph + constants.

Versions: 2 (current) stores the graph; 1 (refvit 0.1) did not: its graph is rebuilt from the config
with the default scheme, which is what version-1 files were made with."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from refvit.checkpoints import CheckpointError
from refvit.checkpoints.safetensors_io import read_safetensors, read_safetensors_metadata, write_safetensors
from refvit.config import ConfigError, DeiTConfig
from refvit.graph import BOUNDARY_CONSTANTS, GraphError, Scheme, graph_from_dicts, required_constants, run_graph
from refvit.intmath import ROUNDING_MODES
from refvit.quantize import QuantizedModel

FORMAT = "refvit-int8"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


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
        if m.get("rounding") not in ROUNDING_MODES:
            raise ValueError(f"rounding {m.get('rounding')!r} is not one of {ROUNDING_MODES}")
        cfg = DeiTConfig.from_dict(m["config"])
        for name in m.get("scalars", []):
            tensors[name] = tensors[name].reshape(())
        scheme = Scheme.from_dict(m["scheme_choices"]) if "scheme_choices" in m else Scheme()
        graph = graph_from_dicts(m["graph"]) if version >= 2 else ()
        qm = QuantizedModel(cfg, m["head_mode"], m["rounding"], m.get("calibration", {}), tensors, graph, scheme)
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
        run_graph(qm.graph, T, np.zeros((1, cfg.in_chans, cfg.img_size, cfg.img_size), np.int8))
    except (ValueError, OverflowError, TypeError, KeyError, GraphError) as e:
        raise CheckpointError(f"{path}: constants do not fit the graph: {e}") from None
