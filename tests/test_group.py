"""Group mode: an Auto Scaling group in moto, each instance's backend at its own path of a real server on 127.0.0.1
(BACKEND_INSTANCE_URL names it by {instance_id}), exact call counts. moto terminates at once the first unprotected
instances in its list order when the desired capacity drops, so a busy instance left unprotected is caught."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import function as bo
from tests.helpers import (
    HOOKS,
    REGION,
    Answer,
    FakeClock,
    Invoke,
    ScriptedBackend,
    act_as,
    body_of,
    http_event,
    setup_client,
)
from tools.harness import RealEc2, group_members, make_group, moto_state

GROUP = "pyelli-backend"
WRITES = ("SetDesiredCapacity", "SetInstanceProtection", "CreateOrUpdateTags", "DeleteTags", "CreateTags",
          "StartInstances", "StopInstances")  # fmt: skip
IDLE = Answer.json({"idle_seconds": 1200})
BUSY = Answer.json({"idle_seconds": 3, "busy": True, "busy_since": "2026-01-01T00:00:00+00:00"})


@dataclass
class GroupWorld:
    """The group in moto, real EC2's CpuOptions and LaunchTime (RealEc2), and the function's AWS calls by name, with
    the parameters of each write."""

    ec2: Any
    autoscaling: Any
    real: RealEc2
    clock: FakeClock
    calls: list[str] = field(default_factory=list)
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def members(self) -> list[dict[str, Any]]:
        return group_members(self.autoscaling, GROUP)

    def ids(self) -> list[str]:
        return [member["InstanceId"] for member in self.members()]

    def protected(self) -> set[str]:
        return {member["InstanceId"] for member in self.members() if member["ProtectedFromScaleIn"]}

    def desired(self) -> int:
        return int(self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
                   ["DesiredCapacity"])  # fmt: skip

    def tags(self) -> dict[str, str]:
        group = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
        return {tag["Key"]: tag["Value"] for tag in group["Tags"]}

    def tag(self, values: dict[str, str]) -> None:
        """Tag the group, as an operator would by hand."""
        self.autoscaling.create_or_update_tags(Tags=[{"ResourceId": GROUP, "ResourceType": "auto-scaling-group",
            "Key": key, "Value": value, "PropagateAtLaunch": False} for key, value in values.items()])  # fmt: skip

    def set_desired(self, size: int) -> None:
        self.autoscaling.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=size)
        self.age()

    def age(self, hours: float = 2) -> None:
        """Every instance of the group has run for `hours`."""
        for instance_id in self.ids():
            self.real.set_launch_time(instance_id, self.clock.now() - timedelta(hours=hours))

    def writes(self) -> list[str]:
        return [call for call in self.calls if call in WRITES]

    def clear(self) -> None:
        self.calls.clear()
        self.sent.clear()


@pytest.fixture
def world(aws: None, clock: FakeClock) -> Iterator[GroupWorld]:
    ec2, autoscaling = setup_client("ec2"), setup_client("autoscaling")
    real = RealEc2(clock.now, lambda instance_id: moto_state(ec2, instance_id))
    uninstall = real.install(HOOKS.events)
    world = GroupWorld(ec2, autoscaling, real, clock)

    def count(model: Any, params: dict[str, Any], **_: Any) -> None:
        world.calls.append(model.name)
        world.sent.append((model.name, dict(params)))

    HOOKS.events.register("before-parameter-build", count)
    make_group(ec2, autoscaling, GROUP, desired=2)
    world.age()
    yield world
    uninstall()


@pytest.fixture
def env(world: GroupWorld, backend: ScriptedBackend) -> dict[str, str]:
    return {"AUTO_SCALING_GROUP_NAME": GROUP, "BACKEND_INSTANCE_URL": backend.url + "/{instance_id}",
            "BACKEND_BASE_URL": backend.url, "AWS_REGION": REGION}  # fmt: skip


def say(backend: ScriptedBackend, instance_id: str, *answers: Answer) -> None:
    """What one instance's backend answers at the activity path."""
    backend.answer(f"/{instance_id}/api/last-activity", *answers)


CHECK = {"action": "check_idle"}


def by_id(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {instance["instance_id"]: instance for instance in body["instances"]}


# --- Configuration -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variables", "said"),
    [
        ({"INSTANCE_ID": "i-0abc123def4567890"}, "INSTANCE_ID and AUTO_SCALING_GROUP_NAME are both set"),
        ({"AUTO_SCALING_GROUP_NAME": "arn:aws:autoscaling:x"}, "is not an Auto Scaling group name"),
        ({"AUTO_SCALING_GROUP_NAME": "two words"}, "is not an Auto Scaling group name"),
        ({"BACKEND_INSTANCE_URL": "http://10.0.0.1:8000"}, "must name each instance with {private_ip}"),
        ({"BACKEND_INSTANCE_URL": "http://{private_ip:>5}:8000"}, "must name each instance"),
        ({"BACKEND_INSTANCE_URL": "http://{ip}:8000"}, "must name each instance"),
        ({"BACKEND_INSTANCE_URL": "http://{private_ip:8000"}, "has an unmatched brace"),
        ({"BACKEND_INSTANCE_URL": "ftp://{private_ip}:8000"}, "does not make an http(s) base URL"),
        ({"BACKEND_INSTANCE_URL": "http://admin:secret@{private_ip}:8000"}, "carries a user name or password"),
    ],
)
def test_a_bad_group_configuration_is_a_config_error_that_names_it(
    invoke: Invoke, world: GroupWorld, variables: dict[str, str], said: str
) -> None:
    body = invoke(CHECK, **variables)
    assert body["error"]["code"] == "config_error"
    assert said in body["error"]["message"]
    assert "secret" not in json.dumps(body)
    assert world.calls == []


def test_backend_instance_url_is_for_a_group_only(invoke: Invoke, world: GroupWorld) -> None:
    body = invoke(CHECK, AUTO_SCALING_GROUP_NAME="", INSTANCE_ID="i-0abc123def4567890")
    assert body["error"]["code"] == "config_error"
    assert body["error"]["message"].startswith("BACKEND_INSTANCE_URL is set without AUTO_SCALING_GROUP_NAME")


def test_check_idle_in_a_group_needs_each_instances_url(invoke: Invoke, world: GroupWorld) -> None:
    body = invoke(CHECK, BACKEND_INSTANCE_URL="")
    assert body["error"]["code"] == "config_error"
    assert "BACKEND_INSTANCE_URL is not set and check_idle needs it" in body["error"]["message"]
    assert world.calls == []


def test_a_group_that_does_not_exist_says_which_variable_to_fix(invoke: Invoke, world: GroupWorld) -> None:
    body = invoke(CHECK, AUTO_SCALING_GROUP_NAME="no-such-group")
    assert body["error"]["code"] == "group_not_found"
    assert "Check AUTO_SCALING_GROUP_NAME" in body["error"]["message"]


# --- start ---------------------------------------------------------------------------------------------------------
def test_start_wakes_a_group_at_zero_in_two_calls(invoke: Invoke, world: GroupWorld) -> None:
    world.set_desired(0)
    world.clear()
    response = invoke(http_event())
    body = body_of(response)
    assert response["statusCode"] == 202
    assert (body["previous_state"], body["state"]) == ("stopped", "pending")
    assert body["group"] == {"name": GROUP, "desired_capacity": 1, "min_size": 0, "max_size": 4, "in_service": 0}
    assert world.calls == ["DescribeAutoScalingGroups", "SetDesiredCapacity"]
    assert world.sent[1][1] == {"AutoScalingGroupName": GROUP, "DesiredCapacity": 1, "HonorCooldown": False}
    assert world.desired() == 1


def test_start_leaves_a_group_that_is_up_alone_in_one_call(invoke: Invoke, world: GroupWorld) -> None:
    response = invoke(http_event())
    body = body_of(response)
    assert (response["statusCode"], body["state"], body["message"]) == (200, "running", "Group is already up.")
    assert body["group"]["in_service"] == 2
    assert world.calls == ["DescribeAutoScalingGroups"]


def test_start_of_a_group_held_stopped_is_refused_and_writes_nothing(invoke: Invoke, world: GroupWorld) -> None:
    world.set_desired(0)
    until = (world.clock.now() + timedelta(hours=2)).isoformat()
    world.tag({bo.HOLD_TAG: "stopped", "backend-orchestrator:hold-until": until})
    world.clear()
    response = invoke(http_event())
    assert response["statusCode"] == 409
    assert body_of(response)["error"]["code"] == "held_stopped"
    assert world.calls == ["DescribeAutoScalingGroups"]


def test_a_group_whose_max_size_is_zero_cannot_be_woken(invoke: Invoke, world: GroupWorld) -> None:
    world.autoscaling.update_auto_scaling_group(AutoScalingGroupName=GROUP, MinSize=0, MaxSize=0, DesiredCapacity=0)
    world.clear()
    response = invoke(http_event())
    error = body_of(response)["error"]
    assert (response["statusCode"], error["code"]) == (409, "group_max_size_zero")
    assert "raise its MaxSize to 1" in error["message"]
    assert world.writes() == []


def test_in_a_dry_run_start_writes_nothing_and_says_what_it_would_do(invoke: Invoke, world: GroupWorld) -> None:
    world.set_desired(0)
    world.clear()
    response = invoke(http_event(), DRY_RUN="true")
    body = body_of(response)
    assert response["statusCode"] == 200
    assert body["message"] == "Dry run: the group would be woken; nothing was written."
    assert world.writes() == []
    assert world.desired() == 0


# --- check_idle ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("busy_at", [0, 1, 2])
def test_the_busy_instance_is_protected_and_never_the_one_removed(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend, busy_at: int
) -> None:
    world.set_desired(3)
    ids = world.ids()  # moto's own order: it ends the first unprotected ones
    for index, instance_id in enumerate(ids):
        say(backend, instance_id, BUSY if index == busy_at else IDLE)
    world.clear()
    body = invoke(CHECK)
    assert world.ids() == [ids[busy_at]]
    assert world.protected() == {ids[busy_at]}
    assert (body["decision"], body["group"]) == ("scale_in", {"name": GROUP, "desired_before": 3, "desired_after": 1})
    decided = by_id(body)
    assert decided[ids[busy_at]] | {"reason": ""} == {
        "instance_id": ids[busy_at], "state": "InService", "decision": "keep", "reason": "", "signal": "activity",
        "protected": True, "idle_seconds": 3.0}  # fmt: skip
    assert [decided[i]["decision"] for i in ids if i != ids[busy_at]] == ["stop", "stop"]
    assert world.calls == ["DescribeAutoScalingGroups", "DescribeInstances", "SetInstanceProtection",
                           "SetDesiredCapacity"]  # fmt: skip
    assert world.sent[2][1] == {
        "AutoScalingGroupName": GROUP,
        "InstanceIds": [ids[busy_at]],
        "ProtectedFromScaleIn": True,
    }
    assert world.sent[3][1]["DesiredCapacity"] == 1


def test_a_group_all_idle_goes_to_zero_in_one_write(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    for instance_id in world.ids():
        say(backend, instance_id, IDLE)
    world.clear()
    body = invoke(CHECK)
    assert (body["decision"], body["previous_state"], body["state"]) == ("stop", "running", "stopping")
    assert world.writes() == ["SetDesiredCapacity"]
    assert (world.desired(), world.ids()) == (0, [])
    assert body["uptime_seconds"] == 7200


def test_a_group_all_busy_is_protected_once_then_left_alone(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    ids = world.ids()
    for instance_id in ids:
        say(backend, instance_id, Answer.json({"idle_seconds": 1, "busy": True, "busy_since": "2026-01-01T00:00:00Z"}))
    world.clear()
    assert invoke(CHECK)["decision"] == "keep"
    assert world.writes() == ["SetInstanceProtection"]  # one call for both
    assert world.protected() == set(ids)
    world.clear()
    assert invoke(CHECK)["decision"] == "keep"
    assert world.calls == ["DescribeAutoScalingGroups", "DescribeInstances"]  # nothing changes: no write


def test_an_instance_protected_while_busy_loses_it_before_it_is_scaled_in(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    first, second = world.ids()
    say(backend, first, BUSY)
    say(backend, second, BUSY)
    invoke(CHECK)
    say(backend, first, IDLE)
    world.clear()
    body = invoke(CHECK)
    assert world.writes() == ["SetInstanceProtection", "SetDesiredCapacity"]
    assert world.sent[2][1] == {"AutoScalingGroupName": GROUP, "InstanceIds": [first], "ProtectedFromScaleIn": False}
    assert world.ids() == [second]
    assert by_id(body)[first]["protected"] is False


def test_held_running_a_group_keeps_its_most_recently_active_instance(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    first, second = world.ids()
    say(backend, first, Answer.json({"idle_seconds": 5000}))
    say(backend, second, Answer.json({"idle_seconds": 1000}))
    until = (world.clock.now() + timedelta(hours=3)).isoformat()
    world.tag({bo.HOLD_TAG: "running", "backend-orchestrator:hold-until": until})
    body = invoke(CHECK)
    assert world.ids() == [second]
    kept = by_id(body)[second]
    assert (kept["decision"], kept["signal"], kept["protected"]) == ("keep", "hold", True)
    assert kept["reason"] == f"idle for 1000s, over the 900s timeout; kept: held running until {until}"
    assert (body["decision"], body["hold"]["state"]) == ("scale_in", "running")


def test_a_group_at_zero_in_a_keep_warm_window_is_woken(invoke: Invoke, world: GroupWorld) -> None:
    world.set_desired(0)
    world.clear()
    body = invoke(CHECK, KEEP_WARM="Mon-Sun 00:00-24:00 UTC")
    assert (body["decision"], body["signal"]) == ("start", "keep_warm")
    assert world.writes() == ["SetDesiredCapacity"]
    assert world.desired() == 1


def test_a_group_never_goes_below_its_min_size(invoke: Invoke, world: GroupWorld, backend: ScriptedBackend) -> None:
    world.autoscaling.update_auto_scaling_group(AutoScalingGroupName=GROUP, MinSize=1)
    for instance_id in world.ids():
        say(backend, instance_id, IDLE)
    body = invoke(CHECK)
    assert world.desired() == 1
    assert [i["signal"] for i in body["instances"] if i["decision"] == "keep"] == ["min_size"]


def test_a_group_whose_min_size_holds_every_instance_asks_no_backend(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    world.autoscaling.update_auto_scaling_group(AutoScalingGroupName=GROUP, MinSize=2)
    world.clear()
    body = invoke(CHECK)
    assert (body["decision"], body["signal"], body["reason"]) == ("keep", "min_size", "the group's MinSize is 2")
    assert backend.calls == []
    assert world.writes() == ["SetInstanceProtection"]


def test_an_instance_not_yet_in_service_is_not_judged_and_counts_as_kept(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    first, second = world.ids()

    def launching(parsed: dict[str, Any], **_: Any) -> None:
        for instance in parsed["AutoScalingGroups"][0]["Instances"]:
            if instance["InstanceId"] == second:
                instance["LifecycleState"] = "Pending"

    # Real Auto Scaling lists a launching instance as Pending; moto's are InService at once.
    HOOKS.events.register("after-call.auto-scaling.DescribeAutoScalingGroups", launching)
    say(backend, first, IDLE)
    body = invoke(CHECK, KEEP_WARM="Mon-Sun 00:00-24:00 UTC")  # the group keeps one: the one about to serve
    assert [call.path for call in backend.calls] == [f"/{first}/api/last-activity"]
    assert by_id(body)[second]["decision"] == "skip"
    assert by_id(body)[second]["reason"] == "Pending: not yet in service, counted as kept"
    assert (world.desired(), body["decision"]) == (1, "scale_in")


def test_unreachable_backends_are_judged_on_their_metrics_in_one_call(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    ids = world.ids()
    for instance_id in ids:
        say(backend, instance_id, Answer(500, b"{}"))
    world.clear()
    body = invoke(CHECK)
    assert world.calls.count("GetMetricData") == 1  # both instances' metrics
    queries = world.sent[world.calls.index("GetMetricData")][1]["MetricDataQueries"]
    assert {q["MetricStat"]["Metric"]["Dimensions"][0]["Value"] for q in queries} == set(ids)
    assert body["decision"] == "keep"  # moto has no datapoints: missing data never stops
    assert all("CloudWatch has no CPU or network data" in i["reason"] for i in body["instances"])


def test_a_drain_is_asked_of_each_instance_at_its_own_url_and_a_refusal_keeps_it_protected(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    first, second = world.ids()
    for instance_id in (first, second):
        say(backend, instance_id, IDLE)
    backend.answer(f"/{first}/api/drain", Answer.json({"drained": False, "busy": True}))
    backend.answer(f"/{second}/api/drain", Answer.json({"drained": True}))
    world.clear()
    body = invoke(CHECK, DRAIN_PATH="/api/drain")
    assert {call.path for call in backend.calls if call.method == "POST"} == {
        f"/{first}/api/drain",
        f"/{second}/api/drain",
    }
    assert world.writes() == ["SetInstanceProtection", "SetDesiredCapacity"]  # the refused one, then the scale-in
    assert world.ids() == [first]
    assert world.protected() == {first}
    refused = by_id(body)[first]
    assert (refused["decision"], refused["protected"]) == ("keep", True)
    assert "the backend did not drain" in refused["reason"]
    assert (body["decision"], body["drained"]) == ("scale_in", True)


def test_a_dry_run_writes_nothing_and_says_what_it_would_do(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    first, second = world.ids()
    say(backend, first, BUSY)
    say(backend, second, IDLE)
    world.clear()
    body = invoke(CHECK, DRY_RUN="true")
    assert world.writes() == []
    assert (body["decision"], body["group"]["desired_after"]) == ("would_scale_in", 1)
    assert [by_id(body)[i]["decision"] for i in (first, second)] == ["keep", "would_stop"]
    assert world.ids() == [first, second]


def test_each_busy_instance_keeps_its_own_busy_since_record_on_the_group(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    first, second = world.ids()
    for instance_id in (first, second):
        say(
            backend, instance_id, Answer.json({"idle_seconds": 1, "busy": True})
        )  # no busy_since: the function keeps it
    invoke(CHECK)
    now = world.clock.now().isoformat()
    assert {k: v for k, v in world.tags().items() if "busy-since" in k} == {
        f"{bo.BUSY_SINCE_TAG}:{first}": now, f"{bo.BUSY_SINCE_TAG}:{second}": now}  # fmt: skip
    assert world.calls.count("CreateOrUpdateTags") == 1  # one call for both
    say(backend, first, Answer.json({"idle_seconds": 10}))
    world.clear()
    invoke(CHECK)
    assert world.writes() == ["DeleteTags"]
    assert [k for k in world.tags() if "busy-since" in k] == [f"{bo.BUSY_SINCE_TAG}:{second}"]


def test_a_record_of_an_instance_that_left_the_group_is_deleted(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    first, second = world.ids()
    world.tag({f"{bo.BUSY_SINCE_TAG}:i-0123456789abcdef0": "2026-01-01T00:00:00+00:00"})
    say(backend, first, Answer.json({"idle_seconds": 10}))
    say(backend, second, Answer.json({"idle_seconds": 10}))
    world.clear()
    invoke(CHECK)
    assert world.writes() == ["SetInstanceProtection", "DeleteTags"]  # both kept (not idle long enough), the record
    assert [k for k in world.tags() if "busy-since" in k] == []


def test_a_group_is_judged_at_the_cost_of_its_few_calls_and_one_read_per_backend(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    world.set_desired(4)
    ids = world.ids()
    for instance_id in ids:
        say(backend, instance_id, Answer(200, b'{"idle_seconds": 10}', mode="slow", interval=0.3))
    world.clear()
    body = invoke(CHECK)
    assert body["decision"] == "keep"
    assert sorted(call.path for call in backend.calls) == sorted(f"/{i}/api/last-activity" for i in ids)
    assert world.calls == ["DescribeAutoScalingGroups", "DescribeInstances", "SetInstanceProtection"]


# --- status, stop, hold, release -----------------------------------------------------------------------------------
def test_status_lists_the_instances_and_probes_the_load_balancer(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    backend.answer("/health", Answer.json({"status": "ok"}))
    body = invoke({"action": "status"})
    assert body["backend"] == {"reachable": True, "healthy": True, "status_code": 200}
    assert [i["state"] for i in body["instances"]] == ["InService", "InService"]
    assert world.calls == ["DescribeAutoScalingGroups"]


def test_an_operators_stop_ends_every_protection_and_empties_the_group(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    for instance_id in world.ids():
        say(backend, instance_id, BUSY)
    invoke(CHECK)
    world.clear()
    body = invoke({"action": "stop"})
    assert (body["decision"], body["state"], body["group"]["desired_capacity"]) == ("stop", "stopping", 0)
    assert world.writes() == ["SetInstanceProtection", "SetDesiredCapacity"]
    assert (world.desired(), world.ids()) == (0, [])


def test_hold_and_release_write_the_groups_own_tags(invoke: Invoke, world: GroupWorld) -> None:
    world.clear()
    body = invoke({"action": "hold", "state": "stopped", "hours": 2, "reason": "maintenance"})
    assert (body["decision"], body["hold"]["reason"]) == ("stop", "maintenance")
    assert world.writes() == ["CreateOrUpdateTags", "SetDesiredCapacity"]  # nothing was protected
    tags = world.sent[world.calls.index("CreateOrUpdateTags")][1]["Tags"]
    assert {tag["Key"] for tag in tags} == set(bo.HOLD_TAGS)
    assert {tag["PropagateAtLaunch"] for tag in tags} == {False}
    assert world.tags()[bo.HOLD_TAG] == "stopped"
    world.clear()
    released = invoke({"action": "release"})
    assert released["released"]["state"] == "stopped"
    assert world.writes() == ["DeleteTags"]
    assert bo.HOLD_TAG not in world.tags()


# --- The rule that matters most, against any group -----------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_busy_instance_is_ever_removed_whatever_the_order(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend, data: st.DataObject
) -> None:
    size = data.draw(st.integers(1, 4), label="size")
    busy_at = data.draw(st.lists(st.booleans(), min_size=size, max_size=size), label="busy, in moto's order")
    order = data.draw(st.permutations(range(size)), label="the order the function sees")
    for instance_id in world.ids():  # what the last example left
        world.autoscaling.set_instance_protection(AutoScalingGroupName=GROUP, InstanceIds=[instance_id],
                                                  ProtectedFromScaleIn=False)  # fmt: skip
    world.set_desired(size)
    ids = world.ids()
    busy = {instance_id for instance_id, is_busy in zip(ids, busy_at, strict=True) if is_busy}
    shown = [ids[index] for index in order]
    for instance_id in ids:
        say(backend, instance_id, BUSY if instance_id in busy else IDLE)

    def reorder(parsed: dict[str, Any], **_: Any) -> None:
        listed = parsed["AutoScalingGroups"][0]["Instances"]
        listed.sort(key=lambda instance: shown.index(instance["InstanceId"]) if instance["InstanceId"] in shown else 0)

    HOOKS.events.register("after-call.auto-scaling.DescribeAutoScalingGroups", reorder, unique_id="reorder")
    try:
        invoke(CHECK)
    finally:
        HOOKS.events.unregister("after-call.auto-scaling.DescribeAutoScalingGroups", unique_id="reorder")
    assert busy <= set(world.ids())  # every busy instance still serves
    assert set(world.ids()) == busy
    assert world.desired() == len(busy)


# --- As an IAM principal that holds iam-policy-group-example.json's actions (moto's IAM) ------------------------------
ROOT = Path(__file__).resolve().parent.parent


def group_policy_actions() -> list[str]:
    """The example group policy's actions, as moto names them (CloudWatch is monitoring:*)."""
    policy = json.loads((ROOT / "iam-policy-group-example.json").read_text())
    actions = [a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
    return [action.replace("cloudwatch:", "monitoring:") for action in actions]


def as_group_principal(monkeypatch: pytest.MonkeyPatch, world: GroupWorld, actions: list[str]) -> None:
    """The function's calls made by a user allowed `actions` only, moto enforcing IAM on every service (helpers.act_as
    says why the actions are granted on "*"); the test's own calls by an administrator."""
    admin = act_as(monkeypatch, actions)
    monkeypatch.setattr(world, "ec2", admin.client("ec2"))
    monkeypatch.setattr(world, "autoscaling", admin.client("autoscaling"))


# Each action of the group policy, and what a function without it cannot do: (an invocation and its setup, and where
# the answer names the missing action).
Needed = Callable[[Invoke, GroupWorld, ScriptedBackend], dict[str, Any]]


def _start_from_zero(invoke: Invoke, world: GroupWorld, backend: ScriptedBackend) -> dict[str, Any]:
    world.set_desired(0)
    return body_of(invoke(http_event()))


def _check_a_busy_and_an_idle(invoke: Invoke, world: GroupWorld, backend: ScriptedBackend) -> dict[str, Any]:
    world.set_desired(2)
    first, second = world.ids()
    say(backend, first, BUSY)
    say(backend, second, IDLE)
    return invoke(CHECK)


def _check_unreachable(invoke: Invoke, world: GroupWorld, backend: ScriptedBackend) -> dict[str, Any]:
    for instance_id in world.ids():
        say(backend, instance_id, Answer(500, b"{}"))
    return invoke(CHECK)


def _release_a_stopped_hold(invoke: Invoke, world: GroupWorld, backend: ScriptedBackend) -> dict[str, Any]:
    world.tag({bo.HOLD_TAG: "stopped", "backend-orchestrator:hold-until": (world.clock.now() + timedelta(hours=1))
               .isoformat()})  # fmt: skip
    return invoke({"action": "release"})


def _preflight(invoke: Invoke, world: GroupWorld, backend: ScriptedBackend) -> dict[str, Any]:
    return invoke({"action": "preflight"})


HOLD_RUNNING = {"action": "hold", "state": "running", "hours": 1}
NEEDED: dict[str, Needed] = {
    "autoscaling:DescribeAutoScalingGroups": lambda invoke, world, backend: invoke({"action": "status"}),
    "ec2:DescribeInstances": _check_a_busy_and_an_idle,
    "autoscaling:SetDesiredCapacity": _start_from_zero,
    "autoscaling:SetInstanceProtection": _check_a_busy_and_an_idle,
    "autoscaling:CreateOrUpdateTags": lambda invoke, world, backend: invoke(HOLD_RUNNING),
    "autoscaling:DeleteTags": _release_a_stopped_hold,
    "monitoring:GetMetricData": _check_unreachable,
    "autoscaling:DescribePolicies": _preflight,
}


def test_as_the_example_group_policy_every_group_action_goes_through(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert set(NEEDED) <= set(group_policy_actions())
    as_group_principal(monkeypatch, world, group_policy_actions())
    for name, needs in NEEDED.items():
        said = json.dumps(needs(invoke, world, backend))
        assert "aws_access_denied" not in said, (name, said)
        assert "was denied" not in said, (name, said)
    assert world.desired() == 1  # the last check_idle scaled the group in: those calls went through


@pytest.mark.parametrize("removed", list(NEEDED))
def test_without_one_action_of_the_example_group_policy_the_answer_names_it(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend, monkeypatch: pytest.MonkeyPatch, removed: str
) -> None:
    as_group_principal(monkeypatch, world, [action for action in group_policy_actions() if action != removed])
    said = json.dumps(NEEDED[removed](invoke, world, backend))
    assert removed.replace("monitoring:", "cloudwatch:") in said  # the function names the IAM action a role needs


# --- preflight -----------------------------------------------------------------------------------------------------
def checks_of(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["check"]: check for check in body["checks"]}


def test_preflight_of_a_group_checks_what_a_group_needs_and_writes_nothing(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    from tools.preflight import render

    for instance_id in world.ids():
        say(backend, instance_id, IDLE)
    backend.answer("/health", Answer.json({"status": "ok"}))
    world.clear()
    body = invoke({"action": "preflight"})
    checks = checks_of(body)
    assert list(checks) == list(bo.GROUP_CHECKS)
    assert checks["group"] == {"check": "group", "status": "ok", "fix": None,
                               "detail": "desired capacity 2 (MinSize 0, MaxSize 4), 2 in service"}  # fmt: skip
    assert checks["warm_pool"]["status"] == "warn"
    assert "put-warm-pool --auto-scaling-group-name pyelli-backend --pool-state Stopped" in checks["warm_pool"]["fix"]
    assert (checks["scaling_policies"]["status"], checks["permissions"]["status"]) == ("ok", "skip")
    assert "cannot be verified without a write" in checks["permissions"]["detail"]
    contract = checks["activity_contract"]
    assert (contract["status"], contract["detail"]) == ("ok", "each of the 2 instances in service answers the contract")
    assert world.writes() == []
    assert render(body).splitlines()[0] == f"preflight of {GROUP}"


def test_preflight_warns_of_a_min_size_names_what_cannot_be_woken_and_a_backend_that_does_not_answer(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    world.autoscaling.update_auto_scaling_group(AutoScalingGroupName=GROUP, MinSize=1)
    world.autoscaling.put_warm_pool(AutoScalingGroupName=GROUP, PoolState="Stopped",
                                    InstanceReusePolicy={"ReuseOnScaleIn": True})  # fmt: skip
    first, second = world.ids()
    say(backend, first, IDLE)
    body = invoke({"action": "preflight"})
    checks = checks_of(body)
    assert checks["group"]["status"] == "warn"
    assert "it never goes below MinSize" in checks["group"]["detail"]
    assert checks["warm_pool"]["status"] == "ok"
    assert checks["activity_contract"]["status"] == "fail"
    assert checks["activity_contract"]["detail"].startswith(f"{second}: GET ")
    world.autoscaling.update_auto_scaling_group(AutoScalingGroupName=GROUP, MinSize=0, MaxSize=0, DesiredCapacity=0)
    assert checks_of(invoke({"action": "preflight"}))["group"]["status"] == "fail"


# --- Odd answers, failures half-way, and many instances ------------------------------------------------------------
def test_a_protection_that_fails_scales_nothing_in(invoke: Invoke, world: GroupWorld, backend: ScriptedBackend) -> None:
    # Injected: moto has no IAM here; this is Auto Scaling's answer to a role without SetInstanceProtection.
    first, second = world.ids()
    say(backend, first, BUSY)
    say(backend, second, IDLE)
    denied = autoscaling_error("AccessDenied", "not authorized")
    HOOKS.events.register("before-call.auto-scaling.SetInstanceProtection", lambda **_: denied)
    body = invoke(CHECK)
    assert (body["error"]["code"], body["iam_action"]) == ("aws_access_denied", "autoscaling:SetInstanceProtection")
    assert (world.desired(), world.ids()) == (2, [first, second])  # nothing scaled in: the busy one was not protected


def test_a_drained_backend_whose_scale_in_fails_is_told_to_resume(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    # Injected: moto never refuses SetDesiredCapacity; real Auto Scaling does (a ValidationError, throttling).
    first, second = world.ids()
    say(backend, first, BUSY)
    say(backend, second, IDLE)
    backend.answer(f"/{second}/api/drain", Answer.json({"drained": True}))
    refused = autoscaling_error("ValidationError", "New SetDesiredCapacity value 1 is below min value 2")
    HOOKS.events.register("before-call.auto-scaling.SetDesiredCapacity", lambda **_: refused)
    body = invoke(CHECK, DRAIN_PATH="/api/drain")
    assert (body["decision"], body["drained"]) == ("keep", True)
    assert "drained, but SetDesiredCapacity failed" in body["reason"]
    assert "The backend was told to resume work" in body["reason"]
    assert [(call.method, call.path) for call in backend.calls if "drain" in call.path] == [
        ("POST", f"/{second}/api/drain"), ("DELETE", f"/{second}/api/drain")]  # fmt: skip
    assert world.ids() == [first, second]


def test_an_empty_group_is_skipped_and_a_group_with_a_protected_straggler_judges_it(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    world.set_desired(0)
    world.clear()
    assert (invoke(CHECK)["decision"], world.writes()) == ("skip", [])
    world.set_desired(1)
    [straggler] = world.ids()
    world.autoscaling.set_instance_protection(AutoScalingGroupName=GROUP, InstanceIds=[straggler],
                                              ProtectedFromScaleIn=True)  # fmt: skip
    world.autoscaling.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=0)  # protected: it stays
    say(backend, straggler, IDLE)
    world.clear()
    body = invoke(CHECK)
    assert (body["previous_state"], body["state"], body["decision"]) == ("running", "stopping", "stop")
    decided = by_id(body)[straggler]
    assert (decided["decision"], decided["protected"], decided["signal"]) == ("stop", False, "activity")
    # Unprotected, and the group is at 0 already: Auto Scaling ends it (moto does not reconcile a group by itself).
    assert world.writes() == ["SetInstanceProtection"]
    assert world.protected() == set()


def test_an_instance_without_the_address_the_url_names_is_kept_and_says_why(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    def no_dns_name(parsed: dict[str, Any], **_: Any) -> None:  # as EC2 answers for an instance in a VPC without DNS
        for reservation in parsed["Reservations"]:
            for instance in reservation["Instances"]:
                instance["PrivateDnsName"] = ""

    HOOKS.events.register("after-call.ec2.DescribeInstances", no_dns_name)
    body = invoke(CHECK, BACKEND_INSTANCE_URL=backend.url + "/{private_dns_name}")
    assert body["decision"] == "keep"
    assert all("lacks an address BACKEND_INSTANCE_URL names" in i["reason"] for i in body["instances"])
    assert backend.calls == []


def test_protection_is_set_fifty_instances_a_call(invoke: Invoke, world: GroupWorld, backend: ScriptedBackend) -> None:
    world.autoscaling.update_auto_scaling_group(AutoScalingGroupName=GROUP, MaxSize=60)
    world.set_desired(60)
    for instance_id in world.ids():
        say(backend, instance_id, BUSY)
    world.clear()
    invoke(CHECK)
    protections = [params["InstanceIds"] for name, params in world.sent if name == "SetInstanceProtection"]
    assert [len(ids) for ids in protections] == [50, 10]
    assert len(world.protected()) == 60


def test_metrics_are_read_in_one_call_per_166_instances(world: GroupWorld, clock: FakeClock) -> None:
    ids = [f"i-{n:017x}" for n in range(170)]
    deadline = bo.Deadline.from_context(None, clock.as_clock())
    samples = bo.instance_metrics(REGION, ids, clock.now() - timedelta(hours=1), clock.now(), deadline)
    assert world.calls == ["GetMetricData", "GetMetricData"]
    assert [len(params["MetricDataQueries"]) for _, params in world.sent] == [498, 12]
    assert set(samples) == set(ids)


def autoscaling_error(code: str, message: str) -> Any:
    """What a botocore before-call hook returns to make an Auto Scaling call fail with `code`."""
    from botocore.awsrequest import AWSResponse, HTTPHeaders

    return AWSResponse("https://autoscaling.test/", 400, HTTPHeaders(), None), {
        "Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": 400}}  # fmt: skip


def test_the_desired_capacity_never_drops_below_the_instances_still_protected(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend
) -> None:
    first, second = world.ids()
    say(backend, first, BUSY)
    say(backend, second, BUSY)
    invoke(CHECK)  # both protected
    world.autoscaling.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)  # an operator's, or a policy
    assert world.ids() == [first, second]  # both protected: neither ends
    say(backend, first, IDLE)
    world.clear()
    body = invoke(CHECK)
    assert world.writes() == ["SetInstanceProtection"]  # the idle one's protection ends; 1 stays the desired capacity
    assert (world.desired(), body["group"]["desired_after"]) == (1, 1)
    assert by_id(body)[second]["protected"] is True


def test_out_of_time_before_the_scale_in_keeps_every_instance_and_says_so(
    invoke: Invoke, world: GroupWorld, backend: ScriptedBackend, clock: FakeClock
) -> None:
    first, second = world.ids()
    say(backend, first, BUSY)
    say(backend, second, IDLE)
    # The protection of the busy one takes what was left of the invocation's time: no time for the scale-in.
    HOOKS.events.register("after-call.auto-scaling.SetInstanceProtection", lambda **_: clock.advance(59))
    world.clear()
    body = invoke(CHECK)
    assert (body["decision"], body["signal"]) == ("keep", "deadline")
    assert "but out of time before Auto Scaling SetDesiredCapacity" in body["reason"]
    assert [instance["decision"] for instance in body["instances"]] == ["keep", "keep"]  # the idle one was not removed
    assert world.writes() == ["SetInstanceProtection"]
