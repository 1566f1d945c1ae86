"""A backend behind HTTPS: its certificate is verified, and the deadline holds over TLS too."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator import backend
from tests import function as bo
from tests.helpers import SilentServer


class _Activity(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"idle_seconds": 42}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def tls_backend(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS backend on 127.0.0.1 with a self-signed certificate; yields its URL and the certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Activity)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert_path
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_a_certificate_nobody_vouches_for_is_refused(tls_backend: tuple[str, Path]) -> None:
    url, _ = tls_backend
    result = bo.fetch_activity(url + "/api/last-activity", 2.0, bo.Clock())
    assert isinstance(result, bo.ActivityUnknown)
    assert "SSLCertVerificationError" in result.reason


def test_a_trusted_certificate_is_read_within_the_deadline(
    tls_backend: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No public CA signs for 127.0.0.1: trust this test's certificate instead of botocore's bundle.
    url, cert_path = tls_backend
    monkeypatch.setattr(backend, "_tls_context", lambda: ssl.create_default_context(cafile=str(cert_path)))
    assert bo.fetch_activity(url + "/api/last-activity", 2.0, bo.Clock()) == bo.Activity(42.0)


def test_the_tls_handshake_gets_only_what_the_connect_left(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server that accepts and never sends its ServerHello, behind a TCP connect that takes 3 s (no network
    # here can be made slow: the connect is delayed by hand). The handshake used to get the whole grant again.
    server = SilentServer()
    connect = socket.socket.connect  # the hermetic one: loopback only

    def slow_connect(sock: socket.socket, address: Any) -> None:
        time.sleep(3)
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", slow_connect)
    started = time.monotonic()
    try:
        result = bo.fetch_activity(server.url.replace("http:", "https:") + "/api/last-activity", 4.0, bo.Clock())
    finally:
        server.close()
    elapsed = time.monotonic() - started
    assert isinstance(result, bo.ActivityUnknown)
    assert "timed out" in result.reason
    assert elapsed < 4.0 + 1.5  # the whole exchange within its grant; the handshake given 4 s again took 7 s
