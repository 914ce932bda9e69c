"""weights_tools: the weight importer, below refvit in the layers. Reads DeiT checkpoints (.safetensors or
torch.save files read without torch, timm or Hugging Face names, with Hugging Face's or timm's config.json)
into timm-named float32 arrays and a `DeiTConfig`; writes safetensors; converts timm <-> Hugging Face names
and token <-> conv parameters. Imports numpy and safetensors only, never refvit (refvit imports it)."""

from .config import ConfigError, DeiTConfig, infer_config, preset
from .convert import conv_to_token, token_to_conv
from .errors import CheckpointError
from .load import HEAD_MODES, Checkpoint, expected_shapes, load_checkpoint, read_tensors
from .names import detect_naming, hf_names_for, hf_to_timm, to_hf_names
from .pth import read_torch
from .safetensors_io import read_safetensors, read_safetensors_metadata, write_safetensors

__all__ = [
    "CheckpointError", "read_safetensors", "read_safetensors_metadata", "write_safetensors",
    "detect_naming", "hf_names_for", "hf_to_timm", "to_hf_names",
    "HEAD_MODES", "Checkpoint", "expected_shapes", "load_checkpoint", "read_tensors", "read_torch",
    "token_to_conv", "conv_to_token", "ConfigError", "DeiTConfig", "infer_config", "preset",
]
