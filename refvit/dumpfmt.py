"""Dump formats of golden vectors, conformance cases and device dumps: encoders and decoders, one module.

    npy  NumPy .npy (always written)
    hex  Verilog $readmemh: one element per line, two's complement, fixed width per dtype, row-major
    bin  raw little-endian two's complement, row-major, no header
    h    C header: `static const int8_t name[N] = {...};` with the shape in a comment and as #defines
         (NAME_NDIM, NAME_DIM0.., NAME_COUNT).
The readers of the same formats (`read_array`) are here too, so `refvit check` and the conformance suite
decode exactly what `refvit golden` encodes. docs/golden-format.md describes the formats.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

import refvit
from refvit.errors import RefvitError

FORMATS = ("npy", "hex", "bin", "h")

# hex digits per element: two per byte of the two's complement (or unsigned) representation
HEX_DIGITS = {"int8": 2, "uint8": 2, "int16": 4, "uint16": 4, "int32": 8, "int64": 16}
C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "uint16": "uint16_t",
           "int32": "int32_t", "int64": "int64_t"}


class DumpFormatError(RefvitError):
    """A dump file that cannot be decoded as the dtype/shape the manifest states; the message names the file.

    kind: 'shape' (wrong element count), 'dtype' (wrong element width) or 'format' (not decodable)."""

    def __init__(self, message: str, kind: str = "format"):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------------------------
# encoders (vectorized: DeiT-Base dumps hold ~10^8 elements; no per-element Python anywhere)
# ---------------------------------------------------------------------------------------------

def _int_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.name not in HEX_DIGITS:
        raise ValueError(f"integer dump formats need one of {sorted(HEX_DIGITS)}, got dtype {dt}")
    return dt


def _int_array(arr) -> np.ndarray:
    """arr as an integer array of a dump dtype: bool (a flag constant such as pot_rows) as uint8 0/1."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    _int_dtype(arr.dtype)
    return arr


# Lookup tables of ASCII text by value. Their rows are viewed as numpy void scalars ("V<bytes>"): a gather of
# whole rows is then one fixed-size copy per element, about twice as fast as indexing a 2-D uint8 table.
_HEX_PAIRS = np.array([list(f"{i:02x}".encode()) for i in range(256)], np.uint8).view("V2").reshape(256)  # "xx"
_HEX_LINE8 = np.array([list(f"{i:02x}\n".encode()) for i in range(256)], np.uint8).view("V3").reshape(256)  # "xx\n"


def hex_lanes(dtype, hex_width: int | None) -> int:
    """Elements per hex line: hex_width // element bits (at least 1: a wider element takes a line of its own)."""
    bits = 8 * _int_array(np.empty(0, dtype)).dtype.itemsize
    return max(1, (hex_width or bits) // bits)


def _hex_digits(arr: np.ndarray) -> np.ndarray:
    """(N, 2*itemsize) lowercase ASCII hex digits of each element's two's complement, most significant first."""
    n = arr.dtype.itemsize
    be = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder(">")).view(np.uint8).reshape(-1, n)  # MSB first
    return _HEX_PAIRS[be].view(np.uint8).reshape(-1, 2 * n)       # (N, 2n)


def hex_lines(arr: np.ndarray, hex_width: int | None = None) -> np.ndarray:
    """$readmemh text as a uint8 buffer: 2*itemsize lowercase hex digits of each element's two's complement,
    row-major, one element per line; with hex_width (bits), `hex_lanes` elements per line: element i in lane
    i % lanes, lane 0 the least significant (rightmost) digits, the last line's unused high lanes zero."""
    arr = _int_array(arr)
    lanes = hex_lanes(arr.dtype, hex_width)
    flat = np.ascontiguousarray(arr).reshape(-1)                  # (N,)
    if lanes == 1 and arr.dtype.itemsize == 1:
        return _HEX_LINE8[flat.view(np.uint8)].view(np.uint8)     # N x "xx\n": one gather
    digits = _hex_digits(flat)                                    # (N, 2n)
    rows = -(-flat.size // lanes)
    if rows * lanes != flat.size:                                 # the last line's high lanes: zero elements
        digits = np.concatenate([digits, np.full((rows * lanes - flat.size, digits.shape[1]), ord("0"), np.uint8)])
    lines = np.empty((rows, lanes * digits.shape[1] + 1), np.uint8)
    lines[:, :-1] = digits.reshape(rows, lanes, -1)[:, ::-1].reshape(rows, -1)   # lane 0 rightmost
    lines[:, -1] = ord("\n")
    return lines.reshape(-1)


def hex_bytes(arr: np.ndarray, hex_width: int | None = None) -> bytes:
    """hex_lines as bytes."""
    return hex_lines(arr, hex_width).tobytes()


def _bin_array(arr: np.ndarray) -> np.ndarray:
    arr = _int_array(arr)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(-1)


def bin_bytes(arr: np.ndarray) -> bytes:
    """Raw little-endian two's complement, row-major."""
    return _bin_array(arr).tobytes()


def c_identifier(name: str, prefix: str = "") -> str:
    """A C identifier for a tensor name: 'blocks.0.attn.qkv' -> prefix + 'blocks_0_attn_qkv'."""
    ident = prefix + re.sub(r"[^0-9A-Za-z_]", "_", name)
    return ident if ident and not ident[0].isdigit() else "t_" + ident


def check_c_prefix(prefix: str) -> str:
    if prefix and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise DumpFormatError(f"C prefix {prefix!r} is not the start of a C identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return prefix


def _decimal_width(dt: np.dtype) -> int:
    info = np.iinfo(dt)
    return max(len(str(int(info.min))), len(str(int(info.max))) + 1)


def _decimal_table(dt: np.dtype, suffix: bytes) -> np.ndarray:
    """(2^bits,) void rows of width + len(suffix) ASCII bytes: every value of an 8- or 16-bit dtype, right-aligned,
    then the suffix, indexed by its bit pattern."""
    unsigned = np.arange(1 << (8 * dt.itemsize), dtype=np.uint64).astype(f"u{dt.itemsize}")
    text = _decimal_columns(unsigned.view(dt), suffix, table=False)   # (2^bits, w) uint8
    return text.view(f"V{text.shape[1]}").reshape(-1)


_DECIMAL_TABLES: dict = {}


def _right_aligned(values: np.ndarray, width: int) -> np.ndarray:
    """(N, width) ASCII: each integer of the 1-D `values` right-aligned, '-' before a negative one (the digit
    loop, column by column from the right; `width` must hold the widest value and its sign)."""
    neg = values < 0
    rest = np.where(neg, -(values.astype(np.int64) + 1), values).astype(np.uint64) + neg   # |x|, no overflow
    text = np.full((values.size, width), ord(" "), np.uint8)      # (N, width)
    ndigits = np.zeros(values.size, np.int64)
    for col in range(width - 1, -1, -1):
        live = (rest > 0) | (col == width - 1)                    # the units digit is always written
        text[:, col] = np.where(live, (rest % np.uint64(10)).astype(np.uint8) + ord("0"), text[:, col])
        ndigits += live
        rest //= np.uint64(10)
    rows = np.nonzero(neg)[0]
    text[rows, width - 1 - ndigits[rows]] = ord("-")
    return text


_INT32_TABLES: list = []                                          # [(high part table, low part table)], built once


def _int32_tables() -> tuple:
    """Text of |x| = hi * 10^5 + lo (int32: hi < 21475): the high part as 6 characters by key, 0 blank, 1 '     -'
    (a negative value whose 5-digit low part starts at once), 2*hi + neg: the sign and hi right-aligned; the low
    part as 5 characters by key, lo: zero-padded (after a high part), 10^5 + lo: blank-padded (no high part),
    2*10^5 + lo: blank-padded with the sign (no high part, lo < 10^4)."""
    if not _INT32_TABLES:
        his = np.arange(1, 21475, dtype=np.int64)
        hi = np.empty((2 + 2 * his.size, 6), np.uint8)
        hi[0], hi[1] = np.frombuffer(b"      ", np.uint8), np.frombuffer(b"     -", np.uint8)
        hi[2::2], hi[3::2] = _right_aligned(his, 6), _right_aligned(-his, 6)
        los = np.arange(100000, dtype=np.int64)
        zero = ((los[:, None] // 10 ** np.arange(4, -1, -1)) % 10 + ord("0")).astype(np.uint8)   # "00042"
        signed = _right_aligned(np.where(los < 10000, -los, los), 5)
        lo = np.concatenate([zero, _right_aligned(los, 5), signed])
        _INT32_TABLES.append((hi.view("V6").reshape(-1), lo.view("V5").reshape(-1)))
    return _INT32_TABLES[0]


def _int32_text(values: np.ndarray) -> np.ndarray:
    """(N, 11) ASCII of int32 values as _right_aligned(values, 11), by two table lookups per element."""
    hi_table, lo_table = _int32_tables()
    neg = values < 0
    hi, lo = np.divmod(np.abs(values.astype(np.int64)), 100000)   # (N,), (N,)
    alone = hi == 0                                               # no high part: the low part is blank-padded
    hi_key = np.where(alone, neg & (lo >= 10000), 2 * hi + neg)
    lo_key = lo + np.where(alone, np.where(neg & (lo < 10000), 200000, 100000), 0)
    text = np.empty((values.size, 11), np.uint8)
    text[:, :6].view("V6")[:, 0] = hi_table[hi_key]
    text[:, 6:].view("V5")[:, 0] = lo_table[lo_key]
    return text


def _decimal_columns(values: np.ndarray, suffix: bytes = b"", table: bool = True, out: np.ndarray | None = None):
    """Right-aligned decimal text of integers, then `suffix`: values' shape + (width + len(suffix),) ASCII
    (into `out` when given: a uint8 array or view of that shape, its last axis contiguous).

    8- and 16-bit dtypes: one gather from a table of every value; int32: two gathers (_int32_text); int64:
    the digit loop (_right_aligned). No per-element Python anywhere."""
    dt = values.dtype
    width = _decimal_width(dt)
    out = np.empty(values.shape + (width + len(suffix),), np.uint8) if out is None else out
    if table and dt.itemsize <= 2:
        key = (dt.str, suffix)
        if key not in _DECIMAL_TABLES:
            _DECIMAL_TABLES[key] = _decimal_table(dt, suffix)
        index = np.ascontiguousarray(values).view(f"u{dt.itemsize}")   # the bit patterns
        out.view(f"V{out.shape[-1]}")[..., 0] = _DECIMAL_TABLES[key][index]   # one row per element (last axis
        return out                                                          # of out contiguous: a view)
    flat = values.reshape(-1)                                     # (N,)
    text = _int32_text(flat) if table and dt == np.int32 else _right_aligned(flat, width)
    out[..., :width] = text.reshape(values.shape + (width,))
    out[..., width:] = np.frombuffer(suffix, np.uint8)
    return out


def c_array_lines(arr: np.ndarray, per_line: int = 16) -> np.ndarray:
    """The element lines of a C initializer as one uint8 buffer: 4 spaces, `per_line` right-aligned `value, `
    items and a newline per line; no comma after the last element and no trailing blanks on the last line."""
    flat = np.ascontiguousarray(_int_array(arr)).reshape(-1)      # (N,)
    n = flat.size
    if n == 0:
        return np.frombuffer(b"\n", np.uint8)
    w = _decimal_width(flat.dtype) + 2                            # an item: "-128, "
    rows = -(-n // per_line)
    if rows * per_line != n:                                      # pad the last line with zeros (cut below)
        flat = np.concatenate([flat, np.zeros(rows * per_line - n, flat.dtype)])
    lines = np.empty((rows, 4 + per_line * w + 1), np.uint8)      # (rows, line bytes)
    lines[:, :4], lines[:, -1] = ord(" "), ord("\n")
    _decimal_columns(flat.reshape(rows, per_line), b", ", out=lines[:, 4:-1].reshape(rows, per_line, w))  # in place
    end = (rows - 1) * lines.shape[1] + 4 + (n - (rows - 1) * per_line) * w - 2   # just after the last digit
    buf = lines.reshape(-1)
    buf[end] = ord("\n")
    return buf[:end + 1]


def _c_type(arr: np.ndarray) -> str:
    return C_TYPES[_int_array(arr.reshape(-1)[:0]).dtype.name]


def _c_comment(arr: np.ndarray, name: str, layout: str) -> str:
    return (f"{name}: {arr.dtype.name}, shape {tuple(arr.shape)}, {arr.size} elements, "
            f"{layout or 'row-major'}; generated by refvit {refvit.__version__}")


def c_shape_defines(arr: np.ndarray, ident: str) -> str:
    """The shape as preprocessor constants, named by the upper-cased identifier: <ID>_NDIM (number of axes),
    <ID>_DIM0 ... (each axis, row-major order) and <ID>_COUNT (elements; the array's length)."""
    base = ident.upper()
    lines = [f"#define {base}_NDIM {arr.ndim}"] + [f"#define {base}_DIM{i} {d}" for i, d in enumerate(arr.shape)]
    return "\n".join(lines + [f"#define {base}_COUNT {arr.size}"]) + "\n"


def c_header_parts(arr: np.ndarray, name: str, layout: str = "", per_line: int = 16, prefix: str = "") -> list:
    """`static const <type> <prefix><ident>[N] = {...};` with name, dtype, shape and layout in a comment and the
    shape as #defines (c_shape_defines), as byte buffers to write one after the other (the element lines are
    not copied again)."""
    arr = np.asarray(arr)
    ctype, ident = _c_type(arr), c_identifier(name, prefix)
    guard = ident.upper() + "_H"
    head = (f"/* {_c_comment(arr, name, layout)} */\n#ifndef {guard}\n#define {guard}\n#include <stdint.h>\n\n"
            f"{c_shape_defines(arr, ident)}\nstatic const {ctype} {ident}[{arr.size}] = {{\n")
    return [head.encode(), c_array_lines(arr, per_line), f"}};\n\n#endif /* {guard} */\n".encode()]


def c_header_text(arr: np.ndarray, name: str, layout: str = "", per_line: int = 16, prefix: str = "") -> str:
    return b"".join(bytes(p) for p in c_header_parts(arr, name, layout, per_line, prefix)).decode("ascii")


def _write_parts(path: Path, parts) -> None:
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)


def write_c_pair(folder: Path, entries, prefix: str = "", stem: str = "golden", per_line: int = 16) -> dict:
    """One `<prefix><stem>.c` with every array's data (`const <type> <ident>[N] = {...};`) and one
    `<prefix><stem>.h` with their `extern` declarations; entries: (name, array, layout). -> {name: identifier}.
    Two names with the same C identifier are an error (the .c would not compile)."""
    folder.mkdir(parents=True, exist_ok=True)
    c_name, h_name = f"{prefix}{stem}.c", f"{prefix}{stem}.h"
    guard = c_identifier(f"{prefix}{stem}").upper() + "_H"
    idents, decls = {}, []
    with open(folder / c_name, "wb") as c:
        c.write(f"/* golden data, generated by refvit {refvit.__version__}; declarations in {h_name} */\n"
                f"#include \"{h_name}\"\n".encode())
        for name, arr, layout in entries:
            arr = np.asarray(arr)
            ident = c_identifier(name, prefix)
            if ident.upper() in {i.upper() for i in idents.values()}:     # the #defines use it upper-cased
                other = next(n for n, i in idents.items() if i.upper() == ident.upper())
                raise DumpFormatError(f"{name!r} and {other!r} have the same C identifier {ident} (or differ only "
                                      f"in case, which their #define names do not)")
            idents[name] = ident
            ctype = _c_type(arr)
            c.write(f"\n/* {_c_comment(arr, name, layout)} */\nconst {ctype} {ident}[{arr.size}] = {{\n".encode())
            c.write(c_array_lines(arr, per_line))
            c.write(b"};\n")
            decls.append(f"{c_shape_defines(arr, ident)}extern const {ctype} {ident}[{arr.size}];   "
                         f"/* {name}: {arr.dtype.name} {tuple(arr.shape)} */\n")
    (folder / h_name).write_text(f"/* golden data, generated by refvit {refvit.__version__}; defined in {c_name} */\n"
                                 f"#ifndef {guard}\n#define {guard}\n#include <stdint.h>\n\n" + "\n".join(decls)
                                 + f"\n\n#endif /* {guard} */\n")
    return idents


def write_array(arr: np.ndarray, folder: Path, name: str, formats=("npy",), layout: str = "",
                hex_width: int | None = None, c_prefix: str = "") -> dict:
    """Write arr as folder/name.<fmt> for each format (floats: npy only) -> {fmt: file name}.

    hex_width: packed hex lines (see hex_bytes); c_prefix: before the C identifier."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"tensor name {name!r} cannot be a file name")
    arr = np.asarray(arr)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for fmt in formats:
        if fmt != "npy" and arr.dtype.kind == "f":
            continue
        path = folder / f"{name}.{fmt}"
        if fmt == "npy":
            np.save(path, arr, allow_pickle=False)
        elif fmt == "hex":
            _write_parts(path, [hex_lines(arr, hex_width)])
        elif fmt == "bin":
            _write_parts(path, [_bin_array(arr)])
        elif fmt == "h":
            _write_parts(path, c_header_parts(arr, name, layout, prefix=c_prefix))
        else:
            raise ValueError(f"unknown dump format {fmt!r}; choose from {FORMATS}")
        files[fmt] = path.name
    return files


# ---------------------------------------------------------------------------------------------
# decoders
# ---------------------------------------------------------------------------------------------

_NIBBLE = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _NIBBLE[ord(chr(_c).upper())] = _i


def _hex_tokens_slow(data: bytes, path) -> list:
    """Whitespace-separated tokens, `//` comments removed ($readmemh syntax without @address lines)."""
    tokens = []
    for lineno, line in enumerate(data.decode("ascii", "replace").splitlines(), 1):
        line = line.split("//", 1)[0].strip()
        if line.startswith("@"):
            raise DumpFormatError(f"{path}:{lineno}: @address lines are not supported; write elements in order")
        tokens += line.split()
    return tokens


def parse_hex(data: bytes, dtype, count: int | None, path="<hex>", hex_width: int | None = None) -> np.ndarray:
    """Decode $readmemh text into `count` elements of `dtype` (two's complement; a token may have fewer digits).

    count None: as many as the file holds. hex_width: packed lines of `hex_lanes` elements, lane 0 the
    rightmost digits (hex_bytes); the elements beyond `count` on the last line are ignored."""
    dt = _int_dtype(dtype)
    lanes = hex_lanes(dt, hex_width)
    digits = HEX_DIGITS[dt.name] * lanes                          # digits per line
    unsigned = np.dtype(f"u{dt.itemsize}")
    lines = None if count is None else -(-count // lanes)
    if len(data) % (digits + 1) == 0 and data[digits::digits + 1] == b"\n" * (len(data) // (digits + 1)) \
            and lines in (None, len(data) // (digits + 1)):
        chars = np.frombuffer(data, np.uint8).reshape(len(data) // (digits + 1), digits + 1)[:, :digits]   # canonical
    else:
        tokens = _hex_tokens_slow(data, path)
        if lines is not None and len(tokens) != lines:
            per = f" ({lanes} per line)" if lanes > 1 else ""
            raise DumpFormatError(f"{path}: {len(tokens)} hex {'lines' if lanes > 1 else 'elements'}{per}, "
                                  f"expected {lines}" + (f" for {count} elements" if lanes > 1 else ""), "shape")
        long = [t for t in tokens if len(t) > digits]
        if long:
            raise DumpFormatError(f"{path}: hex {'line' if lanes > 1 else 'element'} {long[0]!r} has more than "
                                  f"{digits} digits ({dt.name}" + (f" x {lanes})" if lanes > 1 else ")"), "dtype")
        chars = np.frombuffer(b"".join(t.encode().rjust(digits, b"0") for t in tokens) or b"", np.uint8)
        chars = chars.reshape(len(tokens), digits)
    nlines = chars.shape[0]
    per = digits // lanes                                         # digits per element
    chars = chars.reshape(nlines, lanes, per)[:, ::-1].reshape(nlines * lanes, per)   # lane 0 first
    count = nlines * lanes if count is None else count
    chars = chars[:count]
    nibbles = _NIBBLE[chars]
    if nibbles.size and nibbles.max() == 255:
        row = int(np.nonzero((nibbles == 255).any(axis=1))[0][0])
        raise DumpFormatError(f"{path}: element {row} ({bytes(chars[row]).decode('ascii', 'replace')!r}) is not hex")
    value = np.zeros(count, np.uint64)
    for j in range(chars.shape[1]):
        value = (value << np.uint64(4)) | nibbles[:, j].astype(np.uint64)
    return value.astype(unsigned).view(dt) if dt.kind == "i" else value.astype(dt)


def parse_bin(data: bytes, dtype, count: int | None, path="<bin>") -> np.ndarray:
    """Decode raw little-endian data into `count` elements of `dtype` (count None: as many as it holds)."""
    dt = _int_dtype(dtype)
    if count is None:
        if len(data) % dt.itemsize:
            raise DumpFormatError(f"{path}: {len(data)} bytes is not a whole number of {dt.name} elements", "shape")
        count = len(data) // dt.itemsize
    if len(data) != count * dt.itemsize:
        width = len(data) // count if count and len(data) % count == 0 else 0
        kind = "dtype" if width in (1, 2, 4, 8) else "shape"     # right count of elements of another width
        raise DumpFormatError(f"{path}: {len(data)} bytes, expected {count} {dt.name} elements = "
                              f"{count * dt.itemsize} bytes", kind)
    return np.frombuffer(data, dt.newbyteorder("<")).astype(dt)


def packed_hex_width(path, dtype) -> int | None:
    """The hex_width (bits per line) a .hex file of `dtype` elements looks packed with: its first line holds a
    whole number (more than one) of elements' digits; None when it holds one element (or is unreadable)."""
    try:
        with open(path, "rb") as f:
            first = next((ln.split(b"//")[0].strip() for ln in f if ln.split(b"//")[0].strip()), b"")
    except OSError:
        return None
    per = HEX_DIGITS.get(np.dtype(dtype).name) if np.dtype(dtype).kind in "iu" else None
    if not per or len(first) <= per or len(first) % per:
        return None
    return 4 * len(first)


def packed_hex_note(path, dtype, hex_width: int | None) -> str:
    """'' or, for a packed hex file read without hex_width, what to pass: ' (its lines hold N digits: packed
    hex, pass --hex-width B)'."""
    width = None if hex_width else packed_hex_width(path, dtype)
    return f"; its lines are packed hex of {width} bits: pass --hex-width {width}" if width else ""


def read_array(path, dtype=None, shape=None, hex_width: int | None = None) -> np.ndarray:
    """Read a .npy (dtype/shape from the file) or a .hex/.bin dump (dtype required; shape None: 1-D, as many
    elements as the file holds). hex_width: packed hex lines (see hex_bytes)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    try:
        if fmt == "npy":
            return np.load(path, allow_pickle=False)
        if fmt not in ("hex", "bin"):
            raise DumpFormatError(f"{path}: unknown dump format {fmt!r} (readable: npy, hex, bin)")
        if dtype is None:
            raise ValueError(f"read_array: {path} is {fmt}: give its dtype")
        count = None if shape is None else int(np.prod(shape, dtype=np.int64))
        data = path.read_bytes()
        arr = parse_hex(data, dtype, count, path, hex_width) if fmt == "hex" else parse_bin(data, dtype, count, path)
        return arr if shape is None else arr.reshape(shape)
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, DumpFormatError):
            note = packed_hex_note(path, dtype, hex_width) if fmt == "hex" else ""
            if note:
                raise DumpFormatError(str(e) + note, e.kind) from None
            raise
        raise DumpFormatError(f"{path}: cannot read: {e}") from None


# ---------------------------------------------------------------------------------------------
# JSON and hashes
# ---------------------------------------------------------------------------------------------

def jsonable(v):
    """numpy scalars/arrays and dtypes -> JSON values."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.dtype):
        return v.name
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (bounded memory for large dumps)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_formats(formats) -> tuple:
    formats = tuple(dict.fromkeys(("npy",) + tuple(formats)))        # npy always, order kept, no repeats
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise DumpFormatError(f"unknown dump format(s) {unknown}; choose from {', '.join(FORMATS)}")
    return formats


def manifest_json(manifest: dict) -> str:
    """Indented JSON with every list of scalars on one line (shapes, per-channel multipliers)."""
    text = json.dumps(manifest, indent=1)
    flat = re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + re.sub(r"\n\s*", " ", m.group(1)).strip() + "]", text)
    return flat + "\n"
