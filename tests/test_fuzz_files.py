"""Fuzzing the readers of refvit's own files (hypothesis, bounded examples): a golden manifest as `check`
reads it, and a quantized model file as `load_quantized` reads it. Whatever the mutation: the clean error
(one line, exit 2 / CheckpointError) or a correct result (check: 0 or 1; a model whose graph runs)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refvit import int_model
from weights_tools import CheckpointError, read_safetensors, write_safetensors
from refvit.cli import main
from refvit.config import DeiTConfig
from refvit.qfile import load_quantized, save_quantized

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CFG = DeiTConfig(img_size=16, patch_size=8, embed_dim=12, depth=1, num_heads=2, num_classes=3)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=12), st.builds(list), st.builds(dict), st.just("../../etc/passwd"),
                   st.lists(st.integers(-5, 5), max_size=4))


def _paths(node, prefix=()):
    """Every (path, value) inside a JSON value."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:6]):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


@pytest.fixture(scope="module")
def model(make_tiny, tmp_path_factory):
    """A one-block variation of the tiny model (tests/conftest.py): quick to load, 60 times per fuzzer."""
    qm = make_tiny(CFG).qm
    folder = tmp_path_factory.mktemp("fuzz")
    return qm, save_quantized(qm, folder / "q.safetensors"), folder


@FUZZ
@given(data=st.data())
def test_fuzz_quantized_file_metadata(model, tmp_path, data):
    qm, path, _ = model
    tensors, meta = read_safetensors(path)
    m = json.loads(meta["refvit"])
    for _ in range(data.draw(st.integers(1, 3))):
        _set(m, data.draw(st.sampled_from([p for p, _ in _paths(m) if p])), data.draw(VALUES))
    bad = tmp_path / "q.safetensors"
    write_safetensors(bad, tensors, {"refvit": json.dumps(m)})
    try:
        q = load_quantized(bad)
    except CheckpointError as e:
        assert str(e).startswith(str(bad)) and "\n" not in str(e)
        return
    xq = np.zeros((1, 3, q.config.img_size, q.config.img_size), np.int8)
    assert int_model.forward_int(q, xq).dtype == np.int16               # a model that loads, runs


@FUZZ
@given(name=st.sampled_from(["blocks.0.mlp.fc1.weight", "blocks.0.norm1.bias", "blocks.0.attn.softmax.shift",
                             "head.multiplier", "exp_table", "blocks.0.mlp.gelu.table", "input.scale"]),
       value=st.integers(-2**40, 2**40), where=st.integers(0, 10**6))
def test_fuzz_quantized_file_constants(model, tmp_path, name, value, where):
    qm, path, _ = model
    tensors, meta = read_safetensors(path)
    arr = np.array(tensors[name])
    flat = arr.reshape(-1)
    info = np.iinfo(arr.dtype) if arr.dtype.kind in "iu" else None
    flat[where % flat.size] = np.clip(value, info.min, info.max) if info else value / 7.0
    tensors[name] = arr
    bad = tmp_path / "q.safetensors"
    write_safetensors(bad, tensors, meta)
    try:
        q = load_quantized(bad)
    except CheckpointError as e:
        assert str(e).startswith(str(bad)) and "\n" not in str(e)
        return
    assert int_model.forward_int(q, np.ones((1, 3, 16, 16), np.int8)).dtype == np.int16


@pytest.fixture(scope="module")
def golden(model, tmp_path_factory, capsys_module=None):
    qm, path, folder = model
    out = folder / "golden"
    assert main(["golden", "--model", str(path), "--seed", "1", "--out", str(out), "--quiet"]) == 0
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_golden_manifest(golden, tmp_path, capsys, data):
    gold = tmp_path / "g"
    if gold.exists():
        shutil.rmtree(gold)
    shutil.copytree(golden, gold)
    m = json.loads((gold / "manifest.json").read_text())
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 3))):
            _set(m, data.draw(st.sampled_from([p for p, _ in _paths(m) if p])), data.draw(VALUES))
        text = json.dumps(m)
    else:                                                  # bytes: cut or garble the JSON itself
        text = json.dumps(m)
        at = data.draw(st.integers(0, len(text) - 1))
        text = text[:at] + data.draw(st.text(max_size=3)) + text[at + data.draw(st.integers(0, 3)):]
    (gold / "manifest.json").write_text(text)
    capsys.readouterr()
    code = main(["check", str(gold), str(golden / "tensors")])
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    if code == 2:
        assert err.startswith("refvit: error: ") and len(err.strip().splitlines()) == 1, err
