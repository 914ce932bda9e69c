"""A device's dump made from a golden dump, for the tests of `refvit check`: copies of the golden tensor files."""
from __future__ import annotations

import shutil


def copy_tensors(golden_dir, device, names=None, fmt="npy"):
    """Copy golden_dir/tensors/<name>.<fmt> (all names, or those in `names`) flat into `device`."""
    device.mkdir(parents=True, exist_ok=True)
    for f in (golden_dir / "tensors").glob(f"*.{fmt}"):
        if names is None or f.name[:-len(fmt) - 1] in names:
            shutil.copy(f, device / f.name)
