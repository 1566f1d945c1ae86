"""When the next step cannot fit the invocation's time: start answers 503 out_of_time, check_idle keeps with a
WARNING that names the step, status answers the state it has. Nothing is left half done."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import function as bo
from tests.helpers import (
    ACTIVITY_PATH,
    CHECK,
    Answer,
    Ec2World,
    FakeClock,
    ScriptedBackend,
    body_of,
    ec2_error,
    http_event,
    invoke_handler,
    refused_port,
)

ONE_CALL = bo.aws_call_seconds(1)


def handle(event: Any, env: dict[str, str], clock: FakeClock, timeout_seconds: float, **overrides: str) -> Any:
    return invoke_handler(event, {**env, **overrides}, clock=clock, timeout_seconds=timeout_seconds)


@pytest.mark.parametrize("action", ["start", "check_idle"])
def test_a_timeout_too_short_for_one_attempt_of_each_call_says_to_raise_it_and_calls_nothing(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock, log_lines: Any, action: str
) -> None:
    ec2.set_state("stopped")
    shortest = bo.shortest_timeout(bo.Action(action), bo.Config.from_env(env))
    event = http_event() if action == "start" else {"action": action}
    response = handle(event, env, clock, shortest - 0.1)
    body = body_of(response)
    assert (body["error"]["code"], response.get("statusCode", 500)) == ("timeout_too_short", 500)
    assert "Retry-After" not in response.get("headers", {})  # a retry cannot succeed
    message = body["error"]["message"]
    assert "Raise the function's Timeout" in message
    assert f"to {bo.RECOMMENDED_TIMEOUT_SECONDS} s" in message
    assert (body["timeout_seconds"], body["needed_seconds"]) == (round(shortest - 0.1, 1), shortest)
    assert ec2.calls == []
    assert ec2.state() == "stopped"
    line, emf = log_lines()
    assert (line["level"], emf["Errors"]) == ("ERROR", 1)


def test_start_out_of_time_after_a_slow_describe_is_503_with_retry_after(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock, log_lines: Any
) -> None:
    # The timeout holds one attempt of each call, but EC2 took its time over the Describe: the StartInstances that
    # would follow has less than its shortest attempt left. Nothing was half done, and a retry may well succeed.
    ec2.set_state("stopped")
    ec2.on_function_calls("after-call.ec2.DescribeInstances", lambda **_: clock.advance(2.0))
    response = handle(http_event(), env, clock, 3.0)  # 2.4 s to spend, 2 s of it on the Describe
    assert response["statusCode"] == 503
    assert response["headers"]["Retry-After"] == str(bo.RETRY_AFTER_SECONDS)
    assert body_of(response)["error"]["code"] == "out_of_time"
    assert "Out of time before EC2 StartInstances" in body_of(response)["error"]["message"]
    assert ec2.calls == ["DescribeInstances"]
    assert ec2.state() == "stopped"
    assert log_lines()[0]["level"] == "ERROR"


def test_check_idle_without_time_for_the_calls_after_the_read_keeps_and_reads_nothing(
    long_running: Ec2World, env: dict[str, str], clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5000}))
    # A slow Describe leaves less than the shortest read and one short attempt of GetMetricData and StopInstances.
    long_running.on_function_calls("after-call.ec2.DescribeInstances", lambda **_: clock.advance(1.0))
    body = handle(CHECK, env, clock, 3.0)  # 2.4 s to spend: 1.4 s after the Describe, 1.8 s needed
    assert (body["decision"], body["signal"]) == ("keep", "deadline")
    assert body["reason"].startswith(f"out of time before GET {backend.url}{ACTIVITY_PATH}")
    assert long_running.calls == ["DescribeInstances"]
    assert backend.calls == []
    line, emf = log_lines()
    assert line["level"] == "ERROR"  # no decision: an idle instance would run on, so the OutOfTime alarm hears of it
    assert emf["OutOfTime"] == 1


def test_check_idle_without_time_for_the_hibernation_fallback_keeps_and_says_so(
    long_running: Ec2World, env: dict[str, str], clock: FakeClock, backend: ScriptedBackend
) -> None:
    # The read leaves the stop its time by construction; a refused hibernation that was slow to come back
    # (injected: moto hibernates anything) leaves less than one short attempt for the plain stop that should follow.
    def refuse_slowly(params: dict[str, Any], **_: Any) -> Any:
        if params["body"].get("Hibernate") == "true":
            clock.advance(8.3)
            return ec2_error("UnsupportedHibernationConfiguration", "The instance is not configured for hibernation.")
        return None

    long_running.on_function_calls("before-call.ec2.StopInstances", refuse_slowly)
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5000}))
    context_seconds = bo.ANSWER_MARGIN_SECONDS + ONE_CALL + 1.5  # 8.5 s to spend; the refusal takes 8.3 s of it
    body = handle(CHECK, env, clock, context_seconds, IDLE_CPU_PERCENT="0", STOP_HIBERNATE="true")
    assert (body["decision"], body["signal"]) == ("keep", "deadline")
    assert "over the 900s timeout, but out of time before EC2 StopInstances" in body["reason"]
    assert body["idle_seconds"] == 5000
    assert long_running.mutations() == ["StopInstances"]  # the refused one only
    assert long_running.state() == "running"


def test_status_without_time_for_the_health_probe_answers_the_state(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    ec2.on_function_calls("after-call.ec2.DescribeInstances", lambda **_: clock.advance(ONE_CALL))
    body = body_of(
        handle(http_event(body='{"action": "status"}'), env, clock, bo.ANSWER_MARGIN_SECONDS + ONE_CALL + 0.5)
    )
    assert (body["state"], body["backend"]) == ("running", None)
    assert backend.calls == []
    assert "Out of time before GET" in log_lines()[0]["warnings"][0]


class OddContext:
    """A context whose get_remaining_time_in_millis answers `answer`, or raises it."""

    aws_request_id = "req-odd"

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def get_remaining_time_in_millis(self) -> object:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    "answer",
    [None, "abc", [1000], True, float("nan"), RuntimeError("the runtime is gone")],
    ids=["none", "text", "list", "boolean", "nan", "raises"],
)
def test_a_context_that_cannot_say_its_time_gets_the_default_with_a_warning(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock, log_lines: Any, answer: object
) -> None:
    body = bo.handle({"action": "start"}, OddContext(answer), env, clock=clock.as_clock())
    assert (body["ok"], body["previous_state"]) == (True, "running")
    line = log_lines()[0]
    assert line["level"] == "WARNING"
    assert "get_remaining_time_in_millis() gave" in line["warnings"][0]
    assert ec2.calls == ["DescribeInstances"]


@pytest.mark.parametrize(
    ("fallback", "shortest"), [pytest.param("5", 2.8, id="fallback-on"), pytest.param("0", 2.3, id="fallback-off")]
)
def test_check_idle_decides_at_the_shortest_timeout_and_not_below(
    long_running: Ec2World,
    env: dict[str, str],
    clock: FakeClock,
    backend: ScriptedBackend,
    log_lines: Any,
    fallback: str,
    shortest: float,
) -> None:
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5000}))
    assert bo.shortest_check_seconds(bo.Config.from_env({**env, "IDLE_CPU_PERCENT": fallback})) == shortest
    below = handle(CHECK, env, clock, shortest - 0.1, IDLE_CPU_PERCENT=fallback)
    assert below["error"]["code"] == "timeout_too_short"
    assert long_running.state() == "running"
    at = handle(CHECK, env, clock, shortest, IDLE_CPU_PERCENT=fallback)
    assert (at["decision"], at["signal"]) == ("stop", "activity")
    assert [line.get("Errors") for line in log_lines() if "_aws" in line] == [1, None]


def test_the_deploy_doc_states_the_shortest_deciding_timeouts() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
    base = {"INSTANCE_ID": "i-0abc123def4567890"}
    on, off = (bo.shortest_check_seconds(bo.Config.from_env({**base, "IDLE_CPU_PERCENT": v})) for v in ("5", "0"))
    assert f"decides from a function timeout of **{on:g} s** with the fallback on and **{off:g} s** with it off" in doc
    drained = bo.shortest_check_seconds(bo.Config.from_env({**base, "DRAIN_PATH": "/d", "STOP_HIBERNATE": "true"}))
    assert f"With `DRAIN_PATH` and\n`STOP_HIBERNATE=true` it needs {drained:g} s" in doc


def test_the_longest_path_of_check_idle_counts_every_call_it_makes(
    long_running: Ec2World, env: dict[str, str], clock: FakeClock, topic: tuple[str, Any]
) -> None:
    """The worst-case table's check_idle row, against a check that makes every AWS call it can: an ended hold, a
    backend that is down, idle metrics, a refused hibernation (injected: moto hibernates anything), two notices."""
    from tests.test_holds import tag_by_hand
    from tests.test_second_signal import QUIET, put_metrics

    def refuse_hibernation(params: dict[str, Any], **_: Any) -> Any:
        if params["body"].get("Hibernate") == "true":
            return ec2_error("UnsupportedHibernationConfiguration", "The instance is not configured for hibernation.")
        return None

    topic_arn, received = topic
    long_running.on_function_calls("before-call.ec2.StopInstances", refuse_hibernation)
    tag_by_hand(long_running, "running", clock.now() - timedelta(minutes=1), "board demo")
    put_metrics(clock, long_running.instance_id, [0.5] * 3, [QUIET] * 3)
    environ = {**env, "BACKEND_BASE_URL": f"http://127.0.0.1:{refused_port()}", "NOTIFY_TOPIC_ARN": topic_arn}
    body = handle(CHECK, environ, clock, 60, STOP_HIBERNATE="true")
    assert (body["decision"], body["signal"]) == ("stop", "cloudwatch")
    assert len(received()) == 2  # the hold's end, the stop
    config = bo.Config.from_env({**environ, "STOP_HIBERNATE": "true"})
    aws_steps = [step.split(" ")[0] for step, _ in bo.longest_path(bo.Action.CHECK_IDLE, config) if "GET" not in step]
    assert long_running.calls == aws_steps
