"""Input pipelines as data (`Preprocess`, in timm's pretrained_cfg terms) and the functions that apply them:
timm's DeiT eval transform for photos, and the Fashion-MNIST pipeline of the embedded default model.
docs/preprocessing.md states every step's arithmetic, so a team can reproduce the int8 input from the image.

timm eval (crop_pct 0.9, bicubic): RGB convert; resize the shorter side to floor(size / crop_pct)
with PIL bicubic, the longer side to int(short * long / short_in) (torchvision's rule); center crop
with torchvision's offsets int(round((H - size) / 2)) (Python's round, ties to even, as torchvision);
ToTensor (/255, float32); normalize with the ImageNet mean/std in float32.

Hugging Face image processors (ViTImageProcessor, DeiTImageProcessor: `preprocessor_config.json`), kind
`hf`: RGB convert; resize to exactly {height, width} (or the shorter side to shortest_edge, the other in
proportion) with the processor's `resample`; center crop to crop_size with torchvision's offsets; uint8 ->
float32; (x - mean / rescale_factor) / (std / rescale_factor), the rescale fused into the normalisation as
transformers' torchvision backend does (or x * rescale_factor, then (x - mean) / std, when one is off).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import named_or_json
from .errors import RefvitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(RefvitError):
    """An input image that cannot be read or converted."""


class PreprocessError(RefvitError):
    """A preprocessing description that cannot be applied (unknown preset, bad value in a JSON file)."""


INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
CROP_MODES = ("center", "squash")
KINDS = ("resize-crop", "grayscale-pad", "hf")
# PIL's resampling codes, as `resample` in a Hugging Face preprocessor_config.json
HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
HF_STANDARD_MEAN = HF_STANDARD_STD = (0.5, 0.5, 0.5)   # transformers' IMAGENET_STANDARD_MEAN / _STD
MAX_PROCESSOR_JSON_BYTES = 2**20
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


def hf_transform(img: Image.Image, hf: dict, size: int, interpolation: str, mean, std) -> np.ndarray:
    """PIL image -> float32 (3, size, size): a Hugging Face image processor's pipeline (`hf` as
    `hf_processor_fields` gives it; the steps are in the module docstring and docs/preprocessing.md)."""
    img = to_rgb(img)
    if hf["do_resize"]:
        img = img.resize(hf_resize_size(img.size, hf, size), INTERPOLATIONS[interpolation])   # (w, h)
    if hf["do_center_crop"]:
        ch, cw = hf["crop_size"] or (size, size)
        w, h = img.size
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))  # torchvision's offsets
        img = img.crop((left, top, left + cw, top + ch))
    x = np.asarray(img)                                                       # (H, W, 3) uint8
    if x.shape[:2] != (size, size):
        raise ImageError(f"the Hugging Face pipeline made a {x.shape[1]}x{x.shape[0]} image, the model takes "
                         f"{size}x{size}")
    return hf_rescale_normalize(x, hf, mean, std)


def hf_resize_size(wh: tuple, hf: dict, size: int) -> tuple:
    """(w, h) after the processor's resize: {height, width} exactly, or the shorter side to shortest_edge and
    the longer to int(shortest_edge * long / short) (transformers' get_resize_output_image_size)."""
    if hf["shortest_edge"] is None:
        h, w = hf["size"] or (size, size)
        return w, h
    w, h = wh
    s = hf["shortest_edge"]
    return (s, int(s * h / w)) if w <= h else (int(s * w / h), s)


def hf_rescale_normalize(x_hwc_uint8: np.ndarray, hf: dict, mean, std) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W). Both on (transformers' torchvision backend fuses them):
    (x - float32(mean / f)) / float32(std / f) in float32, f = rescale_factor; else x * float32(f) and
    (x - mean) / std in float32, each step only when its flag is on."""
    x = x_hwc_uint8.astype(np.float32).transpose(2, 0, 1)                     # (3, H, W)
    f = hf["rescale_factor"]
    if hf["do_rescale"] and hf["do_normalize"]:
        m = np.asarray([v / f for v in mean], np.float32)[:, None, None]      # mean in uint8 units
        s = np.asarray([v / f for v in std], np.float32)[:, None, None]
        return (x - m) / s
    if hf["do_rescale"]:
        x = x * np.float32(f)
    if hf["do_normalize"]:
        x = (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    return x


# ---------------------------------------------------------------------------------------------
# preprocessing as data
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocess:
    """One eval input pipeline. `resize-crop` is timm's eval transform (resize the short side to
    floor(size / crop_pct), center crop, /255, normalize); `grayscale-pad` is the Fashion-MNIST pipeline
    (grayscale, resize to source_size if needed, zero-pad `pad` pixels per side, /255, three channels,
    normalize); `hf` is a Hugging Face image processor (`hf`: its steps, `hf_processor_fields`).
    input_size None: the model's img_size (set by `for_model`)."""
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
    hf: dict | None = None         # hf only: do_resize, size, shortest_edge, do_center_crop, crop_size, do_rescale,
    #                                rescale_factor, do_normalize (sizes as [height, width]; None: the model's)

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
        if (self.kind == "hf") != (self.hf is not None):
            return "hf (the Hugging Face processor's steps) is given with kind 'hf' and only then"
        if self.hf is not None:
            return _hf_problem(self.hf)
        return ""

    @property
    def size(self) -> int:
        return self.source_size + 2 * self.pad if self.kind == "grayscale-pad" else self.input_size

    def for_model(self, img_size: int) -> "Preprocess":
        """This pipeline at the model's input size; an error if it makes images of another size."""
        p = self if self.input_size is not None or self.kind == "grayscale-pad" else replace(self, input_size=img_size)
        if p.kind == "hf" and p.hf["do_resize"] and not p.hf["do_center_crop"] and p.hf["shortest_edge"] is None \
                and p.hf["size"] is not None and tuple(p.hf["size"]) != (p.size, p.size):
            raise PreprocessError(f"preprocessing {self.name!r} resizes to {p.hf['size'][1]}x{p.hf['size'][0]} (width x "
                                  f"height) without a crop but the model expects {p.size}x{p.size}")
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
        if self.kind == "hf":
            return hf_transform(img, self.hf, self.input_size, self.interpolation, self.mean, self.std)
        crop = resize_center_crop(to_rgb(img), self.input_size, self.crop_pct, self.interpolation, self.crop_mode)
        return normalize(np.asarray(crop), self.mean, self.std)

    def from_grayscale(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, source_size, source_size) grayscale arrays (an .npz data set) -> float32 (B, 3, size, size)."""
        if self.kind != "grayscale-pad":
            raise PreprocessError(f"preprocessing {self.name!r} takes images, not grayscale arrays")
        return fmnist_transform(images, self.pad, self.mean, self.std, self.source_size)

    def open(self, path) -> Image.Image:
        """Open an image for this pipeline: refused before decoding when it, or its resize, exceeds the pixel limit."""
        if self.kind == "hf":
            return open_image(path, resize_short=self.hf["shortest_edge"] if self.hf["do_resize"] else None)
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
        grayscale-pad: no crop_pct, crop_mode; hf: none of the four, its own `hf` fields instead);
        from_dict gives the others their defaults."""
        unused = {"resize-crop": ("source_size", "pad"), "grayscale-pad": ("crop_pct", "crop_mode"),
                  "hf": ("source_size", "pad", "crop_pct", "crop_mode")}[self.kind]
        d = {k: v for k, v in asdict(self).items() if k not in unused}
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.hf is None:
            del d["hf"]
        else:
            d["hf"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.hf.items()}
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
        if isinstance(d.get("hf"), dict):
            d["hf"] = {k: tuple(v) if isinstance(v, list) else v for k, v in d["hf"].items()}
        d.setdefault("name", name or "custom")
        try:
            return cls(**d)
        except TypeError as e:
            raise PreprocessError(f"bad preprocessing description: {e}") from None


HF_DEFAULTS = {"do_resize": True, "size": None, "shortest_edge": None, "do_center_crop": False, "crop_size": None,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}

def _hw(v):
    return isinstance(v, tuple) and len(v) == 2 and all(isinstance(a, int) and not isinstance(a, bool)
                                                        and 1 <= a <= MAX_INPUT_SIZE for a in v)


def _hf_problem(hf: dict) -> str:
    """'' or what is wrong with a kind-'hf' pipeline's steps."""
    if set(hf) != set(HF_DEFAULTS):
        return f"hf must have exactly the keys {sorted(HF_DEFAULTS)}, got {sorted(map(str, hf))}"
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if not isinstance(hf[key], bool):
            return f"hf.{key} must be true or false, got {hf[key]!r}"
    for key in ("size", "crop_size"):
        if hf[key] is not None and not _hw(hf[key]):
            return f"hf.{key} must be [height, width] (1 to {MAX_INPUT_SIZE}) or null, got {hf[key]!r}"
    se = hf["shortest_edge"]
    if se is not None and not (isinstance(se, int) and not isinstance(se, bool) and 1 <= se <= MAX_INPUT_SIZE):
        return f"hf.shortest_edge must be an integer in [1, {MAX_INPUT_SIZE}] or null, got {se!r}"
    if se is not None and hf["size"] is not None:
        return "hf gives both size and shortest_edge"
    f = hf["rescale_factor"]
    if not (isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0):
        return f"hf.rescale_factor must be a positive number, got {f!r}"
    return ""


PRESETS = {
    "imagenet": Preprocess("imagenet"),   # timm's DeiT eval transform at the model's size
    "fmnist": Preprocess("fmnist", kind="grayscale-pad", input_size=32, source_size=28, pad=2, crop_pct=1.0),
    # ViTImageProcessor's defaults at the model's size: resize to it (bilinear), /255, mean = std = 0.5
    "hf": Preprocess("hf", kind="hf", interpolation="bilinear", mean=HF_STANDARD_MEAN, std=HF_STANDARD_STD,
                     hf=dict(HF_DEFAULTS)),
}


# preprocessor_config.json keys that do not change the pixels refvit computes
_HF_IGNORED_KEYS = {"image_processor_type", "processor_class", "feature_extractor_type", "do_convert_rgb",
                    "input_data_format", "data_format", "return_tensors", "device", "disable_grouping",
                    "default_to_square"}
_HF_PROCESSORS = ("ViTImageProcessor", "DeiTImageProcessor", "ViTFeatureExtractor", "DeiTFeatureExtractor")


def _hf_size(d: dict, key: str, name: str):
    """A processor's size entry -> ([height, width] or None, shortest_edge or None)."""
    v = d.get(key)
    if v is None:
        return None, None
    if isinstance(v, int) and not isinstance(v, bool):             # older feature extractors: one number, square
        return (v, v), None
    if isinstance(v, dict) and set(v) == {"height", "width"}:
        return (v["height"], v["width"]), None
    if isinstance(v, dict) and set(v) == {"shortest_edge"} and key == "size":
        return None, v["shortest_edge"]
    raise PreprocessError(f"{name}: {key} must be {{height, width}}"
                          f"{' or {shortest_edge}' if key == 'size' else ''}, got {str(v)[:100]}")


def from_hf_processor(d: dict, name: str = "preprocessor_config.json") -> Preprocess:
    """A Hugging Face ViT / DeiT image processor's preprocessor_config.json -> Preprocess (kind 'hf'). Missing
    keys take ViTImageProcessor's defaults; a key that would change the pixels and that refvit does not
    compute (another processor's crop_pct, padding, ...) is refused by name."""
    if not isinstance(d, dict):
        raise PreprocessError(f"{name}: a preprocessor_config.json holds a JSON object, got {type(d).__name__}")
    kind = d.get("image_processor_type") or d.get("feature_extractor_type")
    if kind is not None and str(kind).removesuffix("Fast").removesuffix("Pil") not in _HF_PROCESSORS:
        raise PreprocessError(f"{name}: image_processor_type {str(kind)[:60]!r} is not supported: refvit computes "
                              f"{', '.join(_HF_PROCESSORS[:2])} (and their Fast / Pil variants)")
    unknown = sorted(set(d) - set(HF_DEFAULTS) - {"resample", "image_mean", "image_std"} - _HF_IGNORED_KEYS)
    if unknown:
        raise PreprocessError(f"{name}: {unknown[0]!r} is not understood by refvit (it may change the pixels); "
                              f"refvit reads {', '.join(sorted(HF_DEFAULTS))}, resample, image_mean, image_std")
    size, shortest = _hf_size(d, "size", name)
    crop, _ = _hf_size(d, "crop_size", name)
    resample = d.get("resample", 2)
    if resample not in HF_RESAMPLE or isinstance(resample, bool):
        raise PreprocessError(f"{name}: resample must be one of PIL's codes {sorted(HF_RESAMPLE)}, got {resample!r}")
    hf = {**HF_DEFAULTS, **{k: d[k] for k in ("do_resize", "do_center_crop", "do_rescale", "rescale_factor",
                                               "do_normalize") if k in d},
          "size": size, "shortest_edge": shortest, "crop_size": crop}
    mean, std = (d.get(k, HF_STANDARD_MEAN) for k in ("image_mean", "image_std"))
    mean, std = (tuple(v) * 3 if isinstance(v, list) and len(v) == 1 else tuple(v) if isinstance(v, list) else v
                 for v in (mean, std))
    final = crop if hf["do_center_crop"] else (size if hf["do_resize"] else None)
    if final is not None and final[0] != final[1]:
        raise PreprocessError(f"{name}: makes {final[1]}x{final[0]} (width x height) images; refvit's models take "
                              "square ones")
    if hf["do_center_crop"] and crop is None:
        raise PreprocessError(f"{name}: do_center_crop is true but there is no crop_size")
    if hf["do_resize"] and not hf["do_center_crop"] and shortest is not None:
        raise PreprocessError(f"{name}: resizing the shortest edge without a crop makes non-square images")
    return Preprocess(name, kind="hf", input_size=final[0] if final else None, interpolation=HF_RESAMPLE[resample],
                      mean=mean, std=std, hf=hf)


def read_hf_processor(path) -> Preprocess:
    """Read a preprocessor_config.json (bounded) -> Preprocess named after the file (not its folder: quantized
    files and manifests record the name); PreprocessError names the path."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PROCESSOR_JSON_BYTES:
            raise PreprocessError(f"{path}: {size} bytes is above the {MAX_PROCESSOR_JSON_BYTES}-byte limit for a "
                                  "preprocessor_config.json")
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, PreprocessError):
            raise
        raise PreprocessError(f"cannot read {path}: {str(e)[:200]}") from None
    return replace(from_hf_processor(d, name=str(path)), name=path.name)   # errors name the path, records the file


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
    if preset is not None:
        return preset
    if _is_hf_processor(d):       # a Hugging Face preprocessor_config.json given as --preprocess FILE.json
        return from_hf_processor(d, name=f"{stem}.json")
    return Preprocess.from_dict(d, name=f"{stem}.json")


def _is_hf_processor(d: dict) -> bool:
    return "image_processor_type" in d or "feature_extractor_type" in d or "image_mean" in d
