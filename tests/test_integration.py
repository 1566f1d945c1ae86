"""End to end over real loopback HTTP: moto's server, a real backend, the local Function URL, the client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

import backend_orchestrator as bo
from examples.wake_backend import WakeAuthError, WakeServerError, WakeTimeout, wake_backend
from tests.conftest import REGION, instance_state, stopped_instance
from tools.demo import Timeline, run_demo
from tools.sandbox import LocalContext, Sandbox

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def test_the_whole_life_cycle() -> None:
    lines: list[str] = []
    timeline = Timeline(out=lines.append)
    run_demo(timeline, idle_timeout_seconds=2, job_seconds=2, check_every=0.5, deadline_seconds=40)
    checks = [result for actor, action, _, result in timeline.rows if action == "check_idle"]
    assert checks[0].startswith("keep: backend is busy")
    assert any(result.startswith("keep: idle for") for result in checks)
    assert checks[-1].startswith("stop: idle for")
    assert timeline.rows[-1][2] == "stopped"
    assert [row[1] for row in timeline.rows if row[0] == "app"][-2:] == ["healthy", "POST /api/jobs"]


# --- A running instance in moto's server, and backends that misbehave -----------------------------------
@pytest.fixture
def running(moto_url: str) -> str:
    instance_id = stopped_instance(moto_url)
    boto3.client("ec2", region_name=REGION, endpoint_url=moto_url).start_instances(InstanceIds=[instance_id])
    return instance_id


def check_idle(instance_id: str, backend_url: str, **env: str) -> dict[str, Any]:
    environ = {"INSTANCE_ID": instance_id, "AWS_REGION": REGION, "BACKEND_BASE_URL": backend_url, **env}
    return bo.handle({"action": "check_idle"}, LocalContext(60), environ)


@pytest.fixture
def silent_backend() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for connection in held:
        connection.close()
    listener.close()


def test_a_backend_that_never_answers_is_kept_within_the_timeout(
    running: str, moto_url: str, silent_backend: str
) -> None:
    started = time.monotonic()
    result = check_idle(running, silent_backend, HTTP_TIMEOUT_SECONDS="1")
    elapsed = time.monotonic() - started
    assert result["decision"] == "keep"
    assert "timed out after 1s" in result["reason"]
    assert elapsed < 1 + 1  # HTTP_TIMEOUT_SECONDS plus a second
    assert instance_state(moto_url, running) == "running"


class _Canned(BaseHTTPRequestHandler):
    status = 200
    content_type = "application/json"
    body = b"{}"

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def canned_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    status, content_type, body = request.param
    handler = type("Handler", (_Canned,), {"status": status, "content_type": content_type, "body": body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize(
    ("canned_backend", "reason"),
    [
        pytest.param((500, "application/json", b'{"error": "boom"}'), "answered HTTP 500", id="http-500"),
        pytest.param((200, "text/html", b"<html><body>Welcome to nginx!</body></html>"), "not JSON", id="html"),
        pytest.param((200, "application/json", b'{"status": "ok"}'), "no idle time", id="wrong-shape"),
    ],
    indirect=["canned_backend"],
)
def test_a_misbehaving_backend_is_kept_with_a_clear_reason(
    running: str, moto_url: str, canned_backend: str, reason: str
) -> None:
    result = check_idle(running, canned_backend)
    assert result["decision"] == "keep"
    assert reason in result["reason"]
    assert instance_state(moto_url, running) == "running"


def test_a_backend_that_is_down_is_kept(running: str, moto_url: str) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = check_idle(running, f"http://127.0.0.1:{port}")
    assert result["decision"] == "keep"
    assert "ConnectionError" in result["reason"]
    assert instance_state(moto_url, running) == "running"


# --- The local Function URL ---------------------------------------------------------------------------------
def test_twenty_concurrent_starts_start_the_instance_once() -> None:
    with Sandbox() as sandbox:
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(
                pool.map(lambda _: requests.post(sandbox.function_url, json={"action": "start"}, timeout=30), range(20))
            )
        statuses = [answer.status_code for answer in answers]
        assert set(statuses) <= {200, 202}, [answer.text for answer in answers]
        assert statuses.count(202) == 1  # the one call that found it stopped; the rest found it starting
        assert sandbox.state() == "running"


@pytest.mark.parametrize(
    "headers",
    [pytest.param({}, id="missing"), pytest.param({"Authorization": "Bearer not-the-token"}, id="wrong")],
)
def test_a_missing_or_wrong_token_is_401_and_the_instance_untouched(headers: dict[str, str]) -> None:
    token = "local-s3cret-token"
    with Sandbox(environment={"AUTH_TOKEN": token}) as sandbox:
        answer = requests.post(sandbox.function_url, json={"action": "start"}, headers=headers, timeout=10)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "unauthorized"
        assert token not in answer.text
        assert sandbox.state() == "stopped"
        right = requests.post(
            sandbox.function_url, json={"action": "start"}, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert right.status_code == 202


def test_the_client_wakes_the_backend_with_a_token() -> None:
    token = "local-s3cret-token"
    progress: list[str] = []
    with Sandbox(environment={"AUTH_TOKEN": token}, boot_seconds=0.5) as sandbox:
        seconds = wake_backend(
            sandbox.function_url, sandbox.backend_url, token=token, deadline_seconds=20,
            on_progress=lambda update: progress.append(update.phase),
        )  # fmt: skip
        assert requests.get(sandbox.backend_url + "/health", timeout=5).status_code == 200
    assert progress[0] == "checking"
    assert "starting" in progress
    assert progress[-1] == "healthy"
    assert 0 < seconds < 20


def test_the_clients_deadline_fires_when_the_backend_never_becomes_healthy() -> None:
    with Sandbox(boot_seconds=3600) as sandbox:  # /health answers 503 for an hour
        with pytest.raises(WakeTimeout, match="not healthy after 2s"):
            wake_backend(sandbox.function_url, sandbox.backend_url, deadline_seconds=2)
        assert sandbox.state() == "running"


def test_the_client_reports_a_refused_token_and_a_broken_function() -> None:
    with Sandbox(environment={"AUTH_TOKEN": "right"}) as sandbox, pytest.raises(WakeAuthError, match="401"):
        wake_backend(sandbox.function_url, sandbox.backend_url, token="wrong", deadline_seconds=5)
    broken = Sandbox(environment={"IDLE_TIMEOUT_SECONDS": "fifteen minutes"})
    with broken as sandbox, pytest.raises(WakeServerError, match="config_error: IDLE_TIMEOUT_SECONDS"):
        wake_backend(sandbox.function_url, sandbox.backend_url, deadline_seconds=5)


def test_the_sandbox_leaves_no_listening_port() -> None:
    with Sandbox() as sandbox:
        ports = [int(url.rsplit(":", 1)[1].rstrip("/")) for url in (sandbox.moto_url, sandbox.function_url)]
        wake_backend(sandbox.function_url, sandbox.backend_url, deadline_seconds=20)
        ports.append(sandbox.backend_host.port)
    for port in ports:
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))


def test_ctrl_c_stops_the_demo_cleanly() -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'lambda'}{os.pathsep}{ROOT}"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "tools.demo"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert demo.stdout is not None
    try:
        for line in demo.stdout:  # wait until moto is up
            if "moto EC2 on" in line:
                moto_port = int(line.split("127.0.0.1:")[1].split(",")[0])
                break
        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, stderr
    assert "interrupted: everything is stopped" in stderr
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", moto_port))
