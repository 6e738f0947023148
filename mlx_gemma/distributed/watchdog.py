"""A watchdog for collective work: a rank whose peers fall silent exits with a clear error.

MLX's ring backend (0.32) raises "[ring] connection to a peer was lost" when a peer's process
dies and closes its sockets, but a peer that hangs (stopped, a machine that vanished without
closing its connection) leaves `recv` and `all_sum` blocked for ever, inside MLX's C++ code
where no Python exception can reach.  So while a watchdog is armed (`watch`), a thread checks
that forward passes keep coming (each pipeline stage calls `beat` when it builds one: every
prefill chunk and decode step does, and none can be built before the previous step's shared
logits arrived); after `timeout` seconds without one it prints one error line and ends the
process (os._exit: the blocked thread cannot be interrupted), with exit status 3.  The command
lines arm it while they generate; a Python caller arms it around its own loop.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

TIMEOUT_ENV = "MLX_GEMMA_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds without a forward pass: a long prompt's chunk on a big model stays well below
EXIT_STATUS = 3

_lock = threading.Lock()
_state = {"armed": 0, "last": 0.0, "what": "", "timeout": DEFAULT_TIMEOUT}
_thread: threading.Thread | None = None


def default_timeout() -> float:
    """MLX_GEMMA_DISTRIBUTED_TIMEOUT (seconds), else DEFAULT_TIMEOUT."""
    value = os.environ.get(TIMEOUT_ENV)
    try:
        timeout = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        print(f"error: {TIMEOUT_ENV} must be a positive number of seconds, got {value!r}", file=sys.stderr)
        os._exit(2)
    return timeout


def beat() -> None:
    """Record progress (cheap; a no-op while nothing is armed)."""
    _state["last"] = time.monotonic()


def _watch_loop() -> None:
    while True:
        time.sleep(0.2)
        with _lock:
            armed, last, what, timeout = _state["armed"], _state["last"], _state["what"], _state["timeout"]
        if armed and time.monotonic() - last > timeout:
            print(f"error: distributed: no progress for {timeout:g} s while {what}: another rank died or "
                  f"hangs (set {TIMEOUT_ENV} to wait longer); exiting", file=sys.stderr, flush=True)
            os._exit(EXIT_STATUS)


@contextlib.contextmanager
def watch(what: str, timeout: float | None = None):
    """Arm the watchdog for the block: `what` names the work in the error line."""
    global _thread
    with _lock:
        _state["armed"] += 1
        _state["what"], _state["timeout"] = what, default_timeout() if timeout is None else float(timeout)
        _state["last"] = time.monotonic()
        if _thread is None:
            _thread = threading.Thread(target=_watch_loop, name="mlx_gemma-distributed-watchdog", daemon=True)
            _thread.start()
    try:
        yield
    finally:
        with _lock:
            _state["armed"] -= 1
