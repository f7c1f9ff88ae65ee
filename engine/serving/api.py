"""The HTTP API, in the shape SGLang and vLLM-Omni use for video (OpenAI's /v1/videos):

    POST   /v1/videos               JSON request -> 202 {id, status: queued, ...}
    GET    /v1/videos               jobs, newest first (?limit=)
    GET    /v1/videos/{id}          status, progress (step k of n), timings, error
    GET    /v1/videos/{id}/content  the mp4 (once completed)
    DELETE /v1/videos/{id}          cancels a queued/running job, deletes a finished one
    GET    /healthz                 per-worker liveness (+ GPU memory/utilisation through NVML); 503 if not ready
    GET    /v1/models

A request's `image` (base64 PNG/JPEG/WebP, for image-to-video models) has its own allowance (limits.max_image_kib,
decoded); everything else in the body counts against serve.max_body_kib.

Errors are JSON {"error": {"message", "type", "param"}}: 400 unreadable body, 413 body too large,
422 invalid field (param names it), 404 unknown id, 409 video not ready, 429 queue full.
Ray-free: the app wraps a VideoService (engine/serving/service.py).
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from engine.errors import FieldError

from .jobs import ID, QueueFull


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.headers = status, kind, message, param, headers


def _error(status: int, kind: str, message: str, param=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status, headers=headers)


def create_app(service) -> FastAPI:
    app = FastAPI(title="FIS video engine", version="1")
    limit = service.config.serve.max_body_kib * 1024
    image_allowance = service.config.limits.max_image_kib * 1024 * 4 // 3 + 256  # base64 + a data: URL prefix

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return _error(e.status, e.kind, e.message, e.param, e.headers)

    @app.exception_handler(HTTPException)  # unknown routes, wrong methods: same JSON shape
    async def _http_error(_, e: HTTPException):
        return _error(e.status_code, "invalid_request_error", str(e.detail))

    @app.exception_handler(RequestValidationError)  # query parameters
    async def _query_error(_, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:])
        return _error(422, "invalid_request_error", f"{param}: {first['msg']}", param)

    @app.post("/v1/videos", status_code=202)
    async def create_video(request: Request):
        body = await _read_json(request, limit, image_allowance)
        try:
            return await run_in_threadpool(service.submit, body)
        except FieldError as e:
            raise ApiError(422, "invalid_request_error", str(e), e.field) from None
        except QueueFull as e:
            raise ApiError(429, "queue_full", str(e), headers={"Retry-After": "5"}) from None

    @app.get("/v1/videos")
    def list_videos(limit: int = 100):
        if not 1 <= limit <= 1000:
            raise ApiError(422, "invalid_request_error", f"limit must be between 1 and 1000, got {limit}", "limit")
        return {"object": "list", "data": service.store.list(limit)}

    @app.get("/v1/videos/{video_id}")
    def get_video(video_id: str):
        return _job(service, video_id)

    @app.get("/v1/videos/{video_id}/content")
    def get_content(video_id: str):
        job = _job(service, video_id)
        if job["status"] != "completed":
            raise ApiError(409, "not_ready", f"video {video_id} is {job['status']}, not completed", "video_id")
        data = service.store.video_bytes(video_id)
        if data is None:
            raise ApiError(404, "not_found", f"the file of video {video_id} is gone from the output directory")
        return Response(
            data, media_type="video/mp4", headers={"Content-Disposition": f'attachment; filename="{video_id}.mp4"'}
        )

    @app.delete("/v1/videos/{video_id}")
    def delete_video(video_id: str):
        outcome = service.store.cancel(video_id) if ID.fullmatch(video_id) else None
        if outcome is None:
            raise ApiError(404, "not_found", f"no video with id {video_id[:80]!r}", "video_id")
        return {
            "id": video_id,
            "object": "video",
            "deleted": outcome == "deleted",
            "status": {"cancelling": "running"}.get(outcome, outcome),
            "cancel_requested": outcome == "cancelling",
        }

    @app.get("/healthz")
    def healthz():
        ok, report = service.health()
        return JSONResponse(report, 200 if ok else 503)

    @app.get("/v1/models")
    def models():
        c = service.config
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
                    "limits": vars(c.limits),
                    "default_size": list(service.info.default_size),
                    "default_frames": service.info.default_frames,
                }
            ],
        }

    return app


def _job(service, video_id: str) -> dict:
    """The job or 404. Ids are opaque: one that cannot be ours (wrong shape, path-like) is just unknown."""
    job = service.store.get(video_id) if ID.fullmatch(video_id) else None
    if job is None:
        raise ApiError(404, "not_found", f"no video with id {video_id[:80]!r}", "video_id")
    return job


async def _read_json(request: Request, limit: int, image_allowance: int = 0):
    """The body, refused past `limit` + `image_allowance` bytes before it is all read (Content-Length first, then
    as it streams); once parsed, everything but the image must fit in `limit`."""
    total = limit + image_allowance
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
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
        raise ApiError(400, "invalid_request_error", f"request body is not valid JSON: {e}", "body") from None
    image = body.get("image") if isinstance(body, dict) else None
    if size - (len(image) if isinstance(image, str) else 0) > limit:
        raise ApiError(
            413, "request_too_large", f"request body exceeds the limit of {limit} bytes (not counting the image)"
        )
    return body
