"""The backend, over one HTTP exchange bounded in time and bytes whatever the server does: its activity, its drain
(and the word to resume), and its health. requests cannot promise this: its timeouts apply to each socket operation,
so a server that trickles a byte at a time holds it for ever (requests/requests#4276). Here DNS, connect, TLS,
sending and every receive share one deadline, and reading stops at the byte limit."""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import ssl
from collections.abc import Callable
from functools import cache
from typing import Any, Final
from urllib.parse import urlsplit

from orchestrator.activity import Activity, ActivityUnknown, parse_activity
from orchestrator.budget import MIN_UNDRAIN_SECONDS, Clock, Deadline, Reserve, within
from orchestrator.errors import OutOfTimeError
from orchestrator.values import short, strict_json

MAX_ACTIVITY_BYTES: Final = 64 * 1024  # the whole activity answer: status line, headers and body
MAX_STATUS_LINE_BYTES: Final = 1024  # all the health probe reads
INTERIM_STATUS: Final = re.compile(rb"HTTP/1\.[01] 1(?!01)[0-9]{2}[ \r]")  # 1xx but 101 Switching Protocols


class ResponseTooLargeError(Exception):
    """The server sent more bytes than the exchange allows."""


def fetch_activity(url: str, seconds: float, clock: Clock) -> Activity | ActivityUnknown:
    """GET the activity endpoint within `seconds`; every failure becomes an ActivityUnknown that names it."""
    try:
        status_code, body = http_exchange("GET", url, seconds, MAX_ACTIVITY_BYTES, clock.monotonic)
    except TimeoutError:
        return ActivityUnknown(f"GET {url} timed out after {seconds:.1f}s")
    except ResponseTooLargeError:
        return ActivityUnknown(f"GET {url} sent more than {MAX_ACTIVITY_BYTES // 1024} KiB")
    except (OSError, http.client.HTTPException) as error:
        return ActivityUnknown(f"GET {url} failed: {type(error).__name__}")
    if not 200 <= status_code < 300:
        return ActivityUnknown(f"GET {url} answered HTTP {status_code}")
    return parse_activity(body, clock.now())


class NotDrainedError(Exception):
    """The backend did not drain (the message says why): it is not stopped this time. `maybe_drained`: it may have
    drained all the same (the request reached it, and its answer was not a clear no), so it must be told to resume."""

    def __init__(self, message: str, *, maybe_drained: bool) -> None:
        super().__init__(message)
        self.maybe_drained = maybe_drained


def drain(url: str, http_timeout_seconds: float, deadline: Deadline, keep: Reserve) -> None:
    """POST the backend's drain endpoint right before a stop, keeping `keep` for the stop. Returns once it
    drained (it then refuses new work); anything but a 2xx {"drained": true} is a NotDrainedError."""
    seconds = deadline.grant_backend(f"POST {url}", http_timeout_seconds, keep=keep)
    try:
        status_code, body = http_exchange("POST", url, seconds, MAX_ACTIVITY_BYTES, deadline.clock.monotonic)
    except TimeoutError:
        raise NotDrainedError(f"the drain (POST {url}) timed out after {seconds:.1f}s", maybe_drained=True) from None
    except (OSError, http.client.HTTPException, ResponseTooLargeError) as error:
        unreached = isinstance(error, ConnectionRefusedError | socket.gaierror)  # it never reached the backend
        message = f"the drain (POST {url}) failed: {type(error).__name__}"
        raise NotDrainedError(message, maybe_drained=not unreached) from None
    try:
        answer = strict_json(body)
    except ValueError:
        answer = None
    if not (200 <= status_code < 300 and isinstance(answer, dict) and answer.get("drained") is True):
        shown = json.dumps(answer)[:200] if answer is not None else short(body[:60])
        said_no = not 200 <= status_code < 300 or (isinstance(answer, dict) and answer.get("drained") is False)
        message = f"the backend did not drain (POST {url} answered HTTP {status_code}: {shown})"
        raise NotDrainedError(message, maybe_drained=not said_no)


def undrain(url: str, http_timeout_seconds: float, deadline: Deadline) -> str:
    """DELETE the drain ("resume work now") after a stop that did not happen, within what is left; says how it went.
    A backend that cannot be told resumes when its drain lease ends."""
    try:
        seconds = deadline.grant_backend(f"DELETE {url}", http_timeout_seconds, least=MIN_UNDRAIN_SECONDS)
        status_code, _ = http_exchange("DELETE", url, seconds, MAX_ACTIVITY_BYTES, deadline.clock.monotonic)
    except (OutOfTimeError, OSError, http.client.HTTPException, ResponseTooLargeError) as error:
        answer = "out of time" if isinstance(error, OutOfTimeError) else type(error).__name__
    else:
        if 200 <= status_code < 300:
            return f"The backend was told to resume work (DELETE {url} answered HTTP {status_code})."
        answer = f"HTTP {status_code}"
    return f"The backend could not be told to resume (DELETE {url}: {answer}): it refuses work until its lease ends."


def probe_health(url: str, seconds: float, clock: Clock) -> dict[str, Any]:
    """GET the health endpoint within `seconds`, reading its status line and nothing more."""
    try:
        status_code, _ = http_exchange("GET", url, seconds, MAX_STATUS_LINE_BYTES, clock.monotonic, status_only=True)
    except (OSError, http.client.HTTPException, ResponseTooLargeError):
        return {"reachable": False, "healthy": False, "status_code": None}
    return {"reachable": True, "healthy": 200 <= status_code < 300, "status_code": status_code}


def http_exchange(
    method: str, url: str, seconds: float, max_bytes: int, monotonic: Callable[[], float], *, status_only: bool = False
) -> tuple[int, bytes]:
    """One HTTP/1.1 request that ends within `seconds` and receives at most `max_bytes`, whatever the server does.

    requests cannot promise this: its timeouts apply to each socket operation, so a server that trickles
    a byte at a time holds it for ever (requests/requests#4276). Here DNS, connect, TLS, sending and every
    receive share one deadline. Redirects are not followed."""
    ends_at = monotonic() + seconds
    parts = urlsplit(url)
    https = parts.scheme == "https"
    sock = _connect(parts.hostname or "", parts.port or (443 if https else 80), https, ends_at, monotonic)
    try:
        stream = _DeadlineStream(sock, ends_at, monotonic, max_bytes)
        request = f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: application/json\r\n"
        length = "" if method == "GET" else "Content-Length: 0\r\n"  # a POST without a body says so
        stream.sendall(f"{request}{length}Connection: close\r\n\r\n".encode())
        stream.skip_interim_responses()
        if status_only:  # "HTTP/1.1 200 OK": the status line and nothing more
            line = stream.makefile().readline(max_bytes)
            version, _, rest = line.partition(b" ")
            if not version.startswith(b"HTTP/") or not rest[:3].isdigit():
                raise http.client.BadStatusLine(repr(line[:60]))
            return int(rest[:3]), b""
        response = http.client.HTTPResponse(stream, method=method)  # type: ignore[arg-type]
        response.begin()
        if response.length is not None and response.length > max_bytes:  # refused before a byte of it is read
            raise ResponseTooLargeError
        return response.status, response.read(max_bytes)  # never read(): it allocates what the server declares
    finally:
        sock.close()


class _DeadlineStream(io.RawIOBase):
    """A connected socket on which every send and receive ends by one deadline, and that yields at most
    `max_bytes` (status line and headers included); http.client reads the response from it."""

    def __init__(self, sock: socket.socket, ends_at: float, monotonic: Callable[[], float], max_bytes: int) -> None:
        super().__init__()
        self._sock, self._ends_at, self._monotonic, self._bytes_left = sock, ends_at, monotonic, max_bytes
        self._pending = b""  # read while looking past interim responses, served first

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._pending:
            size = min(len(buffer), len(self._pending))
            buffer[:size], self._pending = self._pending[:size], self._pending[size:]
            return size
        if self._bytes_left <= 0:
            raise ResponseTooLargeError
        self._sock.settimeout(_seconds_left(self._ends_at, self._monotonic))
        received = self._sock.recv_into(buffer, min(len(buffer), self._bytes_left))
        self._bytes_left -= received
        return received

    def skip_interim_responses(self) -> None:
        """Drop 1xx responses before the final one (103 Early Hints, a stray 100 Continue): http.client skips
        only 100, and the health probe none. They count against the byte limit like the rest."""
        head = b""
        while True:
            while b"\n" not in head and (chunk := self.read(4096)):
                head += chunk
            if not INTERIM_STATUS.match(head):
                break
            while b"\r\n\r\n" not in head and (chunk := self.read(4096)):
                head += chunk
            head = head.partition(b"\r\n\r\n")[2]
        self._pending = head

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_seconds_left(self._ends_at, self._monotonic))  # sendall's total since 3.5
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(self)


def _connect(host: str, port: int, https: bool, ends_at: float, monotonic: Callable[[], float]) -> socket.socket:
    """DNS, TCP and TLS, all before `ends_at` (monotonic); the first address that answers wins. getaddrinfo takes no
    timeout: it runs on a worker thread that is waited for no longer than what is left."""

    def lookup() -> list[Any]:
        try:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except UnicodeError:  # the IDNA codec refuses the name (an empty label, a label over 63 characters)
            raise socket.gaierror(socket.EAI_NONAME, f"{host!r} is not a valid host name") from None

    failure: OSError = ConnectionError(f"no address found for {host}")
    for family, kind, protocol, _, address in within(_seconds_left(ends_at, monotonic), lookup, f"resolving {host}"):
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(_seconds_left(ends_at, monotonic))
            sock.connect(address)
            if https:  # the socket's timeout bounds the whole handshake (Python 3.5+): give it only what is left
                sock.settimeout(_seconds_left(ends_at, monotonic))
                sock = _tls_context().wrap_socket(sock, server_hostname=host)
            return sock
        except OSError as error:
            sock.close()
            failure = error
    raise failure


@cache
def _tls_context() -> ssl.SSLContext:
    from botocore.httpsession import where  # the CA bundle botocore itself trusts, in every Lambda runtime

    return ssl.create_default_context(cafile=where())


def _seconds_left(ends_at: float, monotonic: Callable[[], float]) -> float:
    left = ends_at - monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left
