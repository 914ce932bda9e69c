"""Input pipelines as data (`Preprocess`, in timm's pretrained_cfg terms) and the functions that apply them:
timm's DeiT eval transform for photos, and the Fashion-MNIST pipeline of the embedded default model.
docs/preprocessing.md states every step's arithmetic, so a team can reproduce the int8 input from the image.

timm eval (crop_pct 0.9, bicubic): RGB convert; resize the shorter side to floor(size / crop_pct)
with PIL bicubic, the longer side to int(short * long / short_in) (torchvision's rule); center crop
with torchvision's offsets int(round((H - size) / 2)) (Python's round, ties to even, as torchvision);
ToTensor (/255, float32); normalize with the ImageNet mean/std in float32.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import named_or_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """An input image that cannot be read or converted."""


class PreprocessError(ValueError):
    """A preprocessing description that cannot be applied (unknown preset, bad value in a JSON file)."""


INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
CROP_MODES = ("center", "squash")
KINDS = ("resize-crop", "grayscale-pad")
MAX_INPUT_SIZE = 4096


# The most pixels an image may have decoded, and once resized (short side to the model's resize size, the
# long side in proportion): 8192 x 8192, 192 MiB as RGB. The environment variable raises (or lowers) it.
MAX_IMAGE_PIXELS = 2**26
MAX_IMAGE_PIXELS_ENV = "REFVIT_MAX_IMAGE_PIXELS"


def _pixel_limit(max_pixels) -> int:
    if max_pixels is None:
        text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
        if not text:
            return MAX_IMAGE_PIXELS
        if not text.isdigit() or int(text) < 1:
            raise ImageError(f"{MAX_IMAGE_PIXELS_ENV} must be a positive integer (a number of pixels), "
                             f"got {text[:40]!r}")
        return int(text)
    return max_pixels


def open_image(path, *, resize_short: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Open and decode an image file. ImageError if it cannot be read, or if it has more than `max_pixels`
    pixels (default: $REFVIT_MAX_IMAGE_PIXELS, else MAX_IMAGE_PIXELS) — or would have, once its short side is
    resized to `resize_short` pixels and its long side in proportion (timm's eval resize; a 100000x2 image
    resized to 248 would be 248 x 12400000). The size comes from the file's header: the check is made before
    anything is decoded, and replaces Pillow's own decompression-bomb limit."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    limit = _pixel_limit(max_pixels)
    how = (f"the limit is {limit:,} pixels (MAX_IMAGE_PIXELS in refvit.preprocess); set the environment variable "
           f"{MAX_IMAGE_PIXELS_ENV} to a larger number of pixels to allow it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours, below, replaces it
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
            w, h = img.size
            if w < 1 or h < 1:
                raise ImageError(f"image {path} is {w}x{h}: it has no pixels")
            if w * h > limit:
                raise ImageError(f"image {path} is {w}x{h} = {w * h:,} pixels, too many to decode: {how}")
            if resize_short is not None:
                short, long = min(w, h), max(w, h)
                new_long = int(resize_short * long / short)
                rw, rh = (resize_short, new_long) if w <= h else (new_long, resize_short)
                if rw * rh > limit:
                    raise ImageError(f"image {path} is {w}x{h}: resized to {resize_short} pixels on its short side "
                                     f"it would be {rw}x{rh} = {rw * rh:,} pixels, too many: {how}")
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {path}: {e}; {how}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
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


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 0.9, interpolation: str = "bicubic",
                       crop_mode: str = "center") -> Image.Image:
    scale_size = math.floor(size / crop_pct)
    w, h = img.size
    if crop_mode == "squash":                 # timm: both sides to scale_size, then the center crop
        new_w, new_h = scale_size, scale_size
    elif w <= h:
        new_w, new_h = scale_size, int(scale_size * h / w)
    else:
        new_w, new_h = int(scale_size * w / h), scale_size
    img = img.resize((new_w, new_h), INTERPOLATIONS[interpolation])
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


def fmnist_transform(images: np.ndarray, pad: int = 2, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     source_size: int = 28) -> np.ndarray:
    """uint8 (B, 28, 28) Fashion-MNIST -> float32 (B, 3, 32, 32): zero-pad 2, /255, 3 channels, normalize."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (source_size, source_size):
        raise ImageError(f"Fashion-MNIST input must be uint8 (B, {source_size}, {source_size}), "
                         f"got {images.dtype} {images.shape}")
    x = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))                         # (B, 32, 32)
    x = np.repeat(x[..., None], 3, axis=-1)                                      # (B, 32, 32, 3)
    return np.stack([normalize(im, mean, std) for im in x])                      # (B, 3, 32, 32)


def grayscale_28(img: Image.Image, size: int = 28, interpolation: str = "bicubic") -> np.ndarray:
    """Any image -> uint8 (28, 28) grayscale, for the Fashion-MNIST default model (bicubic resize)."""
    g = np.asarray(to_rgb(img).convert("L"))
    if g.shape != (size, size):
        g = np.asarray(Image.fromarray(g).resize((size, size), INTERPOLATIONS[interpolation]))
    return g


# ---------------------------------------------------------------------------------------------
# preprocessing as data
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocess:
    """One eval input pipeline. `resize-crop` is timm's eval transform (resize the short side to
    floor(size / crop_pct), center crop, /255, normalize); `grayscale-pad` is the Fashion-MNIST pipeline
    (grayscale, resize to source_size if needed, zero-pad `pad` pixels per side, /255, three channels,
    normalize). input_size None: the model's img_size (set by `for_model`)."""
    name: str
    kind: str = "resize-crop"
    input_size: int | None = None
    interpolation: str = "bicubic"
    crop_pct: float = 0.9
    crop_mode: str = "center"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    source_size: int = 28          # grayscale-pad only
    pad: int = 2                   # grayscale-pad only

    def __post_init__(self):
        bad = self._problem()
        if bad:
            raise PreprocessError(f"preprocessing {self.name!r}: {bad}")

    def _problem(self) -> str:
        if self.kind not in KINDS:
            return f"kind must be one of {KINDS}, got {self.kind!r}"
        if self.interpolation not in INTERPOLATIONS:
            return f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
        if self.crop_mode not in CROP_MODES:
            return f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}"
        if not (isinstance(self.crop_pct, (int, float)) and 0 < self.crop_pct <= 1):
            return f"crop_pct must be in (0, 1], got {self.crop_pct!r}"
        for key in ("input_size", "source_size", "pad"):
            v = getattr(self, key)
            low = 0 if key == "pad" else 1
            if not (v is None and key == "input_size") and not (
                    isinstance(v, int) and not isinstance(v, bool) and low <= v <= MAX_INPUT_SIZE):
                return f"{key} must be an integer in [{low}, {MAX_INPUT_SIZE}], got {v!r}"
        for key in ("mean", "std"):
            v = getattr(self, key)
            if not (isinstance(v, tuple) and len(v) == 3 and all(isinstance(a, (int, float)) and math.isfinite(a)
                                                                 for a in v)):
                return f"{key} must be three finite numbers, got {v!r}"
        if min(self.std) <= 0:
            return f"std must be positive, got {self.std!r}"
        if self.kind == "grayscale-pad" and self.input_size not in (None, self.source_size + 2 * self.pad):
            return f"input_size {self.input_size} must be source_size + 2 * pad = {self.source_size + 2 * self.pad}"
        return ""

    @property
    def size(self) -> int:
        return self.source_size + 2 * self.pad if self.kind == "grayscale-pad" else self.input_size

    def for_model(self, img_size: int) -> "Preprocess":
        """This pipeline at the model's input size; an error if it makes images of another size."""
        p = self if self.input_size is not None or self.kind == "grayscale-pad" else replace(self, input_size=img_size)
        if p.size != img_size:
            raise PreprocessError(f"preprocessing {self.name!r} makes {p.size}x{p.size} images but the model "
                                  f"expects {img_size}x{img_size}")
        return p

    def __call__(self, img: Image.Image) -> np.ndarray:
        """PIL image -> float32 (3, size, size)."""
        if self.kind == "grayscale-pad":
            return self.from_grayscale(grayscale_28(img, self.source_size, self.interpolation)[None])[0]
        if self.input_size is None:
            raise PreprocessError(f"preprocessing {self.name!r} has no input size: call for_model first")
        crop = resize_center_crop(to_rgb(img), self.input_size, self.crop_pct, self.interpolation, self.crop_mode)
        return normalize(np.asarray(crop), self.mean, self.std)

    def from_grayscale(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, source_size, source_size) grayscale arrays (an .npz data set) -> float32 (B, 3, size, size)."""
        if self.kind != "grayscale-pad":
            raise PreprocessError(f"preprocessing {self.name!r} takes images, not grayscale arrays")
        return fmnist_transform(images, self.pad, self.mean, self.std, self.source_size)

    def open(self, path) -> Image.Image:
        """Open an image for this pipeline: refused before decoding when it, or its resize, exceeds the pixel limit."""
        short = self.source_size if self.kind == "grayscale-pad" else math.floor(self.size / self.crop_pct)
        return open_image(path, resize_short=short)

    def images(self, paths) -> np.ndarray:
        """Image files -> float32 (B, 3, size, size)."""
        return np.stack([self(self.open(p)) for p in paths])

    def relevant(self) -> dict:
        """The fields this kind of pipeline uses, without its name (for display)."""
        return {k: v for k, v in self.to_dict().items() if k != "name"}

    def to_dict(self) -> dict:
        """name, kind and only the fields this kind of pipeline uses (resize-crop: no source_size, pad;
        grayscale-pad: no crop_pct, crop_mode); from_dict gives the others their defaults."""
        unused = ("source_size", "pad") if self.kind == "resize-crop" else ("crop_pct", "crop_mode")
        d = {k: v for k, v in asdict(self).items() if k not in unused}
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict, name: str | None = None) -> "Preprocess":
        if not isinstance(d, dict):
            raise PreprocessError(f"a preprocessing description is a JSON object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise PreprocessError(f"unknown preprocessing keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("mean", "std"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        d.setdefault("name", name or "custom")
        try:
            return cls(**d)
        except TypeError as e:
            raise PreprocessError(f"bad preprocessing description: {e}") from None


PRESETS = {
    "imagenet": Preprocess("imagenet"),   # timm's DeiT eval transform at the model's size
    "fmnist": Preprocess("fmnist", kind="grayscale-pad", input_size=32, source_size=28, pad=2, crop_pct=1.0),
}


def from_pretrained_cfg(cfg: dict) -> Preprocess:
    """timm's pretrained_cfg (input_size (3, H, W), interpolation, crop_pct, crop_mode, mean, std) -> Preprocess."""
    if not isinstance(cfg, dict):
        raise PreprocessError(f"pretrained_cfg must be a JSON object, got {type(cfg).__name__}")
    d = {"name": "pretrained_cfg"}
    size = cfg.get("test_input_size") or cfg.get("input_size")
    if size is not None:
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and size[1] == size[2]):
            raise PreprocessError(f"pretrained_cfg input_size must be (3, H, H), got {size!r}")
        d["input_size"] = size[1]
    for key in ("interpolation", "crop_pct", "crop_mode"):
        if cfg.get(key) is not None:
            d[key] = cfg[key]
    if cfg.get("test_crop_pct") is not None:
        d["crop_pct"] = cfg["test_crop_pct"]
    for key in ("mean", "std"):
        v = cfg.get(key)
        if isinstance(v, (list, tuple)) and len(v) == 1:   # timm allows one value for every channel
            v = tuple(v) * 3
        if v is not None:
            d[key] = tuple(v) if isinstance(v, (list, tuple)) else v
    return Preprocess(**d)


def resolve_preprocess(spec) -> Preprocess:
    """A preset name (imagenet, fmnist), a JSON file describing one, or a dict -> Preprocess."""
    if isinstance(spec, Preprocess):
        return spec
    if isinstance(spec, dict):
        return Preprocess.from_dict(spec)
    preset, d, stem = named_or_json(spec, PRESETS, "preprocessing", PreprocessError)
    return preset or Preprocess.from_dict(d, name=f"{stem}.json")
