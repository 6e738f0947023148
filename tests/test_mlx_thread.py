"""MlxThread: tasks run on daemon threads that are parked and reused, never ended."""

from __future__ import annotations

import threading

from mlx_gemma.mlx_thread import MlxThread


def test_a_finished_tasks_thread_runs_the_next_task():
    seen = []
    MlxThread.serve(lambda: seen.append(threading.current_thread())).wait(30)
    MlxThread.serve(lambda: seen.append(threading.current_thread())).wait(30)
    assert seen[0] is seen[1] and seen[0].name == MlxThread.NAME and seen[0].daemon
    assert seen[0].is_alive()


def test_a_task_that_raises_sets_its_event_and_its_thread_is_not_reused():
    ran = []

    def broken():
        ran.append(threading.current_thread())
        raise RuntimeError("task failed")

    previous = threading.excepthook
    threading.excepthook = lambda args: None  # the thread's end is expected here
    try:
        assert MlxThread.serve(broken).wait(30)
        ran[0].join(30)
    finally:
        threading.excepthook = previous
    assert not ran[0].is_alive()
    after = []
    MlxThread.serve(lambda: after.append(threading.current_thread())).wait(30)
    assert after[0] is not ran[0]
