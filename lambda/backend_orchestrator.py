"""Wake the PyElli backend's EC2 instance on demand and stop it once it has been idle.

Actions:
  start       start the instance and answer at once (the app then polls the backend's /health)
  status      the instance's state and whether the backend answers its health check
  check_idle  ask the backend how long it has been idle; stop the instance past the timeout
  stop        stop the instance now (direct or scheduled invocation only)

Events accepted:
  - Lambda Function URL and API Gateway HTTP API (payload 2.0), API Gateway REST API (1.0):
    POST {"action": "start" | "status"} (an empty body means start), or GET ?action=status.
    https://docs.aws.amazon.com/lambda/latest/dg/urls-invocation.html#urls-payloads
    https://docs.aws.amazon.com/apigateway/latest/developerguide/http-api-develop-integrations-lambda.html
  - Direct invocation, EventBridge rule or Scheduler with constant input: {"action": ...};
    no "action" means start.
  - An EventBridge "Scheduled Event" without constant input: treated as check_idle, so that a
    schedule can never keep the backend awake.
    https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-run-lambda-schedule.html
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple, TypeGuard, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

# --- Environment variables: every name the function reads ------------------------------------
ENV_INSTANCE_ID: Final = "INSTANCE_ID"
ENV_BACKEND_BASE_URL: Final = "BACKEND_BASE_URL"
ENV_IDLE_TIMEOUT_SECONDS: Final = "IDLE_TIMEOUT_SECONDS"
ENV_AWS_REGION: Final = "AWS_REGION"
ENV_HTTP_TIMEOUT_SECONDS: Final = "HTTP_TIMEOUT_SECONDS"
ENV_STOP_HIBERNATE: Final = "STOP_HIBERNATE"
ENV_DRY_RUN: Final = "DRY_RUN"
ENV_AUTH_TOKEN: Final = "AUTH_TOKEN"  # noqa: S105 - the variable's name, not a secret
ENV_LAST_ACTIVITY_PATH: Final = "LAST_ACTIVITY_PATH"
ENV_HEALTH_PATH: Final = "HEALTH_PATH"
ENV_LOG_LEVEL: Final = "LOG_LEVEL"
ENV_METRICS_NAMESPACE: Final = "METRICS_NAMESPACE"

# --- Limits and timings ----------------------------------------------------------------------
MAX_BODY_BYTES: Final = 16 * 1024
MAX_ACTIVITY_BYTES: Final = 64 * 1024
HEALTH_TIMEOUT_SECONDS: Final = 2.0  # status is polled while the instance boots: answer fast
STOPPING_POLL_SECONDS: Final = 3.0
SAFETY_MARGIN_SECONDS: Final = 5.0  # time kept back from the invocation to answer 503 cleanly
RETRY_AFTER_SECONDS: Final = 10
DEFAULT_REMAINING_MS: Final = 60_000  # invoked without a Lambda context (local use)
EPOCH_MILLISECONDS_ABOVE: Final = 1e11  # 1e11 s is the year 5138; 1e11 ms is 1973
EC2_CLIENT_CONFIG: Final = BotoConfig(
    retries={"mode": "standard", "total_max_attempts": 3}, connect_timeout=3, read_timeout=10
)

INSTANCE_ID_PATTERN: Final = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")
BOOLEANS: Final = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The activity contract (README): accepted field names, preferred first.
IDLE_SECONDS_FIELDS: Final = ("idle_seconds", "idleSeconds", "seconds_since_last_activity")
LAST_ACTIVITY_FIELDS: Final = ("last_activity", "last_activity_at", "lastActivity", "last_request_at")
IN_FLIGHT_FIELDS: Final = ("active_requests", "active_jobs")

# The IAM action each EC2 call needs, named when AWS refuses it.
IAM_ACTIONS: Final = {
    "DescribeInstances": "ec2:DescribeInstances",
    "StartInstances": "ec2:StartInstances",
    "StopInstances": "ec2:StopInstances",
}
ACCESS_DENIED_CODES: Final = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})
# EC2 API error codes: https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
NOT_FOUND_CODES: Final = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
GONE_STATES: Final = frozenset({"shutting-down", "terminated"})

T = TypeVar("T")


class Action(StrEnum):
    START = "start"
    STATUS = "status"
    CHECK_IDLE = "check_idle"
    STOP = "stop"


HTTP_ACTIONS: Final = (Action.START, Action.STATUS)


class Source(StrEnum):
    HTTP = "http"
    SCHEDULE = "schedule"
    DIRECT = "direct"


class Decision(StrEnum):
    SKIP = "skip"
    KEEP = "keep"
    STOP = "stop"
    WOULD_STOP = "would_stop"


# --- Errors: each class carries its HTTP status and a stable code ----------------------------
class OrchestratorError(Exception):
    """An answer to the caller that says what went wrong and what to do."""

    STATUS_CODE: ClassVar[int] = 500
    CODE: ClassVar[str] = "internal_error"
    HEADERS: ClassVar[Mapping[str, str]] = {}

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.CODE
        self.details = details


class BadRequestError(OrchestratorError):
    STATUS_CODE = 400
    CODE = "bad_request"


class UnauthorizedError(OrchestratorError):
    STATUS_CODE = 401
    CODE = "unauthorized"
    HEADERS: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": "Bearer"}


class ForbiddenError(OrchestratorError):
    STATUS_CODE = 403
    CODE = "action_not_allowed"


class MethodNotAllowedError(OrchestratorError):
    STATUS_CODE = 405
    CODE = "method_not_allowed"
    HEADERS: ClassVar[Mapping[str, str]] = {"Allow": "GET, POST"}


class InstanceGoneError(OrchestratorError):
    """The instance is shutting down or terminated: no action brings it back."""

    STATUS_CODE = 409
    CODE = "instance_terminated"


class PayloadTooLargeError(OrchestratorError):
    STATUS_CODE = 413
    CODE = "payload_too_large"


class ConfigError(OrchestratorError):
    STATUS_CODE = 500
    CODE = "config_error"
    auth_token: str | None = None  # read before the failure, to authenticate HTTP callers first


class AwsError(OrchestratorError):
    STATUS_CODE = 502
    CODE = "aws_error"


class StillStoppingError(OrchestratorError):
    """The instance is still stopping; safe to retry after Retry-After seconds."""

    STATUS_CODE = 503
    CODE = "still_stopping"
    HEADERS: ClassVar[Mapping[str, str]] = {"Retry-After": str(RETRY_AFTER_SECONDS)}


# --- Configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    instance_id: str
    backend_base_url: str | None = None
    idle_timeout_seconds: int = 900
    region: str | None = None
    http_timeout_seconds: float = 5.0
    stop_hibernate: bool = False
    dry_run: bool = False
    auth_token: str | None = field(default=None, repr=False)
    last_activity_path: str = "/api/last-activity"
    health_path: str = "/health"
    log_level: str = "INFO"
    metrics_namespace: str = "BackendOrchestrator"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        """Read and validate every variable; the first bad one raises a ConfigError naming it."""

        def read(name: str, parse: Callable[[str, str], T], default: T) -> T:
            raw = environ.get(name, "").strip()
            return parse(name, raw) if raw else default

        auth_token = read(ENV_AUTH_TOKEN, _parse_text, None)
        try:
            return cls(
                instance_id=read(ENV_INSTANCE_ID, _parse_instance_id, ""),
                backend_base_url=read(ENV_BACKEND_BASE_URL, _parse_base_url, None),
                idle_timeout_seconds=read(ENV_IDLE_TIMEOUT_SECONDS, _parse_positive_int, 900),
                region=read(ENV_AWS_REGION, _parse_text, None),
                http_timeout_seconds=read(ENV_HTTP_TIMEOUT_SECONDS, _parse_positive_float, 5.0),
                stop_hibernate=read(ENV_STOP_HIBERNATE, _parse_bool, False),
                dry_run=read(ENV_DRY_RUN, _parse_bool, False),
                auth_token=auth_token,
                last_activity_path=read(ENV_LAST_ACTIVITY_PATH, _parse_path, "/api/last-activity"),
                health_path=read(ENV_HEALTH_PATH, _parse_path, "/health"),
                log_level=read(ENV_LOG_LEVEL, _parse_log_level, "INFO"),
                metrics_namespace=read(ENV_METRICS_NAMESPACE, _parse_text, "BackendOrchestrator"),
            )
        except ConfigError as error:
            error.auth_token = auth_token
            raise

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ConfigError(
                f"{ENV_INSTANCE_ID} is not set. Set it to the backend's EC2 instance ID, e.g. i-0abc123def4567890."
            )

    def require_backend_url(self, action: Action) -> str:
        if self.backend_base_url is None:
            raise ConfigError(
                f"{ENV_BACKEND_BASE_URL} is not set and {action} needs it. Set it to the backend's "
                "base URL as the Lambda reaches it, e.g. http://10.0.1.50:8000."
            )
        return self.backend_base_url


def _parse_text(name: str, raw: str) -> str:
    return raw


def _parse_instance_id(name: str, raw: str) -> str:
    if not INSTANCE_ID_PATTERN.fullmatch(raw):
        raise ConfigError(
            f"{name}={raw!r} is not an EC2 instance ID: expected i- and 8 or 17 lowercase hex digits, "
            "e.g. i-0abc123def4567890."
        )
    return raw


def _parse_base_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(
            f"{name}={raw!r} is not an http(s) base URL: expected e.g. http://10.0.1.50:8000 or https://backend.example.com."
        )
    return raw.rstrip("/")


def _parse_positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} is not a positive whole number of seconds, e.g. 900.")
    return value


def _parse_positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name}={raw!r} is not a positive number of seconds, e.g. 5 or 2.5.")
    return value


def _parse_bool(name: str, raw: str) -> bool:
    if raw.lower() not in BOOLEANS:
        raise ConfigError(f"{name}={raw!r} is not a boolean: use true/false, 1/0 or yes/no.")
    return BOOLEANS[raw.lower()]


def _parse_path(name: str, raw: str) -> str:
    if not raw.startswith("/") or "?" in raw or "#" in raw:
        raise ConfigError(f"{name}={raw!r} is not a URL path: expected it to start with /, e.g. /api/last-activity.")
    return raw


def _parse_log_level(name: str, raw: str) -> str:
    if raw.upper() not in LOG_LEVELS:
        raise ConfigError(f"{name}={raw!r} is not a log level: use one of {', '.join(LOG_LEVELS)}.")
    return raw.upper()


# --- Events ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpRequest:
    """The parts of a Function URL or API Gateway event the function reads."""

    method: str
    body: str
    is_base64: bool
    query: Mapping[str, str]
    authorization: str | None = field(repr=False)


class EventRequest(NamedTuple):
    """A direct or scheduled invocation: its action is known from the event alone."""

    source: Source
    action: Action
    warning: str | None = None


def parse_event(event: object) -> HttpRequest | EventRequest:
    """Tell an HTTP request from a direct or scheduled invocation; an event of no known shape is a 400."""
    if not isinstance(event, dict):
        raise BadRequestError(
            f"The event is a JSON {_json_type(event)}, not an object. "
            'Invoke with an object such as {"action": "check_idle"}.',
            code="invalid_event",
        )
    if _is_http(event):
        http = event if "httpMethod" in event else event["requestContext"]["http"]
        headers = _member(event, "headers", dict, {})
        # Function URLs lower-case header names; REST APIs pass them as the client sent them.
        authorization = next((str(v) for k, v in headers.items() if str(k).lower() == "authorization"), None)
        return HttpRequest(
            method=_member(http, "httpMethod" if http is event else "method", str, "").upper(),
            body=_member(event, "body", str, ""),
            is_base64=_member(event, "isBase64Encoded", bool, False),
            query=_member(event, "queryStringParameters", dict, {}),
            authorization=authorization,
        )
    if "requestContext" in event:
        raise BadRequestError(
            "The event has a requestContext but is neither a Function URL / HTTP API (payload 2.0) "
            'nor a REST API event: invoke through the Function URL, or directly with {"action": ...}.',
            code="unsupported_event",
        )
    if "action" in event:
        return EventRequest(Source.DIRECT, _action(event["action"]))
    if event.get("detail-type") == "Scheduled Event" and event.get("source") in ("aws.events", "aws.scheduler"):
        warning = (
            "Scheduled event without constant input, run as check_idle: set the target's input to "
            '{"action": "check_idle"}.'
        )
        return EventRequest(Source.SCHEDULE, Action.CHECK_IDLE, warning)
    if "detail-type" in event:
        raise BadRequestError(
            f"An EventBridge event of type {str(event['detail-type'])[:60]!r} carries no action: "
            'set the target\'s input to a constant such as {"action": "check_idle"}.',
            code="unsupported_event",
        )
    return EventRequest(Source.DIRECT, Action.START)


def _member(event: Mapping[str, Any], name: str, kind: type[T], default: T) -> T:
    """A field of an HTTP event, of the type AWS sends; null means the default."""
    value = event.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise BadRequestError(
            f"The HTTP event's {name} is a JSON {_json_type(value)}, which AWS never sends: "
            "invoke through the Function URL or API Gateway.",
            code="unsupported_event",
        )
    return value


def _is_http(event: object) -> bool:
    if not isinstance(event, dict):
        return False
    request_context = event.get("requestContext")
    return "httpMethod" in event or (
        isinstance(request_context, dict) and isinstance(request_context.get("http"), dict)
    )


def authorize(request: HttpRequest, token: str | None) -> None:
    """With AUTH_TOKEN set, require `Authorization: Bearer <token>`, compared in constant time."""
    if token is None:
        return
    import hmac  # only paid by HTTP calls with a token

    scheme, _, given = (request.authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise UnauthorizedError("Missing or wrong bearer token: send the header 'Authorization: Bearer <AUTH_TOKEN>'.")


def http_action(request: HttpRequest) -> Action:
    """The action an authorised HTTP request asks for, or the 4xx that says what is wrong."""
    if request.method == "GET":
        action = _action(request.query.get("action", Action.STATUS))
        if action is not Action.STATUS:
            raise MethodNotAllowedError(f'GET only serves action=status. Send POST {{"action": "{action}"}} instead.')
        return action
    if request.method != "POST":
        raise MethodNotAllowedError(
            f"Method {request.method or '(none)'} is not allowed: "
            'use POST with {"action": "start"}, or GET ?action=status.'
        )
    body = _decode_body(request)
    if not body.strip():
        return Action.START
    try:
        payload = json.loads(body)
    except ValueError as error:
        raise BadRequestError(
            f'The body is not valid JSON ({error}). Send {{"action": "start"}}.', code="malformed_json"
        ) from None
    if not isinstance(payload, dict):
        raise BadRequestError(
            f'The body is a JSON {_json_type(payload)}, not an object. Send {{"action": "start"}}.',
            code="invalid_body",
        )
    action = _action(payload.get("action", Action.START))
    if action not in HTTP_ACTIONS:
        raise ForbiddenError(
            f"Action {action.value!r} is not allowed over HTTP, only start and status are: "
            f"{action} runs from the schedule or a direct invocation."
        )
    return action


def _decode_body(request: HttpRequest) -> str:
    raw = request.body.encode()
    if request.is_base64:
        import base64
        import binascii

        try:
            raw = base64.b64decode(raw, validate=True)
        except binascii.Error:
            raise BadRequestError(
                "The body is marked isBase64Encoded but is not valid base64.", code="invalid_base64"
            ) from None
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(
            f'The body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted. Send {{"action": "start"}}.'
        )
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise BadRequestError(
            'The body is not UTF-8 text. Send {"action": "start"} as JSON.', code="malformed_json"
        ) from None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _action(value: object) -> Action:
    known = ", ".join(a.value for a in Action)
    if not isinstance(value, str):
        raise BadRequestError(
            f"The action must be a string, one of {known}; got a JSON {_json_type(value)}.", code="invalid_action"
        )
    try:
        return Action(value)
    except ValueError:
        raise BadRequestError(f"Unknown action {_short(value)}: use one of {known}.", code="unknown_action") from None


# --- The idle decision: pure, plain values in, a decision and its reason out -------------------
class Activity(NamedTuple):
    """What the backend reported: seconds idle (None if only busy was reported) and busy."""

    idle_seconds: float | None
    busy_reason: str | None = None


class ActivityUnknown(NamedTuple):
    """The backend could not tell us how idle it is; the reason names the failure."""

    reason: str


class Verdict(NamedTuple):
    decision: Decision
    reason: str
    idle_seconds: float | None = None


def decide(
    state: str,
    launch_time: datetime,
    activity: Activity | ActivityUnknown | None,
    now: datetime,
    idle_timeout_seconds: int,
) -> Verdict:
    """Stop only a running instance whose backend is known to be idle past the timeout."""
    if state != "running":
        return Verdict(Decision.SKIP, f"instance is {state}, not running")
    if activity is None:
        return Verdict(Decision.KEEP, "backend activity was not checked")
    if isinstance(activity, ActivityUnknown):
        return Verdict(
            Decision.KEEP, f"backend activity unknown ({activity.reason}); never stop on missing information"
        )
    if activity.busy_reason:
        return Verdict(Decision.KEEP, f"backend is busy ({activity.busy_reason})", activity.idle_seconds)
    if activity.idle_seconds is None:
        return Verdict(Decision.KEEP, "backend reported no idle time")
    # A freshly started instance gets a full timeout even if the backend remembers older activity.
    uptime_seconds = max(0.0, (now - launch_time).total_seconds())
    idle_seconds = min(activity.idle_seconds, uptime_seconds)
    if idle_seconds > idle_timeout_seconds:
        return Verdict(
            Decision.STOP, f"idle for {_seconds(idle_seconds)}, over the {idle_timeout_seconds}s timeout", idle_seconds
        )
    return Verdict(
        Decision.KEEP, f"idle for {_seconds(idle_seconds)}, within the {idle_timeout_seconds}s timeout", idle_seconds
    )


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value >= 60 else f"{value:.1f}s"


def parse_activity(payload: object, now: datetime) -> Activity | ActivityUnknown:
    """Read the activity contract (README) from the backend's JSON."""
    if not isinstance(payload, dict):
        return ActivityUnknown(f"activity is a JSON {_json_type(payload)}, not an object")
    busy = payload.get("busy", False)
    if not isinstance(busy, bool):
        return ActivityUnknown(f"'busy' is {_short(busy)}, not true or false")
    busy_reason = "busy is true" if busy else None
    for name in IN_FLIGHT_FIELDS:
        count = payload.get(name, 0)
        if not _is_number(count) or count < 0:
            return ActivityUnknown(f"{name!r} is {_short(count)}, not a number >= 0")
        if count > 0 and busy_reason is None:
            busy_reason = f"{name}={count}"
    idle_seconds = _idle_seconds(payload, now)
    if isinstance(idle_seconds, ActivityUnknown):
        return idle_seconds
    if idle_seconds is None and busy_reason is None:
        return ActivityUnknown(
            f"no idle time in the activity payload: send one of {', '.join(IDLE_SECONDS_FIELDS + LAST_ACTIVITY_FIELDS)}"
        )
    return Activity(idle_seconds, busy_reason)


def _idle_seconds(payload: Mapping[str, Any], now: datetime) -> float | ActivityUnknown | None:
    for name in IDLE_SECONDS_FIELDS:
        if name in payload:
            value = payload[name]
            if not _is_number(value) or value < 0:
                return ActivityUnknown(f"{name!r} is {_short(value)}, not a number of seconds >= 0")
            return float(value)
    for name in LAST_ACTIVITY_FIELDS:
        if name in payload:
            last_activity = _timestamp(payload[name])
            if last_activity is None:
                return ActivityUnknown(f"{name!r} is {_short(payload[name])}, not an ISO-8601 time or epoch seconds")
            return max(0.0, (now - last_activity).total_seconds())  # a future time (skew) is idle 0
    return None


def _timestamp(value: object) -> datetime | None:
    if _is_number(value) and value >= 0:
        seconds = value / 1000 if value > EPOCH_MILLISECONDS_ABOVE else value
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())  # accepts a trailing Z since 3.11
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- EC2: every call in one place, errors told apart by their code ----------------------------
class InstanceInfo(NamedTuple):
    state: str
    launch_time: datetime


class Transition(NamedTuple):
    previous_state: str
    state: str


@cache
def ec2_client(region: str | None) -> EC2Client:
    """One client per container and region: standard retries, explicit timeouts."""
    return boto3.client("ec2", region_name=region, config=EC2_CLIENT_CONFIG)


class Ec2:
    """The three EC2 calls the function makes, on one instance."""

    def __init__(self, client: EC2Client, instance_id: str, now: Callable[[], datetime]) -> None:
        self.client = client
        self.instance_id = instance_id
        self.now = now

    def describe(self) -> InstanceInfo:
        with self._call("DescribeInstances"):
            reservations = self.client.describe_instances(InstanceIds=[self.instance_id])["Reservations"]
        instances = [instance for reservation in reservations for instance in reservation.get("Instances", [])]
        if not instances:
            raise self._not_found()
        # Real EC2 always sends LaunchTime; were it missing, count the instance as just started (safe).
        return InstanceInfo(instances[0]["State"]["Name"], instances[0].get("LaunchTime") or self.now())

    def start(self) -> Transition:
        with self._call("StartInstances"):
            change = self.client.start_instances(InstanceIds=[self.instance_id])["StartingInstances"][0]
        return Transition(change["PreviousState"]["Name"], change["CurrentState"]["Name"])

    def stop(self, hibernate: bool) -> tuple[Transition, str | None]:
        """Stop, hibernating if asked; the second value is a warning when EC2 refused hibernation."""
        try:
            return self._stop(hibernate), None
        except AwsError as error:
            if not hibernate or error.details.get("aws_error_code") != "UnsupportedHibernationConfiguration":
                raise
        warning = (
            f"EC2 refused to hibernate instance {self.instance_id}, so it was stopped normally: "
            f"enable hibernation on the instance or set {ENV_STOP_HIBERNATE}=false."
        )
        return self._stop(hibernate=False), warning

    def _stop(self, hibernate: bool) -> Transition:
        with self._call("StopInstances"):
            response = self.client.stop_instances(InstanceIds=[self.instance_id], Hibernate=hibernate)
        change = response["StoppingInstances"][0]
        return Transition(change["PreviousState"]["Name"], change["CurrentState"]["Name"])

    def _not_found(self) -> AwsError:
        return AwsError(
            f"Instance {self.instance_id} does not exist in this region. "
            f"Check {ENV_INSTANCE_ID} and the region ({ENV_AWS_REGION}).",
            code="instance_not_found",
        )

    @contextmanager
    def _call(self, operation: str) -> Iterator[None]:
        try:
            yield
        except ClientError as error:
            raise self._client_error(operation, str(error.response.get("Error", {}).get("Code"))) from error
        except BotoCoreError as error:
            raise AwsError(
                f"EC2 {operation} failed before AWS answered ({type(error).__name__}). "
                "Check the Lambda's network path to the EC2 API (VPC endpoint or NAT) and retry.",
                code="aws_unreachable",
            ) from error

    def _client_error(self, operation: str, aws_code: str) -> AwsError:
        if aws_code in NOT_FOUND_CODES:
            return self._not_found()
        if aws_code in ACCESS_DENIED_CODES:
            iam_action = IAM_ACTIONS[operation]
            return AwsError(
                f"EC2 {operation} was denied ({aws_code}): allow {iam_action} to the Lambda's role "
                f'on instance {self.instance_id} (Describe actions need Resource "*").',
                code="aws_access_denied",
                aws_error_code=aws_code,
                iam_action=iam_action,
            )
        return AwsError(
            f"EC2 {operation} on instance {self.instance_id} failed with {aws_code}. "
            "See the README's troubleshooting table; throttling and server errors were already retried.",
            aws_error_code=aws_code,
        )


# --- Actions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clock:
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


@dataclass
class Outcome:
    """What an action did: the response's fields (logged too), its metrics and warnings."""

    fields: dict[str, Any]
    status_code: int = 200
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    level: int = logging.INFO
    headers: dict[str, str] = field(default_factory=dict)


def start(ec2: Ec2, remaining_seconds: float, clock: Clock) -> Outcome:
    """One StartInstances; if the instance is stopping, wait for stopped within the time left."""
    try:
        transition = ec2.start()
    except AwsError as error:
        if error.details.get("aws_error_code") != "IncorrectInstanceState":
            raise
        transition = _start_once_stopped(ec2, remaining_seconds, clock)
    started = transition.previous_state in ("stopped", "stopping")
    message = "Instance is starting: poll the backend's health endpoint." if started else "Instance is already up."
    return Outcome(
        {"previous_state": transition.previous_state, "state": transition.state, "message": message},
        status_code=202 if started else 200,
        metrics={"InstanceStarted": int(started)},
    )


def _start_once_stopped(ec2: Ec2, remaining_seconds: float, clock: Clock) -> Transition:
    # StartInstances on a stopping instance fails with IncorrectInstanceState (so do shutting-down
    # and terminated): look at the state, and wait out a stop in progress.
    deadline = clock.monotonic() + remaining_seconds - SAFETY_MARGIN_SECONDS
    state = ec2.describe().state
    while state == "stopping":
        if clock.monotonic() + STOPPING_POLL_SECONDS > deadline:
            raise StillStoppingError(
                f"Instance {ec2.instance_id} is still stopping. Retry start after {RETRY_AFTER_SECONDS} seconds.",
                state=state,
            )
        clock.sleep(STOPPING_POLL_SECONDS)
        state = ec2.describe().state
    if state in GONE_STATES:
        raise InstanceGoneError(
            f"Instance {ec2.instance_id} is {state} and cannot be started. Point {ENV_INSTANCE_ID} at a live instance.",
            state=state,
        )
    if state == "stopped":
        return Transition("stopping", ec2.start().state)
    return Transition(state, state)  # someone else started it meanwhile


def check_idle(ec2: Ec2, config: Config, clock: Clock) -> Outcome:
    activity_url = config.require_backend_url(Action.CHECK_IDLE) + config.last_activity_path
    info = ec2.describe()
    activity = None
    if info.state == "running":
        activity = fetch_activity(activity_url, config.http_timeout_seconds, clock)
    verdict = decide(info.state, info.launch_time, activity, clock.now(), config.idle_timeout_seconds)
    outcome = Outcome({"state": info.state, "launch_time": info.launch_time.isoformat()})
    if isinstance(activity, ActivityUnknown):
        outcome.metrics["BackendUnreachable"] = 1
        outcome.level = logging.ERROR
    if verdict.idle_seconds is not None:
        outcome.metrics["IdleSeconds"] = round(verdict.idle_seconds, 1)
    decision = _stop(ec2, config, outcome) if verdict.decision is Decision.STOP else verdict.decision
    outcome.fields.update(
        decision=decision.value,
        reason=verdict.reason,
        idle_seconds=None if verdict.idle_seconds is None else round(verdict.idle_seconds, 1),
        idle_timeout_seconds=config.idle_timeout_seconds,
        dry_run=config.dry_run,
    )
    return outcome


def stop(ec2: Ec2, config: Config) -> Outcome:
    outcome = Outcome({"state": ec2.describe().state} if config.dry_run else {})
    decision = _stop(ec2, config, outcome)
    outcome.fields.update(decision=decision.value, reason="stop requested", dry_run=config.dry_run)
    return outcome


def _stop(ec2: Ec2, config: Config, outcome: Outcome) -> Decision:
    if config.dry_run:
        return Decision.WOULD_STOP
    transition, warning = ec2.stop(config.stop_hibernate)
    if warning:
        outcome.warnings.append(warning)
    outcome.fields.update(previous_state=transition.previous_state, state=transition.state)
    outcome.metrics["InstanceStopped"] = 1
    return Decision.STOP


def status(ec2: Ec2, config: Config) -> Outcome:
    health_url = config.require_backend_url(Action.STATUS) + config.health_path
    info = ec2.describe()
    backend: dict[str, Any] = {"reachable": False, "healthy": False, "status_code": None}
    if info.state == "running":
        backend = probe_health(health_url, min(HEALTH_TIMEOUT_SECONDS, config.http_timeout_seconds))
    return Outcome({"state": info.state, "launch_time": info.launch_time.isoformat(), "backend": backend})


# --- The backend: GETs with explicit (connect, read) timeouts --------------------------------
def fetch_activity(url: str, timeout_seconds: float, clock: Clock) -> Activity | ActivityUnknown:
    """GET the activity endpoint; every failure becomes an ActivityUnknown that names it."""
    import requests  # paid only by the actions that call the backend

    give_up_at = clock.monotonic() + 2 * timeout_seconds  # also bounds a backend that trickles bytes
    body = bytearray()
    try:
        with requests.get(
            url,
            timeout=(timeout_seconds, timeout_seconds),
            stream=True,
            allow_redirects=False,
            headers={"Accept": "application/json"},
        ) as response:
            if not 200 <= response.status_code < 300:
                return ActivityUnknown(f"GET {url} answered HTTP {response.status_code}")
            for chunk in response.iter_content(8192):
                body += chunk
                if len(body) > MAX_ACTIVITY_BYTES or clock.monotonic() > give_up_at:
                    return ActivityUnknown(f"GET {url} sent too much, too slowly")
    except requests.Timeout:
        return ActivityUnknown(f"GET {url} timed out after {timeout_seconds:g}s")
    except requests.RequestException as error:
        return ActivityUnknown(f"GET {url} failed: {type(error).__name__}")
    try:
        payload = json.loads(body)
    except ValueError:
        return ActivityUnknown(f"GET {url} answered with something that is not JSON: {_short(bytes(body[:60]))}")
    return parse_activity(payload, clock.now())


def probe_health(url: str, timeout_seconds: float) -> dict[str, Any]:
    import requests

    try:
        response = requests.get(url, timeout=(timeout_seconds, timeout_seconds), allow_redirects=False)
    except requests.RequestException:
        return {"reachable": False, "healthy": False, "status_code": None}
    response.close()
    return {"reachable": True, "healthy": 200 <= response.status_code < 300, "status_code": response.status_code}


# --- Logs and metrics ------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One compact JSON object per line: level, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"level": record.levelname, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to sys.stdout as it is at each record (the runtime ships stdout to CloudWatch)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _stdout_logger(name: str, formatter: logging.Formatter) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:  # a warm start imports nothing again, but be safe on reloads
        handler = StdoutHandler()
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        logger.propagate = False  # the runtime's root handler would wrap our JSON in its own format
    return logger


LOG: Final = _stdout_logger("backend_orchestrator", JsonFormatter())
LOG.setLevel(logging.INFO)  # until LOG_LEVEL is read
METRICS_LOG: Final = _stdout_logger("backend_orchestrator.metrics", logging.Formatter("%(message)s"))
METRICS_LOG.setLevel(logging.INFO)
for _noisy in ("boto3", "botocore", "urllib3"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def emit_metrics(namespace: str, instance_id: str | None, metrics: Mapping[str, float], now: datetime) -> None:
    """One CloudWatch Embedded Metric Format line; CloudWatch turns it into metrics, no API call.

    https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html
    """
    units = [{"Name": name, "Unit": "Seconds" if name == "IdleSeconds" else "Count"} for name in metrics]
    directive = {"Namespace": namespace, "Dimensions": [["InstanceId"]], "Metrics": units}
    document = {"_aws": {"Timestamp": int(now.timestamp() * 1000), "CloudWatchMetrics": [directive]}}
    METRICS_LOG.info(json.dumps({**document, "InstanceId": instance_id or "unknown", **metrics}, separators=(",", ":")))


# --- Entry point ---------------------------------------------------------------------------
@dataclass
class Invocation:
    """What one call is: where it came from and what it asks; filled in as it is learned."""

    source: Source | None = None
    action: Action | None = None
    config: Config | None = None
    authorized: bool = False  # may see the instance; an HTTP caller without the token may not


def _run(
    event: object,
    context: object,
    environ: Mapping[str, str],
    *,
    clock: Clock,
    client: EC2Client | None,
    invocation: Invocation,
) -> Outcome:
    request = parse_event(event)
    invocation.source = Source.HTTP if isinstance(request, HttpRequest) else request.source
    try:
        config = Config.from_env(environ)
    except ConfigError as error:  # show what is misconfigured only to a caller who may know
        if isinstance(request, HttpRequest):
            authorize(request, error.auth_token)
        raise
    invocation.config = config
    LOG.setLevel(config.log_level)
    warning = None
    if isinstance(request, HttpRequest):
        authorize(request, config.auth_token)
        invocation.authorized = True
        action = invocation.action = http_action(request)
    else:  # direct and scheduled invocations need no token
        invocation.authorized = True
        action = invocation.action = request.action
        warning = request.warning
    ec2 = Ec2(client or ec2_client(config.region), config.instance_id, clock.now)
    if action is Action.START:
        outcome = start(ec2, _remaining_seconds(context), clock)
    elif action is Action.CHECK_IDLE:
        outcome = check_idle(ec2, config, clock)
    elif action is Action.STOP:
        outcome = stop(ec2, config)
    else:
        outcome = status(ec2, config)
    if warning:
        outcome.warnings.insert(0, warning)
    if outcome.warnings and outcome.level < logging.WARNING:
        outcome.level = logging.WARNING
    return outcome


def _failure(error: OrchestratorError) -> Outcome:
    return Outcome(
        {**error.details, "error": {"code": error.code, "message": error.message}},
        status_code=error.STATUS_CODE,
        metrics={"Errors": 1},
        level=logging.ERROR if error.STATUS_CODE >= 500 else logging.WARNING,
        headers=dict(error.HEADERS),
    )


def _remaining_seconds(context: object) -> float:
    remaining_ms = getattr(context, "get_remaining_time_in_millis", lambda: DEFAULT_REMAINING_MS)()
    return float(remaining_ms) / 1000


def _log(
    outcome: Outcome,
    body: dict[str, Any],
    *,
    source: Source | None,
    request_id: str | None,
    duration_ms: float,
    bug: Exception | None,
) -> None:
    """The invocation's one log line: what was asked, what happened, why, and how long it took."""
    fields = {"source": source, **body, "status_code": outcome.status_code, "warnings": outcome.warnings or None}
    fields.update(aws_request_id=request_id, duration_ms=duration_ms)
    message = fields.pop("message", None)
    if "error" in body:
        message = body["error"]["message"]
    elif message is None:
        message = f"{body['action']}: {body.get('decision') or body.get('state')}"
    clean = {key: value for key, value in fields.items() if value is not None}
    LOG.log(outcome.level, message, exc_info=bug, extra={"fields": clean})


def handle(
    event: object,
    context: object,
    environ: Mapping[str, str],
    clock: Clock | None = None,
    client: EC2Client | None = None,
) -> dict[str, Any]:
    """Parse, configure, authorise, act, log and render. No exception escapes."""
    clock = clock or Clock()
    started = clock.monotonic()
    invocation = Invocation()
    bug: Exception | None = None
    try:
        outcome = _run(event, context, environ, clock=clock, client=client, invocation=invocation)
    except OrchestratorError as error:
        outcome = _failure(error)
    except Exception as error:  # noqa: BLE001 - the one broad catch: a bug is logged with its traceback, answered 500
        outcome = _failure(OrchestratorError("Unexpected error: the function's log has the traceback."))
        bug = error
    config = invocation.config
    instance_id = config.instance_id if config else None
    shown_id = instance_id if invocation.authorized else None
    body = {"ok": outcome.status_code < 400, "action": invocation.action, "instance_id": shown_id, **outcome.fields}
    duration_ms = round((clock.monotonic() - started) * 1000, 1)
    request_id = getattr(context, "aws_request_id", None)
    logged = {**body, "instance_id": instance_id}  # the log is private: it always names the instance
    _log(outcome, logged, source=invocation.source, request_id=request_id, duration_ms=duration_ms, bug=bug)
    namespace = config.metrics_namespace if config else Config.metrics_namespace
    requested = {f"{invocation.action.title().replace('_', '')}Requested": 1} if invocation.action else {}
    emit_metrics(namespace, instance_id, {**requested, **outcome.metrics}, clock.now())
    if not _is_http(event):
        return body
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **outcome.headers}
    return {
        "statusCode": outcome.status_code,
        "headers": headers,
        "body": json.dumps(body, default=str),
        "isBase64Encoded": False,
    }


def lambda_handler(event: object, context: object) -> dict[str, Any]:
    """The Lambda entry point: see handle()."""
    return handle(event, context, os.environ)
