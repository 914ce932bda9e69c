"""Class names: ImageNet-1k for 1000-class checkpoints, Fashion-MNIST for the embedded default model."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL_JSON = DATA / "fmnist_deit.json"
IMAGENET_NUM_CLASSES = 1000


@lru_cache(maxsize=None)
def default_model_info() -> dict:
    """The embedded default model's card: config, class names, accuracy, provenance."""
    return json.loads(DEFAULT_MODEL_JSON.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _imagenet_classes() -> tuple:
    lines = (DATA / "imagenet1k_classes.tsv").read_text(encoding="utf-8").splitlines()[1:]  # skip the header
    rows = [line.split("\t") for line in lines]
    assert [int(r[0]) for r in rows] == list(range(IMAGENET_NUM_CLASSES)), "imagenet1k_classes.tsv is out of order"
    return tuple(r[2] for r in rows)


def imagenet_classes() -> list:
    """The 1000 ImageNet-1k class names in index order (WordNet lemmas, as timm ships them)."""
    return list(_imagenet_classes())


def class_names(num_classes: int, default_model: bool = False) -> list:
    """Names for a model's classes: the embedded default's own, ImageNet's for 1000 classes, else 'class <i>'."""
    if default_model:
        return list(default_model_info()["classes"])
    if num_classes == IMAGENET_NUM_CLASSES:
        return imagenet_classes()
    return [f"class {i}" for i in range(num_classes)]
