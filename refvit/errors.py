"""The one error family of refvit: every error a user can cause is a RefvitError.

The command line prints a RefvitError as one line `refvit: error: ...` and exits with status 2
(`refvit.cli.USER_ERRORS` is this class); anything else is a bug and keeps its traceback. A RefvitError is
a ValueError, so code that caught ValueError keeps working."""
from __future__ import annotations



class RefvitError(ValueError):
    """Bad input from the user: a file, a setting, an image, a model; the message says what and where."""


class UsageError(RefvitError):
    """A command-line call that cannot be carried out as given (conflicting or missing options); `refvit` and
    `python -m conformance` share it."""
