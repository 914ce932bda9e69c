"""The errors of the refvit distribution's lowest package: `RefvitError`, the root of every error a user can
cause (refvit re-exports it as `refvit.errors.RefvitError`; its command line prints one as one line and exits
2), and `CheckpointError`, the one error of checkpoint reading (their own module, so the package's modules
import them without a cycle)."""


class RefvitError(ValueError):
    """Bad input from the user: a file, a setting, an image, a model; the message says what and where."""


class CheckpointError(RefvitError):
    """A checkpoint file that cannot be read or does not describe the expected DeiT; the message names the file."""
