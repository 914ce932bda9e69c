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
from refvit.graph import GraphError, Scheme, graph_from_dicts, required_constants
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
    return qm
