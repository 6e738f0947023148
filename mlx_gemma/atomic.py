"""Atomic file writes: readers see the old file or the new one, never half of one.

`atomic_path(path)` yields a temporary name beside `path`; what is written there
is fsynced and renamed onto `path` when the block ends, or removed when it
fails.  Model folders (convert/writer.py), safetensors files (tensorfile.py),
adapters, prompt caches and drawn images all go through it.

`fault_point(name)` marks the moments of a write where a crash test kills the
process (a test seam; see there).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
from pathlib import Path
from typing import Iterator

from .errors import ModelFileError


FAULT_ENV = "MLX_GEMMA_FAULT_AT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test seam: a named moment of a write at which a crash test can kill the process.

    With `MLX_GEMMA_FAULT_AT=<name>` (or `<name>#<k>`: the k-th time the point is
    reached) the process SIGKILLs itself here: no cleanup handler, `finally` or
    atexit runs, as when the machine loses power or the OOM killer strikes.
    Killing after a fixed delay instead only finds the write window when the
    machine happens to be as fast as the test's author's.  Unset, as outside
    crash tests, this is one environment lookup.

    Points: `atomic.before-temp`, `atomic.written` (the temporary file holds the
    data, not yet fsynced), `atomic.before-rename`, `atomic.after-rename`;
    convert/writer.py adds `writer.*` points for model folders.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    hits = _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if hits == (int(nth) if nth.isdigit() else 1):
        if hasattr(signal, "SIGKILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)  # no SIGKILL (Windows): the closest thing


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
    fault_point("atomic.before-temp")
    try:
        # O_EXCL: never follow or clobber something already there.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        fault_point("atomic.written")
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fault_point("atomic.before-rename")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ModelFileError(path, f"could not write: {e}") from e
        raise
    fsync_dir(path.parent)
    fault_point("atomic.after-rename")


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
