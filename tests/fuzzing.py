"""Shared pieces of the fuzz tests: the per-profile example budget and the typed-error check.

Every parser of untrusted input has a property test that feeds it mutated files.  The
promise under test is always the same: the input is accepted, or it is refused with one of
our typed errors (`mlx_gemma.errors`) whose message names the file; any other exception
(a bare TypeError, KeyError, IndexError, a crash in a C library) is a defect.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from hypothesis import settings
from hypothesis import strategies as st

from mlx_gemma.errors import MlxGemmaError


def fuzz_settings(ci_examples: int = 100, **kwargs) -> settings:
    """`@settings` for a fuzz test: `ci_examples` fixed examples in the default ("ci") profile,
    the profile's budget (5,000) in the long campaign (MLX_GEMMA_FUZZ=long)."""
    if settings.get_current_profile_name() == "ci":
        return settings(max_examples=ci_examples, **kwargs)
    return settings(max_examples=settings.default.max_examples, **kwargs)


@contextmanager
def refused_cleanly(*names: str | os.PathLike, error: type[MlxGemmaError] = MlxGemmaError):
    """Lets the block succeed, or fail with `error` whose message names one of `names`.

    Any other exception propagates and fails the test.
    """
    try:
        yield
    except error as e:
        if names:
            message = str(e)
            assert any(os.fspath(n) in message for n in names), f"the error does not name the input: {e}"


BYTE_DAMAGE = ("flip", "truncate", "insert")


def damaged(draw, data: bytes, kind: str, max_insert: int = 12) -> bytes:
    """`data` with one kind of byte damage (BYTE_DAMAGE): 1-4 flipped bytes, a truncation,
    or 1..max_insert random bytes inserted; `draw` is a composite strategy's."""
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    i = draw(st.integers(0, len(data)))
    return data[:i] + draw(st.binary(min_size=1, max_size=max_insert)) + data[i:]
