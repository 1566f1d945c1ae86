"""The time budget: the clock, one deadline per invocation, what each step must leave for the steps after it, and each
action's worst and least cases, computed from the same numbers the code waits with.

Lambda kills a function at its timeout with no log line and no answer, so every wait (AWS calls with their retries,
backend requests, sleeps) is given only the time that fits before the deadline; a whole first attempt of each call
when that fits, else one short attempt of each (a short timeout), else timeout_too_short."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, NamedTuple, TypeVar, cast

from orchestrator.errors import OutOfTimeError
from orchestrator.settings import Config
from orchestrator.values import short
from orchestrator.words import Action

ANSWER_MARGIN_SECONDS: Final = 2.0  # kept back from the context's remaining time, to log and answer (at most)
ANSWER_MARGIN_SHARE: Final = 0.2  # of a shorter invocation's time: 0.6 s of Lambda's default 3 s
DEFAULT_REMAINING_MS: Final = 60_000  # invoked without a Lambda context (local use)
STOPPING_POLL_SECONDS: Final = 3.0
HEALTH_TIMEOUT_SECONDS: Final = 2.0  # status answers the app's wake loop: a slow probe is a slow wake
AWS_CONNECT_TIMEOUT_SECONDS: Final = 2
AWS_READ_TIMEOUT_SECONDS: Final = 5
AWS_MAX_ATTEMPTS: Final = 3
# The least time an AWS call is attempted with: an EC2 or CloudWatch call from Lambda takes about a tenth of a second
# (178 ms for three at 128 MB, cold: docs/deploy.md), so a short timeout still gets one attempt of what is left.
AWS_MIN_ATTEMPT_SECONDS: Final = 0.4
# botocore's standard retry mode sleeps rand(0, 1) * min(2**i, 20) s before retry i + 1 (1 s scale for
# throttling), raised by an x-amz-retry-after header by at most 5 s more (botocore/retries/standard.py).
AWS_BACKOFF_CAP_SECONDS: Final = 20
AWS_RETRY_AFTER_EXTRA_SECONDS: Final = 5
MIN_BACKEND_SECONDS: Final = 1.0  # a backend request given less than this is not worth making
MIN_UNDRAIN_SECONDS: Final = 0.1  # but "resume work" is: a backend not told waits out its whole drain lease
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Clock:
    """Wall time for decisions, monotonic time for deadlines, and sleep: injected, so tests never wait."""

    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def answer_margin(seconds: float) -> float:
    """What an invocation of `seconds` keeps back to log and answer: ANSWER_MARGIN_SECONDS, or a fifth of a shorter
    one's time (Lambda's default 3 s keeps 0.6 s; the answer itself takes milliseconds: make bench)."""
    return min(ANSWER_MARGIN_SECONDS, seconds * ANSWER_MARGIN_SHARE)


class Reserve(NamedTuple):
    """What the calls after a step need: `full`, a whole first attempt each (the timeouts of docs/deploy.md), and
    `least`, one short attempt each (AWS_MIN_ATTEMPT_SECONDS, the shortest backend request)."""

    full: float
    least: float


NOTHING_AFTER: Final = Reserve(0.0, 0.0)


@dataclass(frozen=True)
class Deadline:
    """When the invocation must have answered: the context's remaining time less its answer_margin().

    Lambda kills a function at its timeout with no log line and no answer, so every wait (EC2 calls with
    their retries, backend requests, sleeps) is given only the time that fits before this deadline."""

    at: float
    clock: Clock
    whole: float = DEFAULT_REMAINING_MS / 1000  # the context's remaining time when the invocation began
    warning: str | None = None  # the context could not say how much time is left

    @classmethod
    def from_context(cls, context: object, clock: Clock) -> Deadline:
        """The context's remaining time; without a context (local use), or from one that cannot say, the default."""
        remaining_ms: object = DEFAULT_REMAINING_MS
        try:
            if hasattr(context, "get_remaining_time_in_millis"):
                remaining_ms = context.get_remaining_time_in_millis()
        except Exception as error:  # noqa: BLE001 - the runtime's object: whatever it raises, the time is unknown
            remaining_ms = error
        is_number = isinstance(remaining_ms, int | float) and not isinstance(remaining_ms, bool)
        seconds = max(min(remaining_ms, 1e9), 0) / 1000 if is_number else math.nan  # type: ignore[call-overload]
        warning = None
        if not math.isfinite(seconds):
            warning = (
                f"The Lambda context's get_remaining_time_in_millis() gave {short(remaining_ms)}, not a number: "
                f"assumed {DEFAULT_REMAINING_MS // 1000} s. Invoke the handler with the runtime's context."
            )
            seconds = DEFAULT_REMAINING_MS / 1000
        return cls(clock.monotonic() + seconds - answer_margin(seconds), clock, seconds, warning)

    @property
    def budget(self) -> float:
        """The whole time the invocation may spend before it answers."""
        return self.whole - answer_margin(self.whole)

    def left(self) -> float:
        return self.at - self.clock.monotonic()

    def keep(self, reserve: Reserve, needed: float = 0.0) -> float:
        """What to set aside for the calls after a step that needs `needed` itself: a whole first attempt each when
        that still fits, else one short attempt each (a short timeout: no retries, but every call is made)."""
        return reserve.full if self.left() - reserve.full >= needed else reserve.least

    def grant_backend(
        self, step: str, wanted: float, keep: Reserve = NOTHING_AFTER, least: float = MIN_BACKEND_SECONDS
    ) -> float:
        """The seconds a backend request may take: `wanted`, cut to what is left once `keep` is set aside for
        the calls after it. OutOfTimeError if that is below `least` (or `wanted`, if smaller)."""
        needed = min(least, wanted)
        kept = self.keep(keep, needed)
        granted = min(wanted, self.left() - kept)
        if granted < needed:
            raise OutOfTimeError(step, self.left() - kept, needed)
        return granted


def aws_call_seconds(attempts: int) -> float:
    """The longest one AWS API call can take with this many attempts: each attempt's connect and read
    timeouts, and botocore's longest backoff before each retry."""
    backoff = sum(
        min(2.0**retry, AWS_BACKOFF_CAP_SECONDS) + AWS_RETRY_AFTER_EXTRA_SECONDS for retry in range(attempts - 1)
    )
    return attempts * (AWS_CONNECT_TIMEOUT_SECONDS + AWS_READ_TIMEOUT_SECONDS) + backoff


def stop_calls(config: Config) -> int:
    """The calls that remove an instance once its backend drained: StopInstances, and one more for a refused
    hibernation; in a group, SetInstanceProtection for a refused drain and for those to remove, then
    SetDesiredCapacity."""
    return len(_calls(config).stop)


def stop_seconds(config: Config, attempt: float | None = None) -> float:
    """What a stop may take at the least: its stop_calls(), each a whole first attempt, or `attempt` seconds."""
    return (aws_call_seconds(1) if attempt is None else attempt) * stop_calls(config)


def reserve(step: str, config: Config) -> Reserve:
    """The time budget's one owner: what must still be left after `step` for the calls that may follow it, with a
    whole first attempt each and with one short attempt each. A backend request is granted only what leaves this
    (Deadline.grant_backend); an AWS call takes the attempts that fit (aws_call)."""
    least_read = min(MIN_BACKEND_SECONDS, config.http_timeout_seconds)
    match step:
        case "activity":  # GetMetricData (fallback on) and the stop; or the shortest drain and the whole stop
            protect = 1 if config.auto_scaling_group_name else 0  # a group's kept instances, protected first
            calls = (1 if config.idle_cpu_percent > 0 else 0) + protect + stop_calls(config)
            drain = (least_read + stop_seconds(config), least_read + stop_seconds(config, AWS_MIN_ATTEMPT_SECONDS))
            full, least = calls * aws_call_seconds(1), calls * AWS_MIN_ATTEMPT_SECONDS
            return Reserve(max(full, drain[0]), max(least, drain[1])) if config.drain_path else Reserve(full, least)
        case "drain":  # the whole stop: a drained backend must not be left without it
            return Reserve(stop_seconds(config), stop_seconds(config, AWS_MIN_ATTEMPT_SECONDS))
        case "wait_for_stopped":  # the wait itself, then a Describe and a StartInstances
            poll = STOPPING_POLL_SECONDS
            return Reserve(poll + 2 * aws_call_seconds(1), poll + 2 * AWS_MIN_ATTEMPT_SECONDS)
    raise ValueError(f"no reserve for {step}")


def longest_path(action: Action, config: Config, attempts: int = AWS_MAX_ATTEMPTS) -> list[tuple[str, float]]:
    """The steps of `action`'s longest path, each with the most it may take when every AWS call makes `attempts`
    attempts and every backend request takes its whole time; the deadline then cuts the sum to the function's
    timeout. For docs/deploy.md's time bounds table (make bench prints it) and preflight's timeout check."""
    call, backend = aws_call_seconds(attempts), config.http_timeout_seconds
    calls = _calls(config)
    stop, empty = [(name, call) for name in calls.stop], [(name, call) for name in calls.empty]
    notice = [("Publish (SNS)", call)] if config.notify_topic_arn else []
    describe = [(calls.describe, call)]
    match action:
        case Action.START:  # a stop in progress is waited out for as long as the deadline lets it
            waits = (
                []
                if config.auto_scaling_group_name
                else [(f"{STOPPING_POLL_SECONDS:g} s waits and Describes", math.inf)]
            )
            return [*describe, *waits, (calls.start, call), *notice]
        case Action.STATUS:
            return [*describe, ("GET the health path", min(HEALTH_TIMEOUT_SECONDS, backend))]
        case Action.CHECK_IDLE:  # the hold's tags for an ended hold, then CloudWatch (the backend cannot say) and the
            # stop; or the drain, the stop, the drain's DELETE (a stop that failed) and the busy-since records; notices
            protect = [("SetInstanceProtection (the kept)", call)] if config.auto_scaling_group_name else []
            fallback = [("GetMetricData", call), *protect, *stop] if config.idle_cpu_percent > 0 else [*protect, *stop]
            drained = [("POST the drain", backend), *stop, ("DELETE the drain", backend)] if config.drain_path else stop
            said = [*protect, *drained, *((name, call) for name in calls.records)]
            then = said if sum(s for _, s in said) > sum(s for _, s in fallback) else fallback
            read = [*describe, *((name, call) for name in calls.members), (f"{calls.tags} (a hold ended)", call)]
            return [*read, ("GET the activity path", backend), *then, *notice, *notice]
        case Action.STOP:
            return [*describe, *notice] if config.dry_run else [*describe, *empty, *notice]
        case Action.HOLD:  # then starts or stops the fleet to match
            moves = empty if len(empty) > 1 else [(f"{calls.start} or {calls.empty[0]}", call)]
            return [*describe, (calls.tag, call), *moves, *notice]
        case Action.RELEASE:
            return [*describe, (calls.tags, call), *notice]
        case Action.PREFLIGHT:  # with "notify": true, SNS too
            gets = [("GET the health path", min(HEALTH_TIMEOUT_SECONDS, backend)), ("GET the activity path", backend)]
            checks = [(name, call * count) for name, count in calls.checks]
            return [*describe, *checks, ("2 GetMetricData", 2 * call), *notice, *gets]


class _Calls(NamedTuple):
    """The AWS calls of each step, by the fleet's kind."""

    describe: str
    shrink: str
    members: tuple[str, ...]  # check_idle: the instances of a group
    start: str
    stop: tuple[str, ...]  # check_idle's removal
    empty: tuple[str, ...]  # an operator's stop
    tag: str
    tags: str
    records: tuple[str, ...]  # the busy-since records
    checks: tuple[tuple[str, int], ...]  # preflight's


def _calls(config: Config) -> _Calls:
    if config.auto_scaling_group_name:
        protection = "SetInstanceProtection"
        return _Calls(
            describe="DescribeAutoScalingGroups", shrink="SetDesiredCapacity", members=("DescribeInstances",),
            start="SetDesiredCapacity", stop=(f"{protection} (a refused drain)", f"{protection} (the removed)",
            "SetDesiredCapacity"), empty=(protection, "SetDesiredCapacity"), tag="CreateOrUpdateTags",
            tags="CreateOrUpdateTags or DeleteTags",
            records=("CreateOrUpdateTags (busy-since)", "DeleteTags (busy-since)"),
            checks=(("DescribeInstances", 1), ("DescribePolicies", 1)),
        )  # fmt: skip
    stop = ("StopInstances", *(("StopInstances without hibernation",) if config.stop_hibernate else ()))
    return _Calls(
        describe="DescribeInstances",
        shrink="StopInstances",
        members=(),
        start="StartInstances",
        stop=stop,
        empty=stop,
        tag="CreateTags",
        tags="CreateTags or DeleteTags",
        records=("CreateTags or DeleteTags (busy-since)",),
        checks=(("4 DryRuns", 4),),
    )


def least_path(action: Action, config: Config) -> list[tuple[str, float]]:
    """The steps `action` cannot do without, each at the least it is attempted with (one short attempt of an AWS call,
    the shortest backend request). An invocation whose whole time cannot hold them answers timeout_too_short."""
    call, read = AWS_MIN_ATTEMPT_SECONDS, min(MIN_BACKEND_SECONDS, config.http_timeout_seconds)
    calls = _calls(config)
    describe = [(calls.describe, call)]
    empty = [(name, call) for name in calls.empty]
    match action:
        case Action.START:
            return [*describe, (calls.start, call)]
        case Action.CHECK_IDLE:  # then CloudWatch and the stop, or the drain and the stop
            then = (f"GetMetricData or the drain, and {calls.shrink}", reserve("activity", config).least)
            return [*describe, *((name, call) for name in calls.members), ("GET the activity path", read), then]
        case Action.STOP:
            return describe + ([] if config.dry_run else empty)
        case Action.HOLD:
            return [*describe, (calls.tag, call), *empty]
        case Action.RELEASE:
            return [*describe, (calls.tags, call)]
    return describe  # status and preflight answer what they could not learn


def shortest_timeout(action: Action, config: Config) -> float:
    """The shortest function timeout, to a tenth of a second up, whose time less its answer_margin() holds
    least_path(action): below it the action answers timeout_too_short."""
    return _timeout_for(sum(seconds for _, seconds in least_path(action, config)))


def _timeout_for(needed: float) -> float:
    """The shortest timeout, to a tenth of a second up, whose time less its answer_margin() is `needed`."""
    whole = min(needed / (1 - ANSWER_MARGIN_SHARE), needed + ANSWER_MARGIN_SECONDS)
    return math.ceil(whole * 10 - 1e-9) / 10


def whole_attempts_timeout(action: Action, config: Config) -> float:
    """The shortest function timeout at which each call of `action`'s longest path gets a whole first attempt."""
    needed = sum(seconds for _, seconds in longest_path(action, config, 1) if math.isfinite(seconds))
    return _timeout_for(needed)


def shortest_check_seconds(config: Config) -> float:
    """The shortest function timeout at which check_idle reaches a decision when AWS and the backend answer at once."""
    return shortest_timeout(Action.CHECK_IDLE, config)


def within(seconds: float, work: Callable[[], T], what: str) -> T:
    """`work()` on a worker thread, waited for at most `seconds`: botocore's timeouts bound each connect and
    read, but not the lookup of the endpoint's name, nor an answer that trickles in. A call still running
    then is left to finish on its own (it changes nothing the next invocation does not see again)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, which raises it
            failure.append(error)

    worker = threading.Thread(target=run, name=f"{threading.current_thread().name}: {what}", daemon=True)
    worker.start()
    worker.join(max(seconds, 0.0))
    if failure:
        raise failure[0]
    if not result:
        raise TimeoutError(f"{what} did not end within {seconds:.0f}s")
    return result[0]


def concurrently(work: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """work(item) for every item at once, a thread each (none for one item), in the items' order; the first failure
    is raised once all have ended. Each work is bounded by the deadline's grants, so the wait is too."""
    if len(items) <= 1:
        return [work(item) for item in items]
    results: list[R | None] = [None] * len(items)
    failures: list[BaseException] = []

    def run(index: int, item: T) -> None:
        try:
            results[index] = work(item)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, which raises it
            failures.append(error)

    threads = [threading.Thread(target=run, args=(n, item), daemon=True) for n, item in enumerate(items)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return cast(list[R], results)
