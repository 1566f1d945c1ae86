"""A reference backend that serves the activity contract the orchestrator reads.

Standard library only, so it runs anywhere; the backend team ports the few lines of
`ActivityTracker` to their framework (a middleware that calls `request_started`/`request_finished`,
and `job()` around background work).

    GET  /health              200 {"status": "ok"} once booted (503 before, and while draining); not activity
    GET  /api/last-activity   the contract: {"idle_seconds", "busy", "active_requests", ...}; not activity
    POST /api/drain           {"drained": true} if nothing ran or arrived since the last report, and from then on
                              every request is refused 503 with Retry-After for DRAIN_LEASE_SECONDS; else
                              {"drained": false, ...the activity}; not activity
    DELETE /api/drain         ends a drain ("resume work now": the stop did not happen); not activity
    POST /api/jobs?seconds=N  runs a simulated job for N seconds (busy meanwhile); activity
    anything else             404, and counts as activity like any real request

Run it: python examples/reference_backend.py --port 8000
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Requests to these paths are probes, not use: counting them would keep the backend awake for ever.
PROBE_PATHS = frozenset({"/health", "/api/last-activity", "/api/drain"})
DRAIN_LEASE_SECONDS = 120.0  # how long a drain refuses work if the stop never comes


class ActivityTracker:
    """Thread-safe record of the last request and of the work in flight, and since when it has been in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = time.monotonic()  # a fresh start counts as activity
        self._last_wall = datetime.now(UTC)
        self._in_flight: dict[int, tuple[str, datetime]] = {}  # ticket: (request or job, when it began)
        self._tickets = itertools.count()
        self._arrivals = 0  # requests and jobs ever started
        self._reported_arrivals = 0  # as of the last snapshot the orchestrator read
        self._draining_until = 0.0

    def request_started(self) -> int:
        """A request began: returns its ticket, for request_finished()."""
        return self._begin("request")

    def request_finished(self, ticket: int | None = None) -> None:
        """A request ended (without its ticket: the one in flight longest, so that busy_since is never too early)."""
        self._end("request", ticket)

    @contextmanager
    def job(self) -> Iterator[None]:
        """Wrap background work (a grid search) so that the backend reads as busy while it runs."""
        ticket = self._begin("job")
        try:
            yield
        finally:
            self._end("job", ticket)

    def snapshot(self) -> dict[str, Any]:
        """The activity contract's payload; what it reports is what a drain compares against."""
        with self._lock:
            self._reported_arrivals = self._arrivals
            return self._activity()

    def drain(self, lease_seconds: float = DRAIN_LEASE_SECONDS) -> dict[str, Any]:
        """Agree to be stopped only if nothing is in flight and nothing arrived since the last snapshot;
        then refuse new work for `lease_seconds` (in case the stop never comes)."""
        with self._lock:
            quiet = not self._in_flight and self._arrivals == self._reported_arrivals
            if not quiet:
                return {"drained": False, **self._activity()}
            self._draining_until = time.monotonic() + lease_seconds
            return {"drained": True, "lease_seconds": lease_seconds}

    def resume(self) -> dict[str, Any]:
        """End a drain: the orchestrator could not stop the instance, so serve again now, not at the lease's end."""
        with self._lock:
            was_draining = self._draining_until > time.monotonic()
            self._draining_until = 0.0
            return {"drained": False, "resumed": was_draining}

    def draining_seconds_left(self) -> float:
        with self._lock:
            return max(0.0, self._draining_until - time.monotonic())

    def _begin(self, kind: str) -> int:
        with self._lock:
            ticket = next(self._tickets)
            self._in_flight[ticket] = (kind, datetime.now(UTC))
            self._arrivals += 1
            self._touch()
            return ticket

    def _end(self, kind: str, ticket: int | None) -> None:
        with self._lock:
            mine = [t for t, (what, _) in self._in_flight.items() if what == kind]
            if ticket is None and mine:
                ticket = mine[0]  # the oldest of its kind: dicts keep the order the tickets were given in
            if ticket is not None:
                self._in_flight.pop(ticket, None)
            self._touch()

    def _activity(self) -> dict[str, Any]:
        kinds = [what for what, _ in self._in_flight.values()]
        began = [when for _, when in self._in_flight.values()]
        return {
            "idle_seconds": round(time.monotonic() - self._last, 3),  # monotonic: immune to clock changes
            "last_activity": self._last_wall.isoformat(),
            "busy": bool(self._in_flight),
            "active_requests": kinds.count("request"),
            "active_jobs": kinds.count("job"),
            **({"busy_since": min(began).isoformat()} if began else {}),
        }

    def _touch(self) -> None:
        self._last = time.monotonic()
        self._last_wall = datetime.now(UTC)


class ReferenceBackend(ThreadingHTTPServer):
    """The backend's HTTP server: the contract's endpoints plus a simulated job endpoint."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], boot_seconds: float = 0.0) -> None:
        super().__init__(address, _Handler)
        self.tracker = ActivityTracker()
        self.ready_at = time.monotonic() + boot_seconds
        self.jobs_done = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def run_job(self, seconds: float) -> None:
        with self.tracker.job():
            time.sleep(seconds)
        self.jobs_done += 1


class _Handler(BaseHTTPRequestHandler):
    server: ReferenceBackend

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        url = urlsplit(self.path)
        if url.path in PROBE_PATHS:
            self._probe(url.path)
            return
        draining = self.server.tracker.draining_seconds_left()
        if draining:  # about to be stopped: refuse, and do not count it as use (the app wakes it again)
            self._send(503, {"error": "draining: the backend is about to stop"}, {"Retry-After": f"{draining:.0f}"})
            return
        tracker = self.server.tracker
        ticket = tracker.request_started()
        try:
            if url.path == "/api/jobs" and self.command == "POST":
                seconds = float(parse_qs(url.query).get("seconds", ["1"])[0])
                threading.Thread(target=self.server.run_job, args=(seconds,), daemon=True).start()
                self._send(202, {"accepted": True, "seconds": seconds})
            else:
                self._send(404, {"error": f"no route {url.path}"})
        finally:
            tracker.request_finished(ticket)

    def _probe(self, path: str) -> None:
        tracker = self.server.tracker
        if path == "/health":
            booted = time.monotonic() >= self.server.ready_at
            status = "draining" if tracker.draining_seconds_left() else "ok" if booted else "booting"
            self._send(200 if status == "ok" else 503, {"status": status})
        elif path == "/api/drain":
            if self.command == "POST":
                self._send(200, tracker.drain())
            elif self.command == "DELETE":
                self._send(200, tracker.resume())
            else:
                self._send(405, {"error": "POST or DELETE /api/drain"}, {"Allow": "POST, DELETE"})
        else:
            self._send(200, tracker.snapshot())

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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
