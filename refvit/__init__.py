"""refvit: golden bit-exact NumPy reference of DeiT (float and INT8 integer forms)."""
import os
import sys
from pathlib import Path

if "numpy" not in sys.modules:  # OpenBLAS reads it once, when numpy loads it: its idle workers then sleep at once
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # instead of spinning on the core refvit.parallel needs

__version__ = "0.1.0"

DOCS_NOTE = ("the docs ship with refvit, in the folder `refvit info --docs` prints (refvit/docs/ of the installed "
             "package, docs/ of a source checkout)")


def docs_dir() -> Path | None:
    """The folder of refvit's documentation (spec.md, golden-format.md, ...): refvit/docs/ in an installed wheel,
    the repository's docs/ in a source checkout; None if neither is there."""
    here = Path(__file__).resolve().parent
    return next((d for d in (here / "docs", here.parent / "docs") if (d / "spec.md").is_file()), None)
