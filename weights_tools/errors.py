"""The one error of checkpoint reading (its own module, so the package's modules import it without a cycle)."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not describe the expected DeiT; the message names the file."""
