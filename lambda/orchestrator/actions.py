"""The operator's and the app's actions: start, status, stop, hold, release. Each takes a Run and returns a Done,
assembled once at its end from plain records: what was described, what was decided (a Verdict), and what carrying
it out did (an Outcome). present() is where a Done becomes the answer. check_idle is in idle.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from orchestrator.aws import Notice
from orchestrator.backend import probe_health
from orchestrator.budget import HEALTH_TIMEOUT_SECONDS, Deadline
from orchestrator.errors import AwsError, HeldStoppedError, OrchestratorError, OutOfTimeError
from orchestrator.holds import ENDED, Hold, hold_request, read_hold
from orchestrator.rules import Judgement, Verdict
from orchestrator.settings import Config
from orchestrator.targets import Described, Fleet, InstanceInfo, Transition
from orchestrator.values import some
from orchestrator.words import HOLD_TAG, HOLD_TAGS, HOLD_UNTIL_TAG, STOPPED_STATES, UP_STATES, Action, Decision, Signal


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
    """What carrying out a verdict did to the fleet: the decision as it came out (a dry run's would_stop, a stop of a
    stopped instance's skip, a refused drain's keep, a group's scale_in), and what it adds to the verdict's reason."""

    decision: Decision
    transition: Transition | None = None  # what a start or a stop did
    note: str = ""  # said after the verdict's reason
    signal: Signal | None = None  # what decided in the end, where not the verdict's rule: the deadline
    drained: bool = False
    failure: OrchestratorError | None = None  # what left check_idle undecided, or failed a drained stop
    warnings: tuple[str, ...] = ()
    capacity: int | None = None  # a group's desired capacity once done


class TargetResult(NamedTuple):
    """One instance's part of check_idle: how it was judged, and what became of it."""

    info: InstanceInfo
    judged: Judgement  # its verdict, what its backend said, a stuck busy flag, its busy span
    decision: Decision  # as carried out: keep, stop (would_stop in a dry run), skip (not judged)
    note: str = ""  # said after its verdict's reason: a refused drain
    explained_until: datetime | None = None  # when the last hold or keep-warm window of its run ended
    drained: bool = False
    protected: bool = False  # from scale-in, as this check leaves it

    @property
    def verdict(self) -> Verdict:
        return self.judged.verdict


class Done(NamedTuple):
    """What an action did, in plain values: the one thing it returns. present() is where it becomes the answer."""

    action: Action
    described: Described | None = None  # None: the Describe failed (an operator's stop goes on all the same)
    verdict: Verdict | None = None  # start and status decide nothing
    outcome: Outcome | None = None
    targets: tuple[TargetResult, ...] = ()  # check_idle: each instance, judged or not
    health: Mapping[str, Any] | None = None  # status: the health probe, None if there was no time for it
    hold: Hold | None = None  # the hold in force, or the one the hold action set
    ended: Hold | None = None  # the hold that check_idle found ended, or that release ended
    warnings: tuple[str, ...] = ()
    notices: tuple[Notice, ...] = ()  # besides the action's own: a hold that ended


def start(run: Run) -> Done:
    """Describe (the tags carry any hold), then wake the fleet if it is stopped, without waiting for the boot. Held
    stopped: a 409."""
    described = run.fleet.describe(instances=False)
    reading = read_hold(described.tags, run.now(), run.config.max_hold_hours)
    if reading.hold is not None and reading.hold.state == "stopped":
        raise HeldStoppedError(
            f"{described.kind.capitalize()} {described.id} is {reading.hold.text()}, so it is not started. It can be "
            'woken once the hold ends, or when an operator releases it ({"action": "release"}).',
            hold=reading.hold.as_dict(),
        )
    dry = run.config.dry_run and not run.fleet.wakes_in_dry_run and described.capacity == 0  # a write it would make
    return Done(Action.START, described, outcome=wake_unless_dry_run(run, described, dry), warnings=reading.problems)


def status(run: Run) -> Done:
    """The fleet's state, its hold, and, when it runs, whether the backend's health endpoint answers 2xx."""
    url = run.config.require_backend_url(Action.STATUS) + run.config.health_path
    described = run.fleet.describe(instances=False)
    reading = read_hold(described.tags, run.now(), run.config.max_hold_hours)
    health: Mapping[str, Any] | None = {"reachable": False, "healthy": False, "status_code": None}
    late: tuple[str, ...] = ()
    if described.state == "running":
        try:
            wanted = min(HEALTH_TIMEOUT_SECONDS, run.config.http_timeout_seconds)
            health = probe_health(url, run.deadline.grant_backend(f"GET {url}", wanted), run.deadline.clock)
        except OutOfTimeError as error:  # answer what is known: the state
            health, late = None, (error.message,)
    warnings = (*reading.problems, *late)
    return Done(Action.STATUS, described, health=health, hold=reading.hold, warnings=warnings)


def stop(run: Run) -> Done:
    """The operator's stop, now (direct invocation only): honours DRY_RUN and STOP_HIBERNATE; a group loses every
    instance's protection and goes to zero. Described first, so that a stopped fleet is left alone and a running hold
    or an open keep-warm window, which would start it again at the next check, is said; a Describe that fails does not
    keep an operator from stopping it."""
    described: Described | None = None
    kind, warnings = run.fleet.kind, tuple[str, ...]()
    try:
        described = run.fleet.describe(instances=False)
    except AwsError as error:
        warnings = (f"The {kind}'s tags could not be read, so no hold was looked for: {error.message}",)
    if described is not None and described.state in STOPPED_STATES:
        outcome = Outcome(Decision.SKIP, note=f", but the {kind} was already {described.state}")
    else:
        if not run.config.dry_run:
            run.fleet.protect(described.protected if described else (), False)
        outcome = shrink_unless_dry_run(run, described, 0)
        was = outcome.transition.previous_state if outcome.transition else ""
        outcome = outcome._replace(note=f", but the {kind} was already {was}") if was in STOPPED_STATES else outcome
    warnings += outcome.warnings
    held = read_hold(described.tags, run.now(), run.config.max_hold_hours).hold if described else None
    if held is not None and held.state == "running":
        release = '{"action": "release"}'
        warnings += (f"The {kind} is {held.text()}: the next check_idle starts it again. To keep it stopped, "
                     f"release the hold first ({release}), or hold it stopped instead.",)  # fmt: skip
    elif (window := run.config.open_window(run.now())) is not None:
        opened = f"The keep-warm window {window.text!r} is open: the next check_idle starts the {kind} again. "
        warnings += (opened + "To keep it stopped, remove the window from KEEP_WARM first.",)
    verdict = Verdict(Decision.STOP, "stop requested", Signal.OPERATOR)
    return Done(Action.STOP, described, verdict, outcome, warnings=warnings)


def hold(run: Run) -> Done:
    """Hold the fleet running or stopped until a time (direct invocation only): the three tags in one call, then
    start or stop it to match (an operator's stop: STOP_HIBERNATE and DRY_RUN honoured)."""
    wanted = hold_request(run.fields, run.now(), run.config.max_hold_hours)  # a 400 writes nothing
    described = run.fleet.describe(instances=False)
    if not run.config.dry_run:
        run.fleet.tag(wanted.as_tags())
    written = " (dry run: nothing written)" if run.config.dry_run else ""
    verdict = Verdict(Decision.KEEP, f"{wanted.text()}{written}", Signal.OPERATOR)
    outcome = None
    if wanted.state == "running" and described.state == "stopped":
        outcome = wake_unless_dry_run(run, described)
    elif wanted.state == "stopped" and described.state in UP_STATES:
        if not run.config.dry_run:
            run.fleet.protect(described.protected, False)
        outcome = shrink_unless_dry_run(run, described, 0)
    warnings = outcome.warnings if outcome else ()
    return Done(Action.HOLD, described, verdict, outcome, hold=wanted, warnings=warnings)


def release(run: Run) -> Done:
    """End the hold now (direct invocation only), in one call (forget_hold), tags that made no hold too; the usual
    rules apply."""
    described = run.fleet.describe(instances=False)
    reading = read_hold(described.tags, run.now(), run.config.max_hold_hours)
    released = reading.hold or reading.ended
    tagged = HOLD_TAG in described.tags or HOLD_UNTIL_TAG in described.tags  # a hold, or tags that make none
    if tagged and reading.last_ended is None and not run.config.dry_run:
        forget_hold(run.fleet, released, min(released.until, run.now()) if released else run.now())
    reason = f"released from its hold ({released.text()})" if released else "released: it had no hold"
    reason += " (dry run: nothing written)" if run.config.dry_run else ""
    return Done(Action.RELEASE, described, Verdict(Decision.KEEP, reason, Signal.OPERATOR), ended=released)


def forget_hold(fleet: Fleet, hold: Hold | None, ended: datetime) -> None:
    """End a hold in one call: a running one marked ended at `ended` (it explained the uptime until then), anything
    else (a stopped hold, tags that made no hold) deleted."""
    if hold is not None and hold.state == "running":
        fleet.tag({HOLD_TAG: ENDED, HOLD_UNTIL_TAG: ended.isoformat()})
    else:
        fleet.untag(*HOLD_TAGS)


def wake_unless_dry_run(run: Run, described: Described, dry: bool | None = None) -> Outcome:
    """Wake the fleet, or (`dry`: DRY_RUN unless told) say that it would be woken."""
    if run.config.dry_run if dry is None else dry:
        return Outcome(Decision.WOULD_START)
    return Outcome(Decision.START, run.fleet.wake(described), capacity=max(described.capacity, 1))


def shrink_unless_dry_run(run: Run, described: Described | None, size: int) -> Outcome:
    """Shrink the fleet to `size` instances (0: stop it), or say what that would do in a dry run."""
    if run.config.dry_run:
        return Outcome(Decision.WOULD_STOP if size == 0 else Decision.WOULD_SCALE_IN, capacity=size)
    moved, warning = run.fleet.shrink(described, size, run.config.stop_hibernate)
    stopped = Decision.STOP if size == 0 else Decision.SCALE_IN
    decision = Decision.SKIP if moved.previous_state in STOPPED_STATES else stopped
    return Outcome(decision, moved, warnings=some(warning), capacity=size)
