"""The whole system on 127.0.0.1, with no AWS account: for `make demo`, `make serve` and the tests.

- moto's server as the EC2 endpoint, with one stopped instance;
- a `BackendHost` that plays the instance: it serves the reference backend while moto says the
  instance is running (booting for a moment first), and nothing while it is stopped;
- the function behind a local Function URL: each HTTP request becomes a payload 2.0 event for
  `lambda_handler`, with a context whose remaining time is honest, and the answer goes back as HTTP.

Everything binds to 127.0.0.1 and stops when the `Sandbox` context exits.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import boto3

import backend_orchestrator
from examples.reference_backend import ReferenceBackend
from orchestrator.aws import aws_client
from orchestrator.logs import LOG, METRICS_LOG, JsonFormatter
from tools.harness import REGION, MotoServer, RealContext, RealEc2, free_port, invoke, moto_state, published_periods

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"}
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/x-www-form-urlencoded")
Handler = Callable[[object, object], dict[str, Any]]


# --- The local Function URL -------------------------------------------------------------------------------
class LocalFunctionUrl(ThreadingHTTPServer):
    """An HTTP server that calls the handler as a Lambda Function URL would (payload format 2.0)."""

    daemon_threads = True

    def __init__(self, handler: Handler = backend_orchestrator.lambda_handler, timeout_seconds: float = 60.0) -> None:
        super().__init__(("127.0.0.1", 0), _FunctionUrlRequest)
        self.handler = handler
        self.timeout_seconds = timeout_seconds
        self.actions: list[str] = []  # what each request asked for, as the function reads it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _FunctionUrlRequest(BaseHTTPRequestHandler):
    server: LocalFunctionUrl
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._invoke()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _invoke(self) -> None:
        event = self._event()
        try:
            self.server.actions.append(str(json.loads(event.get("body") or "{}").get("action", "start")))
        except (ValueError, AttributeError):
            self.server.actions.append("?")
        result = self.server.handler(event, RealContext(self.server.timeout_seconds))
        if "statusCode" not in result:  # a Function URL turns a plain object into a 200 JSON answer
            result = {"statusCode": 200, "headers": {"Content-Type": "application/json"}, "body": json.dumps(result)}
        body = result.get("body") or ""
        raw = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
        self.send_response(int(result["statusCode"]))
        for name, value in (result.get("headers") or {}).items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _event(self) -> dict[str, Any]:
        """https://docs.aws.amazon.com/lambda/latest/dg/urls-invocation.html#urls-request-payload"""
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers: dict[str, str] = {}
        for name, value in self.headers.items():  # lower-cased, repeated headers joined by commas
            key = name.lower()
            headers[key] = f"{headers[key]},{value}" if key in headers else value
        is_text = headers.get("content-type", "text/plain").startswith(TEXT_TYPES)
        now = datetime.now(UTC)
        event: dict[str, Any] = {
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": url.path or "/",
            "rawQueryString": url.query,
            "headers": headers,
            "requestContext": {
                "accountId": "anonymous",
                "apiId": "local",
                "domainName": headers.get("host", "127.0.0.1"),
                "domainPrefix": "local",
                "http": {
                    "method": self.command,
                    "path": url.path or "/",
                    "protocol": self.request_version,
                    "sourceIp": self.client_address[0],
                    "userAgent": headers.get("user-agent", ""),
                },
                "requestId": str(uuid.uuid4()),
                "routeKey": "$default",
                "stage": "$default",
                "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
                "timeEpoch": int(now.timestamp() * 1000),
            },
            "isBase64Encoded": bool(raw) and not is_text,
        }
        if url.query:
            event["queryStringParameters"] = dict(parse_qsl(url.query))
        if raw:
            event["body"] = raw.decode() if is_text else base64.b64encode(raw).decode()
        return event

    def log_message(self, *_: Any) -> None:
        pass


# --- The instance's stand-in ------------------------------------------------------------------------------
WATCH_SECONDS = 0.5  # how often the host looks at the instance's state; a start or stop it is told of, at once


class BackendHost:
    """Serves the reference backend on a fixed port while moto says the instance is running; with
    `crashed` set, the instance runs but its backend process does not (nothing listens). It looks at the state
    every WATCH_SECONDS, and at once when `poked` is set (RealEc2 sets it after each start or stop it sees)."""

    def __init__(
        self,
        ec2: Any,
        instance_id: str,
        boot_seconds: float,
        on_change: Callable[[str, str], None],
        poked: threading.Event,
    ) -> None:
        self.ec2, self.instance_id, self.boot_seconds, self.on_change = ec2, instance_id, boot_seconds, on_change
        self.port = free_port()
        self.backend: ReferenceBackend | None = None
        self.powered = False
        self.crashed = False
        self._poked = poked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="backend-host", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def wait_until_off(self, give_up_at: float) -> None:
        """Wait, until the monotonic time `give_up_at` at most, for the host to have powered off."""
        while self.powered and time.monotonic() < give_up_at:
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._poked.set()
        self._thread.join()  # a watcher still inside a Describe would power the backend on again after this
        self._power_off()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._poked.wait(WATCH_SECONDS)
            self._poked.clear()
            described = self.ec2.describe_instances(InstanceIds=[self.instance_id])["Reservations"][0]["Instances"][0]
            state = described["State"]["Name"]
            if self._stop.is_set():
                return
            if state == "running" and not self.powered:
                self._power_on()
            elif state != "running" and self.powered:
                self._power_off()
                self.on_change(state, "backend down: connections refused")
                self.powered = False  # only now: whoever waits for it sees the line above first

    def _power_on(self) -> None:
        self.powered = True
        if self.crashed:
            self.on_change("running", f"backend crashed: nothing listens on {self.url}")
            return
        self.backend = ReferenceBackend(("127.0.0.1", self.port), self.boot_seconds)
        threading.Thread(target=self.backend.serve_forever, name="reference-backend", daemon=True).start()
        self.on_change("running", f"backend booting on {self.url} ({self.boot_seconds:g}s)")

    def _power_off(self) -> None:
        if self.backend is not None:
            self.backend.shutdown()
            self.backend.server_close()
            self.backend = None


# --- All of it together ------------------------------------------------------------------------------------
class Sandbox:
    """moto + the backend host + the local Function URL, configured for one another."""

    def __init__(
        self,
        *,
        idle_timeout_seconds: int = 3,
        http_timeout_seconds: float = 1.0,
        boot_seconds: float = 1.0,
        function_timeout_seconds: float = 60.0,
        environment: dict[str, str] | None = None,
        function_log: Path | None = None,
        on_change: Callable[[str, str], None] = lambda _state, _message: None,
    ) -> None:
        self.idle_timeout_seconds = idle_timeout_seconds
        self.http_timeout_seconds = http_timeout_seconds
        self.boot_seconds = boot_seconds
        self.function_timeout_seconds = function_timeout_seconds
        self.extra_environment = environment or {}
        self.function_log = function_log
        self.on_change = on_change

    def __enter__(self) -> Sandbox:
        self._stack = ExitStack()
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()

    def invoke(self, event: object) -> dict[str, Any]:
        """A direct invocation, as EventBridge with constant input makes it."""
        return invoke(event, os.environ, timeout_seconds=self.function_timeout_seconds)

    def state(self) -> str:
        return self.real_ec2.state(self.instance_id)

    def publish_instance_metrics(self, cpu_percent: float, network_bytes: float) -> None:
        """Put what EC2 would have published for the instance into moto's AWS/EC2: one datapoint per metric for
        each 5-minute period the function's CloudWatch fallback reads now."""
        cloudwatch = boto3.client("cloudwatch", region_name=REGION, endpoint_url=self.moto_url)
        dimensions = [{"Name": "InstanceId", "Value": self.instance_id}]
        values = {"CPUUtilization": cpu_percent, "NetworkIn": network_bytes / 2, "NetworkOut": network_bytes / 2}
        data: list[Any] = [
            {"MetricName": name, "Dimensions": dimensions, "Value": value, "Timestamp": period + timedelta(minutes=1)}
            for period in published_periods(datetime.now(UTC), self.idle_timeout_seconds)
            for name, value in values.items()
        ]
        cloudwatch.put_metric_data(Namespace="AWS/EC2", MetricData=data)

    def set_launch_time(self, when: datetime) -> None:
        """The instance has run since `when` (as DescribeInstances tells it: see RealEc2)."""
        self.real_ec2.set_launch_time(self.instance_id, when)

    def _start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
        moto = MotoServer()
        self._stack.callback(moto.close)
        self.moto_url = moto.url
        # No default AMIs: moto would spend a second loading them, and any image ID will do here.
        setup = {**FAKE_CREDENTIALS, "AWS_DEFAULT_REGION": REGION, "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}
        self._stack.enter_context(_environment(setup))
        if boto3.DEFAULT_SESSION is None:
            boto3.setup_default_session()
        # The function's clients come from the default session: real EC2's behaviour is played on them (RealEc2).
        self.ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=self.moto_url)

        changed = threading.Event()  # set after each start or stop the function's clients make: the host looks at once
        self.real_ec2 = RealEc2(lambda: datetime.now(UTC), partial(moto_state, self.ec2), on_change=changed.set)
        self._stack.callback(self.real_ec2.install(boto3.DEFAULT_SESSION.events))  # type: ignore[union-attr]
        launched = self.ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="c6i.xlarge")
        self.instance_id = launched["Instances"][0]["InstanceId"]
        self.ec2.stop_instances(InstanceIds=[self.instance_id])

        host_ = BackendHost(self.ec2, self.instance_id, self.boot_seconds, self.on_change, changed)
        host_.start()
        self._stack.callback(host_.close)
        self.backend_host = host_
        self.backend_url = host_.url

        self._stack.enter_context(
            _environment(
                {
                    "AWS_REGION": REGION,
                    "AWS_ENDPOINT_URL": self.moto_url,  # EC2, CloudWatch and SNS alike
                    "AWS_EC2_METADATA_DISABLED": "true",
                    "INSTANCE_ID": self.instance_id,
                    "BACKEND_BASE_URL": self.backend_url,
                    "IDLE_TIMEOUT_SECONDS": str(self.idle_timeout_seconds),
                    "HTTP_TIMEOUT_SECONDS": str(self.http_timeout_seconds),
                    **self.extra_environment,
                },
                unset=("AWS_PROFILE",),
            )
        )
        if self.function_log is not None:
            self._stack.enter_context(_function_logs_to(self.function_log))
        function_url = LocalFunctionUrl(timeout_seconds=self.function_timeout_seconds)
        threading.Thread(target=function_url.serve_forever, name="function-url", daemon=True).start()
        self._stack.callback(function_url.server_close)
        self._stack.callback(function_url.shutdown)
        self.function_url = function_url.url
        self.function_url_server = function_url  # its .actions: what the app asked; its .handler: swappable


@contextmanager
def _environment(values: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    """Set (and unset) environment variables, and rebuild the function's EC2 client; restore on exit."""
    saved = {name: os.environ.get(name) for name in (*values, *unset)}
    os.environ.update(values)
    for name in unset:
        os.environ.pop(name, None)
    aws_client.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        aws_client.cache_clear()


@contextmanager
def _function_logs_to(path: Path) -> Iterator[None]:
    """Send the function's JSON log and metric lines to a file, to keep a demo's timeline readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
        saved = {logger: logger.handlers[:] for logger in (LOG, METRICS_LOG)}
        LOG.handlers = [handler]
        metrics = logging.StreamHandler(stream)
        metrics.setFormatter(logging.Formatter("%(message)s"))
        METRICS_LOG.handlers = [metrics]
        try:
            yield
        finally:
            for logger, handlers in saved.items():
                logger.handlers = handlers
