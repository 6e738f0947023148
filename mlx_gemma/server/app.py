"""The ASGI application: routes, bearer auth, CORS, the body-size limit and OpenAI-shaped errors.

Request bodies are read here (at most `max_body_bytes`, counted as they arrive, not trusted from
Content-Length), parsed as JSON, and validated by the strict pydantic models of schemas.py, so
every bad request ends as an `ApiError` with OpenAI's error object.  Anything else that goes wrong
inside a handler is logged with its traceback on the server and answered with a bare 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from functools import partial
from pathlib import Path

import mlx.core as mx
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

from .api_errors import ApiError, error_body, from_validation
from .embeddings import create_embeddings
from .generation import answer
from .prepare import prepare_chat, prepare_completion
from .responses import CHAT, COMPLETION
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from .served import Defaults, ServedModel

log = logging.getLogger("mlx_gemma.server")

DEFAULT_MAX_BODY_BYTES = 16 * 2 ** 20  # room for long conversations (images come base64 later)
OPEN_PATHS = ("/health",)  # answered without a key: liveness probes carry none


def create_app(models: list[ServedModel], *, api_key: str | None = None, allowed_origins=(),
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, defaults: Defaults = Defaults(),
               allow_image_dir: str | os.PathLike | None = None) -> FastAPI:
    """The server's app for these (loaded, started) models; local image paths only under `allow_image_dir`."""
    media_dir = None if allow_image_dir is None else Path(allow_image_dir)
    served = {m.name: m for m in models}
    app = FastAPI(title="mlx_gemma", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    if allowed_origins:  # added last, so outermost: preflights and 401s carry the CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        # What an operator (and tests/test_server_load.py) watches: jobs each model holds (rows
        # decoding + prompts waiting; a cancelled stream's row is gone from it at the next step),
        # the prefix cache's bytes, and MLX's allocator.  Behind the key, unlike /health.
        jobs = [{"id": m.name, "active_jobs": m.scheduler.active, "prefix_cache_bytes": m.scheduler.prefix_cache_bytes}
                for m in models if m.scheduler is not None]
        return {"models": jobs, "mlx_active_memory": mx.get_active_memory(), "mlx_peak_memory": mx.get_peak_memory(),
                "mlx_cache_memory": mx.get_cache_memory()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [m.card() for m in models]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str):
        return _model(served, name).card()

    async def generate(request: Request, schema, prepare, kind: str):
        body = schema.model_validate(await read_json(request, max_body_bytes))
        model = _model(served, body.model)
        if model.scheduler is None:
            raise ApiError(400, f"`{model.name}` is a sentence encoder: it serves /v1/embeddings only", "model",
                           "not_a_generative_model")
        # Tokenizing a long prompt and decoding images take a while: off the event loop, so the other
        # streams keep flowing (media.py evaluates its arrays on that worker thread).
        prepared = await asyncio.to_thread(prepare, model, body, defaults)
        return await answer(request, model, prepared, kind, body.stream, _include_usage(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatRequest, partial(prepare_chat, media_dir=media_dir), CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest, prepare_completion, COMPLETION)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = EmbeddingRequest.model_validate(await read_json(request, max_body_bytes))
        return await create_embeddings(_model(served, body.model), body)

    return app


def _include_usage(body) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def _model(served: dict, name: str) -> ServedModel:
    if name not in served:
        raise ApiError(404, f"The model `{name[:200]}` does not exist; GET /v1/models lists those served",
                       "model", "model_not_found")
    return served[name]


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object, read at most `limit` bytes far."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the body must be application/json, got {kind[:60]!r}", None, "unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"the body is larger than this server's limit of {limit} bytes", None, "body_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"the body is larger than this server's limit of {limit} bytes", None,
                           "body_too_large")
    try:
        data = json.loads(bytes(raw))
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\ud800") are not text
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        raise ApiError(400, "the body is not valid JSON (UTF-8, nested at most ~1000 deep)", None,
                       "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    return data


class BearerAuth:
    """ASGI middleware: every path but /health needs `Authorization: Bearer <key>`, compared in constant time."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest runs in time independent of where the strings differ.
        if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
            body = error_body(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", None,
                              "invalid_api_key")
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def _api_error(_request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _validation_error(_request, error: ValidationError) -> JSONResponse:
    return await _api_error(_request, from_validation(error))


async def _http_error(_request, error: HTTPException) -> JSONResponse:
    # Starlette's own refusals (an unknown path, a wrong method) in OpenAI's shape.
    return JSONResponse(error_body(error.status_code, str(error.detail)), status_code=error.status_code,
                        headers=getattr(error, "headers", None))


async def _internal_error(_request, error: Exception) -> JSONResponse:
    log.exception("internal error", exc_info=error)  # the traceback stays in the server's log
    return JSONResponse(error_body(500, "internal server error", None, "internal_error"), status_code=500)
