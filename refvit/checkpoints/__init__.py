"""refvit.checkpoints: read DeiT checkpoints (.safetensors or torch.save files, timm or Hugging Face names, with
Hugging Face's or timm's config.json) into timm-named float32 arrays. Below the model layer: imports
refvit.config, numpy and safetensors only."""

from .errors import CheckpointError
from .load import HEAD_MODES, Checkpoint, expected_shapes, load_checkpoint, read_tensors
from .names import detect_naming, hf_names_for, hf_to_timm, to_hf_names
from .pth import read_torch
from .safetensors_io import read_safetensors, read_safetensors_metadata, write_safetensors

__all__ = [
    "CheckpointError", "read_safetensors", "read_safetensors_metadata", "write_safetensors",
    "detect_naming", "hf_names_for", "hf_to_timm", "to_hf_names",
    "HEAD_MODES", "Checkpoint", "expected_shapes", "load_checkpoint", "read_tensors", "read_torch",
]
