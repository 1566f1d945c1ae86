"""What the actions act on: a target is what a Describe said of one instance, with its ID; a Fleet is what the actions
may do to their targets, built once from the configuration (fleet.Instance: a fleet of one instance) and acting only
on what its describe() returned, never on the configuration."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from orchestrator.words import STOPPED_STATES


class InstanceInfo(NamedTuple):
    """One instance, as DescribeInstances said it is."""

    state: str
    launch_time: datetime
    vcpus: int | None = None  # CpuOptions: cores x threads per core
    tags: Mapping[str, str] = {}  # its backend-orchestrator: tags
    instance_type: str = ""
    detailed_monitoring: bool = False
    hibernation_configured: bool = False
    instance_id: str = ""
    private_ip: str | None = None  # where its own backend answers, in a group
    private_dns_name: str | None = None


class Transition(NamedTuple):
    """What StartInstances or StopInstances did: the state EC2 saw it in, and the one it is in now."""

    previous_state: str
    state: str

    @property
    def started(self) -> bool:
        return self.previous_state in STOPPED_STATES and self.state not in STOPPED_STATES

    @property
    def stopped(self) -> bool:
        return self.previous_state not in STOPPED_STATES and self.state in STOPPED_STATES


class Fleet(Protocol):
    """What the actions may do to the instances they look after. Every call fits the invocation's deadline, and a
    failure is an OrchestratorError that says what to fix."""

    def describe(self) -> list[InstanceInfo]:
        """The targets as they are now (one, for a fleet of one instance)."""
        ...

    def start(self, target: InstanceInfo) -> Transition: ...

    def stop(self, target: InstanceInfo, hibernate: bool) -> tuple[Transition, str | None]:
        """Stop, hibernating if asked; the second value is a warning when EC2 refused hibernation."""
        ...

    def tag(self, target: InstanceInfo, values: Mapping[str, str]) -> None: ...

    def untag(self, target: InstanceInfo, *keys: str) -> None: ...

    def allowed(self, target: InstanceInfo, operation: str, **kwargs: Any) -> None:
        """Returns if `operation` would be allowed on the target (a DryRun), else raises what AWS answered."""
        ...
