"""Tests for mlx_gemma.tensorfile: hostile safetensors files are refused with
ModelFileError naming the file; valid ones round-trip; saves are atomic."""

from __future__ import annotations

import builtins
import errno
import json
import os
import struct
import subprocess
import time

import mlx.core as mx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mlx_gemma import tensorfile as tf
from mlx_gemma.errors import ModelFileError, UnsafeCheckpointError
from mlx_gemma.model_folder import load_weights_from_folder

from fuzzing import BYTE_DAMAGE, damaged, fuzz_settings, refused_cleanly


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def raw_file(header, data: bytes = b"", length: int | None = None) -> bytes:
    """Hand-craft safetensors bytes: header is a dict (dumped as JSON) or bytes."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write(path, content: bytes):
    path.write_bytes(content)
    return path


def refused(path, match=None, exc=ModelFileError):
    with pytest.raises(exc) as info:
        tf.load_file(path)
    msg = str(info.value)
    assert path.name in msg, msg
    if match:
        assert match in msg, msg
    return msg


def sample_arrays():
    return {
        "w.bf16": mx.arange(12, dtype=mx.float32).reshape(3, 4).astype(mx.bfloat16),
        "w.f16": mx.array([[1.5, -2.0]], dtype=mx.float16),
        "w.f32": mx.array([0.25, 1e-3, -7.0], dtype=mx.float32),
        "i.i32": mx.array([1, -2, 3], dtype=mx.int32),
        "i.i64": mx.array([2**40], dtype=mx.int64),
        "i.u8": mx.array([0, 255], dtype=mx.uint8),
        "i.i8": mx.array([-128, 127], dtype=mx.int8),
        "b.bool": mx.array([True, False]),
        "empty": mx.zeros((0, 3)),
        "scalar": mx.array(3.0),
    }


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


# --------------------------------------------------------------------------
# hostile single files
# --------------------------------------------------------------------------

def test_missing_file(tmp_path):
    refused(tmp_path / "nope.safetensors", "not found")


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")  # would block forever if opened


def test_empty_file(tmp_path):
    refused(write(tmp_path / "empty.safetensors", b""), "too short")


def test_three_byte_file(tmp_path):
    refused(write(tmp_path / "three.safetensors", b"abc"), "too short")


def test_header_length_larger_than_file(tmp_path):
    p = write(tmp_path / "long.safetensors", raw_file({}, length=1000))
    refused(p, "larger than the rest of the file")


def test_header_length_2_40_does_not_allocate(tmp_path):
    p = write(tmp_path / "huge.safetensors", raw_file(b"{}", length=2**40))
    t = time.perf_counter()
    refused(p, "limit")
    assert time.perf_counter() - t < 1.0


def test_header_over_100mb_refused_before_reading(tmp_path, monkeypatch):
    # A sparse 150 MB file whose header claims 120 MB: within the file, over the cap.
    p = tmp_path / "bighead.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 120_000_000) + b"{")
        f.truncate(150_000_000)
    real_open = builtins.open

    class NoBigReads:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            assert 0 <= n <= 8, f"read({n}) of a header that should be refused"
            return self.f.read(n)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: NoBigReads(real_open(*a, **k)))
    with pytest.raises(ModelFileError, match="bighead.safetensors.*limit"):
        tf.read_header(p)


def test_non_utf8_header(tmp_path):
    refused(write(tmp_path / "latin.safetensors", raw_file(b'{"\xff": 1}')), "UTF-8")


def test_non_json_header(tmp_path):
    refused(write(tmp_path / "junk.safetensors", raw_file(b"{not json")), "JSON")


def test_json_array_header(tmp_path):
    refused(write(tmp_path / "array.safetensors", raw_file(b"[1, 2]")), "JSON object")


def test_deeply_nested_header(tmp_path):
    h = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    refused(write(tmp_path / "deep.safetensors", raw_file(h)), "JSON")


def test_duplicate_keys(tmp_path):
    h = (b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
         b'"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}')
    refused(write(tmp_path / "dup.safetensors", raw_file(h, b"ab")), "duplicate key")


def test_nan_in_header(tmp_path):
    h = b'{"t":{"dtype":"U8","shape":[NaN],"data_offsets":[0,1]}}'
    refused(write(tmp_path / "nan.safetensors", raw_file(h, b"a")), "NaN")


@pytest.mark.parametrize("meta", [["x"], {"k": 1}, {"k": None}, "text", 0])
def test_bad_metadata(tmp_path, meta):
    p = write(tmp_path / "meta.safetensors", raw_file({"__metadata__": meta}))
    refused(p, "__metadata__")


@pytest.mark.parametrize("bad", [
    [1, 2, 3],
    {"dtype": "U8", "shape": [1]},
    {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "extra": 0},
])
def test_malformed_entry(tmp_path, bad):
    p = write(tmp_path / "entry.safetensors", raw_file({"tname": bad}, b"a"))
    refused(p, "'tname'")


def test_unknown_dtype(tmp_path):
    p = write(tmp_path / "dt.safetensors", raw_file({"t": entry("Q4", [1], 0, 1)}, b"a"))
    refused(p, "unknown or unsupported dtype 'Q4'")


@pytest.mark.parametrize("shape", [[-1], [1.0], [True], ["2"], 3, [2**31]])
def test_bad_shape(tmp_path, shape):
    p = write(tmp_path / "shape.safetensors", raw_file({"t": entry("U8", shape, 0, 2)}, b"ab"))
    refused(p, "'t'")


def test_shape_overflow(tmp_path):
    # 2**62 * 2**62 wraps to 0 in 64-bit arithmetic; with Python ints it cannot.
    p = write(tmp_path / "ovf.safetensors",
              raw_file({"t": entry("U8", [2**62, 2**62], 0, 0)}))
    refused(p, "'t'")
    p = write(tmp_path / "ovf2.safetensors",
              raw_file({"t": entry("F32", [2**30, 2**30, 0], 0, 0)}))
    assert tf.read_header(p).tensors["t"].shape == (2**30, 2**30, 0)


def test_shape_offset_mismatch(tmp_path):
    p = write(tmp_path / "mis.safetensors", raw_file({"t": entry("F32", [2], 0, 4)}, b"abcd"))
    refused(p, "needs 8 bytes")


@pytest.mark.parametrize("offsets", [[1, 0], [-1, 0], [0, True], [0], "0,1", [0.0, 1]])
def test_bad_offsets(tmp_path, offsets):
    h = {"t": {"dtype": "U8", "shape": [1], "data_offsets": offsets}}
    refused(write(tmp_path / "offs.safetensors", raw_file(h, b"a")), "'t'")


def test_overlapping(tmp_path):
    h = {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}
    refused(write(tmp_path / "overlap.safetensors", raw_file(h, b"x" * 6)), "overlaps")


def test_gap(tmp_path):
    h = {"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 4, 6)}
    refused(write(tmp_path / "gap.safetensors", raw_file(h, b"x" * 6)), "gap")


def test_not_starting_at_zero(tmp_path):
    h = {"a": entry("U8", [2], 2, 4)}
    refused(write(tmp_path / "start.safetensors", raw_file(h, b"x" * 4)), "gap")


def test_out_of_file(tmp_path):
    h = {"a": entry("U8", [8], 0, 8)}
    refused(write(tmp_path / "short.safetensors", raw_file(h, b"x" * 5)), "past the end")


def test_trailing_bytes(tmp_path):
    h = {"a": entry("U8", [2], 0, 2)}
    refused(write(tmp_path / "tail.safetensors", raw_file(h, b"x" * 5)), "3 trailing bytes")


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "F64"])
def test_valid_but_unloadable_dtypes(tmp_path, dtype):
    n = tf.DTYPE_SIZES[dtype]
    p = write(tmp_path / "f8.safetensors", raw_file({"t": entry(dtype, [2], 0, 2 * n)}, b"x" * 2 * n))
    assert tf.read_header(p).tensors["t"].dtype == dtype  # a valid header...
    refused(p, f"'t' is {dtype}")                        # ...that we will not load


def test_header_padding_and_metadata(tmp_path):
    h = json.dumps({"__metadata__": {"format": "pt"}, "t": entry("U8", [2], 0, 2)}).encode()
    p = write(tmp_path / "pad.safetensors", raw_file(h + b"    ", b"ab"))
    arrays, meta = tf.load_file_with_metadata(p)
    assert meta == {"format": "pt"}
    assert arrays["t"].tolist() == [97, 98]
    header = tf.read_header(p)
    assert header.tensors["t"] == tf.TensorInfo("U8", (2,), 0, 2)
    assert header.data_start == 8 + len(h) + 4


def test_mlx_error_is_wrapped(tmp_path, monkeypatch):
    p = tmp_path / "ok.safetensors"
    tf.save_file(p, {"a": mx.zeros(2)})

    def boom(*a, **k):
        raise RuntimeError("simulated MLX failure")

    monkeypatch.setattr(mx, "load", boom)
    msg = refused(p, "simulated MLX failure")
    assert "MLX could not load" in msg


# --------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------

def test_round_trip_all_dtypes(tmp_path):
    p = tmp_path / "rt.safetensors"
    arrays = sample_arrays()
    tf.save_file(p, arrays, {"format": "mlx", "note": "héllo"})
    loaded, meta = tf.load_file_with_metadata(p)
    assert_same(arrays, loaded)
    assert meta == {"format": "mlx", "note": "héllo"}
    assert tf.read_header(p).tensors["w.bf16"].dtype == "BF16"
    # No ".safetensors" appended by MLX, no temp files left behind.
    assert os.listdir(tmp_path) == ["rt.safetensors"]


def test_save_file_any_extension(tmp_path):
    p = tmp_path / "weights.bin.tmp"
    tf.save_file(p, {"a": mx.ones(3)})
    assert os.listdir(tmp_path) == ["weights.bin.tmp"]
    assert tf.load_file(p)["a"].tolist() == [1, 1, 1]  # format is not guessed from the name


def test_sharded_round_trip(tmp_path):
    arrays = {f"layer.{i}.w": mx.full((16,), float(i)) for i in range(6)}  # 64 bytes each
    written = tf.save_sharded(tmp_path, arrays, max_shard_bytes=150, metadata={"format": "mlx"})
    names = sorted(os.listdir(tmp_path))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [tf.INDEX_NAME]
    assert [w.name for w in written] == names
    index = json.loads((tmp_path / tf.INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": 6 * 64}
    assert index["weight_map"]["layer.0.w"] == "model-00001-of-00003.safetensors"
    assert index["weight_map"]["layer.5.w"] == "model-00003-of-00003.safetensors"
    assert_same(arrays, load_weights_from_folder(tmp_path))
    assert tf.load_file_with_metadata(written[0])[1] == {"format": "mlx"}

    # Deterministic: the same weights give the same bytes.
    before = {n: (tmp_path / n).read_bytes() for n in names}
    tf.save_sharded(tmp_path, dict(reversed(list(arrays.items()))), max_shard_bytes=150,
                    metadata={"format": "mlx"})
    assert {n: (tmp_path / n).read_bytes() for n in names} == before

    # Re-saving as one file removes the stale index and shards.
    tf.save_sharded(tmp_path, arrays)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert_same(arrays, load_weights_from_folder(tmp_path))


def test_loose_files_without_index(tmp_path):
    tf.save_file(tmp_path / "a.safetensors", {"x": mx.ones(2)})
    tf.save_file(tmp_path / "b.safetensors", {"y": mx.zeros(2)})
    (tmp_path / "._a.safetensors").write_bytes(b"\0\5\26\7")  # macOS resource fork: skipped
    assert sorted(load_weights_from_folder(tmp_path)) == ["x", "y"]


def test_loose_files_duplicate_tensor(tmp_path):
    tf.save_file(tmp_path / "a.safetensors", {"x": mx.ones(2)})
    tf.save_file(tmp_path / "b.safetensors", {"x": mx.zeros(2)})
    with pytest.raises(ModelFileError, match=r"b\.safetensors.*'x' is also in a\.safetensors"):
        load_weights_from_folder(tmp_path)


def test_hf_cache_snapshot_symlinks(tmp_path):
    # snapshots/<rev>/model.safetensors -> ../../blobs/<hash>, as huggingface_hub lays out.
    blobs = tmp_path / "models--x" / "blobs"
    snap = tmp_path / "models--x" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    tf.save_file(blobs / "deadbeef", {"x": mx.ones(2)})
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    assert load_weights_from_folder(snap)["x"].tolist() == [1, 1]


# --------------------------------------------------------------------------
# hostile folders
# --------------------------------------------------------------------------

def make_index(folder, weight_map, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    (folder / tf.INDEX_NAME).write_bytes(data)


def folder_refused(folder, match, name=None, exc=ModelFileError):
    with pytest.raises(exc) as info:
        load_weights_from_folder(folder)
    msg = str(info.value)
    assert (name or folder.name) in msg, msg
    assert match in msg, msg
    return msg


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    folder_refused(tmp_path, "no model weights found")


def test_missing_folder(tmp_path):
    folder_refused(tmp_path / "absent", "not found", name="absent")


@pytest.mark.parametrize("raw", [b"{", b"[]", b'{"weight_map": []}', b'{"weight_map": {"a": 1}}',
                                 b'{"weight_map": {}}'])
def test_bad_index(tmp_path, raw):
    tf.save_file(tmp_path / "s.safetensors", {"a": mx.ones(1)})
    make_index(tmp_path, None, raw)
    folder_refused(tmp_path, "", name=tf.INDEX_NAME)


def test_index_missing_shard(tmp_path):
    make_index(tmp_path, {"a": "model-00001-of-00002.safetensors"})
    folder_refused(tmp_path, "not found", name="model-00001-of-00002.safetensors")


def test_index_parent_path(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    tf.save_file(tmp_path / "x.safetensors", {"a": mx.ones(1)})  # exists, but outside
    make_index(folder, {"a": "../x.safetensors"})
    folder_refused(folder, "not a plain file name", name=tf.INDEX_NAME)


@pytest.mark.parametrize("name", ["sub/x.safetensors", "sub\\x.safetensors", "..", ""])
def test_index_non_plain_names(tmp_path, name):
    make_index(tmp_path, {"a": name})
    folder_refused(tmp_path, "not a plain file name", name=tf.INDEX_NAME)


def test_index_absolute_path(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    target = tmp_path / "x.safetensors"
    tf.save_file(target, {"a": mx.ones(1)})
    make_index(folder, {"a": str(target)})
    folder_refused(folder, "not a plain file name", name=tf.INDEX_NAME)


def test_symlink_escaping_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    tf.save_file(tmp_path / "secret.safetensors", {"a": mx.ones(1)})
    (folder / "shard.safetensors").symlink_to(tmp_path / "secret.safetensors")
    make_index(folder, {"a": "shard.safetensors"})
    folder_refused(folder, "outside the model folder", name="shard.safetensors")
    # Same without an index: loose files are checked too.
    os.unlink(folder / tf.INDEX_NAME)
    folder_refused(folder, "outside the model folder", name="shard.safetensors")


def test_symlink_inside_folder_ok(tmp_path):
    tf.save_file(tmp_path / "real.data", {"a": mx.ones(1)})
    (tmp_path / "model.safetensors").symlink_to("real.data")
    assert load_weights_from_folder(tmp_path)["a"].tolist() == [1]


def test_index_tensor_missing_from_shard(tmp_path):
    tf.save_file(tmp_path / "s1.safetensors", {"a": mx.ones(1)})
    make_index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    folder_refused(tmp_path, "'b' is listed", name="s1.safetensors")


def test_index_tensor_in_wrong_shard(tmp_path):
    tf.save_file(tmp_path / "s1.safetensors", {"a": mx.ones(1), "b": mx.ones(1)})
    tf.save_file(tmp_path / "s2.safetensors", {"c": mx.ones(1)})
    make_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"})
    folder_refused(tmp_path, "maps it to 's2.safetensors'", name="s1.safetensors")


def test_index_tensor_unlisted(tmp_path):
    tf.save_file(tmp_path / "s1.safetensors", {"a": mx.ones(1), "z": mx.ones(1)})
    make_index(tmp_path, {"a": "s1.safetensors"})
    folder_refused(tmp_path, "does not list it", name="s1.safetensors")


def test_bad_shard_reported_by_name(tmp_path):
    write(tmp_path / "s1.safetensors", raw_file({"a": entry("U8", [1], 0, 1)}, b"ab"))
    make_index(tmp_path, {"a": "s1.safetensors"})
    folder_refused(tmp_path, "trailing bytes", name="s1.safetensors")


def test_pickle_only_folder_refused_without_opening(tmp_path, monkeypatch):
    # A FIFO blocks any open() forever, so opening it would hang the test; the
    # patched openers make that a failure instead.
    os.mkfifo(tmp_path / "pytorch_model.bin")
    (tmp_path / "training_args.pt").write_bytes(b"\x80\x04K\x01.")
    real_open, real_os_open = builtins.open, os.open

    def guard(opener):
        def wrapped(file, *a, **k):
            assert not str(file).endswith((".bin", ".pt")), f"opened pickle {file}"
            return opener(file, *a, **k)
        return wrapped

    monkeypatch.setattr(builtins, "open", guard(real_open))
    monkeypatch.setattr(os, "open", guard(real_os_open))
    msg = folder_refused(tmp_path, "pytorch_model.bin", exc=UnsafeCheckpointError)
    assert "arbitrary code" in msg and "safetensors" in msg


def test_safetensors_preferred_over_pickles(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    tf.save_file(tmp_path / "model.safetensors", {"a": mx.ones(1)})
    assert list(load_weights_from_folder(tmp_path)) == ["a"]


# --------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------

def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "model.safetensors"
    tf.save_file(p, {"old": mx.ones(2)})
    before = p.read_bytes()

    def half_write(file, arrays, metadata=None):
        file.write(b"\x10\0\0\0\0\0\0\0{partial")
        raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(mx, "save_safetensors", half_write)
    with pytest.raises(ModelFileError, match="model.safetensors.*simulated crash") as info:
        tf.save_file(p, {"new": mx.zeros(2)})
    assert isinstance(info.value.__cause__, RuntimeError)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_simulated_enospc(tmp_path, monkeypatch):
    p = tmp_path / "model.safetensors"
    tf.save_file(p, {"old": mx.ones(2)})
    before = p.read_bytes()

    def full_disk(file, arrays, metadata=None):
        file.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises(ModelFileError, match="model.safetensors") as info:
        tf.save_file(p, {"new": mx.zeros(2)})
    assert info.value.__cause__.errno == errno.ENOSPC
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 64 KiB tmpfs needs root; ENOSPC is simulated in another test")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                           capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs ({e}); ENOSPC is simulated in another test")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({r.stderr.decode().strip()}); "
                    "ENOSPC is simulated in another test")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20)


def test_real_full_disk(tiny_tmpfs):
    p = tiny_tmpfs / "model.safetensors"
    tf.save_file(p, {"old": mx.ones(16)})
    before = p.read_bytes()
    with pytest.raises(ModelFileError, match="model.safetensors") as info:
        tf.save_file(p, {"big": mx.zeros(64 * 1024)})  # 256 KiB on a 64 KiB disk
    assert getattr(info.value.__cause__, "errno", None) == errno.ENOSPC
    assert p.read_bytes() == before
    assert os.listdir(tiny_tmpfs) == ["model.safetensors"]


def test_atomic_write_bytes_and_path(tmp_path):
    p = tmp_path / "config.json"
    tf.atomic_write_bytes(p, b"{}")
    assert p.read_bytes() == b"{}"
    with pytest.raises(KeyError):
        with tf.atomic_path(p) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".config.json.tmp-")
            tmp.write_bytes(b"half")
            raise KeyError("caller bug")  # not an OSError: re-raised unchanged
    assert p.read_bytes() == b"{}"
    assert os.listdir(tmp_path) == ["config.json"]


def test_save_into_missing_folder(tmp_path):
    p = tmp_path / "no" / "such" / "model.safetensors"
    with pytest.raises(ModelFileError, match="model.safetensors"):
        tf.save_file(p, {"a": mx.ones(1)})


def test_save_bad_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    with pytest.raises(ModelFileError, match="m.safetensors"):
        tf.save_file(p, {"a": mx.ones(1)}, {"k": 1})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# fuzzing
# --------------------------------------------------------------------------

def _base_file() -> bytes:
    h = {
        "__metadata__": {"format": "mlx"},
        "a": entry("F32", [2, 2], 0, 16),
        "b": entry("BF16", [3], 16, 22),
        "c": entry("U8", [], 22, 23),
        "d": entry("I32", [0, 5], 23, 23),
        "e": entry("BOOL", [2], 23, 25),
    }
    return raw_file(h, bytes(range(25)))


BASE = _base_file()
BASE_HEADER = json.loads(BASE[8:8 + struct.unpack("<Q", BASE[:8])[0]])

json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False)
    | st.integers(-2**70, 2**70) | st.integers(-2, 40)
    | st.sampled_from(list(tf.DTYPE_SIZES) + ["C64", "F4", "", "f32"]) | st.text(max_size=4),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
    max_leaves=8,
)


@st.composite
def mutated(draw):
    data = bytearray(BASE)
    kind = draw(st.sampled_from(["flip", "truncate", "length", "splice", "append", "insert"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "length":
        n = len(BASE) - 8 - 25
        new = draw(st.integers(0, 2**64 - 1) | st.integers(n - 30, n + 30).filter(lambda x: x >= 0))
        data[:8] = struct.pack("<Q", new)
    elif kind in ("append", "insert"):
        extra = draw(st.binary(min_size=1, max_size=16))
        i = len(data) if kind == "append" else draw(st.integers(0, len(data)))
        data[i:i] = extra
    else:  # splice a new value into the header, then re-encode with a correct length
        header = json.loads(json.dumps(BASE_HEADER))
        name = draw(st.sampled_from(sorted(header)))
        if name == "__metadata__" or draw(st.booleans()):
            header[name] = draw(json_values)
        else:
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            if field == "data_offsets" and draw(st.booleans()):
                value = [draw(st.integers(-1, 30)), draw(st.integers(-1, 30))]
            elif field == "shape" and draw(st.booleans()):
                value = draw(st.lists(st.integers(-1, 6) | st.just(2**62), max_size=3))
            else:
                value = draw(json_values)
            header[name][field] = value
        data = bytearray(raw_file(header, BASE[-25:]))
    return bytes(data)


@fuzz_settings(150)
@given(blob=mutated())
def test_fuzz_load_file(tmp_path, blob):
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(blob)
    arrays = None
    with refused_cleanly(p, error=ModelFileError):
        arrays = tf.load_file(p)
    if arrays is None:
        return
    header = tf.read_header(p)
    assert sorted(arrays) == sorted(header.tensors)
    for name, info in header.tensors.items():
        assert tuple(arrays[name].shape) == info.shape
        assert arrays[name].nbytes == info.nbytes
    mx.eval(list(arrays.values()))  # the data itself must be readable


def test_null_metadata_as_mlx_writes_it(tmp_path):
    p = tmp_path / "nometa.safetensors"
    tf.save_file(p, {"a": mx.ones(1)})  # MLX writes "__metadata__": null
    assert b'"__metadata__":null' in p.read_bytes()
    assert tf.load_file_with_metadata(p)[1] == {}
    assert tf.read_header(p).metadata == {}


# The index of a sharded folder: two valid shards, and an index that is mutated as bytes
# or as JSON (any value where an object, a name or a string belongs; hostile file names).
FUZZ_SHARDS = {"s1.safetensors": {"a": [1, 2], "b": [3]}, "s2.safetensors": {"c": [4, 5, 6]}}
BASE_INDEX = {"metadata": {"total_size": 24},
              "weight_map": {t: s for s, ts in FUZZ_SHARDS.items() for t in ts}}

shard_names = (st.sampled_from(sorted(FUZZ_SHARDS) + ["", ".", "..", "../s1.safetensors", "/etc/passwd",
                                                     "s3.safetensors", "a/b", "x\\y", "nul\0l",
                                                     "s1.safetensors ", "x" * 300, "\ud800"])
               | st.text(max_size=12))


@st.composite
def mutated_index(draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "doc", "weight_map", "shard", "tensor"]))
    base = json.dumps(BASE_INDEX).encode()
    if kind in BYTE_DAMAGE:
        return damaged(draw, base, kind, max_insert=8)
    doc = json.loads(base)
    if kind == "doc":
        doc = draw(json_values)
    elif kind == "weight_map":
        doc["weight_map"] = draw(json_values)
    elif kind == "shard":
        doc["weight_map"][draw(st.sampled_from("abc"))] = draw(shard_names | json_values)
    else:  # a tensor added, dropped or renamed
        wm = doc["weight_map"]
        if draw(st.booleans()):
            del wm[draw(st.sampled_from("abc"))]
        if draw(st.booleans()):
            wm[draw(st.text(max_size=4))] = draw(shard_names)
    # ensure_ascii keeps lone surrogates encodable, as escapes the parser must judge
    return json.dumps(doc, ensure_ascii=draw(st.booleans()) or kind != "shard").encode("utf-8", "surrogatepass")


@fuzz_settings(150)
@given(blob=mutated_index())
# A shard name over the file system's 255-byte limit: resolve() raised a bare OSError.
@example(blob=json.dumps({"weight_map": {"a": "x" * 300}}).encode()).via("test_fuzz_index_long_shard_name")
def test_fuzz_index(tmp_path, blob):
    for shard, tensors in FUZZ_SHARDS.items():
        if not (tmp_path / shard).exists():
            tf.save_file(tmp_path / shard, {t: mx.array(v, dtype=mx.int32) for t, v in tensors.items()})
    index = tmp_path / tf.INDEX_NAME
    index.write_bytes(blob)
    weights = None
    # A refusal names the index, or the shard it points at (then the index by name).
    with refused_cleanly(tf.INDEX_NAME, *FUZZ_SHARDS, error=ModelFileError):
        weights = load_weights_from_folder(tmp_path)
    if weights is not None:  # exactly the tensors of the shards the index names
        named = set(json.loads(blob)["weight_map"].values())
        expected = {t: v for s in named for t, v in FUZZ_SHARDS[s].items()}
        assert {k: w.tolist() for k, w in weights.items()} == expected


def test_index_shard_symlink_loop(tmp_path):
    (tmp_path / "loop-a").symlink_to("loop-b")
    (tmp_path / "loop-b").symlink_to("loop-a")
    make_index(tmp_path, {"a": "loop-a"})
    folder_refused(tmp_path, "cannot be opened", name=tf.INDEX_NAME)
