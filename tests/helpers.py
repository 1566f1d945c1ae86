"""What the tests share: sample events, a fake clock and context, moto's EC2 seen through the function's own
calls, and servers on 127.0.0.1 (moto's, a scripted backend, a silent one), each stopped by whoever starts it.

`ScriptedBackend` answers each path as a test scripts it, well or badly: at once, never, one byte at a
time in its headers or its body, or without end. It speaks raw HTTP/1.1 over a socket so that it can
misbehave in ways an HTTP framework would not let it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import boto3
import botocore.hooks
import botocore.loaders
import botocore.session
from botocore.awsrequest import AWSResponse, HTTPHeaders
from hypothesis import strategies as st

from tests import function as bo
from tools.harness import REGION, FakeClock, FakeContext, MotoServer, RealContext, RealEc2, moto_state, refused_port
from tools.harness import invoke as invoke_handler

__all__ = ["REGION", "FakeClock", "FakeContext", "MotoServer", "RealContext", "invoke_handler", "refused_port"]

EVENTS = Path(__file__).parent / "events"
ACTIVITY_PATH = "/api/last-activity"
Invoke = Callable[..., dict[str, Any]]
CHECK = {"action": "check_idle"}

# Any JSON value, for the property tests.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=15,
)


# --- Events ---------------------------------------------------------------------------------------
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


def body_of(response: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of an HTTP response, or a direct invocation's result as it is."""
    if "statusCode" in response:
        parsed: dict[str, Any] = json.loads(response["body"])
        return parsed
    return response


def invoke_for_real(
    action: str, instance_id: str, backend_url: str, context_seconds: float = 60, **env: str
) -> dict[str, Any]:
    """The handler against real servers (moto's, a backend) as Lambda runs it: INIT builds the clients, then the
    invocation runs with a context that counts down for real."""
    environ = {"INSTANCE_ID": instance_id, "AWS_REGION": REGION, "BACKEND_BASE_URL": backend_url, **env}
    bo.warm_clients(environ)
    return invoke_handler({"action": action}, environ, timeout_seconds=context_seconds)


# --- EC2 in moto ---------------------------------------------------------------------------------
@dataclass
class Ec2World:
    """A moto instance, real EC2's behaviour where moto's differs (RealEc2), and the function's AWS API calls."""

    client: Any
    instance_id: str
    real: RealEc2
    calls: list[str] = field(default_factory=list)

    @staticmethod
    def on_function_calls(event_name: str, handler: Callable[..., Any], *, first: bool = False) -> None:
        """Hook the function's AWS calls, for this test only (see FunctionHooks)."""
        (HOOKS.events.register_first if first else HOOKS.events.register)(event_name, handler)

    def set_state(self, name: str) -> None:
        """Put the instance in a state through moto's API; a transient one (pending, stopping, shutting-down),
        which moto never shows, is shown on top of the state it leads to."""
        settled = {"pending": "running", "stopping": "stopped", "shutting-down": "terminated"}.get(name, name)
        ids = [self.instance_id]
        {"running": self.client.start_instances, "stopped": self.client.stop_instances,
         "terminated": self.client.terminate_instances}[settled](InstanceIds=ids)  # fmt: skip
        self.real.show_state(self.instance_id, name if name != settled else None)

    def set_launch_time(self, when: datetime) -> None:
        self.real.set_launch_time(self.instance_id, when)

    def state(self) -> str:
        return self.real.state(self.instance_id)

    def mutations(self) -> list[str]:
        return [c for c in self.calls if c in ("StartInstances", "StopInstances")]


# One botocore loader for every session the tests make: a fresh session would parse each service's model again
# (EC2's is large), which cost more than half of the suite's time.
LOADER = botocore.loaders.create_loader()


class FunctionHooks:
    """The hooks a test puts on the function's AWS calls. The function's clients live for the whole run (one per
    service and endpoint, built from function_session(), as Lambda keeps them for a container's life): building
    them for every test cost more than most tests. Each test gets empty `events`; the session forwards the events
    the tests hook to them, ahead of botocore's own handlers (and of moto's, for before-send)."""

    FAMILIES = ("provide-client-params", "before-parameter-build", "before-call", "after-call", "before-send")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # Aliased as a session's events are: a hook on "monitoring" reaches CloudWatch's calls.
        self.events = botocore.hooks.EventAliaser(botocore.hooks.HierarchicalEmitter())

    def forward(self, event_name: str, **kwargs: Any) -> Any:
        return self.events.emit_until_response(event_name, **kwargs)[1]


HOOKS = FunctionHooks()


def function_session() -> boto3.session.Session:
    """A session for the function's clients: this test's hooks (HOOKS) reach every client built from it."""
    session = fresh_session()
    for family in FunctionHooks.FAMILIES:
        session.events.register_first(family, HOOKS.forward)
    return session


def fresh_session() -> boto3.session.Session:
    """A boto3 session of its own (hooks registered on it reach only its clients), sharing the parsed models."""
    core = botocore.session.get_session()
    core.register_component("data_loader", LOADER)
    return boto3.session.Session(botocore_session=core)


@functools.cache
def setup_client(service: str, endpoint_url: str | None = None) -> Any:
    """A client for a test's own setup, from a session of its own: the hooks on the function's calls miss it. One
    per service and endpoint for the whole run (building one costs more than most tests): moto's mock intercepts a
    client whenever it is on, and the fake credentials never change."""
    session = fresh_session()
    return session.client(service, region_name=REGION, endpoint_url=endpoint_url)  # type: ignore[call-overload]


def ec2_error(code: str, message: str) -> tuple[AWSResponse, dict[str, Any]]:
    """What a botocore before-call hook returns to make the call fail with EC2's error `code`."""
    return AWSResponse("https://ec2.test/", 400, HTTPHeaders(), None), {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }


# --- moto's server on 127.0.0.1 -------------------------------------------------------------------
def stopped_instance(endpoint: str) -> str:
    """A stopped instance in moto's server, as the backend sits between uses."""
    client = setup_client("ec2", endpoint)
    instance_id: str = client.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    client.stop_instances(InstanceIds=[instance_id])
    return instance_id


def instance_state(endpoint: str, instance_id: str) -> str:
    return moto_state(setup_client("ec2", endpoint), instance_id)


# --- A backend that misbehaves on purpose, and one that never answers -----------------------------
Mode = Literal[
    "normal",
    "slow",
    "raw",
    "silent",
    "drop",
    "trickle-status",
    "trickle-headers",
    "trickle-length",
    "trickle-close",
    "endless",
]
TRICKLE_FOR_SECONDS = 30.0  # a trickle stops by itself, so that a broken bound shows as a slow test, not a hang


@dataclass(frozen=True)
class Answer:
    """What the backend sends for one path."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    mode: Mode = "normal"
    interval: float = 0.2  # seconds between trickled bytes; before a slow answer

    @classmethod
    def json(cls, payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class ScriptedBackend(socketserver.ThreadingTCPServer):
    """A server on 127.0.0.1 whose answers the test sets per path, one or a sequence (the last one then repeats);
    it records every request."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, list[Answer]] = {}
        self._routes_lock = threading.Lock()
        self.calls: list[Call] = []
        self.on_request: Callable[[Call], None] = lambda _call: None  # e.g. to move a test's fake clock
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, name="scripted-backend", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, path: str, *answers: Answer) -> None:
        """Answer `path` with these, in turn; the last one for every request after."""
        self.routes[path] = list(answers)

    def next_answer(self, path: str) -> Answer:
        with self._routes_lock:
            queued = self.routes.get(path) or [Answer(404, b'{"error": "no route"}')]
            return queued.pop(0) if len(queued) > 1 else queued[0]

    def reset(self) -> None:
        self.routes.clear()
        self.calls.clear()
        self.on_request = lambda _call: None

    def close(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self._thread.join(5)


class _Handler(socketserver.BaseRequestHandler):
    server: ScriptedBackend

    def handle(self) -> None:
        call = self._read_request()
        if call is None:
            return
        self.server.calls.append(call)
        self.server.on_request(call)
        answer = self.server.next_answer(call.path.split("?")[0])
        with contextlib.suppress(OSError):  # the client hung up, as it should when it gives up
            self._play(answer)

    def _read_request(self) -> Call | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(4096)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            body += self.request.recv(length - len(body))
        return Call(method, path, headers, body)

    def _play(self, answer: Answer) -> None:
        status_line = f"HTTP/1.1 {answer.status} Scripted\r\n".encode()
        headers = "".join(f"{name}: {value}\r\n" for name, value in answer.headers.items()).encode()
        if answer.mode == "slow":
            self.server.stopping.wait(answer.interval)
        if answer.mode in ("normal", "slow"):
            length = f"Content-Length: {len(answer.body)}\r\nConnection: close\r\n\r\n".encode()
            self.request.sendall(status_line + headers + length + answer.body)
        elif answer.mode == "raw":  # the body is the whole answer, status line and headers included, as written
            self.request.sendall(answer.body)
        elif answer.mode == "silent":
            self.server.stopping.wait(TRICKLE_FOR_SECONDS)
        elif answer.mode == "drop":  # the connection closes without an answer: refused, reset, a proxy gone
            self.request.shutdown(socket.SHUT_RDWR)
        elif answer.mode == "trickle-status":
            self._trickle(status_line + headers + b"\r\n" + answer.body, answer.interval)
        elif answer.mode == "trickle-headers":
            self.request.sendall(status_line + b"X-Slow: ")
            self._trickle(b"x" * 10_000, answer.interval)
        elif answer.mode == "trickle-length":
            self.request.sendall(status_line + headers + f"Content-Length: {len(answer.body)}\r\n\r\n".encode())
            self._trickle(answer.body, answer.interval)
        elif answer.mode == "trickle-close":
            self.request.sendall(status_line + headers + b"Connection: close\r\n\r\n")
            self._trickle(answer.body, answer.interval)
        else:  # endless: a body with no length, sent as fast as the client takes it
            self.request.sendall(status_line + headers + b"Connection: close\r\n\r\n")
            block = b"[" * 65536
            give_up_at = time.monotonic() + TRICKLE_FOR_SECONDS
            while not self.server.stopping.is_set() and time.monotonic() < give_up_at:
                self.request.sendall(block)

    def _trickle(self, data: bytes, interval: float) -> None:
        give_up_at = time.monotonic() + TRICKLE_FOR_SECONDS
        for index in range(len(data)):
            if self.server.stopping.wait(interval) or time.monotonic() > give_up_at:
                return
            self.request.sendall(data[index : index + 1])


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers: an EC2 endpoint or backend that hangs."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self.held.append(self.listener.accept()[0])
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for connection in self.held:
            connection.close()
        self.listener.close()


# --- As an IAM principal (moto's IAM) ------------------------------------------------------------------------------
def act_as(monkeypatch: Any, actions: list[str]) -> boto3.session.Session:
    """From now on the function's calls are made by an IAM user allowed these actions, and moto enforces IAM; returns
    a session of an administrator for the test's own calls. moto matches actions only against statements whose
    Resource is "*" and ignores conditions, so the actions are granted on "*": the policies' own resources and
    conditions are checked by reading them (test_deployment)."""
    from moto import settings as moto_settings
    from moto.core.authorization import ActionAuthenticatorMixin

    iam = setup_client("iam")

    def user(name: str, allowed: list[str]) -> dict[str, str]:
        iam.create_user(UserName=name)
        document = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": allowed, "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName="role", PolicyDocument=json.dumps(document))
        key: dict[str, str] = iam.create_access_key(UserName=name)["AccessKey"]
        return key

    admin, key = user("test-setup", ["*"]), user("orchestrator", actions)
    session = function_session()  # the function's clients come from the default session: one with the user's keys
    session._session.set_credentials(key["AccessKeyId"], key["SecretAccessKey"])
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", session)
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    bo.aws_client.cache_clear()
    return boto3.session.Session(admin["AccessKeyId"], admin["SecretAccessKey"], region_name=REGION)
