"""The EC2 edge: each call takes the instances (and region, and deadline) it acts on, fits the invocation's deadline,
and tells EC2's errors apart by their code; and Instance, a fleet of one behind the targets protocol, built once from
the configuration (fleet_of)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from botocore import xform_name

from orchestrator.aws import aws_call
from orchestrator.budget import Deadline
from orchestrator.errors import (
    CAPACITY_RETRY_AFTER_SECONDS,
    AwsError,
    InstanceNotFoundError,
    InsufficientCapacityError,
)
from orchestrator.settings import Config
from orchestrator.targets import Fleet, InstanceInfo, Transition
from orchestrator.words import TAG_PREFIX

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

T = TypeVar("T")
# EC2 API error codes: https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
NOT_FOUND_CODES: Final = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})


def fleet_of(config: Config, deadline: Deadline) -> Fleet:
    """The instances the configuration names, behind the targets protocol."""
    return Instance(config.region, config.instance_id, deadline)


class Instance:
    """A fleet of one: the instance INSTANCE_ID names."""

    def __init__(self, region: str | None, instance_id: str, deadline: Deadline) -> None:
        self.region, self.instance_id, self.deadline = region, instance_id, deadline

    def describe(self) -> list[InstanceInfo]:
        found = describe_instances(self.region, [self.instance_id], self.deadline)
        if not found:
            raise _not_found(self.instance_id)
        return found

    def start(self, target: InstanceInfo) -> Transition:
        return start_instance(self.region, target.instance_id, self.deadline)

    def stop(self, target: InstanceInfo, hibernate: bool) -> tuple[Transition, str | None]:
        return stop_instance(self.region, target.instance_id, hibernate, self.deadline)

    def tag(self, target: InstanceInfo, values: Mapping[str, str]) -> None:
        create_tags(self.region, target.instance_id, values, self.deadline)

    def untag(self, target: InstanceInfo, *keys: str) -> None:
        delete_tags(self.region, target.instance_id, keys, self.deadline)

    def allowed(self, target: InstanceInfo, operation: str, **kwargs: Any) -> None:
        dry_run(self.region, operation, target.instance_id, self.deadline, **kwargs)


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


def create_tags(region: str | None, instance_id: str, values: Mapping[str, str], deadline: Deadline) -> None:
    """Set these tags of the instance, in one CreateTags call."""
    tags: list[Any] = [{"Key": key, "Value": value} for key, value in values.items()]
    ids = [instance_id]
    _call("CreateTags", ids, region, deadline, lambda client: client.create_tags(Resources=ids, Tags=tags))


def delete_tags(region: str | None, instance_id: str, keys: tuple[str, ...], deadline: Deadline) -> None:
    """Delete these tags of the instance, in one DeleteTags call: never none (that would delete every tag)."""
    named: list[Any] = [{"Key": key} for key in keys]
    if not named:
        raise ValueError("DeleteTags with no tag deletes every tag of the instance")
    ids = [instance_id]
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
