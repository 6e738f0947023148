"""Running one request's jobs and answering: a whole JSON response, or a server-sent event stream.

Both ways read the request's `JobStream` on the event loop, feed each event to its `Choice`, and
end a choice's job as soon as its text is complete (a stop string).  A client that goes away
cancels every job of its request: a stream is cancelled by the SSE library when the connection
drops, a plain request is raced against the connection's `http.disconnect`.  A job that fails ends
its request with an OpenAI error object (HTTP 500, or an `error` event before `[DONE]` in a
stream); the other requests run on.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.requests import Request

from .api_errors import error_body
from .bridge import JobStream
from .choices import Choice, GenerationFailed
from .prepare import Prepared
from .replies import Reply
from .responses import CHAT, Envelope, usage
from .served import ServedModel

log = logging.getLogger("mlx_gemma.server")


def start(served: ServedModel, prepared: Prepared) -> tuple[JobStream, list[Choice]]:
    """Submit the request's jobs (an ApiError if the scheduler refuses one); its choices' state."""
    jobs = JobStream(served.scheduler)
    jobs.submit(prepared.jobs)
    choices = [Choice(served.tokenizer, prepared.stop_ids, prepared.stop_strings, prepared.logprobs,
                      Reply(prepared.thinking, prepared.tool_format)) for _ in prepared.jobs]
    return jobs, choices


async def answer(request: Request, served: ServedModel, prepared: Prepared, kind: str, stream: bool,
                 include_usage: bool):
    """The HTTP response for a prepared request: JSON, or an SSE stream."""
    jobs, choices = start(served, prepared)
    envelope = Envelope(kind, served.name, served.tokenizer)
    if stream:
        return _JobsStream(jobs, _stream(jobs, choices, envelope, prepared, include_usage), ping=15,
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await _whole(request, jobs, choices, envelope, prepared)
    finally:
        jobs.close()


class _JobsStream(EventSourceResponse):
    """An SSE response that cancels its jobs however it ends: a client gone before the first event
    never starts the generator, so the generator's own `finally` cannot be relied on alone."""

    def __init__(self, jobs: JobStream, content, **kwargs):
        super().__init__(content, **kwargs)
        self.jobs = jobs

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.jobs.close()


async def _collect(jobs: JobStream, choices: list[Choice]) -> None:
    async for index, event in jobs.events():
        choices[index].take(event)
        if choices[index].finish_reason is not None:
            jobs.end(index)


async def _whole(request: Request, jobs, choices, envelope: Envelope, prepared: Prepared):
    work = asyncio.ensure_future(_collect(jobs, choices))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():  # the client left: nobody to answer
        work.cancel()
        jobs.close()
        return JSONResponse(error_body(499, "the client closed the connection"), status_code=499)
    try:
        work.result()
    except GenerationFailed as e:
        log.warning("generation failed: %s", e)
        return JSONResponse(error_body(500, f"the generation failed: {e}", None, "generation_failed"),
                            status_code=500)
    return JSONResponse(envelope.full(choices, usage(prepared.prompt_tokens, choices)))


async def _disconnected(request: Request) -> None:
    # The body is read: the next ASGI message is the client's http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(jobs: JobStream, choices: list[Choice], envelope: Envelope, prepared: Prepared,
                  include_usage: bool):
    """The SSE events of a streamed response; cancelled (closing its jobs) if the client leaves."""
    lengths = [0] * len(choices)
    try:
        if envelope.kind == CHAT:  # OpenAI opens each choice with the role and empty content
            for index, choice in enumerate(choices):
                yield _data(envelope.chunk(index, choice, _EMPTY, True, 0, include_usage))
        async for index, event in jobs.events():
            choice = choices[index]
            delta = choice.take(event)
            if choice.finish_reason is not None:
                jobs.end(index)
            if delta.text or delta.reasoning or delta.tool_calls or delta.logprobs or choice.finish_reason is not None:
                yield _data(envelope.chunk(index, choice, delta, False, lengths[index], include_usage))
                lengths[index] += len(delta.text)
        if include_usage:
            yield _data(envelope.usage_chunk(usage(prepared.prompt_tokens, choices)))
    except GenerationFailed as e:
        log.warning("generation failed mid-stream: %s", e)
        yield _data(error_body(500, f"the generation failed: {e}", None, "generation_failed"))
    except Exception:  # a bug of ours: logged here, an error event (no traceback) to the client
        log.exception("internal error mid-stream")
        yield _data(error_body(500, "internal server error", None, "internal_error"))
    finally:
        jobs.close()
    yield {"data": "[DONE]"}


def _data(obj: dict) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False, allow_nan=False)}


class _Empty:
    text, logprobs, reasoning, tool_calls = "", [], "", []


_EMPTY = _Empty()
