"""Keras 3 weight files read as data: the variables of a preset folder, with h5py only.

`read_variables(folder, expected)` finds `model.weights.h5` (or the shards a
`model.weights.json` lists), walks each HDF5 tree by hand, checks every variable
against the expected {dataset path: shape} before any data is read, and returns
float32 numpy arrays.  Nothing from Keras is imported or executed.  The Gemma
(and PaliGemma) variable maps live in the readers that call this.

HDF5 layout (Keras 3 `saving_lib`): a layer's variables are datasets
`<path>/vars/0`, `<path>/vars/1`, ...; a functional model's layers are
`layers/<snake_case(class name)>[_k]` in layer order, sub-layers by attribute
name.  So `layers/reversible_embedding/vars/0` is the token embedding,
`layers/gemma_decoder_block[_i]/...` is decoder block i, and
`layers/rms_normalization/vars/0` the final norm (`final_normalization`).
bfloat16 variables are stored as 2-byte opaque values (`|V2`, attribute
`dtype="bfloat16"`): the top half of a float32, which is how we decode them.

Hostile input: model.weights.json (like the preset's config.json, read with
`read_json`) is size-capped JSON; shard names must be plain file names inside
the folder; the HDF5 tree is walked by hand following hard links only
(soft/external links, external or virtual datasets and filtered datasets --
which could make HDF5 load a plugin -- are refused); every variable's path,
shape and dtype is checked against the config before any data is read; h5py
errors (truncated or corrupt files) are wrapped.  Every failure is a
`ModelFileError` (or a subclass) whose message starts with the offending
file's path.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import json_input
from ..errors import ModelFileError, UnsupportedModelError, WeightsMismatchError

WEIGHTS_FILE = "model.weights.h5"
SHARDED_INDEX_FILE = "model.weights.json"
TASK_WEIGHTS_FILE = "task.weights.h5"  # a task preset's own layers (beside its backbone's model.weights.h5)
MAX_JSON_BYTES = 4 << 20  # config.json is ~1 KB; a shard index a few KB
MAX_SHARDS = 4096
_MAX_H5_DEPTH = 12
_MAX_H5_OBJECTS = 200_000

_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.weights\.h5$")


def read_json(path: str, what: str, error=ModelFileError) -> Any:
    """A preset's JSON file (size-capped, json_input.read_json), or `error` naming it."""
    if not os.path.isfile(path):
        raise error(path, f"missing: a Keras preset needs its {what}")
    return json_input.read_json(path, MAX_JSON_BYTES, error)


@dataclass
class _Var:
    file: str  # the .h5 file holding it
    name: str  # dataset path inside the file
    shape: tuple[int, ...]
    dtype: str  # "float32" / "bfloat16" / "float16" / "float64"


def _h5():
    try:  # deferred: h5py is optional (mlx_gemma[keras]), needed only for Keras presets
        import h5py
    except ImportError:
        raise ImportError(
            "reading Keras presets needs h5py: pip install h5py  (or pip install 'mlx_gemma[keras]')"
        ) from None
    return h5py


def _open_h5(path: str):
    h5py = _h5()
    if not os.path.isfile(path):
        raise ModelFileError(path, "missing weights file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head != b"\x89HDF\r\n\x1a\n":
        raise ModelFileError(path, "not an HDF5 file (bad signature)")
    try:
        return h5py.File(path, "r", locking=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelFileError(path, f"cannot open HDF5 file (truncated or corrupt): {e}") from None


def _dataset_dtype(path: str, name: str, dset) -> str:
    dt = dset.dtype
    declared = dset.attrs.get("dtype") if "dtype" in dset.attrs else None
    if isinstance(declared, bytes):
        declared = declared.decode("utf-8", "replace")
    if declared is not None and not isinstance(declared, str):
        # Compared with a string below, an array would not give one truth value.
        raise ModelFileError(path, f"variable {name!r} has a 'dtype' attribute that is not a string: "
                                   f"{type(declared).__name__} {declared!r:.60}")
    if dt.kind == "V" and dt.itemsize == 2 and dt.names is None and dt.subdtype is None:
        kind = "bfloat16"
    elif dt.kind == "u" and dt.itemsize == 2:
        kind = "bfloat16"  # raw bf16 bits written as uint16
    elif dt.kind == "f" and dt.itemsize in (2, 4, 8):
        kind = {2: "float16", 4: "float32", 8: "float64"}[dt.itemsize]
    elif dt.kind in "iu" and dt.itemsize == 1:
        raise UnsupportedModelError(
            path, f"variable {name!r} is stored as {dt} (a quantized preset): only float weights are supported"
        )
    else:
        raise ModelFileError(path, f"variable {name!r} has unsupported dtype {dt}")
    if declared is not None and declared != kind:
        raise ModelFileError(path, f"variable {name!r} is stored as {dt} but declares dtype {declared!r:.40}")
    return kind


def _walk(path: str, f, found: dict[str, _Var], skip: tuple[str, ...] = ()) -> None:
    """Collect every dataset of `f` (but the groups `skip` names, "optimizer/"), hard links only,
    checking what reading it would do."""
    h5py = _h5()
    file_size = os.path.getsize(path)
    count = 0
    stack = [("", f, 0)]
    while stack:
        prefix, group, depth = stack.pop()
        if depth > _MAX_H5_DEPTH:
            raise ModelFileError(path, f"HDF5 groups nested deeper than {_MAX_H5_DEPTH} at {prefix!r}")
        for key in group.keys():
            count += 1
            if count > _MAX_H5_OBJECTS:
                raise ModelFileError(path, f"more than {_MAX_H5_OBJECTS} HDF5 objects: not a Gemma preset")
            name = f"{prefix}{key}"
            if f"{name}/".startswith(skip):
                continue
            link = group.get(key, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise ModelFileError(path, f"{name!r} is a {type(link).__name__}: links are not followed")
            obj = group.get(key)
            if isinstance(obj, h5py.Group):
                stack.append((name + "/", obj, depth + 1))
                continue
            if not isinstance(obj, h5py.Dataset):
                raise ModelFileError(path, f"{name!r} is neither a group nor a dataset")
            if name in found:
                raise WeightsMismatchError(path, f"variable {name!r} is also in {found[name].file}")
            if obj.is_virtual:
                raise ModelFileError(path, f"variable {name!r} is a virtual dataset (refused)")
            if obj.external:
                raise ModelFileError(path, f"variable {name!r} keeps its data in external files (refused)")
            plist = obj.id.get_create_plist()
            if plist.get_nfilters():
                raise ModelFileError(path, f"variable {name!r} is compressed or filtered; Keras writes plain data")
            if obj.shape is None:
                raise ModelFileError(path, f"variable {name!r} has an empty dataspace: no shape, no data")
            shape = tuple(int(d) for d in obj.shape)
            dtype = _dataset_dtype(path, name, obj)
            nbytes = math.prod(shape) * obj.dtype.itemsize
            stored = obj.id.get_storage_size()
            if stored != nbytes or stored > file_size:
                raise ModelFileError(
                    path, f"variable {name!r} ({obj.dtype} {list(shape)}) should hold {nbytes} bytes of data "
                    f"but {stored} are stored (truncated or corrupt)"
                )
            found[name] = _Var(path, name, shape, dtype)


def _weight_files(folder: str) -> list[str]:
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]  # keras-hub prefers the single file when both exist
    index_path = os.path.join(folder, SHARDED_INDEX_FILE)
    if not os.path.exists(index_path):
        raise ModelFileError(single, f"missing: a Keras preset needs {WEIGHTS_FILE} (or {SHARDED_INDEX_FILE} + shards)")
    index = read_json(index_path, "shard index")
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise ModelFileError(index_path, "has no 'weight_map' object")
    names: set[str] = set()
    for key, v in wmap.items():
        for name in v if isinstance(v, list) else [v]:
            if not isinstance(name, str):
                raise ModelFileError(index_path, f"weight_map[{key!r}] names {name!r:.80}, not a file name")
            names.add(name)
    if len(names) > MAX_SHARDS:
        raise ModelFileError(index_path, f"lists {len(names)} shard files (at most {MAX_SHARDS})")
    files = []
    for name in sorted(names):
        if (
            not _SHARD_NAME.match(name)
            or os.path.basename(name) != name
            or name in (".", "..")
            or os.path.isabs(name)
        ):
            raise ModelFileError(
                index_path, f"shard {name!r:.120} is not a plain '*.weights.h5' file name in the preset folder"
            )
        shard = os.path.join(folder, name)
        if not os.path.isfile(shard):
            raise ModelFileError(shard, f"missing: {SHARDED_INDEX_FILE} lists this shard")
        files.append(shard)
    return files


def _decode(path: str, var: _Var, raw: np.ndarray) -> np.ndarray:
    if var.dtype == "bfloat16":
        bits = np.ascontiguousarray(raw).view("<u2") if raw.dtype.kind == "V" else raw.astype("<u2", copy=False)
        out = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        out = raw.astype(np.float32)
    out = np.ascontiguousarray(out.reshape(var.shape))
    if not np.isfinite(out).all():
        raise ModelFileError(path, f"variable {var.name!r} contains NaN or infinite values")
    return out


def read_variables(
    folder: str, expected: dict[str, tuple[int, ...]], what: str,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[dict[str, np.ndarray], set[str]]:
    """({dataset path: float32 array}, the stored dtypes) for exactly the `expected` variables.

    `what` names the model in messages ("gemma2", "PaliGemma").  Unexpected,
    missing or wrongly shaped variables are refused before any data is read.
    `progress(done, total, dataset path)` is called after each variable.
    """
    files = _weight_files(folder)
    handles: list = []
    try:
        found = _find_variables(files, handles)
        where = files[0] if len(files) == 1 else os.path.join(folder, SHARDED_INDEX_FILE)
        dtypes = _check_variables(where, found, expected, what)
        out = _read_arrays(found, expected, dict(zip(files, handles)), progress)
    finally:
        for h in handles:
            try:
                h.close()
            except Exception:  # noqa: BLE001 - closing a corrupt file must not hide the real error
                pass
    return out, dtypes


def read_task_variables(folder: str, expected: dict[str, tuple[int, ...]], what: str) -> dict[str, np.ndarray]:
    """{dataset path: float32 array} for exactly the `expected` variables of a task preset's
    `task.weights.h5` (what `Task.save_to_preset` writes: the task's own layers; the optimizer's
    variables, also saved there, are skipped)."""
    path = os.path.join(folder, TASK_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ModelFileError(path, f"missing: a {what} task preset keeps its own layers' weights there")
    handles: list = []
    try:
        found = _find_variables([path], handles, skip=("optimizer/",))
        _check_variables(path, found, expected, what)
        return _read_arrays(found, expected, {path: handles[0]}, None)
    finally:
        for h in handles:
            h.close()


def _find_variables(files: list[str], handles: list, skip: tuple[str, ...] = ()) -> dict[str, _Var]:
    """{dataset path: variable} over every weights file; each file opened is appended to `handles`."""
    found: dict[str, _Var] = {}
    for file in files:
        handles.append(_open_h5(file))
        try:
            _walk(file, handles[-1], found, skip)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            if isinstance(e, ModelFileError):
                raise
            raise ModelFileError(file, f"corrupt HDF5 structure: {e}") from None
    return found


def _check_variables(where: str, found: dict[str, _Var], expected: dict[str, tuple[int, ...]], what: str) -> set[str]:
    """Refuse unexpected, missing or wrongly shaped variables; returns the stored dtypes."""
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise WeightsMismatchError(where, f"variables with no {what} counterpart: {_first_eight(unexpected)}")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise WeightsMismatchError(where, f"missing variables: {_first_eight(missing)}")
    dtypes = set()
    for name, shape in expected.items():
        var = found[name]
        if var.shape != shape:
            raise WeightsMismatchError(
                var.file, f"variable {name!r} has shape {list(var.shape)}, expected {list(shape)} for this config"
            )
        dtypes.add(var.dtype)
    return dtypes


def _first_eight(names: list[str]) -> str:
    """The first eight names quoted, and how many more there are."""
    return ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _read_arrays(found: dict[str, _Var], expected: dict, by_file: dict, progress) -> dict[str, np.ndarray]:
    """Each expected variable's data, decoded to float32, in `expected`'s order."""
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(expected):
        var = found[name]
        try:
            raw = by_file[var.file][name][()]
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ModelFileError(var.file, f"cannot read variable {name!r} (truncated or corrupt): {e}") from None
        if tuple(raw.shape) != var.shape:
            raise ModelFileError(var.file, f"variable {name!r} read back with shape {list(raw.shape)}")
        out[name] = _decode(var.file, var, raw)
        del raw
        if progress is not None:
            progress(i + 1, len(expected), name)
    return out
