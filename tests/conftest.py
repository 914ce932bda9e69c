"""Shared test data (../shared, beside the repository): its path, a skip when it is absent, and the peers.

`@pytest.mark.shared` or the `shared` fixture skip a test, with the reason, when the folder is missing.
The `peer` fixture runs a test once per peer checkpoint (timm and Hugging Face), loaded once per session.
"""
from __future__ import annotations

import os

# One BLAS thread: on a busy 2-core machine OpenBLAS's spinning worker threads made the float tests 5-10x
# slower (500 Fashion-MNIST images: 35 s with 2 threads, 6.4 s with 1). Must be set before NumPy loads;
# an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from dataclasses import dataclass  # noqa: E402
from functools import cached_property
from pathlib import Path

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests and fuzzers draw the same examples on every run (profile "ci"): a red run then means a
# regression, not a new draw. REFVIT_HYPOTHESIS=explore draws new examples (how the fuzzers found the bugs
# their regression tests now pin); a failure found that way is replayed from .hypothesis/ until fixed.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("REFVIT_HYPOTHESIS", "ci"))

SHARED = Path(__file__).resolve().parents[2] / "shared"
PEER_DIR = SHARED / "peer"
SKIP_REASON = f"shared data folder {SHARED} is absent (it holds the peers' checkpoints and outputs)"

# name -> (checkpoint file or directory, npz of the peer's outputs), all under shared/peer/
PEERS = {
    "timm_tiny": ("timm_deit_tiny_patch16_224_seed0.safetensors", "timm_deit_tiny_patch16_224_seed0.npz"),
    "timm_tiny_distilled": ("timm_deit_tiny_distilled_patch16_224_seed0.safetensors",
                            "timm_deit_tiny_distilled_patch16_224_seed0.npz"),
    "hf_with_teacher": ("hf_DeiTForImageClassificationWithTeacher_d192_l12_seed0",
                        "hf_DeiTForImageClassificationWithTeacher_d192_l12_seed0.npz"),
    "hf_plain": ("hf_DeiTForImageClassification_d192_l12_seed1", "hf_DeiTForImageClassification_d192_l12_seed1.npz"),
}
INPUTS_NPZ = PEER_DIR / PEERS["timm_tiny"][1]  # every peer's logits are of these inputs


def have_shared() -> bool:
    return PEER_DIR.is_dir()


def pytest_configure(config):
    config.addinivalue_line("markers", "shared: needs the ../shared data folder; skipped when it is absent")
    config.addinivalue_line("markers", "slow: real-data evaluations and fresh quantizations (minutes); "
                                       "deselect with -m 'not slow' for a quick local run")


def pytest_collection_modifyitems(config, items):
    if have_shared():
        return
    for item in items:
        if item.get_closest_marker("shared"):
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not have_shared():
        pytest.skip(SKIP_REASON)
    return SHARED


@dataclass(eq=False)
class Peer:
    name: str
    weights: Path   # what load_checkpoint / --weights takes
    npz: Path       # the peer's outputs: logits (and for timm, inputs and trace.*)

    @cached_property
    def outputs(self) -> dict:
        with np.load(self.npz) as z:
            return {k: z[k] for k in z.files}

    @property
    def logits(self) -> np.ndarray:
        return self.outputs["logits"]

    @cached_property
    def checkpoint(self):
        from weights_tools import load_checkpoint
        return load_checkpoint(self.weights)


@pytest.fixture(scope="session")
def peers(shared) -> dict:
    """name -> Peer; each loads its checkpoint and outputs on first use."""
    return {name: Peer(name, PEER_DIR / w, PEER_DIR / npz) for name, (w, npz) in PEERS.items()}


@pytest.fixture(scope="session", params=list(PEERS))
def peer(request, peers) -> Peer:
    return peers[request.param]


@pytest.fixture(scope="session")
def peer_inputs(shared) -> np.ndarray:
    """timm's eval transform of the 20 ImageNet photos, float32 (20, 3, 224, 224), in file-name order."""
    with np.load(INPUTS_NPZ) as z:
        return z["inputs"]


@pytest.fixture(scope="session")
def imagenet_photos(shared) -> list:
    """The 20 photos the peers' inputs come from, sorted by file name (the order of `inputs`)."""
    return sorted((SHARED / "images" / "imagenet").glob("*.jpg"))
