"""weights_tools: .safetensors reading, timm <-> Hugging Face DeiT names, load_checkpoint and its errors."""
import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file  # the reference reader our own parser is checked against

from weights_tools.config import DeiTConfig, preset
from weights_tools import (
    CheckpointError, expected_shapes, hf_to_timm, load_checkpoint, read_safetensors, to_hf_names,
    write_safetensors,
)
from refvit.models import random_params

SHARED = Path(__file__).resolve().parents[2] / "shared"
needs_shared = pytest.mark.skipif(not (SHARED / "peer").is_dir(),
                                  reason=f"shared data folder {SHARED} is absent (CI always has it)")

PEER = SHARED / "peer"
TIMM_TINY = PEER / "timm_deit_tiny_patch16_224_seed0.safetensors"
TIMM_TINY_DIST = PEER / "timm_deit_tiny_distilled_patch16_224_seed0.safetensors"
HF_TEACHER = PEER / "hf_DeiTForImageClassificationWithTeacher_d192_l12_seed0"
HF_SINGLE = PEER / "hf_DeiTForImageClassification_d192_l12_seed1"
FMNIST = SHARED / "models" / "fmnist_deit_d192_l6_h3_p4_distilled.safetensors"


# ---------------------------------------------------------------- helpers

def write_raw(path, header, data=b"", header_len=None):
    """A .safetensors file written byte by byte (header: dict -> JSON, or raw bytes)."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(n.to_bytes(8, "little") + blob + data)
    return path


SMALL = DeiTConfig(img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2, num_classes=3, distilled=True,
                   ln_eps=1e-5)


def small_params(config=SMALL, head_mode="mean", seed=0):
    return random_params(config, head_mode, seed)


def hf_config_json(config):
    """config.json as transformers writes it for DeiT (built here from the config fields)."""
    return {"model_type": "deit", "image_size": config.img_size, "patch_size": config.patch_size,
            "num_channels": config.in_chans, "hidden_size": config.embed_dim, "num_hidden_layers": config.depth,
            "num_attention_heads": config.num_heads, "intermediate_size": config.hidden_dim,
            "qkv_bias": config.qkv_bias, "layer_norm_eps": config.ln_eps,
            "id2label": {str(i): f"LABEL_{i}" for i in range(config.num_classes)}}


def write_hf_dir(directory, tensors, config_json):
    directory.mkdir()
    write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    if config_json is not None:
        (directory / "config.json").write_text(json.dumps(config_json))
    return directory


def assert_same_arrays(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def raises_naming(path, pattern, fn=load_checkpoint):
    with pytest.raises(CheckpointError, match=pattern) as info:
        fn(path)
    assert str(path) in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- the shared checkpoints

def fmnist_config():
    meta = json.loads(FMNIST.with_suffix(".json").read_text())
    return DeiTConfig(img_size=meta["img_size"], patch_size=meta["patch_size"], in_chans=meta["in_chans"],
                      embed_dim=meta["embed_dim"], depth=meta["depth"], num_heads=meta["num_heads"],
                      mlp_ratio=meta["mlp_ratio"], qkv_bias=meta["qkv_bias"], ln_eps=meta["layernorm_eps"],
                      num_classes=meta["num_classes"], distilled=meta["distilled"])


SHARED_CASES = {  # path, expected config, source, head_mode, tokens
    "timm_tiny": (TIMM_TINY, lambda: preset("deit_tiny_patch16_224"), "timm", "cls", 14 * 14 + 1),
    "timm_tiny_distilled": (TIMM_TINY_DIST, lambda: preset("deit_tiny_distilled_patch16_224"), "timm", "mean",
                            14 * 14 + 2),
    "hf_teacher": (HF_TEACHER, lambda: preset("deit_tiny_distilled_patch16_224").replace(ln_eps=1e-12), "hf",
                   "mean", 14 * 14 + 2),
    "hf_single": (HF_SINGLE, lambda: preset("deit_tiny_distilled_patch16_224").replace(ln_eps=1e-12), "hf",
                  "cls", 14 * 14 + 2),
    "fmnist": (FMNIST, fmnist_config, "timm", "mean", 8 * 8 + 2),
}


@needs_shared
@pytest.mark.parametrize("case", SHARED_CASES)
def test_shared_checkpoint_config_and_head_mode(case):
    path, config, source, head_mode, tokens = SHARED_CASES[case]
    ckpt = load_checkpoint(path)
    assert ckpt.config == config()
    assert ckpt.config.num_tokens == tokens
    assert (ckpt.source, ckpt.head_mode) == (source, head_mode)
    assert ckpt.path.is_file() and ckpt.path.suffix == ".safetensors"
    assert all(a.dtype == np.float32 for a in ckpt.params.values())
    assert ("head_dist.weight" in ckpt.params) == (head_mode == "mean")


@needs_shared
@pytest.mark.parametrize("path", [TIMM_TINY, TIMM_TINY_DIST, FMNIST], ids=lambda p: p.stem)
def test_timm_file_params_are_the_file_tensors(path):
    reference = load_file(str(path))
    assert_same_arrays(load_checkpoint(path).params, reference)
    assert_same_arrays(read_safetensors(path)[0], reference)


@needs_shared
@pytest.mark.parametrize("path, name, head_mode", [(TIMM_TINY, "deit_tiny_patch16_224", "cls"),
                                                   (TIMM_TINY_DIST, "deit_tiny_distilled_patch16_224", "mean")])
def test_expected_shapes_match_timm_files(path, name, head_mode):
    shapes = {n: a.shape for n, a in load_file(str(path)).items()}
    assert expected_shapes(preset(name), head_mode) == shapes


@needs_shared
def test_reading_a_peer_file_is_quick():
    start = time.perf_counter()
    load_checkpoint(TIMM_TINY_DIST)
    assert time.perf_counter() - start < 1.0


def hf_renames(i):
    """timm name -> HF name for the one-to-one tensors of block i (written out from the HF/timm sources)."""
    hf, timm = f"deit.encoder.layer.{i}.", f"blocks.{i}."
    pairs = {"attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
             "layernorm_before": "norm1", "layernorm_after": "norm2"}
    return {timm + t + "." + p: hf + h + "." + p for h, t in pairs.items() for p in ("weight", "bias")}


@needs_shared
@pytest.mark.parametrize("directory, heads", [
    (HF_TEACHER, {"head": "cls_classifier", "head_dist": "distillation_classifier"}),
    (HF_SINGLE, {"head": "classifier"}),
], ids=["teacher", "single"])
def test_hf_params_are_the_source_tensors(directory, heads):
    raw = load_file(str(directory / "model.safetensors"))
    params = load_checkpoint(directory).params
    c = 192
    renames = {"cls_token": "deit.embeddings.cls_token", "dist_token": "deit.embeddings.distillation_token",
               "pos_embed": "deit.embeddings.position_embeddings", "norm.weight": "deit.layernorm.weight",
               "norm.bias": "deit.layernorm.bias"}
    renames |= {f"patch_embed.proj.{p}": f"deit.embeddings.patch_embeddings.projection.{p}" for p in ("weight", "bias")}
    renames |= {f"{t}.{p}": f"{h}.{p}" for t, h in heads.items() for p in ("weight", "bias")}
    for i in range(12):
        renames |= hf_renames(i)
        for p in ("weight", "bias"):
            qkv = params[f"blocks.{i}.attn.qkv.{p}"]
            assert qkv.shape[0] == 3 * c
            for k, part in enumerate(("query", "key", "value")):
                source = raw[f"deit.encoder.layer.{i}.attention.attention.{part}.{p}"]
                assert np.array_equal(qkv[k * c:(k + 1) * c], source)
    for timm, hf in renames.items():
        assert np.array_equal(params[timm], raw[hf]), timm
    assert len(params) == len(renames) + 2 * 12  # nothing else: q, k, v went into the qkv pairs


@needs_shared
@pytest.mark.parametrize("path", [TIMM_TINY, TIMM_TINY_DIST], ids=lambda p: p.stem)
def test_timm_to_hf_to_timm_is_identity(path):
    params = load_file(str(path))
    assert_same_arrays(hf_to_timm(to_hf_names(params)), params)


@needs_shared
@pytest.mark.parametrize("directory", [HF_TEACHER, HF_SINGLE], ids=["teacher", "single"])
def test_hf_to_timm_to_hf_is_identity(directory):
    raw = load_file(str(directory / "model.safetensors"))
    assert_same_arrays(to_hf_names(hf_to_timm(raw)), raw)


@needs_shared
def test_hf_deit_model_without_prefix_or_config(tmp_path):
    """A DeiTModel file: no 'deit.' prefix, no classifier, a pooler; no config.json -> HF defaults."""
    raw = load_file(str(HF_TEACHER / "model.safetensors"))
    backbone = {n.removeprefix("deit."): a for n, a in raw.items() if n.startswith("deit.")}
    backbone |= {"pooler.dense.weight": np.zeros((192, 192), np.float32),
                 "pooler.dense.bias": np.zeros(192, np.float32)}
    ckpt = load_checkpoint(write_hf_dir(tmp_path / "deit_model", backbone, None))
    assert ckpt.config == preset("deit_tiny_distilled_patch16_224").replace(ln_eps=1e-12, num_classes=0)
    assert (ckpt.source, ckpt.head_mode) == ("hf", "cls")
    full = load_checkpoint(HF_TEACHER).params
    assert_same_arrays(ckpt.params, {n: a for n, a in full.items() if not n.startswith("head")})


# ---------------------------------------------------------------- synthetic checkpoints

@pytest.mark.parametrize("qkv_bias", [True, False])
def test_synthetic_timm_and_hf_load_with_their_config(tmp_path, qkv_bias):
    config = SMALL.replace(qkv_bias=qkv_bias)
    params = small_params(config)
    write_safetensors(tmp_path / "timm.safetensors", params)
    ckpt = load_checkpoint(tmp_path / "timm.safetensors", num_heads=2, ln_eps=1e-5)
    assert ckpt.config == config and ckpt.head_mode == "mean"
    assert_same_arrays(ckpt.params, params)
    hf = load_checkpoint(write_hf_dir(tmp_path / "hf", to_hf_names(params), hf_config_json(config)))
    assert hf.config == config and (hf.source, hf.head_mode) == ("hf", "mean")
    assert_same_arrays(hf.params, params)


def test_timm_defaults_without_overrides(tmp_path):
    """timm eps; the heads of the DeiT preset of the width, said so; another width with nothing stating the
    heads is an error saying how to give them (tests/test_checkpoint_heads.py has the rest)."""
    config = SMALL.replace(embed_dim=384, num_heads=6, ln_eps=1e-6)
    write_safetensors(tmp_path / "m.safetensors", small_params(config))
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.config == config
    assert ckpt.heads_note.startswith("assumed preset deit_small (width 384 -> 6 heads)")
    write_safetensors(tmp_path / "m.safetensors", small_params(config.replace(embed_dim=128, num_heads=2)))
    with pytest.raises(CheckpointError, match="width 128 is not a DeiT preset width .*--num-heads N .*--arch NAME"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_float64_checkpoint_becomes_float32(tmp_path):
    params = {n: a.astype(np.float64) / 3 for n, a in small_params().items()}
    write_safetensors(tmp_path / "m.safetensors", params)
    got = load_checkpoint(tmp_path / "m.safetensors", num_heads=2, ln_eps=1e-5).params
    assert_same_arrays(got, {n: a.astype(np.float32) for n, a in params.items()})


def assert_same_floats(got, expected):
    """Equal values, NaN where expected is NaN, and the same sign (so -0.0 stays -0.0)."""
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan], expected[~nan])
    assert np.array_equal(np.signbit(got[~nan]), np.signbit(expected[~nan]))


def bf16_value(b: int) -> float:
    """bfloat16 by the IEEE formula: 1 sign, 8 exponent (bias 127), 7 mantissa bits."""
    sign, exponent, mantissa = b >> 15, (b >> 7) & 0xFF, b & 0x7F
    if exponent == 0xFF:
        magnitude = math.inf if mantissa == 0 else math.nan
    elif exponent == 0:
        magnitude = math.ldexp(mantissa, -126 - 7)
    else:
        magnitude = math.ldexp(128 + mantissa, exponent - 127 - 7)
    return -magnitude if sign else magnitude


ALL_16_BIT = np.arange(1 << 16, dtype="<u2")


def test_f16_decodes_every_bit_pattern(tmp_path):
    path = write_raw(tmp_path / "f16.safetensors",
                     {"x": {"dtype": "F16", "shape": [256, 256], "data_offsets": [0, 2 << 16]}}, ALL_16_BIT.tobytes())
    got = read_safetensors(path)[0]["x"]
    assert got.dtype == np.float32 and got.shape == (256, 256)
    expected = [struct.unpack("<e", struct.pack("<H", b))[0] for b in range(1 << 16)]  # Python's own half decoder
    assert_same_floats(got.ravel(), np.array(expected, np.float32))


def test_bf16_decodes_every_bit_pattern_exactly(tmp_path):
    path = write_raw(tmp_path / "bf16.safetensors",
                     {"x": {"dtype": "BF16", "shape": [1 << 16], "data_offsets": [0, 2 << 16]}}, ALL_16_BIT.tobytes())
    got = read_safetensors(path)[0]["x"]
    assert got.dtype == np.float32
    assert_same_floats(got, np.array([bf16_value(b) for b in range(1 << 16)], np.float64).astype(np.float32))
    finite = np.isfinite(got)  # exact: every finite bf16 is a float32 whose low 16 bits are zero
    assert not np.any(got[finite].view(np.uint32) & 0xFFFF)


def test_bf16_of_float32_values_is_their_top_half(tmp_path):
    values = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 1e3
    values[:4] = [np.inf, -0.0, 1e-40, -3.4e38]
    top = (values.view(np.uint32) >> 16).astype("<u2")  # bfloat16 = the top 16 bits of a float32
    path = write_raw(tmp_path / "bf16.safetensors",
                     {"w": {"dtype": "BF16", "shape": [10, 100], "data_offsets": [0, 2000]}}, top.tobytes())
    got = read_safetensors(path)[0]["w"]
    assert got.shape == (10, 100)
    assert np.array_equal(got.ravel().view(np.uint32), values.view(np.uint32) & 0xFFFF0000)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
                                   "int64"])
def test_write_read_round_trip_per_dtype(tmp_path, dtype):
    rng = np.random.default_rng(2)
    info = np.finfo(dtype) if np.issubdtype(dtype, np.floating) else np.iinfo(dtype)
    if np.issubdtype(dtype, np.floating):
        array = (rng.standard_normal((3, 5)) * 100).astype(dtype)
    else:
        array = rng.integers(info.min, info.max, (3, 5), dtype=dtype, endpoint=True)
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": array, "empty": np.zeros((0, 4), dtype)}, {"note": "x"})
    tensors, metadata = read_safetensors(path)
    assert metadata == {"note": "x"}
    float32_out = dtype in ("float16", "float32")
    reference = load_file(str(path))
    assert_same_arrays(tensors, {n: a.astype(np.float32) if float32_out else a for n, a in reference.items()})
    assert np.array_equal(tensors["a"], array)


def test_metadata_alone_reads_the_header_only(tmp_path):
    from weights_tools import read_safetensors_metadata
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": np.zeros((3, 4), np.float32)}, {"refvit": "{}"})
    assert read_safetensors_metadata(path) == {"refvit": "{}"}
    path.write_bytes(path.read_bytes() + b"\0")  # a damaged file is as damaged for the metadata reader
    with pytest.raises(CheckpointError, match="1 trailing bytes"):
        read_safetensors_metadata(path)


def test_write_rejects_non_string_metadata_and_round_trips_bool_tensors(tmp_path):
    with pytest.raises(CheckpointError, match="metadata must map strings to strings, got 'step': 3"):
        write_safetensors(tmp_path / "m.safetensors", {"a": np.zeros(2, np.float32)}, {"step": 3})
    mask = np.array([True, False, True])                  # mixed-pot's pot_rows are stored as safetensors BOOL
    write_safetensors(tmp_path / "m.safetensors", {"mask": mask})
    back, _ = read_safetensors(tmp_path / "m.safetensors")
    assert back["mask"].dtype == bool and back["mask"].tolist() == [True, False, True]


# ---------------------------------------------------------------- malformed files

F32_2x3 = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}

BAD_FILES = {  # name -> (writer(path), message pattern)
    "random_bytes": (lambda p: p.write_bytes(np.random.default_rng(3).bytes(1000)),
                     r"not a valid safetensors file: header length \d+ is beyond the file size \(1000 bytes\)"),
    "text_file": (lambda p: p.write_text("model weights:\n  layer 1 ...\n"),
                  r"not a valid safetensors file: header length \d+ is beyond the file size"),
    "empty": (lambda p: p.write_bytes(b""), "not a valid safetensors file: the file is empty"),
    "too_short": (lambda p: p.write_bytes(b"\x10\x00\x00"), "3 bytes is too short"),
    "header_too_long": (lambda p: write_raw(p, {"x": F32_2x3}, bytes(24), header_len=5000),
                        r"header length 5000 is beyond the file size"),
    "bad_json": (lambda p: write_raw(p, b'{"x": {"dtype": "F32",'), "header is not JSON"),
    "not_utf8": (lambda p: write_raw(p, b"\xff\xfe{}"), "header is not JSON"),
    "json_list": (lambda p: write_raw(p, b"[1, 2]"), "header is a JSON list, not an object"),
    "duplicate_key": (lambda p: write_raw(p, b'{"x": {}, "x": {}}'), "duplicate key 'x'"),
    "entry_not_object": (lambda p: write_raw(p, {"x": [0, 24]}), "tensor 'x': entry must be an object"),
    "truncated_data": (lambda p: write_raw(p, {"x": F32_2x3}, bytes(20)),
                       r"tensor 'x': data_offsets \[0, 24\] out of range for a data region of 20 bytes"),
    "offsets_reversed": (lambda p: write_raw(p, {"x": {**F32_2x3, "data_offsets": [24, 0]}}, bytes(24)),
                         r"data_offsets \[24, 0\] out of range"),
    "offsets_not_pair": (lambda p: write_raw(p, {"x": {**F32_2x3, "data_offsets": [0]}}, bytes(24)),
                         r"data_offsets \[0\] is not a pair of integers"),
    "overlap": (lambda p: write_raw(p, {"x": F32_2x3, "y": {**F32_2x3, "data_offsets": [12, 36]}}, bytes(36)),
                "data of tensors 'x' and 'y' overlap"),
    "unsupported_dtype": (lambda p: write_raw(p, {"x": {**F32_2x3, "dtype": "F8_E4M3", "data_offsets": [0, 6]}},
                                              bytes(6)), "tensor 'x' has dtype 'F8_E4M3', which is not supported"),
    "shape_size_mismatch": (lambda p: write_raw(p, {"x": {**F32_2x3, "data_offsets": [0, 20]}}, bytes(24)),
                            r"tensor 'x': shape \[2, 3\] of F32 needs 24 bytes but data_offsets \[0, 20\] hold 20"),
    "negative_shape": (lambda p: write_raw(p, {"x": {**F32_2x3, "shape": [-2, -3]}}, bytes(24)),
                       "shape .* is not a list of non-negative integers"),
    "metadata_not_strings": (lambda p: write_raw(p, {"__metadata__": {"a": 1}, "x": F32_2x3}, bytes(24)),
                             "__metadata__ must map strings to strings"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_malformed_file_is_named(tmp_path, case):
    write, pattern = BAD_FILES[case]
    path = tmp_path / f"{case}.safetensors"
    write(path)
    raises_naming(path, pattern, read_safetensors)
    raises_naming(path, pattern, load_checkpoint)


def test_missing_paths_are_named(tmp_path):
    raises_naming(tmp_path / "nope.safetensors", "no such file")
    raises_naming(tmp_path, "not a file", read_safetensors)
    raises_naming(tmp_path, "directory holds no model.safetensors")


# ---------------------------------------------------------------- checkpoints that are not this DeiT

def load_error(tmp_path, params, **kwargs):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, params)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_unexpected_and_wrong_shape_all_named_at_once(tmp_path):
    params = small_params()
    del params["blocks.1.norm1.weight"], params["blocks.0.mlp.fc2.bias"]
    params["foo"] = np.zeros(3, np.float32)
    params["head.bias"] = np.zeros(10, np.float32)  # (timm files: num_classes is read from head.weight)
    message = load_error(tmp_path, params)
    assert message.endswith("missing: blocks.0.mlp.fc2.bias, blocks.1.norm1.weight; unexpected: foo; "
                            "wrong shape: head.bias (10,), expected (3,)")


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p.pop("blocks.1.attn.proj.bias"), "missing: blocks.1.attn.proj.bias"),
    (lambda p: p.update({"blocks.7.norm1.weight": np.ones(8, np.float32)}), "unexpected: blocks.7.norm1.weight"),
    (lambda p: p.update({"blocks.1.mlp.fc2.weight": np.ones((8, 31), np.float32)}),
     "wrong shape: blocks.1.mlp.fc2.weight (8, 31), expected (8, 32)"),
    (lambda p: p.update({"cls_token": np.ones((1, 1, 8), np.int32)}), "not floating point: cls_token (int32)"),
    (lambda p: p.pop("dist_token"), "missing: dist_token"),
    (lambda p: p.pop("head.weight"), "missing: head.weight"),
    (lambda p: p.pop("blocks.1.attn.qkv.weight"), "missing: blocks.1.attn.qkv.weight"),
], ids=["missing", "unexpected", "wrong_shape", "integer", "head_dist_without_dist_token",
        "head_dist_without_head", "block_without_qkv"])
def test_each_mismatch_is_named(tmp_path, edit, expected):
    params = small_params()
    edit(params)
    message = load_error(tmp_path, params)
    assert expected in message
    assert message.count(":") == 3  # path: summary (...): one kind: names


def test_names_that_are_not_deit(tmp_path):
    assert "no DeiT parameter names" in load_error(tmp_path, {"encoder.weight": np.zeros(2, np.float32)})
    mixed = {"cls_token": np.zeros((1, 1, 8), np.float32), "deit.layernorm.weight": np.zeros(8, np.float32)}
    assert "mixes Hugging Face names (e.g. 'deit.layernorm.weight') and timm names (e.g. 'cls_token')" in \
        load_error(tmp_path, mixed)


def test_hf_missing_query_names_both_forms(tmp_path):
    hf = to_hf_names(small_params())
    del hf["deit.encoder.layer.1.attention.attention.query.weight"]
    message = load_error(tmp_path, hf)
    layer = "deit.encoder.layer.1.attention.attention"
    assert (f"missing: blocks.1.attn.qkv.weight (HF {layer}.query.weight + {layer}.key.weight + "
            f"{layer}.value.weight)") in message
    assert f"unexpected: {layer}.key.weight, {layer}.value.weight" in message


def test_hf_two_classifiers_for_one_head(tmp_path):
    hf = to_hf_names(small_params(SMALL, "cls"))
    hf["cls_classifier.weight"] = hf["classifier.weight"]
    assert "both 'classifier.weight' and 'cls_classifier.weight' map to 'head.weight'" in load_error(tmp_path, hf)


@pytest.mark.parametrize("change, expected", [
    ({"id2label": {str(i): str(i) for i in range(5)}}, "wrong shape: head.weight (3, 8), expected (5, 8)"),
    ({"num_hidden_layers": 3}, "missing: blocks.2.norm1.weight (HF deit.encoder.layer.2.layernorm_before.weight)"),
    ({"hidden_size": 16, "intermediate_size": 64}, "wrong shape: cls_token (1, 1, 8), expected (1, 1, 16)"),
])
def test_hf_config_json_disagreeing_with_tensors(tmp_path, change, expected):
    directory = write_hf_dir(tmp_path / "hf", to_hf_names(small_params()), hf_config_json(SMALL) | change)
    message = raises_naming(directory, "parameters do not match the DeiT config")
    assert expected in message


def test_hf_config_json_unreadable_or_wrong(tmp_path):
    directory = write_hf_dir(tmp_path / "hf", to_hf_names(small_params()), None)
    (directory / "config.json").write_text("{ not json")
    raises_naming(directory / "config.json", "cannot read as JSON", lambda _: load_checkpoint(directory))
    (directory / "config.json").write_text(json.dumps({"model_type": "swin"}))
    raises_naming(directory / "config.json", "model_type is 'swin', not 'deit' or 'vit'", lambda _: load_checkpoint(directory))
    (directory / "config.json").write_text(json.dumps({"hidden_size": "8"}))
    raises_naming(directory / "config.json", "hidden_size must be an integer, got '8'",
                  lambda _: load_checkpoint(directory))
