"""Fuzzing the readers of untrusted files (hypothesis, bounded examples): random mutations of a valid
.safetensors file, of a config.json, and of torch files. Whatever the mutation, the result is the clean error
(CheckpointError, one line, naming the file) or a correct result:
  - safetensors: what the safetensors library itself reads from the same bytes, bit for bit;
  - config.json: a config the tensors fit (they pin every field but the heads), with the heads it states;
  - torch files: arrays (their bytes may be mutated values; nothing else is checked, there is no oracle).
"""
import copy
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save

import torchfile as tf
from ckptfiles import random_params, timm_config_json, tiny, write_dir
from weights_tools import CheckpointError, expected_shapes, load_checkpoint, read_safetensors, read_torch

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_JSON = settings(FUZZ, max_examples=120)  # structured edits: slower to generate


def clean(error: CheckpointError, path) -> None:
    message = str(error)
    assert message.startswith(f"{path}") and "\n" not in message and len(message) < 2000, message


# ---------------------------------------------------------------- byte-level mutations

@st.composite
def mutated(draw, data: bytes, header_end: int) -> bytes:
    """1 to 4 edits: overwrite a byte (most in the 8-byte length and the header), insert or delete bytes,
    truncate, or append; or (a third of the time) overwrite bytes of the data region only, which keeps the
    file valid with other values (NaN and infinities among them)."""
    data = bytearray(data)
    if header_end < len(data) and draw(st.integers(0, 2)) == 0:
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(header_end, len(data) - 1))] = draw(st.sampled_from([0, 0x7F, 0x80, 0xFF, 0x7C]))
        return bytes(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set", "set", "insert", "delete", "truncate", "append"]))
        hi = max(len(data) - 1, 0)
        pos = draw(st.one_of(st.integers(0, min(header_end, hi)), st.integers(0, hi)))
        if kind == "set" and data:
            data[pos] = draw(st.sampled_from([draw(st.integers(0, 255)), ord('"'), ord("{"), ord("]"), ord("0"),
                                              ord("9"), ord("-"), ord(","), 0]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[pos:]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


# ---------------------------------------------------------------- safetensors

RNG = np.random.default_rng(7)
BASE_TENSORS = {"w": RNG.standard_normal((2, 3)).astype(np.float32), "h": RNG.standard_normal(4).astype(np.float16),
                "d": RNG.standard_normal(2), "i": np.arange(-2, 2, dtype=np.int64), "u": np.arange(5, dtype=np.uint8),
                "e": np.zeros((0, 2), np.float32)}
BASE = save(BASE_TENSORS, metadata={"format": "pt", "note": "fuzz"})
BASE_HEADER_END = 8 + int.from_bytes(BASE[:8], "little")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def library_reading(path):
    """-> ({name: array}, metadata) as the safetensors library reads the file, or None if it refuses.
    numpy has no bfloat16, so the library (which has checked the file on opening) cannot give BF16 tensors:
    those are taken from the file's bytes here, as the top halves of float32s."""
    try:
        with safe_open(str(path), "np") as f:
            raw = path.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + n])
            out = {}
            for k in f.keys():
                if header[k]["dtype"] == "BF16":
                    begin, end = header[k]["data_offsets"]
                    bits = np.frombuffer(raw[8 + n + begin:8 + n + end], "<u2").astype(np.uint32) << 16
                    out[k] = bits.view(np.float32).reshape(header[k]["shape"])
                else:
                    out[k] = f.get_tensor(k)
            return out, f.metadata() or {}
    except Exception:  # the library's own errors (SafetensorError)
        return None


def check_safetensors(path):
    try:
        tensors, metadata = read_safetensors(path)
    except CheckpointError as e:
        clean(e, path)
        return
    ref = library_reading(path)
    assert ref is not None, "refvit read a file the safetensors library refuses"
    ref_tensors, ref_metadata = ref
    assert tensors.keys() == ref_tensors.keys() and metadata == ref_metadata
    for name, a in ref_tensors.items():
        if a.dtype == np.float16:
            a = a.astype(np.float32)
        assert tensors[name].dtype == a.dtype and tensors[name].shape == a.shape
        assert tensors[name].tobytes() == a.tobytes(), name


def test_base_file_reads_like_the_library(workdir):
    path = workdir / "base.safetensors"
    path.write_bytes(BASE)
    check_safetensors(path)
    assert read_safetensors(path)[0].keys() == BASE_TENSORS.keys()


@FUZZ
@given(data=mutated(BASE, BASE_HEADER_END))
def test_fuzz_safetensors_bytes(workdir, data):
    path = workdir / "bytes.safetensors"
    path.write_bytes(data)
    check_safetensors(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
    | st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "__metadata__"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8)


def json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_paths(v, prefix + (i,))


def set_path(obj, path, value, delete=False):
    if not path:
        return value
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


SAME_SIZE = [["F16", "I16", "U16", "BF16"], ["F32", "I32"], ["F64", "I64"], ["U8", "I8", "BOOL"]]


def semantic_edit(data, header):
    """An edit that keeps the byte accounting right (so the file often stays valid): swap a dtype for one
    of the same size, reshape (same element count), rename a tensor, move data_offsets, edit metadata."""
    names = [n for n, e in header.items() if n != "__metadata__" and isinstance(e, dict)] \
        if isinstance(header, dict) else []
    if not names:
        return header
    name = data.draw(st.sampled_from(names))
    entry = header[name]
    if not {"dtype", "shape", "data_offsets"} <= entry.keys():
        return header
    kind = data.draw(st.sampled_from(["dtype", "shape", "rename", "offsets", "metadata"]))
    if kind == "dtype":
        group = next((g for g in SAME_SIZE if entry["dtype"] in g), ["F32"])
        entry["dtype"] = data.draw(st.sampled_from(group))
    elif kind == "shape" and isinstance(entry["shape"], list) and all(type(d) is int for d in entry["shape"]):
        n = math.prod(entry["shape"])
        entry["shape"] = data.draw(st.sampled_from([[n], [1, n], [n, 1], [], [n, 0], list(reversed(entry["shape"]))]))
    elif kind == "rename":
        header[data.draw(st.text(max_size=5))] = header.pop(name)
    elif kind == "offsets" and isinstance(entry["data_offsets"], list):
        entry["data_offsets"] = [o + data.draw(st.integers(-4, 4)) if type(o) is int else o
                                 for o in entry["data_offsets"]]
    elif kind == "metadata":
        header["__metadata__"] = copy.deepcopy(data.draw(st.dictionaries(st.text(max_size=4),
                                                                         st.text(max_size=4) | json_values, max_size=3)))
    return header


@FUZZ_JSON
@given(st.data())
def test_fuzz_safetensors_header(workdir, data):
    """Structured edits of the header JSON: any node replaced by random JSON or deleted, or edits that keep
    the byte accounting; the data region sometimes resized, the length field updated (or not)."""
    header = json.loads(BASE[8:BASE_HEADER_END])
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            header = semantic_edit(data, header)
            continue
        where = data.draw(st.sampled_from(list(json_paths(header))))
        delete = bool(where) and data.draw(st.booleans())
        header = set_path(header, where, copy.deepcopy(data.draw(json_values)), delete)
    blob = json.dumps(header).encode()
    region = BASE[BASE_HEADER_END:]
    if data.draw(st.integers(0, 3)) == 0:
        region = region[:data.draw(st.integers(0, len(region)))] + bytes(data.draw(st.integers(0, 8)))
    length = len(blob) if data.draw(st.integers(0, 5)) else data.draw(st.integers(0, 2**64 - 1))
    path = workdir / "header.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + blob + region)
    check_safetensors(path)


# ---------------------------------------------------------------- a whole DeiT checkpoint

CONFIG = tiny(embed_dim=128, num_heads=4)
PARAMS = random_params(CONFIG)
DEIT = save(PARAMS)
DEIT_HEADER_END = 8 + int.from_bytes(DEIT[:8], "little")


def check_checkpoint(path, config=None, **kwargs):
    """load_checkpoint: the clean error, or params that fit their config, finite float32."""
    try:
        ckpt = load_checkpoint(path, **kwargs)
    except CheckpointError as e:
        clean(e, path)
        return None
    shapes = expected_shapes(ckpt.config, ckpt.head_mode)
    assert {n: a.shape for n, a in ckpt.params.items()} == shapes
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in ckpt.params.values())
    assert ckpt.config.embed_dim % ckpt.config.num_heads == 0 and ckpt.heads_note
    if config is not None:  # the tensors pin every field but the heads (and eps)
        assert ckpt.config.replace(num_heads=config.num_heads, ln_eps=config.ln_eps) == config
    return ckpt


@FUZZ
@given(data=mutated(DEIT, DEIT_HEADER_END))
def test_fuzz_deit_safetensors(workdir, data):
    path = workdir / "deit.safetensors"
    path.write_bytes(data)
    check_checkpoint(path, num_heads=4)


# ---------------------------------------------------------------- config.json

TIMM_JSON = timm_config_json(CONFIG)
HF_CONFIG = CONFIG.replace(distilled=True, ln_eps=1e-12)
HF_JSON = {"model_type": "deit", "image_size": 8, "patch_size": 4, "num_channels": 3, "hidden_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256, "qkv_bias": True,
           "layer_norm_eps": 1e-12, "id2label": {"0": "a", "1": "b", "2": "c"}}
config_values = json_values | st.integers(-1, 300) | st.sampled_from(
    [0, 1, 2, 4, 8, 10**6, 10**9, 2**63, -1, 0.5, 2.0, float("nan"), float("inf"), [8, 8], [3, 8, 8], "token",
     "bicubic", "deit_small_patch16_224", "deit3_base_patch16_224", "deit_tiny_patch16_224.fb_in1k"])


@pytest.fixture(scope="module")
def deit_dirs(workdir):
    from weights_tools import to_hf_names
    return {"timm": write_dir(workdir / "timm_dir", PARAMS),
            "hf": write_dir(workdir / "hf_dir", to_hf_names(random_params(HF_CONFIG)))}


@FUZZ_JSON
@given(layout=st.sampled_from(["timm", "hf"]), data=st.data())
def test_fuzz_config_json_values(deit_dirs, layout, data):
    """Random values, anywhere in the config.json (or keys deleted, or new keys added)."""
    cfg = json.loads(json.dumps(TIMM_JSON if layout == "timm" else HF_JSON))
    touched = []
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from([p for p in json_paths(cfg) if p]))
        if data.draw(st.integers(0, 4)) == 0:
            where = where[:-1] + (data.draw(st.sampled_from(["num_heads", "depth", "embed_dim", "mlp_ratio",
                                                              "init_values", "fixed_input_size", "x"])),)
        delete = data.draw(st.integers(0, 5)) == 0
        try:
            cfg = set_path(cfg, where, copy.deepcopy(data.draw(config_values)), delete)
        except (KeyError, IndexError, TypeError):
            continue
        touched.append(where)
    directory = deit_dirs[layout]
    (directory / "config.json").write_text(json.dumps(cfg))
    ckpt = check_checkpoint(directory, CONFIG if layout == "timm" else HF_CONFIG)
    if ckpt is not None:  # loaded: with the heads config.json states
        stated = cfg["model_args"].get("num_heads") if layout == "timm" else cfg.get("num_attention_heads")
        if stated is not None:
            assert ckpt.config.num_heads == stated and "config.json" in ckpt.heads_note


@pytest.mark.parametrize("key", ["num_heads", "depth", "embed_dim"])
def test_config_json_pair_only_for_sizes(deit_dirs, key):
    # found by the fuzzer: model_args.num_heads = [8, 8] was read as 8 (the (h, w) rule of img_size and
    # patch_size applied to every integer field); now it is an error naming the field
    cfg = json.loads(json.dumps(TIMM_JSON))
    cfg["model_args"][key] = [8, 8]
    (deit_dirs["timm"] / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"model_args.{key} must be an integer, got \\[8, 8\\]"):
        load_checkpoint(deit_dirs["timm"])
    cfg["model_args"]["img_size"] = [CONFIG.img_size] * 2           # sizes still take a square pair
    cfg["model_args"][key] = TIMM_JSON["model_args"][key]
    (deit_dirs["timm"] / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(deit_dirs["timm"]).config.img_size == CONFIG.img_size


@FUZZ
@given(data=mutated(json.dumps(TIMM_JSON, indent=1).encode(), 10**9))
def test_fuzz_config_json_bytes(deit_dirs, data):
    directory = deit_dirs["timm"]
    (directory / "config.json").write_bytes(data)
    check_checkpoint(directory, CONFIG)


# ---------------------------------------------------------------- torch files

SMALL = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16), "c": np.arange(4)}


def torch_bytes(layout):
    import io
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.pth"
        (tf.save_zip if layout == "zip" else tf.save_legacy)(p, {"model": tf.state_dict(SMALL), "epoch": 1})
        return p.read_bytes()


ZIP, LEGACY = torch_bytes("zip"), torch_bytes("legacy")


@FUZZ
@given(layout=st.sampled_from(["zip", "legacy"]), data=st.data())
def test_fuzz_torch_files(workdir, layout, data):
    base = ZIP if layout == "zip" else LEGACY
    blob = data.draw(mutated(base, len(base)))
    path = workdir / "m.pth"
    path.write_bytes(blob)
    try:
        tensors, kind = read_torch(path)
    except CheckpointError as e:
        clean(e, path)
        return
    assert kind == f"torch-{layout}" or kind.startswith("torch-")
    assert all(isinstance(a, np.ndarray) for a in tensors.values())
    assert sum(a.nbytes for a in tensors.values()) <= 4 * len(blob)


def test_torch_zip_local_header_name_differs(workdir):
    # found by the fuzzer: zipfile's BadZipFile then quotes the whole local header (pickle bytes, newlines
    # included); the error stays one short line
    name = ZIP.index(b"/data.pkl") - 1                            # the first record's name, in its local header
    while ZIP[name - 30:name - 26] != b"PK\x03\x04":               # (the archive's top folder is one character)
        name -= 1
    length = struct.unpack("<H", ZIP[name - 4:name - 2])[0]
    blob = ZIP[:name - 4] + struct.pack("<H", length + 1000) + ZIP[name - 2:]   # the name runs into the pickle
    path = workdir / "m.pth"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match="BadZipFile") as e:
        read_torch(path)
    clean(e.value, path)


def test_safetensors_bool_bytes_other_than_0_1_refused(workdir):
    # found by the fuzzer: the safetensors library hands such bytes through as numpy bools (invalid values);
    # refvit refuses them rather than reading them as True
    header = json.dumps({"u": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}).encode()
    path = workdir / "b.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes([0, 1, 2]))
    with pytest.raises(CheckpointError, match="BOOL tensor 'u' holds a byte other than 0 or 1") as e:
        read_safetensors(path)
    clean(e.value, path)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes([0, 1, 1]))
    assert read_safetensors(path)[0]["u"].tolist() == [False, True, True]
