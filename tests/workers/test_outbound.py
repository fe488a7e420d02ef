"""Outbound HTTP: which URLs are refused, and what goes over the wire to real loopback servers.

Loopback is exactly what the module refuses by default, so calls to the test servers go through
the allowlist; acceptance of public addresses is checked with a substituted getaddrinfo, since
tests have no network."""

import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import pytest

from workers import outbound
from workers.operators.base import PermanentError
from workers.outbound import (
    HttpResponse,
    OutboundRefused,
    OutboundTransient,
    classify,
    request_json,
    resolve_target,
    retry_after_s,
)

AddrInfo = list[tuple[Any, ...]]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() then joins the handler threads

    def __init__(self, host: str) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), Handler)
        self.seen: list[Seen] = []
        self.release = threading.Event()  # set at teardown, so slow handlers stop

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server_port}{path}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.handle_any()

    def do_POST(self) -> None:
        self.handle_any()

    def handle_any(self) -> None:
        server = cast(Server, self.server)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        server.seen.append(Seen(self.command, self.path, headers, body))
        route, _, arg = self.path.partition("?")[0].strip("/").partition("/")
        if route == "slow":  # never answers within the test's timeout
            server.release.wait(5)
        elif route == "drip":  # promises 50 bytes, sends one every 0.1 s
            self.reply(200, b"", length=50)
            for _ in range(50):
                if server.release.wait(0.1):
                    return
                self.wfile.write(b"x")
        elif route == "short":  # promises 100 bytes, sends 10 and closes
            self.reply(200, b"0123456789", length=100)
        elif route == "big":
            self.reply(200, b"[" + b"1," * int(arg) + b"1]")
        elif route == "unsized":  # no Content-Length: the body ends when the connection does
            self.reply(200, b"[" + b"1," * int(arg) + b"1]", length=None)
        elif route == "status":
            extra = {"Retry-After": "2"} if arg == "429" else {}
            extra |= {"Location": "http://example.com/"} if arg == "302" else {}
            self.reply(int(arg), b"{}", headers=extra)
        elif route == "text":
            self.reply(200, b"<html>not json</html>")
        else:
            self.reply(200, json.dumps({"ok": True, "path": self.path}).encode())

    def reply(
        self,
        status: int,
        body: bytes,
        length: int | None = -1,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if length is not None:
            self.send_header("Content-Length", str(len(body) if length == -1 else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serve(
    host: str, wrap: Callable[[socket.socket], socket.socket] | None = None
) -> Iterator[Server]:
    server = Server(host)
    if wrap is not None:
        server.socket = wrap(server.socket)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def server() -> Iterator[Server]:
    with serve("127.0.0.1") as running:
        yield running


def call(url: str, allow: tuple[str, ...] = ("127.0.0.1",), **kwargs: Any) -> HttpResponse:
    options: dict[str, Any] = {"method": "GET", "body": None, "headers": {}, "timeout_s": 2.0}
    return request_json(resolve_target(url, allow), **(options | kwargs))


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> dict[str, int]:
    """getaddrinfo answers `answers` for those names and defers to the real one otherwise
    (connecting to an IP literal goes through it too). Returns lookups per faked name."""
    real = socket.getaddrinfo
    lookups = dict.fromkeys(answers, 0)

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> AddrInfo:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        lookups[host] += 1
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers[host]
        ]

    monkeypatch.setattr(outbound.socket, "getaddrinfo", getaddrinfo)
    return lookups


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address", "kind"),
    [
        ("127.0.0.1", "127.0.0.1", "loopback"),
        ("10.0.0.1", "10.0.0.1", "private"),
        ("192.168.1.1", "192.168.1.1", "private"),
        ("172.16.0.1", "172.16.0.1", "private"),
        ("169.254.169.254", "169.254.169.254", "link-local"),
        ("100.64.0.1", "100.64.0.1", "non-public"),
        ("0.0.0.0", "0.0.0.0", "unspecified"),
        ("[::1]", "::1", "loopback"),
        ("[fc00::1]", "fc00::1", "private"),
        ("[fe80::1]", "fe80::1", "link-local"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1", "IPv4-mapped loopback"),
        ("localhost", "127.0.0.1", "loopback"),
    ],
)
def test_refuses_non_public_addresses(host: str, address: str, kind: str) -> None:
    with pytest.raises(OutboundRefused) as refused:
        resolve_target(f"http://{host}:8080/hook", allowlist=["example.com"])
    message = str(refused.value)
    shown_host = host.strip("[]")
    if ":" in shown_host:  # IP literals are named in their normal form
        shown_host = str(ipaddress.ip_address(shown_host))
    assert f"host {shown_host!r} resolves to " in message
    assert f", {'an' if kind[0] in 'aeiouI' else 'a'} {kind} address;" in message
    assert "allowlist names the host" in message
    if host != "localhost":
        assert address in message or str(ipaddress.ip_address(address)) in message


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://example.com/file", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http://user:hunter2@example.com/", "credentials"),
        ("https://token@example.com/", "credentials"),
        ("http:///no-host", "no host"),
        ("http://example.com:0/", "port 0"),
        ("http://example.com:70000/", "not a valid host and port"),
        ("http://example.com/a b", "spaces"),
        ("http://a..b/", "not a valid name"),
    ],
)
def test_refuses_bad_urls(url: str, says: str) -> None:
    with pytest.raises(OutboundRefused, match=says) as refused:
        resolve_target(url, allowlist=[])
    assert "hunter2" not in str(refused.value)
    assert isinstance(refused.value, PermanentError)  # the step goes to dead, no retries


def test_public_address_is_accepted_and_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"api.example.com": ["93.184.215.14", "2606:2800:21f:cb07::1"]})
    target = resolve_target("HTTPS://API.Example.com./v1/items?page=2#frag", allowlist=[])
    assert (target.scheme, target.host, target.port) == ("https", "api.example.com", 443)
    assert target.address == "93.184.215.14"  # the first answer, used for the connection
    assert target.path == "/v1/items?page=2"
    assert resolve_target("http://api.example.com", allowlist=[]).path == "/"


@pytest.mark.parametrize("private", ["10.0.0.5", "::ffff:192.168.0.1"])
def test_name_resolving_to_public_and_private_is_refused(
    monkeypatch: pytest.MonkeyPatch, private: str
) -> None:
    fake_dns(monkeypatch, {"mixed.example.com": ["93.184.215.14", private]})
    with pytest.raises(OutboundRefused, match=f"'mixed.example.com' resolves to {private}, a"):
        resolve_target("https://mixed.example.com/", allowlist=["other.example.com"])


def test_dns_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(errno: int) -> Callable[..., AddrInfo]:
        def getaddrinfo(*args: Any, **kwargs: Any) -> AddrInfo:
            raise socket.gaierror(errno, "lookup failed")

        return getaddrinfo

    monkeypatch.setattr(outbound.socket, "getaddrinfo", fail(socket.EAI_NONAME))
    with pytest.raises(OutboundRefused, match=r"'nowhere\.example' does not resolve"):
        resolve_target("https://nowhere.example/", allowlist=[])
    monkeypatch.setattr(outbound.socket, "getaddrinfo", fail(socket.EAI_AGAIN))
    with pytest.raises(OutboundTransient, match=r"DNS lookup of 'nowhere\.example' failed"):
        resolve_target("https://nowhere.example/", allowlist=[])


# --- calls to loopback servers ----------------------------------------------------------


def test_allowlisted_ip_reaches_server_with_headers_and_body(server: Server) -> None:
    response = call(
        server.url("/hook?x=1"),
        allow=("127.0.0.1",),
        method="POST",
        body={"order": 7, "name": "café"},
        headers={"Idempotency-Key": "run-1:step-2", "accept": "application/vnd.x+json"},
    )
    assert response.status == 200
    assert classify(response) == "ok"
    assert response.json() == {"ok": True, "path": "/hook?x=1"}
    assert response.headers["content-type"] == "application/json"
    [seen] = server.seen
    assert (seen.method, seen.path) == ("POST", "/hook?x=1")
    assert json.loads(seen.body) == {"order": 7, "name": "café"}
    assert seen.headers["host"] == f"127.0.0.1:{server.server_port}"
    assert seen.headers["idempotency-key"] == "run-1:step-2"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["accept"] == "application/vnd.x+json"  # the caller's value wins
    assert seen.headers["user-agent"] == "sluice/1"


def test_allowlisted_name_reaches_server() -> None:
    first = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)[0][4][0]
    with serve(str(first)) as server:
        response = call(server.url("/hook", host="localhost"), allow=("LOCALHOST.",))
        assert response.json()["ok"] is True
        assert server.seen[0].headers["host"] == f"localhost:{server.server_port}"
        assert "content-type" not in server.seen[0].headers  # no body, no content type


def test_connects_to_pinned_address_without_resolving_again(
    monkeypatch: pytest.MonkeyPatch, server: Server
) -> None:
    lookups = fake_dns(monkeypatch, {"api.example.test": ["127.0.0.1"]})
    target = resolve_target(server.url("/hook", host="api.example.test"), ["api.example.test"])
    assert target.address == "127.0.0.1"
    response = request_json(target, method="GET", body=None, headers={}, timeout_s=2)
    assert response.status == 200
    assert lookups == {"api.example.test": 1}
    assert server.seen[0].headers["host"] == f"api.example.test:{server.server_port}"


def test_slow_server_times_out(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(OutboundTransient, match=r"timed out after 0.3s calling http://127"):
        call(server.url("/slow"), timeout_s=0.3)
    assert time.monotonic() - started < 3  # gave up long before the server's 5 s


def test_trickling_body_hits_overall_deadline(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(OutboundTransient, match=r"timed out after 0\.5s"):
        call(server.url("/drip"), timeout_s=0.5)
    assert time.monotonic() - started < 3  # each byte came in time; the whole did not


def test_closed_port_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(
        OutboundTransient, match=r"connection to http://127\.0\.0\.1:\d+/hook failed"
    ):
        call(f"http://127.0.0.1:{port}/hook")


def test_truncated_body_is_transient(server: Server) -> None:
    with pytest.raises(OutboundTransient, match="cut short"):
        call(server.url("/short"))


@pytest.mark.parametrize("route", ["big", "unsized"])
def test_body_over_limit_is_permanent(server: Server, route: str) -> None:
    assert call(server.url(f"/{route}/400"), max_response_bytes=1000).json()[0] == 1
    with pytest.raises(PermanentError, match="over the 1000-byte limit"):
        call(server.url(f"/{route}/600"), max_response_bytes=1000)


def test_non_json_body_names_url(server: Server) -> None:
    response = call(server.url("/text?key=secret"))
    assert "not json" in response.text
    with pytest.raises(PermanentError, match=r"from http://127\.0\.0\.1:\d+/text\?… is not"):
        response.json()


@pytest.mark.parametrize(
    ("status", "verdict", "wait"),
    [(200, "ok", None), (404, "fail", None), (429, "retry", 2.0), (503, "retry", None)],
)
def test_classify_statuses(server: Server, status: int, verdict: str, wait: float | None) -> None:
    response = call(server.url(f"/status/{status}"))
    assert response.status == status
    assert classify(response) == verdict
    assert retry_after_s(response) == wait


def test_redirect_is_returned_not_followed(server: Server) -> None:
    response = call(server.url("/status/302"))
    assert (response.status, classify(response)) == (302, "fail")
    assert response.headers["location"] == "http://example.com/"
    assert len(server.seen) == 1


def test_bad_request_is_permanent_and_does_not_echo_secrets(server: Server) -> None:
    target = resolve_target(server.url("/hook"), ["127.0.0.1"])
    with pytest.raises(PermanentError, match="'Authorization' has an invalid") as bad:
        request_json(
            target,
            method="POST",
            body={},
            headers={"Authorization": "Bearer s3cret\r\nX-Injected: 1"},
            timeout_s=1,
        )
    assert "s3cret" not in str(bad.value)
    with pytest.raises(PermanentError, match="is not JSON"):
        request_json(target, method="POST", body={"x": {1, 2}}, headers={}, timeout_s=1)
    assert server.seen == []


@pytest.mark.parametrize(
    ("value", "wait"),
    [("0", 0.0), ("1.5", 1.5), ("86400", 300.0), ("-1", None), ("nan", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("", None)],
)  # fmt: skip
def test_retry_after_s(value: str, wait: float | None) -> None:
    assert retry_after_s(HttpResponse(429, {"retry-after": value}, b"")) == wait


# --- https ------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A CA, and a certificate it signed for api.example.test only (no IP address in it):
    returns (ca.pem, server.pem with its key)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: str, key: Any, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            usage = dict.fromkeys(
                ["digital_signature", "content_commitment", "key_encipherment",
                 "data_encipherment", "key_agreement", "encipher_only", "decipher_only"], False,
            )  # fmt: skip
            builder = builder.add_extension(
                x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage), critical=True
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("Sluice Test CA", "Sluice Test CA", ca_key, ca_key, ca=True)
    cert = build("api.example.test", "Sluice Test CA", key, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca_path, server_path = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    server_path.write_bytes(cert.public_bytes(pem) + key_pem)
    return ca_path, server_path


@pytest.fixture
def tls_server(tls_files: tuple[Path, Path]) -> Iterator[tuple[Server, list[str | None]]]:
    """An https server on 127.0.0.1; the list collects the SNI names clients sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files[1])
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    with serve("127.0.0.1", lambda sock: context.wrap_socket(sock, server_side=True)) as server:
        yield server, names


def test_https_verifies_certificate_against_real_host(
    monkeypatch: pytest.MonkeyPatch, tls_server: tuple[Server, list[str | None]]
) -> None:
    server, names = tls_server
    fake_dns(monkeypatch, {"api.example.test": ["127.0.0.1"]})
    url = f"https://api.example.test:{server.server_port}/hook"
    with pytest.raises(PermanentError, match=r"TLS certificate of 'api\.example\.test' failed"):
        call(url, allow=("api.example.test",))
    assert names == ["api.example.test"]  # SNI carries the name, not the pinned IP
    assert server.seen == []


def test_https_to_pinned_address_with_trusted_certificate(
    monkeypatch: pytest.MonkeyPatch,
    tls_server: tuple[Server, list[str | None]],
    tls_files: tuple[Path, Path],
) -> None:
    server, names = tls_server
    fake_dns(monkeypatch, {"api.example.test": ["127.0.0.1"]})
    trusting = ssl.create_default_context(cafile=tls_files[0])
    monkeypatch.setattr(outbound.ssl, "create_default_context", lambda: trusting)
    url = f"https://api.example.test:{server.server_port}/hook"
    assert call(url, allow=("api.example.test",)).json()["ok"] is True
    assert server.seen[0].headers["host"] == f"api.example.test:{server.server_port}"
    assert names == ["api.example.test"]
