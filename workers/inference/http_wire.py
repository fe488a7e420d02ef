"""The bytes of a streamed HTTP/1.1 response, parsed with the standard library: the
response head, the three ways a body can be framed (chunked, Content-Length, until close)
and Server-Sent Events. Bounded: no line or head may grow memory without limit."""

from dataclasses import dataclass

MAX_LINE_BYTES = 1024 * 1024  # one SSE line or chunk-size line; bounds memory per stream


class BadStream(Exception):
    """The server sent something other than what it promised: bytes that are not HTTP or
    SSE, a chunk that is not JSON, or an error event in place of tokens."""


@dataclass(frozen=True)
class Head:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "


def parse_head(raw: bytes) -> Head:
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/") or not code.isdigit():
        raise BadStream(f"not an HTTP response: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadStream(f"bad header line {line[:60]!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return Head(int(code), headers)


class ChunkedDecoder:
    """Undoes `Transfer-Encoding: chunked` as bytes arrive."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0  # payload bytes still to come in the current chunk
        self._after_data = False  # the CRLF that ends a chunk's payload is next
        self._in_trailers = False
        self.complete = False

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        pos = 0
        while not self.complete:
            if self._left:
                piece = self._buf[pos : pos + self._left]
                if not piece:
                    break
                out += piece
                pos += len(piece)
                self._left -= len(piece)
                self._after_data = not self._left
                continue
            end = self._buf.find(b"\n", pos)
            if end < 0:
                if len(self._buf) - pos > MAX_LINE_BYTES:
                    raise BadStream("chunk header line too long")
                break
            line = bytes(self._buf[pos:end]).removesuffix(b"\r")
            pos = end + 1
            self._line(line)
        del self._buf[:pos]
        return bytes(out)

    def _line(self, line: bytes) -> None:
        if self._after_data:
            if line:
                raise BadStream("chunk payload not followed by CRLF")
            self._after_data = False
        elif self._in_trailers:
            self.complete = not line
        else:
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadStream(f"bad chunk size {line[:20]!r}") from None
            self._left = size
            self._in_trailers = size == 0


class LengthDecoder:
    """A body of `Content-Length` bytes."""

    def __init__(self, length: int) -> None:
        self._left = length
        self.complete = length == 0

    def feed(self, data: bytes) -> bytes:
        piece = data[: self._left]
        self._left -= len(piece)
        self.complete = self._left == 0
        return piece


class UntilCloseDecoder:
    """A body that ends when the server closes the connection."""

    complete = False

    def feed(self, data: bytes) -> bytes:
        return data


Decoder = ChunkedDecoder | LengthDecoder | UntilCloseDecoder


def decoder_for(headers: dict[str, str]) -> Decoder:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return ChunkedDecoder()
    length = headers.get("content-length", "").strip()
    if length:
        if not length.isdigit():
            raise BadStream(f"bad Content-Length {length[:20]!r}")
        return LengthDecoder(int(length))
    return UntilCloseDecoder()


class SseParser:
    """Splits an event stream into its events' data, by the WHATWG rules OpenAI streams
    follow: `data:` lines of one event are joined by newlines and the event is dispatched
    at a blank line; `:` comments and other fields are ignored. Lines end in LF or CRLF
    (a lone CR, which the spec allows, is not used by any OpenAI-compatible server)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        if b"\n" not in data:
            if len(self._buf) > MAX_LINE_BYTES:
                raise BadStream("event stream line too long")
            return []
        *lines, tail = bytes(self._buf).split(b"\n")
        self._buf = bytearray(tail)
        events: list[str] = []
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", "replace")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                self._data = []
            elif line.startswith("data:"):
                self._data.append(line[5:].removeprefix(" "))
        return events

    def finish(self) -> list[str]:
        """At the end of the body: an event the server did not end with a blank line (some
        send `data: [DONE]` and close at once)."""
        return self.feed(b"\n\n")
