"""Read and write safetensors files safely.

People load model files downloaded from strangers.  MLX's own safetensors
reader trusts the header more than the reference `safetensors` library does
(it does not check that tensors tile the data area, nor that shapes fit MLX's
32-bit dimensions, nor duplicate keys), so before handing a file to `mx.load`
we read its 8-byte length and JSON header ourselves -- in pure Python, with
Python ints so no arithmetic can overflow -- and refuse anything malformed
with a `ModelFileError` that names the file and, where it helps, the tensor.

Also here: writing safetensors atomically (`save_file`, `save_sharded`,
through `atomic.py`).  Loading a model folder (single file, index + shards,
or loose files; pickles refused unopened) builds on this in `model_folder.py`.

The format (https://huggingface.co/docs/safetensors): an unsigned 64-bit
little-endian header length N, then N bytes of UTF-8 JSON (an object, maybe
padded with trailing spaces), then the data area.  Each header entry is
`name: {"dtype", "shape", "data_offsets": [begin, end]}` with offsets relative
to the start of the data area; the optional `__metadata__` entry maps str to str.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import mlx.core as mx

from .arguments import is_integer  # never True/False: JSON `true` is a Python int too
from .atomic import atomic_path, atomic_write_bytes  # noqa: F401 - atomic_write_bytes is re-exported
from .errors import ModelFileError

# The reference library's limit; a real header is a few hundred KB at most.
MAX_HEADER_BYTES = 100_000_000
# Same cap for `model.safetensors.index.json`, which we read whole.
MAX_INDEX_BYTES = 100_000_000
# MLX stores each dimension in an int32; a larger one would silently wrap.
MAX_DIM = 2**31 - 1

# Every byte-sized dtype of the spec, with its size in bytes.  (The spec's
# sub-byte F4/F6 types and the non-standard C64 are "unknown" to us.)
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}

# What `mx.load` turns each loadable dtype into (used to double-check it).
MLX_DTYPES = {
    "BOOL": mx.bool_, "U8": mx.uint8, "I8": mx.int8,
    "U16": mx.uint16, "I16": mx.int16, "F16": mx.float16, "BF16": mx.bfloat16,
    "U32": mx.uint32, "I32": mx.int32, "F32": mx.float32,
    "U64": mx.uint64, "I64": mx.int64,
}

# Valid safetensors that MLX still cannot load faithfully: refused at load
# time with advice, rather than failing deep inside MLX (F64) or, worse,
# loading as raw uint8 codes that a model would use as numbers (F8_E4M3).
_FP8_ADVICE = ("MLX cannot load 8-bit floats (it would return the raw bytes as "
               "uint8); dequantize the checkpoint to BF16 or F16 first")
UNLOADABLE = {
    "F64": "MLX cannot load float64 tensors; convert the checkpoint to F32 first",
    "F8_E4M3": _FP8_ADVICE, "F8_E5M2": _FP8_ADVICE, "F8_E8M0": _FP8_ADVICE,
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data area
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data area (8 + header length)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------

def is_text(x) -> bool:
    # Python's json accepts lone surrogates ("\ud800"); MLX's parser does not.
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(text: str, path) -> object:
    """Strict JSON: no duplicate keys (two readers could pick different ones),
    no NaN/Infinity, and deep nesting reported instead of crashing."""

    def no_duplicates(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"duplicate key {key!r:.80}")
            obj[key] = value
        return obj

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates,
                          parse_constant=no_constants)
    except RecursionError:
        raise ModelFileError(path, "JSON nested too deeply") from None
    except ValueError as e:
        raise ModelFileError(path, f"not valid JSON: {e}") from None


def open_regular(path):
    """Open `path` for reading if it is a regular file (a FIFO or device
    would block or never end); return (file, size)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot access file: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(path, "not a regular file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelFileError(path, f"cannot open file: {e.strerror or e}") from e
    return f, os.fstat(f.fileno()).st_size


def read_header(path) -> Header:
    """Read and validate the header of a safetensors file (never its data)."""
    f, size = open_regular(path)
    with f:
        if size < 8:
            raise ModelFileError(
                path, f"file is {size} bytes, too short to be safetensors "
                      "(empty or truncated download?)")
        n = int.from_bytes(f.read(8), "little")
        # Both checks come before reading, so a hostile length allocates nothing.
        if n >= MAX_HEADER_BYTES:
            raise ModelFileError(
                path, f"header length {n} is not below the {MAX_HEADER_BYTES}-byte limit")
        if n > size - 8:
            raise ModelFileError(
                path, f"header length {n} is larger than the rest of the file "
                      f"({size - 8} bytes): truncated or not safetensors")
        raw = f.read(n)
    if len(raw) != n:
        raise ModelFileError(path, "file shrank while reading its header")
    if not raw.startswith(b"{"):
        raise ModelFileError(path, "header is not a JSON object (must start with '{')")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(path, f"header is not valid UTF-8: {e}") from None
    doc = parse_json(text, path)
    if not isinstance(doc, dict):
        raise ModelFileError(path, "header is not a JSON object")

    data_size = size - 8 - n
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if name == "__metadata__":
            if entry is None:  # what MLX writes when there is no metadata
                continue
            if not (isinstance(entry, dict)
                    and all(is_text(k) and is_text(v) for k, v in entry.items())):
                raise ModelFileError(path, "__metadata__ must map strings to strings")
            metadata = entry
        else:
            tensors[name] = _tensor_info(path, name, entry, data_size)
    _check_tiling(path, tensors, data_size)
    return Header(tensors, metadata, 8 + n)


def _tensor_info(path, name, entry, data_size: int) -> TensorInfo:
    def bad(problem):
        return ModelFileError(path, f"tensor {name!r}: {problem}")

    if not is_text(name):
        raise bad("name is not valid Unicode")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad("entry must be an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"unknown or unsupported dtype {dtype!r:.40}")
    if not isinstance(shape, list) or not all(is_integer(d) for d in shape):
        raise bad(f"shape must be a list of integers, got {shape!r:.80}")
    for d in shape:
        if not 0 <= d <= MAX_DIM:
            raise bad(f"shape dimension {d} is negative or above MLX's limit {MAX_DIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(is_integer(o) for o in offsets)):
        raise bad(f"data_offsets must be two integers, got {offsets!r:.80}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets [{begin}, {end}] are negative or reversed")
    if end > data_size:
        raise bad(f"data_offsets [{begin}, {end}] run past the end of the file "
                  f"(data area is {data_size} bytes): truncated?")
    # Python ints: a hostile [2**62, 2**62] cannot overflow into a small number.
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise bad(f"shape {shape!r:.80} of {dtype} needs {expected} bytes but "
                  f"data_offsets [{begin}, {end}] hold {end - begin}")
    return TensorInfo(dtype, tuple(shape), begin, end)


def _check_tiling(path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    # Sorted by offsets the tensors must cover the data area exactly: overlaps
    # let one byte mean two things, gaps and tails hide unchecked bytes.
    pos, prev = 0, None
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin < pos:
            raise ModelFileError(path, f"tensor {name!r} overlaps tensor {prev!r}")
        if info.begin > pos:
            raise ModelFileError(
                path, f"gap of {info.begin - pos} unused bytes before tensor {name!r}")
        pos, prev = info.end, name
    if pos != data_size:
        raise ModelFileError(
            path, f"{data_size - pos} trailing bytes after the last tensor")


def load_file_with_metadata(path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Validate `path`, then load it with MLX (lazily: data is read on use)."""
    header = read_header(path)
    for name, info in header.tensors.items():
        if info.dtype in UNLOADABLE:
            raise ModelFileError(
                path, f"tensor {name!r} is {info.dtype}: {UNLOADABLE[info.dtype]}")
    try:
        # format= explicitly: MLX otherwise picks the parser from the extension.
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:
        raise ModelFileError(path, f"MLX could not load it: {e}") from e
    # Cheap guard against the two JSON parsers reading the header differently.
    for name, info in header.tensors.items():
        a = arrays.get(name)
        if a is None or tuple(a.shape) != info.shape or a.dtype != MLX_DTYPES[info.dtype]:
            raise ModelFileError(path, f"tensor {name!r}: MLX read a different header")
    if len(arrays) != len(header.tensors):
        raise ModelFileError(path, "MLX read a different header")
    return arrays, metadata


def load_file(path) -> dict[str, mx.array]:
    return load_file_with_metadata(path)[0]


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

def save_file(path, arrays: Mapping[str, mx.array],
              metadata: dict[str, str] | None = None) -> None:
    """Atomically write `arrays` to the safetensors file `path`."""
    try:
        with atomic_path(path) as tmp:
            # A file object, not a name: given a name MLX appends
            # ".safetensors" to it, and it reports write errors (ENOSPC) as
            # OSError through Python's file instead of a bare RuntimeError.
            with open(tmp, "wb") as f:
                mx.save_safetensors(f, dict(arrays), metadata)
            # Never publish a file our own reader would refuse.
            written = read_header(tmp).tensors
            if {k: v.shape for k, v in written.items()} != \
                    {k: tuple(a.shape) for k, a in arrays.items()}:
                raise ModelFileError(tmp, "written file does not match the arrays")
    except ModelFileError as e:
        if e.path == os.fspath(Path(path)):
            raise
        raise ModelFileError(path, f"could not save: {e}") from e
    except Exception as e:
        raise ModelFileError(path, f"could not save: {e}") from e


def save_sharded(folder, arrays: Mapping[str, mx.array],
                 max_shard_bytes: int = 5 * 2**30,
                 metadata: dict[str, str] | None = None,
                 progress=None) -> list[Path]:
    """Write `arrays` as a Hugging Face style model folder: `model.safetensors`
    if the tensors fit in one shard, else `model-0000i-of-0000N.safetensors`
    plus `model.safetensors.index.json`.  Tensors go in name order, so the
    same weights always give the same files.  Returns the files written.
    `progress(done, total, file_name)` is called after each weights file.

    Weight files from an earlier save that the loader could pick up instead
    (a stale index, `model.safetensors`, old shards) are removed."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelFileError(folder, f"cannot create folder: {e}") from e

    shards = _plan_shards(arrays, max_shard_bytes)
    # Drop the old index first: until the new files are all written, the
    # loader then sees plain files rather than an index naming a mix.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / INDEX_NAME)
    if len(shards) <= 1:
        path = folder / SINGLE_NAME
        save_file(path, {k: arrays[k] for k in (shards[0] if shards else [])}, metadata)
        if progress is not None:
            progress(1, 1, path.name)
        written = [path]
    else:
        written = _write_shards(folder, arrays, shards, metadata, progress)
    _remove_stale_weights(folder, written)
    return written


def _plan_shards(arrays: Mapping[str, mx.array], max_shard_bytes: int) -> list[list[str]]:
    """The tensor names of each shard, in name order, each shard at most `max_shard_bytes`."""
    shards: list[list[str]] = []
    size = 0
    for name in sorted(arrays):
        n = arrays[name].nbytes
        if shards and size + n <= max_shard_bytes:
            shards[-1].append(name)
            size += n
        else:  # a tensor bigger than the limit gets a shard of its own
            shards.append([name])
            size = n
    return shards


def _write_shards(folder: Path, arrays: Mapping[str, mx.array], shards: list[list[str]],
                  metadata: dict[str, str] | None, progress) -> list[Path]:
    """The numbered shard files, then the index naming them; returns the files written."""
    written: list[Path] = []
    weight_map = {}
    for i, names in enumerate(shards, 1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(path, {k: arrays[k] for k in names}, metadata)
        weight_map.update(dict.fromkeys(names, path.name))
        written.append(path)
        if progress is not None:
            progress(i, len(shards), path.name)
    index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
             "weight_map": weight_map}
    atomic_write_bytes(folder / INDEX_NAME,
                       (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    written.append(folder / INDEX_NAME)
    return written


def _remove_stale_weights(folder: Path, written: list[Path]) -> None:
    """Delete weight files of an earlier save that the loader could pick up instead of `written`."""
    for name in os.listdir(folder):
        if (name == SINGLE_NAME or _SHARD_RE.fullmatch(name)) and folder / name not in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
