"""The words every layer shares: what an invocation may ask, what it decides and what decided it, the tags the
function keeps on the instance, and the states EC2 reports."""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Action(StrEnum):
    START = "start"
    STATUS = "status"
    CHECK_IDLE = "check_idle"
    STOP = "stop"
    HOLD = "hold"
    RELEASE = "release"
    PREFLIGHT = "preflight"


HTTP_ACTIONS: Final = (Action.START, Action.STATUS)


class Source(StrEnum):
    HTTP = "http"
    SCHEDULE = "schedule"
    DIRECT = "direct"


class Decision(StrEnum):
    SKIP = "skip"
    KEEP = "keep"
    STOP = "stop"
    WOULD_STOP = "would_stop"
    START = "start"  # a keep-warm window or a hold found the instance stopped
    WOULD_START = "would_start"
    SCALE_IN = "scale_in"  # a group shrinks, but not to zero
    WOULD_SCALE_IN = "would_scale_in"


REMOVALS: Final = frozenset({Decision.STOP, Decision.WOULD_STOP})  # an instance's, as check_idle carried it out


class Signal(StrEnum):
    """What decided: the rule of check_idle that applied, the deadline, or an operator."""

    ACTIVITY = "activity"  # the backend's answer
    CLOUDWATCH = "cloudwatch"  # the second signal: the instance's own metrics
    STUCK_BUSY = "stuck_busy"  # a busy flag that never clears, stopped with STOP_STUCK_BUSY
    KEEP_WARM = "keep_warm"
    HOLD = "hold"
    STATE = "state"  # not running
    DEADLINE = "deadline"  # out of time before it could decide or carry out
    OPERATOR = "operator"  # stop, hold, release
    MIN_SIZE = "min_size"  # a group's MinSize: it keeps at least that many instances


# What the function keeps on the instance, as tags with this prefix where the console shows them: a hold (set by the
# hold action or by hand with create-tags), and when its backend began to be busy (when the backend does not say).
TAG_PREFIX: Final = "backend-orchestrator:"
HOLD_TAG: Final = "backend-orchestrator:hold"  # running | stopped, or ended: the record of the last hold's end
HOLD_UNTIL_TAG: Final = "backend-orchestrator:hold-until"  # ISO-8601 with its offset: every hold ends
HOLD_REASON_TAG: Final = "backend-orchestrator:hold-reason"  # optional free text
BUSY_SINCE_TAG: Final = "backend-orchestrator:busy-since"  # ISO-8601: when check_idle first saw the backend busy
HOLD_TAGS: Final = (HOLD_TAG, HOLD_UNTIL_TAG, HOLD_REASON_TAG)
KNOWN_TAGS: Final = (*HOLD_TAGS, BUSY_SINCE_TAG)

GONE_STATES: Final = frozenset({"shutting-down", "terminated"})
STOPPED_STATES: Final = frozenset({"stopping", "stopped"})
UP_STATES: Final = frozenset({"pending", "running"})
IN_SERVICE: Final = "InService"  # an Auto Scaling group's instance that serves: the only one judged and protected
