"""Write PyTorch checkpoint files without torch, for tests: the byte layouts torch.save writes (zip and legacy),
with pickles that name the same globals and persistent ids as torch's, built from numpy arrays. Also pickles
that torch never writes (malicious ones, damaged ones). The reader is checked against files written by torch
itself (../shared/peer/pth/); this writer only makes the cases torch would not.

A pure-Python pickler (pickle._Pickler) writes `Global` stand-ins as GLOBAL opcodes, so no module named
torch is needed (or imported) to write a pickle that names torch._utils._rebuild_tensor_v2.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# numpy dtype (storage) -> torch storage type name
STORAGE_TYPES = {"float32": "FloatStorage", "float16": "HalfStorage", "float64": "DoubleStorage",
                 "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
                 "uint8": "ByteStorage", "bool": "BoolStorage"}


class Global:
    """Pickled as `GLOBAL module name` (never called)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise AssertionError("a stand-in is never called")


class Storage:
    """A torch storage: a storage type name and its raw elements (bfloat16: uint16 bit patterns)."""

    def __init__(self, key: str, type_name: str, data: np.ndarray, numel: int | None = None):
        self.key, self.type_name, self.data = key, type_name, np.ascontiguousarray(data).ravel()
        self.numel = self.data.size if numel is None else numel


class Tensor:
    """A tensor as torch pickles it: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""

    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple, rebuild="_rebuild_tensor_v2"):
        self.storage, self.offset, self.size, self.stride, self.rebuild = storage, offset, size, stride, rebuild

    def __reduce__(self):
        args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, OrderedDict())
        return Global("torch._utils", self.rebuild), args


class Parameter:
    """An nn.Parameter as torch pickles it: _rebuild_parameter(tensor, requires_grad, hooks)."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def __reduce__(self):
        return Global("torch._utils", "_rebuild_parameter"), (self.tensor, True, OrderedDict())


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 values that are bfloat16 values -> their bfloat16 bit patterns (the top 16 bits)."""
    a = np.asarray(a, np.float32)
    assert not np.any(a.view(np.uint32) & 0xFFFF), "not bfloat16 values"
    return (a.view(np.uint32) >> 16).astype(np.uint16)


def tensor(key: str, array, dtype: str | None = None) -> Tensor:
    """A contiguous tensor on its own storage. dtype 'bfloat16' stores `array` (float32 values that are
    bfloat16 values) as BFloat16Storage."""
    array = np.asarray(array)
    if dtype == "bfloat16":
        storage = Storage(key, "BFloat16Storage", bf16_bits(array))
    else:
        array = array.astype(dtype) if dtype else array
        storage = Storage(key, STORAGE_TYPES[array.dtype.name], array)
    strides = tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim))
    return Tensor(storage, 0, array.shape, strides)


def state_dict(params: dict, dtype: str | None = None) -> "OrderedDict":
    """numpy params -> an OrderedDict of tensors, one storage each (keys '0', '1', ... as torch numbers them)."""
    return OrderedDict((name, tensor(str(i), a, dtype)) for i, (name, a) in enumerate(params.items()))


class _Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, legacy: bool, storages: dict, protocol: int = 2):
        super().__init__(file, protocol=protocol)
        self.legacy, self.storages = legacy, storages

    def save_stand_in(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = save_stand_in

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        self.storages.setdefault(obj.key, obj)
        pid = ("storage", Global("torch", obj.type_name), obj.key, "cpu", obj.numel)
        return pid + (None,) if self.legacy else pid


def dumps(obj, legacy: bool = False, protocol: int = 2) -> tuple[bytes, dict]:
    """-> (the pickle torch would write for obj, {key: Storage} it refers to). torch.save's default
    pickle_protocol is 2."""
    buf, storages = io.BytesIO(), {}
    _Pickler(buf, legacy, storages, protocol).dump(obj)
    return buf.getvalue(), storages


def _raw(storage: Storage, byteorder: str) -> bytes:
    data = storage.data
    if byteorder == "big" and data.dtype.itemsize > 1:
        data = data.astype(data.dtype.newbyteorder(">"))
    return data.tobytes()


def save_zip(path, obj=None, *, data_pkl: bytes | None = None, storages: dict | None = None,
             byteorder: str | None = "little", name: str | None = None, extra: dict | None = None,
             compress: bool = False) -> Path:
    """torch's zip format: <name>/data.pkl, <name>/byteorder, <name>/data/<key>, <name>/version.
    data_pkl/storages replace the pickle of obj (for damaged or malicious pickles); extra adds records."""
    path = Path(path)
    if data_pkl is None:
        data_pkl, storages = dumps(obj)
    name = name or path.stem
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as z:
        z.writestr(f"{name}/data.pkl", data_pkl)
        if byteorder is not None:
            z.writestr(f"{name}/byteorder", byteorder)
        for key, storage in (storages or {}).items():
            z.writestr(f"{name}/data/{key}", _raw(storage, byteorder or "little"))
        z.writestr(f"{name}/version", "3\n")
        for record, data in (extra or {}).items():
            z.writestr(f"{name}/{record}", data)
    return path


def save_legacy(path, obj=None, *, main_pkl: bytes | None = None, storages: dict | None = None,
                magic: int = LEGACY_MAGIC, little_endian: bool = True, keys: list | None = None,
                numel_override: dict | None = None) -> Path:
    """torch's legacy format: magic, protocol 1001, sys_info, the main pickle, the sorted storage keys, then
    per key an 8-byte element count and the raw bytes."""
    path = Path(path)
    if main_pkl is None:
        main_pkl, storages = dumps(obj, legacy=True)
    storages = storages or {}
    byteorder = "little" if little_endian else "big"
    sys_info = {"protocol_version": 1001, "little_endian": little_endian,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    out = io.BytesIO()
    for header in (magic, 1001, sys_info):
        pickle.dump(header, out, protocol=2)
    out.write(main_pkl)
    keys = sorted(storages) if keys is None else keys
    pickle.dump(keys, out, protocol=2)
    for key in keys:
        storage = storages[key]
        numel = (numel_override or {}).get(key, storage.numel)
        out.write(int(numel).to_bytes(8, byteorder, signed=True))
        out.write(_raw(storage, byteorder))
    path.write_bytes(out.getvalue())
    return path
