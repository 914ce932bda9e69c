"""Quantized model files (refvit.qfile): a QuantizedModel saved and loaded back bit for bit with all its
metadata, version-1 files (no graph) still load, and a damaged file is refused with a message that names the
file and the problem -- by load_quantized (CheckpointError) and on the command line (one line, exit 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from refvit import int_model as im
from refvit.checkpoints import CheckpointError, read_safetensors, write_safetensors
from refvit.cli import EXAMPLES, main
from refvit.qfile import FORMAT_VERSION, is_quantized_file, load_quantized, save_quantized


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The tiny model's file, and its tensors and metadata as the safetensors reader sees them."""
    path = save_quantized(tiny.qm, tmp_path_factory.mktemp("qfile") / "q.safetensors")
    tensors, meta = read_safetensors(path)
    return path, tensors, json.loads(meta["refvit"])


def rewrite(path, tensors, meta: dict | str):
    write_safetensors(path, tensors, {"refvit": meta if isinstance(meta, str) else json.dumps(meta)})
    return path


# ---------------------------------------------------------------- the round trip

def test_round_trip_is_bit_identical(tiny, saved):
    qm, (path, _, _) = tiny.qm, saved
    back = load_quantized(path)
    assert back.config == qm.config and back.rounding == qm.rounding and back.head_mode == qm.head_mode
    assert set(back.tensors) == set(qm.tensors)
    for k, v in qm.tensors.items():
        b, v = np.asarray(back.tensors[k]), np.asarray(v)
        assert b.dtype == v.dtype and b.shape == v.shape and b.tobytes() == v.tobytes(), k
    x = tiny.x
    assert np.array_equal(im.logits_int8_model(back, x)[0], im.logits_int8_model(qm, x)[0])


def test_round_trip_keeps_the_metadata_and_the_records(tiny, saved):
    qm, (path, tensors, m) = tiny.qm, saved
    back = load_quantized(path)
    assert back.metadata() == qm.metadata()
    assert back.calibration == {"method": "percentile", "source": "", "images": 6, "percentile": 99.99}
    assert back.scheme == qm.scheme and back.graph == qm.graph
    assert m["format"] == "refvit-int8" and m["format_version"] == FORMAT_VERSION == 2
    assert m["graph"] == [json.loads(json.dumps(op.to_dict())) for op in qm.graph]
    by = {op["name"]: op for op in m["graph"]}                              # keys in argument order, not sorted
    assert list(by["blocks.0.attn.scores"]["inputs"]) == ["q", "k"]
    assert list(by["blocks.0.attn.softmax"]["constants"]) == ["multiplier", "shift", "exp_table"]
    softmax = next(op for op in back.graph if op.name == "blocks.0.attn.softmax")
    assert list(softmax.constants) == ["multiplier", "shift", "exp_table"]
    # the writer stores 0-d arrays as (1,); the file names them and loading restores the 0-d shape
    zero_d = sorted(k for k, v in qm.tensors.items() if np.ndim(v) == 0)
    assert "input.scale" in zero_d and m["scalars"] == zero_d
    assert all(tensors[k].shape == (1,) and back.tensors[k].shape == () for k in zero_d)


def test_is_quantized_file_reads_the_header_only(saved, tmp_path):
    path = saved[0]
    write_safetensors(tmp_path / "float.safetensors", {"w": np.zeros(2, np.float32)})
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    assert is_quantized_file(path)
    assert not is_quantized_file(tmp_path / "float.safetensors")
    assert not is_quantized_file(tmp_path / "junk.safetensors") and not is_quantized_file(tmp_path / "missing")


def test_version_1_file_loads_and_other_versions_are_refused(tiny, saved, tmp_path):
    """Version 1 (refvit 0.1) stored no graph and no scheme: the default scheme's graph is rebuilt."""
    qm, (_, tensors, m) = tiny.qm, saved
    v1 = {k: v for k, v in m.items() if k not in ("graph", "scheme_choices")} | {"format_version": 1}
    old = load_quantized(rewrite(tmp_path / "v1.safetensors", tensors, v1))
    assert old.graph == qm.graph
    assert np.array_equal(im.logits_int8_model(old, tiny.x)[0], im.logits_int8_model(qm, tiny.x)[0])
    with pytest.raises(CheckpointError, match="format_version 3"):
        load_quantized(rewrite(tmp_path / "v3.safetensors", tensors, m | {"format_version": 3}))


# ---------------------------------------------------------------- damaged files

def test_a_float_checkpoint_is_not_a_quantized_model(tmp_path):
    write_safetensors(tmp_path / "float.safetensors", {"a": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="not a refvit quantized model"):
        load_quantized(tmp_path / "float.safetensors")


def test_a_truncated_file_is_named(saved, tmp_path):
    data = saved[0].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_quantized(tmp_path / "cut.safetensors")


def test_missing_constants_are_named(saved, tmp_path):
    _, tensors, m = saved
    t = dict(tensors)
    del t["blocks.1.mlp.gelu.table"]
    with pytest.raises(CheckpointError, match=r"lacks 1 constants: blocks\.1\.mlp\.gelu\.table$"):
        load_quantized(rewrite(tmp_path / "one.safetensors", t, m))
    gone = {c for op in m["graph"] if op["name"].startswith("blocks.1.") for c in op["constants"].values()}
    many = {k: v for k, v in tensors.items() if k not in gone}
    m = m | {"scalars": [k for k in m["scalars"] if k not in gone]}
    first8 = ", ".join(sorted(gone)[:8]).replace(".", r"\.")
    assert len(gone) > 8
    with pytest.raises(CheckpointError, match=rf"lacks {len(gone)} constants: {first8} \.\.\.$"):
        load_quantized(rewrite(tmp_path / "many.safetensors", many, m))


def _set_op(m, name, **changes):
    m["graph"] = [dict(op, **changes) if op["name"] == name else op for op in m["graph"]]


@pytest.mark.parametrize("damage, message", [
    # the constants, checked against their ops by a dry run of the graph
    (lambda t, m: t.update({"blocks.0.mlp.fc1.multiplier": -t["blocks.0.mlp.fc1.multiplier"]}), "multiplier"),
    (lambda t, m: t.update({"blocks.1.attn.softmax.shift": np.array(70, np.int8)}), "shift"),
    (lambda t, m: t.update({"blocks.0.attn.proj.weight": t["blocks.0.attn.proj.weight"].astype(np.int16)}), "int8"),
    (lambda t, m: t.update({"blocks.0.norm2.bias": t["blocks.0.norm2.bias"][:-1]}), "bias"),
    (lambda t, m: t.update({"input.scale": np.array(float("nan"))}), "input.scale"),
    (lambda t, m: t.update({"logits.scale": np.array(-1.0)}), "logits.scale must be one finite positive float"),
    # the metadata
    (lambda t, m: m.update({"head_mode": "avg"}), "head_mode 'avg' does not fit a distilled DeiT"),
    (lambda t, m: m["config"].update({"num_classes": 6}), "the head does not give the config's 6 classes"),
    (lambda t, m: m["config"].update({"depth": 3}), "the graph has 2 blocks, the config says depth 3"),
    (lambda t, m: m["config"].update({"width": 3}), r"unknown config keys: \['width'\]"),
    (lambda t, m: m.update({"format": "onnx"}), "format is 'onnx', expected 'refvit-int8'"),
    (lambda t, m: m.update({"rounding": "HALF_EVEN"}), "rounding 'HALF_EVEN' is not the graph's 'SINGLE_ROUND'"),
    (lambda t, m: m.pop("head_mode"), "bad refvit metadata: 'head_mode'"),
    (lambda t, m: m.update({"graph": []}), "non-empty list"),
    (lambda t, m: _set_op(m, "blocks.0.mlp.gelu", variant="cubic"), "unknown op"),
    (lambda t, m: m.update({"scheme_choices": {"gelu": "cubic"}}), "cubic"),
])
def test_damaged_file_is_refused_with_its_message(saved, tmp_path, capsys, damage, message):
    _, tensors, m = saved
    t, m = dict(tensors), json.loads(json.dumps(m))
    damage(t, m)
    bad = rewrite(tmp_path / "bad.safetensors", t, m)
    with pytest.raises(CheckpointError, match=message) as e:
        load_quantized(bad)
    assert str(e.value).startswith(str(bad)) and "\n" not in str(e.value)
    assert main(["classify", "--model", str(bad), str(sorted(EXAMPLES.glob("*.png"))[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refvit: error: ") and len(err.strip().splitlines()) == 1 and "bad.safetensors" in err


def test_metadata_that_is_not_json_is_refused(saved, tmp_path):
    with pytest.raises(CheckpointError, match="bad refvit metadata"):
        load_quantized(rewrite(tmp_path / "bad.safetensors", saved[1], "{not json"))
