"""Wake the PyElli backend's EC2 instance on demand and stop it once it has been idle.

Actions:
  start       start the instance and answer at once (the app then polls the backend's /health)
  status      the instance's state and whether the backend answers its health check
  check_idle  ask the backend how long it has been idle (when it cannot say, the instance's CloudWatch
              metrics); stop the instance past the timeout; keep it, and start it, in keep-warm windows
  stop        stop the instance now (direct or scheduled invocation only)
  hold        hold the instance running or stopped until a time, kept as tags on it (direct only)
  release     end a hold now (direct only)
  preflight   check the deployment without changing anything: permissions, paths, settings, the backend

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

Read top to bottom: settings, errors, configuration, the clock and the deadline, events, the pure
decision, the AWS and backend edges, the actions, logs, and the entry point (parse, authorise, act,
render). Every wait fits the invocation's deadline: see Deadline.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import logging
import math
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple, TypeVar
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
ENV_KEEP_WARM: Final = "KEEP_WARM"
ENV_IDLE_CPU_PERCENT: Final = "IDLE_CPU_PERCENT"
ENV_IDLE_NETWORK_KB: Final = "IDLE_NETWORK_KB_PER_5MIN"
ENV_DRAIN_PATH: Final = "DRAIN_PATH"
ENV_NOTIFY_TOPIC_ARN: Final = "NOTIFY_TOPIC_ARN"
ENV_MAX_HOLD_HOURS: Final = "MAX_HOLD_HOURS"
ENV_STUCK_BUSY_SECONDS: Final = "STUCK_BUSY_SECONDS"
ENV_STOP_STUCK_BUSY: Final = "STOP_STUCK_BUSY"

# --- Limits and timings ----------------------------------------------------------------------
MAX_BODY_BYTES: Final = 16 * 1024  # an HTTP event's body
MAX_ACTIVITY_BYTES: Final = 64 * 1024  # the whole activity answer: status line, headers and body
MAX_STATUS_LINE_BYTES: Final = 1024  # all the health probe reads
HEALTH_TIMEOUT_SECONDS: Final = 2.0  # status answers the app's wake loop: a slow probe is a slow wake
STOPPING_POLL_SECONDS: Final = 3.0
ANSWER_MARGIN_SECONDS: Final = 2.0  # kept back from the context's remaining time, to log and answer
RETRY_AFTER_SECONDS: Final = 10
CAPACITY_RETRY_AFTER_SECONDS: Final = 30  # EC2 capacity comes back in minutes, not seconds
DEFAULT_REMAINING_MS: Final = 60_000  # invoked without a Lambda context (local use)
EPOCH_MILLISECONDS_ABOVE: Final = 1e11  # 1e11 s is the year 5138; 1e11 ms is 1973
AWS_CONNECT_TIMEOUT_SECONDS: Final = 2
AWS_READ_TIMEOUT_SECONDS: Final = 5
AWS_MAX_ATTEMPTS: Final = 3
# botocore's standard retry mode sleeps rand(0, 1) * min(2**i, 20) s before retry i + 1 (1 s scale for
# throttling), raised by an x-amz-retry-after header by at most 5 s more (botocore/retries/standard.py).
AWS_BACKOFF_CAP_SECONDS: Final = 20
AWS_RETRY_AFTER_EXTRA_SECONDS: Final = 5
MIN_BACKEND_SECONDS: Final = 1.0  # a backend request given less than this is not worth making
METRIC_PERIOD_SECONDS: Final = 300  # EC2's basic monitoring period; detailed monitoring's minutes add up to it
METRICS_DELAY_SECONDS: Final = 600  # EC2 publishes a period's datapoint minutes after the period ends
# CPUUtilization averages all vCPUs: one vCPU at full load reads 100 / vCPUs %. Half of that is the most an
# idle instance may show, so that one busy vCPU keeps an instance of any size (64 vCPUs: 0.78 %).
ONE_BUSY_VCPU_PERCENT: Final = 50.0

INTERIM_STATUS: Final = re.compile(rb"HTTP/1\.[01] 1(?!01)[0-9]{2}[ \r]")  # 1xx but 101 Switching Protocols
MIN_TOKEN_CHARS: Final = 16
# A hold, kept on the instance where the console shows it: set by the hold action or by hand (create-tags).
HOLD_TAG: Final = "backend-orchestrator:hold"  # running | stopped
HOLD_UNTIL_TAG: Final = "backend-orchestrator:hold-until"  # ISO-8601 with its offset: every hold ends
HOLD_REASON_TAG: Final = "backend-orchestrator:hold-reason"  # optional free text
HOLD_TAGS: Final = (HOLD_TAG, HOLD_UNTIL_TAG, HOLD_REASON_TAG)
HOLD_STATES: Final = ("running", "stopped")
MAX_TAG_VALUE_CHARS: Final = 256  # EC2's limit on a tag value
MAX_HOLD_HOURS_LIMIT: Final = 9999  # what MAX_HOLD_HOURS may be (the template's pattern): keeps dates in range
TOPIC_ARN_PATTERN: Final = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}")
INSTANCE_ID_PATTERN: Final = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")
DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WINDOW_PATTERN: Final = re.compile(
    r"(?P<days>\S+)\s+(?P<start>[0-9]{2}:[0-9]{2})-(?P<end>[0-9]{2}:[0-9]{2})(?:\s+(?P<zone>\S+))?", re.ASCII
)
REGION_PATTERN: Final = re.compile(r"[a-z]{2}(?:-[a-z0-9]+)+", re.ASCII)
BOOLEANS: Final = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The activity contract (README): accepted field names, preferred first.
IDLE_SECONDS_FIELDS: Final = ("idle_seconds", "idleSeconds", "seconds_since_last_activity")
LAST_ACTIVITY_FIELDS: Final = ("last_activity", "last_activity_at", "lastActivity", "last_request_at")
IN_FLIGHT_FIELDS: Final = ("active_requests", "active_jobs")

# The IAM action each AWS call needs, named when AWS refuses it.
IAM_ACTIONS: Final = {
    "DescribeInstances": "ec2:DescribeInstances",
    "StartInstances": "ec2:StartInstances",
    "StopInstances": "ec2:StopInstances",
    "GetMetricData": "cloudwatch:GetMetricData",
    "Publish": "sns:Publish",
    "CreateTags": "ec2:CreateTags",
    "DeleteTags": "ec2:DeleteTags",
}
SERVICE_NAMES: Final = {"ec2": "EC2", "cloudwatch": "CloudWatch", "sns": "SNS"}
# "403": what botocore names an error answered HTTP 403 with no code of its own (moto's CloudWatch does that).
ACCESS_DENIED_CODES: Final = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "403"})
# EC2 API error codes: https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
NOT_FOUND_CODES: Final = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
GONE_STATES: Final = frozenset({"shutting-down", "terminated"})
STOPPED_STATES: Final = frozenset({"stopping", "stopped"})

T = TypeVar("T")


class Action(StrEnum):
    START = "start"
    STATUS = "status"
    CHECK_IDLE = "check_idle"
    STOP = "stop"
    HOLD = "hold"
    RELEASE = "release"
    PREFLIGHT = "preflight"


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
    START = "start"  # a keep-warm window found the instance stopped
    WOULD_START = "would_start"


# --- Errors: each class carries its HTTP status and a stable code ---------------------------------
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


class InvalidHoldError(BadRequestError):
    """A hold action's fields are wrong (the message names the field); nothing was written."""

    CODE = "invalid_hold"


class HeldStoppedError(OrchestratorError):
    """An operator holds the instance stopped: no start until the hold ends or is released."""

    STATUS_CODE = 409
    CODE = "held_stopped"


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


class AwsError(OrchestratorError):
    STATUS_CODE = 502
    CODE = "aws_error"

    def __init__(self, message: str, *, code: str | None = None, aws_error_code: str | None = None, **details: Any):
        if aws_error_code is not None:
            details["aws_error_code"] = aws_error_code
        super().__init__(message, code=code, **details)
        self.aws_error_code = aws_error_code  # EC2's own error code, when EC2 answered


class StillStoppingError(OrchestratorError):
    """The instance is still stopping; safe to retry after Retry-After seconds."""

    STATUS_CODE = 503
    CODE = "still_stopping"
    HEADERS: ClassVar[Mapping[str, str]] = {"Retry-After": str(RETRY_AFTER_SECONDS)}


class InsufficientCapacityError(AwsError):
    """EC2 has no capacity for the instance type in its zone right now: transient, safe to retry."""

    STATUS_CODE = 503
    CODE = "insufficient_capacity"
    HEADERS: ClassVar[Mapping[str, str]] = {"Retry-After": str(CAPACITY_RETRY_AFTER_SECONDS)}


class OutOfTimeError(OrchestratorError):
    """Too little of the invocation's time is left for the next step; nothing half-done, safe to retry."""

    STATUS_CODE = 503
    CODE = "out_of_time"
    HEADERS: ClassVar[Mapping[str, str]] = {"Retry-After": str(RETRY_AFTER_SECONDS)}

    def __init__(self, step: str, left_seconds: float, needed_seconds: float) -> None:
        self.step = step
        self.brief = f"{max(left_seconds, 0):.1f}s left, it may take {needed_seconds:.1f}s"
        super().__init__(
            f"Out of time before {step} ({self.brief}). Retry after {RETRY_AFTER_SECONDS} seconds; if this "
            "repeats, raise the function's timeout (the README's worst-case table says what each action needs)."
        )


# --- Configuration: every variable read and checked in one place ----------------------------------
@dataclass(frozen=True)
class Config:
    """Every setting but AUTH_TOKEN (see AuthToken), with its default: the one place defaults are written."""

    instance_id: str = ""
    backend_base_url: str | None = None
    idle_timeout_seconds: int = 900
    region: str | None = None
    http_timeout_seconds: float = 5.0
    stop_hibernate: bool = False
    dry_run: bool = False
    last_activity_path: str = "/api/last-activity"
    health_path: str = "/health"
    log_level: str = "INFO"
    metrics_namespace: str = "BackendOrchestrator"
    keep_warm: tuple[Window, ...] = ()
    idle_cpu_percent: float = 5.0  # 0 turns the CloudWatch fallback off
    idle_network_kb: float = 1024.0  # per 5-minute period, in + out
    max_hold_hours: float = 72.0
    stuck_busy_seconds: int = 7200  # 0 turns the stuck-busy watch off
    stop_stuck_busy: bool = False
    drain_path: str | None = None
    notify_topic_arn: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        """Read and check every variable of VARIABLES; an unset or empty one keeps its default, the first bad
        one raises a ConfigError naming it."""
        values = {}
        for name, (field_name, _) in VARIABLES.items():
            raw = environ.get(name, "").strip()
            if raw:
                values[field_name] = read_variable(name, raw)
        return cls(**values)

    @classmethod
    def with_problems(cls, environ: Mapping[str, str]) -> tuple[Config | None, list[ConfigError]]:
        """For preflight: every bad variable, not only the first, and the configuration of the good ones (None
        without a usable INSTANCE_ID)."""
        values, problems = {}, []
        for name, (field_name, _) in VARIABLES.items():
            raw = environ.get(name, "").strip()
            try:
                if raw:
                    values[field_name] = read_variable(name, raw)
            except ConfigError as problem:
                problems.append(problem)
        token_problem = AuthToken.from_env(environ).problem
        problems += [token_problem] if token_problem else []
        try:
            return cls(**values), problems
        except ConfigError as problem:
            return None, [problem, *problems]

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ConfigError(
                f"{ENV_INSTANCE_ID} is not set. Set it to the backend's EC2 instance ID, e.g. i-0abc123def4567890."
            )

    def open_window(self, now: datetime) -> Window | None:
        """The first keep-warm window open at `now`, if any."""
        return next((window for window in self.keep_warm if window.holds(now)), None)

    def require_backend_url(self, action: Action) -> str:
        if self.backend_base_url is None:
            raise ConfigError(
                f"{ENV_BACKEND_BASE_URL} is not set and {action} needs it. Set it to the backend's "
                "base URL as the Lambda reaches it, e.g. http://10.0.1.50:8000."
            )
        return self.backend_base_url


@dataclass(frozen=True)
class AuthToken:
    """AUTH_TOKEN, read first and only here, so that an HTTP caller without it learns nothing, not even
    that the configuration is broken. `value` None lets every caller in; a blank one ("") lets nobody in."""

    value: str | None = field(repr=False)
    problem: ConfigError | None = None  # a blank or short token: answered once the caller is authorised

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AuthToken:
        raw = environ.get(ENV_AUTH_TOKEN, "")
        try:
            return cls(_parse_token(ENV_AUTH_TOKEN, raw))
        except ConfigError as problem:
            return cls(raw.strip(), problem)

    def require_valid(self) -> None:
        if self.problem is not None:
            raise self.problem


@dataclass(frozen=True)
class Window:
    """A keep-warm window: days of the week, a start and an end in minutes of the local day, a time zone.
    An end at or before the start crosses midnight: the window starts on the listed day, ends the next."""

    text: str
    days: frozenset[int]  # 0 is Monday, as datetime.weekday()
    start: int
    end: int  # up to 24 * 60
    zone: tzinfo

    def holds(self, moment: datetime) -> bool:
        """Whether the window is open at `moment`, read on the zone's wall clock (summer time included)."""
        local = moment.astimezone(self.zone)
        minute, day = local.hour * 60 + local.minute, local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return (day in self.days and minute >= self.start) or ((day - 1) % 7 in self.days and minute < self.end)


def read_variable(name: str, raw: str) -> Any:
    """One variable through its parser; any exception a parser did not foresee is still that variable's fault."""
    try:
        return VARIABLES[name][1](name, raw)
    except (ValueError, OSError, OverflowError) as error:
        raise ConfigError(
            f"{name} could not be read ({type(error).__name__}): set it as the README's configuration table describes."
        ) from None


def _parse_text(name: str, raw: str) -> str:
    return raw


def _parse_region(name: str, raw: str) -> str:
    if not REGION_PATTERN.fullmatch(raw):
        raise ConfigError(f"{name}={raw!r} is not an AWS region, e.g. eu-central-1: deploy in the instance's region.")
    return raw


def _parse_instance_id(name: str, raw: str) -> str:
    if not INSTANCE_ID_PATTERN.fullmatch(raw):
        raise ConfigError(
            f"{name}={raw!r} is not an EC2 instance ID: expected i- and 8 or 17 lowercase hex digits, "
            "e.g. i-0abc123def4567890."
        )
    return raw


def _parse_base_url(name: str, raw: str) -> str:
    shown = re.sub(r"^([^:/?#]*:)?//[^/?#]*@", r"\1//***@", raw)  # never a password, even in a broken URL
    if shown != raw:
        raise ConfigError(
            f"{name}={shown!r} carries a user name or password, which would travel in clear and reach the logs: "
            "remove them, and restrict who reaches the backend with its security group instead."
        )
    try:
        parts = urlsplit(raw)
        host, port = parts.hostname or "", parts.port  # both raise ValueError: a bad [IPv6] literal, a bad port
        if "[" in parts.netloc:
            ipaddress.IPv6Address(host)
    except ValueError:
        host, port, parts = "", 0, urlsplit("")
    if port == 0 or parts.scheme not in ("http", "https") or not host or parts.query or parts.fragment:
        raise ConfigError(
            f"{name}={raw!r} is not an http(s) base URL: expected e.g. http://10.0.1.50:8000 or https://backend.example.com."
        )
    try:
        host.encode("idna")  # what the name lookup does first: refuse here what it would refuse at every check
    except UnicodeError:
        raise ConfigError(
            f"{name}={raw!r}: the host name {host!r} is not a valid DNS name (an empty label, or one over 63 "
            "characters): fix the host, e.g. backend.internal or 10.0.1.50."
        ) from None
    return raw.rstrip("/")


def _parse_token(name: str, raw: str) -> str | None:
    if not raw:
        return None
    token = raw.strip()
    if not token:
        raise ConfigError(
            f"{name} is set but blank, which would turn authentication off: set a token of at least "
            f"{MIN_TOKEN_CHARS} characters (openssl rand -base64 32), or remove the variable."
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{name} is {len(token)} characters long: use at least {MIN_TOKEN_CHARS} (openssl rand -base64 32)."
        )
    return token


def _parse_positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} is not a positive whole number of seconds, e.g. 900.")
    return value


def _parse_positive_float(name: str, raw: str, unit: str = "seconds, e.g. 5 or 2.5") -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name}={raw!r} is not a positive number of {unit}.")
    return value


def _parse_kilobytes(name: str, raw: str) -> float:
    return _parse_positive_float(name, raw, "KB, e.g. 1024")


def _parse_hours(name: str, raw: str) -> float:
    hours = _parse_positive_float(name, raw, "hours, e.g. 72")
    if hours > MAX_HOLD_HOURS_LIMIT:
        raise ConfigError(f"{name}={raw!r} is more than {MAX_HOLD_HOURS_LIMIT} hours: use e.g. 72.")
    return hours


def _parse_seconds_or_off(name: str, raw: str) -> int:
    if raw.strip() == "0":
        return 0
    try:
        return _parse_positive_int(name, raw)
    except ConfigError:
        raise ConfigError(f"{name}={raw!r} is not a whole number of seconds, e.g. 7200 (0 turns it off).") from None


def _parse_percent(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:
        raise ConfigError(f"{name}={raw!r} is not a percentage from 0 to 100, e.g. 5 (0 turns the fallback off).")
    return value


def _parse_bool(name: str, raw: str) -> bool:
    if raw.lower() not in BOOLEANS:
        raise ConfigError(f"{name}={raw!r} is not a boolean: use true/false, 1/0 or yes/no.")
    return BOOLEANS[raw.lower()]


def _parse_path(name: str, raw: str) -> str:
    if not raw.startswith("/") or "?" in raw or "#" in raw or not all("!" <= char <= "~" for char in raw):
        raise ConfigError(
            f"{name}={raw!r} is not a URL path: expected it to start with / and hold printable ASCII "
            "with no spaces, no ? and no #, e.g. /api/last-activity."
        )
    return raw


def _parse_log_level(name: str, raw: str) -> str:
    if raw.upper() not in LOG_LEVELS:
        raise ConfigError(f"{name}={raw!r} is not a log level: use one of {', '.join(LOG_LEVELS)}.")
    return raw.upper()


def _parse_topic_arn(name: str, raw: str) -> str:
    if not TOPIC_ARN_PATTERN.fullmatch(raw):
        raise ConfigError(
            f"{name}={raw!r} is not an SNS topic ARN, e.g. arn:aws:sns:eu-central-1:123456789012:backend-orchestrator."
        )
    return raw


def _parse_keep_warm(name: str, raw: str) -> tuple[Window, ...]:
    """Windows separated by ';', each `Mon-Fri 08:00-18:00 Europe/Berlin` (the zone defaults to UTC)."""
    return tuple(_parse_window(name, part.strip()) for part in raw.split(";"))


def _parse_window(name: str, text: str) -> Window:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # tzdata ships in the zip: no system database needed

    example = "e.g. 'Mon-Fri 08:00-18:00 Europe/Berlin; Sat 10:00-14:00'"
    match = WINDOW_PATTERN.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"{name}: {text!r} is not a window: write days, HH:MM-HH:MM and an optional IANA time zone, {example}."
        )
    days, start, end = _days(name, match["days"]), _minute(name, match["start"]), _minute(name, match["end"])
    if start in (24 * 60, end):
        raise ConfigError(
            f"{name}: {text!r} starts at 24:00 or ends when it starts; for a whole day write 00:00-24:00."
        )
    try:
        zone = ZoneInfo(match["zone"] or "UTC")
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory of the database (Europe), a long name
        raise ConfigError(f"{name}: {match['zone']!r} is not an IANA time zone, e.g. Europe/Berlin or UTC.") from None
    return Window(text, days, start, end, zone)


def _days(name: str, text: str) -> frozenset[int]:
    days: set[int] = set()
    for item in text.lower().split(","):
        first, dash, last = item.partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ConfigError(
                f"{name}: {text!r} is not a list of days: use Mon..Sun, ranges and commas, e.g. Mon-Fri,Sun."
            )
        start, stop = DAYS.index(first), DAYS.index(last or first)
        days.update(day % 7 for day in range(start, stop + (7 if stop < start else 0) + 1))  # Fri-Mon wraps
    return frozenset(days)


def _minute(name: str, text: str) -> int:
    hours, minutes = int(text[:2]), int(text[3:])
    if not (hours < 24 and minutes < 60) and text != "24:00":
        raise ConfigError(f"{name}: {text!r} is not a time of day: use HH:MM from 00:00 to 23:59, and 24:00 as an end.")
    return hours * 60 + minutes


# Each variable Config reads: the field it sets and the parser that checks it.
VARIABLES: Final[dict[str, tuple[str, Callable[[str, str], Any]]]] = {
    ENV_INSTANCE_ID: ("instance_id", _parse_instance_id),
    ENV_BACKEND_BASE_URL: ("backend_base_url", _parse_base_url),
    ENV_IDLE_TIMEOUT_SECONDS: ("idle_timeout_seconds", _parse_positive_int),
    ENV_AWS_REGION: ("region", _parse_region),
    ENV_HTTP_TIMEOUT_SECONDS: ("http_timeout_seconds", _parse_positive_float),
    ENV_STOP_HIBERNATE: ("stop_hibernate", _parse_bool),
    ENV_DRY_RUN: ("dry_run", _parse_bool),
    ENV_LAST_ACTIVITY_PATH: ("last_activity_path", _parse_path),
    ENV_HEALTH_PATH: ("health_path", _parse_path),
    ENV_LOG_LEVEL: ("log_level", _parse_log_level),
    ENV_METRICS_NAMESPACE: ("metrics_namespace", _parse_text),
    ENV_KEEP_WARM: ("keep_warm", _parse_keep_warm),
    ENV_IDLE_CPU_PERCENT: ("idle_cpu_percent", _parse_percent),
    ENV_IDLE_NETWORK_KB: ("idle_network_kb", _parse_kilobytes),
    ENV_DRAIN_PATH: ("drain_path", _parse_path),
    ENV_NOTIFY_TOPIC_ARN: ("notify_topic_arn", _parse_topic_arn),
    ENV_MAX_HOLD_HOURS: ("max_hold_hours", _parse_hours),
    ENV_STUCK_BUSY_SECONDS: ("stuck_busy_seconds", _parse_seconds_or_off),
    ENV_STOP_STUCK_BUSY: ("stop_stuck_busy", _parse_bool),
}


# --- Time: the clock, and one deadline per invocation ---------------------------------------------
@dataclass(frozen=True)
class Clock:
    """Wall time for decisions, monotonic time for deadlines, and sleep: injected, so tests never wait."""

    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class Deadline:
    """When the invocation must have answered: the context's remaining time less ANSWER_MARGIN_SECONDS.

    Lambda kills a function at its timeout with no log line and no answer, so every wait (EC2 calls with
    their retries, backend requests, sleeps) is given only the time that fits before this deadline."""

    at: float
    clock: Clock
    warning: str | None = None  # the context could not say how much time is left

    @classmethod
    def from_context(cls, context: object, clock: Clock) -> Deadline:
        """The context's remaining time; without a context (local use), or from one that cannot say, the default."""
        remaining_ms: object = DEFAULT_REMAINING_MS
        try:
            if hasattr(context, "get_remaining_time_in_millis"):
                remaining_ms = context.get_remaining_time_in_millis()
        except Exception as error:  # noqa: BLE001 - the runtime's object: whatever it raises, the time is unknown
            remaining_ms = error
        is_number = isinstance(remaining_ms, int | float) and not isinstance(remaining_ms, bool)
        seconds = max(min(remaining_ms, 1e9), 0) / 1000 if is_number else math.nan  # type: ignore[call-overload]
        if not math.isfinite(seconds):
            warning = (
                f"The Lambda context's get_remaining_time_in_millis() gave {_short(remaining_ms)}, not a number: "
                f"assumed {DEFAULT_REMAINING_MS // 1000} s. Invoke the handler with the runtime's context."
            )
            return cls(clock.monotonic() + DEFAULT_REMAINING_MS / 1000 - ANSWER_MARGIN_SECONDS, clock, warning)
        return cls(clock.monotonic() + seconds - ANSWER_MARGIN_SECONDS, clock)

    def left(self) -> float:
        return self.at - self.clock.monotonic()

    def grant_backend(self, step: str, wanted: float, keep: float = 0.0) -> float:
        """The seconds a backend request may take: `wanted`, cut to what is left once `keep` is set aside for
        the calls after it. OutOfTimeError if that is below MIN_BACKEND_SECONDS (or `wanted`, if smaller)."""
        needed = min(MIN_BACKEND_SECONDS, wanted)
        granted = min(wanted, self.left() - keep)
        if granted < needed:
            raise OutOfTimeError(step, self.left() - keep, needed)
        return granted


# --- Events: what the invocation asks -------------------------------------------------------------
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
    fields: Mapping[str, Any] = {}


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
        return EventRequest(Source.DIRECT, _action(event["action"]), fields=event)
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
    import hmac

    scheme, _, given = (request.authorization or "").strip().partition(" ")
    given_bytes, token_bytes = (text.encode("utf-8", "surrogatepass") for text in (given.strip(), token))  # "\ud800"
    if not token or scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, token_bytes):
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
        payload = strict_json(body)
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


def strict_json(text: str | bytes) -> object:
    """json.loads that refuses what it would read ambiguously or not at all: a repeated key (the last one
    would win silently) and nesting too deep for the parser; both raise ValueError."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"the key {_short(key)} appears more than once")
            obj[key] = value
        return obj

    try:
        return json.loads(text, object_pairs_hook=unique)
    except RecursionError:
        raise ValueError("nested too deep") from None


def _short(value: object) -> str:
    if isinstance(value, dict | list):  # never the repr of a nested value: it can be deep and long
        return f"a JSON {_json_type(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# --- The decision: pure, plain values in, a verdict and its reason out ----------------------------
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
    signal: str = "activity"  # what decided: activity, cloudwatch, keep_warm, state, deadline


def decide(
    launch_time: datetime, activity: Activity | ActivityUnknown, now: datetime, idle_timeout_seconds: int
) -> Verdict:
    """For a running instance: stop only if its backend is known to be idle past the timeout."""
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


def keep_warm(state: str, window: Window) -> Verdict:
    """Inside a keep-warm window: keep a running instance whatever its backend says, start a stopped one."""
    inside = f"inside the keep-warm window {window.text!r}"
    if state in ("running", "pending"):
        return Verdict(Decision.KEEP, inside, signal="keep_warm")
    if state == "stopped":
        reason = f"stopped {inside}: started so that it is warm when people arrive"
        return Verdict(Decision.START, reason, signal="keep_warm")
    return Verdict(
        Decision.SKIP, f"instance is {state}, {inside}: nothing to do until it is stopped", signal="keep_warm"
    )


class Hold(NamedTuple):
    """An operator's hold: keep the instance running, or stopped, until `until`."""

    state: str  # running | stopped
    until: datetime
    reason: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"state": self.state, "until": self.until.isoformat(), "reason": self.reason}

    def text(self) -> str:
        return f"held {self.state} until {self.until.isoformat()}" + (f" ({self.reason})" if self.reason else "")


class HoldReading(NamedTuple):
    """What the instance's tags say: a hold in force, one whose end has passed, or tags to ignore and why."""

    hold: Hold | None = None
    ended: Hold | None = None
    problem: str | None = None


def read_hold(tags: Mapping[str, str], now: datetime, max_hold_hours: float) -> HoldReading:
    """The hold the tags describe, set by the hold action or by hand: malformed tags are ignored with the reason."""
    if HOLD_TAG not in tags and HOLD_UNTIL_TAG not in tags:
        return HoldReading()
    state, until_text = tags.get(HOLD_TAG), tags.get(HOLD_UNTIL_TAG, "")
    ignored = "the hold is ignored and the usual rules apply"
    if state not in HOLD_STATES:
        return HoldReading(problem=f"Tag {HOLD_TAG}={_short(state)} is not running or stopped: {ignored}.")
    until = _aware_time(until_text)
    if until is None:
        return HoldReading(
            problem=f"Tag {HOLD_UNTIL_TAG}={_short(until_text)} is not an ISO-8601 time with its offset "
            f"(e.g. 2026-12-02T22:00:00+01:00 or ...Z): {ignored}."
        )
    if until > now + timedelta(hours=max_hold_hours):
        return HoldReading(
            problem=f"Tag {HOLD_UNTIL_TAG}={until_text!r} lies more than {ENV_MAX_HOLD_HOURS}={max_hold_hours:g} "
            f"hours ahead: {ignored}."
        )
    hold = Hold(state, until, tags.get(HOLD_REASON_TAG) or None)
    return HoldReading(ended=hold) if until <= now else HoldReading(hold=hold)


def hold_request(fields: Mapping[str, Any], now: datetime, max_hold_hours: float) -> Hold:
    """The hold a hold action asks for, or an InvalidHoldError naming the field: nothing is written before this."""
    state, hours, until_text, reason = (fields.get(name) for name in ("state", "hours", "until", "reason"))
    if state not in HOLD_STATES:
        raise InvalidHoldError(f'"state" is {_short(state)}: hold "running" or "stopped".')
    if (hours is None) == (until_text is None):
        raise InvalidHoldError('Give exactly one of "hours" (e.g. 4) and "until" (e.g. "2026-12-02T22:00:00+01:00").')
    limit = f"at most {ENV_MAX_HOLD_HOURS}={max_hold_hours:g} hours ahead"
    if hours is not None:
        count = _number(hours)
        if count is None or count <= 0 or count > max_hold_hours:
            raise InvalidHoldError(f'"hours" is {_short(hours)}: give a number above 0, {limit}.')
        until = now + timedelta(hours=count)
    else:
        parsed = _aware_time(until_text) if isinstance(until_text, str) else None
        if parsed is None:
            raise InvalidHoldError(
                f'"until" is {_short(until_text)}: give an ISO-8601 time with its offset (Z or +01:00).'
            )
        if parsed <= now or parsed > now + timedelta(hours=max_hold_hours):
            raise InvalidHoldError(f'"until" is {until_text}: give a time in the future, {limit}.')
        until = parsed
    if reason is not None and not (
        isinstance(reason, str) and len(reason) <= MAX_TAG_VALUE_CHARS and all(_tag_character(c) for c in reason)
    ):
        raise InvalidHoldError(
            f'"reason" must be text of at most {MAX_TAG_VALUE_CHARS} characters without control characters.'
        )
    whole = until.replace(microsecond=0) + (timedelta(seconds=1) if until.microsecond else timedelta())  # > now
    return Hold(state, whole, reason or None)


def _tag_character(char: str) -> bool:
    return char.isprintable() and not 0xD800 <= ord(char) <= 0xDFFF  # a tag value is UTF-8 text on one line


def _aware_time(text: str) -> datetime | None:
    """An ISO-8601 time that carries its offset; None for anything else (a time without one is ambiguous)."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def held_running(state: str, hold: Hold) -> Verdict:
    """Held running: keep it whatever its backend says, and start it if it is stopped (as a keep-warm window)."""
    if state in ("running", "pending"):
        return Verdict(Decision.KEEP, hold.text(), signal="hold")
    if state == "stopped":
        return Verdict(Decision.START, f"stopped, {hold.text()}: started", signal="hold")
    return Verdict(
        Decision.SKIP, f"instance is {state}, {hold.text()}: nothing to do until it is stopped", signal="hold"
    )


class MetricSamples(NamedTuple):
    """The instance's AWS/EC2 datapoints, as (timestamp, value): CPU maximum in %, network in and out in bytes."""

    cpu: list[tuple[datetime, float]]
    network_in: list[tuple[datetime, float]]
    network_out: list[tuple[datetime, float]]


def metric_window(now: datetime, idle_timeout_seconds: int) -> tuple[datetime, datetime]:
    """The whole 5-minute periods to judge: as many as cover the idle timeout, ending METRICS_DELAY_SECONDS
    before now at a period boundary, so that EC2 has published them (its metrics arrive minutes late)."""
    period = METRIC_PERIOD_SECONDS
    end = datetime.fromtimestamp((now.timestamp() - METRICS_DELAY_SECONDS) // period * period, UTC)
    return end - timedelta(seconds=math.ceil(idle_timeout_seconds / period) * period), end


def judge_metrics(
    samples: MetricSamples,
    start: datetime,
    end: datetime,
    cpu_limit: float,
    network_limit_bytes: float,
    *,
    launch_time: datetime,
) -> tuple[bool, str]:
    """Idle by the instance's own metrics: every period of [start, end) has CPU and network data of the current
    run, and no period since `start` (later ones too, where already published) reached either limit.

    A period that began before `launch_time` holds the previous run's data, idle since that run was stopped
    for it: it counts as missing, and so does a value that is not a finite number."""
    first = max(0, math.ceil((launch_time - start).total_seconds() / METRIC_PERIOD_SECONDS))  # of the current run

    def by_period(points: list[tuple[datetime, float]], combine: Callable[[float, float], float]) -> dict[int, float]:
        periods: dict[int, float] = {}
        for when, value in points:  # CloudWatch stamps a period's start; bucket by time anyway
            index = int((when - start).total_seconds() // METRIC_PERIOD_SECONDS)
            if index >= first and math.isfinite(value):
                periods[index] = combine(periods[index], value) if index in periods else value
        return periods

    cpu = by_period(samples.cpu, max)
    network_in = by_period(samples.network_in, lambda a, b: a + b)
    network_out = by_period(samples.network_out, lambda a, b: a + b)
    network = {i: network_in.get(i, 0.0) + network_out.get(i, 0.0) for i in network_in.keys() | network_out.keys()}
    expected = int((end - start).total_seconds() // METRIC_PERIOD_SECONDS)
    span = f"{start:%H:%M}-{end:%H:%M} UTC"
    missing = [i for i in range(expected) if i not in cpu or i not in network_in or i not in network_out]
    if missing:
        before = f"; {min(first, expected)} began before the launch at {launch_time:%H:%M:%S} UTC" if first else ""
        lacking = f"CloudWatch has no CPU or network data for {len(missing)} of the {expected} periods"
        return False, f"{lacking} of {span}{before}"
    cpu_max, network_max = max(cpu.values()), max(network.values())
    if cpu_max >= cpu_limit:
        return False, f"CPU max {cpu_max:.1f}% >= {cpu_limit:g}% since {start:%H:%M} UTC"
    if network_max >= network_limit_bytes:
        return False, f"network {network_max / 1024:.0f} KB in 5 min >= {network_limit_bytes / 1024:.0f} KB"
    return True, (
        f"CPU max {cpu_max:.1f}% < {cpu_limit:g}%, network at most {network_max / 1024:.0f} KB per 5 min "
        f"over {expected * METRIC_PERIOD_SECONDS // 60} min ({span})"
    )


def parse_activity(body: str | bytes, now: datetime) -> Activity | ActivityUnknown:
    """Read the activity contract (README) from the backend's answer; never raises.

    A null field counts as absent; a repeated key, nesting too deep or a number too large for a float
    make the activity unknown (so the backend is kept), never an error."""
    try:
        payload = strict_json(body)
    except ValueError as error:  # UnicodeDecodeError and the integer digit limit are ValueErrors too
        return ActivityUnknown(f"the answer is not JSON the contract can read ({error}): {_short(body[:60])}")
    if not isinstance(payload, dict):
        return ActivityUnknown(f"activity is a JSON {_json_type(payload)}, not an object")
    payload = {name: value for name, value in payload.items() if value is not None}
    busy = payload.get("busy", False)
    if not isinstance(busy, bool):
        return ActivityUnknown(f"'busy' is {_short(busy)}, not true or false")
    busy_reason = "busy is true" if busy else None
    for name in IN_FLIGHT_FIELDS:
        count = _number(payload.get(name, 0))
        if count is None or count < 0:
            return ActivityUnknown(f"{name!r} is {_short(payload[name])}, not a number >= 0")
        if count > 0 and busy_reason is None:
            busy_reason = f"{name}={payload[name]}"
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
            seconds = _number(payload[name])
            if seconds is None or seconds < 0:
                return ActivityUnknown(f"{name!r} is {_short(payload[name])}, not a number of seconds >= 0")
            return seconds
    for name in LAST_ACTIVITY_FIELDS:
        if name in payload:
            last_activity = _timestamp(payload[name])
            if last_activity is None:
                return ActivityUnknown(f"{name!r} is {_short(payload[name])}, not an ISO-8601 time or epoch seconds")
            return max(0.0, (now - last_activity).total_seconds())  # a future time (skew) is idle 0
    return None


def _timestamp(value: object) -> datetime | None:
    number = _number(value)
    if number is not None and number >= 0:
        seconds = number / 1000 if number > EPOCH_MILLISECONDS_ABOVE else number
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


def _number(value: object) -> float | None:
    """A JSON number as a finite float; None for anything else, or an integer too large for a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value >= 60 else f"{value:.1f}s"


# --- AWS: every call within the deadline, errors told apart by their code -------------------------
class InstanceInfo(NamedTuple):
    state: str
    launch_time: datetime
    vcpus: int | None = None  # CpuOptions: cores x threads per core
    tags: Mapping[str, str] = {}  # its backend-orchestrator: tags
    instance_type: str = ""
    detailed_monitoring: bool = False
    hibernation_configured: bool = False


class Transition(NamedTuple):
    previous_state: str
    state: str


def aws_call_seconds(attempts: int) -> float:
    """The longest one AWS API call can take with this many attempts: each attempt's connect and read
    timeouts, and botocore's longest backoff before each retry."""
    backoff = sum(
        min(2.0**retry, AWS_BACKOFF_CAP_SECONDS) + AWS_RETRY_AFTER_EXTRA_SECONDS for retry in range(attempts - 1)
    )
    return attempts * (AWS_CONNECT_TIMEOUT_SECONDS + AWS_READ_TIMEOUT_SECONDS) + backoff


def stop_seconds(config: Config) -> float:
    """What a stop may take at the least: one StopInstances, and one more for a refused hibernation."""
    return aws_call_seconds(1) * (2 if config.stop_hibernate else 1)


def after_activity_seconds(config: Config) -> float:
    """What check_idle keeps for after the activity read: GetMetricData (fallback on) and one StopInstances, or
    with a drain the shortest drain and the whole stop, which a drained backend must not be left without."""
    fallback = aws_call_seconds(1) if config.idle_cpu_percent > 0 else 0.0
    drain = min(MIN_BACKEND_SECONDS, config.http_timeout_seconds) + stop_seconds(config) if config.drain_path else 0.0
    return max(fallback + aws_call_seconds(1), drain)


def first_attempts_check_seconds(config: Config) -> float:
    """What one check_idle takes when every call it may make uses its whole first attempt (no retry)."""
    activity = config.http_timeout_seconds
    drain = 2 * activity if config.drain_path else 0.0  # POST, and DELETE if the stop then fails
    fallback = aws_call_seconds(1) if config.idle_cpu_percent > 0 else 0.0
    notify = aws_call_seconds(1) if config.notify_topic_arn else 0.0
    return ANSWER_MARGIN_SECONDS + aws_call_seconds(1) + activity + max(fallback, drain) + stop_seconds(config) + notify


def shortest_check_seconds(config: Config) -> float:
    """The shortest function timeout at which check_idle reaches a decision when AWS and the backend answer at once."""
    activity = min(MIN_BACKEND_SECONDS, config.http_timeout_seconds)
    return ANSWER_MARGIN_SECONDS + max(aws_call_seconds(1), activity + after_activity_seconds(config))


@cache
def aws_client(service: str, region: str | None) -> Any:
    """One client per container, service and region, built during INIT (see warm_clients); each call's attempts
    are cut to what fits its time by _no_attempt_past_the_grant."""
    config = BotoConfig(
        retries={"mode": "standard", "total_max_attempts": AWS_MAX_ATTEMPTS},
        connect_timeout=AWS_CONNECT_TIMEOUT_SECONDS,
        read_timeout=AWS_READ_TIMEOUT_SECONDS,
    )
    client = boto3.client(service, region_name=region, config=config)  # type: ignore[call-overload]
    retries = f"needs-retry.{client.meta.service_model.service_id.hyphenize()}"
    client.meta.events.register_first(retries, _no_attempt_past_the_grant)  # asked before botocore's own handler
    return client


_GRANT = threading.local()  # on the thread of one AWS call (see within): `attempts`, how many it may make


def _no_attempt_past_the_grant(
    attempts: int, response: Any, caught_exception: BaseException | None, operation: Any, **_: Any
) -> None:
    """botocore's needs-retry event: refuse a retry beyond the attempts this call was granted, by ending the call
    with what it would end with after its last retry. (Answering False refuses in botocore 1.44, but 1.38 and older,
    which Lambda runtimes ship, retry at once on it; an exception ends the call in every version.)"""
    if attempts < getattr(_GRANT, "attempts", AWS_MAX_ATTEMPTS):
        return  # botocore's standard handler decides
    if caught_exception is not None:
        raise caught_exception
    http_response, parsed = response
    if http_response.status_code >= 300:
        raise ClientError(parsed, operation.name)


def warm_clients(environ: Mapping[str, str]) -> None:
    """INIT: build the clients the configuration will use. Lambda runs the import on a full vCPU but an invocation
    on memory / 1,769 MB of one, where the ~200 ms of CPU a first client costs takes seconds. A configuration
    error is left for the invocation to answer (config_error), and so is a client that cannot be built."""
    try:
        config = Config.from_env(environ)
        aws_client("ec2", config.region)
        if config.idle_cpu_percent > 0:
            aws_client("cloudwatch", config.region)
        if config.notify_topic_arn:
            aws_client("sns", topic_region(config.notify_topic_arn))
    except (ConfigError, BotoCoreError):
        return


def topic_region(topic_arn: str) -> str:
    return topic_arn.split(":")[3]


def aws_call(
    service: str,
    operation: str,
    region: str | None,
    deadline: Deadline,
    about: str,
    *,
    call: Callable[[Any], T],
) -> T:
    """One API call, `call(client)`, with as many attempts as fit before the deadline; errors told apart by code."""
    name = SERVICE_NAMES[service]
    left = deadline.left()
    attempts = next((n for n in range(AWS_MAX_ATTEMPTS, 0, -1) if aws_call_seconds(n) <= left), 0)
    if attempts == 0:
        raise OutOfTimeError(f"{name} {operation}", left, aws_call_seconds(1))

    def attempt() -> T:
        _GRANT.attempts = attempts
        return call(client)

    try:
        client = aws_client(service, region)
        return within(aws_call_seconds(attempts), attempt, f"{name} {operation}")
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code"))
        if code in ACCESS_DENIED_CODES:
            iam_action = IAM_ACTIONS[operation]
            raise AwsError(
                f"{name} {operation} was denied ({code}): allow {iam_action} to the Lambda's role on {about}.",
                code="aws_access_denied",
                aws_error_code=code,
                iam_action=iam_action,
            ) from error
        raise AwsError(
            f"{name} {operation} on {about} failed with {code}. See the README's troubleshooting table; "
            "throttling and server errors were already retried.",
            aws_error_code=code,
        ) from error
    except (BotoCoreError, TimeoutError) as error:
        raise AwsError(
            f"{name} {operation} failed before AWS answered ({type(error).__name__}). "
            f"Check the Lambda's network path to the {name} API (VPC endpoint or NAT) and retry.",
            code="aws_unreachable",
        ) from error


def within(seconds: float, work: Callable[[], T], what: str) -> T:
    """`work()` on a worker thread, waited for at most `seconds`: botocore's timeouts bound each connect and
    read, but not the lookup of the endpoint's name, nor an answer that trickles in. A call still running
    then is left to finish on its own (it changes nothing the next invocation does not see again)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, which raises it
            failure.append(error)

    worker = threading.Thread(target=run, name=f"{threading.current_thread().name}: {what}", daemon=True)
    worker.start()
    worker.join(max(seconds, 0.0))
    if failure:
        raise failure[0]
    if not result:
        raise TimeoutError(f"{what} did not end within {seconds:.0f}s")
    return result[0]


class Ec2:
    """The three EC2 calls the function makes, on one instance, each within the invocation's deadline."""

    def __init__(self, region: str | None, instance_id: str, deadline: Deadline) -> None:
        self.region = region
        self.instance_id = instance_id
        self.deadline = deadline

    def describe(self) -> InstanceInfo:
        reservations = self._call(
            "DescribeInstances", lambda client: client.describe_instances(InstanceIds=[self.instance_id])
        )["Reservations"]
        instances = [instance for reservation in reservations for instance in reservation.get("Instances", [])]
        if not instances:
            raise self._not_found()
        # Real EC2 always sends LaunchTime; were it missing, count the instance as just started (safe).
        launch_time = instances[0].get("LaunchTime") or self.deadline.clock.now()
        cpu = instances[0].get("CpuOptions") or {}
        vcpus = cpu.get("CoreCount", 0) * cpu.get("ThreadsPerCore", 1)  # real EC2 always sends both
        tags = {tag["Key"]: tag["Value"] for tag in instances[0].get("Tags", []) if tag["Key"] in HOLD_TAGS}
        return InstanceInfo(
            instances[0]["State"]["Name"],
            launch_time,
            vcpus if vcpus > 0 else None,
            tags,
            instances[0].get("InstanceType", ""),
            instances[0].get("Monitoring", {}).get("State") == "enabled",
            instances[0].get("HibernationOptions", {}).get("Configured") is True,
        )

    def allowed(self, operation: str, **kwargs: Any) -> None:
        """The call with DryRun=True: returns if EC2 would allow it (DryRunOperation), else raises the AwsError."""
        methods = {"StartInstances": "start_instances", "StopInstances": "stop_instances",
                   "CreateTags": "create_tags", "DeleteTags": "delete_tags"}  # fmt: skip
        target = {"Resources" if "Tags" in operation else "InstanceIds": [self.instance_id]}
        try:
            self._call(operation, lambda client: getattr(client, methods[operation])(DryRun=True, **target, **kwargs))
        except AwsError as error:
            if error.aws_error_code != "DryRunOperation":
                raise

    def set_hold(self, hold: Hold) -> None:
        """The hold's three tags in one CreateTags call (an empty reason clears an older one)."""
        values = {HOLD_TAG: hold.state, HOLD_UNTIL_TAG: hold.until.isoformat(), HOLD_REASON_TAG: hold.reason or ""}
        tags: list[Any] = [{"Key": key, "Value": value} for key, value in values.items()]
        self._call("CreateTags", lambda client: client.create_tags(Resources=[self.instance_id], Tags=tags))

    def clear_hold(self) -> None:
        keys: list[Any] = [{"Key": key} for key in HOLD_TAGS]
        self._call("DeleteTags", lambda client: client.delete_tags(Resources=[self.instance_id], Tags=keys))

    def start_instance(self) -> Transition:
        response = self._call("StartInstances", lambda client: client.start_instances(InstanceIds=[self.instance_id]))
        change = response["StartingInstances"][0]
        return Transition(change["PreviousState"]["Name"], change["CurrentState"]["Name"])

    def stop_instance(self, hibernate: bool) -> tuple[Transition, str | None]:
        """Stop, hibernating if asked; the second value is a warning when EC2 refused hibernation."""
        try:
            return self._stop_instances(hibernate), None
        except AwsError as error:
            if not hibernate or error.aws_error_code != "UnsupportedHibernationConfiguration":
                raise
        warning = (
            f"EC2 refused to hibernate instance {self.instance_id}, so it was stopped normally: "
            f"enable hibernation on the instance or set {ENV_STOP_HIBERNATE}=false."
        )
        return self._stop_instances(hibernate=False), warning

    def _stop_instances(self, hibernate: bool) -> Transition:
        response = self._call(
            "StopInstances", lambda client: client.stop_instances(InstanceIds=[self.instance_id], Hibernate=hibernate)
        )
        change = response["StoppingInstances"][0]
        return Transition(change["PreviousState"]["Name"], change["CurrentState"]["Name"])

    def _not_found(self) -> AwsError:
        return AwsError(
            f"Instance {self.instance_id} does not exist in this region. "
            f"Check {ENV_INSTANCE_ID} and the region ({ENV_AWS_REGION}).",
            code="instance_not_found",
        )

    def _call(self, operation: str, call: Callable[[EC2Client], T]) -> T:
        hint = ' (Describe actions need Resource "*")' if operation.startswith("Describe") else ""
        about = f"instance {self.instance_id}{hint}"
        try:
            return aws_call("ec2", operation, self.region, self.deadline, about, call=call)
        except AwsError as error:
            if error.aws_error_code in NOT_FOUND_CODES:
                raise self._not_found() from error
            if error.aws_error_code == "InsufficientInstanceCapacity":
                raise InsufficientCapacityError(
                    f"AWS has no capacity for instance {self.instance_id}'s type in its Availability Zone right "
                    f"now (InsufficientInstanceCapacity). This passes: retry after {CAPACITY_RETRY_AFTER_SECONDS} "
                    "seconds; if it lasts, change the instance type or move the instance to another zone.",
                    aws_error_code=error.aws_error_code,
                ) from error
            raise


def instance_metrics(ec2: Ec2, start: datetime, end: datetime) -> MetricSamples:
    """The instance's CPU and network from AWS/EC2 in one GetMetricData call, period 300 s (basic and detailed
    monitoring alike). https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/viewing_metrics_with_cloudwatch.html"""
    dimensions = [{"Name": "InstanceId", "Value": ec2.instance_id}]
    wanted = (
        ("cpu", "CPUUtilization", "Maximum"),
        ("network_in", "NetworkIn", "Sum"),
        ("network_out", "NetworkOut", "Sum"),
    )
    queries = [
        {
            "Id": query_id,
            "MetricStat": {
                "Metric": {"Namespace": "AWS/EC2", "MetricName": name, "Dimensions": dimensions},
                "Period": METRIC_PERIOD_SECONDS,
                "Stat": stat,
            },
        }
        for query_id, name, stat in wanted
    ]
    about = f'the metrics of instance {ec2.instance_id} (GetMetricData needs Resource "*")'
    results = aws_call(
        "cloudwatch",
        "GetMetricData",
        ec2.region,
        ec2.deadline,
        about,
        call=lambda client: client.get_metric_data(MetricDataQueries=queries, StartTime=start, EndTime=end),
    )["MetricDataResults"]
    points = {result["Id"]: list(zip(result["Timestamps"], result["Values"], strict=True)) for result in results}
    return MetricSamples(points.get("cpu", []), points.get("network_in", []), points.get("network_out", []))


class Notice(NamedTuple):
    subject: str
    message: str
    attributes: dict[str, str]


def notification(action: Action, instance_id: str, fields: Mapping[str, Any]) -> Notice:
    """The SNS message for a start or a stop: a subject and a body a person reads, attributes to filter on."""
    decision = str(fields.get("decision") or "start")
    what = {"start": "started", "stop": "stopped", "would_stop": "would be stopped (dry run)",
            "would_start": "would be started (dry run)"}.get(decision, decision)  # fmt: skip
    if action in (Action.HOLD, Action.RELEASE):
        what = str(fields["reason"])
    lines = [f"Instance {instance_id} {what} by {action}."]
    labels = (("reason", "Why"), ("signal", "Decided by"), ("previous_state", "Was"), ("state", "Now"))
    lines += [f"{label}: {fields[key]}" for key, label in labels if fields.get(key) is not None]
    uptime = fields.get("uptime_seconds")
    if uptime is not None:
        lines.append(f"Ran for: {int(uptime) // 3600} h {int(uptime) % 3600 // 60} min")
    subject = f"Backend {instance_id} {what}"[:100]  # SNS: at most 100 printable ASCII characters
    return Notice(subject, "\n".join(lines), {"action": action.value, "decision": decision})


def publish(topic_arn: str, notice: Notice, deadline: Deadline) -> str | None:
    """Publish one notice; None if sent, else a warning. A failure changes neither the decision nor the answer."""
    region = topic_region(topic_arn)
    attributes = {name: {"DataType": "String", "StringValue": value} for name, value in notice.attributes.items()}
    try:
        aws_call(
            "sns",
            "Publish",
            region,
            deadline,
            f"topic {topic_arn}",
            call=lambda client: client.publish(
                TopicArn=topic_arn, Subject=notice.subject, Message=notice.message, MessageAttributes=attributes
            ),
        )
    except (AwsError, OutOfTimeError) as error:
        return f"The notification was not published: {error.message}"
    return None


# --- The backend: one HTTP exchange, bounded in time and bytes whatever the server does -----------
class ResponseTooLargeError(Exception):
    """The server sent more bytes than the exchange allows."""


def fetch_activity(url: str, seconds: float, clock: Clock) -> Activity | ActivityUnknown:
    """GET the activity endpoint within `seconds`; every failure becomes an ActivityUnknown that names it."""
    try:
        status_code, body = http_exchange("GET", url, seconds, MAX_ACTIVITY_BYTES, clock.monotonic)
    except TimeoutError:
        return ActivityUnknown(f"GET {url} timed out after {seconds:.1f}s")
    except ResponseTooLargeError:
        return ActivityUnknown(f"GET {url} sent more than {MAX_ACTIVITY_BYTES // 1024} KiB")
    except (OSError, http.client.HTTPException) as error:
        return ActivityUnknown(f"GET {url} failed: {type(error).__name__}")
    if not 200 <= status_code < 300:
        return ActivityUnknown(f"GET {url} answered HTTP {status_code}")
    return parse_activity(body, clock.now())


def drain(url: str, http_timeout_seconds: float, deadline: Deadline, keep: float) -> str | None:
    """POST the backend's drain endpoint right before a stop, keeping `keep` seconds for the stop: None if it
    drained (it then refuses new work), else why not. Anything but a 2xx {"drained": true} is a refusal."""
    seconds = deadline.grant_backend(f"POST {url}", http_timeout_seconds, keep=keep)
    try:
        status_code, body = http_exchange("POST", url, seconds, MAX_ACTIVITY_BYTES, deadline.clock.monotonic)
    except TimeoutError:
        return f"the drain (POST {url}) timed out after {seconds:.1f}s"
    except (OSError, http.client.HTTPException, ResponseTooLargeError) as error:
        return f"the drain (POST {url}) failed: {type(error).__name__}"
    try:
        answer = strict_json(body)
    except ValueError:
        answer = None
    if 200 <= status_code < 300 and isinstance(answer, dict) and answer.get("drained") is True:
        return None
    shown = json.dumps(answer)[:200] if answer is not None else _short(body[:60])
    return f"the backend did not drain (POST {url} answered HTTP {status_code}: {shown})"


def undrain(url: str, http_timeout_seconds: float, deadline: Deadline) -> str:
    """DELETE the drain ("resume work now") after a stop that did not happen, within what is left; says how it went.
    A backend that cannot be told resumes when its drain lease ends."""
    try:
        seconds = deadline.grant_backend(f"DELETE {url}", http_timeout_seconds)
        status_code, _ = http_exchange("DELETE", url, seconds, MAX_ACTIVITY_BYTES, deadline.clock.monotonic)
    except (OutOfTimeError, OSError, http.client.HTTPException, ResponseTooLargeError) as error:
        answer = "out of time" if isinstance(error, OutOfTimeError) else type(error).__name__
    else:
        if 200 <= status_code < 300:
            return f"The backend was told to resume work (DELETE {url} answered HTTP {status_code})."
        answer = f"HTTP {status_code}"
    return f"The backend could not be told to resume (DELETE {url}: {answer}): it refuses work until its lease ends."


def probe_health(url: str, seconds: float, clock: Clock) -> dict[str, Any]:
    """GET the health endpoint within `seconds`, reading its status line and nothing more."""
    try:
        status_code, _ = http_exchange("GET", url, seconds, MAX_STATUS_LINE_BYTES, clock.monotonic, status_only=True)
    except (OSError, http.client.HTTPException, ResponseTooLargeError):
        return {"reachable": False, "healthy": False, "status_code": None}
    return {"reachable": True, "healthy": 200 <= status_code < 300, "status_code": status_code}


def http_exchange(
    method: str, url: str, seconds: float, max_bytes: int, monotonic: Callable[[], float], *, status_only: bool = False
) -> tuple[int, bytes]:
    """One HTTP/1.1 request that ends within `seconds` and receives at most `max_bytes`, whatever the server does.

    requests cannot promise this: its timeouts apply to each socket operation, so a server that trickles
    a byte at a time holds it for ever (requests/requests#4276). Here DNS, connect, TLS, sending and every
    receive share one deadline. Redirects are not followed."""
    deadline = monotonic() + seconds
    parts = urlsplit(url)
    https = parts.scheme == "https"
    sock = _connect(parts.hostname or "", parts.port or (443 if https else 80), https, deadline, monotonic)
    try:
        stream = _DeadlineStream(sock, deadline, monotonic, max_bytes)
        request = f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: application/json\r\n"
        length = "" if method == "GET" else "Content-Length: 0\r\n"  # a POST without a body says so
        stream.sendall(f"{request}{length}Connection: close\r\n\r\n".encode())
        stream.skip_interim_responses()
        if status_only:
            return _status_code(stream.makefile().readline(max_bytes)), b""
        response = http.client.HTTPResponse(stream, method=method)  # type: ignore[arg-type]
        response.begin()
        if response.length is not None and response.length > max_bytes:  # refused before a byte of it is read
            raise ResponseTooLargeError
        return response.status, response.read(max_bytes)  # never read(): it allocates what the server declares
    finally:
        sock.close()


class _DeadlineStream(io.RawIOBase):
    """A connected socket on which every send and receive ends by one deadline, and that yields at most
    `max_bytes` (status line and headers included); http.client reads the response from it."""

    def __init__(self, sock: socket.socket, deadline: float, monotonic: Callable[[], float], max_bytes: int) -> None:
        super().__init__()
        self._sock, self._deadline, self._monotonic, self._bytes_left = sock, deadline, monotonic, max_bytes
        self._pending = b""  # read while looking past interim responses, served first

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._pending:
            size = min(len(buffer), len(self._pending))
            buffer[:size], self._pending = self._pending[:size], self._pending[size:]
            return size
        if self._bytes_left <= 0:
            raise ResponseTooLargeError
        self._sock.settimeout(_seconds_left(self._deadline, self._monotonic))
        received = self._sock.recv_into(buffer, min(len(buffer), self._bytes_left))
        self._bytes_left -= received
        return received

    def skip_interim_responses(self) -> None:
        """Drop 1xx responses before the final one (103 Early Hints, a stray 100 Continue): http.client skips
        only 100, and the health probe none. They count against the byte limit like the rest."""
        head = b""
        while True:
            while b"\n" not in head and (chunk := self.read(4096)):
                head += chunk
            if not INTERIM_STATUS.match(head):
                break
            while b"\r\n\r\n" not in head and (chunk := self.read(4096)):
                head += chunk
            head = head.partition(b"\r\n\r\n")[2]
        self._pending = head

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_seconds_left(self._deadline, self._monotonic))  # sendall's total since 3.5
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(self)


def _connect(host: str, port: int, https: bool, deadline: float, monotonic: Callable[[], float]) -> socket.socket:
    """DNS, TCP and TLS, all before the deadline; the first address that answers wins."""
    failure: OSError = ConnectionError(f"no address found for {host}")
    for family, kind, protocol, _, address in _resolve(host, port, deadline - monotonic()):
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(_seconds_left(deadline, monotonic))
            sock.connect(address)
            if https:  # the socket's timeout bounds the whole handshake (Python 3.5+): give it only what is left
                sock.settimeout(_seconds_left(deadline, monotonic))
                sock = _tls_context().wrap_socket(sock, server_hostname=host)
            return sock
        except OSError as error:
            sock.close()
            failure = error
    raise failure


def _resolve(host: str, port: int, seconds: float) -> list[Any]:
    """getaddrinfo, which takes no timeout: it runs in a daemon thread that we wait for at most `seconds`."""
    answers: list[Any] = []

    def lookup() -> None:
        try:
            answers.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as error:
            answers.append(error)
        except UnicodeError:  # the IDNA codec refuses the name (an empty label, a label over 63 characters)
            answers.append(socket.gaierror(socket.EAI_NONAME, f"{host!r} is not a valid host name"))

    worker = threading.Thread(target=lookup, name="resolve-backend", daemon=True)
    worker.start()
    worker.join(max(seconds, 0.0))
    if not answers:
        raise TimeoutError(f"resolving {host} took longer than {seconds:.1f}s")
    if isinstance(answers[0], OSError):
        raise answers[0]
    return list(answers[0])


@cache
def _tls_context() -> ssl.SSLContext:
    from botocore.httpsession import where  # the CA bundle botocore itself trusts, in every Lambda runtime

    return ssl.create_default_context(cafile=where())


def _seconds_left(deadline: float, monotonic: Callable[[], float]) -> float:
    left = deadline - monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left


def _status_code(line: bytes) -> int:
    version, _, rest = line.partition(b" ")
    if not version.startswith(b"HTTP/") or not rest[:3].isdigit():
        raise http.client.BadStatusLine(repr(line[:60]))
    return int(rest[:3])


# --- Actions: what each one does with the instance ------------------------------------------------
@dataclass
class Outcome:
    """What an action did: the response's fields (logged too), its metrics and warnings."""

    fields: dict[str, Any]
    status_code: int = 200
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    level: int = logging.INFO
    headers: dict[str, str] = field(default_factory=dict)
    notify: bool = False  # it started or stopped the instance (or would have): publish to NOTIFY_TOPIC_ARN
    notices: list[Notice] = field(default_factory=list)  # published besides that one (a hold that ended)


def start(ec2: Ec2, config: Config, fields: Mapping[str, Any]) -> Outcome:
    """Describe (its tags carry any hold), then StartInstances if the instance is stopped; wait out a stop in
    progress within the deadline. Held stopped: refused, with no StartInstances."""
    info = ec2.describe()
    reading = read_hold(info.tags, ec2.deadline.clock.now(), config.max_hold_hours)
    if reading.hold is not None and reading.hold.state == "stopped":
        raise HeldStoppedError(
            f"Instance {ec2.instance_id} is {reading.hold.text()}, so it is not started. It can be woken once the "
            'hold ends, or when an operator releases it ({"action": "release"}).',
            hold=reading.hold.as_dict(),
        )
    if info.state in ("pending", "running"):
        transition = Transition(info.state, info.state)
    elif info.state == "stopped":
        try:
            transition = ec2.start_instance()
        except AwsError as error:
            if error.aws_error_code != "IncorrectInstanceState":
                raise
            transition = _start_once_stopped(ec2, ec2.describe().state)
    else:
        transition = _start_once_stopped(ec2, info.state)
    started = transition.previous_state in ("stopped", "stopping")
    message = "Instance is starting: poll the backend's health endpoint." if started else "Instance is already up."
    return Outcome(
        {"previous_state": transition.previous_state, "state": transition.state, "message": message},
        status_code=202 if started else 200,
        metrics={"InstanceStarted": int(started)},
        warnings=[reading.problem] if reading.problem else [],
        notify=started,
    )


def _start_once_stopped(ec2: Ec2, state: str) -> Transition:
    # StartInstances on a stopping instance fails with IncorrectInstanceState (so do shutting-down
    # and terminated): wait out a stop in progress.
    deadline = ec2.deadline
    while state == "stopping":
        # A wait is worth it only if a Describe and a StartInstances still fit after it.
        if deadline.left() < STOPPING_POLL_SECONDS + 2 * aws_call_seconds(1):
            raise StillStoppingError(
                f"Instance {ec2.instance_id} is still stopping. Retry start after {RETRY_AFTER_SECONDS} seconds.",
                state=state,
            )
        deadline.clock.sleep(STOPPING_POLL_SECONDS)
        state = ec2.describe().state
    if state in GONE_STATES:
        raise InstanceGoneError(
            f"Instance {ec2.instance_id} is {state} and cannot be started. Point {ENV_INSTANCE_ID} at a live instance.",
            state=state,
        )
    if state == "stopped":
        return ec2.start_instance()
    return Transition(state, state)  # someone else started it meanwhile


def status(ec2: Ec2, config: Config, fields: Mapping[str, Any]) -> Outcome:
    """The instance's state, its hold, and, when it runs, whether the backend's health endpoint answers 2xx."""
    health_url = config.require_backend_url(Action.STATUS) + config.health_path
    info = ec2.describe()
    reading = read_hold(info.tags, ec2.deadline.clock.now(), config.max_hold_hours)
    held = reading.hold.as_dict() if reading.hold else None
    outcome = Outcome({"state": info.state, "launch_time": info.launch_time.isoformat(), "hold": held})
    if reading.problem:
        outcome.warnings.append(reading.problem)
    backend: dict[str, Any] | None = {"reachable": False, "healthy": False, "status_code": None}
    if info.state == "running":
        wanted = min(HEALTH_TIMEOUT_SECONDS, config.http_timeout_seconds)
        try:
            seconds = ec2.deadline.grant_backend(f"GET {health_url}", wanted)
            backend = probe_health(health_url, seconds, ec2.deadline.clock)
        except OutOfTimeError as error:  # answer what is known: the state
            backend = None
            outcome.warnings.append(error.message)
    outcome.fields["backend"] = backend
    return outcome


def check_idle(ec2: Ec2, config: Config, fields: Mapping[str, Any]) -> Outcome:
    """Stop the instance if it is known to be idle past the timeout; keep it whenever in doubt. Held running or
    in a keep-warm window, keep it and start it if stopped. A hold that has ended is cleared."""
    config.require_backend_url(Action.CHECK_IDLE)
    outcome = Outcome({})
    verdict: Verdict | None = None
    try:
        info = ec2.describe()
        outcome.fields.update(state=info.state, launch_time=info.launch_time.isoformat())
        reading = read_hold(info.tags, ec2.deadline.clock.now(), config.max_hold_hours)
        if reading.problem:
            outcome.warnings.append(reading.problem)
        if reading.hold:
            outcome.fields["hold"] = reading.hold.as_dict()
        if reading.ended:
            _end_hold(ec2, config, reading.ended, outcome)
        verdict = _judge(ec2, config, info, reading.hold, outcome)  # kept apart: a stop out of time says why
        verdict = _act(ec2, config, verdict, outcome)
        if verdict.decision in (Decision.STOP, Decision.WOULD_STOP):
            uptime_seconds = round((ec2.deadline.clock.now() - info.launch_time).total_seconds())
            outcome.fields["uptime_seconds"] = uptime_seconds
            if verdict.decision is Decision.STOP:
                outcome.metrics["UptimeSeconds"] = uptime_seconds
        reason = verdict.reason
    except OutOfTimeError as error:
        reason = f"out of time before {error.step} ({error.brief}); the next check decides again"
        reason = f"{verdict.reason}, but {reason}" if verdict else reason
        verdict = Verdict(Decision.KEEP, reason, verdict.idle_seconds if verdict else None, "deadline")
        outcome.level = logging.ERROR  # no decision: an idle instance would run on; the OutOfTime alarm says so
        outcome.metrics["OutOfTime"] = 1
    idle_seconds = None if verdict.idle_seconds is None else round(verdict.idle_seconds, 1)
    if idle_seconds is not None:
        outcome.metrics["IdleSeconds"] = idle_seconds
    outcome.notify = verdict.decision not in (Decision.KEEP, Decision.SKIP)
    outcome.fields.update(
        decision=verdict.decision.value,
        reason=reason,
        signal=verdict.signal,
        idle_seconds=idle_seconds,
        idle_timeout_seconds=config.idle_timeout_seconds,
        dry_run=config.dry_run,
    )
    return outcome


def _judge(ec2: Ec2, config: Config, info: InstanceInfo, hold: Hold | None, outcome: Outcome) -> Verdict:
    """The verdict, from a hold, a keep-warm window, the backend's activity, or (when the backend cannot say, or
    says busy for too long) CloudWatch."""
    clock = ec2.deadline.clock
    if hold is not None and hold.state == "running":
        return held_running(info.state, hold)
    window = config.open_window(clock.now())
    if window is not None:  # working hours: never stop, and start a stopped instance unless held stopped
        verdict = keep_warm(info.state, window)
        if verdict.decision is Decision.START and hold is not None:
            return Verdict(Decision.SKIP, f"stopped, {hold.text()}: no keep-warm window starts it", signal="hold")
        return verdict
    if info.state != "running":
        return Verdict(Decision.SKIP, f"instance is {info.state}, not running", signal="state")
    uptime_seconds = (clock.now() - info.launch_time).total_seconds()
    outcome.metrics["UptimeHours"] = round(max(uptime_seconds, 0) / 3600, 2)  # nothing explains it: alarmed on
    url = f"{config.backend_base_url}{config.last_activity_path}"
    # The answer is worth reading only if the calls it may lead to still fit after it.
    keep = after_activity_seconds(config)
    activity = fetch_activity(url, ec2.deadline.grant_backend(f"GET {url}", config.http_timeout_seconds, keep), clock)
    if isinstance(activity, ActivityUnknown):
        outcome.metrics["BackendUnreachable"] = 1
        outcome.level = logging.ERROR
        if config.idle_cpu_percent > 0:
            return _second_signal(ec2, config, info, activity)
    verdict = decide(info.launch_time, activity, clock.now(), config.idle_timeout_seconds)
    busy = isinstance(activity, Activity) and activity.busy_reason is not None
    watched = 0 < config.stuck_busy_seconds < uptime_seconds and config.idle_cpu_percent > 0 and info.vcpus is not None
    if busy and watched:
        return _stuck_busy(ec2, config, info, verdict, outcome)
    return verdict


def _stuck_busy(ec2: Ec2, config: Config, info: InstanceInfo, verdict: Verdict, outcome: Outcome) -> Verdict:
    """Busy for longer than STUCK_BUSY_SECONDS: one GetMetricData over that time, judged as the second signal is.
    Idle all along means a busy flag that never clears: WARNING and StuckBusy, and a stop with STOP_STUCK_BUSY."""
    try:
        idle, evidence = _metrics_idle(ec2, config, info, config.stuck_busy_seconds)
    except (AwsError, OutOfTimeError) as error:
        outcome.warnings.append(f"The stuck-busy watch could not read CloudWatch: {error.message}")
        return verdict
    if not idle:
        return verdict
    outcome.fields["stuck_busy"] = True
    outcome.metrics["StuckBusy"] = 1
    outcome.level = max(outcome.level, logging.WARNING)
    reason = f"{verdict.reason}, but its metrics say idle ({evidence}): the busy flag may be stuck"
    if config.stop_stuck_busy:
        return Verdict(
            Decision.STOP, f"{reason}; stopped ({ENV_STOP_STUCK_BUSY}=true)", verdict.idle_seconds, "stuck_busy"
        )
    return verdict._replace(reason=f"{reason}; kept (a busy backend is stopped only with {ENV_STOP_STUCK_BUSY}=true)")


def _end_hold(ec2: Ec2, config: Config, ended: Hold, outcome: Outcome) -> None:
    """A hold whose end has passed: delete its tags (one DeleteTags) and say so once; the usual rules apply."""
    if config.dry_run:
        outcome.warnings.append(f"The hold ({ended.text()}) has ended; in dry run its tags are left in place.")
        return
    try:
        ec2.clear_hold()
    except AwsError as error:
        outcome.warnings.append(f"The hold ({ended.text()}) has ended, but its tags stay: {error.message}")
        return
    outcome.fields["hold_ended"] = ended.as_dict()
    text = f"The hold on instance {ec2.instance_id} ({ended.text()}) has ended; the usual rules apply again."
    attributes = {"action": Action.CHECK_IDLE.value, "decision": "hold_ended"}
    outcome.notices.append(Notice(f"Backend {ec2.instance_id} hold ended", text, attributes))


def _metrics_idle(ec2: Ec2, config: Config, info: InstanceInfo, seconds: int) -> tuple[bool, str]:
    """Whether the instance's own metrics were idle over the last `seconds` of the current run, on its scale (one
    busy vCPU of any count is not idle), in one GetMetricData call; and the evidence."""
    assert info.vcpus is not None  # noqa: S101 - both callers check it first
    now = ec2.deadline.clock.now()
    start, end = metric_window(now, seconds)
    samples = instance_metrics(ec2, start, now)
    cpu_limit = min(config.idle_cpu_percent, ONE_BUSY_VCPU_PERCENT / info.vcpus)
    network_limit = config.idle_network_kb * 1024
    return judge_metrics(samples, start, end, cpu_limit, network_limit, launch_time=info.launch_time)


def _second_signal(ec2: Ec2, config: Config, info: InstanceInfo, activity: ActivityUnknown) -> Verdict:
    """The backend cannot say: once the instance has run past the timeout, its own CloudWatch metrics decide,
    on the instance's own scale: one busy vCPU of any count keeps it."""
    now, timeout = ec2.deadline.clock.now(), config.idle_timeout_seconds
    unreachable = f"backend unreachable ({activity.reason})"
    uptime_seconds = (now - info.launch_time).total_seconds()
    if uptime_seconds <= timeout:
        return Verdict(
            Decision.KEEP, f"{unreachable}; up {_seconds(max(uptime_seconds, 0))}, within the {timeout}s timeout"
        )
    if info.vcpus is None:
        reason = "DescribeInstances gave no CpuOptions, so one busy vCPU cannot be told from an idle instance"
        return Verdict(Decision.KEEP, f"{unreachable}; {reason}", signal="cloudwatch")
    try:
        idle, evidence = _metrics_idle(ec2, config, info, timeout)
    except AwsError as error:
        return Verdict(
            Decision.KEEP, f"{unreachable}; CloudWatch could not be read: {error.message}", signal="cloudwatch"
        )
    return Verdict(Decision.STOP if idle else Decision.KEEP, f"{unreachable}; {evidence}", signal="cloudwatch")


def _act(ec2: Ec2, config: Config, verdict: Verdict, outcome: Outcome) -> Verdict:
    """Carry out a stop or a keep-warm start; a stop the backend's activity decided waits for its drain."""
    if verdict.decision is Decision.START:
        return verdict._replace(decision=_start_unless_dry_run(ec2, config, outcome))
    if verdict.decision is not Decision.STOP:
        return verdict
    if not (config.drain_path and verdict.signal == "activity" and not config.dry_run):
        return verdict._replace(decision=_stop_unless_dry_run(ec2, config, outcome))
    url = f"{config.backend_base_url}{config.drain_path}"
    refused = drain(url, config.http_timeout_seconds, ec2.deadline, keep=stop_seconds(config))
    if refused is not None:
        return verdict._replace(decision=Decision.KEEP, reason=f"{verdict.reason}, but {refused}")
    outcome.fields["drained"] = True
    try:
        return verdict._replace(decision=_stop_unless_dry_run(ec2, config, outcome))
    except (AwsError, OutOfTimeError) as error:  # the backend refuses all work now: tell it to resume
        outcome.level = logging.ERROR
        outcome.metrics["Errors"] = 1
        if isinstance(error, OutOfTimeError):
            outcome.metrics["OutOfTime"] = 1
        resumed = undrain(url, config.http_timeout_seconds, ec2.deadline)
        reason = f"{verdict.reason}; drained, but StopInstances failed: {error.message} {resumed}"
        return verdict._replace(decision=Decision.KEEP, reason=reason)


def _start_unless_dry_run(ec2: Ec2, config: Config, outcome: Outcome) -> Decision:
    if config.dry_run:
        return Decision.WOULD_START
    transition = ec2.start_instance()
    outcome.fields.update(previous_state=transition.previous_state, state=transition.state)
    outcome.metrics["InstanceStarted"] = 1
    return Decision.START


def stop(ec2: Ec2, config: Config, fields: Mapping[str, Any]) -> Outcome:
    """The operator's stop, now (direct invocation only): honours DRY_RUN and STOP_HIBERNATE."""
    outcome = Outcome({"state": ec2.describe().state} if config.dry_run else {})
    already = config.dry_run and outcome.fields["state"] in STOPPED_STATES
    decision = Decision.SKIP if already else _stop_unless_dry_run(ec2, config, outcome)
    reason = "stop requested"
    if decision is Decision.SKIP:  # nothing changed: nothing to notify
        reason += f", but the instance was already {outcome.fields.get('previous_state', outcome.fields['state'])}"
    outcome.notify = decision is not Decision.SKIP
    outcome.fields.update(decision=decision.value, reason=reason, dry_run=config.dry_run)
    window = config.open_window(ec2.deadline.clock.now())
    if window is not None:
        outcome.warnings.append(
            f"The keep-warm window {window.text!r} is open: the next check_idle starts the instance again. "
            f"To keep it stopped, remove the window from {ENV_KEEP_WARM} first."
        )
    return outcome


def _stop_unless_dry_run(ec2: Ec2, config: Config, outcome: Outcome) -> Decision:
    if config.dry_run:
        return Decision.WOULD_STOP
    transition, warning = ec2.stop_instance(config.stop_hibernate)
    if warning:
        outcome.warnings.append(warning)
    outcome.fields.update(previous_state=transition.previous_state, state=transition.state)
    if transition.previous_state in STOPPED_STATES:  # someone else stopped it first
        return Decision.SKIP
    outcome.metrics["InstanceStopped"] = 1
    return Decision.STOP


def hold(ec2: Ec2, config: Config, fields: Mapping[str, Any]) -> Outcome:
    """Hold the instance running or stopped until a time (direct invocation only): the three tags in one
    CreateTags, then start or stop it to match (an operator's stop: STOP_HIBERNATE and DRY_RUN honoured)."""
    wanted = hold_request(fields, ec2.deadline.clock.now(), config.max_hold_hours)  # a 400 writes nothing
    info = ec2.describe()
    outcome = Outcome({"hold": wanted.as_dict(), "state": info.state}, notify=True)
    if not config.dry_run:
        ec2.set_hold(wanted)
    if wanted.state == "running" and info.state == "stopped":
        decision = _start_unless_dry_run(ec2, config, outcome)
    elif wanted.state == "stopped" and info.state in ("pending", "running"):
        decision = _stop_unless_dry_run(ec2, config, outcome)
    else:
        decision = Decision.KEEP
    written = " (dry run: nothing written)" if config.dry_run else ""
    outcome.fields.update(decision=decision.value, reason=f"{wanted.text()}{written}", dry_run=config.dry_run)
    return outcome


def release(ec2: Ec2, config: Config, fields: Mapping[str, Any]) -> Outcome:
    """End the hold now (direct invocation only): its tags deleted in one DeleteTags; the usual rules apply."""
    info = ec2.describe()
    reading = read_hold(info.tags, ec2.deadline.clock.now(), config.max_hold_hours)
    released = reading.hold or reading.ended
    if info.tags and not config.dry_run:
        ec2.clear_hold()
    reason = f"released from its hold ({released.text()})" if released else "released: it had no hold"
    if config.dry_run:
        reason += " (dry run: nothing written)"
    return Outcome(
        {"hold": None, "released": released.as_dict() if released else None, "state": info.state,
         "decision": Decision.KEEP.value, "reason": reason, "dry_run": config.dry_run},
        notify=bool(info.tags),
    )  # fmt: skip


# The actions by name; each takes the instance, the configuration and the event's fields (for hold).
ACTIONS: Final[dict[Action, Callable[[Ec2, Config, Mapping[str, Any]], Outcome]]] = {
    Action.START: start,
    Action.STATUS: status,
    Action.CHECK_IDLE: check_idle,
    Action.STOP: stop,
    Action.HOLD: hold,
    Action.RELEASE: release,
}


def act(action: Action, config: Config, deadline: Deadline, fields: Mapping[str, Any]) -> Outcome:
    """Run the action on the instance; publish a start, a stop or a hold to NOTIFY_TOPIC_ARN."""
    outcome = ACTIONS[action](Ec2(config.region, config.instance_id, deadline), config, fields)
    if config.notify_topic_arn:
        notices = [notification(action, config.instance_id, outcome.fields)] if outcome.notify else []
        for notice in [*outcome.notices, *notices]:
            failure = publish(config.notify_topic_arn, notice, deadline)
            if failure:
                outcome.warnings.append(failure)
    return outcome


# --- Preflight: what is wrong with the deployment, before the first idle night --------------------
class Check(NamedTuple):
    check: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str | None = None


def preflight(environ: Mapping[str, str], deadline: Deadline, fields: Mapping[str, Any]) -> Outcome:
    """Check the deployment without changing anything (no start, stop, tag or drain; SNS only with "notify": true).
    Each check runs within the deadline, and the failure of one never stops the others."""
    whole_seconds = deadline.left() + ANSWER_MARGIN_SECONDS
    config, problems = Config.with_problems(environ)
    checks = [_config_check(environ, problems)]
    if config is None:
        skipped = "INSTANCE_ID is missing or bad: fix the configuration and run preflight again"
        checks += [Check(name, "skip", skipped) for name in PREFLIGHT_CHECKS[1:]]
    else:
        ec2 = Ec2(config.region, config.instance_id, deadline)
        found: list[InstanceInfo] = []
        for name in PREFLIGHT_CHECKS[1:]:
            checks.append(_run_check(name, ec2, config, found, fields, whole=whole_seconds))
    failed = [check.check for check in checks if check.status == "fail"]
    counts = ", ".join(f"{sum(c.status == s for c in checks)} {s}" for s in ("ok", "warn", "fail", "skip"))
    return Outcome(
        {"ok": not failed, "checks": [check._asdict() for check in checks], "message": f"preflight: {counts}"},
        level=logging.WARNING if failed else logging.INFO,
    )


WITHOUT_THE_INSTANCE: Final = frozenset({"instance", "notifications", "drain", "keep_warm", "timeout"})
PREFLIGHT_CHECKS: Final = (
    "config", "instance", "start_permission", "stop_permission", "tag_permission", "metrics", "schedule",
    "notifications", "backend_health", "activity_contract", "drain", "keep_warm", "timeout",
)  # fmt: skip


def _config_check(environ: Mapping[str, str], problems: list[ConfigError]) -> Check:
    shown = [
        f"{n}={'(set)' if n == ENV_AUTH_TOKEN else environ[n]!r}"
        for n in (*VARIABLES, ENV_AUTH_TOKEN)
        if environ.get(n, "").strip()
    ]
    if problems:
        return Check("config", "fail", " | ".join(p.message for p in problems), "fix each variable named above")
    return Check("config", "ok", f"every variable is valid: {', '.join(shown) or 'all defaults'}")


def _run_check(
    name: str, ec2: Ec2, config: Config, found: list[InstanceInfo], fields: Mapping[str, Any], *, whole: float
) -> Check:
    """One check; an AWS or backend failure is that check's failure, and no time left is a skip."""
    try:
        if name not in WITHOUT_THE_INSTANCE and not found:
            return Check(name, "skip", "the instance could not be described: see the instance check")
        return PREFLIGHT[name](ec2, config, found, fields, whole)
    except OutOfTimeError as error:
        return Check(name, "skip", f"out of time ({error.brief})", "raise the function's timeout")
    except AwsError as error:
        fix = f"allow {error.details['iam_action']} to the function's role" if "iam_action" in error.details else None
        return Check(name, "fail", error.message, fix or "see the message")


def _instance_check(ec2: Ec2, config: Config, found: list[InstanceInfo], *_: Any) -> Check:
    info = ec2.describe()
    found.append(info)
    monitoring = "detailed" if info.detailed_monitoring else "basic (5-minute averages hide shorter bursts)"
    detail = f"{info.state}, {info.instance_type}, {info.vcpus or '?'} vCPUs, monitoring {monitoring}"
    if config.stop_hibernate and not info.hibernation_configured:
        fix = f"enable hibernation on the instance (only possible at launch) or set {ENV_STOP_HIBERNATE}=false"
        return Check(
            "instance", "fail", f"{detail}; {ENV_STOP_HIBERNATE}=true but it is not configured to hibernate", fix
        )
    return Check("instance", "ok", detail)


def _permission(name: str, operations: tuple[str, ...], **kwargs: Any) -> Callable[..., Check]:
    def check(ec2: Ec2, *_: Any) -> Check:
        for operation in operations:
            ec2.allowed(operation, **kwargs)
        return Check(
            name, "ok", f"{', '.join(IAM_ACTIONS[o] for o in operations)} allowed (DryRun) on {ec2.instance_id}"
        )

    return check


def _stop_permission(ec2: Ec2, config: Config, *_: Any) -> Check:
    return _permission("stop_permission", ("StopInstances",), Hibernate=config.stop_hibernate)(ec2)


def _metrics_check(ec2: Ec2, config: Config, found: list[InstanceInfo], *_: Any) -> Check:
    if config.idle_cpu_percent == 0:
        return Check("metrics", "skip", f"the CloudWatch fallback is off ({ENV_IDLE_CPU_PERCENT}=0)")
    info, now = found[0], ec2.deadline.clock.now()
    start = now - timedelta(hours=1) if info.state == "running" else info.launch_time
    points = len(instance_metrics(ec2, start, start + timedelta(hours=1)).cpu)
    span = f"{start:%Y-%m-%d %H:%M}-{start + timedelta(hours=1):%H:%M} UTC"
    if points:
        return Check("metrics", "ok", f"GetMetricData allowed; {points} CPU datapoints for {span}")
    fix = "EC2 publishes minutes late; check the instance ran then, and the function's route to CloudWatch"
    return Check("metrics", "warn", f"GetMetricData allowed, but no CPU datapoints for {span}", fix)


def _schedule_check(ec2: Ec2, config: Config, *_: Any) -> Check:
    now = ec2.deadline.clock.now()
    query = {"Id": "checks", "MetricStat": {"Period": 60, "Stat": "Sum", "Metric": {
        "Namespace": config.metrics_namespace, "MetricName": "CheckIdleRequested",
        "Dimensions": [{"Name": "InstanceId", "Value": config.instance_id}]}}}  # fmt: skip
    about = f'the metric {config.metrics_namespace}/CheckIdleRequested (GetMetricData needs Resource "*")'
    result = aws_call(
        "cloudwatch",
        "GetMetricData",
        config.region,
        ec2.deadline,
        about,
        call=lambda client: client.get_metric_data(
            MetricDataQueries=[query], StartTime=now - timedelta(days=1), EndTime=now
        ),
    )["MetricDataResults"][0]
    points = list(zip(result["Timestamps"], result["Values"], strict=True))
    recent = sum(value for when, value in points if when >= now - timedelta(minutes=15))
    if recent:
        return Check("schedule", "ok", f"the schedule ran {recent:.0f} times in 15 minutes")
    rule = (
        'check that the EventBridge rule is enabled, targets this function, and has the input {"action": "check_idle"}'
    )
    if not points:  # no history at all: a function deployed less than 15 minutes ago looks the same
        return Check("schedule", "warn", "no check_idle has run in the last day (a new deployment?)", rule)
    return Check("schedule", "fail", "check_idle ran in the last day but not in the last 15 minutes", rule)


def _notifications_check(ec2: Ec2, config: Config, _: Any, fields: Mapping[str, Any], *__: Any) -> Check:
    if not config.notify_topic_arn:
        return Check("notifications", "skip", f"{ENV_NOTIFY_TOPIC_ARN} is not set: no start or stop notices")
    if fields.get("notify") is not True:
        return Check("notifications", "skip", 'send a test message with {"action": "preflight", "notify": true}')
    text = f"A test message from the Backend Orchestrator's preflight for instance {config.instance_id}."
    notice = Notice(f"Backend {config.instance_id} preflight", text, {"action": "preflight", "decision": "test"})
    failure = publish(config.notify_topic_arn, notice, ec2.deadline)
    if failure:
        return Check("notifications", "fail", failure, f"allow sns:Publish on {config.notify_topic_arn}")
    return Check("notifications", "ok", f"a test message was published to {config.notify_topic_arn}")


def _backend_check(ec2: Ec2, config: Config, found: list[InstanceInfo], *_: Any) -> Check:
    if found[0].state != "running":
        return Check("backend_health", "skip", f"the instance is {found[0].state}: start it and run preflight again")
    url = config.require_backend_url(Action.PREFLIGHT) + config.health_path
    seconds = ec2.deadline.grant_backend(f"GET {url}", min(HEALTH_TIMEOUT_SECONDS, config.http_timeout_seconds))
    health = probe_health(url, seconds, ec2.deadline.clock)
    if health["healthy"]:
        return Check("backend_health", "ok", f"GET {url} answered HTTP {health['status_code']}")
    what = f"answered HTTP {health['status_code']}" if health["reachable"] else "could not be reached"
    fix = f"check {ENV_BACKEND_BASE_URL}, the backend's security group and its process"
    return Check("backend_health", "fail", f"GET {url} {what}", fix)


def _activity_check(ec2: Ec2, config: Config, found: list[InstanceInfo], *_: Any) -> Check:
    if found[0].state != "running":
        return Check("activity_contract", "skip", f"the instance is {found[0].state}: start it and run preflight again")
    url = config.require_backend_url(Action.PREFLIGHT) + config.last_activity_path
    activity = fetch_activity(
        url, ec2.deadline.grant_backend(f"GET {url}", config.http_timeout_seconds), ec2.deadline.clock
    )
    if isinstance(activity, ActivityUnknown):
        fix = "answer the activity contract (docs/activity-contract.md); until then the backend is never stopped"
        return Check("activity_contract", "fail", activity.reason, fix)
    said = (
        f"busy: {activity.busy_reason}" if activity.busy_reason else f"idle for {_seconds(activity.idle_seconds or 0)}"
    )
    return Check("activity_contract", "ok", f"GET {url}: {said}")


def _drain_check(ec2: Ec2, config: Config, *_: Any) -> Check:
    if not config.drain_path:
        return Check("drain", "skip", f"{ENV_DRAIN_PATH} is not set: no drain before a stop")
    note = f"{ENV_DRAIN_PATH}={config.drain_path} is not called: a drain makes the backend refuse work for its lease"
    return Check("drain", "skip", note)


def _keep_warm_check(ec2: Ec2, config: Config, *_: Any) -> Check:
    if not config.keep_warm:
        return Check("keep_warm", "skip", f"{ENV_KEEP_WARM} is not set: no keep-warm window")
    now = ec2.deadline.clock.now().replace(second=0, microsecond=0)
    window = config.open_window(now)
    for minute in range(1, 8 * 24 * 60):  # the next change within a week and a day, minute by minute
        moment = now + timedelta(minutes=minute)
        if (config.open_window(moment) is None) != (window is None):
            changing = window or config.open_window(moment)
            assert changing is not None  # noqa: S101 - one side of the change is open
            when = f"{moment.astimezone(changing.zone):%a %Y-%m-%d %H:%M} {changing.zone}"
            said = (
                f"open now ({window.text!r}), closes {when}"
                if window
                else f"closed now; {changing.text!r} opens {when}"
            )
            return Check("keep_warm", "ok", said)
    return Check("keep_warm", "ok", "open all week" if window else "no window opens within a week")


def _timeout_check(ec2: Ec2, config: Config, _: Any, __: Any, whole: float) -> Check:
    shortest, typical = shortest_check_seconds(config), first_attempts_check_seconds(config)
    detail = (
        f"the invocation had {whole:.0f} s; a check decides from {shortest:g} s, and needs {typical:g} s when every "
        "call takes its whole first attempt"
    )
    if whole < shortest:
        return Check(
            "timeout", "fail", detail, f"raise the function's timeout to at least {typical:g} s (60 s fits retries)"
        )
    if whole < typical:
        return Check("timeout", "warn", detail, f"raise the function's timeout to {typical:g} s or more")
    return Check("timeout", "ok", detail)


PREFLIGHT: Final[dict[str, Callable[..., Check]]] = {
    "instance": _instance_check,
    "start_permission": _permission("start_permission", ("StartInstances",)),
    "stop_permission": _stop_permission,
    "tag_permission": _permission(
        "tag_permission", ("CreateTags", "DeleteTags"), Tags=[{"Key": HOLD_TAG, "Value": "running"}]
    ),
    "metrics": _metrics_check,
    "schedule": _schedule_check,
    "notifications": _notifications_check,
    "backend_health": _backend_check,
    "activity_contract": _activity_check,
    "drain": _drain_check,
    "keep_warm": _keep_warm_check,
    "timeout": _timeout_check,
}


# --- Logs and metrics: one JSON line and one EMF line per invocation ------------------------------
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
    units = [{"Name": name, "Unit": "Seconds" if name.endswith("Seconds") else "Count"} for name in metrics]
    directive = {"Namespace": namespace, "Dimensions": [["InstanceId"]], "Metrics": units}
    document = {"_aws": {"Timestamp": int(now.timestamp() * 1000), "CloudWatchMetrics": [directive]}}
    METRICS_LOG.info(json.dumps({**document, "InstanceId": instance_id or "unknown", **metrics}, separators=(",", ":")))


def log_invocation(response: Response, body: dict[str, Any], request_id: str | None, duration_ms: float) -> None:
    """The invocation's one log line: what was asked, what happened, why, and how long it took."""
    outcome = response.outcome
    fields = {"source": response.source, **body, "status_code": outcome.status_code}
    fields.update(warnings=outcome.warnings or None, aws_request_id=request_id, duration_ms=duration_ms)
    message = fields.pop("message", None)
    if "error" in body:
        message = body["error"]["message"]
    elif message is None:
        message = f"{body['action']}: {body.get('decision') or body.get('state')}"
    level = max(outcome.level, logging.WARNING) if outcome.warnings else outcome.level
    clean = {key: value for key, value in fields.items() if value is not None}
    LOG.log(level, message, exc_info=response.bug, extra={"fields": clean})


# --- The entry point: parse, authorise, act, render -----------------------------------------------
@dataclass(frozen=True)
class Response:
    """One invocation, answered: what it asked, as far as it was understood, and what came of it."""

    outcome: Outcome
    source: Source | None = None
    action: Action | None = None
    config: Config | None = None
    authorized: bool = False  # may see the instance ID: an HTTP caller without the token may not
    bug: Exception | None = None


def respond(event: object, environ: Mapping[str, str], deadline: Deadline) -> Response:
    """Parse, authorise, configure and act; every failure becomes a Response that says what to fix."""
    source, action, config, authorized = None, None, None, False
    try:
        request = parse_event(event)
        source = Source.HTTP if isinstance(request, HttpRequest) else request.source
        token, loaded = AuthToken.from_env(environ), _load_config(environ)
        config = loaded if isinstance(loaded, Config) else None  # the log names the instance, even on a 401
        if isinstance(request, HttpRequest):
            authorize(request, token.value)
        authorized = True  # direct and scheduled invocations need no token
        if isinstance(request, EventRequest) and request.action is Action.PREFLIGHT:  # lists every bad variable
            outcome = preflight(environ, deadline, request.fields)
            return Response(outcome, source, Action.PREFLIGHT, config, authorized)
        config = _configured(token, loaded)  # what is misconfigured, told only to a caller who may know
        action = http_action(request) if isinstance(request, HttpRequest) else request.action
        fields = request.fields if isinstance(request, EventRequest) else {}
        outcome = act(action, config, deadline, fields)
        if isinstance(request, EventRequest) and request.warning:
            outcome.warnings.insert(0, request.warning)
    except OrchestratorError as error:
        return Response(_failure(error), source, action, config, authorized)
    except Exception as bug:  # noqa: BLE001 - the one broad catch: a bug is logged with its traceback, answered 500
        failure = _failure(OrchestratorError("Unexpected error: the function's log has the traceback."))
        return Response(failure, source, action, config, authorized, bug)
    return Response(outcome, source, action, config, authorized)


def _load_config(environ: Mapping[str, str]) -> Config | ConfigError:
    try:
        return Config.from_env(environ)
    except ConfigError as error:
        return error


def _configured(token: AuthToken, loaded: Config | ConfigError) -> Config:
    token.require_valid()
    if isinstance(loaded, ConfigError):
        raise loaded
    LOG.setLevel(loaded.log_level)
    return loaded


def _failure(error: OrchestratorError) -> Outcome:
    return Outcome(
        {**error.details, "error": {"code": error.code, "message": error.message}},
        status_code=error.STATUS_CODE,
        metrics={"Errors" if error.STATUS_CODE >= 500 else "Rejected": 1},  # the alarm watches Errors: ours only
        level=logging.ERROR if error.STATUS_CODE >= 500 else logging.WARNING,
        headers=dict(error.HEADERS),
    )


def render(response: Response, body: dict[str, Any], http: bool) -> dict[str, Any]:
    """The answer as the caller expects it: a Function URL / API Gateway response, or the body itself."""
    if not http:
        return body
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **response.outcome.headers}
    return {
        "statusCode": response.outcome.status_code,
        "headers": headers,
        "body": json.dumps(body, default=str),
        "isBase64Encoded": False,
    }


def handle(event: object, context: object, environ: Mapping[str, str], clock: Clock | None = None) -> dict[str, Any]:
    """One invocation from end to end, within the context's time: respond, log, emit metrics, render."""
    clock = clock or Clock()
    started = clock.monotonic()
    deadline = Deadline.from_context(context, clock)
    response = respond(event, environ, deadline)
    outcome, config = response.outcome, response.config
    if deadline.warning:
        outcome.warnings.append(deadline.warning)
    instance_id = config.instance_id if config else None
    body = {
        "ok": outcome.status_code < 400,
        "action": response.action,
        "instance_id": instance_id if response.authorized else None,
        **outcome.fields,
    }
    duration_ms = round((clock.monotonic() - started) * 1000, 1)
    request_id = getattr(context, "aws_request_id", None)
    log_invocation(response, {**body, "instance_id": instance_id}, request_id, duration_ms)  # the log always names it
    requested = {f"{response.action.title().replace('_', '')}Requested": 1} if response.action else {}
    namespace = config.metrics_namespace if config else Config.metrics_namespace
    emit_metrics(namespace, instance_id, {**requested, **outcome.metrics}, clock.now())
    return render(response, body, _is_http(event))


def lambda_handler(event: object, context: object) -> dict[str, Any]:
    """The Lambda entry point: see handle()."""
    return handle(event, context, os.environ)


warm_clients(os.environ)  # INIT, at full speed: no invocation of a well configured function builds a client
