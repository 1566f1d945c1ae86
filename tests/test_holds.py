"""Operators in control: holds kept as tags on the instance (moto keeps real tags), a watch on a busy flag that
never clears, and the uptime that nothing explains."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import function as bo
from tests.helpers import (
    ACTIVITY_PATH,
    CHECK,
    Answer,
    Ec2World,
    FakeClock,
    Invoke,
    ScriptedBackend,
    body_of,
    ec2_error,
    http_event,
)
from tests.test_second_signal import QUIET, put_metrics

HOLD_KEYS = ("backend-orchestrator:hold", "backend-orchestrator:hold-until", "backend-orchestrator:hold-reason")


def tags(ec2: Ec2World) -> dict[str, str]:
    """The instance's tags, read with the test's own client."""
    reservations = ec2.client.describe_instances(InstanceIds=[ec2.instance_id])["Reservations"]
    return {tag["Key"]: tag["Value"] for tag in reservations[0]["Instances"][0].get("Tags", [])}


BUSY_SINCE_KEY = "backend-orchestrator:busy-since"


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


def test_release_deletes_the_tags_of_a_stopped_hold_in_one_call(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock
) -> None:
    tag_by_hand(ec2, "stopped", clock.now() + timedelta(hours=1), "patching")
    body = invoke({"action": "release"})
    assert (body["hold"], body["released"]["reason"]) == (None, "patching")
    assert ec2.calls == ["DescribeInstances", "DeleteTags"]
    assert tags(ec2) == {}


def test_release_marks_a_running_hold_ended_now_in_one_call(invoke: Invoke, ec2: Ec2World, clock: FakeClock) -> None:
    tag_by_hand(ec2, "running", clock.now() + timedelta(hours=1), "board demo")
    body = invoke({"action": "release"})
    assert (body["hold"], body["released"]["reason"]) == (None, "board demo")
    assert ec2.calls == ["DescribeInstances", "CreateTags"]
    # The record of its end, from which the uptime alarm counts: no hold any more.
    assert tags(ec2) == {HOLD_KEYS[0]: "ended", HOLD_KEYS[1]: clock.now().isoformat(), HOLD_KEYS[2]: "board demo"}
    again = invoke({"action": "release"})
    assert (again["released"], ec2.calls[2:]) == (None, ["DescribeInstances"])  # nothing to release, nothing written
    assert invoke({"action": "status"})["hold"] is None


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
@pytest.mark.parametrize("state", ["Stopped", " stopped ", "STOPPED\t"])
def test_a_hold_state_typed_in_another_case_or_with_spaces_still_holds(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, state: str
) -> None:
    ec2.set_state("stopped")
    tag_by_hand(ec2, state, clock.now() + timedelta(hours=2))
    response = invoke(http_event())
    assert (response["statusCode"], body_of(response)["error"]["code"]) == (409, "held_stopped")
    assert body_of(response)["hold"]["state"] == "stopped"
    assert ec2.mutations() == []


def test_a_tag_with_the_prefix_that_the_function_does_not_read_is_named(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, log_lines: Any
) -> None:
    ec2.client.create_tags(  # a typo, by hand
        Resources=[ec2.instance_id], Tags=[{"Key": "backend-orchestrator:hold-untill", "Value": "2026-12-02T14:00Z"}]
    )
    invoke({"action": "status"})
    [warning] = log_lines()[0]["warnings"]
    assert warning.startswith("Tag backend-orchestrator:hold-untill is not one the function reads")
    assert "a typo?" in warning


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
    assert long_running.calls == ["DescribeInstances", "CreateTags", "Publish"]
    assert tags(long_running)[HOLD_KEYS[0]] == "ended"  # marked, not deleted: the record of when it ended
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


# --- A busy flag that never clears ---------------------------------------------------------------------------------
WATCH = {"STUCK_BUSY_SECONDS": "900"}  # three 5-minute periods, so that the test data stays small


def busy(since: datetime | None = None) -> Answer:
    """A backend busy with one request: since `since`, if it says so."""
    said = {"busy_since": since.isoformat()} if since else {}
    return Answer.json({"idle_seconds": 5, "active_requests": 1, **said})


def test_a_busy_backend_whose_metrics_are_idle_is_flagged_stuck_and_kept(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    backend.answer(ACTIVITY_PATH, busy(since=clock.now() - timedelta(minutes=40)))
    put_metrics(clock, long_running.instance_id, [0.3] * 3, [QUIET] * 3, timeout=900)
    body = invoke(CHECK, **WATCH)
    assert (body["decision"], body["signal"], body["stuck_busy"]) == ("keep", "activity", True)
    assert "the busy flag may be stuck" in body["reason"]
    assert body["busy_since"] == (clock.now() - timedelta(minutes=40)).isoformat()
    assert long_running.calls == ["DescribeInstances", "GetMetricData"]  # it said since when: nothing to write
    line, emf = log_lines()
    assert (line["level"], line["stuck_busy"], emf["StuckBusy"]) == ("WARNING", True, 1)
    assert long_running.state() == "running"


def test_a_busy_backend_with_busy_metrics_is_kept_without_the_flag(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    backend.answer(ACTIVITY_PATH, busy(since=clock.now() - timedelta(minutes=40)))
    put_metrics(clock, long_running.instance_id, [0.3, 60.0, 0.3], [QUIET] * 3, timeout=900)
    body = invoke(CHECK, **WATCH)
    assert (body["decision"], "stuck_busy" in body) == ("keep", False)
    assert "StuckBusy" not in log_lines()[1]


def test_stop_stuck_busy_stops_it(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend
) -> None:
    backend.answer(ACTIVITY_PATH, busy(since=clock.now() - timedelta(minutes=40)))
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
    backend.answer(ACTIVITY_PATH, busy(since=clock.now() - timedelta(minutes=100)))
    put_metrics(clock, long_running.instance_id, [0.3] * 3, [QUIET] * 3, timeout=900)
    assert invoke(CHECK, **environ)["decision"] == "keep"
    assert long_running.calls == ["DescribeInstances"]


@pytest.mark.parametrize("says_since", [True, False], ids=["it-says-30-s-ago", "it-does-not-say"])
def test_a_job_begun_30_s_ago_on_an_instance_up_three_hours_is_neither_stopped_nor_flagged(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any, says_since: bool
) -> None:
    # The red team's grid search: light use for three hours, idle metrics all along, then a job at 90 % CPU that began
    # 30 s ago (its first periods are not published yet). STOP_STUCK_BUSY is on; the default watch is 2 hours.
    ec2.set_launch_time(clock.now() - timedelta(hours=3))
    put_metrics(clock, ec2.instance_id, [0.3] * 24, [QUIET] * 24, timeout=7200)
    backend.answer(ACTIVITY_PATH, busy(since=clock.now() - timedelta(seconds=30) if says_since else None))
    body = invoke(CHECK, STOP_STUCK_BUSY="true")
    assert (body["decision"], body["signal"], "stuck_busy" in body) == ("keep", "activity", False)
    assert ec2.state() == "running"
    assert "StuckBusy" not in log_lines()[1]
    assert ec2.calls == ["DescribeInstances"] + ([] if says_since else ["CreateTags"])  # not even CloudWatch
    assert (BUSY_SINCE_KEY in tags(ec2)) is not says_since


def test_the_functions_own_record_of_a_busy_span_measures_it_and_flags_it_once_long(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    backend.answer(ACTIVITY_PATH, busy())  # a backend that does not say since when
    first = invoke(CHECK, **WATCH)
    assert (first["busy_since"], "stuck_busy" in first) == (clock.now().isoformat(), False)
    assert long_running.calls == ["DescribeInstances", "CreateTags"]  # written once
    assert tags(long_running)[BUSY_SINCE_KEY] == clock.now().isoformat()
    began = clock.now()
    clock.advance(40 * 60)  # busy without a break for 40 minutes, the metrics of all of it idle
    put_metrics(clock, long_running.instance_id, [0.3] * 3, [QUIET] * 3, timeout=900)
    second = invoke(CHECK, **WATCH)
    assert (second["busy_since"], second["stuck_busy"]) == (began.isoformat(), True)
    assert long_running.calls[2:] == ["DescribeInstances", "GetMetricData"]  # the same state: no write
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5}))  # the work is done
    third = invoke(CHECK, **WATCH)
    assert (third["decision"], "busy_since" in third) == ("keep", False)
    assert long_running.calls[4:] == ["DescribeInstances", "DeleteTags"]  # the record ends
    assert BUSY_SINCE_KEY not in tags(long_running)
    invoke(CHECK, **WATCH)
    assert long_running.calls[6:] == ["DescribeInstances"]  # nothing to delete any more


def test_a_record_from_an_earlier_run_starts_afresh(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend
) -> None:
    earlier = clock.now() - timedelta(hours=5)  # before this run's launch, two hours ago
    long_running.client.create_tags(
        Resources=[long_running.instance_id], Tags=[{"Key": BUSY_SINCE_KEY, "Value": earlier.isoformat()}]
    )
    put_metrics(clock, long_running.instance_id, [0.3] * 3, [QUIET] * 3, timeout=900)
    backend.answer(ACTIVITY_PATH, busy())
    body = invoke(CHECK, STOP_STUCK_BUSY="true", **WATCH)
    assert (body["decision"], body["busy_since"]) == ("keep", clock.now().isoformat())
    assert long_running.calls == ["DescribeInstances", "CreateTags"]
    assert tags(long_running)[BUSY_SINCE_KEY] == clock.now().isoformat()


def test_the_watch_judges_only_the_periods_of_the_busy_span(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    # Busy for 20 minutes, past a 15-minute watch; but the window's periods began up to half an hour ago, before the
    # busy span: they hold what the backend did before the work began, so they count as missing, and it is kept.
    backend.answer(ACTIVITY_PATH, busy(since=clock.now() - timedelta(minutes=20)))
    put_metrics(clock, long_running.instance_id, [0.3] * 3, [QUIET] * 3, timeout=900)
    body = invoke(CHECK, STOP_STUCK_BUSY="true", **WATCH)
    assert (body["decision"], "stuck_busy" in body) == ("keep", False)
    assert long_running.calls == ["DescribeInstances", "GetMetricData"]
    assert long_running.state() == "running"


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


def test_uptime_counts_from_the_end_of_a_running_hold(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    # A 24-hour hold ended an hour ago: the alarm (at 12 hours) must not fire the minute it ends.
    ec2.set_launch_time(clock.now() - timedelta(hours=26))
    tag_by_hand(ec2, "running", clock.now() - timedelta(hours=1), "the board's demo day")
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 30}))
    invoke(CHECK)  # marks the hold ended: its record
    assert log_lines()[1]["UptimeHours"] == pytest.approx(1.0, abs=0.01)
    clock.advance(2 * 3600)
    invoke(CHECK)  # from the record, now that the hold is over
    assert log_lines()[1]["UptimeHours"] == pytest.approx(3.0, abs=0.01)
    assert ec2.calls == ["DescribeInstances", "CreateTags", "DescribeInstances"]


def test_uptime_counts_from_a_release(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    ec2.set_launch_time(clock.now() - timedelta(hours=20))
    tag_by_hand(ec2, "running", clock.now() + timedelta(hours=10))
    clock.advance(1800)
    invoke({"action": "release"})
    clock.advance(1800)
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 30}))
    log_lines()
    invoke(CHECK)
    assert log_lines()[1]["UptimeHours"] == pytest.approx(0.5, abs=0.01)


def test_uptime_counts_from_the_end_of_a_keep_warm_window(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    closed = clock.now().astimezone(UTC) - timedelta(minutes=30)
    window = f"Mon-Sun {closed - timedelta(hours=8):%H:%M}-{closed:%H:%M} UTC"  # it closed half an hour ago
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 30}))
    body = invoke(CHECK, KEEP_WARM=window)
    assert body["signal"] == "activity"  # outside the window now
    seconds_since = (clock.now() - closed.replace(second=0, microsecond=0)).total_seconds()
    assert log_lines()[1]["UptimeHours"] == pytest.approx(seconds_since / 3600, abs=0.01)


def test_a_hold_or_window_that_ended_before_this_run_explains_nothing(
    invoke: Invoke, long_running: Ec2World, clock: FakeClock, backend: ScriptedBackend, log_lines: Any
) -> None:
    long_running.client.create_tags(  # the record of a hold that ended three hours ago, before this run's launch
        Resources=[long_running.instance_id],
        Tags=[
            {"Key": HOLD_KEYS[0], "Value": "ended"},
            {"Key": HOLD_KEYS[1], "Value": (clock.now() - timedelta(hours=3)).isoformat()},
        ],
    )
    closed = clock.now().astimezone(UTC) - timedelta(hours=2, minutes=30)
    window = f"Mon-Sun {closed - timedelta(hours=1):%H:%M}-{closed:%H:%M} UTC"
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 30}))
    invoke(CHECK, KEEP_WARM=window)
    assert log_lines()[1]["UptimeHours"] == pytest.approx(2.0, abs=0.01)  # from the launch, two hours ago
    assert long_running.calls == ["DescribeInstances"]


# --- Smaller mends: an operator's stop under a running hold, SNS subjects ------------------------------------------
def test_an_operators_stop_under_a_running_hold_warns_that_the_hold_starts_it_again(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, log_lines: Any
) -> None:
    tag_by_hand(ec2, "running", clock.now() + timedelta(hours=3), "demo")
    body = invoke({"action": "stop"})
    assert (body["decision"], ec2.state()) == ("stop", "stopped")  # the operator's stop is done, as asked
    assert ec2.calls == ["DescribeInstances", "StopInstances"]
    [warning] = log_lines()[0]["warnings"]
    assert "held running until" in warning
    assert "the next check_idle starts it again" in warning
    assert '{"action": "release"}' in warning


def test_a_stop_whose_describe_is_refused_still_stops(invoke: Invoke, ec2: Ec2World, log_lines: Any) -> None:
    # moto enforces no IAM: inject the refusal of a role without ec2:DescribeInstances.
    ec2.on_function_calls(
        "before-call.ec2.DescribeInstances", lambda **_: ec2_error("UnauthorizedOperation", "not authorized")
    )
    body = invoke({"action": "stop"})
    assert (body["decision"], ec2.state()) == ("stop", "stopped")
    assert "no hold was looked for" in log_lines()[0]["warnings"][0]


@pytest.mark.parametrize(
    "reason",
    [
        pytest.param("Wartung der Festplatten und des Kernels: Müllers Team übernimmt " * 3, id="long-with-accents"),
        pytest.param("检修 " * 40, id="no-latin-letters"),
        pytest.param("a" * 250, id="one-long-word"),
    ],
)
def test_a_notice_subject_is_ascii_under_100_characters_cut_at_a_word_with_the_whole_text_in_the_message(
    invoke: Invoke, ec2: Ec2World, topic: tuple[str, Any], reason: str
) -> None:
    topic_arn, received = topic
    invoke(
        {"action": "hold", "state": "running", "hours": 1, "reason": reason.strip()[:256]}, NOTIFY_TOPIC_ARN=topic_arn
    )
    [message] = received()
    subject = message["Subject"]
    assert len(subject) < 100
    assert all(" " <= character <= "~" for character in subject)
    assert subject.startswith(f"Backend {ec2.instance_id} held running until ")
    first_line = unicodedata.normalize("NFKD", message["Message"].splitlines()[0]).encode("ascii", "ignore").decode()
    text = " ".join(first_line.removeprefix("Instance ").split())  # "i-... held running until ... by hold."
    shown = subject.removeprefix("Backend ").removesuffix("...")
    assert text.startswith(shown)
    if subject.endswith("...") and " " in shown.removeprefix(f"{ec2.instance_id} held"):
        assert text[len(shown)] == " "  # cut at a word
    assert reason.strip()[:256] in message["Message"]  # the whole text, in the message


@given(text=st.text(max_size=400))
@settings(max_examples=300)
def test_any_text_makes_a_subject_sns_accepts(text: str) -> None:
    subject = bo.sns_subject(f"Backend i-0abc123def4567890 {text}")
    assert len(subject) < 100
    assert all(" " <= character <= "~" for character in subject)
