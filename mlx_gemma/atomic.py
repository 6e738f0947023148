"""Atomic file writes: readers see the old file or the new one, never half of one.

`atomic_path(path)` yields a temporary name beside `path`; what is written there
is fsynced and renamed onto `path` when the block ends, or removed when it
fails.  Model folders (convert/writer.py), safetensors files (tensorfile.py),
adapters, prompt caches and drawn images all go through it.

A write killed outright (SIGKILL, power loss) cannot remove its temporary; its name carries
the writer's process id, so the next write beside it sees that the process is gone and
removes it (`remove_stale_temporaries`).

`fault_point(name)` marks the moments of a write where a crash test kills the
process (a test seam; see there).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
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


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path`, `.<name>.tmp-<pid>-<random>`, naming the writing process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries (files or folders) that killed writes of `path` left beside it.

    Only those whose writer process is gone: a live writer's temporary is never touched.  On a
    shared network folder a process id says nothing about other machines' writers, and on
    Windows there is no harmless way to ask about a process, so nothing is swept there.
    """
    if os.name != "posix":
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)-[0-9a-f]{{8}}")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        stale = path.parent / name
        with contextlib.suppress(OSError):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                os.unlink(stale)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only (POSIX)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, under another user
        return True
    return True


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; write the file there.  On
    success it is fsynced and renamed onto `path` (readers see the old file
    or the new one, never half of one); on failure it is removed.  OSErrors
    (a full disk, a missing folder) come out as `ModelFileError(path)`."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path)
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
