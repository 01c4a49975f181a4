"""The API's edge: pure ASGI middleware in front of every route (nothing is buffered here).

- :class:`RequestContext`: every request gets an id (the client's ``X-Request-ID`` when it follows the id
  rule, else a new ``req-...``), sent back in ``X-Request-ID`` and in every error body. An unexpected
  exception becomes a JSON 500 naming that id, never a plain-text body; the connection stays usable.
- :class:`BodyLimit`: a cap on every request body, checked before it is read. A ``Content-Length`` over
  the cap gets a 413 at once, without reading a byte of the body; a body without one (chunked) is
  counted as it streams and stops with a 413 at the first byte over. The message names the limit and
  the setting that raises it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hscr_client._models import is_valid_id

from ..core.config import Settings
from .errors import error_response

log = logging.getLogger("hscr_service")

REQUEST_ID_HEADER = "X-Request-ID"
# Multipart framing around an uploaded file (boundaries, part headers, the purpose field).
MULTIPART_OVERHEAD_BYTES = 64 * 1024
UPLOAD_PATH = "/v1/files"


def request_id_of(scope: Scope) -> str | None:
    return scope.get("state", {}).get("request_id")


class RequestContext:
    """Request ids, and a JSON 500 for anything no handler answered."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        request_id = given if is_valid_id(given) else "req-" + uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unexpected error in %s %s (request id %s)", scope["method"], scope["path"], request_id)
            if started:  # part of the body is out: only closing the connection tells the client it is cut short
                raise
            response = error_response(500, "internal_error",
                                      f"an unexpected error occurred on the server; the request may be retried. "
                                      f"Quote request id {request_id} when reporting it.", request_id=request_id)
            await response(scope, receive, send_with_id)


@dataclass(frozen=True)
class Limit:
    bytes: int
    setting: str  # the environment variable that raises it
    hint: str  # what a client can do instead


def body_limit(settings: Settings, method: str, path: str) -> Limit:
    """The cap on a request's body: uploads may be as large as the largest file a purpose allows (each purpose's
    own limit is checked by the route once the form is parsed); every other body is JSON."""
    if method == "POST" and path.rstrip("/") == UPLOAD_PATH:
        largest = max(settings.max_items_file_bytes, settings.max_image_bytes)
        return Limit(largest + MULTIPART_OVERHEAD_BYTES, "HSCR_MAX_ITEMS_FILE_BYTES or HSCR_MAX_IMAGE_BYTES",
                     "split the items into several files and jobs")
    return Limit(settings.max_inline_request_bytes, "HSCR_MAX_INLINE_REQUEST_BYTES",
                 "upload the items as a file (POST /v1/files, purpose 'items') and pass its id as input_file_id")


def too_large_message(limit: Limit, method: str, path: str) -> str:
    return (f"the request body is over {limit.bytes} bytes, the limit for {method} {path}; {limit.hint}, or ask "
            f"the operator to raise {limit.setting}")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` at the first byte over the cap. A Starlette HTTPException, so FastAPI's body
    parsing passes it on untouched and the handler answers 413."""

    def __init__(self, message: str):
        super().__init__(413, detail=message, headers={"Connection": "close"})


class BodyLimit:
    def __init__(self, app: ASGIApp, *, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        limit = body_limit(self.settings, method, path)
        message = too_large_message(limit, method, path)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit.bytes:
            # Answer before reading: a client that sent 'Expect: 100-continue' never sends the body at all.
            response = error_response(413, "too_large", message, request_id=request_id_of(scope),
                                      headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message_in = await receive()
            if message_in["type"] == "http.request":
                received += len(message_in.get("body", b""))
                if received > limit.bytes:
                    raise BodyTooLarge(message)
            return message_in

        await self.app(scope, counting_receive, send)
