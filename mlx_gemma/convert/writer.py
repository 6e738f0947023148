"""Write a model folder (the mlx-community layout) atomically.

`write_model_folder(dest, config, weights, tokenizer_model, generation_config)`
produces::

    dest/
      config.json                   sorted keys, indent 4
      model.safetensors             or model-0000k-of-0000n.safetensors shards
      model.safetensors.index.json  (only when sharded; the HF index layout)
      tokenizer.model               (when given)
      generation_config.json        (when given)
      ...extra_files

Everything is written into a temporary folder beside `dest`
(`.<name>.tmp-<pid>-XXXX`), flushed to disk, and only then renamed into place, so a
reader never sees a half-written model and a crash leaves `dest` untouched (the next
write of `dest` removes what a killed one left, see atomic.remove_stale_temporaries).  An
existing `dest` is refused unless `overwrite=True`; then the new folder and the
old one swap names in one atomic step where the OS has one (Linux
`renameat2(RENAME_EXCHANGE)`, macOS `renamex_np(RENAME_SWAP)`), so a crash
leaves either the old folder or the new one at `dest`; elsewhere the old one is
moved aside first.  The old folder is then deleted.  On any error the temporary
folder is removed.  `atomic.fault_point` marks the moments crash tests kill the
writer at (`writer.before-temp-folder`, `writer.shard-written[#k]`,
`writer.before-rename`, `writer.after-rename`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import sys
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import mlx.core as mx
import numpy as np

from ..atomic import fault_point, fsync_dir, remove_stale_temporaries, temporary_sibling

from ..errors import ModelFileError
from ..tensorfile import save_sharded

__all__ = ["write_model_folder", "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 5 << 30  # 5 GiB, as mlx-lm

_RESERVED = {
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "generation_config.json",
}


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=4, sort_keys=True, allow_nan=False, default=_json_default) + "\n").encode("utf-8")



def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _is_within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _to_mx(name: str, value):
    if isinstance(value, mx.array):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        return mx.array(value)
    raise TypeError(f"weight {name!r} is a {type(value).__name__}, expected mx.array or numpy.ndarray")



def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_weights(tmp: str, weights: Mapping, max_shard_bytes: int, progress) -> list[str]:
    def shard_written(done: int, total: int, name: str) -> None:
        fault_point("writer.shard-written")
        if progress is not None:
            progress(done, total, name)

    arrays = {}
    for name, value in weights.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"weight names must be non-empty strings, got {name!r}")
        arrays[name] = _to_mx(name, value)
    files = save_sharded(tmp, arrays, max_shard_bytes, metadata={"format": "mlx"}, progress=shard_written)
    return [f.name for f in files]


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)  # the symbols already loaded, libc's among them
    except OSError:
        return None


def _exchange(a: str, b: str) -> bool:
    """Swap the names of folders `a` and `b` atomically; False where the OS or the
    filesystem cannot (the caller then renames twice)."""
    libc = _libc()
    if sys.platform.startswith("linux"):
        fn = getattr(libc, "renameat2", None)  # glibc 2.28+
        call = None if fn is None else (lambda: fn(-100, a.encode(), -100, b.encode(), 2))  # AT_FDCWD, RENAME_EXCHANGE
    elif sys.platform == "darwin":
        fn = getattr(libc, "renamex_np", None)
        call = None if fn is None else (lambda: fn(a.encode(), b.encode(), 2))  # RENAME_SWAP
    else:
        call = None
    if call is None:
        return False
    if call() == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def _make_temp_dir(parent: Path, name: str) -> str:
    """`.<name>.tmp-<pid>-XXXXXXXX` beside dest, created with the umask's permissions
    (tempfile.mkdtemp would make it 0700, and the rename would keep that)."""
    remove_stale_temporaries(parent / name)
    for _ in range(100):
        tmp = str(temporary_sibling(parent / name))
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise ModelFileError(str(parent), f"cannot create a temporary folder: {e}") from None
    raise ModelFileError(str(parent), "cannot find a free temporary folder name")


def _check_extra_name(dest: str, name: str) -> None:
    """A plain file name, or one folder and a plain name (a sentence-transformers module's
    `1_Pooling/config.json`); never a reserved name of the folder's own files."""
    parts = name.split("/") if isinstance(name, str) else [None]
    if len(parts) > 2 or not all(_plain_name(p) for p in parts) or parts[0] in _RESERVED \
            or parts[0].startswith("model-"):
        raise ModelFileError(
            dest, f"extra file name {name!r} is not allowed (plain file names only, no reserved names)"
        )


def _plain_name(part) -> bool:
    return isinstance(part, str) and part not in ("", ".", "..") and not any(c in part for c in "/\\\x00")


def write_model_folder(
    dest,
    config: dict,
    weights: Mapping[str, Any],
    tokenizer_model: bytes | str | os.PathLike | None = None,
    generation_config: dict | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, bytes | str | os.PathLike] | None = None,
    *,
    source: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    max_shard_bytes: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write a complete model folder at `dest`, atomically.  Returns `dest` as a Path.

    `tokenizer_model` is the tokenizer.model bytes or a path to copy.  `extra_files`
    maps plain file names to bytes, text (`str` content) or a `Path` to copy.
    `source` (a path or several): the input checkpoint(s); `dest` may not be one of
    them or inside one, and none may lie inside `dest`.  `progress(done, total, file)`
    is called after each weights file.  `max_shard_bytes` defaults to the module's
    `DEFAULT_MAX_SHARD_BYTES`, read at each call (crash tests lower it to get shards).
    """
    dest = Path(os.path.abspath(os.fspath(dest)))
    dest_s = str(dest)
    max_shard_bytes = _check_request(dest, config, max_shard_bytes)
    _check_not_source(dest_s, source)
    _check_dest(dest_s, overwrite)
    parent = _ensure_parent(dest.parent)

    # Serialise the small files first: a bad config fails before any weight is written.
    config_bytes, gen_bytes = _serialise_configs(dest_s, config, generation_config)
    tokenizer_bytes = _read_tokenizer(tokenizer_model)
    for name in extra_files or {}:
        _check_extra_name(dest_s, name)

    fault_point("writer.before-temp-folder")
    tmp = _make_temp_dir(parent, dest.name)
    try:
        _write_bytes(os.path.join(tmp, "config.json"), config_bytes)
        try:
            _save_weights(tmp, weights, max_shard_bytes, progress)
        except TypeError as e:
            raise ModelFileError(dest_s, str(e)) from None
        if tokenizer_bytes is not None:
            _write_bytes(os.path.join(tmp, "tokenizer.model"), tokenizer_bytes)
        if gen_bytes is not None:
            _write_bytes(os.path.join(tmp, "generation_config.json"), gen_bytes)
        _write_extra_files(tmp, dest_s, extra_files or {})
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700
        fsync_dir(tmp)

        _check_dest(dest_s, overwrite)  # again: something may have appeared there meanwhile
        fault_point("writer.before-rename")
        _swap_into_place(tmp, dest_s, str(parent))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, ModelFileError):
            raise ModelFileError(dest_s, f"cannot write the model folder: {e}") from e
        raise
    return dest


def _check_request(dest: Path, config, max_shard_bytes) -> int:
    """Refuse an unusable folder name, a config that is not a dict, a shard size that is not positive;
    returns the shard size to use."""
    dest_s = str(dest)
    if not dest.name or dest.name in (".", ".."):
        raise ModelFileError(dest_s, "not a usable destination folder name")
    if not isinstance(config, dict):
        raise ModelFileError(dest_s, "config must be a dict")
    if max_shard_bytes is None:
        max_shard_bytes = DEFAULT_MAX_SHARD_BYTES
    if int(max_shard_bytes) <= 0:
        raise ModelFileError(dest_s, f"max_shard_bytes must be positive, got {max_shard_bytes}")
    return int(max_shard_bytes)


def _check_not_source(dest_s: str, source) -> None:
    """The destination must not clobber (or sit inside) the input, nor hold it."""
    if source is None:
        return
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    real_dest = os.path.realpath(dest_s)
    for s in sources:
        real_src = os.path.realpath(os.fspath(s))
        if _is_within(real_dest, real_src):
            raise ModelFileError(dest_s, f"destination is the source {os.fspath(s)!r} or inside it")
        if _is_within(real_src, real_dest):
            raise ModelFileError(dest_s, f"source {os.fspath(s)!r} lies inside the destination")


def _check_dest(dest_s: str, overwrite: bool) -> None:
    """Refuse a symlink, an existing destination without `overwrite`, or one that is not a folder."""
    if os.path.islink(dest_s):
        raise ModelFileError(dest_s, "destination is a symbolic link; refusing to replace it")
    if os.path.lexists(dest_s):
        if not overwrite:
            raise ModelFileError(dest_s, "destination already exists (pass overwrite=True to replace it)")
        if not os.path.isdir(dest_s):
            raise ModelFileError(dest_s, "destination exists and is not a folder; refusing to replace it")


def _ensure_parent(parent: Path) -> Path:
    """The folder that will hold dest, created if missing."""
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ModelFileError(str(parent), f"cannot create the parent folder: {e}") from None
    return parent


def _serialise_configs(dest_s: str, config: dict, generation_config: dict | None) -> tuple[bytes, bytes | None]:
    """config.json and generation_config.json (None when not given) as bytes."""
    try:
        config_bytes = _dump_json(config)
        gen_bytes = _dump_json(generation_config) if generation_config is not None else None
    except (TypeError, ValueError) as e:
        raise ModelFileError(dest_s, f"config is not JSON serialisable: {e}") from None
    return config_bytes, gen_bytes


def _read_tokenizer(tokenizer_model) -> bytes | None:
    """The tokenizer.model bytes: given as bytes, or read from the path given."""
    if tokenizer_model is None:
        return None
    if isinstance(tokenizer_model, (bytes, bytearray, memoryview)):
        return bytes(tokenizer_model)
    tok_path = os.fspath(tokenizer_model)
    try:
        with open(tok_path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ModelFileError(tok_path, f"cannot read the tokenizer model: {e}") from None


def _write_extra_files(tmp: str, dest_s: str, extra_files: Mapping) -> None:
    """Each extra file into the temporary folder: bytes, text (UTF-8) or a copy of a path."""
    for name, content in extra_files.items():
        target = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)  # a module's subfolder
        if isinstance(content, (bytes, bytearray, memoryview)):
            _write_bytes(target, bytes(content))
        elif isinstance(content, str):
            _write_bytes(target, content.encode("utf-8"))
        elif isinstance(content, os.PathLike):
            shutil.copyfile(os.fspath(content), target)
            _fsync_file(target)
        else:
            raise ModelFileError(dest_s, f"extra file {name!r}: unsupported content type {type(content).__name__}")


def _swap_into_place(tmp: str, dest_s: str, parent: str) -> None:
    """Rename the finished folder to dest; an old dest is swapped out atomically where the OS
    can, else moved aside first, and deleted once the new one is in place."""
    if not os.path.lexists(dest_s):
        os.rename(tmp, dest_s)
        fsync_dir(parent)
        fault_point("writer.after-rename")
        return
    if _exchange(tmp, dest_s):
        fsync_dir(parent)
        fault_point("writer.after-rename")
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    # No atomic swap here: a crash between these renames leaves the old
    # folder under the `.old-` name and none at dest.
    aside = os.path.join(parent, f".{os.path.basename(dest_s)}.old-{secrets.token_hex(4)}")
    os.rename(dest_s, aside)
    fault_point("writer.old-moved-aside")
    try:
        os.rename(tmp, dest_s)
    except BaseException:
        os.rename(aside, dest_s)  # put the old folder back
        raise
    fsync_dir(parent)
    fault_point("writer.after-rename")
    shutil.rmtree(aside, ignore_errors=True)
