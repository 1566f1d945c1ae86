"""Operators in control: holds kept as tags on the instance (moto keeps real tags), a watch on a busy flag that
never clears, and the uptime that nothing explains."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.helpers import (
    ACTIVITY_PATH,
    CHECK,
    Answer,
    Ec2World,
    FakeClock,
    Invoke,
    ScriptedBackend,
    body_of,
    http_event,
)
from tests.test_second_signal import QUIET, put_metrics

HOLD_KEYS = ("backend-orchestrator:hold", "backend-orchestrator:hold-until", "backend-orchestrator:hold-reason")


def tags(ec2: Ec2World) -> dict[str, str]:
    """The instance's tags, read with the test's own client."""
    reservations = ec2.client.describe_instances(InstanceIds=[ec2.instance_id])["Reservations"]
    return {tag["Key"]: tag["Value"] for tag in reservations[0]["Instances"][0].get("Tags", [])}


def tag_by_hand(ec2: Ec2World, state: str, until: datetime | str, reason: str | None = None) -> None:
    """What an operator types: aws ec2 create-tags ... (the test's own client, so the calls are not counted)."""
    values = {HOLD_KEYS[0]: state, HOLD_KEYS[1]: until if isinstance(until, str) else until.isoformat()}
    if reason is not None:
        values[HOLD_KEYS[2]] = reason
    ec2.client.create_tags(Resources=[ec2.instance_id], Tags=[{"Key": k, "Value": v} for k, v in values.items()])


# --- The hold and release actions --------------------------------------------------------------------------------
def test_a_hold_stopped_writes_its_tags_in_one_call_and_stops_the_instance(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock
) -> None:
    clock.wall = clock.wall.replace(microsecond=0)  # the end is rounded up to a whole second
    body = invoke({"action": "hold", "state": "stopped", "hours": 4, "reason": "patching the OS"})
    until = clock.now() + timedelta(hours=4)
    assert body["hold"] == {"state": "stopped", "until": until.isoformat(), "reason": "patching the OS"}
    assert (body["decision"], body["previous_state"]) == ("stop", "running")
    assert ec2.calls == ["DescribeInstances", "CreateTags", "StopInstances"]
    assert tags(ec2) == dict(zip(HOLD_KEYS, ["stopped", until.isoformat(), "patching the OS"], strict=True))
    assert ec2.state() == "stopped"


def test_a_hold_running_until_a_time_starts_a_stopped_instance(invoke: Invoke, ec2: Ec2World, clock: FakeClock) -> None:
    ec2.set_state("stopped")
    until = (clock.now() + timedelta(hours=6)).astimezone(UTC).replace(microsecond=0)
    body = invoke({"action": "hold", "state": "running", "until": until.isoformat().replace("+00:00", "Z")})
    assert (body["decision"], body["hold"]["until"]) == ("start", until.isoformat())
    assert ec2.calls == ["DescribeInstances", "CreateTags", "StartInstances"]
    assert tags(ec2)[HOLD_KEYS[2]] == ""  # no reason: an older one is cleared


def test_release_deletes_the_tags_in_one_call(invoke: Invoke, ec2: Ec2World, clock: FakeClock) -> None:
    tag_by_hand(ec2, "stopped", clock.now() + timedelta(hours=1), "patching")
    body = invoke({"action": "release"})
    assert (body["hold"], body["released"]["reason"]) == (None, "patching")
    assert ec2.calls == ["DescribeInstances", "DeleteTags"]
    assert tags(ec2) == {}


def test_in_dry_run_hold_and_release_write_nothing(invoke: Invoke, ec2: Ec2World) -> None:
    held = invoke({"action": "hold", "state": "stopped", "hours": 1}, DRY_RUN="true")
    assert (held["decision"], held["dry_run"]) == ("would_stop", True)
    assert "nothing written" in held["reason"]
    assert invoke({"action": "release"}, DRY_RUN="true")["released"] is None
    assert ec2.calls == ["DescribeInstances", "DescribeInstances"]
    assert (tags(ec2), ec2.state()) == ({}, "running")


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        pytest.param({"state": "stopped"}, "hours", id="no-end"),
        pytest.param({"state": "stopped", "hours": 1, "until": "2099-01-01T00:00:00Z"}, "hours", id="both-ends"),
        pytest.param({"state": "stopped", "hours": 0}, '"hours"', id="zero-hours"),
        pytest.param({"state": "stopped", "hours": -2}, '"hours"', id="negative-hours"),
        pytest.param({"state": "stopped", "hours": "4"}, '"hours"', id="hours-as-text"),
        pytest.param({"state": "stopped", "hours": 73}, "MAX_HOLD_HOURS=72", id="hours-beyond-the-limit"),
        pytest.param({"state": "stopped", "hours": 1e308}, "MAX_HOLD_HOURS=72", id="hours-huge"),
        pytest.param({"state": "stopped", "until": "2001-01-01T00:00:00Z"}, '"until"', id="until-in-the-past"),
        pytest.param({"state": "stopped", "until": "2099-01-01T00:00:00Z"}, "MAX_HOLD_HOURS", id="until-too-far"),
        pytest.param({"state": "stopped", "until": "2026-12-02T22:00:00"}, "offset", id="until-without-offset"),
        pytest.param({"state": "stopped", "until": "tomorrow"}, "offset", id="until-not-a-time"),
        pytest.param({"state": "paused", "hours": 1}, '"state"', id="unknown-state"),
        pytest.param({"hours": 1}, '"state"', id="no-state"),
        pytest.param({"state": "stopped", "hours": 1, "reason": "x" * 257}, '"reason"', id="reason-too-long"),
        pytest.param({"state": "stopped", "hours": 1, "reason": "line\nbreak"}, '"reason"', id="reason-control"),
        pytest.param({"state": "stopped", "hours": 1, "reason": "\ud800"}, '"reason"', id="reason-surrogate"),
        pytest.param({"state": "stopped", "hours": 1, "reason": 42}, '"reason"', id="reason-not-text"),
    ],
)
def test_a_bad_hold_is_a_400_that_names_the_field_and_writes_nothing(
    invoke: Invoke, ec2: Ec2World, fields: dict[str, Any], names: str
) -> None:
    body = invoke({"action": "hold", **fields})
    assert body["error"]["code"] == "invalid_hold"
    assert names in body["error"]["message"]
    assert ec2.calls == []
    assert (tags(ec2), ec2.state()) == ({}, "running")


def test_a_hold_of_a_moment_still_ends_after_now(invoke: Invoke, ec2: Ec2World, clock: FakeClock) -> None:
    body = invoke({"action": "hold", "state": "stopped", "hours": 1e-300})
    assert datetime.fromisoformat(body["hold"]["until"]) > clock.now()


@pytest.mark.parametrize("action", ["hold", "release"])
def test_hold_and_release_are_refused_over_http(invoke: Invoke, ec2: Ec2World, action: str) -> None:
    response = invoke(http_event(body=f'{{"action": "{action}", "state": "stopped", "hours": 1}}'))
    assert (response["statusCode"], body_of(response)["error"]["code"]) == (403, "action_not_allowed")
    assert ec2.calls == []


# --- What a hold does --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("event", [http_event(), {"action": "start"}], ids=["http", "direct"])
def test_a_wake_of_an_instance_held_stopped_is_409_with_the_hold_and_no_start(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, event: dict[str, Any]
) -> None:
    ec2.set_state("stopped")
    until = clock.now() + timedelta(hours=2)
    tag_by_hand(ec2, "stopped", until, "patching the OS")
    response = invoke(event)
    body = body_of(response)
    assert response.get("statusCode", 409) == 409
    assert body["error"]["code"] == "held_stopped"
    assert body["hold"] == {"state": "stopped", "until": until.isoformat(), "reason": "patching the OS"}
    assert "patching the OS" in body["error"]["message"]
    assert ec2.calls == ["DescribeInstances"]
    assert ec2.state() == "stopped"


def test_no_keep_warm_window_starts_an_instance_held_stopped(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, backend: ScriptedBackend
) -> None:
    ec2.set_state("stopped")
    tag_by_hand(ec2, "stopped", clock.now() + timedelta(hours=2))
    body = invoke(CHECK, KEEP_WARM="Mon-Sun 00:00-24:00")
    assert (body["decision"], body["signal"]) == ("skip", "hold")
    assert ec2.mutations() == []


def test_an_instance_held_stopped_but_started_by_hand_follows_the_usual_rules(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend
) -> None:
    tag_by_hand(long_running, "stopped", clock.now() + timedelta(hours=2))
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5000}))
    body = invoke(CHECK)
    assert (body["decision"], body["signal"]) == ("stop", "activity")


@pytest.mark.parametrize(("state", "decision"), [("running", "keep"), ("stopped", "start")])
def test_held_running_is_kept_without_asking_the_backend_and_started_if_stopped(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any, state: str, decision: str
) -> None:
    ec2.set_state(state)
    tag_by_hand(ec2, "running", clock.now() + timedelta(hours=3), "board demo")
    body = invoke(CHECK)
    assert (body["decision"], body["signal"]) == (decision, "hold")
    assert "board demo" in body["reason"]
    assert backend.calls == []
    assert "UptimeHours" not in log_lines()[1]  # a hold explains the uptime


def test_held_running_in_dry_run_would_start(invoke: Invoke, ec2: Ec2World, clock: FakeClock) -> None:
    ec2.set_state("stopped")
    tag_by_hand(ec2, "running", clock.now() + timedelta(hours=3))
    assert invoke(CHECK, DRY_RUN="true")["decision"] == "would_start"
    assert ec2.mutations() == []


def test_a_hold_that_has_ended_is_cleared_once_and_announced_once(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, topic: tuple[str, Any]
) -> None:
    topic_arn, received = topic
    tag_by_hand(long_running, "running", clock.now() - timedelta(minutes=1), "board demo")
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 60}))
    first = invoke(CHECK, NOTIFY_TOPIC_ARN=topic_arn)
    assert (first["decision"], first["signal"], first["hold_ended"]["reason"]) == ("keep", "activity", "board demo")
    assert long_running.calls == ["DescribeInstances", "DeleteTags", "Publish"]
    assert tags(long_running) == {}
    assert [message["Subject"] for message in received()] == [f"Backend {long_running.instance_id} hold ended"]
    second = invoke(CHECK, NOTIFY_TOPIC_ARN=topic_arn)
    assert "hold_ended" not in second
    assert received() == []


@pytest.mark.parametrize(
    ("state", "until", "says"),
    [
        pytest.param("paused", "+1h", "backend-orchestrator:hold='paused' is not running or stopped", id="state"),
        pytest.param("stopped", "soon", "backend-orchestrator:hold-until='soon' is not an ISO-8601", id="not-a-time"),
        pytest.param("stopped", "2099-01-01T00:00:00", "is not an ISO-8601 time with its offset", id="no-offset"),
        pytest.param("stopped", "+100h", "more than MAX_HOLD_HOURS=72 hours ahead", id="beyond-max"),
    ],
)
def test_malformed_hold_tags_are_ignored_with_a_warning_that_names_the_tag(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, log_lines: Any, state: str, until: str, says: str
) -> None:
    ec2.set_state("stopped")
    hours = {"+1h": 1, "+100h": 100}.get(until)
    tag_by_hand(ec2, state, clock.now() + timedelta(hours=hours) if hours else until)
    response = invoke(http_event())
    assert response["statusCode"] == 202  # as if there were no hold
    log = log_lines()[0]
    assert log["level"] == "WARNING"
    assert says in log["warnings"][0]
    assert "the hold is ignored" in log["warnings"][0]
    status = invoke(http_event(body='{"action": "status"}'))
    assert body_of(status)["hold"] is None


def test_status_answers_the_hold_set_by_hand_over_http(invoke: Invoke, ec2: Ec2World, clock: FakeClock) -> None:
    until = clock.now() + timedelta(hours=2)
    tag_by_hand(ec2, "stopped", until.astimezone(UTC).isoformat().replace("+00:00", "Z"), "patching")
    body = body_of(invoke(http_event(body='{"action": "status"}')))
    assert body["hold"] == {"state": "stopped", "until": until.astimezone(UTC).isoformat(), "reason": "patching"}
    assert body_of(invoke(http_event(body='{"action": "release"}')))["error"]["code"] == "action_not_allowed"


# --- A busy flag that never clears -------------------------------------------------------------------------------
BUSY = Answer.json({"idle_seconds": 5, "active_requests": 1})
WATCH = {"STUCK_BUSY_SECONDS": "900"}  # three 5-minute periods, so that the test data stays small


def test_a_busy_backend_whose_metrics_are_idle_is_flagged_stuck_and_kept(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    backend.answer(ACTIVITY_PATH, BUSY)
    put_metrics(clock, long_running.instance_id, [0.3] * 3, [QUIET] * 3, timeout=900)
    body = invoke(CHECK, **WATCH)
    assert (body["decision"], body["signal"], body["stuck_busy"]) == ("keep", "activity", True)
    assert "the busy flag may be stuck" in body["reason"]
    assert long_running.calls == ["DescribeInstances", "GetMetricData"]
    line, emf = log_lines()
    assert (line["level"], line["stuck_busy"], emf["StuckBusy"]) == ("WARNING", True, 1)
    assert long_running.state() == "running"


def test_a_busy_backend_with_busy_metrics_is_kept_without_the_flag(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    backend.answer(ACTIVITY_PATH, BUSY)
    put_metrics(clock, long_running.instance_id, [0.3, 60.0, 0.3], [QUIET] * 3, timeout=900)
    body = invoke(CHECK, **WATCH)
    assert (body["decision"], "stuck_busy" in body) == ("keep", False)
    assert "StuckBusy" not in log_lines()[1]


def test_stop_stuck_busy_stops_it(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend
) -> None:
    backend.answer(ACTIVITY_PATH, BUSY)
    put_metrics(clock, long_running.instance_id, [0.3] * 3, [QUIET] * 3, timeout=900)
    body = invoke(CHECK, STOP_STUCK_BUSY="true", **WATCH)
    assert (body["decision"], body["signal"]) == ("stop", "stuck_busy")
    assert long_running.calls == ["DescribeInstances", "GetMetricData", "StopInstances"]
    assert long_running.state() == "stopped"


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({"STUCK_BUSY_SECONDS": "10800"}, id="busy-for-less-than-the-watch"),
        pytest.param({"STUCK_BUSY_SECONDS": "0"}, id="watch-off"),
        pytest.param({"STUCK_BUSY_SECONDS": "900", "IDLE_CPU_PERCENT": "0"}, id="fallback-off"),
    ],
)
def test_no_cloudwatch_call_outside_the_watch(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, environ: dict[str, str]
) -> None:
    backend.answer(ACTIVITY_PATH, BUSY)
    put_metrics(clock, long_running.instance_id, [0.3] * 3, [QUIET] * 3, timeout=900)
    assert invoke(CHECK, **environ)["decision"] == "keep"
    assert long_running.calls == ["DescribeInstances"]


# --- Uptime nothing explains -------------------------------------------------------------------------------------
def test_uptime_is_emitted_for_a_running_instance_outside_holds_and_windows(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 30}))
    invoke(CHECK)
    assert log_lines()[1]["UptimeHours"] == pytest.approx(2.0, abs=0.01)
    invoke(CHECK, KEEP_WARM="Mon-Sun 00:00-24:00")
    assert "UptimeHours" not in log_lines()[1]  # a window explains it
    tag_by_hand(long_running, "stopped", clock.now() + timedelta(hours=1))
    invoke(CHECK)
    assert log_lines()[1]["UptimeHours"] == pytest.approx(2.0, abs=0.01)  # held stopped yet running: unexplained
