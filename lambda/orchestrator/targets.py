"""What the actions act on: a fleet, as a Describe said it is (Described: its state as a whole, the tags its holds
live in, its instances), and what the actions may do to it (Fleet). A fleet is one EC2 instance (fleet.Instance) or
an Auto Scaling group of them (group.Group), built once from the configuration, acting only on what it described."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from orchestrator.words import IN_SERVICE, STOPPED_STATES


class InstanceInfo(NamedTuple):
    """One instance, as DescribeInstances said it is (and, in a group, as the group lists it)."""

    state: str
    launch_time: datetime
    vcpus: int | None = None  # CpuOptions: cores x threads per core
    tags: Mapping[str, str] = {}  # its backend-orchestrator: tags (in a group: its busy-since record)
    instance_type: str = ""
    detailed_monitoring: bool = False
    hibernation_configured: bool = False
    instance_id: str = ""
    private_ip: str | None = None  # where its own backend answers, in a group
    private_dns_name: str | None = None
    lifecycle_state: str | None = None  # in a group: InService, Pending, Terminating, ...
    protected: bool = False  # in a group: protected from scale-in

    @property
    def serving(self) -> bool:
        """Running, and in service where it belongs to a group: the instances check_idle judges."""
        return self.state == "running" and self.lifecycle_state in (None, IN_SERVICE)

    @property
    def joining(self) -> bool:
        """Launched into a group, not yet in service (Pending, Pending:Wait, ...): not judged, counted as kept."""
        return (self.lifecycle_state or "").startswith("Pending")


class Member(NamedTuple):
    """One instance as its Auto Scaling group lists it."""

    instance_id: str
    lifecycle_state: str
    protected: bool


class GroupInfo(NamedTuple):
    """An Auto Scaling group, as DescribeAutoScalingGroups said it is."""

    name: str
    desired_capacity: int
    min_size: int
    max_size: int
    members: tuple[Member, ...] = ()
    warm_pool: Mapping[str, Any] | None = None  # WarmPoolConfiguration
    stale_records: tuple[str, ...] = ()  # busy-since tags of instances no longer in the group

    @property
    def in_service(self) -> int:
        return sum(member.lifecycle_state == IN_SERVICE for member in self.members)


class Described(NamedTuple):
    """A fleet as a Describe said it is: its state as a whole, the tags its holds live in, and its instances."""

    kind: str  # instance | group
    id: str  # the instance's ID, the group's name
    state: str  # the instance's; a group's: stopped (nothing left), stopping, pending, running (one in service)
    tags: Mapping[str, str]
    instances: tuple[InstanceInfo, ...] = ()  # the instance; a group's, when asked for them
    launch_time: datetime | None = None  # an instance's
    group: GroupInfo | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.id}"

    @property
    def capacity(self) -> int:
        """How many instances it is meant to run: a group's desired capacity; an instance, 1 while it is up."""
        if self.group is not None:
            return self.group.desired_capacity
        return 0 if self.state in STOPPED_STATES else 1

    @property
    def min_size(self) -> int:
        return self.group.min_size if self.group is not None else 0

    @property
    def protected(self) -> tuple[str, ...]:
        """The IDs of its instances protected from scale-in."""
        return tuple(m.instance_id for m in self.group.members if m.protected) if self.group is not None else ()

    def size_after(self, removed: Sequence[InstanceInfo], kept: Sequence[InstanceInfo]) -> int:
        """How many instances it runs once `removed` go and `kept` (in service ones now protected) stay: never below
        its MinSize, nor below the instances still protected (a group scales in only unprotected ones)."""
        gone = {instance.instance_id for instance in removed}
        guarded = {i.instance_id for i in kept if i.lifecycle_state == IN_SERVICE} | set(self.protected)
        return max(self.capacity - len(removed), self.min_size, len(guarded - gone))


class Transition(NamedTuple):
    """What a start or a stop did: the state it was in, and the one it is in now."""

    previous_state: str
    state: str

    @property
    def started(self) -> bool:
        return self.previous_state in STOPPED_STATES and self.state not in STOPPED_STATES

    @property
    def stopped(self) -> bool:
        return self.previous_state not in STOPPED_STATES and self.state in STOPPED_STATES


class Fleet(Protocol):
    """What the actions may do to the fleet they look after. Every call fits the invocation's deadline, and a
    failure is an OrchestratorError that says what to fix."""

    kind: str  # instance | group
    id: str
    shrink_call: str  # the API call that shrinks it: StopInstances, SetDesiredCapacity
    # The app's start wakes it even in a dry run: one instance, as it always has (DRY_RUN governs the stops); a
    # group writes nothing in a dry run, its start included.
    wakes_in_dry_run: bool

    def describe(self, instances: bool = True) -> Described:
        """The fleet as it is now; a group's instances only when asked (DescribeInstances)."""
        ...

    def wake(self, described: Described) -> Transition:
        """Up from stopped (an instance, a stop in progress waited out) or from zero (a group), else nothing."""
        ...

    def shrink(self, described: Described | None, size: int, hibernate: bool) -> tuple[Transition, str | None]:
        """Down to `size` instances (an instance: 0, stopped, hibernating if asked; a group: its desired capacity, if
        lower); the second value is a warning where EC2 refused hibernation. Without a describe: all the same."""
        ...

    def protect(self, instance_ids: Sequence[str], protected: bool) -> None:
        """Protect instances of a group from scale-in, or end it (nothing to do for one instance)."""
        ...

    def tag(self, values: Mapping[str, str]) -> None:
        """Set the fleet's own tags: its hold."""
        ...

    def untag(self, *keys: str) -> None: ...

    def record(self, described: Described, instances: Sequence[InstanceInfo], value: str | None) -> None:
        """Write each instance's busy-since record, or delete it (value None: with those of instances gone)."""
        ...
