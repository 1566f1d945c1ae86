"""End to end over real loopback HTTP: moto's server, a real backend, the local Function URL, the client."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from examples.wake_backend import Progress, WakeAuthError, WakeServerError, WakeTimeout, wake_backend
from tests import function as bo
from tests.helpers import (
    HOOKS,
    REGION,
    Answer,
    ScriptedBackend,
    body_of,
    http_event,
    instance_state,
    invoke_for_real,
    invoke_handler,
    stopped_instance,
)
from tools.demo import Timeline, run_demo
from tools.sandbox import Sandbox

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def test_the_whole_life_cycle() -> None:
    lines: list[str] = []
    timeline = Timeline(out=lines.append)
    run_demo(timeline, idle_timeout_seconds=2, job_seconds=2, check_every=0.5, deadline_seconds=40,
             group_idle_timeout_seconds=1)  # fmt: skip
    checks = [result for actor, action, _, result in timeline.rows if action == "check_idle"][:-2]  # one instance
    assert checks[0].startswith("keep: backend is busy")
    assert any(result.startswith("keep: idle for") for result in checks)
    assert checks[-2].startswith("stop: idle for")
    assert checks[-1].startswith("stop (cloudwatch): backend unreachable")  # the crashed backend, stopped
    assert "CPU max 0.8% < 5%" in checks[-1]
    assert [row[2] for row in timeline.rows if row[1] == "done"] == ["stopped", "stopped", "1 in svc"]
    group_checks = [result for actor, action, _, result in timeline.rows if action == "check_idle"][-2:]
    assert [check.split(":")[0] for check in group_checks] == ["scale_in", "stop"]  # the group scene
    app = [row[1] for row in timeline.rows if row[0] == "app"]
    assert app[-6:] == ["healthy", "POST /api/jobs", "POST /api/jobs", "job done", "start", "GET /health"]


# --- The original console recipe: Lambda's default timeout of 3 s, no token, the schedule ------------------------
LAMBDAS_DEFAULT_TIMEOUT = 3.0


@pytest.fixture
def attempts() -> dict[str, int]:
    """How many attempts of each AWS operation the function's clients sent (a before-send per attempt)."""
    sent: dict[str, int] = {}

    def count(model: Any, **_: Any) -> None:
        sent[model.name] = sent.get(model.name, 0) + 1

    HOOKS.events.register("before-call", count)
    HOOKS.events.register("before-send", lambda request, **_: sent.__setitem__("sends", sent.get("sends", 0) + 1))
    return sent


def test_with_lambdas_default_3_seconds_start_starts_a_stopped_instance(
    moto_url: str, backend: ScriptedBackend, attempts: dict[str, int]
) -> None:
    instance_id = stopped_instance(moto_url)
    environ = {"INSTANCE_ID": instance_id, "AWS_REGION": REGION, "BACKEND_BASE_URL": backend.url}
    bo.warm_clients(environ)  # INIT, as Lambda runs it
    response = invoke_handler(http_event(), environ, timeout_seconds=LAMBDAS_DEFAULT_TIMEOUT)  # the real context
    assert response["statusCode"] == 202, response
    assert body_of(response)["previous_state"] == "stopped"
    assert instance_state(moto_url, instance_id) == "running"
    assert attempts == {"DescribeInstances": 1, "StartInstances": 1, "sends": 2}  # one attempt of each call


def test_with_lambdas_default_3_seconds_check_idle_stops_an_idle_instance(
    running: str, moto_url: str, backend: ScriptedBackend, attempts: dict[str, int]
) -> None:
    backend.answer("/api/last-activity", Answer.json({"idle_seconds": 5000}))
    time.sleep(1.2)  # moto launched the instance just now: let it be idle past a 1 s timeout
    body = invoke_for_real("check_idle", running, backend.url, LAMBDAS_DEFAULT_TIMEOUT, IDLE_TIMEOUT_SECONDS="1")
    assert (body["decision"], body["signal"]) == ("stop", "activity"), body
    assert instance_state(moto_url, running) == "stopped"
    assert attempts == {"DescribeInstances": 1, "StopInstances": 1, "sends": 2}
    assert [call.path for call in backend.calls] == ["/api/last-activity"]


# --- A running instance in moto's server, and backends that misbehave -----------------------------------
@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        pytest.param(Answer.json({"error": "boom"}, status=500), "answered HTTP 500", id="http-500"),
        pytest.param(Answer(body=b"<html><body>Welcome to nginx!</body></html>"), "not JSON", id="html"),
        pytest.param(Answer.json({"status": "ok"}), "no idle time", id="wrong-shape"),
    ],
)
def test_a_misbehaving_backend_is_kept_with_a_clear_reason(
    running: str, moto_url: str, backend: ScriptedBackend, answer: Answer, reason: str
) -> None:
    backend.answer("/api/last-activity", answer)
    result = invoke_for_real("check_idle", running, backend.url)
    assert result["decision"] == "keep"
    assert reason in result["reason"]
    assert instance_state(moto_url, running) == "running"


# --- The local Function URL ---------------------------------------------------------------------------------
def test_twenty_concurrent_starts_each_make_at_most_one_start_call() -> None:
    # Through the local Function URL against moto's threaded server, with no lock anywhere: each
    # invocation runs in its own thread, and the hook below records which invocation made which EC2 call
    # (each call runs on a worker thread named "<invocation's thread>: <service> <operation>").
    calls: dict[str, list[str]] = {}

    def record(model: Any, **_: Any) -> None:
        calls.setdefault(threading.current_thread().name.split(": ")[0], []).append(model.name)

    with Sandbox() as sandbox:
        events = boto3.DEFAULT_SESSION.events  # type: ignore[union-attr]
        events.register("before-parameter-build.ec2", record)  # reaches the clients the function builds next
        bo.aws_client.cache_clear()
        try:
            with ThreadPoolExecutor(max_workers=20) as pool:
                answers = list(
                    pool.map(
                        lambda _: requests.post(sandbox.function_url, json={"action": "start"}, timeout=30), range(20)
                    )
                )
        finally:
            events.unregister("before-parameter-build.ec2", record)
        statuses = [answer.status_code for answer in answers]
        assert set(statuses) <= {200, 202}, [answer.text for answer in answers]
        # What the function controls: a Describe (its tags carry any hold), then at most one StartInstances.
        assert len(calls) == 20
        assert {tuple(made) for made in calls.values()} <= {
            ("DescribeInstances",),
            ("DescribeInstances", "StartInstances"),
        }
        # Real EC2 changes state atomically, so exactly one caller would see it stopped; moto's threaded
        # server does not (its start reads and writes the state without a lock), so only "at least one" holds.
        assert statuses.count(202) >= 1
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


def test_a_stop_during_the_wake_is_recovered_end_to_end() -> None:
    progress: list[str] = []
    with Sandbox(boot_seconds=1.0) as sandbox:
        stopped_once = threading.Event()

        def on_progress(update: Progress) -> None:
            progress.append(update.message)
            # The first start has answered and the instance boots: check_idle stops it now (a race the
            # client cannot see from /health alone).
            if update.phase == "booting" and not stopped_once.is_set() and sandbox.state() == "running":
                stopped_once.set()
                assert sandbox.invoke({"action": "stop"})["decision"] == "stop"

        wake_backend(
            sandbox.function_url, sandbox.backend_url, deadline_seconds=30, status_every_seconds=1.0,
            on_progress=on_progress,
        )  # fmt: skip
        assert requests.get(sandbox.backend_url + "/health", timeout=5).status_code == 200
        assert sandbox.state() == "running"
    assert stopped_once.is_set()
    assert "The backend was stopped while waking; starting it again" in progress
    assert progress[-1] == "Backend is up"


def test_the_clients_deadline_fires_when_the_backend_never_becomes_healthy() -> None:
    with Sandbox(boot_seconds=3600) as sandbox:  # /health answers 503 for an hour
        with pytest.raises(WakeTimeout, match="not healthy after 2s"):
            wake_backend(sandbox.function_url, sandbox.backend_url, deadline_seconds=2)
        assert sandbox.state() == "running"


def test_the_client_reports_a_refused_token_and_a_broken_function() -> None:
    right, wrong = "right-token-0123456789", "wrong-token-0123456789"
    with Sandbox(environment={"AUTH_TOKEN": right}) as sandbox, pytest.raises(WakeAuthError, match="401"):
        wake_backend(sandbox.function_url, sandbox.backend_url, token=wrong, deadline_seconds=5)
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
        [sys.executable, "-u", "-m", "tools.demo"],
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


def test_with_a_drain_a_request_that_lands_before_the_stop_keeps_the_instance() -> None:
    with Sandbox(idle_timeout_seconds=1, environment={"DRAIN_PATH": "/api/drain"}) as sandbox:
        wake_backend(sandbox.function_url, sandbox.backend_url, deadline_seconds=20)
        backend = sandbox.backend_host.backend
        assert backend is not None
        tracker, real_drain = backend.tracker, backend.tracker.drain

        def drain_just_after_a_request() -> dict[str, Any]:
            tracker.request_started()  # a user's request lands between the activity read and the drain
            tracker.request_finished()
            return real_drain()

        time.sleep(1.5)
        tracker.drain = drain_just_after_a_request  # type: ignore[method-assign]
        kept = sandbox.invoke({"action": "check_idle"})
        assert (kept["decision"], sandbox.state()) == ("keep", "running")
        assert "did not drain" in kept["reason"]
        tracker.drain = real_drain  # type: ignore[method-assign]
        time.sleep(1.5)
        stopped = sandbox.invoke({"action": "check_idle"})
        assert stopped["decision"] == "stop", stopped["reason"]


def test_a_drained_backend_whose_stop_is_denied_serves_again_at_once() -> None:
    # moto's server enforces no IAM here: inject EC2's answer to a role without ec2:StopInstances, after the drain.
    from tests.helpers import ec2_error

    with Sandbox(idle_timeout_seconds=1, environment={"DRAIN_PATH": "/api/drain"}) as sandbox:
        wake_backend(sandbox.function_url, sandbox.backend_url, deadline_seconds=20)
        time.sleep(1.5)
        events = boto3.DEFAULT_SESSION.events  # type: ignore[union-attr]  # the function's clients come from it
        denied = "before-call.ec2.StopInstances"

        def deny(**_: Any) -> Any:
            return ec2_error("UnauthorizedOperation", "not authorized")

        events.register(denied, deny, unique_id="deny")
        bo.aws_client.cache_clear()  # a client copies the session's hooks when it is built
        try:
            kept = sandbox.invoke({"action": "check_idle"})
        finally:
            events.unregister(denied, unique_id="deny")
        assert (kept["decision"], kept["drained"], sandbox.state()) == ("keep", True, "running")
        assert "told to resume work" in kept["reason"]
        job = requests.post(f"{sandbox.backend_url}/api/jobs?seconds=0", timeout=5)
        assert job.status_code == 202  # not 503 for the rest of a 120 s lease


# --- make serve and make app, as a developer runs them ------------------------------------------------------------
def make_in_the_background(target: str, output: Path) -> subprocess.Popen[bytes]:
    """`make <target> > output &`, as a newcomer's shell runs it: no terminal, no PYTHONUNBUFFERED, no make above."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    with output.open("wb") as sink:
        command = [shutil.which("make") or "make", "--no-print-directory", target]
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=sink)


def printed(output: Path, label: str, within: float) -> str:
    """The URL printed after `label`, once it is there (within `within` seconds)."""
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        for line in output.read_text().splitlines():
            if line.strip().startswith(label):
                return line.split()[len(label.split())]
        time.sleep(0.1)
    raise AssertionError(f"{label!r} was not printed within {within} s: {output.read_text()!r}")


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def refuses(port: int, within: float) -> bool:
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        with socket.socket() as probe:
            try:
                probe.connect(("127.0.0.1", port))
            except ConnectionRefusedError:
                return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("target", ["serve", "app"])
def test_make_serve_and_app_print_their_urls_at_once_and_stop_every_child_on_sigterm(
    target: str, tmp_path: Path
) -> None:
    output = tmp_path / f"{target}.log"
    make = make_in_the_background(target, output)
    try:
        urls = [
            printed(output, label, within=60 if target == "app" else 15)
            for label in ("Function URL", "backend", "moto EC2")
        ]
        if target == "app":
            urls.append(printed(output, "Streamlit page", within=5))
            assert requests.get(urls[-1] + "_stcore/health", timeout=5).status_code == 200
        assert '"level":' not in output.read_text()  # the function's own log lines only with VERBOSE=1
        make.send_signal(signal.SIGTERM)  # to make, which does not pass it on to its recipe
        make.wait(timeout=15)
    finally:
        if make.poll() is None:
            make.kill()
    for url in urls:
        assert refuses(port_of(url), within=15), f"{url} still listens after make got SIGTERM"
    assert "stopped: moto, the backend and the Function URL are down" in output.read_text()
