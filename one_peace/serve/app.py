"""The FastAPI app: the search page, ``POST /search``, ``POST /v1/embeddings`` (OpenAI's embeddings API),
``GET /v1/models``, ``GET /items/{index}/{id}``, ``GET /previews/{index}/{id}`` (the plugin's preview of an item),
``GET /indexes``, ``GET /health``.

Needs the ``serve`` extra (imported by ``python -m one_peace.serve`` after checking for it). Every error answers
``{"error": "<what went wrong>"}`` with a 4xx status (a bug answers 500 with a one-line message; the traceback goes
to the server log only, never to the client). Media reach the server as bytes only (an uploaded file, or base64 in
the JSON API): a media field sent as text is refused, never opened as a path or fetched as a URL. With an API key
(required when the server binds to anything but loopback) every route but ``/health``, the page and its static
files needs ``Authorization: Bearer <key>`` (or the ``one_peace_key`` cookie the page sets).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
from importlib.resources import files
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from one_peace.serve.limits import BodyLimit, Limits
from one_peace.serve.service import QueryError, SearchService

logger = logging.getLogger(__name__)
FUSE = ("joint", "mean")
MAX_TEXT = 2000
#: routes anyone may read with an API key set: they hold no data
PUBLIC = ("/health", "/", "/static/")
#: most inputs one ``/v1/embeddings`` request may hold
MAX_EMBEDDING_INPUTS = 256


def create_app(
    service: SearchService,
    max_upload_mb: float | None = None,
    max_top_k: int = 100,
    api_key: str | None = None,
) -> Any:
    """The app serving ``service``: its bounds are ``service.limits`` (``max_upload_mb`` overrides the upload cap);
    with ``api_key`` every data route needs it."""
    if max_upload_mb is not None:
        from dataclasses import replace

        service.limits = replace(service.limits, max_upload_mb=max_upload_mb)
    limits: Limits = service.limits
    static = files("one_peace.serve").joinpath("static")
    app = FastAPI(title="one-peace search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(QueryError)
    async def _query_error(request: Request, exc: QueryError) -> JSONResponse:
        return error(exc.status, str(exc), exc.retry_after)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("error answering %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    if api_key:

        @app.middleware("http")
        async def _key(request: Request, call_next: Any) -> Any:
            path = request.url.path
            if path in PUBLIC[:2] or path.startswith(PUBLIC[2]):
                return await call_next(request)
            given = request.headers.get("authorization", "")
            cookie = unquote(request.cookies.get("one_peace_key", ""))  # the page sets it URI-encoded
            token = given[7:] if given.lower().startswith("bearer ") else cookie
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return error(401, "an API key is required: Authorization: Bearer <key>")
            return await call_next(request)

    app.add_middleware(BodyLimit, limits=limits)  # outermost: bodies are cut off before any route reads them

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(static.joinpath("index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "indexes": len(service.indexes),
            "batches": len(service.batches),
            "queued": service.queued(),
            "counts": dict(service.counts),
        }

    @app.get("/indexes")
    async def indexes() -> dict[str, Any]:
        return {"indexes": service.describe()}

    @app.post("/search")
    async def search(request: Request) -> Any:
        form = await request.form()
        name = form.get("index")
        _, index = service.get(str(name) if name else None)
        query: dict[str, Any] = {}
        unknown = []
        for key, value in form.multi_items():
            if key in ("index", "top_k", "fuse", "nprobe", "ef_search"):
                continue
            if key not in index.model.adapters:
                unknown.append(key)
            elif isinstance(value, UploadFile):
                data = await value.read(limits.max_upload_bytes + 1)
                if len(data) > limits.max_upload_bytes:
                    raise QueryError(f"the {key} upload is over the {limits.max_upload_mb:g} MB limit", 413)
                if not data:
                    continue  # an empty file field: the page sends one when nothing was picked
                query[key] = data
            elif str(value).strip():  # text; text in a media field is refused by the service, before any work
                if len(str(value)) > MAX_TEXT:
                    raise QueryError(f"the {key} query is longer than {MAX_TEXT} characters")
                query[key] = str(value).strip()
        if unknown:
            raise QueryError(f"unknown query field(s) {unknown}; this index's model takes {list(index.model.adapters)}")
        try:
            top_k = int(str(form.get("top_k") or 10))
        except ValueError:
            raise QueryError(f"top_k must be an integer, got {str(form.get('top_k'))[:40]!r}") from None
        if not 1 <= top_k <= max_top_k:
            raise QueryError(f"top_k must be between 1 and {max_top_k}, got {top_k}")
        fuse = str(form.get("fuse") or "joint")
        if fuse not in FUSE:
            raise QueryError(f"fuse must be one of {list(FUSE)}, got {fuse[:40]!r}")
        params: dict[str, int | None] = {}
        for key in ("nprobe", "ef_search"):
            raw = str(form.get(key) or "").strip()
            try:
                params[key] = int(raw) if raw else None
            except ValueError:
                raise QueryError(f"{key} must be an integer, got {raw[:40]!r}") from None
        try:
            index.check_search_params(params["nprobe"], params["ef_search"])
        except ValueError as exc:
            raise QueryError(str(exc)) from None
        return await service.search(
            str(name) if name else None,
            query,
            top_k=top_k,
            fuse=fuse,
            nprobe=params["nprobe"],
            ef_search=params["ef_search"],
            disconnected=request.is_disconnected,
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "owned_by": "one-peace"} for m in service.models()],
        }

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            raise QueryError('the body must be JSON: {"model": ..., "input": ...}', 400) from None
        if not isinstance(body, dict):
            raise QueryError("the body must be a JSON object", 400)
        model_name = body.get("model")
        model = service.model_named(model_name)
        inputs = body.get("input")
        if isinstance(inputs, str | dict):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise QueryError('input: a string, a list of strings, or media objects {"modality", "data"}', 400)
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise QueryError(f"input: at most {MAX_EMBEDDING_INPUTS} items a request, got {len(inputs)}", 400)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise QueryError(f"encoding_format must be float or base64, got {str(fmt)[:40]!r}", 400)
        items = [_embedding_input(i, item, model, body.get("modality")) for i, item in enumerate(inputs)]
        vectors, tokens = await service.embed(model, items, disconnected=request.is_disconnected)
        data = []
        for i, vec in enumerate(vectors):
            value: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode() if fmt == "base64" else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {
            "object": "list",
            "data": data,
            "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.get("/previews/{index}/{item_id:path}")
    async def preview(index: str, item_id: str) -> Response:
        data, content_type = await asyncio.to_thread(service.preview, index, item_id)
        return Response(data, media_type=content_type)

    @app.get("/items/{index}/{item_id:path}")
    async def item(index: str, item_id: str) -> Response:
        media, content_type = await asyncio.to_thread(service.media, index, item_id)  # file reads leave the loop
        if isinstance(media, bytes):
            return Response(media, media_type=content_type)
        return FileResponse(media, media_type=content_type)

    return app


def _embedding_input(i: int, item: Any, model: Any, modality: Any) -> tuple[str, Any]:
    """``(modality, raw)`` of one ``/v1/embeddings`` input: a string is text (or, with ``modality``, base64 media);
    an object ``{"modality": "image", "data": "<base64>"}`` is media as bytes (a ``data:`` URI prefix is allowed)."""
    from one_peace.tokenizer import LANGUAGE

    if isinstance(item, str):
        kind = str(modality) if modality else LANGUAGE
        data: Any = item
    elif isinstance(item, dict) and isinstance(item.get("data"), str):
        kind, data = str(item.get("modality") or modality or ""), item["data"]
    else:
        raise QueryError(f'input[{i}]: a string or {{"modality": ..., "data": "<base64>"}}', 400)
    if kind not in model.adapters:
        raise QueryError(f"input[{i}]: modality {kind!r} is not in the model (it has {list(model.adapters)})", 400)
    if model.plugins[kind].media:
        payload = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise QueryError(f"input[{i}]: {kind} data must be base64 (never a path or a URL)", 422) from None
    elif len(data) > MAX_TEXT * 10:
        raise QueryError(f"input[{i}]: longer than {MAX_TEXT * 10} characters", 400)
    return kind, data
