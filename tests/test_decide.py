"""The idle decision is a pure function: tested exhaustively with hypothesis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

import backend_orchestrator as bo

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
STATES = st.sampled_from(["pending", "running", "stopping", "stopped", "shutting-down", "terminated"])
ACTIVITY = st.one_of(
    st.none(),
    st.builds(bo.ActivityUnknown, st.text(min_size=1, max_size=20)),
    st.builds(
        bo.Activity,
        st.one_of(st.none(), st.floats(min_value=0, max_value=1e7)),
        st.one_of(st.none(), st.sampled_from(["busy is true", "active_jobs=1"])),
    ),
)


@given(
    state=STATES,
    uptime=st.floats(min_value=-600, max_value=1e7),
    activity=ACTIVITY,
    timeout=st.integers(min_value=1, max_value=86_400),
)
def test_stop_only_when_running_known_not_busy_and_idle_past_the_timeout(
    state: str, uptime: float, activity: bo.Activity | bo.ActivityUnknown | None, timeout: int
) -> None:
    verdict = bo.decide(state, NOW - timedelta(seconds=uptime), activity, NOW, timeout)
    should_stop = (
        state == "running"
        and isinstance(activity, bo.Activity)
        and activity.busy_reason is None
        and activity.idle_seconds is not None
        and min(activity.idle_seconds, max(uptime, 0)) > timeout
    )
    assert (verdict.decision is bo.Decision.STOP) is should_stop
    assert verdict.decision in (bo.Decision.STOP, bo.Decision.KEEP, bo.Decision.SKIP)
    assert (verdict.decision is bo.Decision.SKIP) is (state != "running")
    assert verdict.reason


@given(idle=st.floats(min_value=0, max_value=1e7), uptime=st.floats(min_value=0, max_value=1e7))
def test_effective_idle_is_capped_by_the_time_since_launch(idle: float, uptime: float) -> None:
    verdict = bo.decide("running", NOW - timedelta(seconds=uptime), bo.Activity(idle), NOW, 900)
    assert verdict.idle_seconds is not None
    assert abs(verdict.idle_seconds - min(idle, uptime)) < 1e-3


def test_reasons_say_why() -> None:
    launched = NOW - timedelta(hours=3)
    assert bo.decide("stopped", launched, None, NOW, 900).reason == "instance is stopped, not running"
    assert "busy" in bo.decide("running", launched, bo.Activity(5000, "busy is true"), NOW, 900).reason
    assert "refused" in bo.decide("running", launched, bo.ActivityUnknown("GET x refused"), NOW, 900).reason
    assert bo.decide("running", launched, bo.Activity(1000), NOW, 900).reason == "idle for 1000s, over the 900s timeout"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=15,
)
FIELDS = st.sampled_from([*bo.IDLE_SECONDS_FIELDS, *bo.LAST_ACTIVITY_FIELDS, *bo.IN_FLIGHT_FIELDS, "busy"])
CONTRACT_LIKE = st.dictionaries(FIELDS, JSON | st.floats(min_value=-1e13, max_value=1e13), max_size=5)


@given(payload=JSON | CONTRACT_LIKE)
def test_any_payload_is_read_without_raising(payload: object) -> None:
    result = bo.parse_activity(payload, NOW)
    assert isinstance(result, bo.Activity | bo.ActivityUnknown)
    if isinstance(result, bo.Activity) and result.idle_seconds is not None:
        assert result.idle_seconds >= 0


@given(payload=CONTRACT_LIKE, busy_field=st.sampled_from(["busy", "active_requests", "active_jobs"]))
def test_a_busy_backend_is_never_stopped(payload: dict[str, object], busy_field: str) -> None:
    payload = {**payload, busy_field: True if busy_field == "busy" else 1}
    verdict = bo.decide("running", NOW - timedelta(days=30), bo.parse_activity(payload, NOW), NOW, 1)
    assert verdict.decision is bo.Decision.KEEP
