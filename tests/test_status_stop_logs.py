"""status, stop, the log line, the metrics line, and the one broad catch."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import requests
import responses

import backend_orchestrator as bo
from tests.conftest import BACKEND, Ec2World, FakeClock, FakeContext, Invoke, body_of, http_event, load_event


@pytest.fixture
def backend() -> Any:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def test_status_of_a_stopped_instance_makes_no_http_request(invoke: Invoke, ec2: Ec2World, backend: Any) -> None:
    ec2.set_state("stopped")
    response = invoke(load_event("function_url_get_status"))
    body = body_of(response)
    assert response["statusCode"] == 200
    assert body["state"] == "stopped"
    assert body["backend"] == {"reachable": False, "healthy": False, "status_code": None}
    assert ec2.calls == ["DescribeInstances"]
    assert len(backend.calls) == 0


@pytest.mark.parametrize(
    ("respond", "expected"),
    [
        pytest.param(
            {"status": 200, "json": {"status": "ok"}},
            {"reachable": True, "healthy": True, "status_code": 200},
            id="healthy",
        ),
        pytest.param({"status": 503}, {"reachable": True, "healthy": False, "status_code": 503}, id="booting"),
        pytest.param(
            {"body": requests.ConnectionError("refused")},
            {"reachable": False, "healthy": False, "status_code": None},
            id="down",
        ),
    ],
)
def test_status_of_a_running_instance_probes_health(
    invoke: Invoke, ec2: Ec2World, backend: Any, respond: dict[str, Any], expected: dict[str, Any]
) -> None:
    backend.get(BACKEND + "/health", **respond)
    body = body_of(invoke(http_event(body='{"action": "status"}')))
    assert body["state"] == "running"
    assert body["backend"] == expected
    assert len(backend.calls) == 1
    assert backend.calls[0].request.req_kwargs["timeout"] == (bo.HEALTH_TIMEOUT_SECONDS, bo.HEALTH_TIMEOUT_SECONDS)


def test_stop_forces_a_stop(invoke: Invoke, ec2: Ec2World) -> None:
    body = invoke({"action": "stop"})
    assert (body["decision"], body["previous_state"]) == ("stop", "running")
    assert ec2.calls == ["StopInstances"]
    assert ec2.state() == "stopped"


def test_stop_honours_dry_run(invoke: Invoke, ec2: Ec2World) -> None:
    body = invoke({"action": "stop"}, DRY_RUN="true")
    assert (body["decision"], body["state"]) == ("would_stop", "running")
    assert ec2.mutations() == []


def test_one_json_log_line_and_one_emf_line_per_invocation(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock, backend: Any, log_lines: Any
) -> None:
    ec2.set_launch_time(clock.now() - timedelta(hours=1))
    backend.get(BACKEND + "/api/last-activity", json={"idle_seconds": 1000})
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
    assert names == {"CheckIdleRequested", "IdleSeconds", "InstanceStopped"}
    assert (emf["InstanceStopped"], emf["IdleSeconds"], emf["InstanceId"]) == (1, 1000, ec2.instance_id)


def test_log_level_hides_info_but_never_errors(invoke: Invoke, ec2: Ec2World, log_lines: Any) -> None:
    invoke({"action": "start"}, LOG_LEVEL="WARNING")
    lines = log_lines()
    assert [line for line in lines if "level" in line] == []  # only the metrics line
    invoke({"action": "nonsense"}, LOG_LEVEL="WARNING")
    assert log_lines()[0]["level"] == "WARNING"


def test_secrets_never_reach_logs_or_responses(invoke: Invoke, ec2: Ec2World, log_lines: Any) -> None:
    token = "s3cret-token-1234"
    for headers in ({"authorization": f"Bearer {token}"}, {"authorization": f"Bearer {token}x"}, {}):
        for body in ('{"action": "start"}', '{"action": "stop"}', "{bad"):
            response = invoke(http_event(body=body, headers=headers), AUTH_TOKEN=token)
            assert token not in str(response)
    output = str(log_lines())
    assert token not in output
    assert "Bearer s3cret" not in output


def test_an_unexpected_bug_is_a_500_with_the_traceback_in_the_log(
    invoke: Invoke, ec2: Ec2World, log_lines: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> Any:
        raise KeyError("StartingInstances")

    monkeypatch.setattr(bo, "start", broken)
    response = invoke(http_event())
    assert response["statusCode"] == 500
    assert body_of(response)["error"]["code"] == "internal_error"
    log = log_lines()[0]
    assert log["level"] == "ERROR"
    assert "KeyError: 'StartingInstances'" in log["exception"]


def test_the_ec2_client_is_built_once_per_container(invoke: Invoke, ec2: Ec2World) -> None:
    for event in ({"action": "stop"}, {"action": "start"}, {"action": "stop"}):
        assert invoke(event)["ok"] is True
    assert bo.ec2_client.cache_info().misses == 1
    config: Any = bo.ec2_client("us-east-1").meta.config  # botocore sets these options dynamically
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert (config.connect_timeout, config.read_timeout) == (3, 10)


def test_the_handler_reads_os_environ(ec2: Ec2World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTANCE_ID", ec2.instance_id)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert bo.lambda_handler({"action": "stop"}, None)["previous_state"] == "running"
    assert ec2.state() == "stopped"
