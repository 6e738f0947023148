"""A model folder's weights: `model.safetensors`, an index and its shards, or loose files.

The index (`model.safetensors.index.json`) is untrusted JSON like the headers:
its shard names are file names a stranger chose, so each must be a plain name
whose target (through symlinks) stays inside the folder, and every shard's
header must list exactly the tensors the index maps to it before any data is
loaded.  Pickle checkpoints are refused by name, never opened.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from .errors import ModelFileError, UnsafeCheckpointError
from .tensorfile import (
    INDEX_NAME,
    MAX_INDEX_BYTES,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    is_text,
    open_regular,
    parse_json,
    load_file,
    read_header,
)



def _allowed_roots(folder: Path) -> list[Path]:
    """Where a weight file in `folder` may really live.  The folder itself;
    and for a Hugging Face cache snapshot (`.../snapshots/<rev>/`) its blob
    store `../../blobs`, since every file there is a symlink into it."""
    real = folder.resolve()
    roots = [real]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    elif real.parent.name == "snapshots":
        roots.append((real.parent.parent / "blobs").resolve())
    return roots


def _weight_file(folder: Path, name, source) -> Path:
    """`folder/name` after checking `name` is a plain file name whose target
    (through any symlinks) stays inside the folder.  `source` is the file to
    blame in messages (the index, or the folder)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name
            or "\\" in name or "\0" in name or os.path.isabs(name)
            or os.path.basename(name) != name):
        raise ModelFileError(source, f"shard name {name!r} is not a plain file name "
                                     "inside the model folder")
    path = folder / name
    try:
        real = path.resolve()
        exists = path.exists()
    # A name over the file system's limit (ENAMETOOLONG), or a symlink loop (RuntimeError
    # from resolve() before Python 3.13).
    except (OSError, RuntimeError) as e:
        raise ModelFileError(source, f"shard name {name!r:.80} cannot be opened: "
                                     f"{getattr(e, 'strerror', None) or e}") from None
    if not any(real.is_relative_to(root) for root in _allowed_roots(folder)):
        raise ModelFileError(path, f"is a symlink pointing outside the model folder "
                                   f"(to {real})")
    if not exists:
        raise ModelFileError(path, f"file not found (named by {Path(source).name})")
    return path


def _read_index(index_path: Path) -> dict[str, str]:
    f, size = open_regular(index_path)
    with f:
        if size > MAX_INDEX_BYTES:
            raise ModelFileError(index_path, f"index is {size} bytes, over the "
                                             f"{MAX_INDEX_BYTES}-byte limit")
        raw = f.read(MAX_INDEX_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(index_path, f"not valid UTF-8: {e}") from None
    doc = parse_json(text, index_path)
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise ModelFileError(index_path, 'must be a JSON object with a "weight_map" object')
    weight_map = doc["weight_map"]
    for tensor, shard in weight_map.items():
        if not (is_text(tensor) and is_text(shard)):
            raise ModelFileError(index_path, f"weight_map entry {tensor!r} must map "
                                             "a tensor name to a file name")
    if not weight_map:
        raise ModelFileError(index_path, "weight_map is empty")
    return weight_map


def _load_indexed(folder: Path, index_path: Path, wanted=None) -> dict[str, mx.array]:
    weight_map = _read_index(index_path)
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(tensor)
    if wanted is not None:  # only the shards holding a wanted tensor are opened (a pipeline rank's share)
        by_shard = {shard: names for shard, names in by_shard.items() if any(map(wanted, names))}
    # Check every shard's header against the index before loading anything.
    paths = {}
    for shard, expected in sorted(by_shard.items()):
        path = paths[shard] = _weight_file(folder, shard, index_path)
        present = set(read_header(path).tensors)
        missing, extra = sorted(expected - present), sorted(present - expected)
        if missing:
            raise ModelFileError(path, f"tensor {missing[0]!r} is listed in "
                                       f"{INDEX_NAME} but missing from this shard")
        if extra:
            tensor = extra[0]
            where = weight_map.get(tensor)
            raise ModelFileError(
                path, f"tensor {tensor!r} is in this shard but {INDEX_NAME} "
                      + (f"maps it to {where!r}" if where else "does not list it"))
    weights: dict[str, mx.array] = {}
    for shard in sorted(paths):
        weights.update(load_file(paths[shard]))
    return weights


def load_weights_from_folder(folder, wanted=None) -> dict[str, mx.array]:
    """All tensors of a model folder: `model.safetensors`, or
    `model.safetensors.index.json` + its shards, or every `*.safetensors`.

    `wanted(tensor_name) -> bool`, when given, limits which shards of an index are opened to
    those holding a wanted tensor (they come whole, lazily: only what is used is read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(folder, "model folder not found (or not a folder)")
    if (folder / INDEX_NAME).exists():
        return _load_indexed(folder, _weight_file(folder, INDEX_NAME, folder), wanted)
    if (folder / SINGLE_NAME).exists():
        return load_file(_weight_file(folder, SINGLE_NAME, folder))

    names = sorted(os.listdir(folder))
    # Skip dot files: macOS leaves `._model.safetensors` resource forks on
    # foreign disks, and our own temp files start with a dot too.
    loose = [n for n in names if n.endswith(".safetensors") and not n.startswith(".")]
    if loose:
        weights: dict[str, mx.array] = {}
        origin: dict[str, str] = {}
        paths = [_weight_file(folder, n, folder) for n in loose]
        for path in paths:  # headers first: refuse duplicates before loading
            for tensor in read_header(path).tensors:
                if tensor in origin:
                    raise ModelFileError(path, f"tensor {tensor!r} is also in "
                                               f"{origin[tensor]} (no index to say which)")
                origin[tensor] = path.name
        for path in paths:
            weights.update(load_file(path))
        return weights

    # Only names are looked at: a pickle is never opened, let alone unpickled.
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UnsafeCheckpointError(
            folder, f"only pickle checkpoints found ({', '.join(pickles[:5])}); "
                    "loading a pickle can run arbitrary code, so mlx_gemma refuses. "
                    "Convert them to safetensors (e.g. with the Hugging Face "
                    "`safetensors` convert tool, in a sandbox) or download the "
                    "safetensors version of the model")
    raise ModelFileError(folder, "no model weights found (expected model.safetensors, "
                                 f"{INDEX_NAME} + shards, or *.safetensors files)")


def weight_files(folder) -> dict[str, Path]:
    """Tensor name -> the file holding it, from the index or the files' headers (no data read)."""
    folder = Path(folder)
    if (folder / INDEX_NAME).exists():
        index = _weight_file(folder, INDEX_NAME, folder)
        return {name: _weight_file(folder, shard, index) for name, shard in _read_index(index).items()}
    if (folder / SINGLE_NAME).exists():
        names = [SINGLE_NAME]
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") and not n.startswith("."))
    out = {}
    for name in names:
        path = _weight_file(folder, name, folder)
        out.update(dict.fromkeys(read_header(path).tensors, path))
    return out
