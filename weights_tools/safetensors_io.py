"""Read and write .safetensors files. The reader parses the header itself so every defect gets a named error.

Layout: 8-byte little-endian header length n, n bytes of JSON header, then the data region. The header maps
tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data region) and
may hold "__metadata__", a str -> str map.

Checked as the safetensors library checks (and never more leniently): the header at most MAX_HEADER_BYTES
(the library's own limit), JSON of bounded nesting, every entry's dtype a known string, its shape a list of
non-negative integers whose byte size is its data_offsets span, and the spans tiling the data region exactly
(no overlap, no gap, no trailing bytes). Nothing is allocated before the header has been checked.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import CheckpointError

# safetensors dtype -> little-endian storage dtype. BF16 is read as raw uint16 and widened by hand; BOOL (one
# byte per flag, e.g. a mixed-pot conv's pot_rows) as uint8, any non-zero byte true.
_STORAGE = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I8": "i1", "U8": "u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "I64": "<i8", "BOOL": "u1",
}
_TO_FLOAT32 = {"F32", "F16", "BF16"}  # F64 stays float64
_LEN_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit (MAX_HEADER_SIZE)
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _invalid(path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file: {problem}")


def _name(name: str) -> str:
    """A tensor name for a message: repr, shortened if absurdly long."""
    return repr(name) if len(name) <= 200 else repr(name[:200]) + f"... ({len(name)} characters)"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {_name(k)}")
        out[k] = v
    return out


def _parse_header(path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise _invalid(path, f"the {len(raw)}-byte header is not JSON ({e})") from None
    except RecursionError:
        raise _invalid(path, f"the {len(raw)}-byte header nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise _invalid(path, f"the header is a JSON {type(header).__name__}, not an object")
    return header


def _parse_metadata(path, metadata) -> dict:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(path, f"__metadata__ must map strings to strings, got {_brief(metadata)}")
    return metadata


def _parse_entry(path, name: str, entry, data_size: int) -> tuple:
    """Check one header entry; return (dtype, shape, begin, end)."""
    if not isinstance(entry, dict) or not _ENTRY_KEYS <= entry.keys():
        raise _invalid(path, f"tensor {_name(name)}: entry must be an object with dtype, shape and data_offsets, "
                             f"got {_brief(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise _invalid(path, f"tensor {_name(name)}: dtype must be a string, got {_brief(dtype)}")
    if dtype not in _STORAGE:
        raise CheckpointError(f"{path}: tensor {_name(name)} has dtype {_brief(dtype)}, which is not supported "
                              f"(supported: {', '.join(_STORAGE)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _invalid(path, f"tensor {_name(name)}: shape {_brief(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _invalid(path, f"tensor {_name(name)}: data_offsets {_brief(offsets)} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _invalid(path, f"tensor {_name(name)}: data_offsets {offsets} out of range for a data region of "
                             f"{data_size} bytes (file truncated?)")
    n_bytes = math.prod(shape) * np.dtype(_STORAGE[dtype]).itemsize
    if n_bytes != end - begin:
        raise _invalid(path, f"tensor {_name(name)}: shape {_brief(shape)} of {dtype} needs {n_bytes} bytes but "
                             f"data_offsets {offsets} hold {end - begin}")
    return dtype, tuple(shape), begin, end


def _brief(value) -> str:
    """repr for a message, cut short (a header value can be megabytes of JSON)."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _check_tiling(path, entries: dict, data_size: int) -> None:
    """The tensors' byte spans must cover the data region exactly, in some order: no overlap, no gap, no
    trailing bytes (the safetensors library refuses all three)."""
    spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items())
    covered, last = 0, None
    for begin, end, name in spans:
        if begin < covered:
            raise _invalid(path, f"data of tensors {_name(last)} and {_name(name)} overlap")
        if begin > covered:
            raise _invalid(path, f"a gap of {begin - covered} bytes in the data region before tensor {_name(name)} "
                                 f"(bytes {covered} to {begin} belong to no tensor)")
        covered, last = end, name
    if covered != data_size:
        raise _invalid(path, f"{data_size - covered} trailing bytes after the last tensor's data "
                             f"(the data region is {data_size} bytes, the tensors use {covered})")


def _decode(data: np.ndarray, dtype: str, shape: tuple, begin: int, end: int) -> np.ndarray:
    """Copy one tensor out of the data region (never a view of the mapped file)."""
    raw = np.asarray(data[begin:end])
    if dtype == "BF16":  # bfloat16 is the top half of a float32: widening is exact
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype == "BOOL":
        out = raw != 0
    else:
        stored = raw.view(_STORAGE[dtype])
        out = stored.astype(np.float32 if dtype in _TO_FLOAT32 else stored.dtype.newbyteorder("="))
    return out.reshape(shape)


def read_safetensors_metadata(path) -> dict:
    """The metadata of a .safetensors file, from its header only (checked as by read_safetensors; no tensor
    is read): e.g. to tell a refvit quantized file from a float checkpoint without decoding the weights."""
    return _read_header(path)[0]


def read_safetensors(path) -> tuple[dict, dict]:
    """Read a .safetensors file -> ({name: array}, metadata). F32/F16/BF16 become float32, F64 float64,
    integer dtypes keep their type. Any defect raises CheckpointError naming the file and the problem."""
    metadata, entries, data_start, data_size = _read_header(path)
    # One memory map of the data region, one copy per tensor: no second full-size buffer for big files.
    data = (np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,))
            if data_size else np.zeros(0, np.uint8))
    for name, (dtype, _, begin, end) in entries.items():
        if dtype == "BOOL" and end > begin and int(np.asarray(data[begin:end]).max()) > 1:
            raise _invalid(path, f"BOOL tensor {_name(name)} holds a byte other than 0 or 1")
    tensors = {name: _decode(data, *entry) for name, entry in entries.items()}
    del data
    return tensors, dict(metadata)


def _read_header(path) -> tuple:
    """-> (metadata, {name: (dtype, shape, begin, end)}, data_start, data_size), everything checked."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    size = path.stat().st_size
    if size == 0:
        raise _invalid(path, "the file is empty")
    if size < _LEN_BYTES:
        raise _invalid(path, f"{size} bytes is too short to hold the 8-byte header length")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(_LEN_BYTES), "little")
        if header_len > size - _LEN_BYTES:
            raise _invalid(path, f"header length {header_len} is beyond the file size ({size} bytes)")
        if header_len > MAX_HEADER_BYTES:
            raise _invalid(path, f"header length {header_len} is above the {MAX_HEADER_BYTES}-byte limit")
        header = _parse_header(path, f.read(header_len))
    metadata = _parse_metadata(path, header.pop("__metadata__", {}))
    data_start = _LEN_BYTES + header_len
    data_size = size - data_start
    entries = {name: _parse_entry(path, name, entry, data_size) for name, entry in header.items()}
    _check_tiling(path, entries, data_size)
    return metadata, entries, data_start, data_size


_WRITABLE = {np.dtype(t) for t in ("f8", "f4", "f2", "i1", "u1", "i2", "u2", "i4", "i8", "?")}


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write numpy arrays (float16/32/64, bool and the integer dtypes we read) to a .safetensors file.
    metadata, if given, must map strings to strings."""
    from safetensors.numpy import save_file

    for key, value in (metadata or {}).items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise CheckpointError(f"{path}: metadata must map strings to strings, got {key!r}: {value!r}")
    arrays = {}
    for name, tensor in tensors.items():
        array = np.asarray(tensor)
        if array.dtype.newbyteorder("=") not in _WRITABLE:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {array.dtype}, which cannot be written "
                                  f"(supported: {', '.join(sorted(str(t) for t in _WRITABLE))})")
        arrays[name] = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    save_file(arrays, str(path), metadata=metadata)
