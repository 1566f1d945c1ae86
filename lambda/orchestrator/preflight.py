"""Preflight: what is wrong with the deployment, before the first idle night. It checks without changing anything
(no start, stop, tag or drain; SNS only with "notify": true): each check within the deadline, the failure of one
never stopping the others."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Final, NamedTuple

from orchestrator.actions import Run
from orchestrator.activity import ActivityUnknown
from orchestrator.aws import IAM_ACTIONS, Notice, instance_metrics, metric_data, publish
from orchestrator.backend import fetch_activity, probe_health
from orchestrator.budget import (
    HEALTH_TIMEOUT_SECONDS,
    Deadline,
    concurrently,
    shortest_timeout,
    whole_attempts_timeout,
)
from orchestrator.errors import RECOMMENDED_TIMEOUT_SECONDS, AwsError, ConfigError, OrchestratorError, OutOfTimeError
from orchestrator.fleet import dry_run
from orchestrator.group import fleet_of, scaling_policies
from orchestrator.present import Answer
from orchestrator.settings import Settings
from orchestrator.targets import Described
from orchestrator.values import duration, some
from orchestrator.words import HOLD_TAG, Action


class Check(NamedTuple):
    check: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str | None = None


def preflight(settings: Settings, deadline: Deadline, fields: Mapping[str, Any]) -> Answer:
    """Check the deployment without changing anything (no start, stop, tag or drain; SNS only with "notify": true).
    Each check runs within the deadline, and the failure of one never stops the others: a bad variable fails the
    checks that need it, with its reason, and the others still answer."""
    whole_seconds = deadline.whole
    config, problems = settings.config, (*settings.problems, *some(settings.token.problem))
    bad_url = next((p.message for p in settings.problems if p.message.startswith("BACKEND_BASE_URL=")), None)
    if problems:
        checks = [Check("config", "fail", " | ".join(p.message for p in problems), "fix each variable named above")]
    else:
        checks = [Check("config", "ok", f"every variable is valid: {', '.join(settings.shown) or 'all defaults'}")]
    if config is None:
        skipped = "INSTANCE_ID (or AUTO_SCALING_GROUP_NAME) is missing or bad: fix it and run preflight again"
        checks += [Check(name, "skip", skipped) for name in PREFLIGHT_CHECKS[1:]]
    else:
        run = Run(config, deadline, fleet_of(config, deadline), fields)
        names = GROUP_CHECKS if config.auto_scaling_group_name else PREFLIGHT_CHECKS
        described: Described | None = None
        try:
            described = run.fleet.describe()
        except (OutOfTimeError, AwsError, ConfigError) as error:
            checks = [*checks, _failed(names[1], error)]
        checks += [
            _run_check(name, run, described, whole_seconds, bad_url) for name in names[2 if described is None else 1 :]
        ]
    failed = [check.check for check in checks if check.status == "fail"]
    counts = ", ".join(f"{sum(c.status == s for c in checks)} {s}" for s in ("ok", "warn", "fail", "skip"))
    return Answer(
        {"ok": not failed, "checks": [check._asdict() for check in checks], "message": f"preflight: {counts}"},
        level=logging.WARNING if failed else logging.INFO,
    )


PREFLIGHT_CHECKS: Final = (
    "config", "instance", "start_permission", "stop_permission", "tag_permission", "metrics", "schedule",
    "notifications", "backend_health", "activity_contract", "drain", "keep_warm", "timeout",
)  # fmt: skip
GROUP_CHECKS: Final = (
    "config", "group", "warm_pool", "scaling_policies", "permissions", "metrics", "schedule", "notifications",
    "backend_health", "activity_contract", "drain", "keep_warm", "timeout",
)  # fmt: skip
NEED_THE_FLEET: Final = frozenset({"start_permission", "stop_permission", "tag_permission", "metrics", "schedule",
                                   "warm_pool", "scaling_policies", "permissions"})  # fmt: skip
NEED_IT_RUNNING: Final = frozenset({"backend_health", "activity_contract"})


def _run_check(name: str, run: Run, described: Described | None, whole: float, bad_url: str | None) -> Check:
    """One check, given what the fleet's Describe said (None: it failed) and what is wrong with BACKEND_BASE_URL, if
    it is set but invalid; an AWS failure is that check's failure."""
    group = run.config.auto_scaling_group_name
    if name in NEED_IT_RUNNING and run.config.backend_base_url is None and not (group and name == "activity_contract"):
        unset = "BACKEND_BASE_URL is not set, so the backend cannot be asked"
        fix = "set BACKEND_BASE_URL to the backend's base URL as the function reaches it, e.g. http://10.0.1.50:8000"
        return Check(name, "fail", bad_url or unset, fix)
    kind = run.fleet.kind
    if described is None and name in NEED_THE_FLEET | NEED_IT_RUNNING:
        return Check(name, "skip", f"the {kind} could not be described: see the {kind} check")
    if described is not None and described.state != "running" and name in NEED_IT_RUNNING:
        return Check(name, "skip", f"the {kind} is {described.state}: start it and run preflight again")
    try:
        check = (GROUP_PREFLIGHT if group else {}).get(name) or PREFLIGHT[name]
        return check(run, described, whole)
    except (OutOfTimeError, AwsError, ConfigError) as error:
        return _failed(name, error)


def _failed(name: str, error: OrchestratorError) -> Check:
    if isinstance(error, OutOfTimeError):
        return Check(name, "skip", f"out of time ({error.brief})", "raise the function's timeout")
    fix = f"allow {error.details['iam_action']} to the function's role" if "iam_action" in error.details else None
    return Check(name, "fail", error.message, fix or "see the message")


def _instance_check(run: Run, described: Described, _: float) -> Check:
    [info] = described.instances
    monitoring = "detailed" if info.detailed_monitoring else "basic (5-minute averages hide shorter bursts)"
    detail = f"{info.state}, {info.instance_type}, {info.vcpus or '?'} vCPUs, monitoring {monitoring}"
    if run.config.stop_hibernate and not info.hibernation_configured:
        fix = "enable hibernation on the instance (only possible at launch) or set STOP_HIBERNATE=false"
        return Check("instance", "fail", f"{detail}; STOP_HIBERNATE=true but it is not configured to hibernate", fix)
    return Check("instance", "ok", detail)


def _allowed(name: str, run: Run, described: Described, operations: tuple[str, ...], **kwargs: Any) -> Check:
    for operation in operations:
        dry_run(run.config.region, operation, described.id, run.deadline, **kwargs)
    allowed = ", ".join(IAM_ACTIONS[o] for o in operations)
    return Check(name, "ok", f"{allowed} allowed (DryRun) on {described.id}")


def _metrics_check(run: Run, described: Described, _: float) -> Check:
    if run.config.idle_cpu_percent == 0:
        return Check("metrics", "skip", "the CloudWatch fallback is off (IDLE_CPU_PERCENT=0)")
    if not described.instances:
        return Check(
            "metrics", "skip", f"the {described.kind} has no instance to read: wake it and run preflight again"
        )
    launched = min(info.launch_time for info in described.instances)
    since = run.now() - timedelta(hours=1) if described.state == "running" else launched
    ids = [info.instance_id for info in described.instances]
    samples = instance_metrics(run.config.region, ids, since, since + timedelta(hours=1), run.deadline)
    points = sum(len(sample.cpu) for sample in samples.values())
    span = f"{since:%Y-%m-%d %H:%M}-{since + timedelta(hours=1):%H:%M} UTC"
    if points:
        return Check("metrics", "ok", f"GetMetricData allowed; {points} CPU datapoints for {span}")
    fix = "EC2 publishes minutes late; check the instance ran then, and the function's route to CloudWatch"
    return Check("metrics", "warn", f"GetMetricData allowed, but no CPU datapoints for {span}", fix)


def _schedule_check(run: Run, described: Described, _: float) -> Check:
    now, wanted = run.now(), {"checks": (dict([run.config.target]), "CheckIdleRequested", "Sum")}
    since, namespace, about = now - timedelta(days=1), run.config.metrics_namespace, described.label
    region, deadline = run.config.region, run.deadline
    found = metric_data(region, namespace, wanted, period=60, since=since, until=now, deadline=deadline, about=about)
    points = found["checks"]
    recent = sum(value for when, value in points if when >= now - timedelta(minutes=15))
    if recent:
        return Check("schedule", "ok", f"the schedule ran {recent:.0f} times in 15 minutes")
    rule = (
        'check that the EventBridge rule is enabled, targets this function, and has the input {"action": "check_idle"}'
    )
    if not points:  # no history at all: a function deployed less than 15 minutes ago looks the same
        return Check("schedule", "warn", "no check_idle has run in the last day (a new deployment?)", rule)
    return Check("schedule", "fail", "check_idle ran in the last day but not in the last 15 minutes", rule)


def _notifications_check(run: Run, _: Described | None, __: float) -> Check:
    topic, kind, instance_id = run.config.notify_topic_arn, run.fleet.kind, run.fleet.id
    if not topic:
        return Check("notifications", "skip", "NOTIFY_TOPIC_ARN is not set: no start or stop notices")
    if run.fields.get("notify") is not True:
        return Check("notifications", "skip", 'send a test message with {"action": "preflight", "notify": true}')
    text = f"A test message from the Backend Orchestrator's preflight for {kind} {instance_id}."
    notice = Notice(f"Backend {instance_id} preflight", text, {"action": "preflight", "decision": "test"})
    try:
        publish(topic, notice, run.deadline)
    except AwsError as error:
        return Check(
            "notifications",
            "fail",
            f"The notification was not published: {error.message}",
            f"allow sns:Publish on {topic}",
        )
    return Check("notifications", "ok", f"a test message was published to {topic}")


def _backend_check(run: Run, *_: Any) -> Check:
    url = run.config.require_backend_url(Action.PREFLIGHT) + run.config.health_path
    seconds = run.deadline.grant_backend(f"GET {url}", min(HEALTH_TIMEOUT_SECONDS, run.config.http_timeout_seconds))
    health = probe_health(url, seconds, run.deadline.clock)
    if health["healthy"]:
        return Check("backend_health", "ok", f"GET {url} answered HTTP {health['status_code']}")
    what = f"answered HTTP {health['status_code']}" if health["reachable"] else "could not be reached"
    fix = "check BACKEND_BASE_URL, the backend's security group and its process"
    return Check("backend_health", "fail", f"GET {url} {what}", fix)


def _activity_check(run: Run, *_: Any) -> Check:
    url = run.config.require_backend_url(Action.PREFLIGHT) + run.config.last_activity_path
    activity = fetch_activity(
        url, run.deadline.grant_backend(f"GET {url}", run.config.http_timeout_seconds), run.deadline.clock
    )
    if isinstance(activity, ActivityUnknown):
        fix = "answer the activity contract (docs/activity-contract.md); until then the backend is never stopped"
        return Check("activity_contract", "fail", activity.reason, fix)
    said = (
        f"busy: {activity.busy_reason}" if activity.busy_reason else f"idle for {duration(activity.idle_seconds or 0)}"
    )
    return Check("activity_contract", "ok", f"GET {url}: {said}")


def _drain_check(run: Run, *_: Any) -> Check:
    said = f"DRAIN_PATH={run.config.drain_path} is not called: a drain makes the backend refuse work for its lease"
    return Check("drain", "skip", said if run.config.drain_path else "DRAIN_PATH is not set: no drain before a stop")


def _keep_warm_check(run: Run, *_: Any) -> Check:
    config, now = run.config, run.now().replace(second=0, microsecond=0)
    if not config.keep_warm:
        return Check("keep_warm", "skip", "KEEP_WARM is not set: no keep-warm window")
    window = config.open_window(now)
    for minute in range(1, 8 * 24 * 60):  # the next change within a week and a day, minute by minute
        moment = now + timedelta(minutes=minute)
        if (config.open_window(moment) is None) != (window is None):
            changing = window or config.open_window(moment)
            assert changing is not None  # noqa: S101 - one side of the change is open
            when = f"{moment.astimezone(changing.zone):%a %Y-%m-%d %H:%M} {changing.zone}"
            said = (
                f"open now ({changing.text!r}), closes {when}"
                if window
                else f"closed now; {changing.text!r} opens {when}"
            )
            return Check("keep_warm", "ok", said)
    return Check("keep_warm", "ok", "open all week" if window else "no window opens within a week")


def _timeout_check(run: Run, _: Any, whole: float) -> Check:
    """What start and check_idle can do in the invocation's whole time: nothing, one attempt of each call, or whole
    first attempts and retries (the recommended 60 s; 90 s for a group, whose check_idle makes more calls)."""
    said, worst = [], "ok"
    for action in (Action.START, Action.CHECK_IDLE):
        shortest, retried = shortest_timeout(action, run.config), whole_attempts_timeout(action, run.config)
        if whole < shortest:
            said.append(f"{action} cannot run (it needs {shortest:g} s)")
            worst = "fail"
        elif whole < retried:
            said.append(f"{action} makes one attempt of each call, no retries (whole attempts need {retried:g} s)")
            worst = "warn" if worst == "ok" else worst
        else:
            said.append(f"{action} has whole first attempts, and retries where they fit")
    enough = max(RECOMMENDED_TIMEOUT_SECONDS, *(math.ceil(whole_attempts_timeout(a, run.config) / 30) * 30
                                                for a in (Action.START, Action.CHECK_IDLE)))  # fmt: skip
    fix = f"raise the function's Timeout to {enough} s" if worst != "ok" else None
    return Check("timeout", worst, f"the invocation had {whole:.1f} s: {'; '.join(said)}", fix)


# Each check after config: (run, what the fleet's Describe said, the invocation's whole time) -> Check.
PREFLIGHT: Final[dict[str, Callable[[Run, Any, float], Check]]] = {
    "instance": _instance_check,
    "start_permission": lambda run, described, _: _allowed("start_permission", run, described, ("StartInstances",)),
    "stop_permission": lambda run, described, _: _allowed(
        "stop_permission", run, described, ("StopInstances",), Hibernate=run.config.stop_hibernate
    ),
    "tag_permission": lambda run, described, _: _allowed(
        "tag_permission", run, described, ("CreateTags", "DeleteTags"), Tags=[{"Key": HOLD_TAG, "Value": "running"}]
    ),
    "metrics": _metrics_check,
    "schedule": _schedule_check,
    "notifications": _notifications_check,
    "backend_health": _backend_check,
    "activity_contract": _activity_check,
    "drain": _drain_check,
    "keep_warm": _keep_warm_check,
    "timeout": _timeout_check,
}


def _group_check(run: Run, described: Described, _: float) -> Check:
    group = described.group
    assert group is not None  # noqa: S101 - a group's describe says it
    detail = (f"desired capacity {group.desired_capacity} (MinSize {group.min_size}, MaxSize {group.max_size}), "
              f"{group.in_service} in service")  # fmt: skip
    if group.max_size < 1:
        return Check("group", "fail", f"{detail}: with MaxSize 0 it cannot be woken", "raise its MaxSize to 1 or more")
    if group.min_size > 0:
        said = f"{detail}: it never goes below MinSize, so {group.min_size} instances run (and cost) whatever they do"
        return Check("group", "warn", said, "set its MinSize to 0, and hold it running when it must stay up")
    return Check("group", "ok", detail)


def _warm_pool_check(run: Run, described: Described, _: float) -> Check:
    pool = described.group.warm_pool if described.group else None
    command = (f"aws autoscaling put-warm-pool --auto-scaling-group-name {described.id} --pool-state Stopped "
               "--instance-reuse-policy ReuseOnScaleIn=true")  # fmt: skip
    if not pool:
        return Check("warm_pool", "warn", "no warm pool: a scale-in terminates an instance, and its disk", command)
    state, reuse = pool.get("PoolState"), (pool.get("InstanceReusePolicy") or {}).get("ReuseOnScaleIn") is True
    if state != "Stopped" or not reuse:
        said = f"a warm pool in state {state}, ReuseOnScaleIn {reuse}: scaled-in instances are not kept stopped"
        return Check("warm_pool", "warn", said, command)
    return Check("warm_pool", "ok", "state Stopped, ReuseOnScaleIn: a scale-in stops an instance and keeps its disk")


def _policies_check(run: Run, described: Described, _: float) -> Check:
    names = scaling_policies(run.config.region, described.id, run.deadline)
    if not names:
        return Check("scaling_policies", "ok", "none: only the orchestrator changes the desired capacity")
    said = f"{', '.join(names)}: they can scale out, and scale in only the instances the orchestrator left unprotected"
    return Check("scaling_policies", "warn", said, "keep them if they are meant to; they never end a protected one")


def _permissions_check(run: Run, *_: Any) -> Check:
    said = ("DescribeAutoScalingGroups and DescribeInstances allowed; SetDesiredCapacity, SetInstanceProtection, "
            "CreateOrUpdateTags and DeleteTags cannot be verified without a write (Auto Scaling has no DryRun), "
            "and preflight writes nothing")  # fmt: skip
    return Check("permissions", "skip", said, "grant them on the group's ARN, as iam-policy-group-example.json does")


def _group_activity_check(run: Run, described: Described, _: float) -> Check:
    run.config.require_backend_url(Action.CHECK_IDLE)
    serving = [info for info in described.instances if info.serving]
    path, seconds = run.config.last_activity_path, run.config.http_timeout_seconds
    urls = [(i.instance_id, run.config.base_url_of(i.instance_id, i.private_ip, i.private_dns_name)) for i in serving]
    granted = run.deadline.grant_backend(f"GET the activity path of {len(urls)} instances", seconds)

    def read(url: str | None) -> str | None:
        found = fetch_activity(url + path, granted, run.deadline.clock) if url else ActivityUnknown("no address")
        return found.reason if isinstance(found, ActivityUnknown) else None

    reasons = concurrently(read, [url for _, url in urls])
    failed = [f"{instance_id}: {why}" for (instance_id, _), why in zip(urls, reasons, strict=True) if why]
    if failed:
        fix = "answer the activity contract at BACKEND_INSTANCE_URL (docs/activity-contract.md); until then none stops"
        return Check("activity_contract", "fail", "; ".join(failed), fix)
    return Check("activity_contract", "ok", f"each of the {len(urls)} instances in service answers the contract")


GROUP_PREFLIGHT: Final[dict[str, Callable[[Run, Any, float], Check]]] = {
    "group": _group_check,
    "warm_pool": _warm_pool_check,
    "scaling_policies": _policies_check,
    "permissions": _permissions_check,
    "activity_contract": _group_activity_check,
}
