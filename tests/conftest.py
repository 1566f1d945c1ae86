"""Fixtures: a hermetic environment, moto's EC2, a fake clock, a scripted backend and moto's server.
What the tests share besides fixtures lives in tests/helpers.py."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"  # before moto loads: saves a second per test

import boto3
import pytest
from moto import mock_aws

from tests import function as bo
from tests.helpers import (
    HOOKS,
    REGION,
    Ec2World,
    FakeClock,
    Invoke,
    MotoServer,
    ScriptedBackend,
    function_session,
    invoke_handler,
    setup_client,
    stopped_instance,
)
from tools.harness import RealEc2, moto_state

FUNCTION_SESSION = function_session()  # the default session for the whole run: the function's clients come from it


# --- Hermetic: no real AWS, no network beyond loopback -------------------------------------------
def _loopback_only(host: object) -> None:
    name = str(host)
    if name == "localhost":
        return
    try:
        if ipaddress.ip_address(name).is_loopback:
            return
    except ValueError:
        pass
    raise ConnectionRefusedError(f"tests may only reach 127.0.0.1, not {name!r}")


@pytest.fixture(autouse=True)
def hermetic(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fake credentials, no profile, and sockets that can reach nothing but loopback."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "BOTO")) or name in {*bo.VARIABLES, "AUTH_TOKEN"}:
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _loopback_only(address[0])
        real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        _loopback_only(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    HOOKS.reset()
    boto3.DEFAULT_SESSION = FUNCTION_SESSION
    yield
    # The function's clients outlive the test unless it pointed them elsewhere (an endpoint, other keys).
    if boto3.DEFAULT_SESSION is not FUNCTION_SESSION or any(n.startswith("AWS_ENDPOINT_URL") for n in os.environ):
        bo.aws_client.cache_clear()
    HOOKS.reset()


# --- Time -----------------------------------------------------------------------------------------
@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- EC2 in moto ------------------------------------------------------------------------------------
@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        boto3.DEFAULT_SESSION = FUNCTION_SESSION  # mock_aws starts boto3 without a default session
        yield


@pytest.fixture
def ec2(aws: None, clock: FakeClock) -> Ec2World:
    """A running moto instance, real EC2's behaviour where moto's differs, and every call the function's own clients
    make (this test's hooks, HOOKS)."""
    setup = setup_client("ec2")  # a session of its own: the test's own calls are neither counted nor changed
    launched = setup.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.medium")
    instance_id = launched["Instances"][0]["InstanceId"]

    real = RealEc2(clock.now, partial(moto_state, setup))
    real.install(HOOKS.events)
    world = Ec2World(setup, instance_id, real)

    def count(model: Any, **_: Any) -> None:
        world.calls.append(model.name)

    world.on_function_calls("before-parameter-build", count)  # once per API call of any service, not per attempt
    return world


@pytest.fixture
def topic(aws: None) -> tuple[str, Any]:
    """An SNS topic the function publishes to, and a function that reads what reached its SQS subscriber."""
    sns, sqs = setup_client("sns"), setup_client("sqs")
    topic_arn = sns.create_topic(Name="backend-orchestrator")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="notifications")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)

    def received() -> list[dict[str, Any]]:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
        return [json.loads(message["Body"]) for message in messages]

    return topic_arn, received


@pytest.fixture(scope="session")
def backend_server() -> Iterator[ScriptedBackend]:
    server = ScriptedBackend()
    yield server
    server.close()


@pytest.fixture
def backend(backend_server: ScriptedBackend) -> ScriptedBackend:
    """A real HTTP backend on 127.0.0.1 that answers 404 until the test scripts a path."""
    backend_server.reset()
    return backend_server


@pytest.fixture
def long_running(ec2: Ec2World, clock: FakeClock) -> Ec2World:
    """The instance has been up for two hours."""
    ec2.set_launch_time(clock.now() - timedelta(hours=2))
    return ec2


@pytest.fixture
def env(ec2: Ec2World, backend: ScriptedBackend) -> dict[str, str]:
    return {"INSTANCE_ID": ec2.instance_id, "BACKEND_BASE_URL": backend.url, "AWS_REGION": REGION}


@pytest.fixture
def invoke(env: dict[str, str], clock: FakeClock) -> Invoke:
    """Call the handler as the runtime would, with the fake clock and a 60 s context."""

    def call(event: Any, **overrides: str) -> dict[str, Any]:
        return invoke_handler(event, {**env, **overrides}, clock=clock)

    return call


@pytest.fixture
def log_lines(capsys: pytest.CaptureFixture[str]) -> Callable[[], list[dict[str, Any]]]:
    """The JSON lines the function wrote to stdout, parsed (log lines and EMF lines)."""

    def read() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
        for line in lines:  # every metric emitted is one the function declares (the alarms rely on the names)
            for directive in line.get("_aws", {}).get("CloudWatchMetrics", []):
                assert {metric["Name"] for metric in directive["Metrics"]} <= bo.METRICS, line
        return lines

    return read


# --- moto's real HTTP server on 127.0.0.1 -------------------------------------------------------------
@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's AWS over real HTTP on a free loopback port; its state is reset per test by `moto_url`."""
    server = MotoServer()
    yield server.url
    server.close()


@pytest.fixture
def moto_url(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A clean moto server, and the function's AWS clients (EC2, CloudWatch, SNS) pointed at it."""
    import requests

    requests.post(f"{moto_server}/moto-api/reset", timeout=5).raise_for_status()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    bo.aws_client.cache_clear()
    return moto_server


@pytest.fixture
def running(moto_url: str) -> str:
    """A running instance in moto's server."""
    instance_id = stopped_instance(moto_url)
    setup_client("ec2", moto_url).start_instances(InstanceIds=[instance_id])
    return instance_id
