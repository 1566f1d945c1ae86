"""When the backend cannot say: the instance's own CloudWatch metrics, a drain before the stop, and a
notification of every start and stop."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ReadTimeoutError

from tests import function as bo
from tests.helpers import (
    ACTIVITY_PATH,
    CHECK,
    Answer,
    Ec2World,
    FakeClock,
    FakeContext,
    Invoke,
    ScriptedBackend,
    ec2_error,
    http_event,
    refused_port,
    setup_client,
)
from tools.harness import published_periods
from tools.real_ec2 import CPU_OPTIONS

TIMEOUT = 900  # three 5-minute periods
KB = 1024


@pytest.fixture
def backend_down(env: dict[str, str]) -> dict[str, str]:
    env["BACKEND_BASE_URL"] = f"http://127.0.0.1:{refused_port()}"  # refused: the backend process died
    return env


def put_metrics(
    clock: FakeClock,
    instance_id: str,
    cpu: list[float | None],
    network: list[float | None],
    *,
    first_period: int = 0,
    timeout: int = TIMEOUT,
) -> None:
    """Datapoints in AWS/EC2 for the periods of the metric window (index 0 is its first period), as EC2 puts them."""
    start = published_periods(clock.now(), timeout)[0]  # the README's window, computed apart from the function's
    data: list[Any] = []
    for index, (cpu_percent, network_bytes) in enumerate(zip(cpu, network, strict=True), start=first_period):
        when = start + timedelta(minutes=5 * index + 1)
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
    body = invoke(CHECK, STUCK_BUSY_SECONDS="10800")  # seen busy for the first time: its busy span begins now
    assert (body["decision"], body["signal"]) == ("keep", "activity")
    # CloudWatch is never asked while the backend answers; the function writes down when it first saw it busy.
    assert long_running.calls == ["DescribeInstances", "CreateTags"]


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


# --- Evidence from the current run only, on the instance's own scale -----------------------------------------
@pytest.mark.parametrize(
    ("launched", "decision", "says"),
    [
        pytest.param(-60, "stop", "CPU max 0.5% < 5%", id="a-minute-before-the-window"),
        pytest.param(0, "stop", "CPU max 0.5% < 5%", id="as-the-window-begins"),  # its first period began at launch
        pytest.param(1, "keep", "1 began before the launch", id="a-second-into-the-window"),
        pytest.param(301, "keep", "2 began before the launch", id="in-its-second-period"),
    ],
)
def test_the_fallback_judges_only_periods_of_the_current_run(
    invoke: Invoke,
    long_running: Ec2World,
    backend_down: dict[str, str],
    clock: FakeClock,
    launched: int,
    decision: str,
    says: str,
) -> None:
    # Idle datapoints in every period: where a period began before the launch, they are the previous run's,
    # which was stopped for being idle. A restarted backend that does not answer yet must not be stopped on them.
    start = published_periods(clock.now(), TIMEOUT)[0]
    long_running.set_launch_time(start + timedelta(seconds=launched))
    put_metrics(clock, long_running.instance_id, [0.5] * 3, [QUIET] * 3)
    body = invoke(CHECK)
    assert (body["decision"], body["signal"]) == (decision, "cloudwatch")
    assert says in body["reason"]
    assert long_running.state() == ("stopped" if decision == "stop" else "running")


@pytest.mark.parametrize("timeout", [300, 900])
def test_a_restarted_instance_is_not_stopped_on_its_previous_runs_datapoints(
    invoke: Invoke, long_running: Ec2World, backend_down: dict[str, str], clock: FakeClock, timeout: int
) -> None:
    # The story: stopped for being idle, woken a few minutes later, its backend slow to boot. Up just past the
    # timeout, the window still lies (at least partly) before this run.
    long_running.set_launch_time(clock.now() - timedelta(seconds=timeout + 1))
    put_metrics(clock, long_running.instance_id, [0.1] * 3, [QUIET] * 3, timeout=timeout)
    body = invoke(CHECK, IDLE_TIMEOUT_SECONDS=str(timeout))
    assert (body["decision"], body["signal"]) == ("keep", "cloudwatch")
    assert "began before the launch" in body["reason"]
    assert long_running.state() == "running"


@pytest.mark.parametrize(
    ("cores_threads", "decision", "says"),
    [
        pytest.param((1, 2), "stop", "CPU max 1.6% < 5%", id="2-vcpus"),
        pytest.param((16, 2), "keep", "CPU max 1.6% >= 1.5625%", id="32-vcpus"),
        pytest.param((32, 2), "keep", "CPU max 1.6% >= 0.78125%", id="64-vcpus"),
    ],
)
def test_one_busy_vcpu_keeps_an_instance_of_any_size(
    invoke: Invoke,
    long_running: Ec2World,
    backend_down: dict[str, str],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    cores_threads: tuple[int, int],
    decision: str,
    says: str,
) -> None:
    # CPUUtilization averages all vCPUs: one vCPU flat out on 64 reads 1.6 %, below the 5 % default.
    monkeypatch.setitem(CPU_OPTIONS, "t3.medium", cores_threads)
    put_metrics(clock, long_running.instance_id, [0.2, 1.6, 0.2], [QUIET] * 3)
    body = invoke(CHECK)
    assert body["decision"] == decision
    assert says in body["reason"]
    stopped = ["StopInstances"] if decision == "stop" else []
    assert long_running.calls == ["DescribeInstances", "GetMetricData", *stopped]


def test_without_a_vcpu_count_the_fallback_keeps_and_asks_cloudwatch_nothing(
    invoke: Invoke, long_running: Ec2World, backend_down: dict[str, str], clock: FakeClock
) -> None:
    def drop_cpu_options(parsed: dict[str, Any], **_: Any) -> None:  # moto's answer as it comes, without ours
        for reservation in parsed["Reservations"]:
            for instance in reservation["Instances"]:
                instance.pop("CpuOptions")

    long_running.on_function_calls("after-call.ec2.DescribeInstances", drop_cpu_options)
    put_metrics(clock, long_running.instance_id, [0.0] * 3, [QUIET] * 3)
    body = invoke(CHECK)
    assert (body["decision"], body["signal"]) == ("keep", "cloudwatch")
    assert "no CpuOptions" in body["reason"]
    assert long_running.calls == ["DescribeInstances"]


# --- The drain -----------------------------------------------------------------------------------------
DRAIN = "/api/drain"


@pytest.fixture
def idle_backend(backend: ScriptedBackend, long_running: Ec2World) -> ScriptedBackend:
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5000}))
    return backend


@pytest.mark.parametrize(
    ("answer", "decision", "says", "undone"),
    [
        pytest.param(Answer.json({"drained": True}), "stop", None, False, id="drained"),
        pytest.param(
            Answer.json({"drained": False, "active_requests": 1}), "keep", "did not drain", False, id="refused"
        ),
        pytest.param(Answer(404, b"no route"), "keep", "answered HTTP 404", False, id="not-found"),
        # Answers it cannot believe, to a request that reached the backend: it may have drained, and is told to resume.
        pytest.param(Answer.json({"drained": "yes"}), "keep", "did not drain", True, id="not-a-boolean"),
        pytest.param(Answer(mode="silent"), "keep", "timed out", True, id="timeout"),
        pytest.param(
            Answer(200, b'{"drained": true, "drained": true}'), "keep", "did not drain", True, id="repeated-key"
        ),
        pytest.param(Answer(200, b"\xff\xfe not json"), "keep", "did not drain", True, id="unreadable"),
    ],
)
def test_a_stop_waits_for_the_backend_to_drain(
    invoke: Invoke,
    long_running: Ec2World,
    idle_backend: ScriptedBackend,
    answer: Answer,
    decision: str,
    says: str | None,
    undone: bool,
) -> None:
    idle_backend.answer(DRAIN, answer)
    body = invoke(CHECK, DRAIN_PATH=DRAIN, HTTP_TIMEOUT_SECONDS="0.5")
    assert body["decision"] == decision
    expected = [("GET", ACTIVITY_PATH), ("POST", DRAIN)] + ([("DELETE", DRAIN)] if undone else [])
    assert [(call.method, call.path) for call in idle_backend.calls] == expected
    if says:
        assert says in body["reason"]
        assert long_running.mutations() == []
    else:
        assert long_running.mutations() == ["StopInstances"]
    if undone:
        assert "told to resume work" in body["reason"] or "could not be told to resume" in body["reason"]


@pytest.mark.parametrize(
    ("where", "maybe_drained"),
    [
        pytest.param("refused", False, id="connection-refused-it-never-reached-the-backend"),
        pytest.param("silent", True, id="no-answer-it-may-have-drained"),
    ],
)
def test_only_a_drain_that_may_have_reached_the_backend_is_to_be_undone(
    backend: ScriptedBackend, where: str, maybe_drained: bool
) -> None:
    backend.answer(DRAIN, Answer(mode="silent"))
    url = backend.url + DRAIN if where == "silent" else f"http://127.0.0.1:{refused_port()}{DRAIN}"
    deadline = bo.Deadline(bo.Clock().monotonic() + 10, bo.Clock())
    with pytest.raises(bo.NotDrainedError) as refused:
        bo.drain(url, 0.5, deadline, keep=bo.NOTHING_AFTER)
    assert refused.value.maybe_drained is maybe_drained


def test_no_drain_without_a_drain_path_nor_in_dry_run(
    invoke: Invoke, long_running: Ec2World, idle_backend: ScriptedBackend
) -> None:
    assert invoke(CHECK, DRAIN_PATH=DRAIN, DRY_RUN="true")["decision"] == "would_stop"
    assert invoke(CHECK)["decision"] == "stop"
    assert [call.method for call in idle_backend.calls] == ["GET", "GET"]


def test_a_drained_backend_whose_stop_is_denied_is_told_to_resume(
    invoke: Invoke, long_running: Ec2World, idle_backend: ScriptedBackend, log_lines: Any
) -> None:
    # moto enforces no IAM: inject what EC2 answers a role without ec2:StopInstances, after the drain succeeded.
    long_running.on_function_calls(
        "before-call.ec2.StopInstances", lambda **_: ec2_error("UnauthorizedOperation", "not authorized")
    )
    idle_backend.answer(DRAIN, Answer.json({"drained": True}))
    body = invoke(CHECK, DRAIN_PATH=DRAIN)
    assert (body["ok"], body["decision"], body["drained"]) == (True, "keep", True)
    assert "drained, but StopInstances failed" in body["reason"]
    assert "allow ec2:StopInstances" in body["reason"]
    assert "told to resume work" in body["reason"]
    methods = [(call.method, call.path) for call in idle_backend.calls]
    assert methods == [("GET", ACTIVITY_PATH), ("POST", DRAIN), ("DELETE", DRAIN)]
    line, emf = log_lines()
    assert line["level"] == "ERROR"
    assert emf["Errors"] == 1
    assert long_running.state() == "running"


def test_a_drained_backend_whose_plain_stop_no_longer_fits_is_told_to_resume(
    invoke: Invoke, long_running: Ec2World, idle_backend: ScriptedBackend, clock: FakeClock, log_lines: Any
) -> None:
    # moto hibernates anything: inject a refused hibernation that took all but 0.3 s of the 58 s left, less than one
    # short attempt of the plain stop, but time enough to tell the backend to resume.
    def refuse_slowly(params: dict[str, Any], **_: Any) -> Any:
        if params["body"].get("Hibernate") == "true":
            clock.advance(57.7)
            return ec2_error("UnsupportedHibernationConfiguration", "The instance is not configured for hibernation.")
        return None

    long_running.on_function_calls("before-call.ec2.StopInstances", refuse_slowly)
    idle_backend.answer(DRAIN, Answer.json({"drained": True}))
    body = invoke(CHECK, DRAIN_PATH=DRAIN, STOP_HIBERNATE="true")
    assert (body["decision"], body["drained"]) == ("keep", True)
    assert "drained, but StopInstances failed: Out of time before EC2 StopInstances" in body["reason"]
    assert [call.method for call in idle_backend.calls] == ["GET", "POST", "DELETE"]
    assert log_lines()[1]["OutOfTime"] == 1
    assert long_running.state() == "running"


def test_a_drain_is_not_begun_without_room_for_the_whole_stop(
    long_running: Ec2World, idle_backend: ScriptedBackend, env: dict[str, str], clock: FakeClock
) -> None:
    # The read took longer than it was granted (the fake clock moves past it once the backend has answered): no room
    # is left for the shortest drain and one short attempt of the stop and of the plain stop a refused hibernation
    # needs. The drain would be left dangling, so the backend is not drained at all.
    idle_backend.answer(DRAIN, Answer.json({"drained": True}))
    environ = {**env, "DRAIN_PATH": DRAIN, "STOP_HIBERNATE": "true", "IDLE_CPU_PERCENT": "0"}
    after_read = bo.MIN_BACKEND_SECONDS + bo.stop_seconds(bo.Config.from_env(environ), bo.AWS_MIN_ATTEMPT_SECONDS)

    late: list[float] = []

    def now() -> datetime:  # read right after the activity's answer (to judge it): the read is over by then
        if idle_backend.calls and not late:
            late.append(10 - after_read + 0.1)
            clock.advance(late[0])
        return clock.now()

    timed = bo.Clock(now=now, monotonic=clock.monotonic, sleep=clock.sleep)
    body = bo.handle(CHECK, FakeContext(clock, 12), environ, clock=timed)  # 10 s to spend
    assert (body["decision"], body["signal"]) == ("keep", "deadline")
    assert "out of time before POST" in body["reason"]
    assert [call.method for call in idle_backend.calls] == ["GET"]
    assert long_running.mutations() == []


def test_a_stop_that_got_no_answer_after_a_drain_leaves_the_backend_drained(
    invoke: Invoke, long_running: Ec2World, idle_backend: ScriptedBackend, log_lines: Any
) -> None:
    # StopInstances cut off without an answer may still reach EC2 and stop the instance: a backend told to resume
    # would take work that the stop then kills, so it is left drained until its lease ends. (Injected: moto answers.)
    def no_answer(**_: Any) -> Any:
        raise ReadTimeoutError(endpoint_url="https://ec2.us-east-1.amazonaws.com/")

    long_running.on_function_calls("before-send.ec2.StopInstances", no_answer, first=True)
    idle_backend.answer(DRAIN, Answer.json({"drained": True}))
    body = invoke(CHECK, DRAIN_PATH=DRAIN)
    assert (body["decision"], body["drained"]) == ("keep", True)
    assert "may still stop the instance, so the backend is left drained" in body["reason"]
    assert [call.method for call in idle_backend.calls] == ["GET", "POST"]  # no DELETE
    assert log_lines()[1]["Errors"] == 1


def test_a_stop_decided_by_cloudwatch_does_not_wait_for_a_drain_the_dead_backend_cannot_answer(
    invoke: Invoke, long_running: Ec2World, backend_down: dict[str, str], clock: FakeClock
) -> None:
    put_metrics(clock, long_running.instance_id, [0.0] * 3, [QUIET] * 3)
    assert invoke(CHECK, DRAIN_PATH=DRAIN)["decision"] == "stop"


# --- Notifications -------------------------------------------------------------------------------------
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
    assert ec2.calls == ["DescribeInstances", "StartInstances", "Publish"]


def test_an_instance_already_up_is_not_published(invoke: Invoke, ec2: Ec2World, topic: tuple[str, Any]) -> None:
    topic_arn, received = topic
    assert invoke(http_event(), NOTIFY_TOPIC_ARN=topic_arn)["statusCode"] == 200
    assert received() == []
    assert ec2.calls == ["DescribeInstances"]


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


# --- The pure parts ----
@pytest.mark.parametrize("odd", [math.nan, math.inf, -math.inf])
def test_a_datapoint_that_is_not_a_finite_number_counts_as_missing(odd: float) -> None:
    start = datetime.fromisoformat("2026-11-30T09:50:00+00:00")
    periods = [start + timedelta(minutes=5 * index, seconds=60) for index in range(3)]
    cpu = list(zip(periods, [0.1, odd, 0.1], strict=True))
    network = [(when, 100.0) for when in periods]
    samples = bo.MetricSamples(cpu, network, network)
    launched = start - timedelta(hours=1)
    idle, evidence = bo.judge_metrics(samples, start, start + timedelta(minutes=15), 5.0, 1e6, not_before=launched)
    assert not idle  # nan >= limit is false: read as a number, NaN would have looked idle
    assert "no CPU or network data for 1 of the 3 periods" in evidence


def test_the_window_is_whole_periods_that_end_ten_minutes_back() -> None:
    now = datetime.fromisoformat("2026-11-30T10:17:31+00:00")
    start, end = bo.metric_window(now, 900)
    assert (start.isoformat(), end.isoformat()) == ("2026-11-30T09:50:00+00:00", "2026-11-30T10:05:00+00:00")
    start, end = bo.metric_window(now, 901)  # a timeout that is not whole periods is covered by one more
    assert start.isoformat() == "2026-11-30T09:45:00+00:00"
