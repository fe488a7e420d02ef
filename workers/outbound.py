"""The one way operators make outbound HTTP calls from user graphs.

A URL is resolved once and refused if any address it resolves to is not public (unless the
tenant's allowlist names the host); the request then goes to that pinned address, so a second
DNS answer cannot point it somewhere else (DNS rebinding). Never log bodies or headers here:
they carry the user's secrets.
"""

import http.client
import ipaddress
import json
import math
import socket
import ssl
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from workers.operators.base import PermanentError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_RETRY_AFTER_S = 300.0


class OutboundRefused(PermanentError):
    """The URL is not allowed: bad scheme or form, or it reaches a non-public address."""


class OutboundTransient(Exception):
    """The call failed in a way that may pass: timeout, refused or reset connection, DNS."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lowercased, no trailing dot; IP literals normalized, without brackets
    port: int
    address: str  # the pinned IP the request connects to
    path: str  # path and query, at least "/"
    url: str

    @property
    def safe_url(self) -> str:
        """The URL for error messages: query strings often carry API keys."""
        path, _, query = self.path.partition("?")
        return f"{self.scheme}://{self.host_header}{path}" + ("?…" if query else "")

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # lowercase names
    body: bytes
    url: str = ""

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise PermanentError(f"response from {self.url} is not valid JSON") from None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def _normalize_host(host: str) -> str:
    host = host.strip().strip("[]").lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _non_public(ip: IPAddress) -> str | None:
    """Why `ip` may not be called, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        why = _non_public(ip.ipv4_mapped)
        return f"an IPv4-mapped {why.split(' ', 1)[1]}" if why else None
    # Order matters: 0.0.0.0 and 169.254/16 also count as private.
    # IPv4-compatible ::a.b.c.d lies in ::/8, which is reserved.
    checks = [
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "a site-local address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "a non-public address"),  # 100.64/10 (CGNAT) and the like
    ]
    return next((why for hit, why in checks if hit), None)


def resolve_target(url: str, allowlist: Collection[str]) -> Target:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise OutboundRefused(f"only http and https URLs can be called, not {scheme or 'none'!r}")
    if "@" in parts.netloc:  # the URL itself is not echoed: it holds the password
        raise OutboundRefused("URLs with credentials (user:pass@) are refused; use a header")
    if not parts.hostname:
        raise OutboundRefused("URL has no host")
    try:
        port = DEFAULT_PORTS[scheme] if parts.port is None else parts.port
        host = _normalize_host(parts.hostname)
        if not host.isascii():  # internationalized names go on the wire as punycode
            host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise OutboundRefused(f"{parts.netloc!r} is not a valid host and port") from None
    if not 1 <= port <= 65535:
        raise OutboundRefused(f"port {port} is out of range; ports are 1-65535")
    path = parts.path or "/"
    path += f"?{parts.query}" if parts.query else ""
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in path):
        raise OutboundRefused("URL path has spaces, control or non-ASCII characters; encode them")

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:  # an empty or over-long label
        raise OutboundRefused(f"host {host!r} is not a valid name") from None
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise OutboundRefused(f"host {host!r} does not resolve ({e.strerror})") from None
        raise OutboundTransient(f"DNS lookup of {host!r} failed ({e.strerror})") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise OutboundRefused(f"host {host!r} does not resolve to any address")
    allowed = {_normalize_host(entry) for entry in allowlist}
    if host not in allowed:
        # Any bad answer refuses the host: a name that points at both is not trustworthy.
        for address in addresses:
            why = _non_public(ipaddress.ip_address(address.partition("%")[0]))
            if why:
                raise OutboundRefused(
                    f"host {host!r} resolves to {address}, {why}; calls to private, loopback "
                    "and link-local addresses are refused unless the tenant's outbound "
                    "allowlist names the host"
                )
    return Target(scheme, host, port, addresses[0], path, url)


class _PinnedHTTPSConnection(http.client.HTTPConnection):
    """TCP to the pinned IP; SNI and certificate checks against the real host name."""

    default_port = 443

    def __init__(self, address: str, port: int, timeout: float, server_hostname: str) -> None:
        super().__init__(address, port, timeout=timeout)
        self._server_hostname = server_hostname

    def connect(self) -> None:
        super().connect()
        context = ssl.create_default_context()
        self.sock = context.wrap_socket(self.sock, server_hostname=self._server_hostname)


def _connection(target: Target, timeout_s: float) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPSConnection(target.address, target.port, timeout_s, target.host)
    return http.client.HTTPConnection(target.address, target.port, timeout=timeout_s)


def _request_headers(target: Target, body: Any | None, extra: Mapping[str, str]) -> dict[str, str]:
    ours = {"Accept": "application/json", "User-Agent": "sluice/1"}
    if body is not None:
        ours["Content-Type"] = "application/json"
    for name, value in extra.items():
        # Checked here so the error names the header but never echoes its (secret) value.
        bad = not (name + value).isascii() or any(c in name for c in ":\r\n\0 ")
        if not name or bad or any(c in value for c in "\r\n\0"):
            raise PermanentError(f"header {name!r} has an invalid name or value")
    # The caller's value wins over ours whatever its case; Host always names the target.
    merged = {k.lower(): (k, v) for k, v in [*ours.items(), *extra.items()]}
    merged["host"] = ("Host", target.host_header)
    return dict(merged.values())


def _read_body(
    response: http.client.HTTPResponse, sock: socket.socket, limit: int, deadline: float
) -> bytes:
    length = response.getheader("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PermanentError(f"response body is {length} bytes, over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        # read1 returns after one socket read, so the deadline is checked between reads.
        chunk = response.read1(min(65536, limit + 1 - size))
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise PermanentError(f"response body is over the {limit}-byte limit")
        chunks.append(chunk)
    if response.length:  # read1 returns b"" at EOF even when Content-Length promised more
        raise http.client.IncompleteRead(b"".join(chunks), response.length)
    return b"".join(chunks)


def request_json(
    target: Target,
    *,
    method: str,
    body: Any | None,
    headers: Mapping[str, str],
    timeout_s: float,
    max_response_bytes: int = 1_048_576,
) -> HttpResponse:
    try:
        payload = None if body is None else json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise PermanentError(f"request body for {target.safe_url} is not JSON: {e}") from None
    if not method.isascii() or not method.isalpha():
        raise PermanentError(f"HTTP method {method!r} is not valid")
    all_headers = _request_headers(target, body, headers)
    conn = _connection(target, timeout_s)
    response: http.client.HTTPResponse | None = None
    try:
        conn.request(method.upper(), target.path, body=payload, headers=all_headers)
        # Keep the socket: getresponse() drops conn.sock when the server closes after this.
        sock, deadline = conn.sock, time.monotonic() + timeout_s
        response = conn.getresponse()  # never follows redirects: a 3xx comes back as is
        data = _read_body(response, sock, max_response_bytes, deadline)
        names = {k.lower(): ", ".join(response.headers.get_all(k) or []) for k in response.headers}
        return HttpResponse(response.status, names, data, target.safe_url)
    except ssl.SSLCertVerificationError as e:
        raise PermanentError(
            f"TLS certificate of {target.host!r} failed verification ({e.verify_message})"
        ) from None
    except TimeoutError:
        raise OutboundTransient(f"timed out after {timeout_s}s calling {target.safe_url}") from None
    except http.client.IncompleteRead:
        raise OutboundTransient(f"response from {target.safe_url} was cut short") from None
    except OSError as e:  # refused, reset, unreachable, TLS handshake dropped
        raise OutboundTransient(f"connection to {target.safe_url} failed: {e}") from None
    except http.client.HTTPException as e:
        raise PermanentError(f"{target.safe_url} sent a malformed response ({e!r})") from None
    finally:
        if response is not None:
            response.close()
        conn.close()


def classify(response: HttpResponse) -> str:
    if 200 <= response.status < 300:
        return "ok"
    if response.status == 429 or 500 <= response.status < 600:
        return "retry"
    return "fail"


def retry_after_s(response: HttpResponse) -> float | None:
    """A numeric Retry-After in seconds, capped; HTTP-dates and junk give None."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)
