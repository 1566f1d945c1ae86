"""The activity contract (docs/activity-contract.md), read from the backend's answer: how long it has been idle,
whether it is busy, and since when. Reading it never raises: what it cannot read makes the activity unknown, so that
the backend is kept."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

from orchestrator.values import aware_time, json_type, number, short, strict_json

# Accepted field names, preferred first.
IDLE_SECONDS_FIELDS: Final = ("idle_seconds", "idleSeconds", "seconds_since_last_activity")
LAST_ACTIVITY_FIELDS: Final = ("last_activity", "last_activity_at", "lastActivity", "last_request_at")
IN_FLIGHT_FIELDS: Final = ("active_requests", "active_jobs")
BUSY_SINCE_FIELD: Final = "busy_since"  # optional: when the oldest request or job still in flight began
EPOCH_MILLISECONDS_ABOVE: Final = 1e11  # 1e11 s is the year 5138; 1e11 ms is 1973


class Activity(NamedTuple):
    """What the backend reported: seconds idle (None if only busy was reported), busy, and since when (optional)."""

    idle_seconds: float | None
    busy_reason: str | None = None
    busy_since: datetime | None = None  # when the oldest request or job still in flight began, if it says
    problem: str | None = None  # a field it sent that is ignored, and why


class ActivityUnknown(NamedTuple):
    """The backend could not tell us how idle it is; the reason names the failure."""

    reason: str


def parse_activity(body: str | bytes, now: datetime) -> Activity | ActivityUnknown:
    """Read the activity contract (README) from the backend's answer; never raises.

    A null field counts as absent; a repeated key, nesting too deep or a number too large for a float
    make the activity unknown (so the backend is kept), never an error."""
    try:
        payload = strict_json(body)
    except ValueError as error:  # UnicodeDecodeError and the integer digit limit are ValueErrors too
        return ActivityUnknown(f"the answer is not JSON the contract can read ({error}): {short(body[:60])}")
    if not isinstance(payload, dict):
        return ActivityUnknown(f"activity is a JSON {json_type(payload)}, not an object")
    payload = {name: value for name, value in payload.items() if value is not None}
    busy = payload.get("busy", False)
    if not isinstance(busy, bool):
        return ActivityUnknown(f"'busy' is {short(busy)}, not true or false")
    busy_reason = "busy is true" if busy else None
    for name in IN_FLIGHT_FIELDS:
        count = number(payload.get(name, 0))
        if count is None or count < 0:
            return ActivityUnknown(f"{name!r} is {short(payload[name])}, not a number >= 0")
        if count > 0 and busy_reason is None:
            busy_reason = f"{name}={payload[name]}"
    idle_seconds = _idle_seconds(payload, now)
    if isinstance(idle_seconds, ActivityUnknown):
        return idle_seconds
    if idle_seconds is None and busy_reason is None:
        return ActivityUnknown(
            f"no idle time in the activity payload: send one of {', '.join(IDLE_SECONDS_FIELDS + LAST_ACTIVITY_FIELDS)}"
        )
    if BUSY_SINCE_FIELD not in payload or busy_reason is None:
        return Activity(idle_seconds, busy_reason)
    # Optional, and only a guide to the stuck-busy watch: a value it cannot read is ignored, never a reason to
    # doubt that the backend is busy (an unknown activity could be stopped on its metrics).
    since = aware_time(payload[BUSY_SINCE_FIELD]) if isinstance(payload[BUSY_SINCE_FIELD], str) else None
    if since is None:
        problem = f"{BUSY_SINCE_FIELD!r} is {short(payload[BUSY_SINCE_FIELD])}, not an ISO-8601 time with its offset"
        return Activity(idle_seconds, busy_reason, problem=f"The backend's {problem}: it is ignored.")
    return Activity(idle_seconds, busy_reason, min(since, now))  # a time in the future (skew): busy from now


def _idle_seconds(payload: Mapping[str, Any], now: datetime) -> float | ActivityUnknown | None:
    for name in IDLE_SECONDS_FIELDS:
        if name in payload:
            seconds = number(payload[name])
            if seconds is None or seconds < 0:
                return ActivityUnknown(f"{name!r} is {short(payload[name])}, not a number of seconds >= 0")
            return seconds
    for name in LAST_ACTIVITY_FIELDS:
        if name in payload:
            last_activity = _timestamp(payload[name])
            if last_activity is None:
                return ActivityUnknown(f"{name!r} is {short(payload[name])}, not an ISO-8601 time or epoch seconds")
            return max(0.0, (now - last_activity).total_seconds())  # a future time (skew) is idle 0
    return None


def _timestamp(value: object) -> datetime | None:
    given = number(value)
    if given is not None and given >= 0:
        seconds = given / 1000 if given > EPOCH_MILLISECONDS_ABOVE else given
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())  # accepts a trailing Z since 3.11
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None
