"""refvit.checkpoints: read DeiT checkpoints (.safetensors or torch.save files, timm or Hugging Face names, with
Hugging Face's or timm's config.json) into timm-named float32 arrays. Below the model layer: imports
refvit.config, numpy and safetensors only."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not describe the expected DeiT; the message names the file."""


# Imported after CheckpointError: the submodules import it from here.
from .safetensors_io import read_safetensors, read_safetensors_metadata, write_safetensors  # noqa: E402
from .names import detect_naming, hf_names_for, hf_to_timm, to_hf_names  # noqa: E402
from .pth import read_torch  # noqa: E402
from .load import HEAD_MODES, Checkpoint, expected_shapes, load_checkpoint, read_tensors  # noqa: E402

__all__ = [
    "CheckpointError", "read_safetensors", "read_safetensors_metadata", "write_safetensors",
    "detect_naming", "hf_names_for", "hf_to_timm", "to_hf_names",
    "HEAD_MODES", "Checkpoint", "expected_shapes", "load_checkpoint", "read_tensors", "read_torch",
]
