"""What the tests and the sandbox (make demo, make serve, make bench) share: moto's server on 127.0.0.1, what real
EC2 does that moto does not, Lambda contexts, a fake clock, free ports, the metric periods EC2 would have
published, and one way to invoke the handler. Nothing here writes into moto's own state: what moto cannot do
is played at the botocore boundary of the function's clients (RealEc2)."""

from __future__ import annotations

import math
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.budget import Clock
from orchestrator.entry import handle
from tools.real_ec2 import add_cpu_options, described_instances

REGION = "us-east-1"
STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
TRANSIENT_STATES = frozenset({"pending", "stopping", "shutting-down"})  # moto never shows them: it changes at once


# --- moto's server ----------------------------------------------------------------------------------------------
class MotoServer:
    """moto's own ThreadedMotoServer on a free loopback port (EC2, CloudWatch, SNS, SQS alike)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        self._server.stop()
        # stop() shuts the server down but leaves its socket listening (moto 5): close it, so the port refuses.
        self._server._server.server_close()


def moto_state(client: Any, instance_id: str) -> str:
    """The instance's state as moto holds it (RealEc2 may show a transient one instead to the function)."""
    reservations = client.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


# --- What real EC2 does that moto does not ------------------------------------------------------------------------
class RealEc2:
    """Real EC2's behaviour where moto's differs, played by botocore hooks on the clients of one session:

    - DescribeInstances sends CpuOptions (tools.real_ec2);
    - StartInstances refuses a stopping, shutting-down or terminated instance (IncorrectInstanceState), and
      sets LaunchTime to the start's time;
    - an instance can be seen pending, stopping or shutting-down (moto changes state at once): `set_state`;
    - an instance can have run since any time (moto has no API to change LaunchTime): `set_launch_time`.

    `describe_state(instance_id)` tells moto's own state; `on_change()` is called after each start or stop."""

    def __init__(
        self,
        now: Callable[[], datetime],
        describe_state: Callable[[str], str],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.now, self.describe_state, self.on_change = now, describe_state, on_change
        self.states: dict[str, str] = {}  # a transient state shown instead of moto's
        self.launch_times: dict[str, datetime] = {}

    def install(self, events: Any) -> Callable[[], None]:
        """Register the hooks on a session's event system; returns what unregisters them."""
        hooks = {
            "after-call.ec2.DescribeInstances": self._described,
            "before-call.ec2.StartInstances": self._refuse_a_start,
            "after-call.ec2.StartInstances": self._changed,
            "after-call.ec2.StopInstances": self._changed,
        }
        for name, hook in hooks.items():
            events.register(name, hook, unique_id=f"real-ec2-{name}-{id(self)}")

        def uninstall() -> None:
            for name in hooks:
                events.unregister(name, unique_id=f"real-ec2-{name}-{id(self)}")

        return uninstall

    def state(self, instance_id: str) -> str:
        return self.states.get(instance_id) or self.describe_state(instance_id)

    def show_state(self, instance_id: str, state: str | None) -> None:
        """Show `state` (pending, stopping, shutting-down) instead of moto's, or moto's own again (None)."""
        if state is None:
            self.states.pop(instance_id, None)
        else:
            assert state in TRANSIENT_STATES, state
            self.states[instance_id] = state

    def set_launch_time(self, instance_id: str, when: datetime) -> None:
        self.launch_times[instance_id] = when.astimezone(UTC)

    def _described(self, parsed: dict[str, Any], **kwargs: Any) -> None:
        add_cpu_options(parsed, **kwargs)
        for instance in described_instances(parsed):
            instance_id = instance["InstanceId"]
            if instance_id in self.states:
                name = self.states[instance_id]
                instance["State"] = {"Name": name, "Code": STATE_CODES[name]}
            if instance_id in self.launch_times:
                instance["LaunchTime"] = self.launch_times[instance_id]

    def _refuse_a_start(self, params: dict[str, Any], **_: Any) -> Any:
        # EC2 API reference, StartInstances: IncorrectInstanceState for stopping, shutting-down and terminated.
        from botocore.awsrequest import AWSResponse, HTTPHeaders

        if params["body"].get("DryRun") == "true":  # a dry run asks about the permission only
            return None
        for key, instance_id in params["body"].items():
            if key.startswith("InstanceId") and self.state(instance_id) in ("stopping", "shutting-down", "terminated"):
                error = {"Code": "IncorrectInstanceState", "Message": f"The instance '{instance_id}' is not in a "
                         "state from which it can be started."}  # fmt: skip
                return AWSResponse("https://ec2.test/", 400, HTTPHeaders(), None), {
                    "Error": error,
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                }
        return None

    def _changed(self, parsed: dict[str, Any], model: Any, **_: Any) -> None:
        """A start or stop that went through: EC2 reports the state it was seen in, and a start sets LaunchTime."""
        for change in parsed.get("StartingInstances", []) + parsed.get("StoppingInstances", []):
            instance_id = change["InstanceId"]
            shown = self.states.pop(instance_id, None)
            if shown is not None:
                change["PreviousState"] = {"Name": shown, "Code": STATE_CODES[shown]}
            if model.name == "StartInstances":
                self.launch_times[instance_id] = self.now().astimezone(UTC)
        self.on_change()


# --- Time and the Lambda context -----------------------------------------------------------------------------------
@dataclass
class FakeClock:
    """Wall time and monotonic time that move only when the code sleeps or a test says so."""

    wall: datetime = field(default_factory=lambda: datetime.now(UTC))
    mono: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds

    def as_clock(self) -> Clock:
        return Clock(now=self.now, monotonic=self.monotonic, sleep=self.sleep)


@dataclass
class FakeContext:
    """A Lambda context whose remaining time follows a fake clock."""

    clock: FakeClock
    timeout_seconds: float = 60.0
    aws_request_id: str = "req-0001"
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock.mono

    def get_remaining_time_in_millis(self) -> int:
        return int((self.timeout_seconds - (self.clock.mono - self.started)) * 1000)


class RealContext:
    """The parts of the Lambda context the function reads; the remaining time counts down for real."""

    function_name = "backend-orchestrator-local"
    memory_limit_in_mb = 128

    def __init__(self, timeout_seconds: float) -> None:
        self.aws_request_id = str(uuid.uuid4())
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def invoke(
    event: object, environ: Mapping[str, str], *, clock: FakeClock | None = None, timeout_seconds: float = 60.0
) -> dict[str, Any]:
    """The handler as the runtime calls it: with a fake clock and a context that follows it, or for real."""
    if clock is None:
        return handle(event, RealContext(timeout_seconds), environ)
    return handle(event, FakeContext(clock, timeout_seconds), environ, clock=clock.as_clock())


# --- Ports and metrics ---------------------------------------------------------------------------------------------
def free_port() -> int:
    """A loopback port free now, for a server about to bind it (the sandbox's backend, each time it powers on)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_HELD: list[socket.socket] = []


def refused_port() -> int:
    """A loopback port that refuses every connection (a backend or an endpoint that is down): bound by this process
    and never listened on, so that no other test, worker or process can take it while the tests run."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _HELD.append(held)
    return int(held.getsockname()[1])


def published_periods(now: datetime, idle_timeout_seconds: int) -> list[datetime]:
    """The start of each 5-minute period the README says the CloudWatch fallback judges at `now`: as many whole
    periods as cover the timeout, the last one ending at the period boundary 10 minutes or more before now.
    Written apart from the function's metric_window, so that a mistake there does not move the test data."""
    last_end = now - timedelta(minutes=10)
    last_end = last_end.replace(minute=last_end.minute - last_end.minute % 5, second=0, microsecond=0)
    count = math.ceil(idle_timeout_seconds / 300)
    return [last_end - timedelta(minutes=5 * (count - index)) for index in range(count)]


# --- An Auto Scaling group, as DevOps would make one ---------------------------------------------------------------
def make_group(ec2: Any, autoscaling: Any, name: str, *, desired: int, min_size: int = 0, max_size: int = 4) -> None:
    """An Auto Scaling group of `desired` instances from a launch template, in the default VPC's first subnet."""
    template = f"{name}-template"
    data = {"ImageId": "ami-12c6146b", "InstanceType": "t3.medium"}
    ec2.create_launch_template(LaunchTemplateName=template, LaunchTemplateData=data)
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": template}, MinSize=min_size,
        MaxSize=max_size, DesiredCapacity=desired, VPCZoneIdentifier=subnet,
    )  # fmt: skip


def group_members(autoscaling: Any, name: str) -> list[dict[str, Any]]:
    """The group's instances as it lists them: InstanceId, LifecycleState, ProtectedFromScaleIn."""
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    return list(groups[0]["Instances"])
