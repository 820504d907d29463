"""ASGI plumbing shared by the server and the router: the body-size limit and client-disconnect watching.

Both are written against raw ASGI (not BaseHTTPMiddleware, which buffers streams and hides
disconnects): the size limit must see the raw body before any JSON parsing, and a handler must
learn at once that its client went away, so it can free the engine slot or the backend connection.
"""
from __future__ import annotations

import asyncio

from rsdjax.serve.errors import APIError


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, whether or not Content-Length is sent."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        # read the body here (bounded), then replay it to the app
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away before sending the body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the app expects

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        error = APIError(413, f"request body is over the limit of {self.max_bytes} bytes",
                         code="request_too_large")
        await error.response()(scope, receive, send)


async def wait_or_disconnect(request, coro):
    """Run `coro` unless the client disconnects first; then cancel it (which frees its slots)."""
    task = asyncio.ensure_future(coro)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():  # nobody is listening any more; the status is only for the access log
        raise APIError(499, "client closed the request", code="client_closed")
    return task.result()
