"""start: Describe first (its tags carry any hold), StartInstances only for a stopped instance, waiting out a
stop in progress, clear errors otherwise."""

from __future__ import annotations

from typing import Any

import pytest

from tests import function as bo
from tests.helpers import (
    Ec2World,
    FakeClock,
    FakeContext,
    Invoke,
    RealContext,
    body_of,
    ec2_error,
    http_event,
    refused_port,
)


@pytest.mark.parametrize(
    ("state", "status", "previous", "mutations"),
    [
        pytest.param("stopped", 202, "stopped", ["DescribeInstances", "StartInstances"], id="stopped-starts"),
        pytest.param("pending", 200, "pending", ["DescribeInstances"], id="pending-already-up"),
        pytest.param("running", 200, "running", ["DescribeInstances"], id="running-already-up"),
    ],
)
def test_start_describes_then_starts_only_a_stopped_instance(
    invoke: Invoke, ec2: Ec2World, state: str, status: int, previous: str, mutations: list[str]
) -> None:
    ec2.set_state(state)
    response = invoke(http_event(body='{"action": "start"}'))
    body = body_of(response)
    assert response["statusCode"] == status
    assert body["previous_state"] == previous
    assert ec2.calls == mutations  # an instance already up costs the one Describe
    assert ec2.state() in ("pending", "running")


@pytest.mark.parametrize("state", ["terminated", "shutting-down"])
def test_start_on_a_gone_instance_names_it(invoke: Invoke, ec2: Ec2World, state: str) -> None:
    # Describe says so first: no StartInstances (which real EC2 would refuse with IncorrectInstanceState).
    ec2.set_state(state)
    response = invoke(http_event())
    body = body_of(response)
    assert response["statusCode"] == 409
    assert body["error"]["code"] == "instance_terminated"
    assert ec2.instance_id in body["error"]["message"]
    assert body["state"] == state
    assert ec2.calls == ["DescribeInstances"]


def test_start_waits_for_a_stopping_instance_then_starts_it(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock
) -> None:
    ec2.set_state("stopping")
    polls = 0

    def sleep(seconds: float) -> None:
        nonlocal polls
        clock.sleep(seconds)
        polls += 1
        if polls == 4:  # EC2 finishes the stop after four polls
            ec2.set_state("stopped")

    fast = bo.Clock(now=clock.now, monotonic=clock.monotonic, sleep=sleep)
    response = bo.handle(http_event(), FakeContext(clock, timeout_seconds=60), env, clock=fast)
    body = body_of(response)
    assert response["statusCode"] == 202, body
    assert (body["previous_state"], body["state"]) == ("stopped", "pending")  # EC2's answer to the second start
    assert clock.sleeps == [bo.STOPPING_POLL_SECONDS] * 4
    assert ec2.calls == ["DescribeInstances"] * 5 + ["StartInstances"]


def test_start_gives_up_within_the_invocation_time_with_retry_after(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock
) -> None:
    ec2.set_state("stopping")  # and it never finishes
    context = FakeContext(clock, timeout_seconds=30)
    response = bo.handle(http_event(), context, env, clock=clock.as_clock())
    body = body_of(response)
    assert response["statusCode"] == 503
    assert response["headers"]["Retry-After"] == str(bo.RETRY_AFTER_SECONDS)
    assert body["error"]["code"] == "still_stopping"
    assert body["state"] == "stopping"
    # It waited while a Describe and a StartInstances could still follow the wait, and no longer.
    reserve = bo.ANSWER_MARGIN_SECONDS + bo.STOPPING_POLL_SECONDS + 2 * bo.aws_call_seconds(1)
    assert context.get_remaining_time_in_millis() >= (reserve - bo.STOPPING_POLL_SECONDS) * 1000
    assert sum(clock.sleeps) > 30 - reserve - bo.STOPPING_POLL_SECONDS
    assert ec2.mutations() == []  # it was seen stopping, so no StartInstances was sent
    assert ec2.state() == "stopping"


def test_someone_else_starts_it_while_we_wait(ec2: Ec2World, env: dict[str, str], clock: FakeClock) -> None:
    ec2.set_state("stopping")

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        ec2.set_state("pending")

    fast = bo.Clock(now=clock.now, monotonic=clock.monotonic, sleep=sleep)
    response = bo.handle(http_event(), FakeContext(clock), env, clock=fast)
    assert response["statusCode"] == 200
    assert body_of(response)["state"] == "pending"
    assert ec2.mutations() == []


def test_a_start_refused_because_the_instance_began_stopping_waits_the_stop_out(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock
) -> None:
    # Describe says stopped; by the time StartInstances arrives, the instance is stopping (someone started and stopped
    # it meanwhile): real EC2 answers IncorrectInstanceState (RealEc2 plays it), and the function waits for the stop.
    ec2.set_state("stopped")
    described: list[int] = []

    def begin_stopping(**_: Any) -> None:
        described.append(1)
        if len(described) == 1:
            ec2.set_state("stopping")

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        ec2.set_state("stopped")

    ec2.on_function_calls("after-call.ec2.DescribeInstances", begin_stopping)
    fast = bo.Clock(now=clock.now, monotonic=clock.monotonic, sleep=sleep)
    response = bo.handle(http_event(), FakeContext(clock), env, clock=fast)
    assert response["statusCode"] == 202, body_of(response)
    assert ec2.calls == [
        "DescribeInstances",
        "StartInstances",
        "DescribeInstances",
        "DescribeInstances",
        "StartInstances",
    ]
    assert clock.sleeps == [bo.STOPPING_POLL_SECONDS]


def test_a_missing_instance_is_the_configurations_fault_a_500(invoke: Invoke, ec2: Ec2World) -> None:
    response = invoke(http_event(), INSTANCE_ID="i-0123456789abcdef0")
    assert response["statusCode"] == 500
    assert body_of(response)["error"]["code"] == "instance_not_found"


def test_missing_instance_says_check_instance_id_and_region(invoke: Invoke, ec2: Ec2World) -> None:
    body = invoke({"action": "start"}, INSTANCE_ID="i-0123456789abcdef0")
    assert body["error"]["code"] == "instance_not_found"
    assert "i-0123456789abcdef0" in body["error"]["message"]
    assert "INSTANCE_ID" in body["error"]["message"]
    assert "AWS_REGION" in body["error"]["message"]


def fail_like_ec2(ec2: Ec2World, operation: str, code: str = "UnauthorizedOperation") -> None:
    """Make one EC2 operation fail with a real EC2 error code (moto enforces no IAM and has capacity)."""

    def refuse(**_: Any) -> Any:
        return ec2_error(code, "You are not authorized to perform this operation.")

    ec2.on_function_calls(f"before-call.ec2.{operation}", refuse)


@pytest.mark.parametrize(
    ("event", "operation", "iam_action"),
    [
        pytest.param({"action": "start"}, "StartInstances", "ec2:StartInstances", id="start"),
        pytest.param({"action": "check_idle"}, "DescribeInstances", "ec2:DescribeInstances", id="describe"),
        pytest.param({"action": "stop"}, "StopInstances", "ec2:StopInstances", id="stop"),
    ],
)
def test_access_denied_names_the_missing_iam_action(
    invoke: Invoke, ec2: Ec2World, event: dict[str, str], operation: str, iam_action: str
) -> None:
    fail_like_ec2(ec2, operation)
    if operation == "StartInstances":
        ec2.set_state("stopped")  # only a stopped instance is started
    response = invoke(http_event(body='{"action": "start"}') if event["action"] == "start" else event)
    body = body_of(response)
    assert body["error"]["code"] == "aws_access_denied"
    assert body["iam_action"] == iam_action
    assert iam_action in body["error"]["message"]
    if "statusCode" in response:
        assert response["statusCode"] == 502


def test_no_capacity_is_a_503_to_retry_later(invoke: Invoke, ec2: Ec2World) -> None:
    # moto always has capacity: inject EC2's answer, as it comes when a zone runs out of an instance type.
    ec2.set_state("stopped")
    fail_like_ec2(ec2, "StartInstances", code="InsufficientInstanceCapacity")
    response = invoke(http_event())
    body = body_of(response)
    assert response["statusCode"] == 503
    assert response["headers"]["Retry-After"] == str(bo.CAPACITY_RETRY_AFTER_SECONDS)
    assert body["error"]["code"] == "insufficient_capacity"
    assert "no capacity for instance" in body["error"]["message"]
    assert body["aws_error_code"] == "InsufficientInstanceCapacity"
    assert ec2.state() == "stopped"


def test_other_aws_errors_are_502_with_the_aws_code(invoke: Invoke, ec2: Ec2World) -> None:
    ec2.set_state("stopped")
    fail_like_ec2(ec2, "StartInstances", code="InstanceLimitExceeded")
    response = invoke(http_event())
    body = body_of(response)
    assert response["statusCode"] == 502
    assert body["error"]["code"] == "aws_error"
    assert body["aws_error_code"] == "InstanceLimitExceeded"
    assert "InstanceLimitExceeded" in body["error"]["message"]


def test_unreachable_ec2_endpoint_is_502(monkeypatch: pytest.MonkeyPatch) -> None:
    # No moto here: the client goes to a closed port on 127.0.0.1 and fails before AWS answers.
    env = {"INSTANCE_ID": "i-0123456789abcdef0", "AWS_REGION": "us-east-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", f"http://127.0.0.1:{refused_port()}")
    bo.aws_client.cache_clear()
    body = bo.handle({"action": "start"}, RealContext(60), env)
    assert body["error"]["code"] == "aws_unreachable"
