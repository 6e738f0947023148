"""Threads for MLX work that must outlive what they run (the batch scheduler's MLX thread).

MLX 0.32 binds a stream to the thread that made it, and a process in which a thread that made
streams has ended may abort at exit ("terminate called without an active exception", seen here
on the CPU with cpu_spread's helper streams).  So such a thread is never ended: when its task
returns it is parked, and the next task runs on it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class MlxThread:
    """A daemon thread that runs one task at a time (a scheduler's loop), then waits for the next."""

    NAME = "mlx_gemma-batch"
    _parked: list[MlxThread] = []
    _lock = threading.Lock()

    def __init__(self):
        self.tasks: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, name=self.NAME, daemon=True).start()

    def _work(self) -> None:
        while True:
            task, done = self.tasks.get()
            try:
                task()
            finally:
                done.set()  # (a task that raised ends its thread, which is then not parked)
            with self._lock:
                self._parked.append(self)

    @classmethod
    def serve(cls, task: Callable[[], None]) -> threading.Event:
        """Run `task` on a parked thread (or a new one); the event is set when it returns."""
        with cls._lock:
            thread = cls._parked.pop() if cls._parked else None
        done = threading.Event()
        (thread or cls()).tasks.put((task, done))
        return done
