"""ASGI middleware of the API."""

from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import problem_response

MULTIPART_OVERHEAD_BYTES = 64 * 1024


class UploadSizeLimit:
    """Refuse an upload body past MAX_CSV_BYTES before it is spooled to disk."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/upload":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            response = problem_response(
                413,
                "The upload is too large",
                self._detail(),
                slug="payload-too-large",
                headers={"Connection": "close"},
            )
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # An HTTPException passes through the form parser to the handlers.
                    raise StarletteHTTPException(413, self._detail())
            return message

        await self.app(scope, limited_receive, send)

    def _detail(self) -> str:
        return f"the upload is larger than {self.max_body_bytes - MULTIPART_OVERHEAD_BYTES} bytes"
