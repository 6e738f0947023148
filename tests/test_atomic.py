"""mlx_gemma.atomic: a write killed outright leaves a temporary that the next write removes."""

import os
import signal
import subprocess
import sys

import pytest

from mlx_gemma.atomic import atomic_write_bytes, remove_stale_temporaries, temporary_sibling

_WRITE = "import sys; from mlx_gemma.atomic import atomic_write_bytes; atomic_write_bytes(sys.argv[1], b'new')"

posix_only = pytest.mark.skipif(os.name != "posix", reason="stale temporaries are swept on POSIX only (see atomic.py)")


def _killed_write(path, point):
    run = subprocess.run([sys.executable, "-c", _WRITE, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MLX_GEMMA_FAULT_AT": point})
    assert run.returncode == -signal.SIGKILL, run.stderr


@posix_only
@pytest.mark.parametrize("point", ["atomic.written", "atomic.before-rename"])
def test_next_write_removes_what_a_killed_write_left(tmp_path, point):
    path = tmp_path / "adapters.safetensors"
    path.write_bytes(b"old")
    _killed_write(path, point)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0].startswith(".adapters.safetensors.tmp-") and path.read_bytes() == b"old"

    atomic_write_bytes(path, b"newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.safetensors"]
    assert path.read_bytes() == b"newer"


@posix_only
def test_a_live_writers_temporary_and_other_files_are_kept(tmp_path):
    path = tmp_path / "model.safetensors"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = path.with_name(f".model.safetensors.tmp-{sleeper.pid}-0123abcd")
        mine = temporary_sibling(path)
        others = [tmp_path / ".other.safetensors.tmp-999999999-0123abcd",  # another file's
                  tmp_path / ".model.safetensors.tmp-0123abcdef01",          # not our pattern
                  tmp_path / ".model.safetensors.old-0123abcd"]              # a moved-aside old folder
        for p in [live, mine, *others]:
            p.write_bytes(b"x")
        dead = path.with_name(".model.safetensors.tmp-999999999-0123abcd")  # beyond any pid_max
        dead.mkdir()
        (dead / "shard").write_bytes(b"x")

        remove_stale_temporaries(path)
        assert sorted(tmp_path.iterdir()) == sorted([live, mine, *others])
    finally:
        sleeper.kill()
        sleeper.wait()
