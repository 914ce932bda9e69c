"""refvit.checkpoints: read DeiT checkpoints (.safetensors, timm or Hugging Face names) into timm-named float32 arrays."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not describe the expected DeiT; the message names the file."""


# Imported after CheckpointError: the submodules import it from here.
from .safetensors_io import read_safetensors, write_safetensors  # noqa: E402
from .names import detect_naming, hf_names_for, hf_to_timm, to_hf_names  # noqa: E402
from .load import HEAD_MODES, Checkpoint, expected_shapes, load_checkpoint  # noqa: E402

__all__ = [
    "CheckpointError", "read_safetensors", "write_safetensors",
    "detect_naming", "hf_names_for", "hf_to_timm", "to_hf_names",
    "HEAD_MODES", "Checkpoint", "expected_shapes", "load_checkpoint",
]
