"""The HTTP API: OpenAI's /v1/videos, which the official `openai` client, SGLang, vLLM-Omni and FastVideo speak.

    POST   /v1/videos               JSON or multipart/form-data -> 202 the video object (status queued)
    POST   /v1/videos/sync          the same, answered with the mp4 once it is done
    GET    /v1/videos               a page of video objects (?after=ID&limit=&order=asc|desc), newest first
    GET    /v1/videos/{id}          the video object; `openai-poll-after-ms` while it is queued or in progress
    GET    /v1/videos/{id}/content  the mp4 (once completed)
    DELETE /v1/videos/{id}          cancels a queued/running job, deletes a finished one -> video.deleted
    GET    /healthz                 per-worker liveness (+ GPU memory/utilisation through NVML); 503 if not ready
    GET    /v1/models               the served model, its limits and defaults
    GET    /                        a page to use all of it (engine/serving/page/: plain HTML and JS, public API only)

A multipart form carries OpenAI's fields as text and `input_reference` as the uploaded image (what
`client.videos.create(...)` sends); JSON carries `input_reference` as {"image_url": "data:..."} or the engine's own
`image` (base64). The image has its own allowance (limits.max_image_kib); everything else in the body counts against
serve.max_body_kib.

Errors are OpenAI's envelope {"error": {"message", "type", "param", "code"}}: 400 unreadable body, 401 no or wrong
API key, 404 unknown id or model (code model_not_found), 405 wrong method (with Allow), 408 body too slow, 409 video
not ready, 413 body too large, 415 a body neither JSON nor multipart, 421 a Host not in serve.allowed_hosts, 422
invalid field (param names it), 429 queue full. Ray-free: the app wraps a VideoService (engine/serving/service.py).

Hardened for a client that means harm (limits, key and retention: the README's serving section): with serve.api_key set,
every route but /healthz and the page's own files wants `Authorization: Bearer KEY` (compared in constant time); the
Host header must be one this server answers to, so a web page elsewhere cannot reach it through DNS rebinding, and
bodies must say they are JSON or a form, so a cross-site "simple" request cannot submit one; no API docs, no
redirects; a body must arrive within serve.body_timeout_s. Responses render any text, even text a store held from
before these checks (a lone surrogate), as valid JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import Match

from engine.errors import FieldError

from .jobs import ID, QueueFull
from .schema import FIS_NAMES, ModelNotFound, form_body

PAGE = Path(__file__).resolve().parent / "page"
PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/page.js": ("page.js", "text/javascript"),
    "/page.css": ("page.css", "text/css"),
}
# the page fetches nothing from anywhere else: the browser enforces it
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_CODES = {
    400: "invalid_body",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    409: "video_not_ready",
}
PUBLIC = ("/healthz", *PAGE_FILES)  # reachable without the API key
BODY_TYPES = ("application/json", "multipart/form-data")


class SafeJSON(JSONResponse):
    """JSON as UTF-8; text that cannot be UTF-8 (a lone surrogate) escaped instead of failing the response."""

    def render(self, content) -> bytes:
        try:
            return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": param,
            "code": code,
        }
    }


def _error(status: int, code: str, message: str, param=None, headers=None) -> JSONResponse:
    return SafeJSON(error_body(status, code, message, param), status, headers=headers)


class Guard:
    """ASGI middleware in front of every route: the Host header, the API key, HEAD as GET without the body."""

    def __init__(self, app, api_key: str, hosts: list[str]):
        self.app, self.key, self.hosts = app, api_key, {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = _hostname(headers.get("host", ""))
        if "*" not in self.hosts and host not in self.hosts:
            return await _error(421, "misdirected_request", "this server does not answer to that Host")(
                scope, receive, send
            )
        if self.key and scope["path"] not in PUBLIC:
            given = headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, f"Bearer {self.key}".encode()):
                message = "a valid API key is needed: send 'Authorization: Bearer KEY'"
                response = _error(401, "invalid_api_key", message, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        if scope["method"] == "HEAD":  # every GET route answers HEAD: the same status and headers, no body
            scope = {**scope, "method": "GET"}

            async def headless(message):
                if message["type"] == "http.response.body":
                    message = {**message, "body": b""}
                await send(message)

            return await self.app(scope, receive, headless)
        return await self.app(scope, receive, send)


def _hostname(host: str) -> str:
    """'Host: name:port' or '[::1]:port' -> the name."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(service) -> FastAPI:
    c = service.config
    app = FastAPI(
        title="FIS video engine",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
        default_response_class=SafeJSON,
    )
    app.add_middleware(Guard, api_key=c.serve.api_key, hosts=c.serve.allowed_hosts)
    limit = c.serve.max_body_kib * 1024
    image_kib = c.limits.max_image_kib

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return _error(e.status, e.code, e.message, e.param, e.headers)

    @app.exception_handler(HTTPException)  # unknown routes, wrong methods, bad forms: same JSON shape
    async def _http_error(request: Request, e: HTTPException):
        headers = e.headers
        if e.status_code == 405:  # Allow: every method of every route at this path (Starlette names one route's)
            methods = {m for r in app.router.routes if r.matches(request.scope)[0] != Match.NONE for m in r.methods}
            headers = {"Allow": ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))}
        return _error(e.status_code, _CODES.get(e.status_code, "invalid_request"), str(e.detail), headers=headers)

    @app.exception_handler(RequestValidationError)  # query parameters
    async def _query_error(_, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:])
        return _error(422, "invalid_value", f"{param}: {first['msg']}", param)

    async def submit(request: Request) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in BODY_TYPES:
            raise ApiError(415, "unsupported_media_type", "send the request as application/json or multipart/form-data")
        try:
            body = await asyncio.wait_for(_read_body(request, limit, image_kib), c.serve.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                408, "request_timeout", f"the body did not arrive within {c.serve.body_timeout_s:g} s"
            ) from None
        try:
            return await run_in_threadpool(service.submit, body)
        except ModelNotFound as e:
            raise ApiError(404, "model_not_found", str(e), "model") from None
        except FieldError as e:
            code = "unknown_parameter" if str(e).startswith("unknown field") else "invalid_value"
            raise ApiError(422, code, str(e), e.field) from None
        except QueueFull as e:
            raise ApiError(429, "queue_full", str(e), headers={"Retry-After": "5"}) from None

    @app.post("/v1/videos", status_code=202)
    async def create_video(request: Request):
        return await submit(request)

    @app.post("/v1/videos/sync")
    async def create_video_sync(request: Request):
        """Answers with the mp4 once the job is done (vLLM-Omni's /v1/videos/sync); a client that hangs up
        cancels its job."""
        video_id = (await submit(request))["id"]
        while (job := await run_in_threadpool(service.store.get, video_id))["status"] not in ("completed", "failed"):
            if await request.is_disconnected():
                await run_in_threadpool(service.store.cancel, video_id)
                return Response(status_code=499)
            await asyncio.sleep(0.2)
        if job["status"] == "failed":
            status = {"invalid_request": 422, "cancelled": 409}.get(job["error"]["code"], 500)
            raise ApiError(status, job["error"]["code"], job["error"]["message"], headers={"x-video-id": video_id})
        return _content(
            service, video_id, {"x-video-id": video_id, "x-inference-time-s": f"{job['timings']['run_s']:.3f}"}
        )

    @app.get("/v1/videos")
    def list_videos(limit: int = 20, after: str | None = None, order: str = "desc"):
        if not 1 <= limit <= 100:
            raise ApiError(422, "invalid_value", f"limit must be between 1 and 100, got {limit}", "limit")
        if order not in ("asc", "desc"):
            raise ApiError(422, "invalid_value", f"order must be asc or desc, got {order[:20]!r}", "order")
        if after is not None and not ID.fullmatch(after):
            raise ApiError(422, "invalid_value", f"after must be a video id, got {after[:80]!r}", "after")
        data, more = service.store.list(limit, after, order)
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }

    @app.get("/v1/videos/{video_id}")
    def get_video(video_id: str):
        job = _job(service, video_id)
        pending = job["status"] in ("queued", "in_progress")
        headers = {"openai-poll-after-ms": str(c.serve.poll_after_ms)} if pending else None
        return SafeJSON(job, headers=headers)

    @app.get("/v1/videos/{video_id}/content")
    def get_content(video_id: str, variant: str = "video"):
        if variant != "video":
            raise ApiError(422, "invalid_value", f"variant {variant[:20]!r} is not available; only 'video'", "variant")
        job = _job(service, video_id)
        if job["status"] != "completed":
            state = job["status"] if job["error"] is None else f"{job['status']} ({job['error']['code']})"
            raise ApiError(409, "video_not_ready", f"video {video_id} is {state}, not completed", "video_id")
        return _content(service, video_id)

    @app.delete("/v1/videos/{video_id}")
    def delete_video(video_id: str):
        outcome = service.store.cancel(video_id) if ID.fullmatch(video_id) else None
        if outcome is None:
            raise ApiError(404, "not_found", f"no video with id {video_id[:80]!r}", "video_id")
        return {
            "id": video_id,
            "object": "video.deleted",
            "deleted": outcome == "deleted",
            "status": {"cancelling": "in_progress"}.get(outcome, outcome),  # cancelled | in_progress | deleted
            "cancel_requested": outcome == "cancelling",
        }

    @app.get("/healthz")
    def healthz():
        ok, report = service.health()
        return SafeJSON(report, 200 if ok else 503)

    @app.get("/v1/models")
    def models():
        info = service.info
        return {
            "object": "list",
            "data": [
                {
                    "id": c.model_name,
                    "object": "model",
                    "owned_by": "fis-engine",
                    **service.describe,
                    "replicas": c.serve.replicas,
                    "default_fis": c.serve.fis,
                    "fis_presets": list(FIS_NAMES),
                    "limits": vars(c.limits),
                    "default_size": f"{info.default_size[1]}x{info.default_size[0]}",
                    "default_frames": info.default_frames,
                    "default_guidance": info.default_guidance,
                    "fps": info.fps,
                    "size_multiple": info.size_multiple,
                    "frame_multiple": info.vae_t,
                }
            ],
        }

    for route, (name, media) in PAGE_FILES.items():
        app.add_api_route(route, _page(name, media), methods=["GET"], include_in_schema=False)
    return app


def _page(name: str, media: str):
    data = (PAGE / name).read_bytes()

    def page():
        return Response(
            data, media_type=media, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
        )

    return page


def _job(service, video_id: str) -> dict:
    """The job or 404. Ids are opaque: one that cannot be ours (wrong shape, path-like) is just unknown."""
    job = service.store.get(video_id) if ID.fullmatch(video_id) else None
    if job is None:
        raise ApiError(404, "not_found", f"no video with id {video_id[:80]!r}", "video_id")
    return job


def _content(service, video_id: str, headers: dict | None = None) -> Response:
    data = service.store.video_bytes(video_id)
    if data is None:
        raise ApiError(404, "not_found", f"the file of video {video_id} is gone from the output directory")
    disposition = {"Content-Disposition": f'attachment; filename="{video_id}.mp4"'}
    return Response(data, media_type="video/mp4", headers={**disposition, **(headers or {})})


async def _read_body(request: Request, limit: int, image_kib: int = 0):
    """The body as a dict for the schema: JSON, or a multipart form (schema.form_body). Refused past `limit` plus
    the image's allowance (`image_kib` as an upload, or base64 in JSON) before it is all read (Content-Length first,
    then as it streams); once parsed, everything but the image must fit in `limit`."""
    multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
    total = limit + (image_kib * 1024 + 1024 if multipart else image_kib * 1024 * 4 // 3 + 1024)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > total:
        raise ApiError(
            413, "request_too_large", f"request body is {declared} bytes; the limit is {total} (an image included)"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > total:
            raise ApiError(
                413, "request_too_large", f"request body exceeds the limit of {total} bytes (an image included)"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if multipart:
        body = await _form(request, raw, total)
        image = body.get("input_reference")
    else:
        try:
            body = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique)  # strict UTF-8: no surrogates smuggled
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_body", "request body is not valid UTF-8", "body") from None
        except (ValueError, RecursionError) as e:  # bad JSON, a key given twice, absurd nesting
            raise ApiError(400, "invalid_body", f"request body is not valid JSON: {str(e)[:200]}", "body") from None
        image = _image_of(body)
    if size - (len(image) if isinstance(image, (str, bytes)) else 0) > limit:
        raise ApiError(
            413, "request_too_large", f"request body exceeds the limit of {limit} bytes (not counting the image)"
        )
    return body


def _unique(pairs: list) -> dict:
    """A JSON object whose keys are each given once: with two, a filter in front and this server could read
    different values."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {json.dumps(twice)[:60]} is given twice")
    return out


def _image_of(body):
    if not isinstance(body, dict):
        return None
    ref = body.get("input_reference")
    return ref.get("image_url") if isinstance(ref, dict) else body.get("image")


async def _form(request: Request, raw: bytes, total: int) -> dict:
    """A multipart body already read (and bounded) -> schema.form_body's dict; at most one file, 64 fields."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=64, max_part_size=total)
    items = []
    try:
        for name, value in form.multi_items():
            items.append((name, value if isinstance(value, str) else await value.read()))
    finally:
        await form.close()
    try:
        return form_body(items)
    except FieldError as e:
        raise ApiError(422, "invalid_value", str(e), e.field) from None
