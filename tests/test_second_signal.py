"""When the backend cannot say: the instance's own CloudWatch metrics, a drain before the stop, and a
notification of every start and stop."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest

import backend_orchestrator as bo
from tests.helpers import (
    ACTIVITY_PATH,
    CHECK,
    Answer,
    Ec2World,
    FakeClock,
    Invoke,
    ScriptedBackend,
    ec2_error,
    free_port,
    http_event,
    setup_client,
)

TIMEOUT = 900  # three 5-minute periods
KB = 1024


@pytest.fixture
def backend_down(env: dict[str, str]) -> dict[str, str]:
    env["BACKEND_BASE_URL"] = f"http://127.0.0.1:{free_port()}"  # refused: the backend process died
    return env


def put_metrics(
    clock: FakeClock,
    instance_id: str,
    cpu: list[float | None],
    network: list[float | None],
    *,
    first_period: int = 0,
) -> None:
    """Datapoints in AWS/EC2 for the periods of the metric window (index 0 is its first period), as EC2 puts them."""
    start, _ = bo.metric_window(clock.now(), TIMEOUT)
    data: list[Any] = []
    for index, (cpu_percent, network_bytes) in enumerate(zip(cpu, network, strict=True), start=first_period):
        when = start + timedelta(seconds=index * bo.METRIC_PERIOD_SECONDS + 60)
        values = {"CPUUtilization": cpu_percent}
        if network_bytes is not None:
            values |= {"NetworkIn": network_bytes / 2, "NetworkOut": network_bytes / 2}
        dimensions = [{"Name": "InstanceId", "Value": instance_id}]
        data += [
            {"MetricName": name, "Dimensions": dimensions, "Timestamp": when, "Value": value}
            for name, value in values.items()
            if value is not None
        ]
    if data:
        setup_client("cloudwatch").put_metric_data(Namespace="AWS/EC2", MetricData=data)


QUIET = 40 * KB  # an agent's chatter in five minutes


def test_a_dead_backend_on_an_idle_instance_is_stopped_by_its_metrics(
    invoke: Invoke, long_running: Ec2World, backend_down: dict[str, str], clock: FakeClock
) -> None:
    put_metrics(clock, long_running.instance_id, [1.2, 0.4, 0.8], [QUIET, QUIET, QUIET])
    body = invoke(CHECK)
    assert (body["decision"], body["signal"]) == ("stop", "cloudwatch")
    assert body["reason"].startswith("backend unreachable (GET http://127.0.0.1:")
    assert "CPU max 1.2% < 5%, network at most 40 KB per 5 min over 15 min" in body["reason"]
    assert long_running.calls == ["DescribeInstances", "GetMetricData", "StopInstances"]
    assert long_running.state() == "stopped"


@pytest.mark.parametrize(
    ("cpu", "network", "says"),
    [
        pytest.param([1.0, 38.0, 1.0], [QUIET] * 3, "CPU max 38.0% >= 5%", id="cpu-high-in-one-period"),
        pytest.param([1.0] * 3, [QUIET, 5_000 * KB, QUIET], "network 5000 KB in 5 min >= 1024 KB", id="download"),
        pytest.param([1.0, None, 1.0], [QUIET] * 3, "no CPU or network data for 1 of the 3 periods", id="cpu-gap"),
        pytest.param([1.0] * 3, [QUIET, QUIET, None], "no CPU or network data for 1 of the 3 periods", id="net-gap"),
        pytest.param([], [], "no CPU or network data for 3 of the 3 periods", id="no-datapoints"),
    ],
)
def test_metrics_that_are_not_clearly_idle_keep_the_instance(
    invoke: Invoke,
    long_running: Ec2World,
    backend_down: dict[str, str],
    clock: FakeClock,
    cpu: list[float | None],
    network: list[float | None],
    says: str,
) -> None:
    put_metrics(clock, long_running.instance_id, cpu, network)
    body = invoke(CHECK)
    assert (body["decision"], body["signal"]) == ("keep", "cloudwatch")
    assert says in body["reason"]
    assert long_running.calls == ["DescribeInstances", "GetMetricData"]
    assert long_running.state() == "running"


def test_a_busy_period_published_after_the_window_keeps_it_too(
    invoke: Invoke, long_running: Ec2World, backend_down: dict[str, str], clock: FakeClock
) -> None:
    # The window ends ten minutes back so that its periods are complete; newer data, where EC2 has already
    # published it, may only add reasons to keep: a grid search that began five minutes ago shows there.
    put_metrics(clock, long_running.instance_id, [1.0, 1.0, 1.0], [QUIET] * 3)
    put_metrics(clock, long_running.instance_id, [97.0], [QUIET], first_period=4)
    body = invoke(CHECK)
    assert body["decision"] == "keep"
    assert "CPU max 97.0% >= 5%" in body["reason"]


def test_a_freshly_started_instance_is_kept_without_asking_cloudwatch(
    invoke: Invoke, ec2: Ec2World, backend_down: dict[str, str], clock: FakeClock
) -> None:
    clock.wall = clock.wall.replace(microsecond=0)  # EC2's LaunchTime has whole seconds
    ec2.set_launch_time(clock.now() - timedelta(seconds=600))
    body = invoke(CHECK)
    assert (body["decision"], body["signal"]) == ("keep", "activity")
    assert "up 600s, within the 900s timeout" in body["reason"]
    assert ec2.calls == ["DescribeInstances"]


def test_the_fallback_turned_off_keeps_and_asks_nothing(
    invoke: Invoke, long_running: Ec2World, backend_down: dict[str, str], clock: FakeClock
) -> None:
    put_metrics(clock, long_running.instance_id, [0.0] * 3, [0.0] * 3)
    body = invoke(CHECK, IDLE_CPU_PERCENT="0")
    assert (body["decision"], body["signal"]) == ("keep", "activity")
    assert "never stop on missing information" in body["reason"]
    assert long_running.calls == ["DescribeInstances"]


def test_a_backend_that_says_busy_is_never_overruled_by_idle_metrics(
    invoke: Invoke, long_running: Ec2World, backend: ScriptedBackend, clock: FakeClock
) -> None:
    put_metrics(clock, long_running.instance_id, [0.0] * 3, [0.0] * 3)
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5000, "busy": True}))
    body = invoke(CHECK)
    assert (body["decision"], body["signal"]) == ("keep", "activity")
    assert long_running.calls == ["DescribeInstances"]  # CloudWatch is never asked while the backend answers


def test_cloudwatch_access_denied_keeps_and_names_the_iam_action(
    invoke: Invoke, long_running: Ec2World, backend_down: dict[str, str], clock: FakeClock, log_lines: Any
) -> None:
    # moto enforces no IAM: inject the AccessDenied that CloudWatch answers a role without the permission.
    long_running.on_function_calls(
        "before-call.monitoring.GetMetricData", lambda **_: ec2_error("AccessDenied", "not authorized")
    )
    put_metrics(clock, long_running.instance_id, [0.0] * 3, [0.0] * 3)
    body = invoke(CHECK)
    assert body["decision"] == "keep"
    assert "allow cloudwatch:GetMetricData to the Lambda's role" in body["reason"]
    assert log_lines()[0]["level"] == "ERROR"
    assert long_running.state() == "running"


# --- The drain -----------------------------------------------------------------------------------------
DRAIN = "/api/drain"


@pytest.fixture
def idle_backend(backend: ScriptedBackend, long_running: Ec2World) -> ScriptedBackend:
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5000}))
    return backend


@pytest.mark.parametrize(
    ("answer", "decision", "says"),
    [
        pytest.param(Answer.json({"drained": True}), "stop", None, id="drained"),
        pytest.param(Answer.json({"drained": False, "active_requests": 1}), "keep", "did not drain", id="refused"),
        pytest.param(Answer(404, b"no route"), "keep", "answered HTTP 404", id="not-found"),
        pytest.param(Answer.json({"drained": "yes"}), "keep", "did not drain", id="not-a-boolean"),
        pytest.param(Answer(mode="silent"), "keep", "timed out", id="timeout"),
    ],
)
def test_a_stop_waits_for_the_backend_to_drain(
    invoke: Invoke,
    long_running: Ec2World,
    idle_backend: ScriptedBackend,
    answer: Answer,
    decision: str,
    says: str | None,
) -> None:
    idle_backend.answer(DRAIN, answer)
    body = invoke(CHECK, DRAIN_PATH=DRAIN, HTTP_TIMEOUT_SECONDS="0.5")
    assert body["decision"] == decision
    assert [(call.method, call.path) for call in idle_backend.calls] == [("GET", ACTIVITY_PATH), ("POST", DRAIN)]
    if says:
        assert says in body["reason"]
        assert long_running.mutations() == []
    else:
        assert long_running.mutations() == ["StopInstances"]


def test_no_drain_without_a_drain_path_nor_in_dry_run(
    invoke: Invoke, long_running: Ec2World, idle_backend: ScriptedBackend
) -> None:
    assert invoke(CHECK, DRAIN_PATH=DRAIN, DRY_RUN="true")["decision"] == "would_stop"
    assert invoke(CHECK)["decision"] == "stop"
    assert [call.method for call in idle_backend.calls] == ["GET", "GET"]


def test_a_stop_decided_by_cloudwatch_does_not_wait_for_a_drain_the_dead_backend_cannot_answer(
    invoke: Invoke, long_running: Ec2World, backend_down: dict[str, str], clock: FakeClock
) -> None:
    put_metrics(clock, long_running.instance_id, [0.0] * 3, [QUIET] * 3)
    assert invoke(CHECK, DRAIN_PATH=DRAIN)["decision"] == "stop"


# --- Notifications -------------------------------------------------------------------------------------
@pytest.fixture
def topic(aws: None) -> tuple[str, Any]:
    """An SNS topic the function publishes to, and a function that reads what reached its SQS subscriber."""
    sns, sqs = setup_client("sns"), setup_client("sqs")
    topic_arn = sns.create_topic(Name="backend-orchestrator")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="notifications")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)

    def received() -> list[dict[str, Any]]:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
        return [json.loads(message["Body"]) for message in messages]

    return topic_arn, received


def test_a_start_is_published(invoke: Invoke, ec2: Ec2World, topic: tuple[str, Any]) -> None:
    topic_arn, received = topic
    ec2.set_state("stopped")
    assert invoke(http_event(), NOTIFY_TOPIC_ARN=topic_arn)["statusCode"] == 202
    [message] = received()
    assert message["Subject"] == f"Backend {ec2.instance_id} started"
    assert f"Instance {ec2.instance_id} started by start." in message["Message"]
    assert {name: value["Value"] for name, value in message["MessageAttributes"].items()} == {
        "action": "start",
        "decision": "start",
    }
    assert ec2.calls == ["StartInstances", "Publish"]


def test_an_instance_already_up_is_not_published(invoke: Invoke, ec2: Ec2World, topic: tuple[str, Any]) -> None:
    topic_arn, received = topic
    assert invoke(http_event(), NOTIFY_TOPIC_ARN=topic_arn)["statusCode"] == 200
    assert received() == []
    assert ec2.calls == ["StartInstances"]


def test_a_fallback_stop_is_published_with_its_evidence_and_uptime(
    invoke: Invoke, long_running: Ec2World, backend_down: dict[str, str], clock: FakeClock, topic: tuple[str, Any]
) -> None:
    topic_arn, received = topic
    put_metrics(clock, long_running.instance_id, [1.0] * 3, [QUIET] * 3)
    assert invoke(CHECK, NOTIFY_TOPIC_ARN=topic_arn)["decision"] == "stop"
    [message] = received()
    assert message["Subject"] == f"Backend {long_running.instance_id} stopped"
    text = message["Message"]
    assert "Why: backend unreachable" in text
    assert "Decided by: cloudwatch" in text
    assert "Ran for: 2 h 0 min" in text
    assert message["MessageAttributes"]["decision"]["Value"] == "stop"


def test_would_stop_is_published_in_dry_run_and_keep_is_not(
    invoke: Invoke, long_running: Ec2World, idle_backend: ScriptedBackend, topic: tuple[str, Any]
) -> None:
    topic_arn, received = topic
    assert invoke(CHECK, NOTIFY_TOPIC_ARN=topic_arn, DRY_RUN="true")["decision"] == "would_stop"
    assert [m["Subject"] for m in received()] == [f"Backend {long_running.instance_id} would be stopped (dry run)"]
    idle_backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 1}))
    assert invoke(CHECK, NOTIFY_TOPIC_ARN=topic_arn)["decision"] == "keep"
    assert received() == []


def test_a_failed_publish_is_a_warning_and_changes_nothing(
    invoke: Invoke, long_running: Ec2World, idle_backend: ScriptedBackend, log_lines: Any
) -> None:
    missing_topic = "arn:aws:sns:us-east-1:123456789012:no-such-topic"
    body = invoke(CHECK, NOTIFY_TOPIC_ARN=missing_topic)
    assert (body["ok"], body["decision"]) == (True, "stop")
    assert long_running.state() == "stopped"
    log = log_lines()[0]
    assert log["level"] == "WARNING"
    assert "The notification was not published" in log["warnings"][0]


# --- The pure parts ------------------------------------------------------------------------------------
def test_the_window_is_whole_periods_that_end_ten_minutes_back() -> None:
    now = datetime.fromisoformat("2026-11-30T10:17:31+00:00")
    start, end = bo.metric_window(now, 900)
    assert (start.isoformat(), end.isoformat()) == ("2026-11-30T09:50:00+00:00", "2026-11-30T10:05:00+00:00")
    start, end = bo.metric_window(now, 901)  # a timeout that is not whole periods is covered by one more
    assert start.isoformat() == "2026-11-30T09:45:00+00:00"
