"""The event bridge: the scheduler's callbacks (on the MLX thread) into one request's asyncio queue.

`Scheduler.submit(job, on_event)` calls `on_event` on the thread that runs the model.  Nothing
there may touch the event loop's objects directly, so each callback hands its event over with
`loop.call_soon_threadsafe`; the request's handler reads them, in order, as `(choice, Event)`.
A choice the handler ends itself (a stop string, a disconnect) is cancelled in the scheduler so
its row is freed at the next step, and any event still in flight for it is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

from ..errors import MlxGemmaError
from .api_errors import ApiError


class JobStream:
    """The jobs of one request (one per choice) and the events they send back."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job_ids: list[int] = []
        self.open: set[int] = set()  # choices still running

    def submit(self, jobs: list) -> None:
        """Submit every job, or none: a job the scheduler refuses cancels those already in."""
        for index, job in enumerate(jobs):
            try:
                job_id = self.scheduler.submit(job, partial(self._deliver, index))
            except MlxGemmaError as e:
                self.close()
                raise ApiError(400, str(e), None, "invalid_request") from None
            self.job_ids.append(job_id)
            self.open.add(index)

    def _deliver(self, index: int, event) -> None:
        # Runs on the MLX thread: only hand the event over.
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        """(choice, Event) as they come, until every choice has finished or been ended."""
        while self.open:
            index, event = await self.queue.get()
            if index not in self.open:
                continue  # ended by us; its last events are stale
            if event.finish_reason is not None:
                self.open.discard(index)
            yield index, event

    def end(self, index: int) -> None:
        """Stop one choice now (its text is complete): free its row in the scheduler."""
        if index in self.open:
            self.open.discard(index)
            self.scheduler.cancel(self.job_ids[index])

    def close(self) -> None:
        """Cancel whatever still runs (the client left, or the request failed)."""
        for index in sorted(self.open):
            if index < len(self.job_ids):
                self.scheduler.cancel(self.job_ids[index])
        self.open.clear()
