"""check_idle's rules as a table: judge() in the README's order, with the backend's answer and the metrics given
as inputs, and the readings it made counted (a rule that does not need one must not make it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from tests import function as bo

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)  # a Wednesday
OPEN = "Wed 11:00-13:00 UTC"  # a keep-warm window open at NOW
CLOSED = "Thu 11:00-13:00 UTC"
HELD_RUNNING = bo.Hold("running", NOW + timedelta(hours=1), "demo")
HELD_STOPPED = bo.Hold("stopped", NOW + timedelta(hours=1), "patching")
IDLE, RECENT, BUSY = bo.Activity(5000.0), bo.Activity(100.0), bo.Activity(30.0, "active_jobs=1")
BUSY_LONG = bo.Activity(30.0, "active_jobs=1", busy_since=NOW - timedelta(hours=2, minutes=30))  # it says since when
BUSY_LATELY = bo.Activity(30.0, "active_jobs=1", busy_since=NOW - timedelta(seconds=30))
RECORDED = {bo.BUSY_SINCE_TAG: (NOW - timedelta(hours=2, minutes=30)).isoformat()}  # the function's own record
DOWN = bo.ActivityUnknown("GET /api/last-activity failed: ConnectionRefusedError")
DENIED = bo.AwsError("CloudWatch GetMetricData was denied", aws_error_code="AccessDenied")


@dataclass(frozen=True)
class Row:
    state: str = "running"
    hold: bo.Hold | None = None
    keep_warm: str = ""
    activity: bo.Activity | bo.ActivityUnknown = IDLE
    up: timedelta = timedelta(hours=3)
    vcpus: int | None = 2
    metrics: tuple[bool, str] | Exception = (True, "all idle")
    env: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


# (row, decision, signal, stuck_busy, the readings made): README order, the first rule that applies decides.
TABLE = {
    "held running: kept whatever the backend says": (Row(hold=HELD_RUNNING), "keep", "hold", False, []),
    "held running and stopped: started": (Row("stopped", HELD_RUNNING), "start", "hold", False, []),
    "held running and stopping: nothing yet": (Row("stopping", HELD_RUNNING), "skip", "hold", False, []),
    "a window does not start what is held stopped": (
        Row("stopped", HELD_STOPPED, OPEN), "skip", "hold", False, []),
    "in a window: kept, the backend not asked": (Row(keep_warm=OPEN), "keep", "keep_warm", False, []),
    "in a window and stopped: started": (Row("stopped", keep_warm=OPEN), "start", "keep_warm", False, []),
    "in a window and stopping: nothing yet": (Row("stopping", keep_warm=OPEN), "skip", "keep_warm", False, []),
    "not running: nothing to do": (Row("stopped", keep_warm=CLOSED), "skip", "state", False, []),
    "idle past the timeout: stopped": (Row(keep_warm=CLOSED), "stop", "activity", False, ["backend"]),
    "held stopped yet running: the usual rules": (Row(hold=HELD_STOPPED), "stop", "activity", False, ["backend"]),
    "idle within the timeout: kept": (Row(activity=RECENT), "keep", "activity", False, ["backend"]),
    "just started: a full timeout from the launch": (
        Row(up=timedelta(minutes=10)), "keep", "activity", False, ["backend"]),
    "busy: kept": (Row(activity=BUSY, up=timedelta(minutes=30)), "keep", "activity", False, ["backend"]),
    "unknown, within the timeout of the launch: kept": (
        Row(activity=DOWN, up=timedelta(minutes=10)), "keep", "activity", False, ["backend"]),
    "unknown, no vCPU count: kept": (Row(activity=DOWN, vcpus=None), "keep", "cloudwatch", False, ["backend"]),
    "unknown, metrics idle: stopped": (
        Row(activity=DOWN), "stop", "cloudwatch", False, ["backend", "metrics 900 from launch"]),
    "unknown, metrics busy: kept": (
        Row(activity=DOWN, metrics=(False, "cpu 40%")), "keep", "cloudwatch", False,
        ["backend", "metrics 900 from launch"]),
    "unknown, CloudWatch refused: kept": (
        Row(activity=DOWN, metrics=DENIED), "keep", "cloudwatch", False, ["backend", "metrics 900 from launch"]),
    "unknown, fallback off: kept": (
        Row(activity=DOWN, env={"IDLE_CPU_PERCENT": "0"}), "keep", "activity", False, ["backend"]),
    "busy for long, metrics idle: kept, flagged": (
        Row(activity=BUSY_LONG), "keep", "activity", True, ["backend", "metrics 7200 from 09:30"]),
    "busy for long, metrics idle, STOP_STUCK_BUSY: stopped": (
        Row(activity=BUSY_LONG, env={"STOP_STUCK_BUSY": "true"}), "stop", "stuck_busy", True,
        ["backend", "metrics 7200 from 09:30"]),
    "busy for long, metrics busy: kept": (
        Row(activity=BUSY_LONG, metrics=(False, "cpu 40%")), "keep", "activity", False,
        ["backend", "metrics 7200 from 09:30"]),
    "busy for long, watch off: kept, metrics not read": (
        Row(activity=BUSY_LONG, env={"STUCK_BUSY_SECONDS": "0"}), "keep", "activity", False, ["backend"]),
    "busy for 30 s on an instance up 3 h, STOP_STUCK_BUSY: kept, not watched": (
        Row(activity=BUSY_LATELY, env={"STOP_STUCK_BUSY": "true"}), "keep", "activity", False, ["backend"]),
    "busy, no word of since when, first seen now: kept, not watched": (
        Row(activity=BUSY, env={"STOP_STUCK_BUSY": "true"}), "keep", "activity", False, ["backend"]),
    "busy, the function's record of this run says long: flagged": (
        Row(activity=BUSY, tags=RECORDED), "keep", "activity", True, ["backend", "metrics 7200 from 09:30"]),
    "busy, a record of an earlier run: afresh, not watched": (
        Row(activity=BUSY, tags=RECORDED, up=timedelta(hours=2)), "keep", "activity", False, ["backend"]),
    "busy since before the launch: from the launch, not watched": (
        Row(activity=BUSY_LONG, up=timedelta(hours=1)), "keep", "activity", False, ["backend"]),
}  # fmt: skip


@pytest.mark.parametrize(("row", "decision", "signal", "stuck", "reads"), TABLE.values(), ids=TABLE.keys())
def test_judge_follows_the_rules_in_order(row: Row, decision: str, signal: str, stuck: bool, reads: list[str]) -> None:
    environ = {"INSTANCE_ID": "i-0abc123def4567890", "KEEP_WARM": row.keep_warm, **row.env}
    info = bo.InstanceInfo(row.state, NOW - row.up, row.vcpus, row.tags)
    made: list[str] = []

    def backend() -> bo.Activity | bo.ActivityUnknown:
        made.append("backend")
        return row.activity

    def metrics_idle(seconds: int, not_before: datetime) -> tuple[bool, str]:
        made.append(f"metrics {seconds} from {'launch' if not_before == info.launch_time else f'{not_before:%H:%M}'}")
        if isinstance(row.metrics, Exception):
            raise row.metrics
        return row.metrics

    judged = bo.judge(bo.Config.from_env(environ), info, row.hold, NOW, backend=backend, metrics=metrics_idle)
    assert (judged.verdict.decision.value, judged.verdict.signal, judged.stuck_busy) == (decision, signal, stuck)
    assert made == reads
    assert judged.activity == (row.activity if "backend" in reads else None)


# (activity, tags, launched, the record judge() asks to write: a value to set, None to delete)
WRITTEN_NOW = {bo.BUSY_SINCE_TAG: NOW.isoformat()}
RECORDS = {
    "busy, first seen: written now": (BUSY, {}, timedelta(hours=3), WRITTEN_NOW),
    "busy, recorded this run: nothing written": (BUSY, RECORDED, timedelta(hours=3), {}),
    "busy, recorded in an earlier run: written anew": (BUSY, RECORDED, timedelta(hours=2), WRITTEN_NOW),
    "busy, and it says since when: nothing written": (BUSY_LONG, {}, timedelta(hours=3), {}),
    "not busy, recorded: deleted": (IDLE, RECORDED, timedelta(hours=3), {bo.BUSY_SINCE_TAG: None}),
    "not busy, nothing recorded: nothing": (IDLE, {}, timedelta(hours=3), {}),
    "unknown: the record stays as it is": (DOWN, RECORDED, timedelta(hours=3), {}),
}  # fmt: skip


@pytest.mark.parametrize(("activity", "tags", "up", "record"), RECORDS.values(), ids=RECORDS.keys())
def test_the_busy_span_is_recorded_once_and_forgotten_when_the_backend_is_not_busy(
    activity: bo.Activity | bo.ActivityUnknown, tags: dict[str, str], up: timedelta, record: dict[str, str | None]
) -> None:
    config = bo.Config.from_env({"INSTANCE_ID": "i-0abc123def4567890", "IDLE_CPU_PERCENT": "0"})
    info = bo.InstanceInfo("running", NOW - up, 2, tags)
    judged = bo.judge(config, info, None, NOW, backend=lambda: activity, metrics=lambda *_: (False, "unused"))
    assert judged.record == record
