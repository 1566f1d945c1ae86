"""A reference backend that serves the activity contract the orchestrator reads: a small WSGI app behind
backend_activity.py's WsgiActivityMiddleware (the same tracker and rules a real backend vendors), on the standard
library's WSGI server.

    GET  /health              200 {"status": "ok"} once booted (503 before, and while draining); not activity
    GET  /api/last-activity   the contract: {"idle_seconds", "busy", "active_requests", ...}; not activity
    POST /api/drain           {"drained": true} if nothing ran or arrived since the last report, and from then on
                              every request is refused 503 with Retry-After for the lease (120 s); else
                              {"drained": false, ...the activity}; not activity
    DELETE /api/drain         ends a drain ("resume work now": the stop did not happen); not activity
    POST /api/jobs?seconds=N  runs a simulated job for N seconds (busy meanwhile); activity
    anything else             404, and counts as activity like any real request

Run it from the repository root: python -m examples.reference_backend --port 8000
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from examples.backend_activity import ActivityTracker, WsgiActivityMiddleware

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment


class ReferenceBackend(ThreadingMixIn, WSGIServer):
    """The backend's HTTP server: the contract's endpoints (the middleware's) plus a simulated job endpoint."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], boot_seconds: float = 0.0) -> None:
        super().__init__(address, _QuietHandler)
        self.tracker = ActivityTracker()
        self.ready_at = time.monotonic() + boot_seconds
        self.jobs_done = 0
        self.set_app(WsgiActivityMiddleware(self._app, self.tracker))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def run_job(self, seconds: float) -> None:
        with self.tracker.job():
            time.sleep(seconds)
        self.jobs_done += 1

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path == "/health":  # the middleware answers it while draining, and never counts it
            booted = time.monotonic() >= self.ready_at
            return _send(start_response, 200 if booted else 503, {"status": "ok" if booted else "booting"})
        if path == "/api/jobs" and method == "POST":
            seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("seconds", ["1"])[0])
            threading.Thread(target=self.run_job, args=(seconds,), daemon=True).start()
            return _send(start_response, 202, {"accepted": True, "seconds": seconds})
        return _send(start_response, 404, {"error": f"no route {path}"})


def _send(start_response: StartResponse, status: int, payload: dict[str, Any]) -> list[bytes]:
    body = json.dumps(payload).encode()
    reasons = {200: "OK", 202: "Accepted", 404: "Not Found", 503: "Service Unavailable"}
    start_response(f"{status} {reasons[status]}", [("Content-Type", "application/json"),
                                                   ("Content-Length", str(len(body)))])  # fmt: skip
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_: Any) -> None:  # quiet: the demo prints its own timeline
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--boot-seconds", type=float, default=0.0, help="answer /health 503 this long")
    args = parser.parse_args()
    server = ReferenceBackend(("127.0.0.1", args.port), args.boot_seconds)
    print(f"reference backend on {server.url} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
