"""When the next step cannot fit the invocation's time: start answers 503 out_of_time, check_idle keeps with a
WARNING that names the step, status answers the state it has. Nothing is left half done."""

from __future__ import annotations

from typing import Any

import backend_orchestrator as bo
from tests.helpers import (
    ACTIVITY_PATH,
    CHECK,
    Answer,
    Ec2World,
    FakeClock,
    FakeContext,
    ScriptedBackend,
    body_of,
    ec2_error,
    http_event,
)

ONE_CALL = bo.aws_call_seconds(1)


def handle(event: Any, env: dict[str, str], clock: FakeClock, timeout_seconds: float, **overrides: str) -> Any:
    return bo.handle(event, FakeContext(clock, timeout_seconds), {**env, **overrides}, clock=clock.as_clock())


def test_start_without_time_for_one_call_is_503_and_calls_nothing(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock, log_lines: Any
) -> None:
    ec2.set_state("stopped")
    response = handle(http_event(), env, clock, bo.ANSWER_MARGIN_SECONDS + ONE_CALL - 0.1)
    assert response["statusCode"] == 503
    assert response["headers"]["Retry-After"] == str(bo.RETRY_AFTER_SECONDS)
    assert body_of(response)["error"]["code"] == "out_of_time"
    assert "EC2 StartInstances" in body_of(response)["error"]["message"]
    assert ec2.calls == []
    assert ec2.state() == "stopped"
    assert log_lines()[0]["level"] == "ERROR"


def test_check_idle_without_time_for_the_calls_after_the_read_keeps_and_reads_nothing(
    long_running: Ec2World, env: dict[str, str], clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5000}))
    # Describe fits; the read does not, since GetMetricData and StopInstances must fit after it.
    body = handle(CHECK, env, clock, bo.ANSWER_MARGIN_SECONDS + 2 * ONE_CALL)
    assert (body["decision"], body["signal"]) == ("keep", "deadline")
    assert body["reason"].startswith(f"out of time before GET {backend.url}{ACTIVITY_PATH}")
    assert long_running.calls == ["DescribeInstances"]
    assert backend.calls == []
    assert log_lines()[0]["level"] == "WARNING"


def test_check_idle_without_time_for_the_hibernation_fallback_keeps_and_says_so(
    long_running: Ec2World, env: dict[str, str], clock: FakeClock, backend: ScriptedBackend
) -> None:
    # The read leaves the stop its time by construction; a refused hibernation that was slow to come back
    # (injected: moto hibernates anything) leaves none for the plain stop that should follow.
    def refuse_slowly(params: dict[str, Any], **_: Any) -> Any:
        if params["body"].get("Hibernate") == "true":
            clock.advance(ONE_CALL)
            return ec2_error("UnsupportedHibernationConfiguration", "The instance is not configured for hibernation.")
        return None

    long_running.on_function_calls("before-call.ec2.StopInstances", refuse_slowly)
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5000}))
    context_seconds = bo.ANSWER_MARGIN_SECONDS + ONE_CALL + 1.5  # Describe, a 1.5 s read, one StopInstances
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
