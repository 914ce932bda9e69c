"""Read PyTorch checkpoints (`torch.save` files) without torch and without ever running code from them.

Both of torch's formats:
  zip (torch >= 1.6, `.pth` / `.pt` / `pytorch_model.bin`): a zip archive `<name>/data.pkl` (the pickle),
      `<name>/data/<key>` (one record of raw bytes per storage), `<name>/byteorder` ('little' / 'big').
  legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): five things one after another: a pickled
      magic number, the protocol version 1001, a sys_info dict, the main pickle, the sorted list of storage
      keys; then per key an 8-byte element count and the storage's raw bytes.

The pickles are read by a restricted unpickler. A pickle is a program: GLOBAL names any Python callable and
REDUCE calls it, which is how `__reduce__` exploits run code. Here `find_class` knows four names only —
`torch._utils._rebuild_tensor_v2` (and its older `_rebuild_tensor`, `_rebuild_parameter[_with_state]`),
`torch.<Type>Storage` and `collections.OrderedDict` — and maps them to inert stand-ins; any other global is
refused with a CheckpointError naming it, before anything is called. The opcodes are scanned first
(`pickletools.genops`, which only parses): the extension-registry, INST/OBJ and out-of-band buffer opcodes
are refused, and memo indices are bounded (a PUT at index 2**31 would make CPython's unpickler allocate a
16 GiB memo). Every size is checked against the file before anything is allocated: storage records must be
exactly numel * itemsize bytes inside the file, a tensor's view must lie inside its storage, and the tensors
together may not hold more bytes than MAX_EXPANSION times the file.

The state dict is the top object, or its "model" or "state_dict" entry (the official DeiT release files are
`{"model": state_dict}`); a "module." prefix on every name (DistributedDataParallel) is removed. Tensors come
back as numpy arrays like `read_safetensors`'s: float32/float16/bfloat16 -> float32 (bfloat16 exactly),
float64 stays float64, integer and bool dtypes keep their type.
"""
from __future__ import annotations

import io
import math
import mmap
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import CheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_EXPANSION = 4      # decoded tensors may total at most this many times the file's size in bytes
MAX_RANK = 16          # dimensions of one tensor
MAX_PICKLE_OPS = 1_000_000     # opcodes in one pickle (a DeiT-Base state dict has ~6,000)

# torch storage type -> (numpy storage dtype, little-endian), decoded dtype
_STORAGES = {
    "FloatStorage": ("<f4", np.float32), "HalfStorage": ("<f2", np.float32), "BFloat16Storage": ("<u2", np.float32),
    "DoubleStorage": ("<f8", np.float64), "LongStorage": ("<i8", np.int64), "IntStorage": ("<i4", np.int32),
    "ShortStorage": ("<i2", np.int16), "CharStorage": ("i1", np.int8), "ByteStorage": ("u1", np.uint8),
    "BoolStorage": ("?", np.bool_),
}
# Opcodes torch never writes and a checkpoint has no use for: the copyreg extension registry (a hidden
# route to globals), the class-instantiating INST/OBJ, text persistent ids, out-of-band buffers.
_REFUSED_OPS = {"EXT1", "EXT2", "EXT4", "INST", "OBJ", "PERSID", "NEXT_BUFFER", "READONLY_BUFFER"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


_LEGACY_MAGIC_BYTES = LEGACY_MAGIC.to_bytes(10, "little")


def torch_format(path) -> str | None:
    """'torch-zip' or 'torch-legacy' if the file starts like one of torch's formats, else None. The legacy
    format starts with the pickled magic number (PROTO, maybe a FRAME, LONG1 of these 10 bytes)."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:4] in _ZIP_MAGIC:
        return "torch-zip"
    if head[:1] == b"\x80" and _LEGACY_MAGIC_BYTES in head:
        return "torch-legacy"
    return None


# ---------------------------------------------------------------- inert stand-ins for torch's objects

class _Inert:
    """Base of the stand-ins: no __dict__, and BUILD (`__setstate__`) refused, so a pickle cannot alter one."""
    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"the pickle tries to set the state of a {type(self).__name__}")

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} cannot be pickled")


class _StorageType(_Inert):
    __slots__ = ("name", "dtype", "out")

    def __init__(self, name: str):
        storage, out = _STORAGES[name]
        self.name, self.dtype, self.out = name, np.dtype(storage), np.dtype(out)


class _Storage(_Inert):
    """A storage named by a persistent id; `data` is filled in once the bytes have been read."""
    __slots__ = ("key", "type", "numel", "data")

    def __init__(self, key: str, stype: _StorageType, numel: int):
        self.key, self.type, self.numel, self.data = key, stype, numel, None

    @property
    def nbytes(self) -> int:
        return self.numel * self.type.dtype.itemsize


class _Tensor(_Inert):
    """A tensor as torch rebuilds it: a strided view (offset, size, stride in elements) of a storage."""
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    @property
    def numel(self) -> int:
        return math.prod(self.size)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _size(x) -> bool:  # a size, stride, offset or count: torch's are int64
    return _int(x) and 0 <= x < 2**63


def _int_tuple(x) -> bool:
    return isinstance(x, tuple) and len(x) <= MAX_RANK and all(_size(d) for d in x)


def _tensor(storage, storage_offset, size, stride) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    if not _size(storage_offset):
        raise pickle.UnpicklingError(f"a tensor has storage offset {storage_offset!r}")
    if not (_int_tuple(size) and _int_tuple(stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"a tensor has size {_brief(size)} and stride {_brief(stride)}: expected "
                                     f"two tuples of at most {MAX_RANK} non-negative integers of the same length")
    t = _Tensor(storage, storage_offset, size, stride)
    if t.numel:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise pickle.UnpicklingError(f"a tensor of size {size}, stride {stride} at offset {storage_offset} "
                                         f"reaches element {last} of a storage of {storage.numel}")
        if t.numel > storage.numel:
            raise pickle.UnpicklingError(f"a tensor of size {size} has more elements ({t.numel}) than its "
                                         f"storage ({storage.numel})")
    return t


class _Rebuild(_Inert):
    """torch._utils' rebuild functions, re-implemented: they check their arguments and build a _Tensor."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args):
        if self.name == "_rebuild_tensor_v2" and len(args) in (6, 7):  # (..., requires_grad, hooks[, metadata])
            return _tensor(*args[:4])
        if self.name == "_rebuild_tensor" and len(args) == 4:
            return _tensor(*args)
        if self.name == "_rebuild_parameter" and len(args) == 3 and isinstance(args[0], _Tensor):
            return args[0]
        if self.name == "_rebuild_parameter_with_state" and len(args) == 4 and isinstance(args[0], _Tensor):
            return args[0]
        raise pickle.UnpicklingError(f"torch._utils.{self.name} called with unexpected arguments "
                                     f"({', '.join(type(a).__name__ for a in args)})")


def _allowed(module: str, name: str):
    """The stand-in for an allowed global, or None."""
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter",
                                             "_rebuild_parameter_with_state"):
        return _Rebuild(name)
    if module == "torch" and name in _STORAGES:
        return _StorageType(name)
    if (module, name) == ("collections", "OrderedDict"):
        return OrderedDict
    return None


def _brief(value) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 120 else text[:120] + "..."


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path, legacy: bool, storages: dict):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path, self._legacy, self._storages = path, legacy, storages

    def find_class(self, module, name):
        obj = _allowed(module, name)
        if obj is None:
            raise CheckpointError(f"{self._path}: refusing to load: the pickle asks for the Python object "
                                  f"{str(module)[:100]}.{str(name)[:100]}; only tensors and plain containers are "
                                  "read from PyTorch files (any other object could run code)")
        return obj

    def persistent_load(self, pid):
        n = 6 if self._legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == n and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {_brief(pid)}")
        _, stype, key, _location, numel = pid[:5]
        if self._legacy and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (torch < 0.4 files) are not supported")
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"a storage of type {_brief(stype)}: expected a torch *Storage type")
        if not (isinstance(key, str) and _size(numel)):
            raise pickle.UnpicklingError(f"a storage with key {_brief(key)} and size {_brief(numel)}")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, stype, numel)
        elif storage.type.name != stype.name or storage.numel != numel:
            raise pickle.UnpicklingError(f"storage {key!r} is named twice with different types or sizes")
        return storage


# ---------------------------------------------------------------- pickles: scan, then load

def _pickle_end(path, buf, start: int = 0) -> int:
    """Scan the pickle at buf[start:] (bytes or a memory map) by its opcodes only — nothing is built or
    called — refusing the opcodes no checkpoint needs and absurd memo indices. -> the offset just past its
    STOP opcode."""
    if isinstance(buf, mmap.mmap):
        stream = buf
        stream.seek(start)
    else:
        stream = io.BytesIO(buf)
        stream.seek(start)
    n_ops = 0
    try:
        for op, arg, pos in pickletools.genops(stream):  # pos: offset in buf (the stream's tell())
            n_ops += 1
            if op.name in _REFUSED_OPS:
                raise CheckpointError(f"{path}: refusing to load: the pickle uses the {op.name} opcode, which no "
                                      "PyTorch checkpoint needs")
            if op.name in _PUT_OPS and not (_int(arg) and 0 <= arg <= n_ops):
                raise CheckpointError(f"{path}: not a valid PyTorch file: pickle memo index {_brief(arg)} at "
                                      f"byte {pos}")
            if n_ops > MAX_PICKLE_OPS:
                raise CheckpointError(f"{path}: not a valid PyTorch file: a pickle of more than {MAX_PICKLE_OPS} "
                                      "opcodes")
            if op.name == "STOP":
                return pos + 1
    except CheckpointError:
        raise
    except Exception as e:  # genops raises ValueError and others on malformed input
        raise CheckpointError(f"{path}: not a valid PyTorch file: malformed pickle ({_brief(str(e))})") from None
    raise CheckpointError(f"{path}: not a valid PyTorch file: a pickle without its STOP opcode (truncated?)")


def _unpickle(path, data: bytes, *, legacy: bool = False, storages: dict | None = None):
    _pickle_end(path, data)
    try:
        return _Unpickler(data, path, legacy, {} if storages is None else storages).load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: not a valid PyTorch file: the pickle nests too deeply") from None
    except Exception as e:  # UnpicklingError, EOFError, TypeError, ValueError, MemoryError...
        raise CheckpointError(f"{path}: not a valid PyTorch file: cannot unpickle "
                              f"({type(e).__name__}: {_brief(str(e))})") from None


# ---------------------------------------------------------------- the two formats

def _read_zip(path: Path, size: int) -> tuple:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:  # e.g. zip version
        raise CheckpointError(f"{path}: not a valid PyTorch file: bad zip archive ({e})") from None
    with zf:
        infos = {i.filename: i for i in zf.infolist()}
        pkls = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: not a PyTorch zip checkpoint: expected one <name>/data.pkl, found "
                                  f"{len(pkls)}")
        prefix = pkls[0][:-len("data.pkl")]

        def record(name: str, nbytes: int | None = None) -> bytes:
            info = infos.get(prefix + name)
            if info is None:
                raise CheckpointError(f"{path}: not a valid PyTorch file: no record {prefix + name}")
            if info.file_size > size or (nbytes is not None and info.file_size != nbytes):
                want = "" if nbytes is None else f", expected {nbytes}"
                raise CheckpointError(f"{path}: not a valid PyTorch file: record {prefix + name} holds "
                                      f"{info.file_size} bytes{want} (the file has {size})")
            try:
                return zf.read(info)
            except Exception as e:  # BadZipFile (CRC), NotImplementedError (compression), RuntimeError...
                raise CheckpointError(f"{path}: not a valid PyTorch file: cannot read {prefix + name} "
                                      f"({type(e).__name__}: {_brief(str(e))})") from None

        byteorder = "little"
        if prefix + "byteorder" in infos:
            byteorder = record("byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: not a valid PyTorch file: byteorder {byteorder[:20]!r}")
        storages = {}
        obj = _unpickle(path, record("data.pkl"), storages=storages)
        _check_total(path, storages, size)
        for key, storage in storages.items():
            storage.data = _frombuffer(record(f"data/{key}", storage.nbytes), storage, byteorder)
    return obj, storages


def _read_legacy(path: Path, size: int) -> tuple:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos, header = 0, []
        for _ in range(3):  # magic number, protocol version, sys_info
            end = _pickle_end(path, mm, pos)
            header.append(_unpickle(path, mm[pos:end]))
            pos = end
        magic, protocol, sys_info = header
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: not a PyTorch file: a pickle, but not torch's legacy format "
                                  f"(magic number {_brief(magic)}, protocol {_brief(protocol)})")
        if not isinstance(sys_info, dict):
            raise CheckpointError(f"{path}: not a valid PyTorch file: sys_info is a {type(sys_info).__name__}")
        little = sys_info.get("little_endian", True) is not False
        storages = {}
        end = _pickle_end(path, mm, pos)
        obj = _unpickle(path, mm[pos:end], legacy=True, storages=storages)
        pos = end
        end = _pickle_end(path, mm, pos)
        keys = _unpickle(path, mm[pos:end])
        pos = end
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)) or len(set(keys)) != len(keys):
            raise CheckpointError(f"{path}: not a valid PyTorch file: the storage keys are not a list of distinct "
                                  "strings")
        missing = sorted(set(storages) - set(keys))
        if missing:
            raise CheckpointError(f"{path}: not a valid PyTorch file: no data for storage {missing[0]!r}")
        _check_total(path, storages, size)
        order = "little" if little else "big"
        for key in keys:
            if key not in storages:
                raise CheckpointError(f"{path}: not a valid PyTorch file: data for storage {key!r}, which no "
                                      "tensor uses")
            storage = storages[key]
            if pos + 8 + storage.nbytes > size:
                raise CheckpointError(f"{path}: not a valid PyTorch file: storage {key!r} ({storage.nbytes} bytes "
                                      f"at byte {pos + 8}) runs past the end of the file ({size} bytes; truncated?)")
            numel = int.from_bytes(mm[pos:pos + 8], order, signed=True)
            if numel != storage.numel:
                raise CheckpointError(f"{path}: not a valid PyTorch file: storage {key!r} holds {numel} elements, "
                                      f"the pickle says {storage.numel}")
            storage.data = _frombuffer(mm[pos + 8:pos + 8 + storage.nbytes], storage, order)
            pos += 8 + storage.nbytes
    return obj, storages


def _check_total(path, storages: dict, size: int) -> None:
    total = sum(s.nbytes for s in storages.values())
    if total > size:
        raise CheckpointError(f"{path}: not a valid PyTorch file: its storages claim {total} bytes, more than the "
                              f"file's {size}")


def _frombuffer(raw: bytes, storage: _Storage, byteorder: str) -> np.ndarray:
    dtype = storage.type.dtype
    if byteorder == "big" and dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">")
    return np.frombuffer(raw, dtype=dtype)


# ---------------------------------------------------------------- tensors

def _decode(t: _Tensor) -> np.ndarray:
    storage = t.storage
    base = storage.data
    item = base.itemsize
    view = np.lib.stride_tricks.as_strided(base[t.offset:] if t.numel else base[:0], shape=t.size,
                                           strides=tuple(s * item for s in t.stride), writeable=False)
    if storage.type.name == "BFloat16Storage":  # bfloat16 is the top half of a float32: widening is exact
        return (view.astype(np.uint32, order="C") << 16).view(np.float32)
    return view.astype(storage.type.out.newbyteorder("="), order="C")  # a C-contiguous copy, native byte order


def _state_dict(path, obj) -> dict:
    """The state dict inside a checkpoint object: the object itself, or its 'model' / 'state_dict' entry."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    if not any(isinstance(v, _Tensor) for v in obj.values()):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            shown = ", ".join(_brief(k) for k in list(obj)[:8])
            raise CheckpointError(f"{path}: no state dict: the file holds a dict with keys {shown or 'none'} and "
                                  "no tensors, no 'model' and no 'state_dict' entry")
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: the state dict has a key of type {type(name).__name__}")
        if not isinstance(value, _Tensor):
            raise CheckpointError(f"{path}: state dict entry {_brief(name)} is a {type(value).__name__}, "
                                  "not a tensor")
    if obj and all(n.startswith("module.") for n in obj):  # saved from DistributedDataParallel
        obj = {n[len("module."):]: v for n, v in obj.items()}
    return obj


def read_torch(path) -> tuple[dict, str]:
    """Read a torch.save file -> ({name: array}, format 'torch-zip' | 'torch-legacy'). Any defect, and any
    pickle that asks for something other than tensors and containers, raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: not a valid PyTorch file: the file is empty")
    kind = torch_format(path)
    if kind == "torch-zip":
        obj, _ = _read_zip(path, size)
    elif kind == "torch-legacy":
        obj, _ = _read_legacy(path, size)
    else:
        raise CheckpointError(f"{path}: not a PyTorch file (neither torch's zip format nor its legacy format)")
    tensors = _state_dict(path, obj)
    total = sum(t.numel * max(4, t.storage.type.out.itemsize) for t in tensors.values())
    if total > MAX_EXPANSION * size:
        raise CheckpointError(f"{path}: not a valid PyTorch file: its tensors would take {total} bytes, more than "
                              f"{MAX_EXPANSION}x the file's {size} (MAX_EXPANSION in weights_tools.pth)")
    return {name: _decode(t) for name, t in tensors.items()}, kind
