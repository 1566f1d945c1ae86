"""The pure decision: plain values in, a verdict and its reason out, imported by the actions and importing nothing
that does I/O. judge() holds check_idle's rules (the README's) on one screen, in order; the backend's answer and
the instance's metrics are given as readings, asked only when a rule needs them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, NamedTuple

from orchestrator.activity import Activity, ActivityUnknown
from orchestrator.errors import AwsError, OutOfTimeError
from orchestrator.holds import Hold
from orchestrator.settings import Config
from orchestrator.targets import InstanceInfo
from orchestrator.values import aware_time, duration
from orchestrator.words import BUSY_SINCE_TAG, Decision, Signal

METRIC_PERIOD_SECONDS: Final = 300  # EC2's basic monitoring period; detailed monitoring's minutes add up to it
METRICS_DELAY_SECONDS: Final = 600  # EC2 publishes a period's datapoint minutes after the period ends
# CPUUtilization averages all vCPUs: one vCPU at full load reads 100 / vCPUs %. Half of that is the most an
# idle instance may show, so that one busy vCPU keeps an instance of any size (64 vCPUs: 0.78 %).
ONE_BUSY_VCPU_PERCENT: Final = 50.0
ACTIVITY: Final = Signal.ACTIVITY


class Verdict(NamedTuple):
    """What a rule decided, why, and which rule it was."""

    decision: Decision
    reason: str
    signal: Signal
    idle_seconds: float | None = None


class Judgement(NamedTuple):
    """What judge() found, besides the verdict: what the backend said, a stuck busy flag, and the busy span."""

    verdict: Verdict
    activity: Activity | ActivityUnknown | None = None
    stuck_busy: bool = False
    warnings: tuple[str, ...] = ()
    busy_since: datetime | None = None  # when the busy backend began to be busy, as far as the function knows
    record: Mapping[str, str | None] = {}  # the instance's tags to write (None: delete) to keep that record


Reading = Callable[[], Activity | ActivityUnknown]  # what the backend says, asked only if a rule needs it
# Whether the metrics were idle over the last N seconds, periods that began before a time counting as missing; and why.
MetricsReading = Callable[[int, datetime], tuple[bool, str]]


def decide(
    launch_time: datetime, activity: Activity | ActivityUnknown, now: datetime, idle_timeout_seconds: int
) -> Verdict:
    """For a running instance: stop only if its backend is known to be idle past the timeout."""
    if isinstance(activity, ActivityUnknown):
        return Verdict(
            Decision.KEEP, f"backend activity unknown ({activity.reason}); never stop on missing information", ACTIVITY
        )
    if activity.busy_reason:
        return Verdict(Decision.KEEP, f"backend is busy ({activity.busy_reason})", ACTIVITY, activity.idle_seconds)
    if activity.idle_seconds is None:
        return Verdict(Decision.KEEP, "backend reported no idle time", ACTIVITY)
    # A freshly started instance gets a full timeout even if the backend remembers older activity.
    uptime_seconds = max(0.0, (now - launch_time).total_seconds())
    idle_seconds = min(activity.idle_seconds, uptime_seconds)
    over = idle_seconds > idle_timeout_seconds
    reason = f"idle for {duration(idle_seconds)}, {'over' if over else 'within'} the {idle_timeout_seconds}s timeout"
    return Verdict(Decision.STOP if over else Decision.KEEP, reason, ACTIVITY, idle_seconds)


def kept_up(state: str, why: str, signal: Signal, started: str = "started") -> Verdict:
    """Held running or in a keep-warm window: keep a running instance whatever its backend says, start a stopped
    one, and wait for one that is stopping."""
    if state in ("running", "pending"):
        return Verdict(Decision.KEEP, why, signal)
    if state == "stopped":
        return Verdict(Decision.START, f"stopped, {why}: {started}", signal)
    return Verdict(Decision.SKIP, f"instance is {state}, {why}: nothing to do until it is stopped", signal)


class MetricSamples(NamedTuple):
    """The instance's AWS/EC2 datapoints, as (timestamp, value): CPU maximum in %, network in and out in bytes."""

    cpu: list[tuple[datetime, float]]
    network_in: list[tuple[datetime, float]]
    network_out: list[tuple[datetime, float]]


def metric_window(now: datetime, idle_timeout_seconds: int) -> tuple[datetime, datetime]:
    """The whole 5-minute periods to judge: as many as cover the idle timeout, ending METRICS_DELAY_SECONDS
    before now at a period boundary, so that EC2 has published them (its metrics arrive minutes late)."""
    period = METRIC_PERIOD_SECONDS
    until = datetime.fromtimestamp((now.timestamp() - METRICS_DELAY_SECONDS) // period * period, UTC)
    return until - timedelta(seconds=math.ceil(idle_timeout_seconds / period) * period), until


def judge_metrics(
    samples: MetricSamples,
    since: datetime,
    until: datetime,
    cpu_limit: float,
    network_limit_bytes: float,
    *,
    not_before: datetime,
    began: str = "the launch",
) -> tuple[bool, str]:
    """Idle by the instance's own metrics: every period of [since, until) has CPU and network data from `not_before`
    on, and no period since `since` (later ones too, where already published) reached either limit.

    A period that began before `not_before` counts as missing, and so does a value that is not a finite number: before
    the launch, it holds the previous run's data, idle since that run was stopped for it; before a busy span (the
    stuck-busy watch), it holds what the backend did before that work began."""
    first = max(0, math.ceil((not_before - since).total_seconds() / METRIC_PERIOD_SECONDS))  # within the span

    def by_period(points: list[tuple[datetime, float]], combine: Callable[[float, float], float]) -> dict[int, float]:
        periods: dict[int, float] = {}
        for when, value in points:  # CloudWatch stamps a period's since; bucket by time anyway
            index = int((when - since).total_seconds() // METRIC_PERIOD_SECONDS)
            if index >= first and math.isfinite(value):
                periods[index] = combine(periods[index], value) if index in periods else value
        return periods

    cpu = by_period(samples.cpu, max)
    network_in = by_period(samples.network_in, lambda a, b: a + b)
    network_out = by_period(samples.network_out, lambda a, b: a + b)
    network = {i: network_in.get(i, 0.0) + network_out.get(i, 0.0) for i in network_in.keys() | network_out.keys()}
    expected = int((until - since).total_seconds() // METRIC_PERIOD_SECONDS)
    span = f"{since:%H:%M}-{until:%H:%M} UTC"
    missing = [i for i in range(expected) if i not in cpu or i not in network_in or i not in network_out]
    if missing:
        before = f"; {min(first, expected)} began before {began} at {not_before:%H:%M:%S} UTC" if first else ""
        lacking = f"CloudWatch has no CPU or network data for {len(missing)} of the {expected} periods"
        return False, f"{lacking} of {span}{before}"
    cpu_max, network_max = max(cpu.values()), max(network.values())
    if cpu_max >= cpu_limit:
        return False, f"CPU max {cpu_max:.1f}% >= {cpu_limit:g}% since {since:%H:%M} UTC"
    if network_max >= network_limit_bytes:
        return False, f"network {network_max / 1024:.0f} KB in 5 min >= {network_limit_bytes / 1024:.0f} KB"
    return True, (
        f"CPU max {cpu_max:.1f}% < {cpu_limit:g}%, network at most {network_max / 1024:.0f} KB per 5 min "
        f"over {expected * METRIC_PERIOD_SECONDS // 60} min ({span})"
    )


def judge(
    config: Config, info: InstanceInfo, hold: Hold | None, now: datetime, *, backend: Reading, metrics: MetricsReading
) -> Judgement:
    """The README's rules, in order, for one instance: the first that applies decides (keeping, then judge_running)."""
    kept = keeping(config, info.state, hold, now)
    return Judgement(kept) if kept is not None else judge_running(config, info, now, backend=backend, metrics=metrics)


def keeping(config: Config, state: str, hold: Hold | None, now: datetime) -> Verdict | None:
    """The rules that keep a fleet up whatever its backends say: held running, or inside a keep-warm window (a group
    keeps at least one instance then, and its other instances follow judge_running). None when neither applies."""
    if hold is not None and hold.state == "running":
        return kept_up(state, hold.text(), Signal.HOLD)
    window = config.open_window(now)
    if window is not None and hold is not None and state == "stopped":
        return Verdict(Decision.SKIP, f"stopped, {hold.text()}: no keep-warm window starts it", Signal.HOLD)
    if window is not None:  # working hours: never stop, and start a stopped instance
        why, started = f"inside the keep-warm window {window.text!r}", "started so that it is warm when people arrive"
        return kept_up(state, why, Signal.KEEP_WARM, started)
    return None


def judge_running(
    config: Config, info: InstanceInfo, now: datetime, *, backend: Reading, metrics: MetricsReading
) -> Judgement:
    """The rules for a running instance: `backend()` reads its activity endpoint and `metrics(seconds, not_before)`
    its CloudWatch metrics over the last `seconds` (periods that began before `not_before` count as missing), each
    only if a rule needs it."""
    if info.state != "running":
        return Judgement(Verdict(Decision.SKIP, f"instance is {info.state}, not running", Signal.STATE))
    activity = backend()
    uptime_seconds = (now - info.launch_time).total_seconds()
    if isinstance(activity, ActivityUnknown) and config.idle_cpu_percent > 0:  # the second signal
        unreachable = f"backend unreachable ({activity.reason})"
        if uptime_seconds <= config.idle_timeout_seconds:
            up = f"up {duration(max(uptime_seconds, 0))}, within the {config.idle_timeout_seconds}s timeout"
            return Judgement(Verdict(Decision.KEEP, f"{unreachable}; {up}", ACTIVITY), activity)
        if info.vcpus is None:
            reason = "DescribeInstances gave no CpuOptions, so one busy vCPU cannot be told from an idle instance"
            return Judgement(Verdict(Decision.KEEP, f"{unreachable}; {reason}", Signal.CLOUDWATCH), activity)
        try:
            idle, evidence = metrics(config.idle_timeout_seconds, info.launch_time)
        except AwsError as error:
            idle, evidence = False, f"CloudWatch could not be read: {error.message}"
        decision = Decision.STOP if idle else Decision.KEEP
        return Judgement(Verdict(decision, f"{unreachable}; {evidence}", Signal.CLOUDWATCH), activity)
    verdict = decide(info.launch_time, activity, now, config.idle_timeout_seconds)
    if isinstance(activity, ActivityUnknown):
        return Judgement(verdict, activity)
    if activity.busy_reason is None:  # not busy: the function's record of a busy span ends, if it kept one
        return Judgement(verdict, activity, record={BUSY_SINCE_TAG: None} if BUSY_SINCE_TAG in info.tags else {})
    since, record = busy_since(activity, info, now)
    busy_for = (now - since).total_seconds()
    watched = 0 < config.stuck_busy_seconds < busy_for and config.idle_cpu_percent > 0 and info.vcpus
    judged = _stuck_busy(config, verdict, activity, since, metrics) if watched else Judgement(verdict, activity)
    return judged._replace(busy_since=since, record=record)


def busy_since(activity: Activity, info: InstanceInfo, now: datetime) -> tuple[datetime, dict[str, str | None]]:
    """When the backend began to be busy (this run at the earliest), and the record to write of it: what the backend
    says (busy_since); else the function's own record (the busy-since tag) of this run; else now, written down."""
    if activity.busy_since is not None:
        return max(activity.busy_since, info.launch_time), {}
    recorded = aware_time(info.tags.get(BUSY_SINCE_TAG, ""))
    if recorded is not None and info.launch_time <= recorded <= now:
        return recorded, {}
    return now, {BUSY_SINCE_TAG: now.isoformat()}  # seen busy for the first time this run


def _stuck_busy(
    config: Config, verdict: Verdict, activity: Activity, since: datetime, metrics: MetricsReading
) -> Judgement:
    """Busy without a break for longer than STUCK_BUSY_SECONDS: the metrics of that busy span only, judged as the
    second signal is. Idle all along means a busy flag that never clears: WARNING and StuckBusy, and a stop with
    STOP_STUCK_BUSY."""
    try:
        idle, evidence = metrics(config.stuck_busy_seconds, since)
    except (AwsError, OutOfTimeError) as error:
        return Judgement(
            verdict, activity, warnings=(f"The stuck-busy watch could not read CloudWatch: {error.message}",)
        )
    if not idle:
        return Judgement(verdict, activity)
    busy = f"{verdict.reason} since {since:%Y-%m-%d %H:%M} UTC"
    reason = f"{busy}, but its metrics say idle ({evidence}): the busy flag may be stuck"
    if config.stop_stuck_busy:
        stopped = Verdict(
            Decision.STOP, f"{reason}; stopped (STOP_STUCK_BUSY=true)", Signal.STUCK_BUSY, verdict.idle_seconds
        )
        return Judgement(stopped, activity, stuck_busy=True)
    kept = f"{reason}; kept (a busy backend is stopped only with STOP_STUCK_BUSY=true)"
    return Judgement(verdict._replace(reason=kept), activity, stuck_busy=True)


class Plan(NamedTuple):
    """What check_idle does with the instances it judged: each one kept or removed, with its verdict."""

    kept: tuple[tuple[InstanceInfo, Verdict], ...] = ()
    removed: tuple[tuple[InstanceInfo, Verdict], ...] = ()


def plan(judged: Sequence[tuple[InstanceInfo, Verdict]], floor: int = 0, why: Verdict | None = None) -> Plan:
    """Remove the instances judged stop, but keep at least `floor` of the judged ones: the most recently active of
    those judged stop stay, for `why` (a hold, a keep-warm window, a group's MinSize)."""
    kept = [(info, verdict) for info, verdict in judged if verdict.decision is not Decision.STOP]
    stops = sorted(
        ((info, verdict) for info, verdict in judged if verdict.decision is Decision.STOP),
        key=lambda pair: math.inf if pair[1].idle_seconds is None else pair[1].idle_seconds,
    )
    if why is not None and floor > len(kept):
        short = floor - len(kept)
        kept += [(info, verdict._replace(decision=Decision.KEEP, reason=f"{verdict.reason}; kept: {why.reason}",
                                         signal=why.signal)) for info, verdict in stops[:short]]  # fmt: skip
        stops = stops[short:]
    return Plan(tuple(kept), tuple(stops))
