"""Preprocessing: timm's eval transform against timm's own output, odd image modes, the Fashion-MNIST
pipeline against a direct computation of its documented steps, and errors that name the file."""
import numpy as np
import pytest
from PIL import Image

from refvit.preprocess import (
    IMAGENET_MEAN, IMAGENET_STD, ImageError, fmnist_transform, grayscale_28, open_image, timm_eval_transform,
)

STEP = (1 / 255) / min(IMAGENET_STD)  # one 8-bit level, after normalization


def test_timm_transform_reproduces_timm_inputs(imagenet_photos, peer_inputs):
    assert len(imagenet_photos) == len(peer_inputs) == 20
    ours = np.stack([timm_eval_transform(open_image(p)) for p in imagenet_photos])
    assert ours.dtype == np.float32 and ours.shape == peer_inputs.shape
    err = float(np.abs(ours - peer_inputs).max())
    print(f"\ntimm eval transform of 20 photos: max abs diff vs timm {err:.3g}")
    assert err <= 1e-6


@pytest.fixture(scope="module")
def photo(imagenet_photos):
    """A real photo, RGB, not square (the 1024x683 one if present)."""
    sizes = {p: Image.open(p).size for p in imagenet_photos}
    return Image.open(next((p for p, (w, h) in sizes.items() if w != h), imagenet_photos[0])).convert("RGB")


def _palette(photo, transparency: bool):
    img = photo.convert("P", palette=Image.ADAPTIVE, colors=64)
    if transparency:
        img.info["transparency"] = 0  # palette entry 0 is see-through
    return img


MAKERS = {
    "L": lambda im: im.convert("L"),
    "RGBA": lambda im: im.convert("RGBA"),
    "P": lambda im: _palette(im, False),
    "P+transparency": lambda im: _palette(im, True),
    "CMYK": lambda im: im.convert("CMYK"),
    "1": lambda im: im.convert("1"),
}


@pytest.mark.parametrize("mode", list(MAKERS))
def test_image_modes_give_normalized_rgb(photo, tmp_path, mode):
    path = tmp_path / f"photo_{mode.replace('+', '_')}.{'jpg' if mode == 'CMYK' else 'png'}"
    MAKERS[mode](photo).save(path)
    x = timm_eval_transform(open_image(path))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and np.isfinite(x).all()
    if mode in ("L", "1"):  # gray in, gray out: the three channels hold the same 8-bit level
        levels = (x * np.float32(IMAGENET_STD)[:, None, None] + np.float32(IMAGENET_MEAN)[:, None, None]) * 255
        assert np.abs(levels - levels[0]).max() < 1e-3


def test_16bit_grayscale_matches_8bit(photo, tmp_path):
    gray8 = np.asarray(photo.convert("L"), dtype=np.int64)
    noise = np.random.default_rng(0).integers(-128, 128, gray8.shape)  # low bits an 8-bit image cannot hold
    gray16 = np.clip(gray8 * 257 + noise, 0, 65535).astype(np.uint16)
    Image.fromarray(gray8.astype(np.uint8)).save(tmp_path / "g8.png")
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    img16 = open_image(tmp_path / "g16.png")
    assert img16.mode.startswith("I")  # PIL reads a 16-bit PNG as I;16 (or I)
    x8, x16 = (timm_eval_transform(open_image(tmp_path / f)) for f in ("g8.png", "g16.png"))
    assert x16.shape == (3, 224, 224) and x16.dtype == np.float32 and np.isfinite(x16).all()
    diff = float(np.abs(x16 - x8).max())
    print(f"\n16-bit vs 8-bit grayscale: max abs diff {diff:.3g} (one 8-bit step: {STEP:.3g})")
    assert diff <= STEP * (1 + 1e-6)


def test_fmnist_transform_matches_documented_pipeline():
    """pad 2 -> /255 -> 3 channels -> (x - mean) / std, computed here in float64 without refvit."""
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    padded = np.zeros((5, 32, 32))
    padded[:, 2:30, 2:30] = images
    mean, std = np.array(IMAGENET_MEAN)[None, :, None, None], np.array(IMAGENET_STD)[None, :, None, None]
    expected = (padded[:, None] / 255.0 - mean) / std                          # (5, 3, 32, 32)
    out = fmnist_transform(images)
    assert out.shape == (5, 3, 32, 32) and out.dtype == np.float32
    assert np.abs(out - expected).max() <= 1e-6


def test_grayscale_28_keeps_a_28x28_image(tmp_path):
    g = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    assert np.array_equal(grayscale_28(open_image(tmp_path / "g.png")), g)


@pytest.mark.parametrize("bad", [np.zeros((2, 28, 28), np.float32), np.zeros((28, 28), np.uint8),
                                 np.zeros((1, 32, 32), np.uint8)])
def test_fmnist_transform_rejects_bad_input(bad):
    with pytest.raises(ImageError, match="uint8"):
        fmnist_transform(bad)


def test_not_an_image_names_the_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(ImageError, match="notes.png"):
        open_image(path)


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(ImageError, match="no_such_photo.jpg"):
        open_image(tmp_path / "no_such_photo.jpg")
