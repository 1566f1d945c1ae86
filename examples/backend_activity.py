"""The backend's side of the activity contract (docs/activity-contract.md), in two lines:

    app.add_middleware(ActivityMiddleware)                   # FastAPI or Starlette (ASGI)
    app.wsgi_app = WsgiActivityMiddleware(app.wsgi_app)      # Flask (WSGI)

and `with TRACKER.job():` (or `async with TRACKER.job():`) around work that runs outside a request.

Standard library only: vendor this file as the app vendors wake_backend.py. The middleware serves the activity path
(GET) and the drain path (POST drains, DELETE resumes) itself, answers the health path 503 {"status": "draining"}
while drained and passes it to the app otherwise, and counts none of those probes as activity. Every other request is
in flight from its first byte until the last byte of its response is sent and the app is done with it (a streaming
response is work until it ends, and so are Starlette's background tasks and Flask's call_on_close after it; a client
that goes away ends it), an open websocket from its connect until it closes; while drained, new work is answered 503
with Retry-After (a new websocket is refused).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar
from wsgiref.types import WSGIApplication  # Python 3.11 and later

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

ACTIVITY_PATH: Final = "/api/last-activity"
DRAIN_PATH: Final = "/api/drain"
HEALTH_PATH: Final = "/health"
LEASE_SECONDS: Final = 120.0  # how long a drain refuses new work if the stop never comes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]
App = TypeVar("App")  # an ASGI or a WSGI app
Answer = tuple[int, dict[str, Any], dict[str, str]]  # what the middleware answers itself: status, JSON body, headers


class DrainingError(RuntimeError):
    """New work while the backend is drained: it is about to be stopped, and the work would be lost with it."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the backend is drained and about to stop: retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class ActivityTracker:
    """The work in flight and the last activity, safe from threads and from asyncio (its lock is never held across
    an await). What report() says is what a drain compares against."""

    def __init__(self, lease_seconds: float = LEASE_SECONDS, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_seconds = lease_seconds
        self._clock = clock  # monotonic seconds: immune to changes of the wall clock (a test's moves when it says)
        self._lock = threading.Lock()
        self._last = clock()  # a fresh start counts as activity
        self._last_wall = datetime.now(UTC)
        self._in_flight: dict[int, tuple[str, datetime]] = {}  # ticket: (request or job, when it began)
        self._tickets = itertools.count()
        self._arrivals = 0  # requests and jobs ever started
        self._reported = 0  # arrivals as of the last report
        self._drained_until = 0.0

    def request_started(self) -> int:
        """A request began: returns its ticket, for request_finished(). While drained, DrainingError: refuse it."""
        return self._begin("request")

    def request_finished(self, ticket: int | None = None) -> None:
        """A request ended (without its ticket: the one in flight longest, so that busy_since is never too early)."""
        self._end("request", ticket)

    def job(self) -> Job:
        """Work outside a request (a grid search): `with tracker.job():` or `async with tracker.job():`. The backend
        reads as busy while it runs; while drained, entering it raises DrainingError."""
        return Job(self)

    def report(self) -> dict[str, Any]:
        """The activity contract's answer."""
        with self._lock:
            self._reported = self._arrivals
            return self._activity()

    def drain(self) -> dict[str, Any]:
        """Agree to be stopped only if nothing is in flight and nothing arrived since the last report; then refuse new
        work for the lease (in case the stop never comes)."""
        with self._lock:
            if self._in_flight or self._arrivals != self._reported:
                return {"drained": False, **self._activity()}
            self._drained_until = self._clock() + self.lease_seconds
            return {"drained": True, "lease_seconds": self.lease_seconds}

    def resume(self) -> dict[str, Any]:
        """End a drain now: the stop did not happen."""
        with self._lock:
            was_drained = self._drained_until > self._clock()
            self._drained_until = 0.0
            return {"drained": False, "resumed": was_drained}

    def draining_seconds_left(self) -> float:
        with self._lock:
            return max(0.0, self._drained_until - self._clock())

    def _begin(self, kind: str) -> int:
        with self._lock:  # checked and counted at once: no drain slips between the two
            if (left := self._drained_until - self._clock()) > 0:
                raise DrainingError(left)
            ticket = next(self._tickets)
            self._in_flight[ticket] = (kind, datetime.now(UTC))
            self._arrivals += 1
            self._touch()
            return ticket

    def _end(self, kind: str, ticket: int | None) -> None:
        with self._lock:
            if ticket is None:  # the oldest of its kind: dicts keep the order the tickets were given in
                ticket = next((t for t, (what, _) in self._in_flight.items() if what == kind), None)
            if ticket is not None:
                self._in_flight.pop(ticket, None)
            self._touch()

    def _activity(self) -> dict[str, Any]:
        kinds = [what for what, _ in self._in_flight.values()]
        began = [when for _, when in self._in_flight.values()]
        return {
            "idle_seconds": round(self._clock() - self._last, 3),
            "last_activity": self._last_wall.isoformat(),
            "busy": bool(self._in_flight),
            "active_requests": kinds.count("request"),
            "active_jobs": kinds.count("job"),
            **({"busy_since": min(began).isoformat()} if began else {}),
        }

    def _touch(self) -> None:
        self._last = self._clock()
        self._last_wall = datetime.now(UTC)


class Job:
    """One job in flight, from entering to leaving its `with` or `async with` block."""

    def __init__(self, tracker: ActivityTracker) -> None:
        self._tracker = tracker
        self._ticket: int | None = None

    def __enter__(self) -> Job:
        self._ticket = self._tracker._begin("job")
        return self

    def __exit__(self, *_: object) -> None:
        self._tracker._end("job", self._ticket)

    async def __aenter__(self) -> Job:
        return self.__enter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.__exit__(kind, error, trace)


TRACKER: Final = ActivityTracker()  # the middleware's, unless it is given another


class _Paths:
    """The paths the middleware answers itself (the probes, and work refused while drained), and the tracker."""

    def __init__(self, tracker: ActivityTracker, activity_path: str, drain_path: str, health_path: str) -> None:
        self.tracker, self.activity, self.drain, self.health = tracker, activity_path, drain_path, health_path

    def admit(self, method: str, path: str) -> tuple[Answer | None, int | None]:
        """What to do with a request: (an answer, None) for a probe or for work refused while drained; (None, its
        ticket) for work, in flight from now; (None, None) for a health check the app answers itself."""
        answer = self.probe(method, path)
        if answer is not None or path == self.health:
            return answer, None
        try:
            return None, self.tracker.request_started()
        except DrainingError as draining:
            return _refusal(draining), None

    def probe(self, method: str, path: str) -> Answer | None:
        """The answer to a probe (never activity); None for a health check the app answers, or for work."""
        if path == self.activity:
            if method in ("GET", "HEAD"):
                return 200, self.tracker.report(), {}
            return 405, {"error": f"GET {self.activity}"}, {"Allow": "GET, HEAD"}
        if path == self.drain:
            if method == "POST":
                return 200, self.tracker.drain(), {}
            if method == "DELETE":
                return 200, self.tracker.resume(), {}
            return 405, {"error": f"POST or DELETE {self.drain}"}, {"Allow": "POST, DELETE"}
        if path == self.health and self.tracker.draining_seconds_left():
            return 503, {"status": "draining"}, {}
        return None


def _refusal(draining: DrainingError) -> Answer:
    """The answer to new work while drained: not counted as activity (the app wakes the backend again)."""
    retry_after = {"Retry-After": str(max(1, round(draining.retry_after)))}
    return 503, {"error": "draining: the backend is about to stop"}, retry_after


def _encoded(answer: Answer) -> tuple[bytes, list[tuple[str, str]]]:
    """The answer's JSON body and its headers."""
    body = json.dumps(answer[1]).encode()
    return body, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *answer[2].items()]


def _asgi_messages(answer: Answer, kind: str, *, head: bool = False) -> tuple[Message, Message]:
    """The answer as ASGI's two messages, `kind` http or websocket.http (a websocket refused with an HTTP answer)."""
    body, headers = _encoded(answer)
    raw = [(name.lower().encode(), value.encode()) for name, value in headers]
    start = {"type": f"{kind}.response.start", "status": answer[0], "headers": raw}
    return start, {"type": f"{kind}.response.body", "body": b"" if head else body}


class _Middleware(Generic[App]):
    """What both middlewares take: the app they wrap, the tracker (TRACKER unless given) and the paths they answer."""

    def __init__(
        self,
        app: App,
        tracker: ActivityTracker | None = None,
        *,
        activity_path: str = ACTIVITY_PATH,
        drain_path: str = DRAIN_PATH,
        health_path: str = HEALTH_PATH,
    ) -> None:
        self.app = app
        self.tracker = tracker or TRACKER
        self._paths = _Paths(self.tracker, activity_path, drain_path, health_path)


class ActivityMiddleware(_Middleware[AsgiApp]):
    """ASGI 3: `app.add_middleware(ActivityMiddleware)` in FastAPI or Starlette, or `ActivityMiddleware(app)` around any
    ASGI app. Lifespan and other scopes pass through."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:  # lifespan: the app's own startup and shutdown
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        answer, ticket = self._paths.admit(method, path)
        if answer is not None:
            for message in _asgi_messages(answer, "http", head=method == "HEAD"):
                await send(message)
            return
        if ticket is None:  # the app's own health check: not activity
            await self.app(scope, receive, send)
            return
        finished = False

        def finish() -> None:
            nonlocal finished
            if not finished:
                finished = True
                self.tracker.request_finished(ticket)

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client went away: its request is over
                finish()
            return message

        try:  # the app returns once the last byte of its body is sent, and after any work it does after that
            await self.app(scope, receiving, send)
        finally:
            finish()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            ticket = self.tracker.request_started()  # an open websocket is a request in flight until it closes
        except DrainingError as draining:
            await receive()  # websocket.connect
            if "websocket.http.response" in scope.get("extensions", {}):  # refused as HTTP work is
                for message in _asgi_messages(_refusal(draining), "websocket.http"):
                    await send(message)
            else:
                await send({"type": "websocket.close", "code": 1013})  # try again later (the server answers 403)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.tracker.request_finished(ticket)


class WsgiActivityMiddleware(_Middleware[WSGIApplication]):
    """WSGI: `app.wsgi_app = WsgiActivityMiddleware(app.wsgi_app)` in Flask, or around any WSGI app. A request is in
    flight until its response iterable is exhausted or closed (a server closes it when the client goes away)."""

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        answer, ticket = self._paths.admit(method, environ.get("PATH_INFO", ""))
        if answer is not None:
            body, headers = _encoded(answer)
            reasons = {200: "OK", 405: "Method Not Allowed", 503: "Service Unavailable"}
            start_response(f"{answer[0]} {reasons[answer[0]]}", headers)
            return [b"" if method == "HEAD" else body]
        if ticket is None:  # the app's own health check: not activity
            return self.app(environ, start_response)
        try:
            return _UntilClosed(self.app(environ, start_response), lambda: self.tracker.request_finished(ticket))
        except BaseException:
            self.tracker.request_finished(ticket)
            raise


class _UntilClosed:
    """A response iterable that calls `done` once, when it is exhausted, fails or is closed."""

    def __init__(self, response: Iterable[bytes], done: Callable[[], None]) -> None:
        self._response, self._done, self._ended = response, done, False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._response
        finally:
            self._end()

    def close(self) -> None:
        try:
            close = getattr(self._response, "close", None)
            if close is not None:
                close()
        finally:
            self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._done()
