"""The Auto Scaling edge: an Auto Scaling group as a fleet (Group), woken from zero, shrunk by its desired capacity, its
working instances protected from scale-in, its hold and its instances' busy-since records in its own tags; and
fleet_of(), the fleet the configuration names. EC2 Auto Scaling launches, replaces and balances the instances: the
function only says how many, and which may go (those it leaves unprotected)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Final, TypeVar

from orchestrator.aws import aws_call
from orchestrator.budget import Deadline
from orchestrator.errors import AwsError, GroupMaxSizeZeroError, GroupNotFoundError, InstanceNotFoundError
from orchestrator.fleet import Instance, describe_instances
from orchestrator.settings import Config
from orchestrator.targets import Described, Fleet, GroupInfo, InstanceInfo, Member, Transition
from orchestrator.words import BUSY_SINCE_TAG, IN_SERVICE, TAG_PREFIX

T = TypeVar("T")
PROTECTION_BATCH: Final = 50  # SetInstanceProtection takes at most 50 instances
RECORD_PREFIX: Final = f"{BUSY_SINCE_TAG}:"  # + an instance's ID: its busy-since record, a tag of the group
STAYING: Final = (IN_SERVICE, "Pending")  # lifecycle states of instances that run or are about to: the others leave


def fleet_of(config: Config, deadline: Deadline) -> Fleet:
    """The fleet the configuration names: one instance (INSTANCE_ID) or an Auto Scaling group of them."""
    return Group(config, deadline) if config.auto_scaling_group_name else Instance(config, deadline)


class Group:
    """The Auto Scaling group AUTO_SCALING_GROUP_NAME names."""

    kind, shrink_call, wakes_in_dry_run = "group", "SetDesiredCapacity", False

    def __init__(self, config: Config, deadline: Deadline) -> None:
        self.region, self.id, self.deadline = config.region, config.auto_scaling_group_name, deadline

    def describe(self, instances: bool = True) -> Described:
        """One DescribeAutoScalingGroups; with `instances`, one DescribeInstances for its instances as well."""
        found = self._call(
            "DescribeAutoScalingGroups",
            lambda client: client.describe_auto_scaling_groups(AutoScalingGroupNames=[self.id]),
        )["AutoScalingGroups"]
        if not found:
            raise GroupNotFoundError(
                f"Auto Scaling group {self.id} does not exist in this region. Check AUTO_SCALING_GROUP_NAME (the "
                "group's name, not its ARN) and the region (AWS_REGION)."
            )
        group = found[0]
        members = tuple(Member(m["InstanceId"], m["LifecycleState"], m.get("ProtectedFromScaleIn") is True)
                        for m in group.get("Instances", []))  # fmt: skip
        tags = {tag["Key"]: tag["Value"] for tag in group.get("Tags", []) if tag["Key"].startswith(TAG_PREFIX)}
        records = {
            key.removeprefix(RECORD_PREFIX): value for key, value in tags.items() if key.startswith(RECORD_PREFIX)
        }
        listed = {member.instance_id for member in members}
        info = GroupInfo(
            self.id, group["DesiredCapacity"], group["MinSize"], group["MaxSize"], members,
            group.get("WarmPoolConfiguration"), tuple(RECORD_PREFIX + i for i in records if i not in listed),
        )  # fmt: skip
        described = self._instances(members, records) if instances and members else ()
        holds = {key: value for key, value in tags.items() if not key.startswith(RECORD_PREFIX)}
        return Described(self.kind, self.id, _state(info), holds, described, group=info)

    def _instances(self, members: tuple[Member, ...], records: Mapping[str, str]) -> tuple[InstanceInfo, ...]:
        """The members as EC2 describes them, in the group's order, each with its lifecycle state, its protection and
        its busy-since record."""
        try:
            found = {i.instance_id: i for i in describe_instances(self.region, [m.instance_id for m in members],
                                                                   self.deadline)}  # fmt: skip
        except InstanceNotFoundError as error:  # one left the group and EC2 since DescribeAutoScalingGroups
            raise AwsError(f"{error.message} It left group {self.id} while it was described: the next check reads "
                           "the group again.", aws_error_code="InvalidInstanceID.NotFound") from error  # fmt: skip
        return tuple(
            found[m.instance_id]._replace(
                lifecycle_state=m.lifecycle_state,
                protected=m.protected,
                tags={BUSY_SINCE_TAG: records[m.instance_id]} if m.instance_id in records else {},
            )
            for m in members
            if m.instance_id in found
        )

    def wake(self, described: Described) -> Transition:
        """From zero to one instance (SetDesiredCapacity, cooldown not honoured); a group already up is left alone."""
        assert described.group is not None  # noqa: S101 - a group's describe says it
        if described.group.desired_capacity > 0:
            return Transition(described.state, described.state)
        if described.group.max_size < 1:
            raise GroupMaxSizeZeroError(
                f"Group {self.id} has MaxSize 0, so it cannot be woken: raise its MaxSize to 1 or more (aws "
                f"autoscaling update-auto-scaling-group --auto-scaling-group-name {self.id} --max-size 1)."
            )
        self._set_desired(1)
        return Transition(described.state, "pending")

    def shrink(self, described: Described | None, size: int, hibernate: bool) -> tuple[Transition, str | None]:
        """SetDesiredCapacity(size) where that is lower; the group scales in only its unprotected instances (into its
        warm pool, stopped, with ReuseOnScaleIn)."""
        group = described.group if described else None
        before = "running" if group and group.in_service else described.state if described else "unknown"
        if group is None or size < group.desired_capacity:
            self._set_desired(size)
        return Transition(before, "stopping" if size == 0 else before), None

    def protect(self, instance_ids: Sequence[str], protected: bool) -> None:
        """SetInstanceProtection, one call per 50 instances."""
        for first in range(0, len(instance_ids), PROTECTION_BATCH):
            batch = list(instance_ids[first : first + PROTECTION_BATCH])
            self._call("SetInstanceProtection", partial(self._protection, batch, protected))

    def _protection(self, instance_ids: list[str], protected: bool, client: Any) -> Any:
        return client.set_instance_protection(
            AutoScalingGroupName=self.id, InstanceIds=instance_ids, ProtectedFromScaleIn=protected
        )

    def tag(self, values: Mapping[str, str]) -> None:
        """The group's own tags, in one CreateOrUpdateTags; not given to the instances it launches."""
        tags = [{**self._resource(key), "Value": value, "PropagateAtLaunch": False} for key, value in values.items()]
        self._call("CreateOrUpdateTags", lambda client: client.create_or_update_tags(Tags=tags))

    def untag(self, *keys: str) -> None:
        if not keys:
            raise ValueError("no tag to delete")
        tags = [self._resource(key) for key in keys]
        self._call("DeleteTags", lambda client: client.delete_tags(Tags=tags))

    def record(self, described: Described, instances: Sequence[InstanceInfo], value: str | None) -> None:
        """The instances' busy-since records, as tags of the group (one per instance); deleting them deletes those of
        instances that left the group too."""
        keys = [RECORD_PREFIX + instance.instance_id for instance in instances]
        if value is not None:
            if keys:
                self.tag(dict.fromkeys(keys, value))
        elif keys or (described.group and described.group.stale_records):
            self.untag(*keys, *(described.group.stale_records if described.group else ()))

    def _set_desired(self, size: int) -> None:
        self._call(
            "SetDesiredCapacity",
            lambda client: client.set_desired_capacity(
                AutoScalingGroupName=self.id, DesiredCapacity=size, HonorCooldown=False
            ),
        )

    def _resource(self, key: str) -> dict[str, Any]:
        return {"ResourceId": self.id, "ResourceType": "auto-scaling-group", "Key": key}

    def _call(self, operation: str, call: Callable[[Any], T]) -> T:
        about = f"group {self.id}" + (
            ' (Describe actions need Resource "*")' if operation.startswith("Describe") else ""
        )
        return aws_call("autoscaling", operation, self.region, self.deadline, about, call=call)


def _state(group: GroupInfo) -> str:
    """The group's state, in an instance's words: stopped (nothing left), stopping (desired capacity 0, instances
    still in it), pending (none in service yet), running (one in service)."""
    staying = [m for m in group.members if m.lifecycle_state.startswith(STAYING)]
    if group.desired_capacity == 0:
        return "stopping" if staying else "stopped"
    return "running" if group.in_service else "pending"


def scaling_policies(region: str | None, name: str, deadline: Deadline) -> list[str]:
    """The names of the group's scaling policies (DescribePolicies), for preflight."""
    about = f'group {name} (Describe actions need Resource "*")'
    found = aws_call("autoscaling", "DescribePolicies", region, deadline, about,
                     call=lambda client: client.describe_policies(AutoScalingGroupName=name))  # fmt: skip
    return [policy["PolicyName"] for policy in found.get("ScalingPolicies", [])]
