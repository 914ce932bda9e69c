"""refvit.checkpoints: a thin re-export of `weights_tools` (the checkpoint readers and writers moved there,
below refvit). Kept so `from refvit.checkpoints import X` and `refvit.checkpoints.<module>` (e.g.
`refvit.checkpoints.safetensors_io`, `refvit.checkpoints.convert`) keep working: the submodule names are
aliases of weights_tools' own modules, not copies. New code imports weights_tools."""
import sys

from weights_tools import *  # noqa: F401,F403  (re-exported)
from weights_tools import __all__, convert, errors, load, names, pth, safetensors_io  # noqa: F401

for _module in (convert, errors, load, names, pth, safetensors_io):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
