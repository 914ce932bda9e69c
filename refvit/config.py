"""refvit.config: the DeiT configuration (`DeiTConfig`, bounds, presets, inference from shapes), which lives in
`weights_tools.config` below refvit so the checkpoint readers can build it; re-exported here. Also
`named_or_json`, the "NAME | FILE.json" option reader."""
from __future__ import annotations

import json
from pathlib import Path

from weights_tools.config import (
    ARCHS, DEIT3_ARCHS, HEADS_BY_WIDTH, MAX_DEPTH, MAX_EMBED_DIM, MAX_HIDDEN_DIM, MAX_IMG_SIZE, MAX_IN_CHANS,
    MAX_LN_EPS, MAX_NUM_CLASSES, MAX_NUM_HEADS, MAX_NUM_PATCHES, MAX_PATCH_SIZE, PRESETS, TIMM_ARCHS, VIT_ARCHS,
    WIDTHS, ConfigError, DeiTConfig, check_field, infer_config, preset, preset_for_width, unsupported_feature,
)

__all__ = [  # the re-exported configuration, and named_or_json
    "ARCHS", "DEIT3_ARCHS", "HEADS_BY_WIDTH", "MAX_DEPTH", "MAX_EMBED_DIM", "MAX_HIDDEN_DIM", "MAX_IMG_SIZE",
    "MAX_IN_CHANS", "MAX_LN_EPS", "MAX_NUM_CLASSES", "MAX_NUM_HEADS", "MAX_NUM_PATCHES", "MAX_PATCH_SIZE", "PRESETS",
    "TIMM_ARCHS", "VIT_ARCHS", "WIDTHS", "ConfigError", "DeiTConfig", "check_field", "infer_config", "preset",
    "preset_for_width", "unsupported_feature", "named_or_json",
]


def named_or_json(spec, presets: dict, what: str, error=ConfigError):
    """A preset by name, or the JSON object of a .json file -> (preset or None, the file's dict or None, its stem).

    Shared by every "NAME | FILE.json" option (--preprocess, --scheme); errors are `error` naming `what`."""
    if spec in presets:
        return presets[spec], None, spec
    path = Path(str(spec))
    if path.suffix.lower() != ".json":
        raise error(f"unknown {what} {spec!r}: give {' | '.join(presets)}, or a .json file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise error(f"cannot read {what} file {path}: {e}") from None
    if not isinstance(d, dict):
        raise error(f"{path}: a {what} file holds a JSON object, got {type(d).__name__}")
    return None, d, path.stem
