"""The idle decision is a pure function: tested exhaustively with hypothesis."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
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
VALUES = JSON | st.floats(min_value=-1e13, max_value=1e13) | st.integers(min_value=-(10**400), max_value=10**400)
# Key-value pairs written out as JSON text by hand, so that a key may repeat, as it may on the wire.
PAIRS = st.lists(st.tuples(FIELDS | st.text(max_size=10), VALUES), max_size=6)


def object_text(pairs: list[tuple[str, object]]) -> str:
    return "{" + ", ".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in pairs) + "}"


BODIES = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    JSON.map(json.dumps),
    PAIRS.map(object_text),
    st.integers(min_value=1, max_value=50_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(min_value=1, max_value=20_000).map(lambda depth: '{"busy": ' * depth + "1" + "}" * depth),
    st.integers(min_value=300, max_value=5_000).map(lambda digits: '{"idle_seconds": 1' + "0" * digits + "}"),
)


@settings(max_examples=500)
@given(body=BODIES)
def test_any_body_is_read_without_raising(body: str | bytes) -> None:
    result = bo.parse_activity(body, NOW)
    assert isinstance(result, bo.Activity | bo.ActivityUnknown)
    if isinstance(result, bo.Activity) and result.idle_seconds is not None:
        assert result.idle_seconds >= 0


@settings(max_examples=500)
@given(
    pairs=PAIRS,
    busy=st.sampled_from([("busy", True), ("active_requests", 1), ("active_jobs", 2.5)]),
    position=st.integers(min_value=0, max_value=6),
)
def test_a_payload_that_says_busy_is_never_a_stop(
    pairs: list[tuple[str, object]], busy: tuple[str, object], position: int
) -> None:
    pairs.insert(position, busy)
    verdict = bo.decide("running", NOW - timedelta(days=30), bo.parse_activity(object_text(pairs), NOW), NOW, 1)
    assert verdict.decision is bo.Decision.KEEP


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param('{"busy": true, "busy": false, "idle_seconds": 5000}', None, id="repeated-key-is-unknown"),
        pytest.param('{"idle_seconds": 5000, "idle_seconds": 1}', None, id="repeated-idle-is-unknown"),
        pytest.param('{"idle_seconds": 50, "busy": null, "active_jobs": null}', bo.Activity(50.0), id="nulls-absent"),
        pytest.param(
            f'{{"idle_seconds": null, "last_activity": {NOW.timestamp() - 7200:.0f}}}',
            bo.Activity(7200.0),
            id="null-idle",
        ),
        pytest.param('{"idle_seconds": 1' + "0" * 400 + "}", None, id="integer-too-large-for-a-float"),
        pytest.param('{"idle_seconds": 5, "active_jobs": 1' + "0" * 400 + "}", None, id="huge-count-is-unknown"),
        pytest.param('{"idle_seconds": 1e999}', None, id="infinity"),
        pytest.param('{"idle_seconds": 5, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", None, id="nested-too-deep"),
        pytest.param(b'{"idle_seconds": 5, "x": "\xff"}', None, id="not-utf8"),
    ],
)
def test_ambiguous_or_unreadable_bodies_are_unknown_and_nulls_are_absent(
    body: str | bytes, expected: bo.Activity | None
) -> None:
    result = bo.parse_activity(body, NOW)
    if expected is None:
        assert isinstance(result, bo.ActivityUnknown), result
        assert result.reason
    else:
        assert result == expected
