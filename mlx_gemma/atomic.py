"""Atomic file writes: readers see the old file or the new one, never half of one.

`atomic_path(path)` yields a temporary name beside `path`; what is written there
is fsynced and renamed onto `path` when the block ends, or removed when it
fails.  Model folders (convert/writer.py), safetensors files (tensorfile.py),
adapters, prompt caches and drawn images all go through it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Iterator

from .errors import ModelFileError


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable.  Some filesystems cannot fsync a
    # directory; the data is already in place, so that is not an error.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; write the file there.  On
    success it is fsynced and renamed onto `path` (readers see the old file
    or the new one, never half of one); on failure it is removed.  OSErrors
    (a full disk, a missing folder) come out as `ModelFileError(path)`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    try:
        # O_EXCL: never follow or clobber something already there.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ModelFileError(path, f"could not write: {e}") from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
