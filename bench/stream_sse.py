"""A small asyncio Server-Sent Events client for the stream benchmark (no HTTP library is
installed, and none is needed for one GET): HTTP/1.1 over a plain socket, the response's
status line and headers, then its body, chunked (what uvicorn sends for a streaming
response), sized by Content-Length, or read to the end, split into SSE events as the
WHATWG EventSource parser does (`id:`, `event:`, `data:`, `retry:` fields, `:` comments,
CRLF, LF or CR line ends, a blank line dispatching the event).

    response = await open_sse("127.0.0.1", port, "/api/runs/<id>/events?after=0", headers)
    if response.status == 200:
        async for event in response.events():
            ...  # SSEEvent(kind="message" | "comment", event=..., data=..., id=...)
    response.close()
"""

import asyncio
import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

MAX_HEADER_BYTES = 64 * 1024
READ_SIZE = 64 * 1024


class SSEProtocolError(Exception):
    """The server's answer is not HTTP/1.1 as expected."""


@dataclass
class SSEEvent:
    kind: str  # "message", or "comment" for a `:` line (a keep-alive)
    event: str = "message"
    data: str = ""
    id: str | None = None  # the last event id in force, as EventSource keeps it
    comment: str = ""


@dataclass
class SSEParser:
    """Text in, events out; keeps what a chunk boundary cut in half."""

    buffer: str = ""
    pending_cr: bool = False
    event: str = ""
    data: list[str] = field(default_factory=list)
    last_id: str | None = None
    retry_ms: int | None = None

    def feed(self, text: str) -> list[SSEEvent]:
        if self.pending_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF cut by the chunk boundary
        self.pending_cr = text.endswith("\r")
        self.buffer += text
        lines = self.buffer.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.buffer = lines.pop()  # an unfinished line
        out: list[SSEEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                out.append(event)
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return SSEEvent("comment", comment=line[1:].removeprefix(" "), id=self.last_id)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        event, data = self.event or "message", self.data
        self.event, self.data = "", []
        if not data:
            return None  # EventSource dispatches nothing without data
        return SSEEvent("message", event=event, data="\n".join(data), id=self.last_id)


class SSEResponse:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        status: int,
        headers: dict[str, str],
    ) -> None:
        self.reader, self.writer = reader, writer
        self.status, self.headers = status, headers
        self.parser = SSEParser()

    async def body(self) -> AsyncIterator[bytes]:
        """The response body's bytes as they arrive."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            async for chunk in self._chunks():
                yield chunk
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left > 0:
                data = await self.reader.read(min(left, READ_SIZE))
                if not data:
                    raise SSEProtocolError(f"the body ended {left} bytes short")
                left -= len(data)
                yield data
        else:
            while data := await self.reader.read(READ_SIZE):
                yield data

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            size_line = await self.reader.readline()
            if not size_line.endswith(b"\n"):
                raise SSEProtocolError("the server closed the connection before the last chunk")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await self.reader.readline()).strip():  # trailers, then the blank line
                    pass
                return
            data = await self.reader.readexactly(size)
            if await self.reader.readexactly(2) != b"\r\n":
                raise SSEProtocolError("a chunk did not end with CRLF")
            yield data

    async def events(self) -> AsyncIterator[SSEEvent]:
        """Events until the body ends."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        async for data in self.body():
            for event in self.parser.feed(decoder.decode(data)):
                yield event

    def close(self) -> None:
        self.writer.close()


async def open_sse(
    host: str, port: int, target: str, headers: dict[str, str], timeout_s: float = 60.0
) -> SSEResponse:
    """Sends `GET target` and reads the status line and headers (not the body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {host}:{port}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    except BaseException:
        writer.close()
        raise
    if len(head) > MAX_HEADER_BYTES:
        writer.close()
        raise SSEProtocolError("response headers too long")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        writer.close()
        raise SSEProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    parsed: dict[str, str] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            parsed[name.strip().lower()] = value.strip()
    return SSEResponse(reader, writer, int(rest[:3]), parsed)
