"""The app's client: a steady poll, recovery from a stop during the wake, Retry-After in any form, and
nothing but a WakeError out of it."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import requests
import responses
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
    request_start,
    wake_backend,
)

URL = "https://abcdefghij0123456789abcdefghij01.lambda-url.eu-west-1.on.aws/"
BACKEND = "http://backend.test:8000"
HEALTH = BACKEND + "/health"
STILL_STOPPING = {"error": {"code": "still_stopping", "message": "m"}}
NO_CAPACITY = {"error": {"code": "insufficient_capacity", "message": "AWS has no capacity"}}


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
def mock() -> Any:
    with responses.RequestsMock() as requests_mock:
        yield requests_mock


def wake(clock: Clock, **options: Any) -> float:
    return wake_backend(URL, BACKEND, sleep=clock.sleep, monotonic=clock.monotonic, **options)


def test_a_healthy_backend_costs_one_get_and_no_start(mock: Any, clock: Clock) -> None:
    mock.get(HEALTH, json={"status": "ok"})
    wake(clock)
    assert [call.request.method for call in mock.calls] == ["GET"]


def test_a_backend_held_stopped_raises_wake_held_error_at_once_with_the_hold(mock: Any, clock: Clock) -> None:
    hold = {"state": "stopped", "until": "2026-12-02T14:00:00+01:00", "reason": "patching the OS"}
    mock.get(HEALTH, body=requests.ConnectionError("refused"))
    mock.post(URL, status=409, json={"ok": False, "hold": hold, "error": {"code": "held_stopped", "message": "m"}})
    with pytest.raises(WakeHeldError, match=r"held stopped until 2026-12-02T14:00:00\+01:00: patching the OS") as held:
        wake(clock)
    assert held.value.hold == hold
    assert isinstance(held.value, WakeError)
    assert [call.request.method for call in mock.calls] == ["GET", "POST"]  # no retry: the hold says until when
    assert clock.sleeps == []


def test_polling_is_a_steady_second_not_a_growing_backoff(mock: Any, clock: Clock) -> None:
    mock.get(HEALTH, status=503)
    mock.post(URL, status=202, json={"ok": True, "state": "pending"})
    with pytest.raises(WakeTimeout, match="not healthy after 30s"):
        wake(clock, deadline_seconds=30, status_every_seconds=3600)
    assert clock.sleeps == [1.0] * 30


def test_still_stopping_is_retried_after_retry_after(mock: Any, clock: Clock) -> None:
    mock.get(HEALTH, body=requests.ConnectionError("refused"))
    mock.post(URL, status=503, headers={"Retry-After": "10"}, json=STILL_STOPPING)
    mock.post(URL, status=202, json={"ok": True})
    mock.get(HEALTH, status=503)
    mock.get(HEALTH, status=200)
    progress: list[str] = []
    wake(clock, on_progress=lambda update: progress.append(update.message))
    assert [call.request.method for call in mock.calls] == ["GET", "POST", "POST", "GET", "GET"]
    assert clock.sleeps == [10.0, 1.0]  # Retry-After, then one poll interval
    assert any("still stopping" in message for message in progress)


def test_no_capacity_is_retried_until_the_deadline_and_said_so(mock: Any, clock: Clock) -> None:
    mock.get(HEALTH, status=503)
    mock.post(URL, status=503, headers={"Retry-After": "30"}, json=NO_CAPACITY)
    with pytest.raises(WakeServerError, match="no capacity for the backend's instance type"):
        wake(clock, deadline_seconds=100)
    assert len([call for call in mock.calls if call.request.method == "POST"]) == 4  # at 0, 30, 60 and 90 s
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
def test_any_retry_after_is_handled(mock: Any, clock: Clock, header: dict[str, str], waited: float) -> None:
    mock.get(HEALTH, status=503)
    mock.post(URL, status=503, headers=header, json=STILL_STOPPING)
    mock.post(URL, status=202, json={"ok": True})
    mock.get(HEALTH, status=200)
    wake(clock)
    assert clock.sleeps == [waited]


def test_an_http_date_retry_after_waits_until_then(mock: Any, clock: Clock) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    mock.get(HEALTH, status=503)
    mock.post(URL, status=503, headers={"Retry-After": format_datetime(when, usegmt=True)}, json=STILL_STOPPING)
    mock.post(URL, status=202, json={"ok": True})
    mock.get(HEALTH, status=200)
    wake(clock)
    assert clock.sleeps[0] == pytest.approx(30, abs=2)


def test_a_stop_during_the_wake_starts_it_again(mock: Any, clock: Clock) -> None:
    mock.get(HEALTH, status=503)  # never healthy until started again
    mock.post(URL, status=200, json={"ok": True, "state": "running", "previous_state": "running"})
    mock.post(URL, status=200, json={"ok": True, "state": "stopped"})  # the status call, 10 s later
    mock.post(URL, status=202, json={"ok": True, "state": "pending", "previous_state": "stopped"})
    progress: list[str] = []
    with pytest.raises(WakeTimeout):
        wake(clock, deadline_seconds=12, on_progress=lambda update: progress.append(update.message))
    posts = [call.request.body for call in mock.calls if call.request.method == "POST"]
    assert posts == [b'{"action": "start"}', b'{"action": "status"}', b'{"action": "start"}']
    assert "The backend was stopped while waking; starting it again" in progress


def test_status_is_asked_every_ten_seconds_while_health_fails(mock: Any, clock: Clock) -> None:
    mock.get(HEALTH, body=requests.ConnectionError("refused"))
    mock.post(URL, status=202, json={"ok": True, "state": "pending"})
    mock.post(URL, status=200, json={"ok": True, "state": "pending"})
    with pytest.raises(WakeTimeout):
        wake(clock, deadline_seconds=35)
    posts = [call.request.body for call in mock.calls if call.request.method == "POST"]
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
    mock: Any, clock: Clock, status: int, body: object, error: type[WakeError]
) -> None:
    mock.get(HEALTH, status=503)
    mock.post(URL, status=status, **({"body": body} if isinstance(body, str) else {"json": body}))
    with pytest.raises(error, match=str(status)):
        wake(clock)


def test_a_server_error_names_the_functions_error(mock: Any, clock: Clock) -> None:
    mock.get(HEALTH, status=503)
    mock.post(URL, status=502, json={"error": {"code": "aws_access_denied", "message": "allow ec2:StartInstances"}})
    with pytest.raises(WakeServerError, match="502, aws_access_denied: allow ec2:StartInstances"):
        wake(clock)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    status=st.sampled_from([200, 202, 400, 401, 403, 404, 409, 413, 429, 500, 502, 503, 504]),
    retry_after=st.none() | st.text(max_size=40) | st.integers(-(10**6), 10**6).map(str),
    body=st.binary(max_size=60) | st.sampled_from([b"{}", b"[]", b"null", b'{"error": 5}', b'{"state": 1}']),
)
def test_nothing_but_a_wake_error_leaves_the_client(status: int, retry_after: str | None, body: bytes) -> None:
    clock = Clock()
    headers = {} if retry_after is None else {"Retry-After": retry_after.replace("\n", " ").replace("\r", " ")}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(HEALTH, status=503)
        mock.post(URL, status=status, headers=headers, body=body)
        with contextlib.suppress(WakeError):  # any other exception fails the test
            wake(clock, deadline_seconds=20)


def test_request_start_returns_the_answer_at_once(mock: Any) -> None:
    mock.post(URL, status=202, json={"ok": True, "state": "pending", "previous_state": "stopped"})
    assert request_start(URL) == StartAnswer(202, "pending", "stopped")
    mock.post(URL, status=503, headers={"Retry-After": "30"}, json=NO_CAPACITY)
    answer = request_start(URL)
    assert (answer.status_code, answer.error_code, answer.retry_after) == (503, "insufficient_capacity", 30.0)
    assert [call.request.method for call in mock.calls] == ["POST", "POST"]  # no health poll, no retry


def test_request_start_raises_a_wake_error_on_refusal(mock: Any) -> None:
    mock.post(URL, status=401, json={"error": {"code": "unauthorized", "message": "m"}})
    with pytest.raises(WakeAuthError):
        request_start(URL, token="wrong-token-0123456789")
    mock.post(URL, body=requests.ConnectionError("no route"))
    with pytest.raises(WakeServerError, match="could not be reached"):
        request_start(URL)


def test_a_backend_url_that_is_not_http_is_a_wake_error(clock: Clock) -> None:
    with pytest.raises(WakeError, match="not an http"):
        wake_backend(URL, "backend.test:8000", sleep=clock.sleep, monotonic=clock.monotonic)


def test_aws_iam_signs_exactly_the_bytes_sent(mock: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    mock.get(HEALTH, status=503)
    mock.post(URL, status=202, json={"ok": True})
    mock.get(HEALTH, status=200)
    wake(clock, auth="aws_iam")
    sent = mock.calls[1].request
    authorization = sent.headers["Authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/lambda/aws4_request" in authorization  # region from the URL, service lambda
    assert sent.body == b'{"action": "start"}'
    # Recompute the signature over the bytes that went out, at the time the request carried.
    signed = [name for name in authorization.split("SignedHeaders=")[1].split(",")[0].split(";") if name != "host"]
    replay = AWSRequest(method="POST", url=URL, data=sent.body, headers={name: sent.headers[name] for name in signed})
    replay.context["timestamp"] = sent.headers["X-Amz-Date"]
    signer = SigV4Auth(Credentials("AKIDEXAMPLE", "testing", "testing"), "lambda", "eu-west-1")
    signature = signer.signature(signer.string_to_sign(replay, signer.canonical_request(replay)), replay)
    assert authorization.endswith(f"Signature={signature}")
