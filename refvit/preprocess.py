"""Input pipelines: timm's DeiT eval transform for photos, and the Fashion-MNIST pipeline of the
embedded default model.

timm eval (crop_pct 0.9, bicubic): RGB convert; resize the shorter side to floor(size / crop_pct)
with PIL bicubic, the longer side to int(short * long / short_in) (torchvision's rule); center crop
with torchvision's offsets int(round((H - size) / 2)) (Python's round, ties to even, as torchvision);
ToTensor (/255, float32); normalize with the ImageNet mean/std in float32.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """An input image that cannot be read or converted."""


def open_image(path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as timm's loader (`convert('RGB')`), except that 16/32-bit integer and float grayscale are
    scaled to 8 bits first (PIL's own conversion would clip them at 255)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        img = Image.fromarray(((np.clip(a, 0, top) * 255 + top // 2) // top).astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.floor(a * 255.0 + 0.5), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency goes through RGBA, as PIL recommends
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 0.9) -> Image.Image:
    scale_size = math.floor(size / crop_pct)
    w, h = img.size
    if w <= h:
        new_w, new_h = scale_size, int(scale_size * h / w)
    else:
        new_w, new_h = int(scale_size * w / h), scale_size
    img = img.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def normalize(x_hwc_uint8: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W): /255 then (x - mean) / std, in float32 as torchvision."""
    x = x_hwc_uint8.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)   # (3, H, W)
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    return (x - m) / s


def timm_eval_transform(img: Image.Image, size: int = 224, crop_pct: float = 0.9) -> np.ndarray:
    """PIL image -> float32 (3, size, size), timm's eval transform for DeiT."""
    return normalize(np.asarray(resize_center_crop(to_rgb(img), size, crop_pct)))


def fmnist_transform(images: np.ndarray) -> np.ndarray:
    """uint8 (B, 28, 28) Fashion-MNIST -> float32 (B, 3, 32, 32): zero-pad 2, /255, 3 channels, normalize."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ImageError(f"Fashion-MNIST input must be uint8 (B, 28, 28), got {images.dtype} {images.shape}")
    x = np.pad(images, ((0, 0), (2, 2), (2, 2)))                                 # (B, 32, 32)
    x = np.repeat(x[..., None], 3, axis=-1)                                      # (B, 32, 32, 3)
    return np.stack([normalize(im) for im in x])                                 # (B, 3, 32, 32)


def grayscale_28(img: Image.Image) -> np.ndarray:
    """Any image -> uint8 (28, 28) grayscale, for the Fashion-MNIST default model (bicubic resize)."""
    g = np.asarray(to_rgb(img).convert("L"))
    if g.shape != (28, 28):
        g = np.asarray(Image.fromarray(g).resize((28, 28), Image.BICUBIC))
    return g
