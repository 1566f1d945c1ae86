"""The EC2 edge: each call takes the instances (and region, and deadline) it acts on, fits the invocation's deadline,
and tells EC2's errors apart by their code; and Instance, the fleet of one instance that INSTANCE_ID names."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

from botocore import xform_name

from orchestrator.aws import aws_call
from orchestrator.budget import STOPPING_POLL_SECONDS, Deadline, reserve
from orchestrator.errors import (
    CAPACITY_RETRY_AFTER_SECONDS,
    RETRY_AFTER_SECONDS,
    AwsError,
    InstanceGoneError,
    InstanceNotFoundError,
    InsufficientCapacityError,
    StillStoppingError,
)
from orchestrator.settings import Config
from orchestrator.targets import Described, InstanceInfo, Transition
from orchestrator.words import BUSY_SINCE_TAG, GONE_STATES, TAG_PREFIX, UP_STATES

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

T = TypeVar("T")
# EC2 API error codes: https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
NOT_FOUND_CODES: Final = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})


class Instance:
    """A fleet of one: the instance INSTANCE_ID names. Its holds and its busy-since record are its own tags."""

    kind, shrink_call, wakes_in_dry_run = "instance", "StopInstances", True

    def __init__(self, config: Config, deadline: Deadline) -> None:
        self.config, self.region, self.id, self.deadline = config, config.region, config.instance_id, deadline

    def describe(self, instances: bool = True) -> Described:
        found = describe_instances(self.region, [self.id], self.deadline)
        if not found:
            raise _not_found(self.id)
        [info] = found
        return Described(self.kind, self.id, info.state, info.tags, (info,), info.launch_time)

    def wake(self, described: Described) -> Transition:
        """StartInstances if it is stopped, without waiting for the boot; a stop in progress is waited out while a
        Describe and a StartInstances still fit."""
        if described.state in UP_STATES:
            return Transition(described.state, described.state)
        if described.state == "stopped":
            try:
                return start_instance(self.region, self.id, self.deadline)
            except AwsError as error:
                if error.aws_error_code != "IncorrectInstanceState":
                    raise
                described = self.describe()
        return self._start_once_stopped(described.state)

    def _start_once_stopped(self, state: str) -> Transition:
        # StartInstances on a stopping instance fails with IncorrectInstanceState (so do shutting-down
        # and terminated): wait out a stop in progress, keeping room for the Describe and the StartInstances after it.
        keep = self.deadline.keep(reserve("wait_for_stopped", self.config))
        while state == "stopping":
            if self.deadline.left() < keep:
                raise StillStoppingError(
                    f"Instance {self.id} is still stopping. Retry start after {RETRY_AFTER_SECONDS} seconds.",
                    state=state,
                )
            self.deadline.clock.sleep(STOPPING_POLL_SECONDS)
            state = self.describe().state
        if state in GONE_STATES:
            raise InstanceGoneError(
                f"Instance {self.id} is {state} and cannot be started. Point INSTANCE_ID at a live instance.",
                state=state,
            )
        if state == "stopped":
            return start_instance(self.region, self.id, self.deadline)
        return Transition(state, state)  # someone else started it meanwhile

    def shrink(self, described: Described | None, size: int, hibernate: bool) -> tuple[Transition, str | None]:
        return stop_instance(self.region, self.id, hibernate, self.deadline)

    def protect(self, instance_ids: Sequence[str], protected: bool) -> None:
        return  # nothing scales in one instance

    def tag(self, values: Mapping[str, str]) -> None:
        create_tags(self.region, [self.id], values, self.deadline)

    def untag(self, *keys: str) -> None:
        delete_tags(self.region, [self.id], keys, self.deadline)

    def record(self, described: Described, instances: Sequence[InstanceInfo], value: str | None) -> None:
        if instances:
            (self.tag({BUSY_SINCE_TAG: value}) if value is not None else self.untag(BUSY_SINCE_TAG))


def describe_instances(region: str | None, instance_ids: list[str], deadline: Deadline) -> list[InstanceInfo]:
    """The instances as DescribeInstances tells them, in one call; those it does not know are left out."""
    reservations = _call(
        "DescribeInstances",
        instance_ids,
        region,
        deadline,
        lambda client: client.describe_instances(InstanceIds=instance_ids),
    )["Reservations"]
    return [
        _described(instance, deadline) for reservation in reservations for instance in reservation.get("Instances", [])
    ]


def _described(instance: Mapping[str, Any], deadline: Deadline) -> InstanceInfo:
    # Real EC2 always sends LaunchTime; were it missing, count the instance as just started (safe).
    launch_time = instance.get("LaunchTime") or deadline.clock.now()
    cpu = instance.get("CpuOptions") or {}
    vcpus = cpu.get("CoreCount", 0) * cpu.get("ThreadsPerCore", 1)  # real EC2 always sends both
    tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", []) if tag["Key"].startswith(TAG_PREFIX)}
    monitoring, hibernation = instance.get("Monitoring", {}), instance.get("HibernationOptions", {})
    return InstanceInfo(
        instance["State"]["Name"], launch_time, vcpus if vcpus > 0 else None, tags, instance.get("InstanceType", ""),
        monitoring.get("State") == "enabled", hibernation.get("Configured") is True, instance["InstanceId"],
        instance.get("PrivateIpAddress"), instance.get("PrivateDnsName") or None,
    )  # fmt: skip


def start_instance(region: str | None, instance_id: str, deadline: Deadline) -> Transition:
    ids = [instance_id]
    return _transition("StartInstances", ids, region, deadline, lambda client: client.start_instances(InstanceIds=ids))


def stop_instance(
    region: str | None, instance_id: str, hibernate: bool, deadline: Deadline
) -> tuple[Transition, str | None]:
    """Stop, hibernating if asked; the second value is a warning when EC2 refused hibernation."""
    ids = [instance_id]

    def stop(hibernating: bool) -> Transition:
        def call(client: EC2Client) -> Any:
            return client.stop_instances(InstanceIds=ids, Hibernate=hibernating)

        return _transition("StopInstances", ids, region, deadline, call)

    try:
        return stop(hibernate), None
    except AwsError as error:
        if not hibernate or error.aws_error_code != "UnsupportedHibernationConfiguration":
            raise
    warning = f"EC2 refused to hibernate instance {instance_id}, so it was stopped normally: "
    warning += "enable hibernation on the instance or set STOP_HIBERNATE=false."
    return stop(False), warning


def create_tags(region: str | None, ids: list[str], values: Mapping[str, str], deadline: Deadline) -> None:
    """Set these tags of the instances, in one CreateTags call."""
    tags: list[Any] = [{"Key": key, "Value": value} for key, value in values.items()]
    _call("CreateTags", ids, region, deadline, lambda client: client.create_tags(Resources=ids, Tags=tags))


def delete_tags(region: str | None, ids: list[str], keys: tuple[str, ...], deadline: Deadline) -> None:
    """Delete these tags of the instances, in one DeleteTags call: never none (that would delete every tag)."""
    named: list[Any] = [{"Key": key} for key in keys]
    if not named:
        raise ValueError("DeleteTags with no tag deletes every tag of the instance")
    _call("DeleteTags", ids, region, deadline, lambda client: client.delete_tags(Resources=ids, Tags=named))


def dry_run(region: str | None, operation: str, instance_id: str, deadline: Deadline, **kwargs: Any) -> None:
    """The call with DryRun=True: returns if EC2 would allow it (DryRunOperation), else raises the AwsError. A call
    that succeeds is one too: the endpoint did not honour DryRun, and may have acted."""
    target = {"Resources" if "Tags" in operation else "InstanceIds": [instance_id]}
    method = xform_name(operation)
    try:
        _call(operation, [instance_id], region, deadline, lambda c: getattr(c, method)(DryRun=True, **target, **kwargs))
    except AwsError as error:
        if error.aws_error_code != "DryRunOperation":
            raise
        return  # the one answer that proves the permission without acting
    raise AwsError(
        f"EC2 {operation} with DryRun=True succeeded instead of answering DryRunOperation: the endpoint did not "
        f"honour DryRun, and it may have acted. Check instance {instance_id}, and the EC2 endpoint the function uses "
        "(AWS_ENDPOINT_URL, a VPC endpoint, a proxy).",
        aws_error_code="DryRunIgnored",
    )


def _transition(
    operation: str, ids: list[str], region: str | None, deadline: Deadline, call: Callable[[EC2Client], Any]
) -> Transition:
    changes = _call(operation, ids, region, deadline, call)
    change = changes["StartingInstances" if operation == "StartInstances" else "StoppingInstances"][0]
    return Transition(change["PreviousState"]["Name"], change["CurrentState"]["Name"])


def _not_found(instance_id: str) -> InstanceNotFoundError:
    return InstanceNotFoundError(
        f"Instance {instance_id} does not exist in this region. Check INSTANCE_ID and the region (AWS_REGION)."
    )


def _call(operation: str, ids: list[str], region: str | None, deadline: Deadline, call: Callable[[EC2Client], T]) -> T:
    hint = ' (Describe actions need Resource "*")' if operation.startswith("Describe") else ""
    about = f"instance {', '.join(ids)}{hint}"
    try:
        return aws_call("ec2", operation, region, deadline, about, call=call)
    except AwsError as error:
        if error.aws_error_code in NOT_FOUND_CODES:
            raise _not_found(", ".join(ids)) from error
        if error.aws_error_code == "InsufficientInstanceCapacity":
            raise InsufficientCapacityError(
                f"AWS has no capacity for instance {', '.join(ids)}'s type in its Availability Zone right now "
                f"(InsufficientInstanceCapacity). This passes: retry after {CAPACITY_RETRY_AFTER_SECONDS} seconds; "
                "if it lasts, change the instance type or move the instance to another zone.",
                aws_error_code=error.aws_error_code,
            ) from error
        raise
