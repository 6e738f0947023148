"""The GGUF container: header, metadata and tensor table, read with every number checked.

Nothing here knows about Gemma.  `read_gguf_metadata(path)` returns the metadata
dict and a `GGUFTensorInfo` per tensor; `dequantize_tensor` turns one tensor's
bytes into float32 with the `gguf` package.  The layout follows llama.cpp's
`gguf-py` (`GGUFReader`, `constants.GGUFValueType`) and `docs/gguf.md`.

Hostile input: the header, metadata and tensor table are parsed here with
Python ints and every count, length and offset is checked against the real
file size before it is trusted (the `gguf` package's reader trusts them, and
its `np.prod` over uint64 dims can overflow).  Only dequantization is left to
`gguf.quants.dequantize`, whose exceptions are wrapped.  Every failure is a
`ModelFileError` (or a subclass) whose message starts with the file's path.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arguments import is_integer
from ..errors import ModelFileError, UnsupportedModelError

# ggml type name -> we can dequantize it with gguf.quants (numpy).
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS",
)

_GGUF_MAGIC = b"GGUF"
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 3
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf-py constants.GGUFValueType)
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32 = 0, 1, 2, 3, 4, 5
_T_FLOAT32, _T_BOOL, _T_STRING, _T_ARRAY, _T_UINT64, _T_INT64, _T_FLOAT64 = 6, 7, 8, 9, 10, 11, 12
_SCALAR_FORMATS = {
    _T_UINT8: "B", _T_INT8: "b", _T_UINT16: "H", _T_INT16: "h", _T_UINT32: "I",
    _T_INT32: "i", _T_FLOAT32: "f", _T_BOOL: "?", _T_UINT64: "Q", _T_INT64: "q",
    _T_FLOAT64: "d",
}
_NUMPY_DTYPES = {
    _T_UINT8: "<u1", _T_INT8: "<i1", _T_UINT16: "<u2", _T_INT16: "<i2", _T_UINT32: "<u4",
    _T_INT32: "<i4", _T_FLOAT32: "<f4", _T_BOOL: "<u1", _T_UINT64: "<u8", _T_INT64: "<i8",
    _T_FLOAT64: "<f8",
}


@dataclass
class GGUFTensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the fastest-varying dimension
    type_code: int
    type_name: str
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / HF order (ggml's ne reversed)."""
        return tuple(reversed(self.ne))


class _Truncated(Exception):
    pass


class _Reader:
    """Bounds-checked little-endian reader over a read-only mmap."""

    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(
                f"{what} at byte {self.pos} needs {n} bytes but the file has only "
                f"{max(self.size - self.pos, 0)} left (truncated or corrupt)"
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return out[0] if len(out) == 1 else out

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", what + " length")
        return self.raw(n, what)


def _value(r: _Reader, vtype: int, what: str, depth: int = 0):
    if vtype == _T_STRING:
        return r.string(what)
    if vtype in _SCALAR_FORMATS:
        return r.unpack(_SCALAR_FORMATS[vtype], what)
    if vtype == _T_ARRAY:
        if depth >= _MAX_ARRAY_DEPTH:
            raise ValueError(f"{what}: arrays nested deeper than {_MAX_ARRAY_DEPTH}")
        etype = r.unpack("I", what + " element type")
        count = r.unpack("Q", what + " element count")
        if etype in _NUMPY_DTYPES:
            size = np.dtype(_NUMPY_DTYPES[etype]).itemsize
            data = np.frombuffer(r.raw(count * size, what), dtype=_NUMPY_DTYPES[etype])
            return data.astype(bool) if etype == _T_BOOL else data
        if etype == _T_STRING:
            # each string takes >= 8 bytes: check the claimed count before looping
            r.need(count * 8, what)
            out = []
            for _ in range(count):
                out.append(r.string(what))
            return out
        if etype == _T_ARRAY:
            r.need(count * 12, what)
            return [_value(r, _T_ARRAY, what, depth + 1) for _ in range(count)]
        raise ValueError(f"{what}: unknown array element type {etype}")
    raise ValueError(f"{what}: unknown metadata value type {vtype}")


def ggml_types():
    """(GGMLQuantizationType, GGML_QUANT_SIZES) from the optional gguf package."""
    try:  # deferred: the gguf package is optional (mlx_gemma[gguf]), needed only for GGUF files
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'mlx_gemma[gguf]'") from e
    return GGMLQuantizationType, GGML_QUANT_SIZES


def _utf8(path: str, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelFileError(path, f"{what} {raw[:64]!r} is not UTF-8") from None


def _parse(path: str, buf, size: int) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """The metadata and the tensor table of the GGUF bytes in `buf`, every number checked."""
    ggml = ggml_types()
    r = _Reader(buf, size)
    n_tensors, n_kv = _read_header(path, r, size)
    meta = _read_metadata(path, r, n_kv)
    alignment = meta.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not is_integer(alignment) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise ModelFileError(path, f"general.alignment {alignment!r} is not a power of two")
    table = _read_tensor_table(path, r, n_tensors)
    data_start = -(-r.pos // alignment) * alignment
    infos = [_tensor_info(path, entry, data_start, alignment, size, ggml) for entry in table]
    return meta, infos


def _read_header(path: str, r: _Reader, size: int) -> tuple[int, int]:
    """(tensor count, metadata count) after the magic and version, refused when they cannot fit the file."""
    magic = r.raw(4, "magic")
    if magic != _GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = r.unpack("I", "version")
    if version & 0xFFFF == 0 and version != 0:
        raise UnsupportedModelError(path, "big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise UnsupportedModelError(path, f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = r.unpack("QQ", "tensor/metadata counts")
    # Smallest possible entries: a metadata pair 8+1+4+1 bytes, a tensor info 8+1+4+8+4+8.
    if n_kv * 14 + n_tensors * 33 > size - r.pos:
        raise ModelFileError(
            path,
            f"header claims {n_tensors} tensors and {n_kv} metadata entries, which cannot "
            f"fit in a {size}-byte file (corrupt or truncated)",
        )
    return n_tensors, n_kv


def _read_metadata(path: str, r: _Reader, n_kv: int) -> dict[str, Any]:
    """{key: value} of the `n_kv` metadata pairs; a key given twice is refused."""
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _utf8(path, r.string("metadata key"), "metadata key")
        vtype = r.unpack("I", f"type of metadata {key!r}")
        if key in meta:
            raise ModelFileError(path, f"metadata key {key!r} appears twice")
        meta[key] = _value(r, vtype, f"metadata {key!r}")
    return meta


def _read_tensor_table(path: str, r: _Reader, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, ne, type code, relative offset) of each tensor, as the file states them."""
    table = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        name = _utf8(path, r.string("tensor name"), "tensor name")
        if name in seen:
            raise ModelFileError(path, f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = r.unpack("I", f"tensor {name!r} rank")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelFileError(path, f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        ne = tuple(int(d) for d in (r.unpack("Q", f"tensor {name!r} dims") for _ in range(n_dims)))
        type_code = r.unpack("I", f"tensor {name!r} type")
        offset = r.unpack("Q", f"tensor {name!r} offset")
        table.append((name, ne, type_code, offset))
    return table


def _tensor_info(path: str, entry: tuple, data_start: int, alignment: int, size: int, ggml) -> GGUFTensorInfo:
    """One table entry checked: a type we can dequantize, whole blocks per row, aligned, inside the file."""
    GGMLQuantizationType, GGML_QUANT_SIZES = ggml
    name, ne, type_code, offset = entry
    try:
        qtype = GGMLQuantizationType(type_code)
    except ValueError:
        raise UnsupportedModelError(path, f"tensor {name!r} has unknown ggml type code {type_code}") from None
    if qtype.name not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedModelError(
            path,
            f"tensor {name!r} is stored as {qtype.name}, which mlx_gemma cannot dequantize "
            f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})",
        )
    if any(d <= 0 for d in ne):
        raise ModelFileError(path, f"tensor {name!r} has an empty dimension {ne}")
    n_elements = 1
    for d in ne:
        n_elements *= d  # Python ints: no overflow
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if ne[0] % block_size:
        raise ModelFileError(
            path,
            f"tensor {name!r}: row length {ne[0]} is not a multiple of the {qtype.name} "
            f"block size {block_size}",
        )
    nbytes = n_elements // block_size * type_size
    if offset % alignment:
        raise ModelFileError(path, f"tensor {name!r}: data offset {offset} is not {alignment}-aligned")
    start = data_start + offset
    if start + nbytes > size:
        raise ModelFileError(
            path,
            f"truncated: tensor {name!r} ({qtype.name} {list(ne)}) needs bytes {start}..{start + nbytes} "
            f"but the file has {size} bytes",
        )
    return GGUFTensorInfo(name, ne, type_code, qtype.name, start, nbytes)


def open_gguf(path) -> tuple[str, int]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(path, "no such GGUF file")
    size = os.path.getsize(path)
    if size < 24:
        raise ModelFileError(path, f"file is {size} bytes: too small to be a GGUF file (empty or truncated)")
    return path, size


def read_gguf_metadata(path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Parse and validate the header: (metadata dict, tensor infos).  No weights are read."""
    path, size = open_gguf(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            return _parse(path, mm, size)
        except _Truncated as e:
            raise ModelFileError(path, str(e)) from None
        except (ValueError, OverflowError, struct.error, MemoryError) as e:
            if isinstance(e, ModelFileError):
                raise
            raise ModelFileError(path, f"corrupt GGUF header: {e}") from None


def dequantize_tensor(path: str, info: GGUFTensorInfo, raw: bytes) -> np.ndarray:
    from gguf.quants import dequantize  # deferred: the optional gguf package (see ggml_types)

    GGMLQuantizationType, GGML_QUANT_SIZES = ggml_types()
    qtype = GGMLQuantizationType(info.type_code)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_bytes = info.ne[0] // block_size * type_size
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, row_bytes)
    try:
        out = dequantize(rows, qtype)
    except Exception as e:  # noqa: BLE001 - wrap whatever the gguf package raises
        raise ModelFileError(path, f"cannot dequantize tensor {info.name!r} ({info.type_name}): {e}") from None
    out = np.asarray(out, dtype=np.float32).reshape(info.shape)
    if not out.flags.writeable:  # F32/F16 paths can return a view of the read-only bytes
        out = out.copy()
    if not np.isfinite(out).all():
        raise ModelFileError(path, f"tensor {info.name!r} contains NaN or infinite values")
    return out
