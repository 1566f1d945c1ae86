"""check_idle, from the schedule: describe, judge (rules.judge's rules), carry out. It stops an instance, or removes it
from its group, once it is known to be idle past the timeout, keeps it whenever in doubt, and wakes the fleet when it
is held running or in a keep-warm window (a group then keeps at least one instance). Each instance is judged on its
own backend's answer; the backends are read at once, and the metrics of all of them in one call. A removal that the
backend's activity decided waits for that backend's drain. It assembles its Done once, at its end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import datetime
from functools import partial
from typing import Final

from orchestrator.actions import (
    Done,
    Outcome,
    Run,
    TargetResult,
    forget_hold,
    shrink_unless_dry_run,
    wake_unless_dry_run,
)
from orchestrator.activity import Activity, ActivityUnknown
from orchestrator.aws import Notice, instance_metrics
from orchestrator.backend import NotDrainedError, drain, fetch_activity, undrain
from orchestrator.budget import concurrently, reserve
from orchestrator.errors import AwsError, AwsUnreachableError, OrchestratorError, OutOfTimeError
from orchestrator.holds import Hold, read_hold
from orchestrator.rules import (
    ONE_BUSY_VCPU_PERCENT,
    Judgement,
    MetricSamples,
    Verdict,
    judge_metrics,
    judge_running,
    keeping,
    metric_window,
    plan,
)
from orchestrator.targets import Described, InstanceInfo
from orchestrator.words import BUSY_SINCE_TAG, IN_SERVICE, REMOVALS, Action, Decision, Signal

LEFT_DRAINED: Final = (
    "{call} got no answer and may still stop the instance, so the backend is left drained: it refuses work until its "
    "lease ends rather than take work the stop would kill."
)


def check_idle(run: Run) -> Done:
    """Describe, judge, carry out; a hold that has ended is ended first. Out of time before it decides, it keeps (signal
    deadline): an idle instance would run on, so the OutOfTime alarm hears of it."""
    run.config.require_backend_url(Action.CHECK_IDLE)
    described: Described | None = None
    verdict: Verdict | None = None
    targets: tuple[TargetResult, ...] = ()
    hold = ended = None
    ends: tuple[datetime | None, ...] = ()
    warnings: tuple[str, ...] = ()
    notices: tuple[Notice, ...] = ()
    try:
        described = run.fleet.describe()
        reading = read_hold(described.tags, run.now(), run.config.max_hold_hours)
        hold, warnings, ends = (
            reading.hold,
            reading.problems,
            (reading.last_ended, reading.ended and reading.ended.until),
        )
        if reading.ended is not None:
            ended, notices, said = _end_hold(run, described, reading.ended)
            warnings += said
        floor = keeping(run.config, described.state, hold, run.now())
        if floor is not None and floor.decision is not Decision.KEEP:  # the fleet as a whole: start it, or wait
            verdict = floor
            outcome = (
                wake_unless_dry_run(run, described) if floor.decision is Decision.START else Outcome(floor.decision)
            )
        else:
            verdict, targets = _judge(run, described, floor, ends)
            outcome, targets = carry_out(run, described, verdict, targets)
            judged = [target.judged for target in targets]
            problems = [j.activity.problem for j in judged if isinstance(j.activity, Activity) and j.activity.problem]
            warnings += (*(w for j in judged for w in j.warnings), *problems, *outcome.warnings)
            warnings += _keep_records(run, described, targets)
    except OutOfTimeError as error:
        outcome = Outcome(Decision.KEEP, failure=error)
        late = f"out of time before {error.step} ({error.brief}); the next check decides again"
        if verdict is None:
            verdict = Verdict(Decision.KEEP, late, Signal.DEADLINE)
            targets = _undecided(run, described, verdict, ends)
        else:
            outcome = outcome._replace(note=f", but {late}", signal=Signal.DEADLINE)
            targets = tuple(t._replace(decision=Decision.KEEP) if t.decision in REMOVALS else t for t in targets)
    return Done(Action.CHECK_IDLE, described, verdict, outcome, targets, hold=hold, ended=ended, warnings=warnings,
                notices=notices)  # fmt: skip


def _judge(
    run: Run, described: Described, floor: Verdict | None, ends: tuple[datetime | None, ...]
) -> tuple[Verdict, tuple[TargetResult, ...]]:
    """Each instance in service judged on its own backend (all read at once), unless the fleet keeps them all anyway
    (a hold, a keep-warm window, a group's MinSize); then which to remove (rules.plan). Instances not in service are
    not judged: those joining the group count as kept. Returns the fleet's verdict and each instance's."""
    serving = [info for info in described.instances if info.serving]
    joining = [info for info in described.instances if info.joining]
    need = max(described.min_size, 1 if floor else 0)
    why = floor if floor is not None and described.min_size <= 1 else None
    if why is None and need:
        why = Verdict(Decision.KEEP, f"the group's MinSize is {need}", Signal.MIN_SIZE)

    def result(info: InstanceInfo, judged: Judgement) -> TargetResult:
        until = _explained_until(run, info, ends)
        return TargetResult(info, judged, judged.verdict.decision, explained_until=until, protected=info.protected)

    others = tuple(_not_judged(info) for info in described.instances if not info.serving)
    if not serving and floor is None:
        return Verdict(Decision.SKIP, f"{described.kind} is {described.state}, not running", Signal.STATE), others
    if why is not None and len(serving) + len(joining) <= need:  # nothing may go: no backend need be asked
        kept = tuple(result(info, Judgement(why)) for info in serving)
        return (kept[0].verdict if len(kept) == 1 else why), (*kept, *others)
    judgements = _judgements(run, serving)
    decided = plan([(info, judged.verdict) for info, judged in zip(serving, judgements, strict=True)],
                   need - len(joining), why)  # fmt: skip
    verdicts = {info.instance_id: verdict for info, verdict in (*decided.kept, *decided.removed)}
    judged = tuple(result(info, j._replace(verdict=verdicts[info.instance_id]))
                   for info, j in zip(serving, judgements, strict=True))  # fmt: skip
    return _summary(judged), (*judged, *others)


def _judgements(run: Run, serving: Sequence[InstanceInfo]) -> list[Judgement]:
    """judge_running for each instance, its backend read once (all at once, sharing one grant of time) and the
    metrics of those that need them read in one call: a first pass learns who needs them, the second judges."""
    config, now, deadline = run.config, run.now(), run.deadline
    urls = [_url(run, info, config.last_activity_path) for info in serving]
    step = f"GET {next((u for u in urls if u), 'the activity path')}" + (
        f" and {len(urls) - 1} more" if len(urls) > 1 else ""
    )
    seconds = deadline.grant_backend(step, config.http_timeout_seconds, reserve("activity", config))

    def read(url: str | None) -> Activity | ActivityUnknown:
        if url is None:
            return ActivityUnknown("the instance lacks an address BACKEND_INSTANCE_URL names (a private DNS name?)")
        return fetch_activity(url, seconds, deadline.clock)

    activities = concurrently(read, urls)
    wanted: dict[str, int] = {}

    def asked(info: InstanceInfo, seconds: int, not_before: datetime) -> tuple[bool, str]:
        wanted[info.instance_id] = max(seconds, wanted.get(info.instance_id, 0))
        raise _Deferred

    for info, activity in zip(serving, activities, strict=True):
        with suppress(_Deferred):
            judge_running(config, info, now, backend=partial(_said, activity), metrics=partial(asked, info))
    fetched: dict[str, MetricSamples] | AwsError | OutOfTimeError = {}
    if wanted:
        since = min(metric_window(now, seconds)[0] for seconds in wanted.values())
        try:
            fetched = instance_metrics(config.region, list(wanted), since, now, deadline)
        except (AwsError, OutOfTimeError) as error:  # each instance's rule says what that means for it
            fetched = error
    return [
        judge_running(
            config, info, now, backend=partial(_said, activity), metrics=partial(_metrics_idle, run, info, fetched)
        )
        for info, activity in zip(serving, activities, strict=True)
    ]


def _said(activity: Activity | ActivityUnknown) -> Activity | ActivityUnknown:
    return activity  # a backend's answer, read already


class _Deferred(Exception):
    """A first pass's metrics reading: the rule asked for them, to be read with the others."""


def _metrics_idle(
    run: Run, info: InstanceInfo, fetched: Mapping[str, MetricSamples] | OrchestratorError, seconds: int,
    not_before: datetime,
) -> tuple[bool, str]:  # fmt: skip
    """Whether the instance's own metrics were idle over the last `seconds`, from `not_before` on (the launch, or
    when its backend began to be busy), on its scale (one busy vCPU of any count is not idle); and the evidence."""
    if isinstance(fetched, OrchestratorError):
        raise fetched
    assert info.vcpus is not None  # noqa: S101 - judge_running() checks it first
    since, until = metric_window(run.now(), seconds)
    cpu_limit = min(run.config.idle_cpu_percent, ONE_BUSY_VCPU_PERCENT / info.vcpus)
    network_limit = run.config.idle_network_kb * 1024
    began = "the launch" if not_before == info.launch_time else "the busy span"
    samples = fetched.get(info.instance_id, MetricSamples([], [], []))
    return judge_metrics(samples, since, until, cpu_limit, network_limit, not_before=not_before, began=began)


def carry_out(
    run: Run, described: Described, verdict: Verdict, targets: tuple[TargetResult, ...]
) -> tuple[Outcome, tuple[TargetResult, ...]]:
    """Make the verdicts so, in an order that never leaves a working instance unprotected, wherever the function is
    stopped: protect the kept instances in service; drain those to remove whose backend's activity decided (a refusal
    keeps one, protected too); end the protection of those to remove; shrink the fleet (an instance: StopInstances).
    A drained backend whose removal then fails is told to resume work."""
    config, fleet, dry = run.config, run.fleet, run.config.dry_run
    kept = [t for t in targets if t.decision is not Decision.STOP]
    removed = [t for t in targets if t.decision is Decision.STOP]
    if not dry:
        kept = _protected(run, kept)
    if not removed:
        return Outcome(verdict.decision), tuple(kept)
    drains = [t for t in removed if config.drain_path and t.verdict.signal is Signal.ACTIVITY and not dry]
    drained = concurrently(partial(_drain, run), drains)
    refused = [t for t in drained if not t.drained]
    removed = [t for t in removed if t not in drains] + [t for t in drained if t.drained]
    step = "SetInstanceProtection"
    try:
        if not dry:
            refused = _protected(run, refused)
            fleet.protect([t.info.instance_id for t in removed if t.info.protected], False)
        step = fleet.shrink_call
        size = described.size_after([t.info for t in removed], [t.info for t in (*kept, *refused)])
        outcome = shrink_unless_dry_run(run, described, size) if removed else Outcome(Decision.KEEP)
    except (AwsError, OutOfTimeError) as error:
        if not any(t.drained for t in removed):
            raise
        resumed = " ".join(concurrently(partial(_resume, run, error), [t for t in removed if t.drained]))
        note = f"; drained, but {step} failed: {error.message} {resumed}"
        kept_all = tuple(t._replace(decision=Decision.KEEP) for t in removed)
        results = _in_order(targets, (*kept, *refused, *kept_all))
        return Outcome(Decision.KEEP, note=note, drained=True, failure=error), results
    gone = Decision.WOULD_STOP if outcome.decision.startswith("would") else Decision.STOP
    left = tuple(t._replace(decision=gone, protected=t.protected and dry) for t in removed)
    results = _in_order(targets, (*kept, *refused, *left))
    notes = [t for t in results if t.note]
    note = notes[0].note if len(results) == 1 and notes else "".join(f"; {t.info.instance_id}{t.note}" for t in notes)
    return outcome._replace(note=note, drained=any(t.drained for t in left)), results


def _protected(run: Run, targets: Sequence[TargetResult]) -> list[TargetResult]:
    """Protect the instances in service among `targets` from scale-in, where they are not yet (one call per 50)."""
    unguarded = [t.info.instance_id for t in targets if t.info.lifecycle_state == IN_SERVICE and not t.info.protected]
    run.fleet.protect(unguarded, True)
    return [t._replace(protected=t.protected or t.info.instance_id in unguarded) for t in targets]


def _drain(run: Run, target: TargetResult) -> TargetResult:
    """Drain the instance's backend: drained, it may go; refused, it is kept (a drain it may have begun is undone)."""
    config = run.config
    url = _url(run, target.info, config.drain_path or "")
    if url is None:  # not reached: without an address, its activity was never read, nor decided its removal
        return target._replace(decision=Decision.KEEP, note=", but it has no address to drain")
    try:
        drain(url, config.http_timeout_seconds, run.deadline, keep=reserve("drain", config))
    except NotDrainedError as refused:
        undone = f"; {undrain(url, config.http_timeout_seconds, run.deadline)}" if refused.maybe_drained else ""
        return target._replace(decision=Decision.KEEP, note=f", but {refused}{undone}")
    return target._replace(drained=True)


def _resume(run: Run, error: OrchestratorError, target: TargetResult) -> str:
    """After a removal that failed: tell a drained backend to resume work, unless the call may still have gone
    through (it got no answer: aws_unreachable), in which case it is left drained."""
    url = _url(run, target.info, run.config.drain_path or "")
    if isinstance(error, AwsUnreachableError) or url is None:
        return LEFT_DRAINED.format(call=run.fleet.shrink_call)
    return undrain(url, run.config.http_timeout_seconds, run.deadline)


def _url(run: Run, info: InstanceInfo, path: str) -> str | None:
    base = run.config.base_url_of(info.instance_id, info.private_ip, info.private_dns_name)
    return None if base is None else base + path


def _summary(targets: Sequence[TargetResult]) -> Verdict:
    """The fleet's verdict: its one instance's; a group's, each instance's reason, led by what was removed."""
    if len(targets) == 1:
        return targets[0].verdict
    leading = [t for t in targets if t.verdict.decision is Decision.STOP] or list(targets)
    reason = "; ".join(f"{t.info.instance_id}: {t.verdict.reason}" for t in targets)
    idle = [t.verdict.idle_seconds for t in targets if t.verdict.idle_seconds is not None]
    decision = Decision.STOP if leading[0].verdict.decision is Decision.STOP else Decision.KEEP
    return Verdict(decision, reason, leading[0].verdict.signal, min(idle, default=None))


def _not_judged(info: InstanceInfo) -> TargetResult:
    why = "not yet in service, counted as kept" if info.joining else "not in service, neither judged nor counted"
    verdict = Verdict(Decision.SKIP, f"{info.lifecycle_state or info.state}: {why}", Signal.STATE)
    return TargetResult(info, Judgement(verdict), Decision.SKIP, protected=info.protected)


def _undecided(
    run: Run, described: Described | None, verdict: Verdict, ends: tuple[datetime | None, ...]
) -> tuple[TargetResult, ...]:
    """Out of time before deciding: each instance in service kept, so that the uptime alarm still hears of it."""
    serving = [info for info in (described.instances if described else ()) if info.serving]
    return tuple(
        TargetResult(info, Judgement(verdict), Decision.KEEP, explained_until=_explained_until(run, info, ends),
                     protected=info.protected)
        for info in serving
    )  # fmt: skip


def _explained_until(run: Run, info: InstanceInfo, ends: tuple[datetime | None, ...]) -> datetime | None:
    """When the last hold (`ends`) or keep-warm window of the instance's run ended: its uptime is explained so far."""
    window_end = run.config.last_window_end(info.launch_time, run.now())
    return max((end for end in (*ends, window_end) if end), default=None)


def _in_order(targets: Sequence[TargetResult], results: Sequence[TargetResult]) -> tuple[TargetResult, ...]:
    """`results` in the order of `targets` (the group's own)."""
    order = [target.info.instance_id for target in targets]
    return tuple(sorted(results, key=lambda result: order.index(result.info.instance_id)))


def _end_hold(run: Run, described: Described, ended: Hold) -> tuple[Hold | None, tuple[Notice, ...], tuple[str, ...]]:
    """A hold whose end has passed: say so once, and end it in one call (forget_hold). The usual rules apply.
    Returns the hold it ended, the notice of it, and a warning where it could not."""
    if run.config.dry_run:
        return None, (), (f"The hold ({ended.text()}) has ended; in dry run its tags are left in place.",)
    try:
        forget_hold(run.fleet, ended, ended.until)
    except AwsError as error:
        return None, (), (f"The hold ({ended.text()}) has ended, but its tags stay: {error.message}",)
    text = f"The hold on {described.label} ({ended.text()}) has ended; the usual rules apply again."
    attributes = {"action": Action.CHECK_IDLE.value, "decision": "hold_ended"}
    return ended, (Notice(f"Backend {described.id} hold ended", text, attributes),), ()


def _keep_records(run: Run, described: Described, targets: Sequence[TargetResult]) -> tuple[str, ...]:
    """Write (or delete) each instance's record of its busy span, after the verdicts are carried out: one call per
    value written and one for those deleted, none when nothing changed or in dry run. A failure is a warning, never a
    decision."""
    if run.config.dry_run:
        return ()
    writes: dict[str, list[InstanceInfo]] = {}
    for target in targets:
        if (value := target.judged.record.get(BUSY_SINCE_TAG)) is not None:
            writes.setdefault(value, []).append(target.info)
    deletes = [t.info for t in targets if BUSY_SINCE_TAG in t.judged.record and t.judged.record[BUSY_SINCE_TAG] is None]
    try:
        for value, instances in writes.items():
            run.fleet.record(described, instances, value)
        run.fleet.record(described, deletes, None)
    except (AwsError, OutOfTimeError) as error:
        return (f"The record of when the backend began to be busy ({BUSY_SINCE_TAG}) was not kept: {error.message}",)
    return ()
