"""A job's media as rank 0 sends them to the followers when serving across ranks (issue 23):
`Job.media` is engine.prefill's `**inputs` (pixels, Gemma 4's patch positions, audio features and
their masks), and job_messages.py puts each array here in the job's payload, exactly (dtype, shape,
raw bytes: bfloat16 as its 16-bit words), as a binary tail after the payload's JSON.

What a follower needs depends on the strategy:
- tensor parallel: every rank runs the towers, so every array goes whole;
- pipeline: only rank 0 reads the towers' inputs (pipeline.MEDIA_INPUTS: its later ranks' `Front`
  drops them, and every mask a later stage makes comes from the ids: Gemma 3's and Gemma 4's image
  blocks from the soft tokens, PaliGemma's prefix from the prompt's length).  Such an input goes as a
  stand-in, [items, 32] uint8: each item's sha256 over the float32 bytes that rank 0's prefix cache
  names the item by (image_chat.image_digests, gemma4_prompts.Gemma4Media.digests).  The follower's
  scheduler names the stand-ins by the same functions, so its names are equal exactly where rank 0's
  are (up to a sha256 collision): the same prefix-cache hits on every rank, at 32 bytes an item rather
  than megabytes of pixels.  The stand-ins keep the inputs' names and item counts, so the follower's
  scheduler takes the same branches (a prompt with media goes whole) and picks the same items past a
  reused prefix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from ..errors import DistributedError
from .pipeline import MEDIA_INPUTS

# The dtypes sent, by name; bfloat16 travels as its uint16 words (numpy has no bfloat16).
DTYPES = {name: getattr(mx, name) for name in (
    "bool_", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32")}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# A payload's JSON never holds a raw NUL (json.dumps escapes control characters): the arrays' bytes follow one.
SEPARATOR = b"\0"
# A message states its payload's length in an int32 (messages.py); the JSON is far below this margin.
MAX_BYTES = 2**31 - 2**24


def refusal(media) -> str | None:
    """Why a job's media cannot be sent (the start of a 400's message, "... is not served across ranks"), or None."""
    if not media:
        return None
    if not isinstance(media, Mapping):
        return "a Job.media that is not a mapping of the model's prompt inputs"
    for key, value in media.items():
        if not isinstance(key, str) or not isinstance(value, mx.array):
            return f"a prompt input that is not an mx.array (Job.media[{key!r:.40}])"
        if value.dtype not in _NAMES:
            return f"a prompt input of dtype {value.dtype} (Job.media[{key!r:.40}])"
        if value.ndim == 0:
            return f"a prompt input with no item axis (Job.media[{key!r:.40}] is a scalar)"
    total = sum(value.nbytes for value in media.values())
    if total > MAX_BYTES:
        return f"prompt inputs of {total} bytes (a message carries {MAX_BYTES} at most)"
    return None


def stand_ins(model) -> bool:
    """Whether `model` (rank 0's) is a pipeline's first stage, whose followers read no tower input."""
    share = None if model is None else model.share  # (the model contract: models/base.py)
    return share is not None and share.strategy == "pipeline" and share.size > 1


def encode(media, stand_in: bool = False) -> tuple[list | None, bytes]:
    """(each array described for the JSON, their bytes one after another); (None, b"") without media.
    With `stand_in`, the tower inputs go as their items' names (the module's docstring)."""
    if not media:
        return None, b""
    described, blobs = [], []
    for key, value in media.items():
        sent = item_names(value) if stand_in and key in MEDIA_INPUTS else value
        raw = _host(sent).tobytes()
        described.append({"name": key, "dtype": _NAMES[sent.dtype], "shape": list(sent.shape), "bytes": len(raw),
                          "stand_in": sent is not value})
        blobs.append(raw)
    return described, b"".join(blobs)


def decode(described, blob: bytes) -> dict | None:
    """The arrays `encode` described, from `blob` (a DistributedError when they do not fit it)."""
    if described is None:
        if blob:
            raise DistributedError(f"a job's payload holds {len(blob)} bytes of arrays but describes none")
        return None
    media, at = {}, 0
    for d in described:
        try:
            name, dtype, shape, n = d["name"], DTYPES[d["dtype"]], tuple(int(s) for s in d["shape"]), int(d["bytes"])
        except (KeyError, TypeError, ValueError):
            raise DistributedError(f"a job's payload describes an array as {str(d)[:120]}") from None
        host = _host_dtype(dtype)
        if n != host.itemsize * int(np.prod(shape)) or at + n > len(blob):
            raise DistributedError(f"a job's payload: {name} ({d['dtype']}, shape {list(shape)}) does not fit "
                                   f"its {n} bytes at {at} of {len(blob)}")
        array = mx.array(np.frombuffer(blob, host, int(np.prod(shape)), at).reshape(shape))
        media[name] = array.view(dtype) if dtype == mx.bfloat16 else array
        at += n
    if at != len(blob):
        raise DistributedError(f"a job's payload holds {len(blob) - at} bytes past its arrays")
    return media


def item_names(array: mx.array) -> mx.array:
    """[items, 32] uint8: the sha256 of each item's float32 bytes (what rank 0's prefix cache hashes)."""
    items = np.array(array.astype(mx.float32))
    return mx.array(np.array([np.frombuffer(hashlib.sha256(item.tobytes()).digest(), np.uint8) for item in items],
                             np.uint8).reshape(len(items), 32))


def frame(text: bytes, blob: bytes) -> bytes:
    """A payload: the JSON, then (when there are arrays) the separator and their bytes."""
    return text + SEPARATOR + blob if blob else text


def unframe(payload: bytes) -> tuple[bytes, bytes]:
    """(the JSON, the arrays' bytes) of a payload `frame` made."""
    text, _, blob = payload.partition(SEPARATOR)
    return text, blob


def _host(array: mx.array) -> np.ndarray:
    """The array's bytes in C order as numpy holds them (bfloat16 as its uint16 words)."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.ascontiguousarray(np.array(array))


def _host_dtype(dtype) -> np.dtype:
    return np.dtype(np.uint16) if dtype == mx.bfloat16 else np.dtype(_NAMES[dtype].rstrip("_"))
