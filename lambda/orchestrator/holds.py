"""An operator's hold: keep the instance running, or stopped, until a time. It lives on the instance (or, later, the
group) as three tags where the console shows them, set by the hold action or by hand, and it always ends; a running
hold that ended leaves a record (hold=ended) from which the uptime alarm counts."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple

from orchestrator.errors import InvalidHoldError
from orchestrator.values import aware_time, number, short
from orchestrator.words import HOLD_REASON_TAG, HOLD_TAG, HOLD_UNTIL_TAG, KNOWN_TAGS, TAG_PREFIX

HOLD_STATES: Final = ("running", "stopped")
ENDED: Final = "ended"  # a hold that is over: kept so that the uptime alarm counts from its end
MAX_TAG_VALUE_CHARS: Final = 256  # EC2's limit on a tag value


class Hold(NamedTuple):
    """An operator's hold: keep the instance running, or stopped, until `until`."""

    state: str  # running | stopped
    until: datetime
    reason: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"state": self.state, "until": self.until.isoformat(), "reason": self.reason}

    def as_tags(self) -> dict[str, str]:
        """Its three tags (an empty reason clears an older one)."""
        return {HOLD_TAG: self.state, HOLD_UNTIL_TAG: self.until.isoformat(), HOLD_REASON_TAG: self.reason or ""}

    def text(self) -> str:
        return f"held {self.state} until {self.until.isoformat()}" + (f" ({self.reason})" if self.reason else "")


class HoldReading(NamedTuple):
    """What the instance's tags say: a hold in force, one whose end has passed, the end of the last hold (a record),
    or tags to ignore and why."""

    hold: Hold | None = None
    ended: Hold | None = None  # its end has passed, and no check has said so yet
    last_ended: datetime | None = None  # the record a hold that is over left
    problems: tuple[str, ...] = ()


def read_hold(tags: Mapping[str, str], now: datetime, max_hold_hours: float) -> HoldReading:
    """The hold the tags describe, set by the hold action or by hand (the state in any case, with spaces around it):
    malformed tags are ignored with the reason, and a tag with the prefix that the function does not read is named."""
    unknown = sorted(key for key in tags if key.startswith(TAG_PREFIX) and key not in KNOWN_TAGS)
    problems = tuple(
        f"Tag {key} is not one the function reads ({', '.join(KNOWN_TAGS)}): a typo? It is ignored." for key in unknown
    )
    if HOLD_TAG not in tags and HOLD_UNTIL_TAG not in tags:
        return HoldReading(problems=problems)
    state, until_text = (tags.get(HOLD_TAG) or "").strip().lower(), tags.get(HOLD_UNTIL_TAG, "")
    until, ignored = aware_time(until_text), "the hold is ignored and the usual rules apply"
    if state == ENDED:
        return HoldReading(last_ended=until, problems=problems)
    if state not in HOLD_STATES:
        shown = short(tags.get(HOLD_TAG))
        return HoldReading(problems=(*problems, f"Tag {HOLD_TAG}={shown} is not running or stopped: {ignored}."))
    if until is None:
        return HoldReading(
            problems=(
                *problems,
                f"Tag {HOLD_UNTIL_TAG}={short(until_text)} is not an ISO-8601 time with its offset "
                f"(e.g. 2026-12-02T22:00:00+01:00 or ...Z): {ignored}.",
            )
        )
    if until > now + timedelta(hours=max_hold_hours):
        return HoldReading(
            problems=(
                *problems,
                f"Tag {HOLD_UNTIL_TAG}={until_text!r} lies more than MAX_HOLD_HOURS={max_hold_hours:g} hours ahead: "
                f"{ignored}.",
            )
        )
    found = Hold(state, until, tags.get(HOLD_REASON_TAG) or None)
    return HoldReading(ended=found, problems=problems) if until <= now else HoldReading(hold=found, problems=problems)


def hold_request(fields: Mapping[str, Any], now: datetime, max_hold_hours: float) -> Hold:
    """The hold a hold action asks for, or an InvalidHoldError naming the field: nothing is written before this."""
    state, hours, until_text, reason = (fields.get(name) for name in ("state", "hours", "until", "reason"))
    if state not in HOLD_STATES:
        raise InvalidHoldError(f'"state" is {short(state)}: hold "running" or "stopped".')
    if (hours is None) == (until_text is None):
        raise InvalidHoldError('Give exactly one of "hours" (e.g. 4) and "until" (e.g. "2026-12-02T22:00:00+01:00").')
    limit = f"at most MAX_HOLD_HOURS={max_hold_hours:g} hours ahead"
    if hours is not None:
        count = number(hours)
        if count is None or count <= 0 or count > max_hold_hours:
            raise InvalidHoldError(f'"hours" is {short(hours)}: give a number above 0, {limit}.')
        until = now + timedelta(hours=count)
    else:
        parsed = aware_time(until_text) if isinstance(until_text, str) else None
        if parsed is None:
            raise InvalidHoldError(
                f'"until" is {short(until_text)}: give an ISO-8601 time with its offset (Z or +01:00).'
            )
        if parsed <= now or parsed > now + timedelta(hours=max_hold_hours):
            raise InvalidHoldError(f'"until" is {until_text}: give a time in the future, {limit}.')
        until = parsed
    if reason is not None and not (
        isinstance(reason, str)
        and len(reason) <= MAX_TAG_VALUE_CHARS
        and all(c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF for c in reason)  # UTF-8 text on one line
    ):
        raise InvalidHoldError(
            f'"reason" must be text of at most {MAX_TAG_VALUE_CHARS} characters without control characters.'
        )
    whole = until.replace(microsecond=0) + (timedelta(seconds=1) if until.microsecond else timedelta())  # > now
    return Hold(state, whole, reason or None)
