"""check_idle, from the schedule: describe, judge (rules.judge), carry out. It stops an instance once it is known to be
idle past the timeout, keeps it whenever in doubt, and starts it when it is held running or in a keep-warm window;
a stop that the backend's activity decided waits for the backend's drain. It assembles its Done once, at its end."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from functools import partial
from typing import Final

from orchestrator.actions import (
    Done,
    Outcome,
    Run,
    TargetResult,
    forget_hold,
    start_unless_dry_run,
    stop_unless_dry_run,
)
from orchestrator.activity import Activity, ActivityUnknown
from orchestrator.aws import Notice, instance_metrics
from orchestrator.backend import NotDrainedError, drain, fetch_activity, undrain
from orchestrator.budget import reserve
from orchestrator.errors import AwsError, AwsUnreachableError, OrchestratorError, OutOfTimeError
from orchestrator.holds import Hold, read_hold
from orchestrator.rules import (
    ONE_BUSY_VCPU_PERCENT,
    Judgement,
    Verdict,
    judge,
    judge_metrics,
    metric_window,
)
from orchestrator.targets import InstanceInfo
from orchestrator.values import some
from orchestrator.words import BUSY_SINCE_TAG, Action, Decision, Signal

LEFT_DRAINED: Final = (
    "StopInstances got no answer and may still stop the instance, so the backend is left drained: it refuses work "
    "until its lease ends rather than take work the stop would kill."
)


def check_idle(run: Run) -> Done:
    """Describe, judge, carry out; a hold that has ended is ended first. Out of time before it decides, it keeps (signal
    deadline): an idle instance would run on, so the OutOfTime alarm hears of it."""
    run.config.require_backend_url(Action.CHECK_IDLE)
    target: InstanceInfo | None = None
    judged: Judgement | None = None
    hold = ended = explained = None
    warnings: tuple[str, ...] = ()
    notices: tuple[Notice, ...] = ()
    try:
        [target] = run.fleet.describe()
        reading = read_hold(target.tags, run.now(), run.config.max_hold_hours)
        hold, warnings = reading.hold, reading.problems
        if reading.ended is not None:
            ended, notices, said = _end_hold(run, target, reading.ended)
            warnings += said
        ends = (reading.last_ended, reading.ended and reading.ended.until)
        window_end = run.config.last_window_end(target.launch_time, run.now())
        explained = max((end for end in (*ends, window_end) if end), default=None)
        metrics = partial(_metrics_idle, run, target)
        judged = judge(run.config, target, hold, run.now(), backend=lambda: _read_activity(run), metrics=metrics)
        problem = judged.activity.problem if isinstance(judged.activity, Activity) else None
        warnings += (*judged.warnings, *some(problem))
        outcome = carry_out(run, target, judged.verdict)
        warnings += (*outcome.warnings, *_keep_record(run, target, judged.record))
    except OutOfTimeError as error:
        outcome = Outcome(Decision.KEEP, failure=error)
        late = f"out of time before {error.step} ({error.brief}); the next check decides again"
        if judged is None:
            judged = Judgement(Verdict(Decision.KEEP, late, Signal.DEADLINE))
        else:
            outcome = outcome._replace(note=f", but {late}", signal=Signal.DEADLINE)
    checked = TargetResult(target, judged.verdict, outcome, judged.activity, None, judged.stuck_busy,
                           judged.busy_since, explained)  # fmt: skip
    return Done(Action.CHECK_IDLE, (checked,), hold=hold, ended=ended, warnings=warnings, notices=notices)


def carry_out(run: Run, target: InstanceInfo, verdict: Verdict) -> Outcome:
    """Make the verdict so: a start (keep-warm, held running) or a stop; a stop that the backend's activity decided
    waits for its drain, and a drained backend whose stop then fails is told to resume work."""
    config = run.config
    match verdict.decision:
        case Decision.START:
            return start_unless_dry_run(run, target)
        case Decision.STOP if config.drain_path and verdict.signal is Signal.ACTIVITY and not config.dry_run:
            url = f"{config.backend_base_url}{config.drain_path}"
            try:
                drain(url, config.http_timeout_seconds, run.deadline, keep=reserve("drain", config))
            except NotDrainedError as refused:  # a drain it may have begun all the same is undone before it keeps
                undone = f"; {undrain(url, config.http_timeout_seconds, run.deadline)}" if refused.maybe_drained else ""
                return Outcome(Decision.KEEP, note=f", but {refused}{undone}")
            try:
                return stop_unless_dry_run(run, target)._replace(drained=True)
            except (AwsError, OutOfTimeError) as error:  # the backend refuses all work now: tell it to resume
                resumed = undrain(url, config.http_timeout_seconds, run.deadline) if _not_sent(error) else LEFT_DRAINED
                note = f"; drained, but StopInstances failed: {error.message} {resumed}"
                return Outcome(Decision.KEEP, note=note, drained=True, failure=error)
        case Decision.STOP:
            return stop_unless_dry_run(run, target)
    return Outcome(verdict.decision)


def _read_activity(run: Run) -> Activity | ActivityUnknown:
    url = f"{run.config.backend_base_url}{run.config.last_activity_path}"
    seconds = run.deadline.grant_backend(f"GET {url}", run.config.http_timeout_seconds, reserve("activity", run.config))
    return fetch_activity(url, seconds, run.deadline.clock)


def _metrics_idle(run: Run, target: InstanceInfo, seconds: int, not_before: datetime) -> tuple[bool, str]:
    """Whether the instance's own metrics were idle over the last `seconds`, from `not_before` on (the launch, or
    when its backend began to be busy), on its scale (one busy vCPU of any count is not idle), in one GetMetricData
    call; and the evidence."""
    assert target.vcpus is not None  # noqa: S101 - judge() checks it first
    now = run.now()
    since, until = metric_window(now, seconds)
    samples = instance_metrics(run.config.region, target.instance_id, since, now, run.deadline)
    cpu_limit = min(run.config.idle_cpu_percent, ONE_BUSY_VCPU_PERCENT / target.vcpus)
    network_limit = run.config.idle_network_kb * 1024
    began = "the launch" if not_before == target.launch_time else "the busy span"
    return judge_metrics(samples, since, until, cpu_limit, network_limit, not_before=not_before, began=began)


def _end_hold(run: Run, target: InstanceInfo, ended: Hold) -> tuple[Hold | None, tuple[Notice, ...], tuple[str, ...]]:
    """A hold whose end has passed: say so once, and end it in one call (forget_hold). The usual rules apply.
    Returns the hold it ended, the notice of it, and a warning where it could not."""
    if run.config.dry_run:
        return None, (), (f"The hold ({ended.text()}) has ended; in dry run its tags are left in place.",)
    try:
        forget_hold(run.fleet, target, ended, ended.until)
    except AwsError as error:
        return None, (), (f"The hold ({ended.text()}) has ended, but its tags stay: {error.message}",)
    text = f"The hold on instance {target.instance_id} ({ended.text()}) has ended; the usual rules apply again."
    attributes = {"action": Action.CHECK_IDLE.value, "decision": "hold_ended"}
    return ended, (Notice(f"Backend {target.instance_id} hold ended", text, attributes),), ()


def _keep_record(run: Run, target: InstanceInfo, record: Mapping[str, str | None]) -> tuple[str, ...]:
    """Write (or delete) the tags of the function's own record of a busy span, after the verdict is carried out: one
    CreateTags or one DeleteTags, none when nothing changed or in dry run. A failure is a warning, never a decision."""
    writes = {key: value for key, value in record.items() if value is not None}
    deletes = [key for key, value in record.items() if value is None]
    if run.config.dry_run or not (writes or deletes):
        return ()
    try:
        if writes:
            run.fleet.tag(target, writes)
        if deletes:
            run.fleet.untag(target, *deletes)
    except (AwsError, OutOfTimeError) as error:
        return (f"The record of when the backend began to be busy ({BUSY_SINCE_TAG}) was not kept: {error.message}",)
    return ()


def _not_sent(error: OrchestratorError) -> bool:
    """Whether a failed call certainly changed nothing: AWS refused it, or it was never made. A call that got no
    answer (aws_unreachable: cut off, timed out) may still have reached AWS."""
    return not isinstance(error, AwsUnreachableError)
