"""The operator's and the app's actions: start, status, stop, hold, release. Each takes a Run and returns a Done,
assembled once at its end from plain records: what was described, what was decided (a Verdict), and what carrying
it out did (an Outcome). present() is where a Done becomes the answer. check_idle is in idle.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from orchestrator.activity import Activity, ActivityUnknown
from orchestrator.aws import Notice
from orchestrator.backend import probe_health
from orchestrator.budget import HEALTH_TIMEOUT_SECONDS, STOPPING_POLL_SECONDS, Deadline, reserve
from orchestrator.errors import (
    RETRY_AFTER_SECONDS,
    AwsError,
    HeldStoppedError,
    InstanceGoneError,
    OrchestratorError,
    OutOfTimeError,
    StillStoppingError,
)
from orchestrator.holds import ENDED, Hold, hold_request, read_hold
from orchestrator.rules import Verdict
from orchestrator.settings import Config
from orchestrator.targets import Fleet, InstanceInfo, Transition
from orchestrator.words import (
    GONE_STATES,
    HOLD_TAG,
    HOLD_TAGS,
    HOLD_UNTIL_TAG,
    STOPPED_STATES,
    UP_STATES,
    Action,
    Decision,
    Signal,
)


@dataclass(frozen=True)
class Run:
    """What every action takes: the configuration, the deadline with its clock, the fleet it acts on, and the
    event's fields (which hold reads)."""

    config: Config
    deadline: Deadline
    fleet: Fleet
    fields: Mapping[str, Any] = field(default_factory=dict)

    def now(self) -> datetime:
        return self.deadline.clock.now()


class Outcome(NamedTuple):
    """What carrying out a verdict did: the decision as it came out (a dry run's would_stop, a stop of a stopped
    instance's skip, a refused drain's keep), and what it adds to the verdict's reason."""

    decision: Decision
    transition: Transition | None = None  # what StartInstances or StopInstances did
    note: str = ""  # said after the verdict's reason
    signal: Signal | None = None  # what decided in the end, where not the verdict's rule: the deadline
    drained: bool = False
    failure: OrchestratorError | None = None  # what left check_idle undecided, or failed a drained stop
    warnings: tuple[str, ...] = ()


class TargetResult(NamedTuple):
    """One target's part of what an action did."""

    info: InstanceInfo | None = None  # what DescribeInstances said
    verdict: Verdict | None = None  # start and status decide nothing
    outcome: Outcome | None = None
    activity: Activity | ActivityUnknown | None = None  # what the backend said, if asked
    health: Mapping[str, Any] | None = None  # status: the health probe, None if there was no time for it
    stuck_busy: bool = False
    busy_since: datetime | None = None  # check_idle: when the busy backend began to be busy, as far as it knows
    explained_until: datetime | None = None  # check_idle: when the last hold or keep-warm window of this run ended
    instance_id: str = ""  # where no Describe said it (an operator's stop whose Describe failed)

    def named(self) -> str:
        """The instance's ID: as described, or as the fleet named it."""
        return self.info.instance_id if self.info else self.instance_id


class Done(NamedTuple):
    """What an action did, in plain values: the one thing it returns. present() is where it becomes the answer."""

    action: Action
    targets: tuple[TargetResult, ...] = ()  # one per target: one today
    hold: Hold | None = None  # the hold in force, or the one the hold action set
    ended: Hold | None = None  # the hold that check_idle found ended, or that release ended
    warnings: tuple[str, ...] = ()
    notices: tuple[Notice, ...] = ()  # besides the action's own: a hold that ended


def start(run: Run) -> Done:
    """Describe (its tags carry any hold), then StartInstances if the instance is stopped, without waiting for the
    boot; a stop in progress is waited out while a Describe and a StartInstances still fit. Held stopped: a 409."""
    [target] = run.fleet.describe()
    reading = read_hold(target.tags, run.now(), run.config.max_hold_hours)
    if reading.hold is not None and reading.hold.state == "stopped":
        raise HeldStoppedError(
            f"Instance {target.instance_id} is {reading.hold.text()}, so it is not started. It can be woken once "
            'the hold ends, or when an operator releases it ({"action": "release"}).',
            hold=reading.hold.as_dict(),
        )
    if target.state in UP_STATES:
        moved = Transition(target.state, target.state)
    elif target.state == "stopped":
        try:
            moved = run.fleet.start(target)
        except AwsError as error:
            if error.aws_error_code != "IncorrectInstanceState":
                raise
            moved = _start_once_stopped(run, run.fleet.describe()[0])
    else:
        moved = _start_once_stopped(run, target)
    return Done(
        Action.START, (TargetResult(target, outcome=Outcome(Decision.START, moved)),), warnings=reading.problems
    )


def _start_once_stopped(run: Run, target: InstanceInfo) -> Transition:
    # StartInstances on a stopping instance fails with IncorrectInstanceState (so do shutting-down
    # and terminated): wait out a stop in progress, keeping room for the Describe and the StartInstances after it.
    keep = run.deadline.keep(reserve("wait_for_stopped", run.config))
    while target.state == "stopping":
        if run.deadline.left() < keep:
            raise StillStoppingError(
                f"Instance {target.instance_id} is still stopping. Retry start after {RETRY_AFTER_SECONDS} seconds.",
                state=target.state,
            )
        run.deadline.clock.sleep(STOPPING_POLL_SECONDS)
        [target] = run.fleet.describe()
    if target.state in GONE_STATES:
        raise InstanceGoneError(
            f"Instance {target.instance_id} is {target.state} and cannot be started. Point INSTANCE_ID at a live "
            "instance.",
            state=target.state,
        )
    if target.state == "stopped":
        return run.fleet.start(target)
    return Transition(target.state, target.state)  # someone else started it meanwhile


def status(run: Run) -> Done:
    """The instance's state, its hold, and, when it runs, whether the backend's health endpoint answers 2xx."""
    url = run.config.require_backend_url(Action.STATUS) + run.config.health_path
    [target] = run.fleet.describe()
    reading = read_hold(target.tags, run.now(), run.config.max_hold_hours)
    health: Mapping[str, Any] | None = {"reachable": False, "healthy": False, "status_code": None}
    late: tuple[str, ...] = ()
    if target.state == "running":
        try:
            wanted = min(HEALTH_TIMEOUT_SECONDS, run.config.http_timeout_seconds)
            health = probe_health(url, run.deadline.grant_backend(f"GET {url}", wanted), run.deadline.clock)
        except OutOfTimeError as error:  # answer what is known: the state
            health, late = None, (error.message,)
    checked = (TargetResult(target, health=health),)
    return Done(Action.STATUS, checked, hold=reading.hold, warnings=(*reading.problems, *late))


def stop(run: Run) -> Done:
    """The operator's stop, now (direct invocation only): honours DRY_RUN and STOP_HIBERNATE. Described first, so that
    a stopped instance is left alone and a running hold or an open keep-warm window, which would start it again at
    the next check, is said; a Describe that fails does not keep an operator from stopping it."""
    target: InstanceInfo | None = None
    warnings: tuple[str, ...] = ()
    try:
        [target] = run.fleet.describe()
    except AwsError as error:
        warnings = (f"The instance's tags could not be read, so no hold was looked for: {error.message}",)
    unknown = InstanceInfo("unknown", run.now(), instance_id=run.config.instance_id)  # stopped all the same
    if target is not None and target.state in STOPPED_STATES:
        outcome = Outcome(Decision.SKIP, note=f", but the instance was already {target.state}")
    else:
        outcome = stop_unless_dry_run(run, target or unknown)
        was = outcome.transition.previous_state if outcome.transition else ""
        outcome = outcome._replace(note=f", but the instance was already {was}") if was in STOPPED_STATES else outcome
    warnings += outcome.warnings
    held = read_hold(target.tags, run.now(), run.config.max_hold_hours).hold if target else None
    if held is not None and held.state == "running":
        release = '{"action": "release"}'
        warnings += (f"The instance is {held.text()}: the next check_idle starts it again. To keep it stopped, "
                     f"release the hold first ({release}), or hold it stopped instead.",)  # fmt: skip
    elif (window := run.config.open_window(run.now())) is not None:
        opened = f"The keep-warm window {window.text!r} is open: the next check_idle starts the instance again. "
        warnings += (opened + "To keep it stopped, remove the window from KEEP_WARM first.",)
    verdict = Verdict(Decision.STOP, "stop requested", Signal.OPERATOR)
    stopped = TargetResult(target, verdict, outcome, instance_id=unknown.instance_id)
    return Done(Action.STOP, (stopped,), warnings=warnings)


def hold(run: Run) -> Done:
    """Hold the instance running or stopped until a time (direct invocation only): the three tags in one
    CreateTags, then start or stop it to match (an operator's stop: STOP_HIBERNATE and DRY_RUN honoured)."""
    wanted = hold_request(run.fields, run.now(), run.config.max_hold_hours)  # a 400 writes nothing
    [target] = run.fleet.describe()
    if not run.config.dry_run:
        run.fleet.tag(target, wanted.as_tags())
    written = " (dry run: nothing written)" if run.config.dry_run else ""
    verdict = Verdict(Decision.KEEP, f"{wanted.text()}{written}", Signal.OPERATOR)
    outcome = None
    if wanted.state == "running" and target.state == "stopped":
        outcome = start_unless_dry_run(run, target)
    elif wanted.state == "stopped" and target.state in UP_STATES:
        outcome = stop_unless_dry_run(run, target)
    warnings = outcome.warnings if outcome else ()
    return Done(Action.HOLD, (TargetResult(target, verdict, outcome),), hold=wanted, warnings=warnings)


def release(run: Run) -> Done:
    """End the hold now (direct invocation only), in one call (forget_hold), tags that made no hold too; the usual
    rules apply."""
    [target] = run.fleet.describe()
    reading = read_hold(target.tags, run.now(), run.config.max_hold_hours)
    released = reading.hold or reading.ended
    tagged = HOLD_TAG in target.tags or HOLD_UNTIL_TAG in target.tags  # a hold, or tags that make none (still cleared)
    if tagged and reading.last_ended is None and not run.config.dry_run:
        forget_hold(run.fleet, target, released, min(released.until, run.now()) if released else run.now())
    reason = f"released from its hold ({released.text()})" if released else "released: it had no hold"
    reason += " (dry run: nothing written)" if run.config.dry_run else ""
    verdict = Verdict(Decision.KEEP, reason, Signal.OPERATOR)
    return Done(Action.RELEASE, (TargetResult(target, verdict),), ended=released)


def forget_hold(fleet: Fleet, target: InstanceInfo, hold: Hold | None, ended: datetime) -> None:
    """End a hold in one call: a running one marked ended at `ended` (it explained the instance's uptime until then),
    anything else (a stopped hold, tags that made no hold) deleted."""
    if hold is not None and hold.state == "running":
        fleet.tag(target, {HOLD_TAG: ENDED, HOLD_UNTIL_TAG: ended.isoformat()})
    else:
        fleet.untag(target, *HOLD_TAGS)


def start_unless_dry_run(run: Run, target: InstanceInfo) -> Outcome:
    if run.config.dry_run:
        return Outcome(Decision.WOULD_START)
    return Outcome(Decision.START, run.fleet.start(target))


def stop_unless_dry_run(run: Run, target: InstanceInfo) -> Outcome:
    if run.config.dry_run:
        return Outcome(Decision.WOULD_STOP)
    moved, warning = run.fleet.stop(target, run.config.stop_hibernate)
    decision = Decision.SKIP if moved.previous_state in STOPPED_STATES else Decision.STOP
    return Outcome(decision, moved, warnings=(warning,) if warning else ())
