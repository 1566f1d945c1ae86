"""Wake the PyElli backend's EC2 instance on demand and stop it once it has been idle.

Actions:
  start       start the instance, without waiting for the boot (a stop in progress is waited out first); the
              app then polls the backend's /health
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

Read top to bottom: limits, errors, configuration, the deadline, events, the pure decision, the AWS and
backend edges, the actions (a Run in, a Done out), the one presenter, preflight, logs, the entry point.
"""

from __future__ import annotations

import base64
import binascii
import hmac
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
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from functools import cache, partial
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore import xform_name
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

# --- Limits and timings ----------------------------------------------------------------------
MAX_BODY_BYTES: Final = 16 * 1024  # an HTTP event's body
MAX_ACTIVITY_BYTES: Final = 64 * 1024  # the whole activity answer: status line, headers and body
MAX_STATUS_LINE_BYTES: Final = 1024  # all the health probe reads
HEALTH_TIMEOUT_SECONDS: Final = 2.0  # status answers the app's wake loop: a slow probe is a slow wake
STOPPING_POLL_SECONDS: Final = 3.0
ANSWER_MARGIN_SECONDS: Final = 2.0  # kept back from the context's remaining time, to log and answer (at most)
ANSWER_MARGIN_SHARE: Final = 0.2  # of a shorter invocation's time: 0.6 s of Lambda's default 3 s
RETRY_AFTER_SECONDS: Final = 10
CAPACITY_RETRY_AFTER_SECONDS: Final = 30  # EC2 capacity comes back in minutes, not seconds
DEFAULT_REMAINING_MS: Final = 60_000  # invoked without a Lambda context (local use)
EPOCH_MILLISECONDS_ABOVE: Final = 1e11  # 1e11 s is the year 5138; 1e11 ms is 1973
AWS_CONNECT_TIMEOUT_SECONDS: Final = 2
AWS_READ_TIMEOUT_SECONDS: Final = 5
AWS_MAX_ATTEMPTS: Final = 3
# The least time an AWS call is attempted with: an EC2 or CloudWatch call from Lambda takes about a tenth of a second
# (178 ms for three at 128 MB, cold: docs/deploy.md), so a short timeout still gets one attempt of what is left.
AWS_MIN_ATTEMPT_SECONDS: Final = 0.4
RECOMMENDED_TIMEOUT_SECONDS: Final = 60  # the template's: every action with its retries and waits
# botocore's standard retry mode sleeps rand(0, 1) * min(2**i, 20) s before retry i + 1 (1 s scale for
# throttling), raised by an x-amz-retry-after header by at most 5 s more (botocore/retries/standard.py).
AWS_BACKOFF_CAP_SECONDS: Final = 20
AWS_RETRY_AFTER_EXTRA_SECONDS: Final = 5
MIN_BACKEND_SECONDS: Final = 1.0  # a backend request given less than this is not worth making
MIN_UNDRAIN_SECONDS: Final = 0.1  # but "resume work" is: a backend not told waits out its whole drain lease
METRIC_PERIOD_SECONDS: Final = 300  # EC2's basic monitoring period; detailed monitoring's minutes add up to it
METRICS_DELAY_SECONDS: Final = 600  # EC2 publishes a period's datapoint minutes after the period ends
# CPUUtilization averages all vCPUs: one vCPU at full load reads 100 / vCPUs %. Half of that is the most an
# idle instance may show, so that one busy vCPU keeps an instance of any size (64 vCPUs: 0.78 %).
ONE_BUSY_VCPU_PERCENT: Final = 50.0

INTERIM_STATUS: Final = re.compile(rb"HTTP/1\.[01] 1(?!01)[0-9]{2}[ \r]")  # 1xx but 101 Switching Protocols
MIN_TOKEN_CHARS: Final = 16
# What the function keeps on the instance, as tags with this prefix where the console shows them: a hold (set by the
# hold action or by hand with create-tags), and when its backend began to be busy (when the backend does not say).
TAG_PREFIX: Final = "backend-orchestrator:"
HOLD_TAG: Final = "backend-orchestrator:hold"  # running | stopped, or ended: the record of the last hold's end
HOLD_UNTIL_TAG: Final = "backend-orchestrator:hold-until"  # ISO-8601 with its offset: every hold ends
HOLD_REASON_TAG: Final = "backend-orchestrator:hold-reason"  # optional free text
BUSY_SINCE_TAG: Final = "backend-orchestrator:busy-since"  # ISO-8601: when check_idle first saw the backend busy
HOLD_TAGS: Final = (HOLD_TAG, HOLD_UNTIL_TAG, HOLD_REASON_TAG)
KNOWN_TAGS: Final = (*HOLD_TAGS, BUSY_SINCE_TAG)
HOLD_STATES: Final = ("running", "stopped")
ENDED: Final = "ended"  # a hold that is over: kept so that the uptime alarm counts from its end
MAX_TAG_VALUE_CHARS: Final = 256  # EC2's limit on a tag value
SNS_SUBJECT_LIMIT: Final = 100  # an SNS subject is "less than 100 characters" of printable ASCII
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
BUSY_SINCE_FIELD: Final = "busy_since"  # optional: when the oldest request or job still in flight began

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


# --- Errors: each class carries its HTTP status, its one code and its headers; ERRORS lists them ---------
class OrchestratorError(Exception):
    """An answer to the caller that says what went wrong and what to do. A subclass names its HTTP status, its code
    and its headers as class keywords; one without a code of its own (BadRequestError) is only a family."""

    STATUS_CODE: ClassVar[int] = 500
    CODE: ClassVar[str] = "internal_error"  # a bug: the log has the traceback
    HEADERS: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, status: int = 0, code: str = "", headers: Mapping[str, str] | None = None) -> None:
        super().__init_subclass__()
        cls.STATUS_CODE, cls.CODE, cls.HEADERS = status or cls.STATUS_CODE, code, headers or cls.HEADERS

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


RETRY_AFTER: Final = {"Retry-After": str(RETRY_AFTER_SECONDS)}


class BadRequestError(OrchestratorError, status=400): ...  # the request itself is wrong: a subclass says how


class InvalidEventError(BadRequestError, code="invalid_event"): ...


class UnsupportedEventError(BadRequestError, code="unsupported_event"): ...


class MalformedJsonError(BadRequestError, code="malformed_json"): ...


class InvalidBase64Error(BadRequestError, code="invalid_base64"): ...


class InvalidBodyError(BadRequestError, code="invalid_body"): ...


class InvalidActionError(BadRequestError, code="invalid_action"): ...


class UnknownActionError(BadRequestError, code="unknown_action"): ...


class InvalidHoldError(BadRequestError, code="invalid_hold"): ...  # the message names the field; nothing written


class UnauthorizedError(OrchestratorError, status=401, code="unauthorized", headers={"WWW-Authenticate": "Bearer"}): ...


class ForbiddenError(OrchestratorError, status=403, code="action_not_allowed"): ...


class MethodNotAllowedError(
    OrchestratorError, status=405, code="method_not_allowed", headers={"Allow": "GET, POST"}
): ...


class HeldStoppedError(OrchestratorError, status=409, code="held_stopped"): ...  # until the hold ends or is released


class InstanceGoneError(OrchestratorError, status=409, code="instance_terminated"): ...  # shutting down, terminated


class PayloadTooLargeError(OrchestratorError, status=413, code="payload_too_large"): ...


class ConfigError(OrchestratorError, code="config_error"): ...


class InstanceNotFoundError(ConfigError, code="instance_not_found"): ...  # INSTANCE_ID's fault: a 500, as config_error


class StillStoppingError(OrchestratorError, status=503, code="still_stopping", headers=RETRY_AFTER): ...


class AwsError(OrchestratorError, status=502, code="aws_error"):
    """An AWS API error the function cannot act on; `aws_error_code` is AWS's own code, when AWS answered."""

    def __init__(self, message: str, *, aws_error_code: str | None = None, **details: Any):
        if aws_error_code is not None:
            details["aws_error_code"] = aws_error_code
        super().__init__(message, **details)
        self.aws_error_code = aws_error_code


class AccessDeniedError(AwsError, code="aws_access_denied"): ...  # `iam_action` names the missing permission


class AwsUnreachableError(AwsError, code="aws_unreachable"): ...


class InsufficientCapacityError(
    AwsError, status=503, code="insufficient_capacity", headers={"Retry-After": str(CAPACITY_RETRY_AFTER_SECONDS)}
): ...  # transient: EC2 has no capacity for the instance's type in its zone right now


class OutOfTimeError(OrchestratorError, status=503, code="out_of_time", headers=RETRY_AFTER):
    """Too little of the invocation's time is left for the next step; nothing half-done, safe to retry."""

    def __init__(self, step: str, left_seconds: float, needed_seconds: float) -> None:
        self.step = step
        self.brief = f"{max(left_seconds, 0):.1f}s left, it may take {needed_seconds:.1f}s"
        super().__init__(
            f"Out of time before {step} ({self.brief}). Retry after {RETRY_AFTER_SECONDS} seconds; if this "
            "repeats, raise the function's timeout (docs/deploy.md's time bounds table says what each action needs)."
        )


class TimeoutTooShortError(ConfigError, code="timeout_too_short"):
    """The invocation's whole time cannot hold one attempt of each call the action needs: a retry cannot succeed."""

    def __init__(self, action: Action, whole_seconds: float, needed_seconds: float) -> None:
        super().__init__(
            f"The function's timeout ({whole_seconds:.1f} s) is too short for {action}: one attempt of each call it "
            f"makes needs {needed_seconds:.1f} s. Raise the function's Timeout (Configuration > General "
            f"configuration in the Lambda console, or Timeout in the template) to {RECOMMENDED_TIMEOUT_SECONDS} s, "
            "which also fits retries and waits.",
            timeout_seconds=round(whole_seconds, 1),
            needed_seconds=round(needed_seconds, 1),
        )


def _family(error: type[OrchestratorError]) -> list[type[OrchestratorError]]:
    return [error, *(member for child in error.__subclasses__() for member in _family(child))]


# Every answer the function gives that is not a success, by its code (docs/deploy.md's troubleshooting table).
ERRORS: Final = {error.CODE: error for error in _family(OrchestratorError) if error.CODE}


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
        """The configuration, or a ConfigError naming the first bad variable (an unset or empty one keeps its
        default)."""
        config, problems = cls.read(environ)
        if config is None or problems:
            raise problems[0]
        return config

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> tuple[Config | None, list[ConfigError]]:
        """Every variable of VARIABLES read and checked: the configuration of the good ones (None without a usable
        INSTANCE_ID), and every bad one, in VARIABLES' order."""
        values, problems = {}, []
        for name, (field_name, parse) in VARIABLES.items():
            raw = environ.get(name, "").strip()
            try:
                if raw:
                    values[field_name] = parse(name, raw)
            except ConfigError as problem:
                problems.append(problem)
            except (ValueError, OSError, OverflowError) as error:  # what a parser did not foresee: still the variable's
                how = "set it as docs/deploy.md's configuration table describes"
                problems.append(ConfigError(f"{name} could not be read ({type(error).__name__}): {how}."))
        try:
            return cls(**values), problems
        except ConfigError as problem:
            return None, [*problems, problem]

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ConfigError(
                "INSTANCE_ID is not set. Set it to the backend's EC2 instance ID, e.g. i-0abc123def4567890."
            )

    def open_window(self, now: datetime) -> Window | None:
        """The first keep-warm window open at `now`, if any."""
        return next((window for window in self.keep_warm if window.holds(now)), None)

    def last_window_end(self, after: datetime, before: datetime) -> datetime | None:
        """When a keep-warm window last closed in (after, before], if one did."""
        return max((end for window in self.keep_warm if (end := window.last_end(after, before))), default=None)

    def require_backend_url(self, action: Action) -> str:
        if self.backend_base_url is None:
            raise ConfigError(
                f"BACKEND_BASE_URL is not set and {action} needs it. Set it to the backend's "
                "base URL as the Lambda reaches it, e.g. http://10.0.1.50:8000."
            )
        return self.backend_base_url


@dataclass(frozen=True)
class AuthToken:
    """AUTH_TOKEN: who may call over HTTP, checked before anything else is told, so that a caller without it learns
    nothing, not even that the configuration is broken. Unset (`value` None): everyone. Set: only the bearer of
    `Authorization: Bearer <token>`, compared in constant time. Set but unusable (blank or short): a blank one admits
    nobody, and whoever a short one admits is told it is a config_error."""

    value: str | None = field(repr=False)
    problem: ConfigError | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AuthToken:
        raw = environ.get("AUTH_TOKEN", "")
        try:
            return cls(_parse_token("AUTH_TOKEN", raw))
        except ConfigError as problem:
            return cls(raw.strip(), problem)

    def admit(self, authorization: str | None) -> None:
        """Return if the caller may go on; else a 401 that says which header to send."""
        if self.value is None:
            return
        scheme, _, given = (authorization or "").strip().partition(" ")
        given_bytes, token_bytes = (t.encode("utf-8", "surrogatepass") for t in (given.strip(), self.value))  # "\ud800"
        if not self.value or scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, token_bytes):
            raise UnauthorizedError(
                "Missing or wrong bearer token: send the header 'Authorization: Bearer <AUTH_TOKEN>'."
            )


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

    def last_end(self, after: datetime, before: datetime) -> datetime | None:
        """The latest time in (after, before] at which the window closed, if it closed in that span (within a week and
        a day of `before`), on the zone's wall clock: the end of the last opening that covered part of the span."""
        today = before.astimezone(self.zone).date()
        ends = []
        for back in range(9):
            day = today - timedelta(days=back)
            if day.weekday() in self.days:  # an opening that starts that day, and ends then or the next day
                closing = datetime.combine(day, datetime.min.time(), self.zone) + timedelta(minutes=self.end)
                ends.append(closing + timedelta(days=1) if self.end <= self.start else closing)
        return max((end for end in ends if after < end <= before), default=None)


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
    days, opens, closes = _days(name, match["days"]), _minute(name, match["start"]), _minute(name, match["end"])
    if opens in (24 * 60, closes):
        raise ConfigError(
            f"{name}: {text!r} starts at 24:00 or ends when it starts; for a whole day write 00:00-24:00."
        )
    try:
        zone = ZoneInfo(match["zone"] or "UTC")
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory of the database (Europe), a long name
        raise ConfigError(f"{name}: {match['zone']!r} is not an IANA time zone, e.g. Europe/Berlin or UTC.") from None
    return Window(text, days, opens, closes, zone)


def _days(name: str, text: str) -> frozenset[int]:
    days: set[int] = set()
    for item in text.lower().split(","):
        first, dash, last = item.partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ConfigError(
                f"{name}: {text!r} is not a list of days: use Mon..Sun, ranges and commas, e.g. Mon-Fri,Sun."
            )
        first_day, last_day = DAYS.index(first), DAYS.index(last or first)
        days.update(
            day % 7 for day in range(first_day, last_day + (7 if last_day < first_day else 0) + 1)
        )  # Fri-Mon wraps
    return frozenset(days)


def _minute(name: str, text: str) -> int:
    hours, minutes = int(text[:2]), int(text[3:])
    if not (hours < 24 and minutes < 60) and text != "24:00":
        raise ConfigError(f"{name}: {text!r} is not a time of day: use HH:MM from 00:00 to 23:59, and 24:00 as an end.")
    return hours * 60 + minutes


# Every variable the function reads but AUTH_TOKEN (see AuthToken): the field it sets and the parser that checks it.
VARIABLES: Final[dict[str, tuple[str, Callable[[str, str], Any]]]] = {
    "INSTANCE_ID": ("instance_id", _parse_instance_id),
    "BACKEND_BASE_URL": ("backend_base_url", _parse_base_url),
    "IDLE_TIMEOUT_SECONDS": ("idle_timeout_seconds", _parse_positive_int),
    "AWS_REGION": ("region", _parse_region),
    "HTTP_TIMEOUT_SECONDS": ("http_timeout_seconds", _parse_positive_float),
    "STOP_HIBERNATE": ("stop_hibernate", _parse_bool),
    "DRY_RUN": ("dry_run", _parse_bool),
    "LAST_ACTIVITY_PATH": ("last_activity_path", _parse_path),
    "HEALTH_PATH": ("health_path", _parse_path),
    "LOG_LEVEL": ("log_level", _parse_log_level),
    "METRICS_NAMESPACE": ("metrics_namespace", lambda _, raw: raw),
    "KEEP_WARM": ("keep_warm", _parse_keep_warm),
    "IDLE_CPU_PERCENT": ("idle_cpu_percent", _parse_percent),
    "IDLE_NETWORK_KB_PER_5MIN": (
        "idle_network_kb",
        lambda name, raw: _parse_positive_float(name, raw, "KB, e.g. 1024"),
    ),
    "DRAIN_PATH": ("drain_path", _parse_path),
    "NOTIFY_TOPIC_ARN": ("notify_topic_arn", _parse_topic_arn),
    "MAX_HOLD_HOURS": ("max_hold_hours", _parse_hours),
    "STUCK_BUSY_SECONDS": ("stuck_busy_seconds", _parse_seconds_or_off),
    "STOP_STUCK_BUSY": ("stop_stuck_busy", _parse_bool),
}


# --- Time: the clock, and one deadline per invocation ---------------------------------------------
@dataclass(frozen=True)
class Clock:
    """Wall time for decisions, monotonic time for deadlines, and sleep: injected, so tests never wait."""

    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def answer_margin(seconds: float) -> float:
    """What an invocation of `seconds` keeps back to log and answer: ANSWER_MARGIN_SECONDS, or a fifth of a shorter
    one's time (Lambda's default 3 s keeps 0.6 s; the answer itself takes milliseconds: make bench)."""
    return min(ANSWER_MARGIN_SECONDS, seconds * ANSWER_MARGIN_SHARE)


class Reserve(NamedTuple):
    """What the calls after a step need: `full`, a whole first attempt each (the timeouts of docs/deploy.md), and
    `least`, one short attempt each (AWS_MIN_ATTEMPT_SECONDS, the shortest backend request)."""

    full: float
    least: float


NOTHING_AFTER: Final = Reserve(0.0, 0.0)


@dataclass(frozen=True)
class Deadline:
    """When the invocation must have answered: the context's remaining time less its answer_margin().

    Lambda kills a function at its timeout with no log line and no answer, so every wait (EC2 calls with
    their retries, backend requests, sleeps) is given only the time that fits before this deadline."""

    at: float
    clock: Clock
    whole: float = DEFAULT_REMAINING_MS / 1000  # the context's remaining time when the invocation began
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
        warning = None
        if not math.isfinite(seconds):
            warning = (
                f"The Lambda context's get_remaining_time_in_millis() gave {_short(remaining_ms)}, not a number: "
                f"assumed {DEFAULT_REMAINING_MS // 1000} s. Invoke the handler with the runtime's context."
            )
            seconds = DEFAULT_REMAINING_MS / 1000
        return cls(clock.monotonic() + seconds - answer_margin(seconds), clock, seconds, warning)

    @property
    def budget(self) -> float:
        """The whole time the invocation may spend before it answers."""
        return self.whole - answer_margin(self.whole)

    def left(self) -> float:
        return self.at - self.clock.monotonic()

    def keep(self, reserve: Reserve, needed: float = 0.0) -> float:
        """What to set aside for the calls after a step that needs `needed` itself: a whole first attempt each when
        that still fits, else one short attempt each (a short timeout: no retries, but every call is made)."""
        return reserve.full if self.left() - reserve.full >= needed else reserve.least

    def grant_backend(
        self, step: str, wanted: float, keep: Reserve = NOTHING_AFTER, least: float = MIN_BACKEND_SECONDS
    ) -> float:
        """The seconds a backend request may take: `wanted`, cut to what is left once `keep` is set aside for
        the calls after it. OutOfTimeError if that is below `least` (or `wanted`, if smaller)."""
        needed = min(least, wanted)
        kept = self.keep(keep, needed)
        granted = min(wanted, self.left() - kept)
        if granted < needed:
            raise OutOfTimeError(step, self.left() - kept, needed)
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
    iam_caller: str | None = None  # the caller IAM verified (an AWS_IAM Function URL): no token is asked of it


class EventRequest(NamedTuple):
    """A direct or scheduled invocation: its action is known from the event alone."""

    source: Source
    action: Action
    warning: str | None = None
    fields: Mapping[str, Any] = {}


def parse_event(event: object, over_http: bool) -> HttpRequest | EventRequest:
    """The request an event makes (`over_http`: it has an HTTP event's shape, see _is_http); an event of no known shape
    is a 400."""
    if not isinstance(event, dict):
        raise InvalidEventError(
            f"The event is a JSON {_json_type(event)}, not an object. "
            'Invoke with an object such as {"action": "check_idle"}.'
        )
    if over_http:
        fields = event if "httpMethod" in event else event["requestContext"]["http"]
        headers = _member(event, "headers", dict, {})
        # Function URLs lower-case header names; REST APIs pass them as the client sent them.
        authorization = next((str(v) for k, v in headers.items() if str(k).lower() == "authorization"), None)
        return HttpRequest(
            method=_member(fields, "httpMethod" if fields is event else "method", str, "").upper(),
            body=_member(event, "body", str, ""),
            is_base64=_member(event, "isBase64Encoded", bool, False),
            query=_member(event, "queryStringParameters", dict, {}),
            authorization=authorization,
            iam_caller=None if fields is event else _iam_caller(event["requestContext"]),
        )
    if "requestContext" in event:
        raise UnsupportedEventError(
            "The event has a requestContext but is neither a Function URL / HTTP API (payload 2.0) "
            'nor a REST API event: invoke through the Function URL, or directly with {"action": ...}.'
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
        raise UnsupportedEventError(
            f"An EventBridge event of type {str(event['detail-type'])[:60]!r} carries no action: "
            'set the target\'s input to a constant such as {"action": "check_idle"}.'
        )
    return EventRequest(Source.DIRECT, Action.START)


def _iam_caller(request_context: Mapping[str, Any]) -> str | None:
    """Who IAM verified, for a payload 2.0 event behind an AWS_IAM Function URL (or HTTP API): Lambda puts the caller
    in requestContext.authorizer.iam after checking the SigV4 signature, and no caller can set it. None otherwise.
    https://docs.aws.amazon.com/lambda/latest/dg/urls-invocation.html#urls-request-payload"""
    authorizer = request_context.get("authorizer")
    iam = authorizer.get("iam") if isinstance(authorizer, dict) else None
    if not isinstance(iam, dict) or not iam:
        return None
    named = (iam.get(key) for key in ("userArn", "callerId", "accountId"))
    return next((value for value in named if isinstance(value, str) and value), "an IAM principal")


def _member(event: Mapping[str, Any], name: str, kind: type[T], default: T) -> T:
    """A field of an HTTP event, of the type AWS sends; null means the default."""
    value = event.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise UnsupportedEventError(
            f"The HTTP event's {name} is a JSON {_json_type(value)}, which AWS never sends: "
            "invoke through the Function URL or API Gateway."
        )
    return value


def _is_http(event: object) -> bool:
    if not isinstance(event, dict):
        return False
    request_context = event.get("requestContext")
    return "httpMethod" in event or (
        isinstance(request_context, dict) and isinstance(request_context.get("http"), dict)
    )


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
        raise MalformedJsonError(f'The body is not valid JSON ({error}). Send {{"action": "start"}}.') from None
    if not isinstance(payload, dict):
        raise InvalidBodyError(f'The body is a JSON {_json_type(payload)}, not an object. Send {{"action": "start"}}.')
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
        try:
            raw = base64.b64decode(raw, validate=True)
        except binascii.Error:
            raise InvalidBase64Error("The body is marked isBase64Encoded but is not valid base64.") from None
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(
            f'The body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted. Send {{"action": "start"}}.'
        )
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise MalformedJsonError('The body is not UTF-8 text. Send {"action": "start"} as JSON.') from None


def _action(value: object) -> Action:
    known = ", ".join(a.value for a in Action)
    if not isinstance(value, str):
        raise InvalidActionError(f"The action must be a string, one of {known}; got a JSON {_json_type(value)}.")
    try:
        return Action(value)
    except ValueError:
        raise UnknownActionError(f"Unknown action {_short(value)}: use one of {known}.") from None


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
    """What the backend reported: seconds idle (None if only busy was reported), busy, and since when (optional)."""

    idle_seconds: float | None
    busy_reason: str | None = None
    busy_since: datetime | None = None  # when the oldest request or job still in flight began, if it says
    problem: str | None = None  # a field it sent that is ignored, and why


class ActivityUnknown(NamedTuple):
    """The backend could not tell us how idle it is; the reason names the failure."""

    reason: str


class Verdict(NamedTuple):
    decision: Decision
    reason: str
    idle_seconds: float | None = None
    signal: str = (
        "activity"  # what decided: activity, cloudwatch, stuck_busy, keep_warm, hold, state, deadline, operator
    )


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
    over = idle_seconds > idle_timeout_seconds
    reason = f"idle for {_seconds(idle_seconds)}, {'over' if over else 'within'} the {idle_timeout_seconds}s timeout"
    return Verdict(Decision.STOP if over else Decision.KEEP, reason, idle_seconds)


def kept_up(state: str, why: str, signal: str, started: str = "started") -> Verdict:
    """Held running or in a keep-warm window: keep a running instance whatever its backend says, start a stopped
    one, and wait for one that is stopping."""
    if state in ("running", "pending"):
        return Verdict(Decision.KEEP, why, signal=signal)
    if state == "stopped":
        return Verdict(Decision.START, f"stopped, {why}: {started}", signal=signal)
    return Verdict(Decision.SKIP, f"instance is {state}, {why}: nothing to do until it is stopped", signal=signal)


class Hold(NamedTuple):
    """An operator's hold: keep the instance running, or stopped, until `until`."""

    state: str  # running | stopped
    until: datetime
    reason: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"state": self.state, "until": self.until.isoformat(), "reason": self.reason}

    def as_tags(self) -> dict[str, str]:
        """Its three tags (an empty reason clears an older one)."""
        return {HOLD_TAG: self.state, HOLD_UNTIL_TAG: self.until.isoformat(), HOLD_REASON_TAG: self.reason or ""}

    def text(self) -> str:
        return f"held {self.state} until {self.until.isoformat()}" + (f" ({self.reason})" if self.reason else "")


class HoldReading(NamedTuple):
    """What the instance's tags say: a hold in force, one whose end has passed, the end of the last hold (a record),
    or tags to ignore and why."""

    hold: Hold | None = None
    ended: Hold | None = None  # its end has passed, and no check has said so yet
    last_ended: datetime | None = None  # the record a hold that is over left
    problems: tuple[str, ...] = ()


def read_hold(tags: Mapping[str, str], now: datetime, max_hold_hours: float) -> HoldReading:
    """The hold the tags describe, set by the hold action or by hand (the state in any case, with spaces around it):
    malformed tags are ignored with the reason, and a tag with the prefix that the function does not read is named."""
    unknown = sorted(key for key in tags if key.startswith(TAG_PREFIX) and key not in KNOWN_TAGS)
    problems = tuple(
        f"Tag {key} is not one the function reads ({', '.join(KNOWN_TAGS)}): a typo? It is ignored." for key in unknown
    )
    if HOLD_TAG not in tags and HOLD_UNTIL_TAG not in tags:
        return HoldReading(problems=problems)
    state, until_text = (tags.get(HOLD_TAG) or "").strip().lower(), tags.get(HOLD_UNTIL_TAG, "")
    until, ignored = _aware_time(until_text), "the hold is ignored and the usual rules apply"
    if state == ENDED:
        return HoldReading(last_ended=until, problems=problems)
    if state not in HOLD_STATES:
        shown = _short(tags.get(HOLD_TAG))
        return HoldReading(problems=(*problems, f"Tag {HOLD_TAG}={shown} is not running or stopped: {ignored}."))
    if until is None:
        return HoldReading(
            problems=(
                *problems,
                f"Tag {HOLD_UNTIL_TAG}={_short(until_text)} is not an ISO-8601 time with its offset "
                f"(e.g. 2026-12-02T22:00:00+01:00 or ...Z): {ignored}.",
            )
        )
    if until > now + timedelta(hours=max_hold_hours):
        return HoldReading(
            problems=(
                *problems,
                f"Tag {HOLD_UNTIL_TAG}={until_text!r} lies more than MAX_HOLD_HOURS={max_hold_hours:g} hours ahead: "
                f"{ignored}.",
            )
        )
    found = Hold(state, until, tags.get(HOLD_REASON_TAG) or None)
    return HoldReading(ended=found, problems=problems) if until <= now else HoldReading(hold=found, problems=problems)


def hold_request(fields: Mapping[str, Any], now: datetime, max_hold_hours: float) -> Hold:
    """The hold a hold action asks for, or an InvalidHoldError naming the field: nothing is written before this."""
    state, hours, until_text, reason = (fields.get(name) for name in ("state", "hours", "until", "reason"))
    if state not in HOLD_STATES:
        raise InvalidHoldError(f'"state" is {_short(state)}: hold "running" or "stopped".')
    if (hours is None) == (until_text is None):
        raise InvalidHoldError('Give exactly one of "hours" (e.g. 4) and "until" (e.g. "2026-12-02T22:00:00+01:00").')
    limit = f"at most MAX_HOLD_HOURS={max_hold_hours:g} hours ahead"
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
        isinstance(reason, str)
        and len(reason) <= MAX_TAG_VALUE_CHARS
        and all(c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF for c in reason)  # UTF-8 text on one line
    ):
        raise InvalidHoldError(
            f'"reason" must be text of at most {MAX_TAG_VALUE_CHARS} characters without control characters.'
        )
    whole = until.replace(microsecond=0) + (timedelta(seconds=1) if until.microsecond else timedelta())  # > now
    return Hold(state, whole, reason or None)


def _aware_time(text: str) -> datetime | None:
    """An ISO-8601 time that carries its offset; None for anything else (a time without one is ambiguous)."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


class MetricSamples(NamedTuple):
    """The instance's AWS/EC2 datapoints, as (timestamp, value): CPU maximum in %, network in and out in bytes."""

    cpu: list[tuple[datetime, float]]
    network_in: list[tuple[datetime, float]]
    network_out: list[tuple[datetime, float]]


def metric_window(now: datetime, idle_timeout_seconds: int) -> tuple[datetime, datetime]:
    """The whole 5-minute periods to judge: as many as cover the idle timeout, ending METRICS_DELAY_SECONDS
    before now at a period boundary, so that EC2 has published them (its metrics arrive minutes late)."""
    period = METRIC_PERIOD_SECONDS
    until = datetime.fromtimestamp((now.timestamp() - METRICS_DELAY_SECONDS) // period * period, UTC)
    return until - timedelta(seconds=math.ceil(idle_timeout_seconds / period) * period), until


def judge_metrics(
    samples: MetricSamples,
    since: datetime,
    until: datetime,
    cpu_limit: float,
    network_limit_bytes: float,
    *,
    not_before: datetime,
    began: str = "the launch",
) -> tuple[bool, str]:
    """Idle by the instance's own metrics: every period of [since, until) has CPU and network data from `not_before`
    on, and no period since `since` (later ones too, where already published) reached either limit.

    A period that began before `not_before` counts as missing, and so does a value that is not a finite number: before
    the launch, it holds the previous run's data, idle since that run was stopped for it; before a busy span (the
    stuck-busy watch), it holds what the backend did before that work began."""
    first = max(0, math.ceil((not_before - since).total_seconds() / METRIC_PERIOD_SECONDS))  # within the span

    def by_period(points: list[tuple[datetime, float]], combine: Callable[[float, float], float]) -> dict[int, float]:
        periods: dict[int, float] = {}
        for when, value in points:  # CloudWatch stamps a period's since; bucket by time anyway
            index = int((when - since).total_seconds() // METRIC_PERIOD_SECONDS)
            if index >= first and math.isfinite(value):
                periods[index] = combine(periods[index], value) if index in periods else value
        return periods

    cpu = by_period(samples.cpu, max)
    network_in = by_period(samples.network_in, lambda a, b: a + b)
    network_out = by_period(samples.network_out, lambda a, b: a + b)
    network = {i: network_in.get(i, 0.0) + network_out.get(i, 0.0) for i in network_in.keys() | network_out.keys()}
    expected = int((until - since).total_seconds() // METRIC_PERIOD_SECONDS)
    span = f"{since:%H:%M}-{until:%H:%M} UTC"
    missing = [i for i in range(expected) if i not in cpu or i not in network_in or i not in network_out]
    if missing:
        before = f"; {min(first, expected)} began before {began} at {not_before:%H:%M:%S} UTC" if first else ""
        lacking = f"CloudWatch has no CPU or network data for {len(missing)} of the {expected} periods"
        return False, f"{lacking} of {span}{before}"
    cpu_max, network_max = max(cpu.values()), max(network.values())
    if cpu_max >= cpu_limit:
        return False, f"CPU max {cpu_max:.1f}% >= {cpu_limit:g}% since {since:%H:%M} UTC"
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
    if BUSY_SINCE_FIELD not in payload or busy_reason is None:
        return Activity(idle_seconds, busy_reason)
    # Optional, and only a guide to the stuck-busy watch: a value it cannot read is ignored, never a reason to
    # doubt that the backend is busy (an unknown activity could be stopped on its metrics).
    since = _aware_time(payload[BUSY_SINCE_FIELD]) if isinstance(payload[BUSY_SINCE_FIELD], str) else None
    if since is None:
        problem = f"{BUSY_SINCE_FIELD!r} is {_short(payload[BUSY_SINCE_FIELD])}, not an ISO-8601 time with its offset"
        return Activity(idle_seconds, busy_reason, problem=f"The backend's {problem}: it is ignored.")
    return Activity(idle_seconds, busy_reason, min(since, now))  # a time in the future (skew): busy from now


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

    @property
    def started(self) -> bool:
        return self.previous_state in STOPPED_STATES and self.state not in STOPPED_STATES

    @property
    def stopped(self) -> bool:
        return self.previous_state not in STOPPED_STATES and self.state in STOPPED_STATES


def aws_call_seconds(attempts: int) -> float:
    """The longest one AWS API call can take with this many attempts: each attempt's connect and read
    timeouts, and botocore's longest backoff before each retry."""
    backoff = sum(
        min(2.0**retry, AWS_BACKOFF_CAP_SECONDS) + AWS_RETRY_AFTER_EXTRA_SECONDS for retry in range(attempts - 1)
    )
    return attempts * (AWS_CONNECT_TIMEOUT_SECONDS + AWS_READ_TIMEOUT_SECONDS) + backoff


def stop_seconds(config: Config, attempt: float | None = None) -> float:
    """What a stop may take at the least: one StopInstances, and one more for a refused hibernation; each a whole
    first attempt, or `attempt` seconds."""
    return (aws_call_seconds(1) if attempt is None else attempt) * (2 if config.stop_hibernate else 1)


def reserve(step: str, config: Config) -> Reserve:
    """The time budget's one owner: what must still be left after `step` for the calls that may follow it, with a
    whole first attempt each and with one short attempt each. A backend request is granted only what leaves this
    (Deadline.grant_backend); an AWS call takes the attempts that fit (aws_call)."""
    least_read = min(MIN_BACKEND_SECONDS, config.http_timeout_seconds)
    match step:
        case "activity":  # GetMetricData (fallback on) and the stop; or the shortest drain and the whole stop
            calls = (1 if config.idle_cpu_percent > 0 else 0) + (2 if config.stop_hibernate else 1)
            drain = (least_read + stop_seconds(config), least_read + stop_seconds(config, AWS_MIN_ATTEMPT_SECONDS))
            full, least = calls * aws_call_seconds(1), calls * AWS_MIN_ATTEMPT_SECONDS
            return Reserve(max(full, drain[0]), max(least, drain[1])) if config.drain_path else Reserve(full, least)
        case "drain":  # the whole stop: a drained backend must not be left without it
            return Reserve(stop_seconds(config), stop_seconds(config, AWS_MIN_ATTEMPT_SECONDS))
        case "wait_for_stopped":  # the wait itself, then a Describe and a StartInstances
            poll = STOPPING_POLL_SECONDS
            return Reserve(poll + 2 * aws_call_seconds(1), poll + 2 * AWS_MIN_ATTEMPT_SECONDS)
    raise ValueError(f"no reserve for {step}")


def longest_path(action: Action, config: Config, attempts: int = AWS_MAX_ATTEMPTS) -> list[tuple[str, float]]:
    """The steps of `action`'s longest path, each with the most it may take when every AWS call makes `attempts`
    attempts and every backend request takes its whole time; the deadline then cuts the sum to the function's
    timeout. For docs/deploy.md's time bounds table (make bench prints it) and preflight's timeout check."""
    call, backend = aws_call_seconds(attempts), config.http_timeout_seconds
    stop = [("StopInstances", call)] + ([("StopInstances without hibernation", call)] if config.stop_hibernate else [])
    notice = [("Publish (SNS)", call)] if config.notify_topic_arn else []
    match action:
        case Action.START:  # a stop in progress is waited out for as long as the deadline lets it
            waits = [("DescribeInstances", call), (f"{STOPPING_POLL_SECONDS:g} s waits and Describes", math.inf)]
            return [*waits, ("StartInstances", call), *notice]
        case Action.STATUS:
            return [("DescribeInstances", call), ("GET the health path", min(HEALTH_TIMEOUT_SECONDS, backend))]
        case Action.CHECK_IDLE:  # CreateTags for an ended hold, then CloudWatch (the backend cannot say) and the
            # stop; or the drain, the stop, the drain's DELETE (a stop that failed) and the busy-since record; notices
            fallback = [("GetMetricData", call), *stop] if config.idle_cpu_percent > 0 else stop
            drained = [("POST the drain", backend), *stop, ("DELETE the drain", backend)] if config.drain_path else stop
            said = [*drained, ("CreateTags or DeleteTags (busy-since)", call)]
            then = said if sum(s for _, s in said) > sum(s for _, s in fallback) else fallback
            ended = ("CreateTags or DeleteTags (a hold ended)", call)
            read = [("DescribeInstances", call), ended, ("GET the activity path", backend)]
            return [*read, *then, *notice, *notice]
        case Action.STOP:
            return (
                [("DescribeInstances", call), *notice]
                if config.dry_run
                else [("DescribeInstances", call), *stop, *notice]
            )
        case Action.HOLD:  # then starts or stops the instance to match
            moves = stop if config.stop_hibernate else [("StartInstances or StopInstances", call)]
            return [("DescribeInstances", call), ("CreateTags", call), *moves, *notice]
        case Action.RELEASE:
            return [("DescribeInstances", call), ("CreateTags or DeleteTags", call), *notice]
        case Action.PREFLIGHT:  # with "notify": true, SNS too
            gets = [("GET the health path", min(HEALTH_TIMEOUT_SECONDS, backend)), ("GET the activity path", backend)]
            return [("DescribeInstances", call), ("4 DryRuns", 4 * call), ("2 GetMetricData", 2 * call), *notice, *gets]


def least_path(action: Action, config: Config) -> list[tuple[str, float]]:
    """The steps `action` cannot do without, each at the least it is attempted with (one short attempt of an AWS call,
    the shortest backend request). An invocation whose whole time cannot hold them answers timeout_too_short."""
    call, read = AWS_MIN_ATTEMPT_SECONDS, min(MIN_BACKEND_SECONDS, config.http_timeout_seconds)
    stop = [("StopInstances", call)] + ([("StopInstances without hibernation", call)] if config.stop_hibernate else [])
    match action:
        case Action.START:
            return [("DescribeInstances", call), ("StartInstances", call)]
        case Action.CHECK_IDLE:  # then CloudWatch and the stop, or the drain and the stop
            then = ("GetMetricData or the drain, and StopInstances", reserve("activity", config).least)
            return [("DescribeInstances", call), ("GET the activity path", read), then]
        case Action.STOP:
            return [("DescribeInstances", call)] + ([] if config.dry_run else stop)
        case Action.HOLD:
            return [("DescribeInstances", call), ("CreateTags", call), *stop]
        case Action.RELEASE:
            return [("DescribeInstances", call), ("CreateTags or DeleteTags", call)]
    return [("DescribeInstances", call)]  # status and preflight answer what they could not learn


def shortest_timeout(action: Action, config: Config) -> float:
    """The shortest function timeout, to a tenth of a second up, whose time less its answer_margin() holds
    least_path(action): below it the action answers timeout_too_short."""
    return _timeout_for(sum(seconds for _, seconds in least_path(action, config)))


def _timeout_for(needed: float) -> float:
    """The shortest timeout, to a tenth of a second up, whose time less its answer_margin() is `needed`."""
    whole = min(needed / (1 - ANSWER_MARGIN_SHARE), needed + ANSWER_MARGIN_SECONDS)
    return math.ceil(whole * 10 - 1e-9) / 10


def whole_attempts_timeout(action: Action, config: Config) -> float:
    """The shortest function timeout at which each call of `action`'s longest path gets a whole first attempt."""
    needed = sum(seconds for _, seconds in longest_path(action, config, 1) if math.isfinite(seconds))
    return _timeout_for(needed)


def shortest_check_seconds(config: Config) -> float:
    """The shortest function timeout at which check_idle reaches a decision when AWS and the backend answer at once."""
    return shortest_timeout(Action.CHECK_IDLE, config)


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
            aws_client("sns", config.notify_topic_arn.split(":")[3])  # the topic's own region
    except (ConfigError, BotoCoreError):
        return


def aws_call(
    service: str, operation: str, region: str | None, deadline: Deadline, about: str, *, call: Callable[[Any], T]
) -> T:
    """One API call, `call(client)`, with as many attempts as fit before the deadline; errors told apart by code."""
    name = SERVICE_NAMES[service]
    try:
        client = aws_client(service, region)  # built at INIT; were it not, its build is counted before the grant
        left = deadline.left()
        attempts = next((n for n in range(AWS_MAX_ATTEMPTS, 0, -1) if aws_call_seconds(n) <= left), 0)
        if attempts == 0 and left < AWS_MIN_ATTEMPT_SECONDS:
            raise OutOfTimeError(f"{name} {operation}", left, AWS_MIN_ATTEMPT_SECONDS)

        def attempt() -> T:
            _GRANT.attempts = max(attempts, 1)
            return call(client)

        # Too little time for a whole attempt (a short timeout): one attempt of what is left, no retry.
        return within(aws_call_seconds(attempts) if attempts else left, attempt, f"{name} {operation}")
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code"))
        if code in ACCESS_DENIED_CODES:
            iam_action = IAM_ACTIONS[operation]
            raise AccessDeniedError(
                f"{name} {operation} was denied ({code}): allow {iam_action} to the Lambda's role on {about}.",
                aws_error_code=code,
                iam_action=iam_action,
            ) from error
        raise AwsError(
            f"{name} {operation} on {about} failed with {code}. See docs/deploy.md's troubleshooting table; "
            "throttling and server errors were already retried.",
            aws_error_code=code,
        ) from error
    except (BotoCoreError, TimeoutError) as error:
        raise AwsUnreachableError(
            f"{name} {operation} failed before AWS answered ({type(error).__name__}). "
            f"Check the Lambda's network path to the {name} API (VPC endpoint or NAT) and retry."
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
        tags = {tag["Key"]: tag["Value"] for tag in instances[0].get("Tags", []) if tag["Key"].startswith(TAG_PREFIX)}
        monitoring, hibernation = instances[0].get("Monitoring", {}), instances[0].get("HibernationOptions", {})
        return InstanceInfo(
            instances[0]["State"]["Name"], launch_time, vcpus if vcpus > 0 else None, tags,
            instances[0].get("InstanceType", ""), monitoring.get("State") == "enabled",
            hibernation.get("Configured") is True,
        )  # fmt: skip

    def allowed(self, operation: str, **kwargs: Any) -> None:
        """The call with DryRun=True: returns if EC2 would allow it (DryRunOperation), else raises the AwsError."""
        target = {"Resources" if "Tags" in operation else "InstanceIds": [self.instance_id]}
        try:
            self._call(
                operation, lambda client: getattr(client, xform_name(operation))(DryRun=True, **target, **kwargs)
            )
        except AwsError as error:
            if error.aws_error_code != "DryRunOperation":
                raise
            return  # the one answer that proves the permission without acting
        raise AwsError(
            f"EC2 {operation} with DryRun=True succeeded instead of answering DryRunOperation: the endpoint did not "
            f"honour DryRun, and it may have acted. Check instance {self.instance_id}, and the EC2 endpoint the "
            "function uses (AWS_ENDPOINT_URL, a VPC endpoint, a proxy).",
            aws_error_code="DryRunIgnored",
        )

    def tag(self, values: Mapping[str, str]) -> None:
        """Set these tags of the instance, in one CreateTags call."""
        tags: list[Any] = [{"Key": key, "Value": value} for key, value in values.items()]
        self._call("CreateTags", lambda client: client.create_tags(Resources=[self.instance_id], Tags=tags))

    def untag(self, *keys: str) -> None:
        """Delete these tags of the instance, in one DeleteTags call: never none (that would delete every tag)."""
        named: list[Any] = [{"Key": key} for key in keys]
        if not named:
            raise ValueError("DeleteTags with no tag deletes every tag of the instance")
        self._call("DeleteTags", lambda client: client.delete_tags(Resources=[self.instance_id], Tags=named))

    def start_instance(self) -> Transition:
        return self._transition("StartInstances", lambda client: client.start_instances(InstanceIds=[self.instance_id]))

    def stop_instance(self, hibernate: bool) -> tuple[Transition, str | None]:
        """Stop, hibernating if asked; the second value is a warning when EC2 refused hibernation."""
        try:
            return self._stop_instances(hibernate), None
        except AwsError as error:
            if not hibernate or error.aws_error_code != "UnsupportedHibernationConfiguration":
                raise
        warning = f"EC2 refused to hibernate instance {self.instance_id}, so it was stopped normally: "
        warning += "enable hibernation on the instance or set STOP_HIBERNATE=false."
        return self._stop_instances(hibernate=False), warning

    def _stop_instances(self, hibernate: bool) -> Transition:
        ids = [self.instance_id]
        return self._transition(
            "StopInstances", lambda client: client.stop_instances(InstanceIds=ids, Hibernate=hibernate)
        )

    def _transition(self, operation: str, call: Callable[[EC2Client], Any]) -> Transition:
        change = self._call(operation, call)[
            "StartingInstances" if operation == "StartInstances" else "StoppingInstances"
        ][0]
        return Transition(change["PreviousState"]["Name"], change["CurrentState"]["Name"])

    def _not_found(self) -> InstanceNotFoundError:
        return InstanceNotFoundError(
            f"Instance {self.instance_id} does not exist in this region. Check INSTANCE_ID and the region (AWS_REGION)."
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


def instance_metrics(run: Run, since: datetime, until: datetime) -> MetricSamples:
    """The instance's CPU and network from AWS/EC2 in one GetMetricData call, period 300 s (basic and detailed
    monitoring alike). https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/viewing_metrics_with_cloudwatch.html"""
    wanted = {"cpu": ("CPUUtilization", "Maximum"), "network_in": ("NetworkIn", "Sum"), "out": ("NetworkOut", "Sum")}
    points = metric_data(run, "AWS/EC2", wanted, METRIC_PERIOD_SECONDS, since=since, until=until)
    return MetricSamples(points["cpu"], points["network_in"], points["out"])


def metric_data(
    run: Run, namespace: str, wanted: Mapping[str, tuple[str, str]], period: int, *, since: datetime, until: datetime
) -> dict[str, list[tuple[datetime, float]]]:
    """One GetMetricData call for the instance: {query ID: [(timestamp, value)]}, `wanted` as {ID: (name, stat)}."""
    dimensions = [{"Name": "InstanceId", "Value": run.config.instance_id}]
    queries: list[Any] = [
        {"Id": key, "MetricStat": {"Metric": {"Namespace": namespace, "MetricName": name, "Dimensions": dimensions},
                                   "Period": period, "Stat": stat}}
        for key, (name, stat) in wanted.items()
    ]  # fmt: skip
    about = f'the {namespace} metrics of instance {run.config.instance_id} (GetMetricData needs Resource "*")'

    def call(client: Any) -> Any:
        return client.get_metric_data(MetricDataQueries=queries, StartTime=since, EndTime=until)

    results = aws_call("cloudwatch", "GetMetricData", run.config.region, run.deadline, about, call=call)[
        "MetricDataResults"
    ]
    points = {result["Id"]: list(zip(result["Timestamps"], result["Values"], strict=True)) for result in results}
    return {key: points.get(key, []) for key in wanted}


class Notice(NamedTuple):
    subject: str
    message: str
    attributes: dict[str, str]


def publish(topic_arn: str, notice: Notice, deadline: Deadline) -> None:
    """Publish one notice to the topic (in the topic's own region)."""
    attributes = {name: {"DataType": "String", "StringValue": value} for name, value in notice.attributes.items()}

    def call(client: Any) -> Any:
        return client.publish(
            TopicArn=topic_arn, Subject=notice.subject, Message=notice.message, MessageAttributes=attributes
        )

    aws_call("sns", "Publish", topic_arn.split(":")[3], deadline, f"topic {topic_arn}", call=call)


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


class NotDrainedError(Exception):
    """The backend did not drain (the message says why): it is not stopped this time. `maybe_drained`: it may have
    drained all the same (the request reached it, and its answer was not a clear no), so it must be told to resume."""

    def __init__(self, message: str, *, maybe_drained: bool) -> None:
        super().__init__(message)
        self.maybe_drained = maybe_drained


def drain(url: str, http_timeout_seconds: float, deadline: Deadline, keep: Reserve) -> None:
    """POST the backend's drain endpoint right before a stop, keeping `keep` for the stop. Returns once it
    drained (it then refuses new work); anything but a 2xx {"drained": true} is a NotDrainedError."""
    seconds = deadline.grant_backend(f"POST {url}", http_timeout_seconds, keep=keep)
    try:
        status_code, body = http_exchange("POST", url, seconds, MAX_ACTIVITY_BYTES, deadline.clock.monotonic)
    except TimeoutError:
        raise NotDrainedError(f"the drain (POST {url}) timed out after {seconds:.1f}s", maybe_drained=True) from None
    except (OSError, http.client.HTTPException, ResponseTooLargeError) as error:
        unreached = isinstance(error, ConnectionRefusedError | socket.gaierror)  # it never reached the backend
        message = f"the drain (POST {url}) failed: {type(error).__name__}"
        raise NotDrainedError(message, maybe_drained=not unreached) from None
    try:
        answer = strict_json(body)
    except ValueError:
        answer = None
    if not (200 <= status_code < 300 and isinstance(answer, dict) and answer.get("drained") is True):
        shown = json.dumps(answer)[:200] if answer is not None else _short(body[:60])
        said_no = not 200 <= status_code < 300 or (isinstance(answer, dict) and answer.get("drained") is False)
        message = f"the backend did not drain (POST {url} answered HTTP {status_code}: {shown})"
        raise NotDrainedError(message, maybe_drained=not said_no)


def undrain(url: str, http_timeout_seconds: float, deadline: Deadline) -> str:
    """DELETE the drain ("resume work now") after a stop that did not happen, within what is left; says how it went.
    A backend that cannot be told resumes when its drain lease ends."""
    try:
        seconds = deadline.grant_backend(f"DELETE {url}", http_timeout_seconds, least=MIN_UNDRAIN_SECONDS)
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
    ends_at = monotonic() + seconds
    parts = urlsplit(url)
    https = parts.scheme == "https"
    sock = _connect(parts.hostname or "", parts.port or (443 if https else 80), https, ends_at, monotonic)
    try:
        stream = _DeadlineStream(sock, ends_at, monotonic, max_bytes)
        request = f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: application/json\r\n"
        length = "" if method == "GET" else "Content-Length: 0\r\n"  # a POST without a body says so
        stream.sendall(f"{request}{length}Connection: close\r\n\r\n".encode())
        stream.skip_interim_responses()
        if status_only:  # "HTTP/1.1 200 OK": the status line and nothing more
            line = stream.makefile().readline(max_bytes)
            version, _, rest = line.partition(b" ")
            if not version.startswith(b"HTTP/") or not rest[:3].isdigit():
                raise http.client.BadStatusLine(repr(line[:60]))
            return int(rest[:3]), b""
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

    def __init__(self, sock: socket.socket, ends_at: float, monotonic: Callable[[], float], max_bytes: int) -> None:
        super().__init__()
        self._sock, self._ends_at, self._monotonic, self._bytes_left = sock, ends_at, monotonic, max_bytes
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
        self._sock.settimeout(_seconds_left(self._ends_at, self._monotonic))
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
        self._sock.settimeout(_seconds_left(self._ends_at, self._monotonic))  # sendall's total since 3.5
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(self)


def _connect(host: str, port: int, https: bool, ends_at: float, monotonic: Callable[[], float]) -> socket.socket:
    """DNS, TCP and TLS, all before `ends_at` (monotonic); the first address that answers wins. getaddrinfo takes no
    timeout: it runs on a worker thread that is waited for no longer than what is left."""

    def lookup() -> list[Any]:
        try:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except UnicodeError:  # the IDNA codec refuses the name (an empty label, a label over 63 characters)
            raise socket.gaierror(socket.EAI_NONAME, f"{host!r} is not a valid host name") from None

    failure: OSError = ConnectionError(f"no address found for {host}")
    for family, kind, protocol, _, address in within(_seconds_left(ends_at, monotonic), lookup, f"resolving {host}"):
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(_seconds_left(ends_at, monotonic))
            sock.connect(address)
            if https:  # the socket's timeout bounds the whole handshake (Python 3.5+): give it only what is left
                sock.settimeout(_seconds_left(ends_at, monotonic))
                sock = _tls_context().wrap_socket(sock, server_hostname=host)
            return sock
        except OSError as error:
            sock.close()
            failure = error
    raise failure


@cache
def _tls_context() -> ssl.SSLContext:
    from botocore.httpsession import where  # the CA bundle botocore itself trusts, in every Lambda runtime

    return ssl.create_default_context(cafile=where())


def _seconds_left(ends_at: float, monotonic: Callable[[], float]) -> float:
    left = ends_at - monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left


# --- The actions: each takes the Run and returns a Done, what it did; present() makes the answer --
@dataclass(frozen=True)
class Run:
    """What every action takes: the configuration, the deadline with its clock, the instance's EC2 calls, and the
    event's fields (which hold reads)."""

    config: Config
    deadline: Deadline
    ec2: Ec2
    fields: Mapping[str, Any] = field(default_factory=dict)

    def now(self) -> datetime:
        return self.deadline.clock.now()


class Done(NamedTuple):
    """What an action did, in plain values: the one thing it returns. present() is where it becomes the answer."""

    action: Action
    info: InstanceInfo | None = None  # what DescribeInstances said
    verdict: Verdict | None = None  # start and status decide nothing
    transition: Transition | None = None  # what StartInstances or StopInstances did
    hold: Hold | None = None  # the hold in force, or the one the hold action set
    ended: Hold | None = None  # the hold that check_idle found ended, or that release ended
    activity: Activity | ActivityUnknown | None = None  # what the backend said, if asked
    health: Mapping[str, Any] | None = None  # status: the health probe, None if there was no time for it
    stuck_busy: bool = False
    drained: bool = False
    failure: OrchestratorError | None = None  # what left check_idle undecided, or failed a drained stop
    warnings: tuple[str, ...] = ()
    notices: tuple[Notice, ...] = ()  # besides the action's own: a hold that ended
    busy_since: datetime | None = None  # check_idle: when the busy backend began to be busy, as far as it knows
    record: Mapping[str, str | None] = {}  # check_idle: the tags to write (None: delete) to keep that record
    explained_until: datetime | None = None  # check_idle: when the last hold or keep-warm window of this run ended


Reading = Callable[[], Activity | ActivityUnknown]  # what the backend says, asked only if a rule needs it
# Whether the metrics were idle over the last N seconds, periods that began before a time counting as missing; and why.
MetricsReading = Callable[[int, datetime], tuple[bool, str]]


class Judgement(NamedTuple):  # what judge() found: the Done fields it fills
    verdict: Verdict
    activity: Activity | ActivityUnknown | None = None
    stuck_busy: bool = False
    warnings: tuple[str, ...] = ()
    busy_since: datetime | None = None  # when the busy backend began to be busy, as far as the function knows
    record: Mapping[str, str | None] = {}  # the instance's tags to write (None: delete) to keep that record


def start(run: Run) -> Done:
    """Describe (its tags carry any hold), then StartInstances if the instance is stopped, without waiting for the
    boot; a stop in progress is waited out while a Describe and a StartInstances still fit. Held stopped: a 409."""
    info = run.ec2.describe()
    reading = read_hold(info.tags, run.now(), run.config.max_hold_hours)
    if reading.hold is not None and reading.hold.state == "stopped":
        raise HeldStoppedError(
            f"Instance {run.config.instance_id} is {reading.hold.text()}, so it is not started. It can be woken once "
            'the hold ends, or when an operator releases it ({"action": "release"}).',
            hold=reading.hold.as_dict(),
        )
    if info.state in ("pending", "running"):
        moved = Transition(info.state, info.state)
    elif info.state == "stopped":
        try:
            moved = run.ec2.start_instance()
        except AwsError as error:
            if error.aws_error_code != "IncorrectInstanceState":
                raise
            moved = _start_once_stopped(run, run.ec2.describe().state)
    else:
        moved = _start_once_stopped(run, info.state)
    return Done(Action.START, info, transition=moved, warnings=reading.problems)


def _start_once_stopped(run: Run, state: str) -> Transition:
    # StartInstances on a stopping instance fails with IncorrectInstanceState (so do shutting-down
    # and terminated): wait out a stop in progress, keeping room for the Describe and the StartInstances after it.
    keep = run.deadline.keep(reserve("wait_for_stopped", run.config))
    while state == "stopping":
        if run.deadline.left() < keep:
            raise StillStoppingError(
                f"Instance {run.config.instance_id} is still stopping. Retry start after {RETRY_AFTER_SECONDS} "
                "seconds.",
                state=state,
            )
        run.deadline.clock.sleep(STOPPING_POLL_SECONDS)
        state = run.ec2.describe().state
    if state in GONE_STATES:
        raise InstanceGoneError(
            f"Instance {run.config.instance_id} is {state} and cannot be started. Point INSTANCE_ID at a live "
            "instance.",
            state=state,
        )
    if state == "stopped":
        return run.ec2.start_instance()
    return Transition(state, state)  # someone else started it meanwhile


def status(run: Run) -> Done:
    """The instance's state, its hold, and, when it runs, whether the backend's health endpoint answers 2xx."""
    url = run.config.require_backend_url(Action.STATUS) + run.config.health_path
    info = run.ec2.describe()
    reading = read_hold(info.tags, run.now(), run.config.max_hold_hours)
    done = Done(Action.STATUS, info, hold=reading.hold, warnings=reading.problems)
    if info.state != "running":
        return done._replace(health={"reachable": False, "healthy": False, "status_code": None})
    try:
        seconds = run.deadline.grant_backend(f"GET {url}", min(HEALTH_TIMEOUT_SECONDS, run.config.http_timeout_seconds))
    except OutOfTimeError as error:  # answer what is known: the state
        return done._replace(warnings=(*done.warnings, error.message))
    return done._replace(health=probe_health(url, seconds, run.deadline.clock))


def check_idle(run: Run) -> Done:
    """Describe, judge, carry out: stop the instance once it is known to be idle past the timeout, keep it whenever in
    doubt, and start it when it is held running or in a keep-warm window. A hold that has ended is cleared first."""
    run.config.require_backend_url(Action.CHECK_IDLE)
    done = Done(Action.CHECK_IDLE)
    try:
        info = run.ec2.describe()
        reading = read_hold(info.tags, run.now(), run.config.max_hold_hours)
        done = done._replace(info=info, hold=reading.hold, warnings=reading.problems)
        if reading.ended is not None:
            done = _end_hold(run, reading.ended, done)
        ends = (reading.last_ended, reading.ended and reading.ended.until)
        window_end = run.config.last_window_end(info.launch_time, run.now())
        done = done._replace(explained_until=max((end for end in (*ends, window_end) if end), default=None))
        metrics = partial(_metrics_idle, run, info)
        judged = judge(run.config, info, reading.hold, run.now(), backend=lambda: _read_activity(run), metrics=metrics)
        problem = judged.activity.problem if isinstance(judged.activity, Activity) else None
        done = done._replace(**{**judged._asdict(), "warnings": (*done.warnings, *judged.warnings, *_some(problem))})
        return _keep_record(run, carry_out(run, done))
    except OutOfTimeError as error:  # no decision: an idle instance would run on, so the OutOfTime alarm hears of it
        verdict = done.verdict
        reason = f"out of time before {error.step} ({error.brief}); the next check decides again"
        reason = f"{verdict.reason}, but {reason}" if verdict else reason
        idle_seconds = verdict.idle_seconds if verdict else None
        return done._replace(verdict=Verdict(Decision.KEEP, reason, idle_seconds, "deadline"), failure=error)


def judge(
    config: Config, info: InstanceInfo, hold: Hold | None, now: datetime, *, backend: Reading, metrics: MetricsReading
) -> Judgement:
    """The README's rules, in order: the first that applies decides. `backend()` reads the activity endpoint and
    `metrics(seconds, not_before)` the instance's CloudWatch metrics over the last `seconds` (periods that began
    before `not_before` count as missing), each only if a rule needs it."""
    if hold is not None and hold.state == "running":
        return Judgement(kept_up(info.state, hold.text(), "hold"))
    window = config.open_window(now)
    if window is not None and hold is not None and info.state == "stopped":
        return Judgement(Verdict(Decision.SKIP, f"stopped, {hold.text()}: no keep-warm window starts it", None, "hold"))
    if window is not None:  # working hours: never stop, and start a stopped instance
        why, started = f"inside the keep-warm window {window.text!r}", "started so that it is warm when people arrive"
        return Judgement(kept_up(info.state, why, "keep_warm", started))
    if info.state != "running":
        return Judgement(Verdict(Decision.SKIP, f"instance is {info.state}, not running", signal="state"))
    activity = backend()
    uptime_seconds = (now - info.launch_time).total_seconds()
    if isinstance(activity, ActivityUnknown) and config.idle_cpu_percent > 0:  # the second signal
        unreachable = f"backend unreachable ({activity.reason})"
        if uptime_seconds <= config.idle_timeout_seconds:
            up = f"up {_seconds(max(uptime_seconds, 0))}, within the {config.idle_timeout_seconds}s timeout"
            return Judgement(Verdict(Decision.KEEP, f"{unreachable}; {up}"), activity)
        if info.vcpus is None:
            reason = "DescribeInstances gave no CpuOptions, so one busy vCPU cannot be told from an idle instance"
            return Judgement(Verdict(Decision.KEEP, f"{unreachable}; {reason}", signal="cloudwatch"), activity)
        try:
            idle, evidence = metrics(config.idle_timeout_seconds, info.launch_time)
        except AwsError as error:
            idle, evidence = False, f"CloudWatch could not be read: {error.message}"
        decision = Decision.STOP if idle else Decision.KEEP
        return Judgement(Verdict(decision, f"{unreachable}; {evidence}", signal="cloudwatch"), activity)
    verdict = decide(info.launch_time, activity, now, config.idle_timeout_seconds)
    if isinstance(activity, ActivityUnknown):
        return Judgement(verdict, activity)
    if activity.busy_reason is None:  # not busy: the function's record of a busy span ends, if it kept one
        return Judgement(verdict, activity, record={BUSY_SINCE_TAG: None} if BUSY_SINCE_TAG in info.tags else {})
    since, record = busy_since(activity, info, now)
    busy_for = (now - since).total_seconds()
    watched = 0 < config.stuck_busy_seconds < busy_for and config.idle_cpu_percent > 0 and info.vcpus
    judged = _stuck_busy(config, verdict, activity, since, metrics) if watched else Judgement(verdict, activity)
    return judged._replace(busy_since=since, record=record)


def busy_since(activity: Activity, info: InstanceInfo, now: datetime) -> tuple[datetime, dict[str, str | None]]:
    """When the backend began to be busy (this run at the earliest), and the record to write of it: what the backend
    says (busy_since); else the function's own record (the busy-since tag) of this run; else now, written down."""
    if activity.busy_since is not None:
        return max(activity.busy_since, info.launch_time), {}
    recorded = _aware_time(info.tags.get(BUSY_SINCE_TAG, ""))
    if recorded is not None and info.launch_time <= recorded <= now:
        return recorded, {}
    return now, {BUSY_SINCE_TAG: now.isoformat()}  # seen busy for the first time this run


def _stuck_busy(
    config: Config, verdict: Verdict, activity: Activity, since: datetime, metrics: MetricsReading
) -> Judgement:
    """Busy without a break for longer than STUCK_BUSY_SECONDS: the metrics of that busy span only, judged as the
    second signal is. Idle all along means a busy flag that never clears: WARNING and StuckBusy, and a stop with
    STOP_STUCK_BUSY."""
    try:
        idle, evidence = metrics(config.stuck_busy_seconds, since)
    except (AwsError, OutOfTimeError) as error:
        return Judgement(
            verdict, activity, warnings=(f"The stuck-busy watch could not read CloudWatch: {error.message}",)
        )
    if not idle:
        return Judgement(verdict, activity)
    busy = f"{verdict.reason} since {since:%Y-%m-%d %H:%M} UTC"
    reason = f"{busy}, but its metrics say idle ({evidence}): the busy flag may be stuck"
    if config.stop_stuck_busy:
        stopped = Verdict(
            Decision.STOP, f"{reason}; stopped (STOP_STUCK_BUSY=true)", verdict.idle_seconds, "stuck_busy"
        )
        return Judgement(stopped, activity, stuck_busy=True)
    kept = f"{reason}; kept (a busy backend is stopped only with STOP_STUCK_BUSY=true)"
    return Judgement(verdict._replace(reason=kept), activity, stuck_busy=True)


def _read_activity(run: Run) -> Activity | ActivityUnknown:
    url = f"{run.config.backend_base_url}{run.config.last_activity_path}"
    wanted = run.config.http_timeout_seconds
    return fetch_activity(
        url, run.deadline.grant_backend(f"GET {url}", wanted, reserve("activity", run.config)), run.deadline.clock
    )


def _metrics_idle(run: Run, info: InstanceInfo, seconds: int, not_before: datetime) -> tuple[bool, str]:
    """Whether the instance's own metrics were idle over the last `seconds`, from `not_before` on (the launch, or
    when its backend began to be busy), on its scale (one busy vCPU of any count is not idle), in one GetMetricData
    call; and the evidence."""
    assert info.vcpus is not None  # noqa: S101 - judge() checks it first
    now = run.now()
    since, until = metric_window(now, seconds)
    samples = instance_metrics(run, since, now)
    cpu_limit = min(run.config.idle_cpu_percent, ONE_BUSY_VCPU_PERCENT / info.vcpus)
    network_limit = run.config.idle_network_kb * 1024
    began = "the launch" if not_before == info.launch_time else "the busy span"
    return judge_metrics(samples, since, until, cpu_limit, network_limit, not_before=not_before, began=began)


def _end_hold(run: Run, ended: Hold, done: Done) -> Done:
    """A hold whose end has passed: say so once, and end it in one call: a running hold is marked ended (the record
    its end, from which the uptime alarm counts), a stopped one deleted. The usual rules apply."""
    if run.config.dry_run:
        return _warn(done, f"The hold ({ended.text()}) has ended; in dry run its tags are left in place.")
    try:
        _forget_hold(run.ec2, ended, ended.until)
    except AwsError as error:
        return _warn(done, f"The hold ({ended.text()}) has ended, but its tags stay: {error.message}")
    instance_id = run.config.instance_id
    text = f"The hold on instance {instance_id} ({ended.text()}) has ended; the usual rules apply again."
    attributes = {"action": Action.CHECK_IDLE.value, "decision": "hold_ended"}
    return done._replace(ended=ended, notices=(Notice(f"Backend {instance_id} hold ended", text, attributes),))


def _keep_record(run: Run, done: Done) -> Done:
    """Write (or delete) the tags of the function's own record of a busy span, after the verdict is carried out: one
    CreateTags or one DeleteTags, none when nothing changed or in dry run. A failure is a warning, never a decision."""
    writes = {key: value for key, value in done.record.items() if value is not None}
    deletes = [key for key, value in done.record.items() if value is None]
    if run.config.dry_run or not (writes or deletes):
        return done
    try:
        if writes:
            run.ec2.tag(writes)
        if deletes:
            run.ec2.untag(*deletes)
    except (AwsError, OutOfTimeError) as error:
        return _warn(
            done, f"The record of when the backend began to be busy ({BUSY_SINCE_TAG}) was not kept: {error.message}"
        )
    return done


def carry_out(run: Run, done: Done) -> Done:
    """Make the verdict so: a start (keep-warm, held running) or a stop; a stop that the backend's activity decided
    waits for its drain, and a drained backend whose stop then fails is told to resume work."""
    assert done.verdict is not None  # noqa: S101 - check_idle judged first
    config, verdict = run.config, done.verdict
    match verdict.decision:
        case Decision.START:
            return _start_unless_dry_run(run, done)
        case Decision.STOP if config.drain_path and verdict.signal == "activity" and not config.dry_run:
            url = f"{config.backend_base_url}{config.drain_path}"
            try:
                drain(url, config.http_timeout_seconds, run.deadline, keep=reserve("drain", config))
            except NotDrainedError as refused:  # a drain it may have begun all the same is undone before it keeps
                undone = f"; {undrain(url, config.http_timeout_seconds, run.deadline)}" if refused.maybe_drained else ""
                reason = f"{verdict.reason}, but {refused}{undone}"
                return done._replace(verdict=verdict._replace(decision=Decision.KEEP, reason=reason))
            try:
                return _stop_unless_dry_run(run, done._replace(drained=True))
            except (AwsError, OutOfTimeError) as error:  # the backend refuses all work now: tell it to resume
                resumed = undrain(url, config.http_timeout_seconds, run.deadline) if _not_sent(error) else LEFT_DRAINED
                reason = f"{verdict.reason}; drained, but StopInstances failed: {error.message} {resumed}"
                kept = verdict._replace(decision=Decision.KEEP, reason=reason)
                return done._replace(verdict=kept, drained=True, failure=error)
        case Decision.STOP:
            return _stop_unless_dry_run(run, done)
    return done


LEFT_DRAINED: Final = (
    "StopInstances got no answer and may still stop the instance, so the backend is left drained: it refuses work "
    "until its lease ends rather than take work the stop would kill."
)


def _forget_hold(ec2: Ec2, hold: Hold | None, ended: datetime) -> None:
    """End a hold in one call: a running one marked ended at `ended` (it explained the instance's uptime until then),
    anything else (a stopped hold, tags that made no hold) deleted."""
    if hold is not None and hold.state == "running":
        ec2.tag({HOLD_TAG: ENDED, HOLD_UNTIL_TAG: ended.isoformat()})
    else:
        ec2.untag(*HOLD_TAGS)


def _not_sent(error: OrchestratorError) -> bool:
    """Whether a failed call certainly changed nothing: AWS refused it, or it was never made. A call that got no
    answer (aws_unreachable: cut off, timed out) may still have reached AWS."""
    return not isinstance(error, AwsUnreachableError)


def _start_unless_dry_run(run: Run, done: Done) -> Done:
    if run.config.dry_run:
        return _decided(done, Decision.WOULD_START)
    return _decided(done._replace(transition=run.ec2.start_instance()), Decision.START)


def _stop_unless_dry_run(run: Run, done: Done) -> Done:
    if run.config.dry_run:
        return _decided(done, Decision.WOULD_STOP)
    moved, warning = run.ec2.stop_instance(run.config.stop_hibernate)
    done = done._replace(transition=moved, warnings=done.warnings + _some(warning))
    return _decided(done, Decision.SKIP if moved.previous_state in STOPPED_STATES else Decision.STOP)


def stop(run: Run) -> Done:
    """The operator's stop, now (direct invocation only): honours DRY_RUN and STOP_HIBERNATE. Described first, so that
    a stopped instance is left alone and a running hold or an open keep-warm window, which would start it again at
    the next check, is said; a Describe that fails does not keep an operator from stopping it."""
    info: InstanceInfo | None = None
    unread: tuple[str, ...] = ()
    try:
        info = run.ec2.describe()
    except AwsError as error:
        unread = (f"The instance's tags could not be read, so no hold was looked for: {error.message}",)
    done = Done(Action.STOP, info, Verdict(Decision.STOP, "stop requested", signal="operator"), warnings=unread)
    if info is not None and info.state in STOPPED_STATES:
        done = _decided(done, Decision.SKIP)
    else:
        done = _stop_unless_dry_run(run, done)
    if done.verdict is not None and done.verdict.decision is Decision.SKIP:  # nothing changed: nothing to notify
        was = done.transition.previous_state if done.transition else info.state if info else "stopped"
        done = done._replace(
            verdict=done.verdict._replace(reason=f"stop requested, but the instance was already {was}")
        )
    held = read_hold(info.tags, run.now(), run.config.max_hold_hours).hold if info else None
    if held is not None and held.state == "running":
        release = '{"action": "release"}'
        return _warn(done, f"The instance is {held.text()}: the next check_idle starts it again. To keep it stopped, "
                     f"release the hold first ({release}), or hold it stopped instead.")  # fmt: skip
    window = run.config.open_window(run.now())
    if window is None:
        return done
    opened = f"The keep-warm window {window.text!r} is open: the next check_idle starts the instance again. "
    return _warn(done, opened + "To keep it stopped, remove the window from KEEP_WARM first.")


def hold(run: Run) -> Done:
    """Hold the instance running or stopped until a time (direct invocation only): the three tags in one
    CreateTags, then start or stop it to match (an operator's stop: STOP_HIBERNATE and DRY_RUN honoured)."""
    wanted = hold_request(run.fields, run.now(), run.config.max_hold_hours)  # a 400 writes nothing
    info = run.ec2.describe()
    if not run.config.dry_run:  # three tags in one call (an empty reason clears an older one)
        run.ec2.tag(
            {HOLD_TAG: wanted.state, HOLD_UNTIL_TAG: wanted.until.isoformat(), HOLD_REASON_TAG: wanted.reason or ""}
        )
    written = " (dry run: nothing written)" if run.config.dry_run else ""
    done = Done(Action.HOLD, info, Verdict(Decision.KEEP, f"{wanted.text()}{written}", signal="operator"), hold=wanted)
    if wanted.state == "running" and info.state == "stopped":
        return _start_unless_dry_run(run, done)
    if wanted.state == "stopped" and info.state in ("pending", "running"):
        return _stop_unless_dry_run(run, done)
    return done


def release(run: Run) -> Done:
    """End the hold now (direct invocation only): marked ended now in one CreateTags (tags that made no hold too);
    the usual rules apply."""
    info = run.ec2.describe()
    reading = read_hold(info.tags, run.now(), run.config.max_hold_hours)
    released = reading.hold or reading.ended
    tagged = HOLD_TAG in info.tags or HOLD_UNTIL_TAG in info.tags  # a hold, or tags that make none (still cleared)
    if tagged and reading.last_ended is None and not run.config.dry_run:
        _forget_hold(run.ec2, released, min(released.until, run.now()) if released else run.now())
    reason = f"released from its hold ({released.text()})" if released else "released: it had no hold"
    reason += " (dry run: nothing written)" if run.config.dry_run else ""
    return Done(Action.RELEASE, info, Verdict(Decision.KEEP, reason, signal="operator"), ended=released)


def _decided(done: Done, decision: Decision) -> Done:
    assert done.verdict is not None  # noqa: S101 - only a verdict is carried out
    return done._replace(verdict=done.verdict._replace(decision=decision))


def _warn(done: Done, warning: str) -> Done:
    return done._replace(warnings=(*done.warnings, warning))


def _some(item: T | None) -> tuple[T, ...]:  # an optional warning or problem, as a tuple to join others
    return (item,) if item else ()


# --- The answer: one presenter, from what an action did to its body, metrics, log level and notices
class Answer(NamedTuple):
    """An invocation's answer before it is rendered: the body's fields, status and headers, the metrics, the
    warnings, the log level, and the notices to publish to NOTIFY_TOPIC_ARN."""

    fields: Mapping[str, Any]
    status_code: int = 200
    metrics: Mapping[str, float] = {}
    warnings: tuple[str, ...] = ()
    level: int = logging.INFO
    headers: Mapping[str, str] = {}
    notices: tuple[Notice, ...] = ()


CHANGES: Final = frozenset({Decision.START, Decision.STOP, Decision.WOULD_START, Decision.WOULD_STOP})
STARTING: Final = "Instance is starting: poll the backend's health endpoint."


def present(done: Done, config: Config, now: datetime) -> Answer:
    """The one place where what an action did becomes its answer: body, status, metrics, log level, notices."""
    info, verdict, moved, action = done.info, done.verdict, done.transition, done.action
    started = moved is not None and moved.started
    fields: dict[str, Any] = {"state": info.state, "launch_time": info.launch_time.isoformat()} if info else {}
    if done.hold is not None or action in (Action.STATUS, Action.HOLD, Action.RELEASE):
        fields["hold"] = done.hold.as_dict() if done.hold else None
    if done.ended is not None or action is Action.RELEASE:
        fields["released" if action is Action.RELEASE else "hold_ended"] = done.ended.as_dict() if done.ended else None
    metrics: dict[str, float] = {"InstanceStarted": int(started)} if action is Action.START else {}
    if moved is not None:
        fields.update(previous_state=moved.previous_state, state=moved.state)
        metrics.update({"InstanceStarted": 1} if started else {"InstanceStopped": 1} if moved.stopped else {})
    if action is Action.START:
        fields["message"] = STARTING if started else "Instance is already up."
    if action is Action.STATUS:
        fields["backend"] = done.health
    if verdict is not None:
        fields.update(decision=verdict.decision, reason=verdict.reason, signal=verdict.signal, dry_run=config.dry_run)
    if action is Action.CHECK_IDLE:
        figures, counted = _check_idle_figures(done, config, now)
        fields, metrics = {**fields, **figures}, {**metrics, **counted}
    # Notified: a start, a stop (or what dry run would have done), a hold set, a hold released.
    changes = {Action.START: started, Action.HOLD: True, Action.RELEASE: done.ended is not None}
    if changes.get(action, verdict is not None and verdict.decision in CHANGES):
        done = done._replace(
            notices=(*done.notices, notification(done, config.instance_id, fields.get("uptime_seconds")))
        )
    # ERROR when the backend cannot say (BackendUnreachable), or check_idle could not decide or carry out; WARNING for
    # a busy flag that may be stuck. Any warning lifts INFO to WARNING when the line is logged.
    level = logging.ERROR if isinstance(done.activity, ActivityUnknown) or done.failure else logging.INFO
    level = max(level, logging.WARNING) if done.stuck_busy else level
    status_code = 202 if action is Action.START and started else 200
    return Answer(fields, status_code, metrics, done.warnings, level, notices=done.notices)


def _check_idle_figures(done: Done, config: Config, now: datetime) -> tuple[dict[str, Any], dict[str, float]]:
    """check_idle's own fields and metrics: idle time, what the backend said, a stuck busy flag, a drain, a failure,
    and the instance's uptime (alarmed on when nothing explains it; counted at a stop)."""
    info, verdict = done.info, done.verdict
    assert verdict is not None  # noqa: S101 - check_idle always ends in a verdict
    idle_seconds = None if verdict.idle_seconds is None else round(verdict.idle_seconds, 1)
    fields: dict[str, Any] = {"idle_seconds": idle_seconds, "idle_timeout_seconds": config.idle_timeout_seconds}
    metrics: dict[str, float] = {"IdleSeconds": idle_seconds} if idle_seconds is not None else {}
    metrics.update({"BackendUnreachable": 1} if isinstance(done.activity, ActivityUnknown) else {})
    fields.update({name: True for name, on in (("stuck_busy", done.stuck_busy), ("drained", done.drained)) if on})
    fields.update({"busy_since": done.busy_since.isoformat()} if done.busy_since else {})
    metrics.update({"StuckBusy": 1} if done.stuck_busy else {})
    metrics.update({"OutOfTime": 1} if isinstance(done.failure, OutOfTimeError) else {})
    metrics.update({"Errors": 1} if done.failure and done.drained else {})  # a drained backend left running
    uptime = round((now - info.launch_time).total_seconds()) if info else 0
    if info is not None and info.state == "running" and verdict.signal not in ("hold", "keep_warm"):
        explained = max(info.launch_time, done.explained_until or info.launch_time)  # a hold or a window explained it
        metrics["UptimeHours"] = round(max((now - explained).total_seconds(), 0) / 3600, 2)
    if info is not None and verdict.decision in (Decision.STOP, Decision.WOULD_STOP):
        fields["uptime_seconds"] = uptime
        metrics.update({"UptimeSeconds": uptime} if verdict.decision is Decision.STOP else {})
    return fields, metrics


def notification(done: Done, instance_id: str, uptime_seconds: int | None) -> Notice:
    """The SNS message for a start, a stop or a hold: a subject and a body a person reads, attributes to filter on."""
    verdict, moved = done.verdict, done.transition
    decision = verdict.decision.value if verdict else "start"
    what = {"start": "started", "stop": "stopped", "would_stop": "would be stopped (dry run)",
            "would_start": "would be started (dry run)"}.get(decision, decision)  # fmt: skip
    if done.action in (Action.HOLD, Action.RELEASE) and verdict is not None:
        what = verdict.reason
    lines = [f"Instance {instance_id} {what} by {done.action}."]
    if verdict is not None:
        lines += [f"Why: {verdict.reason}", f"Decided by: {verdict.signal}"]
    if moved is not None:
        lines += [f"Was: {moved.previous_state}", f"Now: {moved.state}"]
    elif done.info is not None:
        lines.append(f"Now: {done.info.state}")
    if uptime_seconds is not None:
        lines.append(f"Ran for: {uptime_seconds // 3600} h {uptime_seconds % 3600 // 60} min")
    subject = sns_subject(f"Backend {instance_id} {what}")
    return Notice(subject, "\n".join(lines), {"action": done.action.value, "decision": decision})


def sns_subject(text: str) -> str:
    """`text` as an SNS subject: printable ASCII on one line (accents dropped, other letters left out) and fewer than
    100 characters, cut at a word with "..." where it is longer; the message carries the whole text.
    https://docs.aws.amazon.com/sns/latest/api/API_Publish.html"""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    plain = " ".join("".join(c if c.isprintable() else " " for c in plain).split())
    if len(plain) < SNS_SUBJECT_LIMIT:
        return plain
    cut = plain[: SNS_SUBJECT_LIMIT - 4]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "..."


def act(action: Action, config: Config, deadline: Deadline, fields: Mapping[str, Any]) -> Answer:
    """Run the action on the instance, present what it did, and publish its notices to NOTIFY_TOPIC_ARN."""
    shortest = shortest_timeout(action, config)
    if deadline.whole < shortest:  # not one attempt of each call would fit: no retry can succeed
        raise TimeoutTooShortError(action, deadline.whole, shortest)
    run = Run(config, deadline, Ec2(config.region, config.instance_id, deadline), fields)
    match action:
        case Action.START:
            done = start(run)
        case Action.STATUS:
            done = status(run)
        case Action.CHECK_IDLE:
            done = check_idle(run)
        case Action.STOP:
            done = stop(run)
        case Action.HOLD:
            done = hold(run)
        case Action.RELEASE:
            done = release(run)
        case Action.PREFLIGHT:
            raise AssertionError("preflight runs before the configuration is required: see respond()")
    answer = present(done, config, deadline.clock.now())
    warnings, topic = list(answer.warnings), config.notify_topic_arn
    for notice in answer.notices:
        try:
            if topic:
                publish(topic, notice, deadline)
        except (AwsError, OutOfTimeError) as error:  # a notice changes neither the decision nor the answer
            warnings.append(f"The notification was not published: {error.message}")
    return answer._replace(warnings=tuple(warnings))


# --- Preflight: what is wrong with the deployment, before the first idle night --------------------
class Check(NamedTuple):
    check: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str | None = None


def preflight(settings: Settings, deadline: Deadline, fields: Mapping[str, Any]) -> Answer:
    """Check the deployment without changing anything (no start, stop, tag or drain; SNS only with "notify": true).
    Each check runs within the deadline, and the failure of one never stops the others: a bad variable fails the
    checks that need it, with its reason, and the others still answer."""
    whole_seconds = deadline.whole
    config, problems = settings.config, (*settings.problems, *_some(settings.token.problem))
    bad_url = next((p.message for p in settings.problems if p.message.startswith("BACKEND_BASE_URL=")), None)
    if problems:
        checks = [Check("config", "fail", " | ".join(p.message for p in problems), "fix each variable named above")]
    else:
        checks = [Check("config", "ok", f"every variable is valid: {', '.join(settings.shown) or 'all defaults'}")]
    if config is None:
        skipped = "INSTANCE_ID is missing or bad: fix the configuration and run preflight again"
        checks += [Check(name, "skip", skipped) for name in PREFLIGHT_CHECKS[1:]]
    else:
        run = Run(config, deadline, Ec2(config.region, config.instance_id, deadline), fields)
        try:
            info: InstanceInfo | None = run.ec2.describe()
        except (OutOfTimeError, AwsError, InstanceNotFoundError) as error:
            info, checks = None, [*checks, _failed("instance", error)]
        checks += [_run_check(name, run, info, whole_seconds, bad_url) for name in PREFLIGHT_CHECKS[1 if info else 2 :]]
    failed = [check.check for check in checks if check.status == "fail"]
    counts = ", ".join(f"{sum(c.status == s for c in checks)} {s}" for s in ("ok", "warn", "fail", "skip"))
    return Answer(
        {"ok": not failed, "checks": [check._asdict() for check in checks], "message": f"preflight: {counts}"},
        level=logging.WARNING if failed else logging.INFO,
    )


PREFLIGHT_CHECKS: Final = (
    "config", "instance", "start_permission", "stop_permission", "tag_permission", "metrics", "schedule",
    "notifications", "backend_health", "activity_contract", "drain", "keep_warm", "timeout",
)  # fmt: skip
NEED_THE_INSTANCE: Final = frozenset({"start_permission", "stop_permission", "tag_permission", "metrics", "schedule"})
NEED_IT_RUNNING: Final = frozenset({"backend_health", "activity_contract"})


def _run_check(name: str, run: Run, info: InstanceInfo | None, whole: float, bad_url: str | None) -> Check:
    """One check, given what DescribeInstances said (None: it failed) and what is wrong with BACKEND_BASE_URL, if it
    is set but invalid; an AWS failure is that check's failure."""
    if name in NEED_IT_RUNNING and run.config.backend_base_url is None:  # unset, or set but invalid
        unset = "BACKEND_BASE_URL is not set, so the backend cannot be asked"
        fix = "set BACKEND_BASE_URL to the backend's base URL as the function reaches it, e.g. http://10.0.1.50:8000"
        return Check(name, "fail", bad_url or unset, fix)
    if info is None and name in NEED_THE_INSTANCE | NEED_IT_RUNNING:
        return Check(name, "skip", "the instance could not be described: see the instance check")
    if info is not None and info.state != "running" and name in NEED_IT_RUNNING:
        return Check(name, "skip", f"the instance is {info.state}: start it and run preflight again")
    try:
        return PREFLIGHT[name](run, info, whole)
    except (OutOfTimeError, AwsError, InstanceNotFoundError) as error:
        return _failed(name, error)


def _failed(name: str, error: OrchestratorError) -> Check:
    if isinstance(error, OutOfTimeError):
        return Check(name, "skip", f"out of time ({error.brief})", "raise the function's timeout")
    fix = f"allow {error.details['iam_action']} to the function's role" if "iam_action" in error.details else None
    return Check(name, "fail", error.message, fix or "see the message")


def _instance_check(run: Run, info: InstanceInfo, _: float) -> Check:
    monitoring = "detailed" if info.detailed_monitoring else "basic (5-minute averages hide shorter bursts)"
    detail = f"{info.state}, {info.instance_type}, {info.vcpus or '?'} vCPUs, monitoring {monitoring}"
    if run.config.stop_hibernate and not info.hibernation_configured:
        fix = "enable hibernation on the instance (only possible at launch) or set STOP_HIBERNATE=false"
        return Check("instance", "fail", f"{detail}; STOP_HIBERNATE=true but it is not configured to hibernate", fix)
    return Check("instance", "ok", detail)


def _allowed(name: str, run: Run, operations: tuple[str, ...], **kwargs: Any) -> Check:
    for operation in operations:
        run.ec2.allowed(operation, **kwargs)
    allowed = ", ".join(IAM_ACTIONS[o] for o in operations)
    return Check(name, "ok", f"{allowed} allowed (DryRun) on {run.config.instance_id}")


def _metrics_check(run: Run, info: InstanceInfo, _: float) -> Check:
    if run.config.idle_cpu_percent == 0:
        return Check("metrics", "skip", "the CloudWatch fallback is off (IDLE_CPU_PERCENT=0)")
    since = run.now() - timedelta(hours=1) if info.state == "running" else info.launch_time
    points = len(instance_metrics(run, since, since + timedelta(hours=1)).cpu)
    span = f"{since:%Y-%m-%d %H:%M}-{since + timedelta(hours=1):%H:%M} UTC"
    if points:
        return Check("metrics", "ok", f"GetMetricData allowed; {points} CPU datapoints for {span}")
    fix = "EC2 publishes minutes late; check the instance ran then, and the function's route to CloudWatch"
    return Check("metrics", "warn", f"GetMetricData allowed, but no CPU datapoints for {span}", fix)


def _schedule_check(run: Run, *_: Any) -> Check:
    now, wanted = run.now(), {"checks": ("CheckIdleRequested", "Sum")}
    since = now - timedelta(days=1)
    points = metric_data(run, run.config.metrics_namespace, wanted, 60, since=since, until=now)["checks"]
    recent = sum(value for when, value in points if when >= now - timedelta(minutes=15))
    if recent:
        return Check("schedule", "ok", f"the schedule ran {recent:.0f} times in 15 minutes")
    rule = (
        'check that the EventBridge rule is enabled, targets this function, and has the input {"action": "check_idle"}'
    )
    if not points:  # no history at all: a function deployed less than 15 minutes ago looks the same
        return Check("schedule", "warn", "no check_idle has run in the last day (a new deployment?)", rule)
    return Check("schedule", "fail", "check_idle ran in the last day but not in the last 15 minutes", rule)


def _notifications_check(run: Run, *_: Any) -> Check:
    topic, instance_id = run.config.notify_topic_arn, run.config.instance_id
    if not topic:
        return Check("notifications", "skip", "NOTIFY_TOPIC_ARN is not set: no start or stop notices")
    if run.fields.get("notify") is not True:
        return Check("notifications", "skip", 'send a test message with {"action": "preflight", "notify": true}')
    text = f"A test message from the Backend Orchestrator's preflight for instance {instance_id}."
    notice = Notice(f"Backend {instance_id} preflight", text, {"action": "preflight", "decision": "test"})
    try:
        publish(topic, notice, run.deadline)
    except AwsError as error:
        return Check(
            "notifications",
            "fail",
            f"The notification was not published: {error.message}",
            f"allow sns:Publish on {topic}",
        )
    return Check("notifications", "ok", f"a test message was published to {topic}")


def _backend_check(run: Run, *_: Any) -> Check:
    url = run.config.require_backend_url(Action.PREFLIGHT) + run.config.health_path
    seconds = run.deadline.grant_backend(f"GET {url}", min(HEALTH_TIMEOUT_SECONDS, run.config.http_timeout_seconds))
    health = probe_health(url, seconds, run.deadline.clock)
    if health["healthy"]:
        return Check("backend_health", "ok", f"GET {url} answered HTTP {health['status_code']}")
    what = f"answered HTTP {health['status_code']}" if health["reachable"] else "could not be reached"
    fix = "check BACKEND_BASE_URL, the backend's security group and its process"
    return Check("backend_health", "fail", f"GET {url} {what}", fix)


def _activity_check(run: Run, *_: Any) -> Check:
    url = run.config.require_backend_url(Action.PREFLIGHT) + run.config.last_activity_path
    activity = fetch_activity(
        url, run.deadline.grant_backend(f"GET {url}", run.config.http_timeout_seconds), run.deadline.clock
    )
    if isinstance(activity, ActivityUnknown):
        fix = "answer the activity contract (docs/activity-contract.md); until then the backend is never stopped"
        return Check("activity_contract", "fail", activity.reason, fix)
    said = (
        f"busy: {activity.busy_reason}" if activity.busy_reason else f"idle for {_seconds(activity.idle_seconds or 0)}"
    )
    return Check("activity_contract", "ok", f"GET {url}: {said}")


def _drain_check(run: Run, *_: Any) -> Check:
    said = f"DRAIN_PATH={run.config.drain_path} is not called: a drain makes the backend refuse work for its lease"
    return Check("drain", "skip", said if run.config.drain_path else "DRAIN_PATH is not set: no drain before a stop")


def _keep_warm_check(run: Run, *_: Any) -> Check:
    config, now = run.config, run.now().replace(second=0, microsecond=0)
    if not config.keep_warm:
        return Check("keep_warm", "skip", "KEEP_WARM is not set: no keep-warm window")
    window = config.open_window(now)
    for minute in range(1, 8 * 24 * 60):  # the next change within a week and a day, minute by minute
        moment = now + timedelta(minutes=minute)
        if (config.open_window(moment) is None) != (window is None):
            changing = window or config.open_window(moment)
            assert changing is not None  # noqa: S101 - one side of the change is open
            when = f"{moment.astimezone(changing.zone):%a %Y-%m-%d %H:%M} {changing.zone}"
            said = (
                f"open now ({changing.text!r}), closes {when}"
                if window
                else f"closed now; {changing.text!r} opens {when}"
            )
            return Check("keep_warm", "ok", said)
    return Check("keep_warm", "ok", "open all week" if window else "no window opens within a week")


def _timeout_check(run: Run, _: Any, whole: float) -> Check:
    """What start and check_idle can do in the invocation's whole time: nothing, one attempt of each call, or whole
    first attempts and retries (the recommended 60 s)."""
    said, worst = [], "ok"
    for action in (Action.START, Action.CHECK_IDLE):
        shortest, retried = shortest_timeout(action, run.config), whole_attempts_timeout(action, run.config)
        if whole < shortest:
            said.append(f"{action} cannot run (it needs {shortest:g} s)")
            worst = "fail"
        elif whole < retried:
            said.append(f"{action} makes one attempt of each call, no retries (whole attempts need {retried:g} s)")
            worst = "warn" if worst == "ok" else worst
        else:
            said.append(f"{action} has whole first attempts, and retries where they fit")
    fix = f"raise the function's Timeout to {RECOMMENDED_TIMEOUT_SECONDS} s" if worst != "ok" else None
    return Check("timeout", worst, f"the invocation had {whole:.1f} s: {'; '.join(said)}", fix)


# Each check after config and instance: (run, what DescribeInstances said, the invocation's whole time) -> Check.
PREFLIGHT: Final[dict[str, Callable[[Run, Any, float], Check]]] = {
    "instance": _instance_check,
    "start_permission": lambda run, *_: _allowed("start_permission", run, ("StartInstances",)),
    "stop_permission": lambda run, *_: _allowed(
        "stop_permission", run, ("StopInstances",), Hibernate=run.config.stop_hibernate
    ),
    "tag_permission": lambda run, *_: _allowed(
        "tag_permission", run, ("CreateTags", "DeleteTags"), Tags=[{"Key": HOLD_TAG, "Value": "running"}]
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


# Every metric the function emits (the alarms and the dashboard watch some): <Action>Requested and these.
METRICS: Final = frozenset({"InstanceStarted", "InstanceStopped", "IdleSeconds", "UptimeSeconds", "UptimeHours",
    "BackendUnreachable", "StuckBusy", "OutOfTime", "Errors", "Rejected",
    *(f"{action.title().replace('_', '')}Requested" for action in Action)})  # fmt: skip


def emit_metrics(namespace: str, instance_id: str | None, metrics: Mapping[str, float], now: datetime) -> None:
    """One CloudWatch Embedded Metric Format line; CloudWatch turns it into metrics, no API call.

    https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html
    """
    units = [{"Name": name, "Unit": "Seconds" if name.endswith("Seconds") else "Count"} for name in metrics]
    directive = {"Namespace": namespace, "Dimensions": [["InstanceId"]], "Metrics": units}
    document = {"_aws": {"Timestamp": int(now.timestamp() * 1000), "CloudWatchMetrics": [directive]}}
    METRICS_LOG.info(json.dumps({**document, "InstanceId": instance_id or "unknown", **metrics}, separators=(",", ":")))


def log_invocation(
    response: Response, body: dict[str, Any], warnings: tuple[str, ...], request_id: str | None, duration_ms: float
) -> None:
    """The invocation's one log line: what was asked, what happened, why, and how long it took."""
    answer = response.answer
    fields = {"source": response.source, "caller": response.caller, **body, "status_code": answer.status_code}
    fields.update(warnings=list(warnings) or None, aws_request_id=request_id, duration_ms=duration_ms)
    if "error" in body:
        message = body["error"]["message"]
    else:
        message = body.get("message") or f"{body['action']}: {body.get('decision') or body.get('state')}"
    level = max(answer.level, logging.WARNING) if warnings else answer.level
    clean = {key: value for key, value in fields.items() if value is not None}
    LOG.log(level, message, exc_info=response.bug, extra={"fields": clean})


# --- The entry point: classify, authorise, configure, act, render -------------------------------
class Settings(NamedTuple):
    """The environment, read once: the configuration if every variable is valid, every bad variable, and the token
    (AuthToken), which alone decides who may learn any of it."""

    token: AuthToken
    config: Config | None  # of the good variables (None without a usable INSTANCE_ID): preflight checks on with it
    problems: tuple[ConfigError, ...]  # every bad variable, in VARIABLES' order
    shown: tuple[str, ...]  # NAME='value' of each variable set (AUTH_TOKEN as "(set)"), for preflight

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        token = AuthToken.from_env(environ)
        config, problems = Config.read(environ)
        given = [name for name in (*VARIABLES, "AUTH_TOKEN") if environ.get(name, "").strip()]
        shown = tuple(f"{name}={'(set)' if name == 'AUTH_TOKEN' else environ[name]!r}" for name in given)
        return cls(token, config, tuple(problems), shown)

    @property
    def valid(self) -> Config | None:
        """The configuration if every variable is valid (AUTH_TOKEN aside): the log names the instance even on a 401."""
        return None if self.problems else self.config

    def required(self) -> Config:
        """The configuration, or what is wrong with it: told only to a caller the token admitted."""
        if self.token.problem is not None:
            raise self.token.problem
        if self.valid is None:
            raise self.problems[0]
        LOG.setLevel(self.valid.log_level)
        return self.valid


@dataclass(frozen=True)
class Response:
    """One invocation, answered: what it asked, as far as it was understood, and what came of it."""

    answer: Answer
    over_http: bool  # a Function URL or API Gateway event: answered as one
    source: Source | None = None
    action: Action | None = None
    config: Config | None = None  # Settings.valid
    authorized: bool = False  # may see the instance ID: an HTTP caller without the token may not
    bug: Exception | None = None
    caller: str | None = None  # who IAM verified, behind an AWS_IAM Function URL


def respond(event: object, environ: Mapping[str, str], deadline: Deadline) -> Response:
    """Classify, authorise, configure and act; every failure becomes a Response that says what to fix."""
    over_http = _is_http(event)  # the one look at the event's shape: it also decides how the answer is rendered
    source, action, settings, authorized, caller = None, None, None, False, None
    try:
        request = parse_event(event, over_http)
        source = Source.HTTP if isinstance(request, HttpRequest) else request.source
        caller = request.iam_caller if isinstance(request, HttpRequest) else None
        settings = Settings.from_env(environ)
        if isinstance(request, HttpRequest) and request.iam_caller is None:  # IAM checked its signature instead
            settings.token.admit(request.authorization)
        authorized = True  # direct and scheduled invocations need no token
        if isinstance(request, EventRequest) and request.action is Action.PREFLIGHT:  # lists every bad variable
            answer = preflight(settings, deadline, request.fields)  # and names the instance whenever it can
            return Response(answer, over_http, source, Action.PREFLIGHT, settings.config, authorized, caller=caller)
        config = settings.required()
        action = http_action(request) if isinstance(request, HttpRequest) else request.action
        answer = act(action, config, deadline, request.fields if isinstance(request, EventRequest) else {})
        if isinstance(request, EventRequest) and request.warning:
            answer = answer._replace(warnings=(request.warning, *answer.warnings))
    except OrchestratorError as error:
        valid = settings and settings.valid
        return Response(_failure(error), over_http, source, action, valid, authorized, caller=caller)
    except Exception as bug:  # noqa: BLE001 - the one broad catch: a bug is logged with its traceback, answered 500
        failure = _failure(OrchestratorError("Unexpected error: the function's log has the traceback."))
        return Response(failure, over_http, source, action, settings and settings.valid, authorized, bug, caller)
    return Response(answer, over_http, source, action, config, authorized, caller=caller)


def _failure(error: OrchestratorError) -> Answer:
    return Answer(
        {**error.details, "error": {"code": error.CODE, "message": error.message}},
        status_code=error.STATUS_CODE,
        metrics={"Errors" if error.STATUS_CODE >= 500 else "Rejected": 1},  # the alarm watches Errors: ours only
        level=logging.ERROR if error.STATUS_CODE >= 500 else logging.WARNING,
        headers=dict(error.HEADERS),
    )


def render(response: Response, body: dict[str, Any]) -> dict[str, Any]:
    """The answer as the caller expects it: a Function URL / API Gateway response, or the body itself."""
    if not response.over_http:
        return body
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **response.answer.headers}
    return {
        "statusCode": response.answer.status_code,
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
    answer, config = response.answer, response.config
    warnings = (*answer.warnings, *_some(deadline.warning))
    instance_id = config.instance_id if config else None
    shown_id = instance_id if response.authorized else None  # an HTTP caller without the token learns nothing
    body = {"ok": answer.status_code < 400, "action": response.action, "instance_id": shown_id, **answer.fields}
    duration_ms = round((clock.monotonic() - started) * 1000, 1)
    request_id = getattr(context, "aws_request_id", None)
    log_invocation(response, {**body, "instance_id": instance_id}, warnings, request_id, duration_ms)  # names it
    requested = {f"{response.action.title().replace('_', '')}Requested": 1} if response.action else {}
    namespace = config.metrics_namespace if config else Config.metrics_namespace
    emit_metrics(namespace, instance_id, {**requested, **answer.metrics}, clock.now())
    return render(response, body)


def lambda_handler(event: object, context: object) -> dict[str, Any]:
    """The Lambda entry point: see handle()."""
    return handle(event, context, os.environ)


warm_clients(os.environ)  # INIT, at full speed: no invocation of a well configured function builds a client
