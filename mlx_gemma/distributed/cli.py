"""What the command lines need to run across ranks (`mlx.launch ... python -m mlx_gemma.generate --pipeline`).

`add_distributed_flags` adds --pipeline / --tensor-parallel; `distributed_from(args)` gives the
keywords of `mlx_gemma.load` (group and strategy), or none, and refuses what cannot run across ranks
(a prompt-cache file) before anything is loaded, on every rank alike; `rank_console` silences every rank
but 0 once loaded; `running` arms the watchdog while the ranks generate and turns MLX's "peer lost" error
into a DistributedError; `shared_line` has rank 0 read a line (the chat's input) and every rank get it.
"""

from __future__ import annotations

import contextlib
import os

import mlx.core as mx
import numpy as np

from ..errors import DistributedError
from .watchdog import watch

MAX_LINE_BYTES = 1 << 20  # a chat message longer than this is cut by rank 0 before it is shared


def add_distributed_flags(p) -> None:
    p.add_argument("--pipeline", action="store_true",
                   help="run on the ranks mlx.launch started, each with a range of the model's layers "
                        "(only rank 0 prints)")
    p.add_argument("--tensor-parallel", action="store_true",
                   help="run on the ranks mlx.launch started, each with a share of every layer's heads, "
                        "widths and experts (only rank 0 prints)")


def distributed_from(args) -> dict:
    """`mlx_gemma.load`'s group= and strategy= for the flags (empty when neither is given)."""
    if args.pipeline and args.tensor_parallel:
        raise DistributedError("--pipeline and --tensor-parallel: choose one")
    if not (args.pipeline or args.tensor_parallel):
        return {}
    if getattr(args, "prompt_cache_file", None):  # generate's flag (cache_prompt takes neither strategy flag)
        raise DistributedError("--prompt-cache-file with --pipeline / --tensor-parallel: a prompt-cache file holds "
                               "one process's whole cache and a rank holds only its share (its layers, or its KV "
                               "heads); run without the file (docs/distributed.md)")
    return {"group": mx.distributed.init(), "strategy": "pipeline" if args.pipeline else "tensor"}


def rank_console(kw: dict, out, err):
    """(out, err) for this rank after loading: rank 0's own; the others' dropped (text, statistics and
    error lines alike: rank 0 reports, and mlx.launch names a rank that exits with an error)."""
    if kw and kw["group"].rank() > 0:
        null = open(os.devnull, "w")
        return null, null
    return out, err


@contextlib.contextmanager
def running(kw: dict, what: str):
    """While the ranks generate: the watchdog armed, and a lost peer a DistributedError."""
    if not kw:
        yield
        return
    with watch(what):
        try:
            yield
        except RuntimeError as e:  # MLX's backends: "[ring] connection to a peer was lost", ...
            raise DistributedError(f"rank {kw['group'].rank()}: another rank failed while {what}: {e}") from None


def shared_line(kw: dict, read) -> str:
    """`read()` on rank 0 (a line, "" at its end), the same line on every rank."""
    if not kw:
        return read()
    group = kw["group"]
    data = read().encode()[:MAX_LINE_BYTES] if group.rank() == 0 else b""
    n = mx.distributed.all_sum(mx.array([len(data)], mx.int32), group=group, stream=mx.cpu).item()
    buf = np.zeros(n, np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    shared = mx.distributed.all_sum(mx.array(buf.astype(np.int32)), group=group, stream=mx.cpu)
    return bytes(np.array(shared).astype(np.uint8)).decode(errors="replace")
