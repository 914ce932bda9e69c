"""Writing outputs the way every refvit command does: atomically (a temporary file or folder beside the
target, renamed into place) and readable as the user's umask allows (a simulator's account can read them).
Shared by `refvit` (quantized files, golden dumps, MLIR, iree-check) and `python -m conformance write`."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path) -> None:
    """Give a file or folder made private by its writer (tempfile.mkdtemp: 0700; safetensors: 0600) the mode
    an ordinary open()/mkdir() would have had: 0666 / 0777 less the umask, so that others (a simulator's
    account) can read what refvit writes whenever the user's umask lets them."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~current_umask())


def write_atomically(target, write) -> None:
    """write(tmp_path) beside the target, then rename over it; only a regular file (or nothing) is replaced."""
    target = Path(target)
    if target.exists() and not target.is_file():
        raise UsageError(f"--out {target} exists and is not a regular file; refusing to replace it")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise UsageError(f"--out {target}: cannot write into {target.parent} (missing or not writable)")
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        honour_umask(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _earlier_golden(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def write_folder_atomically(target, write, earlier=_earlier_golden, what: str = "golden dump"):
    """write(tmp_folder) beside the target, then rename it into place: a reader never sees a half-written or
    mixed dump, and no stale file of an earlier one remains. The target may be absent, empty, or an earlier
    output of the same command (`earlier(folder)`, described by `what`; default: a golden dump), replaced
    whole; anything else is refused, so no user file is ever deleted."""
    target = Path(target)
    if target.exists():
        if not target.is_dir() or (any(target.iterdir()) and not earlier(target)):
            raise UsageError(f"{target} exists and is not an empty folder or an earlier {what}; "
                             f"refusing to replace it: give a new or empty folder")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise UsageError(f"--out {target}: cannot write into {target.parent} (missing or not writable)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        honour_umask(tmp)
        result = write(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "dump")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        return result
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
