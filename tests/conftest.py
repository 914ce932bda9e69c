"""Shared test data (../shared, beside the repository): its path, a skip when it is absent, and the peers;
and the one tiny quantized model of the tests.

`@pytest.mark.shared` or the `shared` fixture skip a test, with the reason, when the folder is missing.
The `peer` fixture runs a test once per peer checkpoint (timm and Hugging Face), loaded once per session.
`tiny` is the tiny quantized DeiT (TINY_CONFIG) most tests run; `make_tiny` builds (once per session) a
variation of it: another config, scheme, rounding, calibration method or weights seed; `tiny_golden` is a
golden dump of `tiny` (with or without internals).
"""
from __future__ import annotations

import os

# One BLAS thread: on a busy 2-core machine OpenBLAS's spinning worker threads made the float tests 5-10x
# slower (500 Fashion-MNIST images: 35 s with 2 threads, 6.4 s with 1). Must be set before NumPy loads;
# an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from dataclasses import dataclass, field  # noqa: E402
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

# tests/conformance_user/ is another project's test suite (it imports conformance as the docs show): it runs as
# a pytest session of its own in tests/test_conformance_user.py, with its pass / skip counts asserted.
collect_ignore = ["conformance_user"]

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
    config.addinivalue_line("markers", "slow: real-data evaluations, fresh quantizations (minutes) and the rest of "
                                       "the cross products the quick run samples; deselect with -m 'not slow' for a "
                                       "quick local run")


# The quick local run (-m "not slow") draws a sixteenth of each property test's examples (at least 5, or all
# when it asks for fewer); the full run (CI) draws them all. Both draw the same examples on every run.
QUICK_EXAMPLES_DIVISOR, QUICK_EXAMPLES_MIN = 16, 5


def quick_run(config) -> bool:
    return "not slow" in (config.getoption("markexpr") or "")


def quick_examples(n: int) -> int:
    return max(min(n, QUICK_EXAMPLES_MIN), n // QUICK_EXAMPLES_DIVISOR)


def fewer_examples(items) -> None:
    """Each hypothesis test's settings with quick_examples(max_examples): hypothesis reads a test's settings
    from this attribute on every call (it is what @settings sets; a private name of hypothesis 6: where a later
    version drops it, the quick run draws every example, as the full run does)."""
    done = set()
    for item in items:
        fn = getattr(item, "function", None)
        own = getattr(fn, "_hypothesis_internal_use_settings", None)
        if not getattr(fn, "is_hypothesis_test", False) or own is None or id(fn) in done:
            continue
        done.add(id(fn))
        fn._hypothesis_internal_use_settings = settings(own, max_examples=quick_examples(own.max_examples))


def pytest_collection_modifyitems(config, items):
    if quick_run(config):
        fewer_examples(items)
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


# ---------------------------------------------------------------- the tiny quantized model

def tiny_config():
    """A distilled DeiT small enough to quantize in a blink: 32x32 images, 8x8 patches (16 + 2 tokens),
    width 48, 3 heads, 2 blocks, 7 classes."""
    from refvit.config import DeiTConfig
    return DeiTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, distilled=True)


@dataclass(eq=False)
class Tiny:
    """A quantized random DeiT and what it was made from."""
    config: object
    params: dict          # float32 weights, token form (refvit.models.random_params)
    conv: dict            # the same, conv form (what the quantizer reads)
    x: np.ndarray         # float32 (IMAGES, 3, H, W) images; calibrated on two batches, x[:3] and x[3:]
    qm: object            # refvit.quantize.QuantizedModel
    options: dict = field(default_factory=dict)   # the quantize() keyword arguments

    @property
    def head_mode(self) -> str:
        return self.qm.head_mode

    def xq(self, n: int = 2) -> np.ndarray:
        """The first n images as the integer model's int8 input."""
        from refvit.int_model import quantize_input
        return quantize_input(self.qm, self.x[:n])


IMAGES = 6


def _make_tiny(config=None, *, seed: int = 0, image_seed: int = 1, head_mode: str | None = None,
               **options) -> Tiny:
    """Random weights (seed), IMAGES standard-normal images (image_seed), quantized with `options`
    (method, rounding, scheme, percentile; the quantizer's defaults otherwise)."""
    from refvit.checkpoints.convert import token_to_conv
    from refvit.models import random_params
    from refvit.quantize import quantize
    cfg = config or tiny_config()
    head_mode = head_mode or ("mean" if cfg.distilled else "cls")
    params = random_params(cfg, head_mode, seed)
    conv = token_to_conv(params)
    x = np.random.default_rng(image_seed).standard_normal((IMAGES, cfg.in_chans, cfg.img_size, cfg.img_size))
    x = x.astype(np.float32)
    qm = quantize(conv, cfg, [x[:3], x[3:]], head_mode=head_mode, **options)
    return Tiny(cfg, params, conv, x, qm, options)


@pytest.fixture(scope="session")
def make_tiny():
    """make_tiny(config=None, *, seed=0, image_seed=1, head_mode=None, **quantize options) -> Tiny, built once
    per session for each distinct set of arguments."""
    cache = {}

    def make(config=None, **kwargs) -> Tiny:
        key = repr((config, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = _make_tiny(config, **kwargs)
        return cache[key]
    return make


@pytest.fixture(scope="session")
def tiny(make_tiny) -> Tiny:
    """The tiny quantized model (tiny_config(), seed 0, the quantizer's defaults)."""
    return make_tiny()


@pytest.fixture(scope="session")
def tiny_golden(tiny, tmp_path_factory):
    """tiny_golden(internals=False) -> (folder, manifest, trace, logits): `write_golden` of `tiny` on its first two
    images in all four formats, written once per session each; treat the folder as read-only."""
    from refvit import golden
    from refvit import int_model as im
    cache = {}

    def dump(internals: bool = False):
        if internals not in cache:
            out = tmp_path_factory.mktemp("golden_internals" if internals else "golden")
            xq = tiny.xq()
            manifest = golden.write_golden(tiny.qm, xq, out, ("npy", "hex", "bin", "h"),
                                           {"kind": "array", "note": "test"}, internals=internals)
            trace = im.Trace()
            logits = im.forward_int(tiny.qm, xq, trace)
            cache[internals] = out, manifest, trace, logits
        return cache[internals]
    return dump
