"""The idle decision is a pure function: tested exhaustively with hypothesis."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import function as bo
from tests.helpers import JSON

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
ACTIVITY = st.one_of(
    st.builds(bo.ActivityUnknown, st.text(min_size=1, max_size=20)),
    st.builds(
        bo.Activity,
        st.one_of(st.none(), st.integers(min_value=0, max_value=10**7).map(float)),
        st.one_of(st.none(), st.sampled_from(["busy is true", "active_jobs=1"])),
    ),
)


@dataclass(frozen=True)
class Case:
    """One check of a running instance, in the README's terms."""

    activity: bo.Activity | bo.ActivityUnknown
    launched: datetime
    timeout: int

    def effective_idle(self) -> float:
        """The README's formula: now - max(last activity, LaunchTime), read on the calendar."""
        assert isinstance(self.activity, bo.Activity)
        assert self.activity.idle_seconds is not None
        last_activity = NOW - timedelta(seconds=self.activity.idle_seconds)
        return (NOW - max(last_activity, self.launched)).total_seconds()


# The README's rules as a table, in its order: the first rule that applies decides. An oracle written
# apart from decide(), so that a mistake in one does not hide in the other.
RULES: list[tuple[str, Callable[[Case], bool], bo.Decision]] = [
    ("activity unknown", lambda c: isinstance(c.activity, bo.ActivityUnknown), bo.Decision.KEEP),
    ("busy", lambda c: c.activity.busy_reason is not None, bo.Decision.KEEP),  # type: ignore[union-attr]
    ("no idle time", lambda c: c.activity.idle_seconds is None, bo.Decision.KEEP),  # type: ignore[union-attr]
    ("idle past the timeout", lambda c: c.effective_idle() > c.timeout, bo.Decision.STOP),
    ("idle within the timeout", lambda c: True, bo.Decision.KEEP),
]


def oracle(case: Case) -> tuple[str, bo.Decision]:
    return next((name, decision) for name, applies, decision in RULES if applies(case))


@given(
    activity=ACTIVITY,
    uptime=st.integers(min_value=-600, max_value=10**7),
    timeout=st.integers(min_value=1, max_value=86_400),
)
def test_decide_follows_the_rules_table(activity: bo.Activity | bo.ActivityUnknown, uptime: int, timeout: int) -> None:
    case = Case(activity, NOW - timedelta(seconds=uptime), timeout)
    rule, expected = oracle(case)
    verdict = bo.decide(case.launched, activity, NOW, timeout)
    assert verdict.decision is expected, rule
    assert verdict.reason


def test_every_rule_of_the_table_is_reached() -> None:
    launched = NOW - timedelta(hours=3)
    cases = [
        Case(bo.ActivityUnknown("refused"), launched, 900),
        Case(bo.Activity(5000, "busy is true"), launched, 900),
        Case(bo.Activity(None, "active_jobs=1"), launched, 900),
        Case(bo.Activity(None), launched, 900),
        Case(bo.Activity(1000), launched, 900),
        Case(bo.Activity(100), launched, 900),
    ]
    assert {oracle(case)[0] for case in cases} == {name for name, _, _ in RULES}


@given(idle=st.floats(min_value=0, max_value=1e7), uptime=st.floats(min_value=0, max_value=1e7))
def test_effective_idle_is_capped_by_the_time_since_launch(idle: float, uptime: float) -> None:
    verdict = bo.decide(NOW - timedelta(seconds=uptime), bo.Activity(idle), NOW, 900)
    assert verdict.idle_seconds is not None
    assert abs(verdict.idle_seconds - min(idle, uptime)) < 1e-3


def test_reasons_say_why() -> None:
    launched = NOW - timedelta(hours=3)
    assert "busy" in bo.decide(launched, bo.Activity(5000, "busy is true"), NOW, 900).reason
    assert "refused" in bo.decide(launched, bo.ActivityUnknown("GET x refused"), NOW, 900).reason
    assert bo.decide(launched, bo.Activity(1000), NOW, 900).reason == "idle for 1000s, over the 900s timeout"


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


@settings(max_examples=200)
@given(body=BODIES)
def test_any_body_is_read_without_raising(body: str | bytes) -> None:
    result = bo.parse_activity(body, NOW)
    assert isinstance(result, bo.Activity | bo.ActivityUnknown)
    if isinstance(result, bo.Activity) and result.idle_seconds is not None:
        assert result.idle_seconds >= 0


@settings(max_examples=200)
@given(
    pairs=PAIRS,
    busy=st.sampled_from([("busy", True), ("active_requests", 1), ("active_jobs", 2.5)]),
    position=st.integers(min_value=0, max_value=6),
)
def test_a_payload_that_says_busy_is_never_a_stop(
    pairs: list[tuple[str, object]], busy: tuple[str, object], position: int
) -> None:
    pairs.insert(position, busy)
    verdict = bo.decide(NOW - timedelta(days=30), bo.parse_activity(object_text(pairs), NOW), NOW, 1)
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
