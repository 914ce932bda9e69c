"""load_model: a checkpoint (or the embedded default) ready to classify images, in either form."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from refvit.checkpoints import load_checkpoint
from refvit.checkpoints.convert import token_to_conv

from . import model_conv, model_token
from .config import ConfigError, DeiTConfig
from .labels import DATA, class_names, default_model_info
from .preprocess import fmnist_transform, grayscale_28, timm_eval_transform

FORMS = {"token": model_token.forward, "conv": model_conv.forward}


def default_model_path() -> Path:
    return DATA / "fmnist_deit.safetensors"


def _fmnist_preprocess(img) -> np.ndarray:  # PIL image -> float32 (3, 32, 32)
    return fmnist_transform(grayscale_28(img)[None])[0]


@dataclass(frozen=True, eq=False)
class Model:
    config: DeiTConfig
    params: dict                 # timm names, shapes of `form`, in `dtype`
    form: str                    # 'token' | 'conv'
    head_mode: str               # 'cls' | 'mean'
    source: str                  # checkpoint naming: 'timm' | 'hf'
    path: Path                   # the .safetensors file read
    is_default: bool             # the embedded Fashion-MNIST model
    preprocess: Callable         # PIL image -> float32 (3, img_size, img_size)
    class_names: list

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) images (already preprocessed) -> (B, num_classes) logits in the params' dtype."""
        c = self.config
        want = (c.in_chans, c.img_size, c.img_size)
        if np.ndim(x) != 4 or tuple(np.shape(x)[1:]) != want:
            raise ConfigError(f"input of shape {np.shape(x)} does not fit the model: expected (B, {', '.join(map(str, want))})")
        dtype = next(iter(self.params.values())).dtype
        return FORMS[self.form](self.params, np.asarray(x, dtype=dtype), c)


def load_model(path=None, form: str = "token", dtype=np.float32) -> Model:
    """Load a DeiT checkpoint (a .safetensors file or a directory with model.safetensors [+ config.json]);
    path None is the embedded Fashion-MNIST model. `form` picks the token or the NCHW-conv computation."""
    if form not in FORMS:
        raise ConfigError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    is_default = path is None
    if is_default:
        card = default_model_info()["config"]
        ckpt = load_checkpoint(default_model_path(), num_heads=card["num_heads"], ln_eps=card["ln_eps"])
        preprocess = _fmnist_preprocess
    else:
        ckpt = load_checkpoint(path)
        preprocess = partial(timm_eval_transform, size=ckpt.config.img_size)
    params = model_token.cast_params(ckpt.params, dtype)
    return Model(config=ckpt.config, params=token_to_conv(params) if form == "conv" else params, form=form,
                 head_mode=ckpt.head_mode, source=ckpt.source, path=ckpt.path, is_default=is_default,
                 preprocess=preprocess, class_names=class_names(ckpt.config.num_classes, is_default))


# ---------------------------------------------------------------- INT8

def default_int8_path() -> Path:
    """The embedded default model, quantized by `python -m refvit quantize` (see its card's 'int8' entry)."""
    return DATA / "fmnist_deit_int8.safetensors"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def expand_images(paths) -> list:
    """Files and folders -> image files (a folder gives its images, sorted by name)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def calibration_batches(model: Model, paths, limit: int | None = None, batch: int = 32):
    """Float batches (B, 3, H, W) for calibration from image files, folders, or .npz files holding
    'images' uint8 (N, 28, 28) (Fashion-MNIST, for the embedded default model)."""
    from .preprocess import ImageError, open_image
    npz = [Path(p) for p in paths if str(p).endswith(".npz")]
    files = expand_images([p for p in paths if not str(p).endswith(".npz")])
    if npz and not model.is_default:
        raise ImageError(".npz calibration sets hold Fashion-MNIST images: they fit the embedded default model only")
    arrays = []
    for f in npz:
        try:
            arrays.append(np.load(f)["images"])
        except (OSError, KeyError, ValueError) as e:
            raise ImageError(f"cannot read calibration set {f}: {e}") from None
    images = np.concatenate(arrays) if arrays else np.zeros((0, 28, 28), np.uint8)
    total = len(images) + len(files)
    if limit is not None:
        total = min(total, limit)
        images = images[:limit]
        files = files[:max(0, limit - len(images))]
    if total == 0:
        raise ImageError("no calibration images found in " + ", ".join(map(str, paths)))
    for i in range(0, len(images), batch):
        yield fmnist_transform(images[i:i + batch])
    for i in range(0, len(files), batch):
        yield np.stack([model.preprocess(open_image(f)) for f in files[i:i + batch]])


def model_for_quantized(qm, path) -> Model:
    """Preprocessing and class names for a quantized model file used alone (its float weights are not needed:
    `params` is empty, only the integer model runs). The pipeline is the one recorded at quantization."""
    fmnist = qm.calibration.get("preprocess") == "fmnist"
    preprocess = _fmnist_preprocess if fmnist else partial(timm_eval_transform, size=qm.config.img_size)
    return Model(config=qm.config, params={}, form="conv", head_mode=qm.head_mode, source="refvit-int8",
                 path=Path(path), is_default=False, preprocess=preprocess,
                 class_names=class_names(qm.config.num_classes, fmnist))
