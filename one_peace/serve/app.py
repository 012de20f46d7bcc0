"""The FastAPI app: the search page, ``POST /search``, ``GET /items/{index}/{id}``, ``GET /indexes``, ``GET /health``.

Needs the ``serve`` extra (imported by ``python -m one_peace.serve`` after checking for it). Every error answers
``{"error": "<what went wrong>"}`` with a 4xx status (a bug answers 500 with a one-line
message; the traceback goes to the server log only, never to the client).
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from one_peace.serve.service import QueryError, SearchService

logger = logging.getLogger(__name__)
FUSE = ("joint", "mean")
MAX_TEXT = 2000


def create_app(service: SearchService, max_upload_mb: float = 20.0, max_top_k: int = 100) -> Any:
    """The app serving ``service`` (uploads over ``max_upload_mb`` are refused with 413)."""
    limit = int(max_upload_mb * 1024 * 1024)
    static = files("one_peace.serve").joinpath("static")
    app = FastAPI(title="one-peace search", docs_url=None, redoc_url=None)
    app.state.service = service

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(QueryError)
    async def _query_error(request: Request, exc: QueryError) -> JSONResponse:
        return error(exc.status, str(exc))

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

    @app.middleware("http")
    async def _size_limit(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if request.method == "POST" and length is not None and length.isdigit() and int(length) > limit + 65536:
            return error(
                413, f"the request is {int(length) / 2**20:.1f} MB; uploads are limited to {max_upload_mb:g} MB"
            )
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(static.joinpath("index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "indexes": len(service.indexes), "batches": len(service.batches)}

    @app.get("/indexes")
    async def indexes() -> dict[str, Any]:
        return {"indexes": service.describe()}

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        form = await request.form()
        name = form.get("index")
        _, index = service.get(str(name) if name else None)
        query: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in ("index", "top_k", "fuse", "nprobe", "ef_search"):
                continue
            if isinstance(value, UploadFile):
                data = await value.read(limit + 1)
                if len(data) > limit:
                    raise QueryError(f"the {key} upload is over the {max_upload_mb:g} MB limit", 413)
                if not data:
                    continue  # an empty file field: the page sends one when nothing was picked
                query[key] = data
            elif str(value).strip():
                if len(str(value)) > MAX_TEXT:
                    raise QueryError(f"the {key} query is longer than {MAX_TEXT} characters")
                query[key] = str(value).strip()
        unknown = [k for k in query if k not in index.model.adapters]
        if unknown:
            raise QueryError(f"unknown query field(s) {unknown}; this index's model takes {list(index.model.adapters)}")
        try:
            top_k = int(str(form.get("top_k") or 10))
        except ValueError:
            raise QueryError(f"top_k must be an integer, got {form.get('top_k')!r}") from None
        if not 1 <= top_k <= max_top_k:
            raise QueryError(f"top_k must be between 1 and {max_top_k}, got {top_k}")
        fuse = str(form.get("fuse") or "joint")
        if fuse not in FUSE:
            raise QueryError(f"fuse must be one of {list(FUSE)}, got {fuse!r}")
        params: dict[str, int | None] = {}
        for key in ("nprobe", "ef_search"):
            raw = str(form.get(key) or "").strip()
            try:
                params[key] = int(raw) if raw else None
            except ValueError:
                raise QueryError(f"{key} must be an integer, got {raw!r}") from None
        try:
            index.check_search_params(params["nprobe"], params["ef_search"])
        except ValueError as exc:
            raise QueryError(str(exc)) from None
        return await service.search(str(name) if name else None, query, top_k=top_k, fuse=fuse, **params)

    @app.get("/items/{index}/{item_id:path}")
    async def item(index: str, item_id: str) -> Response:
        media, content_type = service.media(index, item_id)
        if isinstance(media, bytes):
            return Response(media, media_type=content_type)
        return FileResponse(media, media_type=content_type)

    return app
