"""Every request's body read up front, with a size cap: a larger one is a 413 before any of it is parsed.

Without a cap a client can make the server hold and parse a body of any size. The cap is checked twice:
against the declared Content-Length, before reading anything, and against the bytes as they arrive (a
chunked upload declares no length). The body is then handed to the app as one message, and the time it
was complete is kept in the request's state (``body_received_s``), where the request's latency starts.
"""

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanovllm.serving.errors import APIError, error_response

RECEIVED_S_KEY = "body_received_s"  # scope["state"] key: time.perf_counter() when the whole body had arrived


class RequestBodyLimit:
    """ASGI middleware: refuse a body over ``max_bytes`` with OpenAI's error body and status 413.

    A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware, whose wrapped ``receive`` hides a
    client's disconnect from the handlers. After the body, ``receive`` is the server's again, so handlers
    still see a disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes  # largest request body accepted, in bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(int(declared), scope, receive, send)  # the server discards the unread rest
            return
        chunks: list[bytes] = []
        num_bytes = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body: nobody to answer
            chunks.append(message.get("body", b""))
            num_bytes += len(chunks[-1])
            if num_bytes > self.max_bytes:
                await self._refuse(num_bytes, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        scope.setdefault("state", {})[RECEIVED_S_KEY] = time.perf_counter()
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, num_bytes: int, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"the request body has {num_bytes} bytes or more, over this server's limit of {self.max_bytes} bytes "
            "(--max-request-body-bytes); send a smaller request"
        )
        await error_response(APIError(413, message, code="request_too_large"))(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the whole body as one message, then passes on the server's messages."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def body_received_s(request: Request, default_s: float) -> float:
    """When RequestBodyLimit had the request's whole body (time.perf_counter()); ``default_s`` without it."""
    return float(request.scope.get("state", {}).get(RECEIVED_S_KEY, default_s))
