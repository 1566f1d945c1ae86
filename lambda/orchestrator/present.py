"""The one presenter: what an action did (a Done) becomes its answer: the body's fields, the status, the metrics, the
log level and the notices to publish. The decision it shows is the judged one plus what carrying it out did."""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, NamedTuple

from orchestrator.actions import Done, Outcome, TargetResult
from orchestrator.activity import ActivityUnknown
from orchestrator.aws import Notice
from orchestrator.errors import OutOfTimeError
from orchestrator.rules import Verdict
from orchestrator.settings import Config
from orchestrator.targets import GroupInfo
from orchestrator.words import REMOVALS, Action, Decision, Signal

CHANGES: Final = frozenset({Decision.START, Decision.STOP, Decision.WOULD_START, Decision.WOULD_STOP,
                            Decision.SCALE_IN, Decision.WOULD_SCALE_IN})  # fmt: skip
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
    """What an answer says was decided: the verdict, as carrying it out left it."""

    decision: Decision
    reason: str
    signal: Signal


def said(verdict: Verdict | None, outcome: Outcome | None) -> Said | None:
    if verdict is None:
        return None
    if outcome is None:
        return Said(verdict.decision, verdict.reason, verdict.signal)
    return Said(outcome.decision, verdict.reason + outcome.note, outcome.signal or verdict.signal)


def present(done: Done, config: Config, now: datetime) -> Answer:
    """The one place where what an action did becomes its answer: body, status, metrics, log level, notices."""
    action, described, outcome = done.action, done.described, done.outcome
    decided = said(done.verdict, outcome)
    moved = outcome.transition if outcome else None
    started = moved is not None and moved.started
    fields: dict[str, Any] = {"state": described.state} if described else {}
    fields.update({"launch_time": described.launch_time.isoformat()} if described and described.launch_time else {})
    if done.hold is not None or action in (Action.STATUS, Action.HOLD, Action.RELEASE):
        fields["hold"] = done.hold.as_dict() if done.hold else None
    if done.ended is not None or action is Action.RELEASE:
        fields["released" if action is Action.RELEASE else "hold_ended"] = done.ended.as_dict() if done.ended else None
    metrics: dict[str, float] = {"InstanceStarted": int(started)} if action is Action.START else {}
    if moved is not None:
        fields.update(previous_state=moved.previous_state, state=moved.state)
        metrics.update({"InstanceStarted": 1} if started else {"InstanceStopped": 1} if moved.stopped else {})
    if action is Action.START:
        kind = described.kind if described else "instance"
        dry = outcome is not None and outcome.decision is Decision.WOULD_START
        fields["message"] = (
            STARTING
            if started
            else f"Dry run: the {kind} would be woken; nothing was written."
            if dry
            else f"{kind.capitalize()} is already up."
        )
    if action is Action.STATUS:
        fields["backend"] = done.health
    if decided is not None:
        fields.update(decision=decided.decision, reason=decided.reason, signal=decided.signal, dry_run=config.dry_run)
    if action is Action.CHECK_IDLE and decided is not None and done.verdict is not None:
        figures, counted = _check_idle_figures(done, decided, config, now)
        fields, metrics = {**fields, **figures}, {**metrics, **counted}
    if described is not None and described.group is not None:
        fields.update(_group_fields(done, described.group))
    notices = done.notices
    # Notified: a start, a stop (or what dry run would have done), a hold set, a hold released.
    changes = {Action.START: started, Action.HOLD: True, Action.RELEASE: done.ended is not None}
    if changes.get(action, decided is not None and decided.decision in CHANGES):
        notices = (*notices, notification(done, config, fields.get("uptime_seconds")))
    # ERROR when a backend cannot say (BackendUnreachable), or check_idle could not decide or carry out; WARNING for
    # a busy flag that may be stuck. Any warning lifts INFO to WARNING when the line is logged.
    judged = _judged(done)
    failed = outcome is not None and outcome.failure is not None
    unknown = any(isinstance(t.judged.activity, ActivityUnknown) for t in judged)
    level = logging.ERROR if unknown or failed else logging.INFO
    level = max(level, logging.WARNING) if any(t.judged.stuck_busy for t in judged) else level
    status_code = 202 if action is Action.START and started else 200
    return Answer(fields, status_code, metrics, done.warnings, level, notices=notices)


def _judged(done: Done) -> list[TargetResult]:
    """The instances check_idle judged (or kept without judging): not those out of service."""
    return [target for target in done.targets if target.decision is not Decision.SKIP]


def _check_idle_figures(
    done: Done, decided: Said, config: Config, now: datetime
) -> tuple[dict[str, Any], dict[str, float]]:
    """check_idle's own fields and metrics: idle time, what the backends said, a stuck busy flag, a drain, a failure,
    and the instances' uptime (alarmed on when nothing explains it; counted at a stop), over all its instances."""
    assert done.verdict is not None  # noqa: S101 - check_idle always ends in a verdict
    judged, outcome = _judged(done), done.outcome
    failure, drained = (outcome.failure, outcome.drained) if outcome else (None, False)
    idle_seconds = None if done.verdict.idle_seconds is None else round(done.verdict.idle_seconds, 1)
    fields: dict[str, Any] = {"idle_seconds": idle_seconds, "idle_timeout_seconds": config.idle_timeout_seconds}
    metrics: dict[str, float] = {"IdleSeconds": idle_seconds} if idle_seconds is not None else {}
    unreachable = sum(isinstance(t.judged.activity, ActivityUnknown) for t in judged)
    stuck = sum(t.judged.stuck_busy for t in judged)
    metrics.update({"BackendUnreachable": unreachable} if unreachable else {})
    fields.update({name: True for name, on in (("stuck_busy", stuck), ("drained", drained)) if on})
    began = [t.judged.busy_since for t in judged if t.judged.busy_since]
    fields.update({"busy_since": min(began).isoformat()} if began else {})
    metrics.update({"StuckBusy": stuck} if stuck else {})
    metrics.update({"OutOfTime": 1} if isinstance(failure, OutOfTimeError) else {})
    metrics.update({"Errors": 1} if failure and drained else {})  # a drained backend left running
    unexplained = [
        max((now - max(t.info.launch_time, t.explained_until or t.info.launch_time)).total_seconds(), 0) / 3600
        for t in judged
        if t.info.state == "running" and t.verdict.signal not in (Signal.HOLD, Signal.KEEP_WARM)
    ]  # a hold or a keep-warm window explained the uptime until it ended
    metrics.update({"UptimeHours": round(max(unexplained), 2)} if unexplained else {})
    if decided.decision in (Decision.STOP, Decision.WOULD_STOP, Decision.SCALE_IN, Decision.WOULD_SCALE_IN):
        uptimes = [round((now - t.info.launch_time).total_seconds()) for t in judged if t.decision in REMOVALS]
        fields["uptime_seconds"] = max(uptimes, default=0)
        metrics.update(
            {"UptimeSeconds": sum(uptimes)} if decided.decision in (Decision.STOP, Decision.SCALE_IN) else {}
        )
    return fields, metrics


def _group_fields(done: Done, group: GroupInfo) -> dict[str, Any]:
    """A group's own fields: its sizes (desired capacity as the action left it) and its instances."""
    outcome = done.outcome
    after = outcome.capacity if outcome is not None and outcome.capacity is not None else group.desired_capacity
    if done.action is Action.CHECK_IDLE:
        instances = [{"instance_id": t.info.instance_id, "state": t.info.lifecycle_state, "decision": t.decision,
                      "reason": t.verdict.reason + t.note, "signal": t.verdict.signal, "protected": t.protected,
                      "idle_seconds": t.verdict.idle_seconds} for t in done.targets]  # fmt: skip
        return {"group": {"name": group.name, "desired_before": group.desired_capacity, "desired_after": after},
                "instances": instances}  # fmt: skip
    sizes = {"name": group.name, "desired_capacity": after, "min_size": group.min_size, "max_size": group.max_size,
             "in_service": group.in_service}  # fmt: skip
    members = [
        {"instance_id": m.instance_id, "state": m.lifecycle_state, "protected": m.protected} for m in group.members
    ]
    return {"group": sizes, **({"instances": members} if done.action is Action.STATUS else {})}


def notification(done: Done, config: Config, uptime_seconds: int | None) -> Notice:
    """The SNS message for a start, a stop or a hold: a subject and a body a person reads, attributes to filter on."""
    decided, outcome, described = said(done.verdict, done.outcome), done.outcome, done.described
    kind, name = (
        (described.kind, described.id)
        if described
        else ("group" if config.auto_scaling_group_name else "instance", config.target[1])
    )
    moved = outcome.transition if outcome else None
    decision = decided.decision.value if decided else "start"
    what = {"start": "started", "stop": "stopped", "would_stop": "would be stopped (dry run)",
            "would_start": "would be started (dry run)", "scale_in": "scaled in",
            "would_scale_in": "would be scaled in (dry run)"}.get(decision, decision)  # fmt: skip
    if done.action in (Action.HOLD, Action.RELEASE) and decided is not None:
        what = decided.reason
    lines = [f"{kind.capitalize()} {name} {what} by {done.action}."]
    if decided is not None:
        lines += [f"Why: {decided.reason}", f"Decided by: {decided.signal}"]
    if moved is not None:
        lines += [f"Was: {moved.previous_state}", f"Now: {moved.state}"]
    elif described is not None:
        lines.append(f"Now: {described.state}")
    if uptime_seconds is not None:
        lines.append(f"Ran for: {uptime_seconds // 3600} h {uptime_seconds % 3600 // 60} min")
    subject = sns_subject(f"Backend {name} {what}")
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
