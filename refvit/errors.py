"""The one error family of refvit: every error a user can cause is a RefvitError.

The command line prints a RefvitError as one line `refvit: error: ...` and exits with status 2
(`refvit.cli.USER_ERRORS`); anything else is a bug and keeps its traceback. A RefvitError is a ValueError, so
code that caught ValueError keeps working. The class itself is defined in the lowest package of the
distribution, `weights_tools` (the checkpoint readers and the config raise it too), and re-exported here."""
from __future__ import annotations

from weights_tools.errors import RefvitError

__all__ = ["RefvitError", "UsageError"]


class UsageError(RefvitError):
    """A command-line call that cannot be carried out as given (conflicting or missing options); `refvit` and
    `python -m conformance` share it."""
