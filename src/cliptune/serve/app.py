"""The FastAPI app of ``cliptune serve``: search an index by text, uploaded image or "more like this".

:func:`create_app` loads the index and the model once; every request then embeds its query off the event
loop (in a worker thread, one forward at a time behind a lock: a Hugging Face fast tokenizer is not safe
to call from two threads at once, and on CPU one forward already uses every core torch is given) and ranks
with :func:`cliptune.search.search_embeddings`, the ranking ``cliptune search`` uses. Routes and their
JSON are the contract in ``docs/serve.md``; every refusal is ``{"detail": "<one sentence>"}`` with its
status (:mod:`cliptune.serve.errors`).

Example:
    >>> app = create_app(Path("runs/demo/index"))  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import mimetypes
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import Message

from cliptune.data.catalogue import image_root
from cliptune.data.images import ImageLoadError, read_image_bytes
from cliptune.data.shards import is_shard_spec, shard_member
from cliptune.models.embed import embed_images_with, embed_texts_with, model_device
from cliptune.models.factory import LoadedModel, load_model
from cliptune.search.index import ModelMismatchError, SearchIndex, index_facts, load_index
from cliptune.search.query import search_embeddings
from cliptune.serve.errors import (
    BadQueryError,
    NotFoundError,
    RequestError,
    UnsupportedBodyError,
    UploadTooLargeError,
)
from cliptune.serve.hits import hit_json
from cliptune.serve.info import run_info
from cliptune.serve.limits import Limits
from cliptune.serve.suite_view import suite_results
from cliptune.serve.uploads import read_limited, uploaded_image

__all__ = ["STATIC", "create_app"]

STATIC = Path(__file__).parent / "static"
_JSON_BODY_LIMIT = 64 * 1024  # a JSON query is a short text, an id, k and a few filters
_FORM_SLACK = 64 * 1024  # multipart boundaries, headers and the k / where fields beside the image
_JSON_FIELDS = ("text", "like", "k", "where")
_FORM_FIELDS = ("image", "k", "where")


_WHERE = {"type": "object", "description": "attribute -> value or list of values (any of), ANDed"}
_SEARCH_BODY: dict[str, Any] = {  # /search reads its body itself (JSON or multipart): the schema for /docs
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string", "example": "ripped blue jeans"},
                        "like": {"type": "string", "description": "an item id: more like this item"},
                        "k": {"type": "integer", "default": 10, "minimum": 1},
                        "where": _WHERE,
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "k": {"type": "integer", "default": 10, "minimum": 1},
                        "where": {"type": "string", "description": "a JSON object, as in the JSON body"},
                    },
                }
            },
        },
    }
}


@dataclass(frozen=True)
class _Query:
    text: str | None
    like: str | None
    k: int
    where: dict[str, Any]


@dataclass
class _Served:
    """What the routes share: loaded once, read by every request."""

    index: SearchIndex
    model: LoadedModel
    limits: Limits
    info: dict[str, Any]
    suite: dict[str, Any] | None
    scratch: tempfile.TemporaryDirectory[str]
    number: dict[str, int] = field(init=False)
    catalogue: Path = field(init=False)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.number = {item_id: n for n, item_id in enumerate(self.index.ids)}
        root = Path(self.index.manifest["catalogue"])
        # WebDataset shards: the images lie in (the tars in) the shards' folder, not under the pattern
        self.catalogue = (image_root(root) if is_shard_spec(root) else root).resolve()

    @property
    def uploads(self) -> Path:
        return Path(self.scratch.name)


def create_app(
    index: Path,
    *,
    model: str | None = None,
    suite: Path | None = None,
    limits: Limits = Limits(),  # noqa: B008 (frozen dataclass: the shared default cannot change)
    cache_dir: Path | None = None,
) -> FastAPI:
    """The app serving ``index``: model, index, run metrics and suite results loaded once, here.

    Args:
        index: An index folder (``cliptune index``).
        model: The model to embed queries with (default: the folder or spec the index records); it must be
            the index's model (same identity).
        suite: A behavioural suite file: enables ``/suite`` and ``/suite/results`` (computed here).
        limits: Per-request limits.
        cache_dir: Feature cache of the suite's queries (default: the shared one). Request queries never
            touch a cache: each would add an fsync'ed shard, and uploads would grow the user's cache.

    Returns:
        The FastAPI app (run it with uvicorn).

    Raises:
        SearchIndexError: the index cannot be loaded; ``ModelMismatchError`` when ``model`` is another one.
        SuiteError: the suite is invalid or does not match the index's catalogue.
    """
    idx = load_index(index)
    loaded = load_model(model or idx.model_source)
    if loaded.name != idx.model:
        raise ModelMismatchError(idx.path, idx.model, idx.model_source, loaded.name, str(loaded.source))
    scratch = tempfile.TemporaryDirectory(prefix="cliptune-serve-")
    served = _Served(idx, loaded, limits, {}, None, scratch)
    if suite is not None:
        served.suite = suite_results(suite, idx, loaded, cache_dir=cache_dir)
    served.info = {
        "model": idx.model,
        "model_source": idx.model_source,
        "index": {k: v for k, v in index_facts(idx).items() if k not in ("model", "model_source")},
        "attributes": {a: idx.values(a) for a in idx.attributes},
        "run": run_info(idx),
        "suite": None
        if served.suite is None
        else {"name": served.suite["name"], "queries": len(served.suite["queries"])},
        "limits": limits.to_dict(),
    }
    app = FastAPI(
        title="cliptune serve",
        summary=f"Search {len(idx)} images of {idx.path} with model {idx.model}.",
    )
    app.state.served = served
    _add_error_handlers(app)
    _add_routes(app, served)
    if STATIC.is_dir():  # the page's assets (package data); without them /static/* is a plain 404
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def refused(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestError)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(RequestValidationError, invalid)


def _add_routes(app: FastAPI, served: _Served) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return _static_page("index.html")

    @app.get("/suite", include_in_schema=False)
    def suite_page() -> FileResponse:
        if served.suite is None:
            raise NotFoundError("no suite here: start the server with a suite file to see its page")
        return _static_page("suite.html")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the model and index are loaded."""
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict[str, Any]:
        """Model identity, index size, filter values, the run's test metrics and suite verdicts, limits."""
        return served.info

    @app.post("/search", openapi_extra=_SEARCH_BODY)
    async def search(request: Request) -> dict[str, Any]:
        """Search by ``text`` or ``like`` (JSON) or by an uploaded ``image`` (multipart); see docs/serve.md."""
        started = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            return await _search_upload(request, served, started)
        if ctype not in ("application/json", ""):
            raise UnsupportedBodyError(
                f"POST /search takes application/json or multipart/form-data, not {ctype}"
            )
        body = await read_limited(request.stream(), _JSON_BODY_LIMIT, "the JSON body")
        query = _parse_json(body, served)
        if query.like is not None:
            vector = served.index.vectors()[served.number[query.like]][None, :]  # (1, D) its own vector
            hits = await run_in_threadpool(_rank, served, vector, query)
        else:
            assert query.text is not None
            hits = await run_in_threadpool(_search_text, served, query.text, query)
        return _answer(query, hits, started, text=query.text, like=query.like)

    @app.get("/images/{item_id:path}")
    def image(item_id: str) -> Response:
        """The catalogue image of an item id of the index (never a path taken from the URL)."""
        path, headers = _image_path(served, item_id), {"X-Content-Type-Options": "nosniff"}
        if shard_member(path) is None:
            return FileResponse(path, headers=headers)
        try:  # a WebDataset shard member: its bytes come from the tar
            data = read_image_bytes(path)
        except ImageLoadError as exc:
            raise NotFoundError(f"the image of item {item_id!r} is missing from the catalogue") from exc
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Response(data, media_type=media, headers=headers)

    @app.get("/suite/results")
    def suite_data() -> dict[str, Any]:
        """The suite's queries ranked over the index, each hit flagged relevant / yellow / red / none."""
        if served.suite is None:
            raise NotFoundError("no suite here: start the server with a suite file to see its results")
        return served.suite


def _static_page(name: str) -> FileResponse:
    path = STATIC / name
    if not path.is_file():
        raise NotFoundError(f"the page {name} is not installed with this cliptune")
    return FileResponse(path)


def _image_path(served: _Served, item_id: str) -> Path:
    number = served.number.get(item_id)
    if number is None:
        raise NotFoundError(f"no item {item_id[:200]!r} in this index")
    path = Path(served.index.paths[number]).resolve()  # follows symlinks: where the bytes really are
    if not path.is_relative_to(served.catalogue):
        raise NotFoundError(f"the image of item {item_id!r} lies outside the catalogue folder: not served")
    if shard_member(path) is None and not path.is_file():
        raise NotFoundError(f"the image of item {item_id!r} is missing from the catalogue")
    return path


def _search_text(served: _Served, text: str, query: _Query) -> list[Any]:
    with served.lock:
        vector = embed_texts_with(
            served.model, [text], use_cache=False, progress=False, device=model_device(served.model)
        )
    return _rank(served, vector.numpy(), query)  # (1, D)


def _search_image(served: _Served, path: Path, query: _Query) -> list[Any]:
    with served.lock:
        vector = embed_images_with(  # one image: no decoding workers to start
            served.model,
            [path],
            use_cache=False,
            progress=False,
            max_pixels=served.limits.max_image_pixels,
            num_workers=0,
            device=model_device(served.model),  # where it was loaded (the CPU): one query moves nothing
        )
    return _rank(served, vector.numpy(), query)  # (1, D)


def _rank(served: _Served, vector: np.ndarray, query: _Query) -> list[Any]:
    return search_embeddings(served.index, vector, k=query.k, where=query.where)[0]


def _answer(
    query: _Query,
    hits: list[Any],
    started: float,
    *,
    text: str | None = None,
    image: str | None = None,
    like: str | None = None,
) -> dict[str, Any]:
    return {
        "query": {"text": text, "image": image, "like": like},
        "k": query.k,
        "where": query.where,
        "took_ms": round((time.perf_counter() - started) * 1000, 3),
        "hits": [hit_json(h) for h in hits],
    }


async def _search_upload(request: Request, served: _Served, started: float) -> dict[str, Any]:
    limit = served.limits.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _FORM_SLACK:
        raise UploadTooLargeError(
            f"the request declares {int(declared):,} bytes; uploads are limited to {limit:,} bytes"
        )
    received = 0

    async def counted() -> Message:  # counts the body as it streams in: no 2 GB spool before refusing
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit + _FORM_SLACK:
            raise UploadTooLargeError(f"the request body exceeds the upload limit of {limit:,} bytes")
        return message

    form = await Request(request.scope, counted).form(max_files=1, max_fields=len(_FORM_FIELDS))
    try:
        unknown = sorted(set(form.keys()) - set(_FORM_FIELDS))
        if unknown:
            raise BadQueryError(f"unknown form field(s) {', '.join(unknown)}; the form takes image, k, where")
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise BadQueryError("the form needs an image file in the field 'image'")
        k = _form_int(form.get("k"), served.limits)
        where = _form_where(form.get("where"))
        query = _validated(_Query(None, None, k, where), served)
        data = await read_limited(_chunks(upload), limit, "the uploaded image")
        name = upload.filename or "upload"
    finally:
        await form.close()
    with uploaded_image(data, name, served.uploads) as path:  # decoded once, in the worker thread
        hits = await run_in_threadpool(_search_image, served, path, query)
    return _answer(query, hits, started, image=name)


async def _chunks(upload: UploadFile) -> Any:
    while chunk := await upload.read(1 << 16):
        yield chunk


def _form_int(raw: object, limits: Limits) -> int:
    if raw is None or raw == "":
        return 10
    if not isinstance(raw, str) or not raw.strip().lstrip("-").isdigit():
        raise BadQueryError(f"k must be a whole number between 1 and {limits.max_k}, got {str(raw)[:40]!r}")
    return int(raw)


def _form_where(raw: object) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise BadQueryError('where must be a JSON object as text, e.g. {"colour": "blue"}')
    try:
        where = json.loads(raw)
    except json.JSONDecodeError:
        raise BadQueryError('where is not valid JSON; give an object such as {"colour": "blue"}') from None
    if not isinstance(where, dict):
        raise BadQueryError('where must be a JSON object such as {"colour": "blue"}')
    return where


def _parse_json(body: bytes, served: _Served) -> _Query:
    try:
        raw = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadQueryError("the body is not valid JSON") from None
    if not isinstance(raw, dict):
        raise BadQueryError('the body must be a JSON object such as {"text": "red dress", "k": 10}')
    unknown = sorted(set(raw) - set(_JSON_FIELDS))
    if unknown:
        raise BadQueryError(f"unknown field(s) {', '.join(unknown)}; the body takes text, like, k, where")
    text, like, k, where = (raw.get(f) for f in _JSON_FIELDS)
    if text is not None and not isinstance(text, str):
        raise BadQueryError("text must be a string")
    if like is not None and not isinstance(like, str):
        raise BadQueryError("like must be an item id (a string)")
    if k is None:
        k = 10
    if isinstance(k, bool) or not isinstance(k, int):
        raise BadQueryError(f"k must be a whole number between 1 and {served.limits.max_k}")
    if where is None:
        where = {}
    if not isinstance(where, dict):
        raise BadQueryError('where must be an object such as {"colour": "blue"}')
    if (text is None) == (like is None):
        raise BadQueryError("give exactly one query: text, like, or an image upload (multipart)")
    return _validated(_Query(text, like, k, where), served)


def _validated(query: _Query, served: _Served) -> _Query:
    """Refuse, before any model time, what the model would refuse or what would cost more than allowed."""
    limits = served.limits
    if query.text is not None:
        if not query.text.strip():
            raise BadQueryError("the text query is empty")
        if len(query.text) > limits.max_query_chars:
            raise BadQueryError(
                f"the text query has {len(query.text):,} characters; the limit is {limits.max_query_chars:,} "
                "(the model's tokenizer reads only its first 64-77 tokens anyway)"
            )
    if query.like is not None and query.like not in served.number:
        raise BadQueryError(f"like: no item {query.like[:200]!r} in this index")
    if not 1 <= query.k <= limits.max_k:
        raise BadQueryError(f"k must be between 1 and {limits.max_k}, got {query.k}")
    _check_where(query.where, served.index)
    return query


def _check_where(where: Mapping[str, Any], index: SearchIndex) -> None:
    known = list(index.attributes)
    for attribute, wanted in where.items():
        if attribute not in index.attributes:
            listed = ", ".join(known) if known else "none (this index has no attributes)"
            raise BadQueryError(f"unknown filter attribute {attribute[:100]!r}; valid attributes: {listed}")
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values or not all(isinstance(v, str | int | float | bool) for v in values):
            raise BadQueryError(
                f"filter {attribute!r} needs a value or a non-empty list of values (strings, numbers, booleans)"
            )
