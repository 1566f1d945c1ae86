"""examples/backend_activity.py under the servers a backend really runs on, over real sockets on 127.0.0.1: a FastAPI
app run by uvicorn (ASGI) and a Flask app run by werkzeug's WSGI server, each with the middleware added in its one
line; then the function's own check_idle reading them (EC2 in moto)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import requests
import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import StreamingResponse
from flask import Flask, Response
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as websocket_connect
from werkzeug.serving import make_server

from examples.backend_activity import (
    ActivityMiddleware,
    ActivityTracker,
    DrainingError,
    Receive,
    Scope,
    Send,
    WsgiActivityMiddleware,
)
from orchestrator import idle
from orchestrator.backend import drain as real_drain
from tests.helpers import Ec2World

pytestmark = pytest.mark.integration
WAIT_SECONDS = 10.0  # how long a condition may take to come true on a busy machine: a bound, not a timing


class MovableClock:
    """Monotonic time that a test moves on (later()) instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


class Backend:
    """A backend app with the middleware, served for real: its URL, its tracker, and a gate its open-ended work
    (a stream, a held request, a job) waits on."""

    def __init__(
        self, url: str, tracker: ActivityTracker, gate: threading.Event, state: dict[str, Any], clock: MovableClock
    ) -> None:
        self.url, self.tracker, self.gate, self.state, self.clock = url, tracker, gate, state, clock

    def later(self, seconds: float) -> None:
        """The backend's clock moves on: as if `seconds` had passed (since its last activity, among others)."""
        self.clock.offset += seconds

    def idle_for(self, seconds: float) -> None:
        """Once every request has ended (a server may end one just after its client has read the answer), the
        backend's clock moves on by `seconds`."""
        self.until(lambda report: not report["busy"])
        self.later(seconds)

    def report(self) -> dict[str, Any]:
        answer: dict[str, Any] = requests.get(self.url + "/api/last-activity", timeout=5).json()
        return answer

    def until(self, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first report that meets `condition`, read by the tracker (not over HTTP, which would not change it);
        fails after WAIT_SECONDS."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            with self.tracker._lock:
                report = self.tracker._activity()
            if condition(report) or time.monotonic() > deadline:
                assert condition(report), report
                return report
            time.sleep(0.02)


def fastapi_app(tracker: ActivityTracker, gate: threading.Event, state: dict[str, Any]) -> FastAPI:
    async def opened() -> None:
        while not gate.is_set():
            await asyncio.sleep(0.02)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["started"] = True
        yield
        state["stopped"] = True

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(ActivityMiddleware, tracker=tracker)  # the one line

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "from": "the app"}

    @app.get("/work")
    async def work() -> dict[str, bool]:
        return {"done": True}

    @app.get("/held")
    async def held() -> dict[str, bool]:
        await opened()
        return {"done": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            while not gate.is_set():
                yield b"."
                await asyncio.sleep(0.02)
            yield b"end"

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.post("/job", status_code=202)
    async def job() -> dict[str, bool]:
        async def run() -> None:
            async with tracker.job():
                await opened()

        state.setdefault("tasks", []).append(asyncio.create_task(run()))
        return {"accepted": True}

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except Exception:
            return

    return app


def flask_app(tracker: ActivityTracker, gate: threading.Event, state: dict[str, Any]) -> Flask:
    app = Flask(__name__)
    app.wsgi_app = WsgiActivityMiddleware(app.wsgi_app, tracker=tracker)  # type: ignore[method-assign]  # the one line

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "from": "the app"}

    @app.get("/work")
    def work() -> dict[str, bool]:
        return {"done": True}

    @app.get("/held")
    def held() -> dict[str, bool]:
        gate.wait(WAIT_SECONDS * 3)
        return {"done": True}

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[bytes]:
            while not gate.is_set():
                yield b"."
                time.sleep(0.02)
            yield b"end"

        return Response(chunks(), mimetype="text/plain")

    @app.post("/job")
    def job() -> tuple[dict[str, bool], int]:
        def run() -> None:
            with tracker.job():
                gate.wait(WAIT_SECONDS * 3)

        threading.Thread(target=run, daemon=True).start()
        return {"accepted": True}, 202

    return app


@contextmanager
def uvicorn_serving(app: Any, lifespan: str = "on") -> Iterator[str]:
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan, ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_SECONDS
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(WAIT_SECONDS)
        listening.close()


@contextmanager
def werkzeug_serving(app: Flask) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT_SECONDS)


@contextmanager
def served(kind: str) -> Iterator[Backend]:
    clock = MovableClock()
    tracker, gate, state = ActivityTracker(clock=clock), threading.Event(), dict[str, Any]()
    if kind == "asgi":
        with uvicorn_serving(fastapi_app(tracker, gate, state)) as url:
            yield Backend(url, tracker, gate, state, clock)
    else:
        with werkzeug_serving(flask_app(tracker, gate, state)) as url:
            yield Backend(url, tracker, gate, state, clock)
    gate.set()  # whatever still waits on it ends


@pytest.fixture(params=["asgi", "wsgi"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    with served(request.param) as app:
        try:
            yield app
        finally:
            app.gate.set()


@pytest.fixture
def asgi() -> Iterator[Backend]:
    with served("asgi") as app:
        try:
            yield app
        finally:
            app.gate.set()


# --- The contract's rules ------------------------------------------------------------------------------------------
def test_probes_are_never_activity_and_health_reaches_the_app(backend: Backend) -> None:
    backend.later(0.2)
    for _ in range(3):
        assert requests.get(backend.url + "/health", timeout=5).json() == {"status": "ok", "from": "the app"}
        backend.report()
    report = backend.report()
    assert report["idle_seconds"] >= 0.2
    assert (report["busy"], report["active_requests"], report["active_jobs"]) == (False, 0, 0)


def test_a_request_is_activity(backend: Backend) -> None:
    backend.later(0.2)
    assert requests.get(backend.url + "/work", timeout=5).json() == {"done": True}
    report = backend.report()
    assert report["idle_seconds"] < 0.2
    assert report["active_requests"] == 0


def test_a_streaming_response_is_in_flight_until_its_last_byte(backend: Backend) -> None:
    with requests.get(backend.url + "/stream", stream=True, timeout=5) as response:
        chunks = response.iter_content(1)
        assert next(chunks) == b"."  # the headers and a first byte are out: still in flight
        during = backend.until(lambda r: r["busy"])
        assert (during["active_requests"], "busy_since" in during) == (1, True)
        backend.gate.set()
        assert b"".join(chunks).endswith(b"end")
    after = backend.until(lambda r: not r["busy"])
    assert after["active_requests"] == 0


def test_a_client_that_goes_away_mid_stream_ends_its_request(backend: Backend) -> None:
    host, port = backend.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as client:
        client.sendall(b"GET /stream HTTP/1.1\r\nHost: backend\r\n\r\n")
        assert client.recv(1024).startswith(b"HTTP/1.1 200")
        backend.until(lambda r: r["active_requests"] == 1)
    # The stream never ends by itself (the gate stays shut): only the disconnect can end the request.
    assert backend.until(lambda r: r["active_requests"] == 0)["busy"] is False


def test_a_disconnect_ends_the_request_even_while_the_app_works_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain ASGI app that hears the client go away but goes on working (cleaning up) until the gate opens: the
    request ends at the disconnect, not when the app returns."""
    tracker, gate = ActivityTracker(), threading.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        gone = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        listening = asyncio.create_task(listen())
        while not gone.is_set():
            await send({"type": "http.response.body", "body": b".", "more_body": True})
            await asyncio.sleep(0.02)
        while not gate.is_set():  # work that outlasts the client
            await asyncio.sleep(0.02)
        await listening

    with uvicorn_serving(ActivityMiddleware(app, tracker), lifespan="off") as url:
        backend = Backend(url, tracker, gate, {}, MovableClock())
        try:
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=5) as client:
                client.sendall(b"GET /work HTTP/1.1\r\nHost: backend\r\n\r\n")
                assert client.recv(1024).startswith(b"HTTP/1.1 200")
                backend.until(lambda r: r["active_requests"] == 1)
            assert backend.until(lambda r: r["active_requests"] == 0)["busy"] is False
        finally:
            gate.set()


def test_concurrent_requests_and_jobs_are_each_counted(backend: Backend) -> None:
    with ThreadPoolExecutor(8) as pool:
        held = [pool.submit(requests.get, backend.url + "/held", timeout=WAIT_SECONDS * 3) for _ in range(6)]
        for _ in range(2):
            assert requests.post(backend.url + "/job", timeout=5).status_code == 202
        report = backend.until(lambda r: r["active_requests"] == 6 and r["active_jobs"] == 2)
        assert report["busy"] is True
        backend.gate.set()
        assert [future.result().status_code for future in held] == [200] * 6
    assert backend.until(lambda r: not r["busy"])["active_jobs"] == 0


def test_a_drain_is_refused_when_a_request_arrived_since_the_last_report(backend: Backend) -> None:
    backend.report()
    requests.get(backend.url + "/work", timeout=5)  # a user's request lands between the read and the drain
    refused = requests.post(backend.url + "/api/drain", timeout=5).json()
    assert refused["drained"] is False
    assert "idle_seconds" in refused  # with the activity, as the contract says
    assert requests.get(backend.url + "/work", timeout=5).status_code == 200  # still serving


def test_a_drain_is_refused_while_work_is_in_flight(backend: Backend) -> None:
    with requests.get(backend.url + "/stream", stream=True, timeout=5) as response:
        chunks = response.iter_content(1)  # kept: were it collected, requests would close the connection
        next(chunks)
        backend.report()
        assert requests.post(backend.url + "/api/drain", timeout=5).json()["drained"] is False
        backend.gate.set()


def test_drained_it_refuses_new_work_and_says_so_on_health_until_resumed(backend: Backend) -> None:
    backend.report()
    assert requests.post(backend.url + "/api/drain", timeout=5).json() == {"drained": True, "lease_seconds": 120.0}
    refused = requests.get(backend.url + "/work", timeout=5)
    assert refused.status_code == 503
    assert 0 < int(refused.headers["Retry-After"]) <= 120
    health = requests.get(backend.url + "/health", timeout=5)
    assert (health.status_code, health.json()) == (503, {"status": "draining"})
    with pytest.raises(DrainingError), backend.tracker.job():
        pass
    report = backend.report()
    assert (report["busy"], report["active_requests"]) == (False, 0)  # the refusals were not use
    assert requests.delete(backend.url + "/api/drain", timeout=5).json() == {"drained": False, "resumed": True}
    assert requests.get(backend.url + "/work", timeout=5).status_code == 200
    assert requests.get(backend.url + "/health", timeout=5).json() == {"status": "ok", "from": "the app"}


def test_the_probe_paths_answer_only_their_methods(backend: Backend) -> None:
    drain = requests.get(backend.url + "/api/drain", timeout=5)
    assert (drain.status_code, drain.headers["Allow"]) == (405, "POST, DELETE")
    activity = requests.post(backend.url + "/api/last-activity", timeout=5)
    assert (activity.status_code, activity.headers["Allow"]) == (405, "GET, HEAD")
    assert backend.report()["active_requests"] == 0


def test_an_open_websocket_is_a_request_in_flight_until_it_closes(asgi: Backend) -> None:
    with websocket_connect(asgi.url.replace("http", "ws") + "/ws") as websocket:
        websocket.send("hello")
        assert websocket.recv(timeout=5) == "hello"
        assert asgi.until(lambda r: r["active_requests"] == 1)["busy"] is True
    assert asgi.until(lambda r: r["active_requests"] == 0)["busy"] is False


def test_drained_it_refuses_a_new_websocket(asgi: Backend) -> None:
    asgi.report()
    assert requests.post(asgi.url + "/api/drain", timeout=5).json()["drained"] is True
    with pytest.raises(InvalidStatus) as refused:
        websocket_connect(asgi.url.replace("http", "ws") + "/ws")
    assert refused.value.response.status_code == 503
    assert 0 < int(refused.value.response.headers["Retry-After"]) <= 120
    assert asgi.report()["active_requests"] == 0


def test_lifespan_passes_through_to_the_app() -> None:
    with served("asgi") as app:
        assert app.state.get("started") is True
    assert app.state.get("stopped") is True


def test_an_async_job_is_busy_while_it_runs(asgi: Backend) -> None:
    assert requests.post(asgi.url + "/job", timeout=5).status_code == 202
    assert asgi.until(lambda r: r["active_jobs"] == 1)["busy"] is True
    asgi.gate.set()
    assert asgi.until(lambda r: r["active_jobs"] == 0)["busy"] is False


# --- The function reads them -------------------------------------------------------------------------------------
def test_check_idle_keeps_the_instance_during_a_stream_and_stops_it_once_idle(
    backend: Backend, long_running: Ec2World, invoke: Any
) -> None:
    settings = {"BACKEND_BASE_URL": backend.url, "IDLE_TIMEOUT_SECONDS": "1"}
    with requests.get(backend.url + "/stream", stream=True, timeout=5) as response:
        chunks = response.iter_content(1)  # kept: were it collected, requests would close the connection
        next(chunks)
        backend.later(1.2)  # longer than the idle timeout since the stream began
        kept = invoke({"action": "check_idle"}, **settings)
        assert (kept["decision"], kept["reason"]) == ("keep", "backend is busy (busy is true)")
        backend.gate.set()
    backend.idle_for(1.2)
    stopped = invoke({"action": "check_idle"}, **settings)
    assert stopped["decision"] == "stop", stopped["reason"]
    assert long_running.state() == "stopped"


def test_check_idle_keeps_the_instance_during_an_async_job(asgi: Backend, long_running: Ec2World, invoke: Any) -> None:
    assert requests.post(asgi.url + "/job", timeout=5).status_code == 202
    asgi.until(lambda r: r["active_jobs"] == 1)
    asgi.later(1.2)
    kept = invoke({"action": "check_idle"}, BACKEND_BASE_URL=asgi.url, IDLE_TIMEOUT_SECONDS="1")
    assert (kept["decision"], kept["reason"]) == ("keep", "backend is busy (busy is true)")
    assert long_running.state() == "running"


def test_check_idle_keeps_the_instance_when_a_request_lands_before_its_drain(
    backend: Backend, long_running: Ec2World, invoke: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"BACKEND_BASE_URL": backend.url, "IDLE_TIMEOUT_SECONDS": "1", "DRAIN_PATH": "/api/drain"}

    def drain_after_a_request(*args: Any, **kwargs: Any) -> None:
        assert requests.get(backend.url + "/work", timeout=5).status_code == 200  # a user's, after the function's read
        real_drain(*args, **kwargs)

    backend.idle_for(1.2)
    monkeypatch.setattr(idle, "drain", drain_after_a_request)  # the function's drain, as idle.py calls it
    kept = invoke({"action": "check_idle"}, **settings)
    assert kept["decision"] == "keep"
    assert "the backend did not drain" in kept["reason"]
    assert long_running.state() == "running"
    monkeypatch.setattr(idle, "drain", real_drain)
    backend.idle_for(1.2)
    stopped = invoke({"action": "check_idle"}, **settings)
    assert (stopped["decision"], stopped["drained"]) == ("stop", True)
    assert requests.get(backend.url + "/work", timeout=5).status_code == 503  # drained until the lease ends
