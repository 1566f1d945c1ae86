"""The app's client: retries a still-stopping start, signs for AWS_IAM, and says what went wrong."""

from __future__ import annotations

from typing import Any

import pytest
import requests
import responses
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from examples.wake_backend import WakeError, WakeServerError, wake_backend

URL = "https://abcdefghij0123456789abcdefghij01.lambda-url.eu-west-1.on.aws/"
BACKEND = "http://backend.test:8000"


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
def mock() -> Any:
    with responses.RequestsMock() as requests_mock:
        yield requests_mock


def test_a_healthy_backend_costs_one_get_and_no_start(mock: Any) -> None:
    mock.get(BACKEND + "/health", json={"status": "ok"})
    clock = Clock()
    wake_backend(URL, BACKEND, sleep=clock.sleep, monotonic=clock.monotonic)
    assert [call.request.method for call in mock.calls] == ["GET"]


def test_still_stopping_is_retried_after_retry_after(mock: Any) -> None:
    mock.get(BACKEND + "/health", body=requests.ConnectionError("refused"))
    mock.post(
        URL, status=503, headers={"Retry-After": "10"}, json={"error": {"code": "still_stopping", "message": "m"}}
    )
    mock.post(URL, status=202, json={"ok": True})
    mock.get(BACKEND + "/health", status=503)
    mock.get(BACKEND + "/health", status=200)
    clock = Clock()
    wake_backend(URL, BACKEND, sleep=clock.sleep, monotonic=clock.monotonic)
    assert [call.request.method for call in mock.calls] == ["GET", "POST", "POST", "GET", "GET"]
    assert clock.sleeps == [10.0, 1.0]  # Retry-After, then the first health backoff


def test_polling_backs_off_up_to_ten_seconds(mock: Any) -> None:
    mock.get(BACKEND + "/health", status=503)
    mock.post(URL, status=202, json={"ok": True})
    clock = Clock()
    with pytest.raises(WakeError, match="not healthy after 60s"):
        wake_backend(URL, BACKEND, deadline_seconds=60, sleep=clock.sleep, monotonic=clock.monotonic)
    assert clock.sleeps[:4] == [1.0, 1.5, 2.25, 3.375]
    assert max(clock.sleeps) <= 10.0
    assert sum(clock.sleeps) == pytest.approx(60)


def test_a_server_error_names_the_functions_error(mock: Any) -> None:
    mock.get(BACKEND + "/health", status=503)
    mock.post(URL, status=502, json={"error": {"code": "aws_access_denied", "message": "allow ec2:StartInstances"}})
    with pytest.raises(WakeServerError, match="502, aws_access_denied: allow ec2:StartInstances"):
        wake_backend(URL, BACKEND)


def test_aws_iam_signs_exactly_the_bytes_sent(mock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    mock.get(BACKEND + "/health", status=503)
    mock.post(URL, status=202, json={"ok": True})
    mock.get(BACKEND + "/health", status=200)
    clock = Clock()
    wake_backend(URL, BACKEND, auth="aws_iam", sleep=clock.sleep, monotonic=clock.monotonic)
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
