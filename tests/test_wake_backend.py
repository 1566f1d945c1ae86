"""The app's client against a real server on 127.0.0.1 that plays the orchestrator (POST /fn) and the backend (GET
/health), well or badly: a steady poll, recovery from a stop during the wake, Retry-After in any form, a deadline
kept as a total however the server hangs or trickles, and nothing but a WakeError out of it."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.wake_backend import (
    StartAnswer,
    WakeAuthError,
    WakeError,
    WakeHeldError,
    WakeServerError,
    WakeTimeout,
    backend_status,
    request_start,
    wake_backend,
)
from tests.helpers import Answer, ScriptedBackend, refused_port

pytestmark = pytest.mark.integration
FN, HEALTH = "/fn", "/health"
STILL_STOPPING = {"error": {"code": "still_stopping", "message": "m"}}
NO_CAPACITY = {"error": {"code": "insufficient_capacity", "message": "AWS has no capacity"}}
DOWN = Answer(mode="drop")  # the backend's address closes the connection: a stopped instance, a process gone
UNHEALTHY = Answer.json({"status": "booting"}, status=503)
HEALTHY = Answer.json({"status": "ok"})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(backend: ScriptedBackend) -> ScriptedBackend:
    """One real server for both: the orchestrator's Function URL at /fn, the backend's /health."""
    return backend


def fn(server: ScriptedBackend) -> str:
    return f"{server.url}{FN}"


def wake(server: ScriptedBackend, clock: Clock, **options: Any) -> float:
    return wake_backend(fn(server), server.url, sleep=clock.sleep, monotonic=clock.monotonic, **options)


def requests_made(server: ScriptedBackend) -> list[str]:
    return [f"{call.method} {call.path}" for call in server.calls]


def test_a_healthy_backend_costs_one_get_and_no_start(server: ScriptedBackend, clock: Clock) -> None:
    server.answer(HEALTH, HEALTHY)
    wake(server, clock)
    assert requests_made(server) == ["GET /health"]


def test_a_backend_held_stopped_raises_wake_held_error_at_once_with_the_hold(
    server: ScriptedBackend, clock: Clock
) -> None:
    hold = {"state": "stopped", "until": "2026-12-02T14:00:00+01:00", "reason": "patching the OS"}
    server.answer(HEALTH, DOWN)
    server.answer(FN, Answer.json({"ok": False, "hold": hold, "error": {"code": "held_stopped", "message": "m"}}, 409))
    with pytest.raises(WakeHeldError, match=r"held stopped until 2026-12-02T14:00:00\+01:00: patching the OS") as held:
        wake(server, clock)
    assert held.value.hold == hold
    assert isinstance(held.value, WakeError)
    assert requests_made(server) == ["GET /health", "POST /fn"]  # no retry: the hold says until when
    assert clock.sleeps == []


def test_polling_is_a_steady_second_not_a_growing_backoff(server: ScriptedBackend, clock: Clock) -> None:
    server.answer(HEALTH, UNHEALTHY)
    server.answer(FN, Answer.json({"ok": True, "state": "pending"}, 202))
    with pytest.raises(WakeTimeout, match="not healthy after 30s"):
        wake(server, clock, deadline_seconds=30, status_every_seconds=3600)
    assert clock.sleeps == [1.0] * 30


def test_still_stopping_is_retried_after_retry_after(server: ScriptedBackend, clock: Clock) -> None:
    server.answer(HEALTH, DOWN, UNHEALTHY, HEALTHY)
    server.answer(FN, Answer.json(STILL_STOPPING, 503, {"Retry-After": "10"}), Answer.json({"ok": True}, 202))
    progress: list[str] = []
    wake(server, clock, on_progress=lambda update: progress.append(update.message))
    assert requests_made(server) == ["GET /health", "POST /fn", "POST /fn", "GET /health", "GET /health"]
    assert clock.sleeps == [10.0, 1.0]  # Retry-After, then one poll interval
    assert any("still stopping" in message for message in progress)


def test_no_capacity_is_retried_until_the_deadline_and_said_so(server: ScriptedBackend, clock: Clock) -> None:
    server.answer(HEALTH, UNHEALTHY)
    server.answer(FN, Answer.json(NO_CAPACITY, 503, {"Retry-After": "30"}))
    with pytest.raises(WakeServerError, match="no capacity for the backend's instance type"):
        wake(server, clock, deadline_seconds=100)
    assert requests_made(server).count("POST /fn") == 4  # at 0, 30, 60 and 90 s
    assert clock.sleeps == [30.0] * 3


@pytest.mark.parametrize(
    ("header", "waited"),
    [
        pytest.param({"Retry-After": "7"}, 7.0, id="seconds"),
        pytest.param({}, 10.0, id="missing"),
        pytest.param({"Retry-After": "soon"}, 10.0, id="junk"),
        pytest.param({"Retry-After": "-1"}, 10.0, id="negative"),
        pytest.param({"Retry-After": "0"}, 1.0, id="zero-is-at-least-a-second"),
        pytest.param({"Retry-After": "86400"}, 60.0, id="capped-at-a-minute"),
        pytest.param({"Retry-After": "2.5"}, 10.0, id="not-a-whole-number"),
        pytest.param({"Retry-After": format_datetime(datetime(2000, 1, 1, tzinfo=UTC), usegmt=True)}, 1.0, id="past"),
    ],
)
def test_any_retry_after_is_handled(
    server: ScriptedBackend, clock: Clock, header: dict[str, str], waited: float
) -> None:
    server.answer(HEALTH, UNHEALTHY, HEALTHY)
    server.answer(FN, Answer.json(STILL_STOPPING, 503, header), Answer.json({"ok": True}, 202))
    wake(server, clock)
    assert clock.sleeps == [waited]


def test_an_http_date_retry_after_waits_until_then(server: ScriptedBackend, clock: Clock) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    server.answer(HEALTH, UNHEALTHY, HEALTHY)
    retry_after = {"Retry-After": format_datetime(when, usegmt=True)}
    server.answer(FN, Answer.json(STILL_STOPPING, 503, retry_after), Answer.json({"ok": True}, 202))
    wake(server, clock)
    assert clock.sleeps[0] == pytest.approx(30, abs=2)


def test_a_stop_during_the_wake_starts_it_again(server: ScriptedBackend, clock: Clock) -> None:
    server.answer(HEALTH, UNHEALTHY)  # never healthy until started again
    server.answer(
        FN,
        Answer.json({"ok": True, "state": "running", "previous_state": "running"}),
        Answer.json({"ok": True, "state": "stopped"}),  # the status call, 10 s later
        Answer.json({"ok": True, "state": "pending", "previous_state": "stopped"}, 202),
    )
    progress: list[str] = []
    with pytest.raises(WakeTimeout):
        wake(server, clock, deadline_seconds=12, on_progress=lambda update: progress.append(update.message))
    posts = [call.body for call in server.calls if call.method == "POST"]
    assert posts == [b'{"action": "start"}', b'{"action": "status"}', b'{"action": "start"}']
    assert "The backend was stopped while waking; starting it again" in progress


def test_status_is_asked_every_ten_seconds_while_health_fails(server: ScriptedBackend, clock: Clock) -> None:
    server.answer(HEALTH, DOWN)
    server.answer(FN, Answer.json({"ok": True, "state": "pending"}, 202), Answer.json({"ok": True, "state": "pending"}))
    with pytest.raises(WakeTimeout):
        wake(server, clock, deadline_seconds=35)
    posts = [call.body for call in server.calls if call.method == "POST"]
    assert posts == [b'{"action": "start"}'] + [b'{"action": "status"}'] * 3  # at 10, 20 and 30 s


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        pytest.param(401, {"error": {"code": "unauthorized", "message": "m"}}, WakeAuthError, id="401"),
        pytest.param(403, "Forbidden", WakeAuthError, id="403-not-json"),
        pytest.param(
            502, {"error": {"code": "aws_access_denied", "message": "allow ec2:Start"}}, WakeServerError, id="502"
        ),
        pytest.param(500, ["not", "an", "object"], WakeServerError, id="500-odd-body"),
        pytest.param(400, {"error": "not an object"}, WakeError, id="400"),
    ],
)
def test_a_refusal_names_the_orchestrators_error(
    server: ScriptedBackend, clock: Clock, status: int, body: object, error: type[WakeError]
) -> None:
    server.answer(HEALTH, UNHEALTHY)
    server.answer(FN, Answer(status, body.encode()) if isinstance(body, str) else Answer.json(body, status))
    with pytest.raises(error, match=str(status)):
        wake(server, clock)


def test_a_server_error_names_the_functions_error(server: ScriptedBackend, clock: Clock) -> None:
    server.answer(HEALTH, UNHEALTHY)
    server.answer(FN, Answer.json({"error": {"code": "aws_access_denied", "message": "allow ec2:StartInstances"}}, 502))
    with pytest.raises(WakeServerError, match="502, aws_access_denied: allow ec2:StartInstances"):
        wake(server, clock)


# --- Healthy means a 2xx of /health itself ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(Answer(304, b""), id="304-not-modified"),
        pytest.param(Answer(399, b"{}"), id="399"),
        pytest.param(Answer(302, b"", {"Location": "https://login.example.com/"}), id="redirect-to-a-login-page"),
        pytest.param(Answer(101, b"", {"Upgrade": "websocket"}), id="101-switching-protocols"),
    ],
)
def test_only_a_2xx_of_the_health_url_itself_is_healthy(server: ScriptedBackend, clock: Clock, answer: Answer) -> None:
    server.answer(HEALTH, answer)
    server.answer(FN, Answer.json({"ok": True, "state": "pending"}, 202))
    with pytest.raises(WakeTimeout):
        wake(server, clock, deadline_seconds=3, status_every_seconds=3600)
    assert requests_made(server).count("POST /fn") == 1  # it was never taken for healthy
    assert not any(call.path != HEALTH and call.method == "GET" for call in server.calls)  # no redirect followed


# --- Answers that cannot be read -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "says"),
    [
        pytest.param(b"[" * 20_000 + b"]" * 20_000, "not its JSON", id="nested-too-deep"),
        pytest.param(b'{"state": "' + b"x" * 70_000 + b'"}', "could not be reached or read", id="over-64-kib"),
        pytest.param(b"<html><body>Bad gateway</body></html>", "not its JSON", id="a-proxys-page"),
        pytest.param(b"\xff\xfe\x00junk", "not its JSON", id="not-utf-8"),
    ],
)
def test_an_answer_that_cannot_be_read_is_a_wake_error(
    server: ScriptedBackend, clock: Clock, body: bytes, says: str
) -> None:
    server.answer(HEALTH, UNHEALTHY)
    server.answer(FN, Answer(202, body))
    with pytest.raises(WakeServerError, match=says):
        wake(server, clock)
    with pytest.raises(WakeServerError, match=says):
        request_start(fn(server))
    server.answer(FN, Answer(200, body))
    assert backend_status(fn(server)) is None  # status cannot say: the caption says unknown


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    status=st.sampled_from([200, 202, 400, 401, 403, 404, 409, 413, 429, 500, 502, 503, 504]),
    retry_after=st.none() | st.text(max_size=40) | st.integers(-(10**6), 10**6).map(str),
    body=st.binary(max_size=60)
    | st.sampled_from([b"{}", b"[]", b"null", b'{"error": 5}', b'{"state": 1}', b'{"hold": 3, "error": {}}']),
)
def test_nothing_but_a_wake_error_leaves_the_client(
    server: ScriptedBackend, status: int, retry_after: str | None, body: bytes
) -> None:
    clock = Clock()
    safe = None if retry_after is None else "".join(c for c in retry_after if c.isprintable()).encode()
    headers = {} if safe is None else {"Retry-After": safe.decode("latin-1", "replace")}
    server.answer(HEALTH, UNHEALTHY)
    server.answer(FN, Answer(status, body, headers))
    with contextlib.suppress(WakeError):  # any other exception fails the test
        wake(server, clock, deadline_seconds=20)
    with contextlib.suppress(WakeError):
        request_start(fn(server))
    with contextlib.suppress(WakeError):
        backend_status(fn(server))


# --- The deadline is a total: connect, send and every read -------------------------------------------------------
@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(Answer(mode="silent"), id="hangs"),
        pytest.param(Answer(mode="trickle-status", interval=0.3), id="trickles-its-status-line"),
        pytest.param(Answer(mode="trickle-headers", interval=0.3), id="trickles-its-headers"),
        pytest.param(
            Answer(body=b'{"state": "pending"}' * 5, mode="trickle-length", interval=0.3), id="trickles-a-body"
        ),
    ],
)
def test_an_orchestrator_that_hangs_or_trickles_ends_in_a_wake_timeout_that_says_what_was_waited_for(
    server: ScriptedBackend, answer: Answer
) -> None:
    server.answer(HEALTH, DOWN)
    server.answer(FN, answer)
    with pytest.raises(WakeTimeout, match=r"did not answer start within 1\.[0-9]s"):
        wake_backend(fn(server), server.url, deadline_seconds=1.5)  # real time: the trickle lasts 30 s
    with pytest.raises(WakeTimeout, match=r"did not answer start within 1\.0s"):
        request_start(fn(server), deadline_seconds=1.0)
    assert backend_status(fn(server), deadline_seconds=1.0) is None


def test_a_backend_that_hangs_on_health_is_not_healthy_and_the_wake_ends_by_its_deadline(
    server: ScriptedBackend,
) -> None:
    server.answer(HEALTH, Answer(mode="silent"))
    server.answer(FN, Answer.json({"ok": True, "state": "pending"}, 202))
    with pytest.raises(WakeTimeout, match="not healthy after 3s"):
        wake_backend(fn(server), server.url, deadline_seconds=3)
    # Each probe had at most 2 s of the 3: the first one, the start, the second one, and then the deadline.
    assert requests_made(server)[:3] == ["GET /health", "POST /fn", "GET /health"]
    assert requests_made(server).count("POST /fn") == 1


def test_an_orchestrator_that_refuses_connections_is_a_server_error() -> None:
    url = f"http://127.0.0.1:{refused_port()}/fn"
    with pytest.raises(WakeServerError, match=r"could not be reached or read .*ConnectionRefusedError"):
        request_start(url)
    assert backend_status(url) is None


# --- request_start and aws_iam ------------------------------------------------------------------------------------
def test_request_start_returns_the_answer_at_once(server: ScriptedBackend) -> None:
    server.answer(
        FN,
        Answer.json({"ok": True, "state": "pending", "previous_state": "stopped"}, 202),
        Answer.json(NO_CAPACITY, 503, {"Retry-After": "30"}),
    )
    assert request_start(fn(server)) == StartAnswer(202, "pending", "stopped")
    answer = request_start(fn(server))
    assert (answer.status_code, answer.error_code, answer.retry_after) == (503, "insufficient_capacity", 30.0)
    assert requests_made(server) == ["POST /fn", "POST /fn"]  # no health poll, no retry


def test_request_start_raises_a_wake_error_on_refusal(server: ScriptedBackend) -> None:
    server.answer(FN, Answer.json({"error": {"code": "unauthorized", "message": "m"}}, 401), DOWN)
    with pytest.raises(WakeAuthError):
        request_start(fn(server), token="wrong-token-0123456789")
    with pytest.raises(WakeServerError, match="could not be reached"):
        request_start(fn(server))


def test_a_backend_url_that_is_not_http_is_a_wake_error(clock: Clock) -> None:
    with pytest.raises(WakeError, match="not an http"):
        wake_backend("http://127.0.0.1:1/fn", "backend.test:8000", sleep=clock.sleep, monotonic=clock.monotonic)


def test_aws_iam_signs_exactly_the_bytes_sent(
    server: ScriptedBackend, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    server.answer(HEALTH, UNHEALTHY, HEALTHY)
    server.answer(FN, Answer.json({"ok": True}, 202))
    wake(server, clock, auth="aws_iam", region="eu-west-1")
    sent = server.calls[1]
    authorization = sent.headers["authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/lambda/aws4_request" in authorization  # the region given, service lambda
    assert sent.body == b'{"action": "start"}'
    # Recompute the signature over the bytes that arrived, with the headers they carried.
    signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
    headers = {name: sent.headers[name] for name in signed}
    replay = AWSRequest(method="POST", url=fn(server), data=sent.body, headers=headers)
    replay.context["timestamp"] = sent.headers["x-amz-date"]
    signer = SigV4Auth(Credentials("AKIDEXAMPLE", "testing", "testing"), "lambda", "eu-west-1")
    signature = signer.signature(signer.string_to_sign(replay, signer.canonical_request(replay)), replay)
    assert authorization.endswith(f"Signature={signature}")


def test_the_region_is_read_from_a_function_urls_host() -> None:
    from examples.wake_backend import _sigv4_headers

    url = "https://abcdefghij0123456789abcdefghij01.lambda-url.eu-west-1.on.aws/"
    headers = _sigv4_headers(url, b"{}", {"Content-Type": "application/json"}, None)
    assert "/eu-west-1/lambda/aws4_request" in headers["Authorization"]
    assert json.dumps(headers)  # plain strings, ready to send
