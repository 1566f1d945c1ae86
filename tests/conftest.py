"""Shared fixtures: a hermetic environment, moto's EC2, a fake clock and event loaders."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"  # before moto loads: saves a second per test

import boto3
import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from moto import mock_aws
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

import backend_orchestrator as bo
from tests.servers import ScriptedBackend
from tools.sandbox import set_moto_launch_time, stop_moto_server

EVENTS = Path(__file__).parent / "events"
REGION = "us-east-1"
ACTIVITY_PATH = "/api/last-activity"
STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}


def load_event(name: str) -> dict[str, Any]:
    """A sample event from tests/events/, written from AWS's documented shapes."""
    event: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return event


def http_event(
    method: str = "POST", body: str | None = None, headers: dict[str, str] | None = None, *, base64: bool = False
) -> dict[str, Any]:
    """A Function URL event (payload 2.0) with the given method, body and extra headers."""
    event = copy.deepcopy(load_event("function_url_start"))
    event["requestContext"]["http"]["method"] = method
    event["body"] = body
    event["isBase64Encoded"] = base64
    event["headers"].update(headers or {})
    return event


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
        if name.startswith(("AWS_", "BOTO")) or name in {v for k, v in vars(bo).items() if k.startswith("ENV_")}:
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
    bo.aws_client.cache_clear()
    yield
    bo.aws_client.cache_clear()


# --- Time -----------------------------------------------------------------------------------------
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

    def as_clock(self) -> bo.Clock:
        return bo.Clock(now=self.now, monotonic=self.monotonic, sleep=self.sleep)


@dataclass
class FakeContext:
    """A Lambda context whose remaining time follows the fake clock."""

    clock: FakeClock
    timeout_seconds: float = 60.0
    aws_request_id: str = "req-0001"
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock.mono

    def get_remaining_time_in_millis(self) -> int:
        return int((self.timeout_seconds - (self.clock.mono - self.started)) * 1000)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- EC2 in moto ------------------------------------------------------------------------------------
@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


@dataclass
class Ec2World:
    """A moto instance plus what real EC2 does that moto does not; counts the function's AWS API calls."""

    client: Any
    instance_id: str
    calls: list[str] = field(default_factory=list)

    @staticmethod
    def on_function_calls(event_name: str, handler: Callable[..., Any]) -> None:
        """Hook every EC2 client the function builds from now on (it keeps one per number of attempts)."""
        boto3.DEFAULT_SESSION.events.register(event_name, handler)  # type: ignore[union-attr]

    def set_state(self, name: str) -> None:
        # moto changes state at once; a test that needs pending, stopping or shutting-down sets it.
        instance = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].get_instance(self.instance_id)
        instance._state.name, instance._state.code = name, STATE_CODES[name]

    def set_launch_time(self, when: datetime) -> None:
        set_moto_launch_time(self.instance_id, when)

    def state(self) -> str:
        reservations = self.client.describe_instances(InstanceIds=[self.instance_id])["Reservations"]
        return str(reservations[0]["Instances"][0]["State"]["Name"])

    def mutations(self) -> list[str]:
        return [c for c in self.calls if c in ("StartInstances", "StopInstances")]


def setup_client(service: str) -> Any:
    """A client for a test's own setup, from a session of its own: the hooks on the function's calls miss it."""
    return boto3.session.Session().client(service, region_name=REGION)  # type: ignore[call-overload]


def ec2_error(code: str, message: str) -> tuple[AWSResponse, dict[str, Any]]:
    """What a botocore before-call hook returns to make the call fail with EC2's error `code`."""
    return AWSResponse("https://ec2.test/", 400, HTTPHeaders(), None), {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }


@pytest.fixture
def ec2(aws: None, clock: FakeClock) -> Ec2World:
    """A running moto instance; the hooks below see every call the function's own clients make."""
    boto3.setup_default_session()  # a fresh session: hooks registered on it reach only this test's clients
    setup = boto3.client("ec2", region_name=REGION)  # built before the hooks: the test's own calls are not counted
    launched = setup.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.medium")
    instance_id = launched["Instances"][0]["InstanceId"]
    world = Ec2World(setup, instance_id)
    bo.aws_client.cache_clear()

    def count(model: Any, **_: Any) -> None:
        world.calls.append(model.name)

    def start_like_real_ec2(params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        # moto starts an instance in any state; real EC2 answers IncorrectInstanceState for
        # stopping, shutting-down and terminated (EC2 API reference, StartInstances).
        state = world.state()
        if state in ("stopping", "shutting-down", "terminated"):
            return ec2_error(
                "IncorrectInstanceState",
                f"The instance '{instance_id}' is not in a state from which it can be started.",
            )
        return None

    def refresh_launch_time(**_: Any) -> None:
        # Real EC2 sets LaunchTime at each start; moto keeps the first one.
        world.set_launch_time(clock.now())

    world.on_function_calls("before-parameter-build", count)  # once per API call of any service, not per attempt
    world.on_function_calls("before-call.ec2.StartInstances", start_like_real_ec2)
    world.on_function_calls("after-call.ec2.StartInstances", refresh_launch_time)
    return world


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
def env(ec2: Ec2World, backend: ScriptedBackend) -> dict[str, str]:
    return {"INSTANCE_ID": ec2.instance_id, "BACKEND_BASE_URL": backend.url, "AWS_REGION": REGION}


Invoke = Callable[..., dict[str, Any]]


@pytest.fixture
def invoke(env: dict[str, str], clock: FakeClock) -> Invoke:
    """Call the handler as the runtime would, with the fake clock and a 60 s context."""

    def call(event: Any, **overrides: str) -> dict[str, Any]:
        return bo.handle(event, FakeContext(clock), {**env, **overrides}, clock=clock.as_clock())

    return call


def body_of(response: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of an HTTP response, or a direct invocation's result as it is."""
    if "statusCode" in response:
        parsed: dict[str, Any] = json.loads(response["body"])
        return parsed
    return response


@pytest.fixture
def log_lines(capsys: pytest.CaptureFixture[str]) -> Callable[[], list[dict[str, Any]]]:
    """The JSON lines the function wrote to stdout, parsed (log lines and EMF lines)."""

    def read() -> list[dict[str, Any]]:
        return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]

    return read


# --- moto's real HTTP server on 127.0.0.1 -------------------------------------------------------------
@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's EC2 over real HTTP on a free loopback port; its state is reset per test by `moto_url`."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    stop_moto_server(server)


@pytest.fixture
def moto_url(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A clean moto server, and the function's AWS clients (EC2, CloudWatch, SNS) pointed at it."""
    import requests

    requests.post(f"{moto_server}/moto-api/reset", timeout=5).raise_for_status()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    bo.aws_client.cache_clear()
    return moto_server


def stopped_instance(endpoint: str) -> str:
    """A stopped instance in moto's server, as the backend sits between uses."""
    client = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
    instance_id: str = client.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    client.stop_instances(InstanceIds=[instance_id])
    return instance_id


def instance_state(endpoint: str, instance_id: str) -> str:
    client = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
    reservations = client.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])
