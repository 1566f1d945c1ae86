"""The one presenter: what an action did (a Done) becomes its answer: the body's fields, the status, the metrics, the
log level and the notices to publish. The decision it shows is the judged one plus what carrying it out did."""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, NamedTuple

from orchestrator.actions import Done, TargetResult
from orchestrator.activity import ActivityUnknown
from orchestrator.aws import Notice
from orchestrator.errors import OutOfTimeError
from orchestrator.settings import Config
from orchestrator.words import Action, Decision, Signal

CHANGES: Final = frozenset({Decision.START, Decision.STOP, Decision.WOULD_START, Decision.WOULD_STOP})
STARTING: Final = "Instance is starting: poll the backend's health endpoint."
SNS_SUBJECT_LIMIT: Final = 100  # an SNS subject is "less than 100 characters" of printable ASCII


class Answer(NamedTuple):
    """An invocation's answer before it is rendered: the body's fields, status and headers, the metrics, the
    warnings, the log level, and the notices to publish to NOTIFY_TOPIC_ARN."""

    fields: Mapping[str, Any]
    status_code: int = 200
    metrics: Mapping[str, float] = {}
    warnings: tuple[str, ...] = ()
    level: int = logging.INFO
    headers: Mapping[str, str] = {}
    notices: tuple[Notice, ...] = ()


class Said(NamedTuple):
    """What a target's answer says was decided: the verdict, as carrying it out left it."""

    decision: Decision
    reason: str
    signal: Signal


def said(target: TargetResult) -> Said | None:
    verdict, outcome = target.verdict, target.outcome
    if verdict is None:
        return None
    if outcome is None:
        return Said(verdict.decision, verdict.reason, verdict.signal)
    return Said(outcome.decision, verdict.reason + outcome.note, outcome.signal or verdict.signal)


def present(done: Done, config: Config, now: datetime) -> Answer:
    """The one place where what an action did becomes its answer: body, status, metrics, log level, notices."""
    action = done.action
    [target] = done.targets or (TargetResult(),)  # one target today
    info, decided, outcome = target.info, said(target), target.outcome
    moved = outcome.transition if outcome else None
    started = moved is not None and moved.started
    fields: dict[str, Any] = {"state": info.state, "launch_time": info.launch_time.isoformat()} if info else {}
    if done.hold is not None or action in (Action.STATUS, Action.HOLD, Action.RELEASE):
        fields["hold"] = done.hold.as_dict() if done.hold else None
    if done.ended is not None or action is Action.RELEASE:
        fields["released" if action is Action.RELEASE else "hold_ended"] = done.ended.as_dict() if done.ended else None
    metrics: dict[str, float] = {"InstanceStarted": int(started)} if action is Action.START else {}
    if moved is not None:
        fields.update(previous_state=moved.previous_state, state=moved.state)
        metrics.update({"InstanceStarted": 1} if started else {"InstanceStopped": 1} if moved.stopped else {})
    if action is Action.START:
        fields["message"] = STARTING if started else "Instance is already up."
    if action is Action.STATUS:
        fields["backend"] = target.health
    if decided is not None:
        fields.update(decision=decided.decision, reason=decided.reason, signal=decided.signal, dry_run=config.dry_run)
    if action is Action.CHECK_IDLE:
        figures, counted = _check_idle_figures(target, config, now)
        fields, metrics = {**fields, **figures}, {**metrics, **counted}
    notices = done.notices
    # Notified: a start, a stop (or what dry run would have done), a hold set, a hold released.
    changes = {Action.START: started, Action.HOLD: True, Action.RELEASE: done.ended is not None}
    if changes.get(action, decided is not None and decided.decision in CHANGES):
        notices = (*notices, notification(done, target, fields.get("uptime_seconds")))
    # ERROR when the backend cannot say (BackendUnreachable), or check_idle could not decide or carry out; WARNING for
    # a busy flag that may be stuck. Any warning lifts INFO to WARNING when the line is logged.
    failed = outcome is not None and outcome.failure is not None
    level = logging.ERROR if isinstance(target.activity, ActivityUnknown) or failed else logging.INFO
    level = max(level, logging.WARNING) if target.stuck_busy else level
    status_code = 202 if action is Action.START and started else 200
    return Answer(fields, status_code, metrics, done.warnings, level, notices=notices)


def _check_idle_figures(target: TargetResult, config: Config, now: datetime) -> tuple[dict[str, Any], dict[str, float]]:
    """check_idle's own fields and metrics: idle time, what the backend said, a stuck busy flag, a drain, a failure,
    and the instance's uptime (alarmed on when nothing explains it; counted at a stop)."""
    info, verdict, outcome, decided = target.info, target.verdict, target.outcome, said(target)
    if verdict is None or decided is None:
        raise AssertionError("check_idle always ends in a verdict")
    failure, drained = (outcome.failure, outcome.drained) if outcome else (None, False)
    idle_seconds = None if verdict.idle_seconds is None else round(verdict.idle_seconds, 1)
    fields: dict[str, Any] = {"idle_seconds": idle_seconds, "idle_timeout_seconds": config.idle_timeout_seconds}
    metrics: dict[str, float] = {"IdleSeconds": idle_seconds} if idle_seconds is not None else {}
    metrics.update({"BackendUnreachable": 1} if isinstance(target.activity, ActivityUnknown) else {})
    fields.update({name: True for name, on in (("stuck_busy", target.stuck_busy), ("drained", drained)) if on})
    fields.update({"busy_since": target.busy_since.isoformat()} if target.busy_since else {})
    metrics.update({"StuckBusy": 1} if target.stuck_busy else {})
    metrics.update({"OutOfTime": 1} if isinstance(failure, OutOfTimeError) else {})
    metrics.update({"Errors": 1} if failure and drained else {})  # a drained backend left running
    uptime = round((now - info.launch_time).total_seconds()) if info else 0
    if info is not None and info.state == "running" and decided.signal not in (Signal.HOLD, Signal.KEEP_WARM):
        explained = max(info.launch_time, target.explained_until or info.launch_time)  # a hold or window explained it
        metrics["UptimeHours"] = round(max((now - explained).total_seconds(), 0) / 3600, 2)
    if info is not None and decided.decision in (Decision.STOP, Decision.WOULD_STOP):
        fields["uptime_seconds"] = uptime
        metrics.update({"UptimeSeconds": uptime} if decided.decision is Decision.STOP else {})
    return fields, metrics


def notification(done: Done, target: TargetResult, uptime_seconds: int | None) -> Notice:
    """The SNS message for a start, a stop or a hold: a subject and a body a person reads, attributes to filter on."""
    decided, outcome, instance_id = said(target), target.outcome, target.named()
    moved = outcome.transition if outcome else None
    decision = decided.decision.value if decided else "start"
    what = {"start": "started", "stop": "stopped", "would_stop": "would be stopped (dry run)",
            "would_start": "would be started (dry run)"}.get(decision, decision)  # fmt: skip
    if done.action in (Action.HOLD, Action.RELEASE) and decided is not None:
        what = decided.reason
    lines = [f"Instance {instance_id} {what} by {done.action}."]
    if decided is not None:
        lines += [f"Why: {decided.reason}", f"Decided by: {decided.signal}"]
    if moved is not None:
        lines += [f"Was: {moved.previous_state}", f"Now: {moved.state}"]
    elif target.info is not None:
        lines.append(f"Now: {target.info.state}")
    if uptime_seconds is not None:
        lines.append(f"Ran for: {uptime_seconds // 3600} h {uptime_seconds % 3600 // 60} min")
    subject = sns_subject(f"Backend {instance_id} {what}")
    return Notice(subject, "\n".join(lines), {"action": done.action.value, "decision": decision})


def sns_subject(text: str) -> str:
    """`text` as an SNS subject: printable ASCII on one line (accents dropped, other letters left out) and fewer than
    100 characters, cut at a word with "..." where it is longer; the message carries the whole text.
    https://docs.aws.amazon.com/sns/latest/api/API_Publish.html"""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    plain = " ".join("".join(c if c.isprintable() else " " for c in plain).split())
    if len(plain) < SNS_SUBJECT_LIMIT:
        return plain
    cut = plain[: SNS_SUBJECT_LIMIT - 4]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "..."
