"""Servers the tests run on 127.0.0.1, stopped by the fixtures that start them.

`ScriptedBackend` answers each path as a test scripts it, well or badly: at once, never, one byte at a
time in its headers or its body, or without end. It speaks raw HTTP/1.1 over a socket so that it can
misbehave in ways an HTTP framework would not let it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["normal", "silent", "trickle-status", "trickle-headers", "trickle-length", "trickle-close", "endless"]
TRICKLE_FOR_SECONDS = 30.0  # a trickle stops by itself, so that a broken bound shows as a slow test, not a hang


@dataclass(frozen=True)
class Answer:
    """What the backend sends for one path."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    mode: Mode = "normal"
    interval: float = 0.2  # seconds between trickled bytes

    @classmethod
    def json(cls, payload: object, status: int = 200) -> Answer:
        return cls(status, json.dumps(payload).encode())


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class ScriptedBackend(socketserver.ThreadingTCPServer):
    """A backend on 127.0.0.1 whose answers the test sets per path; it records every request."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Answer] = {}
        self.calls: list[Call] = []
        self.on_request: Callable[[Call], None] = lambda _call: None  # e.g. to move a test's fake clock
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, name="scripted-backend", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, path: str, answer: Answer) -> None:
        self.routes[path] = answer

    def reset(self) -> None:
        self.routes.clear()
        self.calls.clear()
        self.on_request = lambda _call: None

    def close(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self._thread.join(5)


class _Handler(socketserver.BaseRequestHandler):
    server: ScriptedBackend

    def handle(self) -> None:
        call = self._read_request()
        if call is None:
            return
        self.server.calls.append(call)
        self.server.on_request(call)
        answer = self.server.routes.get(call.path, Answer(404, b'{"error": "no route"}'))
        with contextlib.suppress(OSError):  # the client hung up, as it should when it gives up
            self._play(answer)

    def _read_request(self) -> Call | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(4096)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            body += self.request.recv(length - len(body))
        return Call(method, path, headers, body)

    def _play(self, answer: Answer) -> None:
        status_line = f"HTTP/1.1 {answer.status} Scripted\r\n".encode()
        headers = "".join(f"{name}: {value}\r\n" for name, value in answer.headers.items()).encode()
        if answer.mode == "normal":
            length = f"Content-Length: {len(answer.body)}\r\nConnection: close\r\n\r\n".encode()
            self.request.sendall(status_line + headers + length + answer.body)
        elif answer.mode == "silent":
            self.server.stopping.wait(TRICKLE_FOR_SECONDS)
        elif answer.mode == "trickle-status":
            self._trickle(status_line + headers + b"\r\n" + answer.body, answer.interval)
        elif answer.mode == "trickle-headers":
            self.request.sendall(status_line + b"X-Slow: ")
            self._trickle(b"x" * 10_000, answer.interval)
        elif answer.mode == "trickle-length":
            self.request.sendall(status_line + headers + f"Content-Length: {len(answer.body)}\r\n\r\n".encode())
            self._trickle(answer.body, answer.interval)
        elif answer.mode == "trickle-close":
            self.request.sendall(status_line + headers + b"Connection: close\r\n\r\n")
            self._trickle(answer.body, answer.interval)
        else:  # endless: a body with no length, sent as fast as the client takes it
            self.request.sendall(status_line + headers + b"Connection: close\r\n\r\n")
            block = b"[" * 65536
            give_up_at = time.monotonic() + TRICKLE_FOR_SECONDS
            while not self.server.stopping.is_set() and time.monotonic() < give_up_at:
                self.request.sendall(block)

    def _trickle(self, data: bytes, interval: float) -> None:
        give_up_at = time.monotonic() + TRICKLE_FOR_SECONDS
        for index in range(len(data)):
            if self.server.stopping.wait(interval) or time.monotonic() > give_up_at:
                return
            self.request.sendall(data[index : index + 1])


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers: an EC2 endpoint or backend that hangs."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self.held.append(self.listener.accept()[0])
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for connection in self.held:
            connection.close()
        self.listener.close()


def free_port() -> int:
    """A loopback port nobody listens on (for a backend that is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
