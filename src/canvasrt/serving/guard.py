"""The HTTP front of a served repository: a relay on the HTTP port that bounds each request body before tritonserver
reads it.

Triton 2.51's HTTP server has no body limit of its own (no --http-max-input-size), and its HTTP library parses an
`application/x-www-form-urlencoded` body (what `curl -d` sends) as query arguments before any handler runs: such a
body of about 4 MB kills the whole server with signal 11 (3,000,000 bytes survive, 4,194,000 do not, on any path,
/v2/health/ready included). The relay reads each request's head, refuses a body over MAX_BODY (413), a body of
unknown length (411: chunked transfer encoding), an oversized head (431) and a malformed one (400) with one JSON error
line, and passes everything else through unchanged, the responses (server-sent events included) byte for byte. A
client that disconnects closes its server connection, so Triton still sees the cancellation.

The generate endpoints of the served models get one more check: a JSON body whose values their inputs' datatypes
cannot take, which Triton 2.51 answers with HTTP 500 before the model sees it, and a streaming request in canvasrt's
own protocol on /generate, which it answers 200 with an error, are refused with 400 and a line that names the field
(`protocol.generate_json_error`).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading

import h11

from .protocol import BATCHED_MODEL, GENERATE_MODEL, generate_json_error

MAX_BODY = 2 << 20  # bytes of a request body: below the ~4 MB that kills the server, above any prompt a context holds
MAX_HEAD = 64 << 10  # bytes of a request line and headers
DRAIN = 64 << 20  # bytes of a refused body read and dropped before closing, so that the client reads the refusal
CHUNK = 1 << 16
REASONS = {400: "Bad Request", 411: "Length Required", 413: "Content Too Large", 431: "Request Header Fields Too Large"}
# the generate endpoints of the served models: group 1 is "generate" or "generate_stream"
GENERATE = re.compile(
    rf"/v2/models/(?:{GENERATE_MODEL}|{BATCHED_MODEL})(?:/versions/\d+)?/(generate(?:_stream)?)(?:\?.*)?".encode()
)


class RequestRefused(Exception):
    def __init__(self, status: int, message: str, body_left: int = 0):
        super().__init__(message)
        self.status, self.body_left = status, body_left


def request_head(head: bytes, max_body: int) -> tuple[bytes, bytes, int]:
    """The method, target and body length of a request head (parsed by h11), refused (RequestRefused) where it is
    malformed, or its body is over `max_body` or of unknown length."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    connection.receive_data(head)
    try:
        request = connection.next_event()
    except h11.RemoteProtocolError as exc:
        raise RequestRefused(400, f"the request head is malformed: {exc}; send an HTTP/1.1 request") from None
    assert isinstance(request, h11.Request)  # a whole head, up to its blank line, is a request or an error
    length = 0
    for name, value in request.headers:
        if name == b"transfer-encoding":
            raise RequestRefused(411, "send the request body with a Content-Length, not a chunked transfer encoding")
        if name == b"content-length":
            length = int(value)  # h11 refuses one that is not a byte count
    if length > max_body:
        raise RequestRefused(
            413,
            f"the request body is {length} bytes, more than this server takes ({max_body} bytes); send a shorter "
            "prompt or fewer prompt ids",
            body_left=length,
        )
    return request.method, request.target, length


class HttpGuard:
    """Relays 127.0.0.1:`port` to Triton's HTTP server at 127.0.0.1:`upstream`, bounding request bodies; runs in a
    thread of its own from `start` to `stop`."""

    def __init__(self, port: int, upstream: int, max_body: int = MAX_BODY):
        self.port, self.upstream, self.max_body = port, upstream, max_body
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="canvasrt-http-guard", daemon=True)
        self.server: asyncio.base_events.Server | None = None

    def start(self) -> None:
        """Binds the port (raising OSError where it cannot) and starts relaying."""
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, limit=MAX_HEAD)
        )
        self.thread.start()

    def stop(self) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None

        async def close() -> None:  # the open connections' tasks end here, not destroyed pending with the loop
            server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def _serve(self, client: asyncio.StreamReader, reply: asyncio.StreamWriter) -> None:
        try:
            upstream, forward = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            reply.close()
            return
        back = asyncio.ensure_future(self._copy(upstream, reply))
        try:
            while True:
                try:
                    head = await client.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:  # the client is done sending: its answers still go back
                    forward.write_eof()
                    await back
                    break
                except asyncio.LimitOverrunError:
                    raise RequestRefused(431, f"the request head is longer than {MAX_HEAD} bytes") from None
                method, target, left = request_head(head, self.max_body)
                generate = GENERATE.fullmatch(target) if method == b"POST" else None
                if generate is not None and left:  # the whole body first, to check its values
                    body = await client.readexactly(left)
                    error = _generate_error(body, generate.group(1) == b"generate")
                    if error is not None:
                        raise RequestRefused(400, error)
                    forward.write(head + body)
                    await forward.drain()
                    continue
                forward.write(head)
                while left:
                    data = await client.read(min(left, CHUNK))
                    if not data:
                        return
                    forward.write(data)
                    left -= len(data)
                    await forward.drain()
                await forward.drain()
        except RequestRefused as refused:
            await self._refuse(client, reply, refused)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            back.cancel()
            forward.close()
            reply.close()

    @staticmethod
    async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(CHUNK):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sink.close()

    @staticmethod
    async def _refuse(client: asyncio.StreamReader, reply: asyncio.StreamWriter, refused: RequestRefused) -> None:
        """The refusal as Triton words its errors ({"error": ...}), then up to DRAIN bytes of the body dropped: a
        client still sending would otherwise see its connection reset before it reads the answer."""
        body = json.dumps({"error": str(refused)}).encode() + b"\n"
        head = (
            f"HTTP/1.1 {refused.status} {REASONS[refused.status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            reply.write(head.encode() + body)
            await reply.drain()
            left = min(refused.body_left, DRAIN)
            while left > 0:
                data = await asyncio.wait_for(client.read(min(left, CHUNK)), timeout=10)
                if not data:
                    break
                left -= len(data)
        except (ConnectionError, asyncio.TimeoutError):
            pass


def _generate_error(body: bytes, one_response: bool) -> str | None:
    """The refusal of a generate endpoint's body, where it parses as JSON; Triton answers a body that does not."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return generate_json_error(parsed, one_response)
