"""PyTorch checkpoints read without torch (weights_tools.pth): the files torch itself wrote
(../shared/peer/pth/, pytorch_model.bin) give the parameters and logits of the safetensors files of the
same weights, bit for bit; every dtype, stride and layout torch can write (written here by tests/torchfile.py,
which emits torch's byte layouts); and pickles that would run code are refused without running it."""
import os
import copyreg
import pickle
import pickletools
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
from safetensors.numpy import load_file

import torchfile as tf
from ckptfiles import (CUSTOM_CONFIG, CUSTOM_DIR, CUSTOM_LEGACY_PTH, CUSTOM_NPZ, TIMM_TINY, TIMM_TINY_PTH,
                       random_params, tiny)
from refvit import model_token
from weights_tools import CheckpointError, load_checkpoint, read_torch


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name  # bit for bit


# ---------------------------------------------------------------- files written by torch

SAME_WEIGHTS = {  # torch file -> the safetensors file of the same weights
    "deit_tiny_zip_pth": (TIMM_TINY_PTH, TIMM_TINY, "torch-zip"),
    "custom_legacy_pth": (CUSTOM_LEGACY_PTH, CUSTOM_DIR / "model.safetensors", "torch-legacy"),
    "custom_pytorch_model_bin": (CUSTOM_DIR / "pytorch_model.bin", CUSTOM_DIR / "model.safetensors", "torch-zip"),
}


@pytest.mark.shared
@pytest.mark.parametrize("case", SAME_WEIGHTS)
def test_torch_files_hold_the_safetensors_tensors(case):
    torch_file, st_file, kind = SAME_WEIGHTS[case]
    tensors, got_kind = read_torch(torch_file)
    assert got_kind == kind
    assert_same(tensors, load_file(str(st_file)))  # the safetensors library's own reading


@pytest.mark.shared
@pytest.mark.parametrize("case", SAME_WEIGHTS)
def test_torch_files_give_the_same_params_and_logits(case, peer_inputs):
    torch_file, st_file, kind = SAME_WEIGHTS[case]
    heads = {"num_heads": 2} if case == "custom_legacy_pth" else {}  # no config.json beside it: width 64
    a = load_checkpoint(torch_file, **heads)
    b = load_checkpoint(st_file)
    assert a.config == b.config and (a.source, a.head_mode, a.file_format) == (b.source, b.head_mode, kind)
    assert_same(a.params, b.params)
    if a.config.img_size == 224:
        x = peer_inputs[:2]
    else:
        with np.load(CUSTOM_NPZ) as z:
            x = z["inputs"]
    la, lb = (model_token.forward(c.params, x, c.config) for c in (a, b))
    assert np.array_equal(la, lb)


@pytest.mark.shared
def test_legacy_pth_logits_match_timm():
    ckpt = load_checkpoint(CUSTOM_LEGACY_PTH, num_heads=2)
    assert ckpt.config == CUSTOM_CONFIG
    with np.load(CUSTOM_NPZ) as z:
        err = float(np.abs(model_token.forward(ckpt.params, z["inputs"], ckpt.config) - z["logits"]).max())
    print(f"\ncustom timm DeiT from the legacy .pth: max abs logit error vs timm {err:.3g}")
    assert err < 1e-4


@pytest.mark.shared
def test_legacy_pth_without_heads_says_how():
    with pytest.raises(CheckpointError, match=r"legacy.pth: the number of attention heads is unknown.*--num-heads N"):
        load_checkpoint(CUSTOM_LEGACY_PTH)


@pytest.mark.shared
def test_reading_the_deit_tiny_pth_is_quick_and_small():
    tracemalloc.start()
    start = time.perf_counter()
    read_torch(TIMM_TINY_PTH)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = TIMM_TINY_PTH.stat().st_size
    print(f"\nread {size / 2**20:.1f} MiB .pth in {seconds:.2f} s, peak traced memory {peak / size:.2f}x the file")
    assert seconds < 3 and peak < 3 * size


# ---------------------------------------------------------------- what torch can write, written here

PARAMS = {"w": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
          "b": np.linspace(-2, 2, 5, dtype=np.float32), "scalar": np.float32(3.5), "empty": np.zeros((0, 4), np.float32)}


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("wrap", ["plain", "ordered", "model", "state_dict", "ddp"])
def test_state_dict_wrappers(tmp_path, layout, wrap):
    sd = tf.state_dict(PARAMS)
    obj = {"plain": dict(sd), "ordered": sd, "model": {"model": sd, "epoch": 3, "args": None},
           "state_dict": {"state_dict": sd, "optimizer": {"lr": 0.1}},
           "ddp": OrderedDict((f"module.{k}", v) for k, v in sd.items())}[wrap]
    path = (tf.save_zip if layout == "zip" else tf.save_legacy)(tmp_path / "m.pth", obj)
    tensors, kind = read_torch(path)
    assert kind == f"torch-{layout}"
    assert_same(tensors, {k: np.asarray(v) for k, v in PARAMS.items()})


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_dtypes(tmp_path, layout, byteorder):
    """float32/float16/float64, bfloat16 (widened exactly: every bit pattern), integers and bool."""
    rng = np.random.default_rng(1)
    bf16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint32) << 16
    bf16 = bf16.view(np.float32)
    arrays = {"f32": rng.standard_normal((4, 3)).astype(np.float32), "f16": rng.standard_normal(7).astype(np.float16),
              "f64": rng.standard_normal((2, 2)), "i64": np.arange(-3, 3, dtype=np.int64),
              "i8": np.arange(-128, 128, dtype=np.int8), "u8": np.arange(256, dtype=np.uint8),
              "i32": np.array([-(2**31), 2**31 - 1], np.int32), "b": np.array([True, False, True])}
    sd = tf.state_dict(arrays)
    sd["bf16"] = tf.tensor("bf", bf16, "bfloat16")
    if layout == "zip":
        path = tf.save_zip(tmp_path / "m.pth", sd, byteorder=byteorder)
    else:
        path = tf.save_legacy(tmp_path / "m.pth", sd, little_endian=byteorder == "little")
    got, _ = read_torch(path)
    expected = {k: a.astype(np.float32) if a.dtype == np.float16 else a for k, a in arrays.items()}
    expected["bf16"] = bf16
    assert_same(got, expected)  # bit for bit, NaN payloads included


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_strides_offsets_and_shared_storages(tmp_path, layout):
    """Tensors are views of storages: transposed (non-contiguous), at an offset, several on one storage
    (timm's qkv slices, tied weights), broadcast (stride 0), and an nn.Parameter."""
    base = np.arange(24, dtype=np.float32)
    storage = tf.Storage("0", "FloatStorage", base)
    half = tf.Storage("1", "HalfStorage", base.astype(np.float16))
    sd = {"t": tf.Tensor(storage, 0, (4, 6), (1, 4)),            # a (6, 4) matrix, transposed
          "slice": tf.Tensor(storage, 8, (2, 4), (4, 1)),        # rows 2-3 of it
          "tied": tf.Tensor(storage, 0, (6, 4), (4, 1)),
          "bcast": tf.Tensor(storage, 5, (3, 2), (0, 1)),        # expand(): stride 0
          "half_t": tf.Tensor(half, 2, (3, 2), (2, 6)),
          "param": tf.Parameter(tf.Tensor(storage, 20, (4,), (1,)))}
    path = (tf.save_zip if layout == "zip" else tf.save_legacy)(tmp_path / "m.pth", sd)
    got, _ = read_torch(path)
    m = base.reshape(6, 4)
    expected = {"t": m.T, "slice": m[2:4], "tied": m, "bcast": np.broadcast_to(base[5:7], (3, 2)),
                "half_t": np.lib.stride_tricks.as_strided(base[2:], (3, 2), (8, 24)), "param": base[20:24]}
    assert_same(got, {k: np.ascontiguousarray(v, np.float32) for k, v in expected.items()})
    assert all(a.flags.c_contiguous and a.flags.writeable for a in got.values())


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_protocols(tmp_path, protocol):
    """torch.save(..., pickle_protocol=N): protocol 4 and 5 frame the pickle and name globals differently."""
    data, storages = tf.dumps({"model": tf.state_dict(PARAMS)}, protocol=protocol)
    path = tf.save_zip(tmp_path / "m.pth", data_pkl=data, storages=storages)
    assert_same(read_torch(path)[0], {k: np.asarray(v) for k, v in PARAMS.items()})


def test_zip_without_byteorder_record_is_little_endian(tmp_path):
    path = tf.save_zip(tmp_path / "m.pth", tf.state_dict(PARAMS), byteorder=None)
    assert_same(read_torch(path)[0], {k: np.asarray(v) for k, v in PARAMS.items()})


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_load_checkpoint_from_pth(tmp_path, layout):
    """A whole DeiT through load_checkpoint: the same params as from safetensors, whatever the suffix."""
    config = tiny(embed_dim=64, num_heads=4, distilled=True)
    params = random_params(config)
    for suffix in (".pth", ".pt", ".bin", ".ckpt", ".safetensors"):  # recognised by content
        path = (tf.save_zip if layout == "zip" else tf.save_legacy)(tmp_path / f"m{suffix}", {"model": tf.state_dict(params)})
        ckpt = load_checkpoint(path, num_heads=4)
        assert ckpt.config == config and ckpt.head_mode == "mean" and ckpt.file_format == f"torch-{layout}"
        assert_same(ckpt.params, params)


def test_float16_and_bfloat16_checkpoints_become_float32(tmp_path):
    config = tiny(embed_dim=64, num_heads=4)
    params = random_params(config)
    for dtype in ("float16", "bfloat16"):
        rounded = {k: (v.astype(np.float16).astype(np.float32) if dtype == "float16" else
                       (v.view(np.uint32) & 0xFFFF0000).view(np.float32)) for k, v in params.items()}
        sd = OrderedDict((k, tf.tensor(str(i), v, dtype)) for i, (k, v) in enumerate(rounded.items()))
        ckpt = load_checkpoint(tf.save_zip(tmp_path / f"{dtype}.pth", sd), num_heads=4)
        assert_same(ckpt.params, rounded)


# ---------------------------------------------------------------- pickles that would run code

@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a pickle ran code"


def payloads(marker):
    """Objects whose unpickling would create the marker file, each through another route to code."""
    class System:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    class Eval:
        def __reduce__(self):
            return eval, (f"open({str(marker)!r}, 'w')",)

    class Exec:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w')",)

    class Popen:
        def __reduce__(self):
            return subprocess.Popen, (["touch", str(marker)],)

    class Getattr:  # getattr(<module>, 'system') is the route that does not name os.system itself
        def __reduce__(self):
            return getattr, ("", "join")

    objects = {"os.system": System(), "builtins.eval": Eval(), "builtins.exec": Exec(),
               "subprocess.Popen": Popen(), "getattr": Getattr()}
    return {name: (obj, first_global(pickle.dumps(obj, protocol=2))) for name, obj in objects.items()}


def first_global(data: bytes) -> str:
    """The global a pickle names first, as written (protocol 2 writes Python 2 names: os.system is
    'posix system', eval '__builtin__ eval')."""
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            return arg.replace(" ", ".")
    raise AssertionError("no GLOBAL")


PAYLOADS = ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "getattr"]


def evil_file(tmp_path, layout: str, where: str, payload) -> "os.PathLike":
    """The payload as the whole pickle or inside a valid state dict, in torch's zip or legacy layout."""
    if where == "whole":
        data, storages = pickle.dumps(payload, protocol=2), {}
    else:
        data, storages = tf.dumps({"model": {"w": tf.tensor("0", np.ones(3, np.float32)), "x": payload}},
                                  legacy=layout == "legacy")
    if layout == "zip":
        return tf.save_zip(tmp_path / "evil.pth", data_pkl=data, storages=storages)
    return tf.save_legacy(tmp_path / "evil.pth", main_pkl=data, storages=storages)


@pytest.mark.parametrize("name", PAYLOADS)
@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("where", ["whole", "inside_state_dict"])
def test_code_running_pickles_are_refused(tmp_path, marker, name, layout, where):
    payload, global_name = payloads(marker)[name]
    path = evil_file(tmp_path, layout, where, payload)
    for reader in (read_torch, load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            reader(path)
        message = str(info.value)
        assert message.startswith(f"{path}: refusing to load: the pickle asks for the Python object {global_name};")
        assert "\n" not in message
    assert not marker.exists()


def test_payload_in_the_legacy_header_pickles(tmp_path, marker):
    """The magic-number, protocol and sys_info pickles are unpickled by the same restricted unpickler."""
    payload, _ = payloads(marker)["os.system"]
    magic = pickle.dumps(tf.LEGACY_MAGIC, protocol=2)
    evil = pickle.dumps(payload, protocol=2)
    path = tmp_path / "evil.pth"
    path.write_bytes(magic + evil)
    with pytest.raises(CheckpointError, match="refusing to load: the pickle asks for the Python object posix.system"):
        read_torch(path)


@pytest.mark.parametrize("name, module", [
    ("whole_module", ("torch.nn.modules.linear", "Linear")),   # torch.save(model): modules are code
    ("training_args", ("argparse", "Namespace")),              # DeiT training checkpoints' 'args'
    ("numpy_array", ("numpy.core.multiarray", "_reconstruct")),
    ("untyped_storage", ("torch", "UntypedStorage")),
])
def test_other_globals_are_refused_by_name(tmp_path, name, module):
    data, storages = tf.dumps({"model": tf.state_dict(PARAMS), "extra": tf.Global(*module)})
    path = tf.save_zip(tmp_path / "m.pth", data_pkl=data, storages=storages)
    with pytest.raises(CheckpointError, match=rf"asks for the Python object {module[0]}\.{module[1]};"):
        read_torch(path)


def test_extension_registry_opcodes_are_refused(tmp_path, marker):
    payload, _ = payloads(marker)["os.system"]
    copyreg.add_extension("posix", "system", 0xF0)
    try:
        data = pickle.dumps(payload, protocol=2)  # EXT1 0xF0 instead of GLOBAL posix system
    finally:
        copyreg.remove_extension("posix", "system", 0xF0)
    assert b"\x82\xf0" in data and b"system" not in data
    with pytest.raises(CheckpointError, match="the pickle uses the EXT1 opcode"):
        read_torch(tf.save_zip(tmp_path / "m.pth", data_pkl=data))


def test_inst_opcode_is_refused(tmp_path, marker):
    data = b"\x80\x02(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."  # INST: call os.system(...)
    with pytest.raises(CheckpointError, match="the pickle uses the INST opcode"):
        read_torch(tf.save_zip(tmp_path / "m.pth", data_pkl=data))


def test_stand_ins_cannot_be_altered_or_misused(tmp_path):
    """BUILD (set state) on an allowed object, a rebuild function called with other arguments, a storage
    type used as a storage: refused, never half-built."""
    cases = {
        "build_on_storage_type": b"\x80\x02ctorch\nFloatStorage\n}(X\x01\x00\x00\x00aK\x01ub.",
        "rebuild_bad_args": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nX\x01\x00\x00\x00a\x85R.",
        "build_on_rebuild": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}(X\x01\x00\x00\x00aK\x01ub.",
    }
    for name, data in cases.items():
        with pytest.raises(CheckpointError, match="not a valid PyTorch file: cannot unpickle") as info:
            read_torch(tf.save_zip(tmp_path / f"{name}.pth", data_pkl=data))
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- damaged files, bounded memory

def _storage(n, numel=None):
    return tf.Storage("0", "FloatStorage", np.ones(n, np.float32), numel)


DAMAGED = {  # name -> (writer(path), message pattern)
    "empty": (lambda p: p.write_bytes(b""), "the file is empty"),
    "not_torch": (lambda p: p.write_bytes(b"hello world" * 10), "not a PyTorch file"),
    "plain_pickle": (lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=2)), "not a PyTorch file"),
    "truncated_zip": (lambda p: p.write_bytes(tf.save_zip(p, tf.state_dict(PARAMS)).read_bytes()[:300]),
                      "bad zip archive"),
    "no_data_pkl": (lambda p: zipfile.ZipFile(p, "w").writestr("x/other", b"1"), "expected one <name>/data.pkl"),
    "missing_record": (lambda p: tf.save_zip(p, data_pkl=tf.dumps({"w": tf.Tensor(_storage(4), 0, (4,), (1,))})[0]),
                       r"no record m/data/0"),
    "record_size_wrong": (lambda p: tf.save_zip(p, {"w": tf.Tensor(_storage(4, numel=5), 0, (4,), (1,))}),
                          r"record m/data/0 holds 16 bytes, expected 20"),
    "huge_storage_zip": (lambda p: tf.save_zip(p, {"w": tf.Tensor(_storage(4, numel=10**12), 0, (4,), (1,))}),
                         r"its storages claim 4000000000000 bytes, more than the file's"),
    "huge_storage_legacy": (lambda p: tf.save_legacy(p, {"w": tf.Tensor(_storage(4, numel=10**12), 0, (4,), (1,))}),
                            r"its storages claim 4000000000000 bytes"),
    "view_past_storage": (lambda p: tf.save_zip(p, {"w": tf.Tensor(_storage(4), 2, (4,), (1,))}),
                          r"reaches element 5 of a storage of 4"),
    "more_elements_than_storage": (lambda p: tf.save_zip(p, {"w": tf.Tensor(_storage(4), 0, (1000, 1000), (0, 0))}),
                                   r"has more elements \(1000000\) than its storage \(4\)"),
    "expansion": (lambda p: tf.save_zip(p, {f"w{i}": tf.Tensor(_storage(4096), 0, (4096,), (1,)) for i in range(64)}),
                  r"its tensors would take 1048576 bytes, more than 4x the file's"),
    "legacy_truncated": (lambda p: p.write_bytes(tf.save_legacy(p, tf.state_dict(PARAMS)).read_bytes()[:-10]),
                         r"runs past the end of the file"),
    "legacy_numel_mismatch": (lambda p: tf.save_legacy(p, tf.state_dict(PARAMS), numel_override={"0": 14}),
                              r"storage '0' holds 14 elements, the pickle says 15"),
    "legacy_bad_magic": (lambda p: tf.save_legacy(p, tf.state_dict(PARAMS), magic=tf.LEGACY_MAGIC + 1), "not a PyTorch"),
    "legacy_missing_key": (lambda p: tf.save_legacy(p, tf.state_dict(PARAMS), keys=["0", "1"]), r"no data for storage '2'"),
    "memo_bomb": (lambda p: tf.save_zip(p, data_pkl=b"\x80\x02N" + b"r" + struct.pack("<I", 2**31) + b"."),
                  r"pickle memo index 2147483648"),
    "bytes_bomb": (lambda p: tf.save_zip(p, data_pkl=b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"ab."),
                   r"malformed pickle"),
    "no_stop": (lambda p: tf.save_zip(p, data_pkl=b"\x80\x02}q\x00"), "malformed pickle .*before seeing STOP"),
    "not_a_dict": (lambda p: tf.save_zip(p, [tf.tensor("0", np.ones(2, np.float32))]), "holds a list, not a state dict"),
    "no_tensors": (lambda p: tf.save_zip(p, {"epoch": 3, "args": None}), r"no state dict: .* keys 'epoch', 'args'"),
    "non_tensor_entry": (lambda p: tf.save_zip(p, {"model": {"w": tf.tensor("0", np.ones(2, np.float32)), "n": 3}}),
                         r"state dict entry 'n' is a int, not a tensor"),
    "compressed_bomb": (lambda p: tf.save_zip(p, data_pkl=tf.dumps({"w": tf.Tensor(_storage(1), 0, (1,), (1,))})[0],
                                              storages={"0": tf.Storage("0", "FloatStorage", np.zeros(2**21, np.float32))},
                                              compress=True),
                        r"record m/data/0 holds 8388608 bytes, expected 4"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_files_are_named_quickly(tmp_path, case):
    write, pattern = DAMAGED[case]
    path = tmp_path / "m.pth"
    write(path)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=pattern) as info:
        read_torch(path)
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    assert seconds < 2 and peak < 64 * 2**20, (seconds, peak)


def test_memo_bomb_under_a_memory_limit(tmp_path):
    """The memo bomb unscanned would make CPython's unpickler allocate and clear a 16 GiB memo; under a 1 GiB
    address-space limit the reader still ends with the clean error."""
    path = tf.save_zip(tmp_path / "m.pth", data_pkl=b"\x80\x02N" + b"r" + struct.pack("<I", 2**31) + b".")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30));"
            "from weights_tools import read_torch, CheckpointError\n"
            "try: read_torch(sys.argv[1])\n"
            "except CheckpointError as e: print('clean:', e)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                         env=os.environ | {"OPENBLAS_NUM_THREADS": "1"})
    assert out.returncode == 0 and "clean:" in out.stdout and "memo index" in out.stdout, out.stderr


@pytest.mark.shared
def test_zip_of_a_newer_zip_version_is_a_clean_error(tmp_path):
    """Found by fuzzing: zipfile raises NotImplementedError for a 'version needed to extract' it does not know."""
    data = bytearray(TIMM_TINY_PTH.read_bytes())
    at = data.index(b"PK\x01\x02")                        # first central directory entry
    data[at + 6:at + 8] = (123).to_bytes(2, "little")      # version needed to extract: 12.3
    bad = tmp_path / "newer.pth"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bad zip archive"):
        read_torch(bad)
