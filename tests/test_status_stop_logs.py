"""status, stop, the log line, the metrics line, and the one broad catch."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from botocore.retries.standard import ExponentialBackoff

from orchestrator import entry
from tests import function as bo
from tests.helpers import (
    ACTIVITY_PATH,
    Answer,
    Ec2World,
    FakeClock,
    FakeContext,
    Invoke,
    ScriptedBackend,
    body_of,
    http_event,
    load_event,
    refused_port,
)


def test_status_of_a_stopped_instance_makes_no_http_request(
    invoke: Invoke, ec2: Ec2World, backend: ScriptedBackend
) -> None:
    ec2.set_state("stopped")
    response = invoke(load_event("function_url_get_status"))
    body = body_of(response)
    assert response["statusCode"] == 200
    assert body["state"] == "stopped"
    assert body["backend"] == {"reachable": False, "healthy": False, "status_code": None}
    assert ec2.calls == ["DescribeInstances"]
    assert len(backend.calls) == 0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param(Answer.json({"status": "ok"}), {"reachable": True, "healthy": True, "status_code": 200}, id="ok"),
        pytest.param(Answer(503), {"reachable": True, "healthy": False, "status_code": 503}, id="booting"),
        pytest.param(Answer(mode="endless"), {"reachable": True, "healthy": True, "status_code": 200}, id="endless"),
        pytest.param(
            Answer(mode="silent"), {"reachable": False, "healthy": False, "status_code": None}, id="never-answers"
        ),
    ],
)
def test_status_of_a_running_instance_probes_health(
    invoke: Invoke, ec2: Ec2World, backend: ScriptedBackend, answer: Answer, expected: dict[str, Any]
) -> None:
    backend.answer("/health", answer)
    body = body_of(invoke(http_event(body='{"action": "status"}'), HTTP_TIMEOUT_SECONDS="1"))
    assert body["state"] == "running"
    assert body["backend"] == expected
    assert [(call.method, call.path) for call in backend.calls] == [("GET", "/health")]


def test_status_of_a_running_instance_whose_backend_is_down(invoke: Invoke, ec2: Ec2World) -> None:
    body = body_of(
        invoke(http_event(body='{"action": "status"}'), BACKEND_BASE_URL=f"http://127.0.0.1:{refused_port()}")
    )
    assert body["backend"] == {"reachable": False, "healthy": False, "status_code": None}


def test_stop_forces_a_stop(invoke: Invoke, ec2: Ec2World) -> None:
    body = invoke({"action": "stop"})
    assert (body["decision"], body["previous_state"]) == ("stop", "running")
    assert ec2.calls == ["DescribeInstances", "StopInstances"]  # described first: a hold that would start it is said
    assert ec2.state() == "stopped"


def test_stop_honours_dry_run(invoke: Invoke, ec2: Ec2World) -> None:
    body = invoke({"action": "stop"}, DRY_RUN="true")
    assert (body["decision"], body["state"]) == ("would_stop", "running")
    assert ec2.mutations() == []


@pytest.mark.parametrize("dry_run", ["false", "true"])
def test_a_stop_of_a_stopped_instance_says_so_and_notifies_nothing(
    invoke: Invoke, ec2: Ec2World, log_lines: Any, dry_run: str
) -> None:
    ec2.set_state("stopped")
    body = invoke({"action": "stop"}, DRY_RUN=dry_run, NOTIFY_TOPIC_ARN="arn:aws:sns:us-east-1:123456789012:t")
    assert body["decision"] == "skip"
    assert body["reason"] == "stop requested, but the instance was already stopped"
    assert "Publish" not in ec2.calls  # nothing changed: no "stopped" notice
    assert "InstanceStopped" not in log_lines()[1]
    assert ec2.state() == "stopped"


def test_one_json_log_line_and_one_emf_line_per_invocation(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    ec2.set_launch_time(clock.now() - timedelta(hours=1))
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 1000}))
    bo.handle(
        {"action": "check_idle"}, FakeContext(clock), {**env, "METRICS_NAMESPACE": "PyElli"}, clock=clock.as_clock()
    )
    log, emf = log_lines()
    assert log["level"] == "INFO"
    for key in (
        "action",
        "source",
        "instance_id",
        "previous_state",
        "state",
        "decision",
        "reason",
        "idle_seconds",
        "duration_ms",
        "aws_request_id",
    ):
        assert key in log, key
    assert (log["action"], log["source"], log["decision"], log["previous_state"]) == (
        "check_idle",
        "direct",
        "stop",
        "running",
    )
    directive = emf["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "PyElli"
    assert directive["Dimensions"] == [["InstanceId"]]
    names = {metric["Name"] for metric in directive["Metrics"]}
    assert names == {"CheckIdleRequested", "IdleSeconds", "InstanceStopped", "UptimeSeconds", "UptimeHours"}
    assert {metric["Unit"] for metric in directive["Metrics"] if metric["Name"].endswith("Seconds")} == {"Seconds"}
    assert (emf["InstanceStopped"], emf["IdleSeconds"], emf["InstanceId"]) == (1, 1000, ec2.instance_id)
    assert emf["UptimeSeconds"] == log["uptime_seconds"] == pytest.approx(3600, abs=1)  # LaunchTime has whole seconds


def test_log_level_hides_info_but_never_errors(invoke: Invoke, ec2: Ec2World, log_lines: Any) -> None:
    invoke({"action": "start"}, LOG_LEVEL="WARNING")
    lines = log_lines()
    assert [line for line in lines if "level" in line] == []  # only the metrics line
    invoke({"action": "nonsense"}, LOG_LEVEL="WARNING")
    assert log_lines()[0]["level"] == "WARNING"


def test_secrets_never_reach_logs_or_responses_even_at_debug(
    invoke: Invoke,
    ec2: Ec2World,
    backend: ScriptedBackend,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = "s3cret-token-1234"
    for noisy in ("botocore", "boto3", "urllib3"):  # the libraries' own debug logs, which log requests
        caplog.set_level(logging.DEBUG, logger=noisy)
    backend.answer("/health", Answer.json({"status": "ok"}))
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 1}))
    responses = [
        invoke(http_event(body=body, headers=headers), AUTH_TOKEN=token, LOG_LEVEL="DEBUG")
        for headers in ({"authorization": f"Bearer {token}"}, {"authorization": f"Bearer {token}x"}, {})
        for body in ('{"action": "start"}', '{"action": "status"}', '{"action": "stop"}', "{bad")
    ]
    responses.append(invoke({"action": "check_idle"}, AUTH_TOKEN=token, LOG_LEVEL="DEBUG"))
    everything = capsys.readouterr().out + caplog.text + str(responses)
    assert "DEBUG" in caplog.text  # the libraries did log at debug level
    assert token not in everything
    assert "Bearer s3cret" not in everything


def test_an_unexpected_bug_is_a_500_with_the_traceback_in_the_log(
    invoke: Invoke, ec2: Ec2World, log_lines: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> Any:
        raise KeyError("StartingInstances")

    monkeypatch.setattr(entry, "start", broken)  # act() calls the action by its name
    response = invoke(http_event())
    assert response["statusCode"] == 500
    assert body_of(response)["error"]["code"] == "internal_error"
    log = log_lines()[0]
    assert log["level"] == "ERROR"
    assert "KeyError: 'StartingInstances'" in log["exception"]


@pytest.fixture
def clients_built(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The config of every boto3 client the function builds during the test."""
    built: list[Any] = []
    real_client = boto3.client

    def counting_client(*args: Any, **kwargs: Any) -> Any:
        built.append(kwargs["config"])
        return real_client(*args, **kwargs)

    monkeypatch.setattr(boto3, "client", counting_client)
    bo.aws_client.cache_clear()  # a new container: none built yet
    return built


def test_the_ec2_client_is_built_once_per_container(invoke: Invoke, ec2: Ec2World, clients_built: list[Any]) -> None:
    for event in ({"action": "stop"}, {"action": "start"}, {"action": "stop"}):
        assert invoke(event)["ok"] is True
    [config] = clients_built
    assert config.retries == {"mode": "standard", "total_max_attempts": bo.AWS_MAX_ATTEMPTS}
    assert (config.connect_timeout, config.read_timeout) == (
        bo.AWS_CONNECT_TIMEOUT_SECONDS,
        bo.AWS_READ_TIMEOUT_SECONDS,
    )


THROTTLED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>RequestLimitExceeded</Code>'
    b"<Message>Request limit exceeded.</Message></Error></Errors><RequestID>r-1</RequestID></Response>"
)


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Any:
        yield self.data


@pytest.mark.parametrize(
    ("timeout_seconds", "attempts"),
    [
        pytest.param(60, 3, id="plenty-of-time"),
        pytest.param(bo.aws_call_seconds(2) + bo.ANSWER_MARGIN_SECONDS, 2, id="two-attempts-fit"),
        pytest.param(bo.aws_call_seconds(2) + bo.ANSWER_MARGIN_SECONDS - 0.1, 1, id="one-attempt-fits"),
        pytest.param(3, 1, id="lambdas-default-3s-one-short-attempt"),
    ],
)
def test_an_ec2_call_makes_only_the_attempts_that_fit_the_time_left(
    ec2: Ec2World,
    env: dict[str, str],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    clients_built: list[Any],
    timeout_seconds: float,
    attempts: int,
) -> None:
    # moto never throttles: answer every attempt of DescribeInstances ahead of it, as EC2 does when it throttles
    # (503 RequestLimitExceeded, which botocore retries), and count the attempts that reach the wire.
    sent: list[Any] = []

    def throttle(request: Any, **_: Any) -> Any:
        sent.append(request)
        return AWSResponse(request.url, 503, HTTPHeaders(), _Body(THROTTLED))

    ec2.on_function_calls("before-send.ec2.DescribeInstances", throttle, first=True)
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda *_: 0.0)  # botocore's backoff, without the wait
    body = bo.handle({"action": "status"}, FakeContext(clock, timeout_seconds), env, clock=clock.as_clock())
    assert (body["error"]["code"], body["aws_error_code"]) == ("aws_error", "RequestLimitExceeded")
    assert len(sent) == attempts
    assert len(clients_built) == 1  # one client, whatever the attempts


def test_the_handler_reads_os_environ(ec2: Ec2World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTANCE_ID", ec2.instance_id)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert bo.lambda_handler({"action": "stop"}, None)["previous_state"] == "running"
    assert ec2.state() == "stopped"
