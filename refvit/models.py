"""load_model: a float DeiT checkpoint (or the embedded default) ready to run, in either form, with its
preprocessing and class names. refvit.resolve builds on it to give every command one model resolution."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import model_conv, model_token
from weights_tools import expected_shapes, load_checkpoint
from weights_tools.convert import token_to_conv
from .config import ConfigError, DeiTConfig
from .labels import DATA, class_names, default_model_info
from .preprocess import PRESETS, Preprocess, from_pretrained_cfg, read_hf_processor

HF_PROCESSOR_JSON = "preprocessor_config.json"   # a Hugging Face image processor, beside the weights

FORMS = {"token": model_token.forward, "conv": model_conv.forward}


def default_model_path() -> Path:
    return DATA / "fmnist_deit.safetensors"


def default_int8_path() -> Path:
    """The embedded default model, quantized by `python -m refvit quantize` (see its card's 'int8' entry)."""
    return DATA / "fmnist_deit_int8.safetensors"


@dataclass(frozen=True, eq=False)
class Model:
    config: DeiTConfig
    params: dict                 # timm names, shapes of `form`, in `dtype`
    form: str                    # 'token' | 'conv'
    head_mode: str               # 'cls' | 'mean'
    source: str                  # checkpoint naming: 'timm' | 'hf'
    path: Path                   # the checkpoint file read
    is_default: bool             # the embedded Fashion-MNIST model
    preprocess: Preprocess       # PIL image -> float32 (3, img_size, img_size)
    class_names: list
    heads_note: str = ""         # how the number of heads was decided
    prune: tuple = ()            # token pruning stages ((block, keep_rate), ...), refvit.prune; () none
    family: str = ""             # e.g. 'DeiT-III, timm deit3_small_patch16_224' (weights_tools Checkpoint.family)
    preprocess_note: str = ""    # why the default preprocessing is what it is, when a file was passed over

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) images (already preprocessed) -> (B, num_classes) logits in the params' dtype."""
        c = self.config
        want = (c.in_chans, c.img_size, c.img_size)
        if np.ndim(x) != 4 or tuple(np.shape(x)[1:]) != want:
            raise ConfigError(f"input of shape {np.shape(x)} does not fit the model: expected (B, {', '.join(map(str, want))})")
        dtype = next(iter(self.params.values())).dtype
        return FORMS[self.form](self.params, np.asarray(x, dtype=dtype), c, prune=self.prune)

    def in_form(self, form: str) -> "Model":
        """The same weights in the other form (token <-> conv)."""
        if form == self.form:
            return self
        if self.form != "token":
            raise ConfigError("only token-form parameters convert to the conv form")
        return Model(**{**self.__dict__, "params": token_to_conv(self.params), "form": form})


def load_model(path=None, form: str = "token", dtype=np.float32, *, preprocess: Preprocess | None = None,
               num_heads: int | None = None, arch: str | None = None) -> Model:
    """Load a DeiT checkpoint (a file or a directory, see weights_tools.load_checkpoint); path None is
    the embedded Fashion-MNIST model. `form` picks the token or the NCHW-conv computation. Preprocessing:
    `preprocess`, else the checkpoint's timm pretrained_cfg, else a Hugging Face preprocessor_config.json
    beside the weights, else the ImageNet eval transform (the embedded model: the Fashion-MNIST pipeline).
    With both a pretrained_cfg and a preprocessor_config.json, the pretrained_cfg wins (said in
    preprocess_note)."""
    if form not in FORMS:
        raise ConfigError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    is_default = path is None
    if is_default:
        card = default_model_info()["config"]
        ckpt = load_checkpoint(default_model_path(), num_heads=card["num_heads"], ln_eps=card["ln_eps"])
        ckpt = replace(ckpt, heads_note="from the model card")
        default_pp, note = PRESETS["fmnist"], ""
    else:
        ckpt = load_checkpoint(path, num_heads=num_heads, arch=arch)
        default_pp, note = _checkpoint_preprocess(ckpt) if preprocess is None else (None, "")
    params = model_token.cast_params(ckpt.params, dtype)
    return Model(config=ckpt.config, params=token_to_conv(params) if form == "conv" else params, form=form,
                 head_mode=ckpt.head_mode, source=ckpt.source, path=ckpt.path, is_default=is_default,
                 preprocess=(preprocess or default_pp).for_model(ckpt.config.img_size),
                 class_names=class_names(ckpt.config.num_classes, is_default),
                 heads_note=getattr(ckpt, "heads_note", ""), family=ckpt.family, preprocess_note=note)


def _checkpoint_preprocess(ckpt) -> tuple:
    """The checkpoint's own preprocessing -> (Preprocess, note): timm's pretrained_cfg, else the Hugging Face
    preprocessor_config.json beside the weights, else ImageNet's eval transform."""
    processor = ckpt.path.parent / HF_PROCESSOR_JSON
    if ckpt.pretrained_cfg:
        note = (f"{processor} not used: the timm pretrained_cfg of config.json decides the preprocessing (pass "
                f"--preprocess {processor} to use it)") if processor.is_file() else ""
        return from_pretrained_cfg(ckpt.pretrained_cfg), note
    if processor.is_file():
        return read_hf_processor(processor), ""
    return PRESETS["imagenet"], ""


def random_params(cfg: DeiTConfig, head_mode: str = "cls", rng=0, weight_gain: float = 1.0) -> dict:
    """Plausible random float32 DeiT weights in timm names and token-form shapes, deterministic in `rng`
    (a seed or a numpy Generator): LayerNorm gains 1 + 0.1 N(0,1), weights N(0,1) * gain / sqrt(fan_in),
    biases 0.1 N(0,1), tokens and position embedding 0.5 N(0,1), drawn in `expected_shapes` order.
    The one random-weights builder of the tests, the conformance suite and the benchmarks."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    params = {}
    for name, shape in expected_shapes(cfg, head_mode).items():
        if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            params[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".weight"):
            params[name] = weight_gain * rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:   # biases small, tokens and position embedding O(1)
            params[name] = (0.1 if name.endswith("bias") else 0.5) * rng.standard_normal(shape)
    return {k: v.astype(np.float32) for k, v in params.items()}
