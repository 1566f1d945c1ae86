"""Every environment variable, read and checked in one place: a frozen Config with its defaults, the bearer token
that decides who may learn anything, and Settings, the environment read once per invocation. A bad variable is a
ConfigError naming it and what it must be; no other module reads the environment."""

from __future__ import annotations

import hmac
import ipaddress
import math
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

from orchestrator.errors import ConfigError, UnauthorizedError
from orchestrator.windows import Window, parse_keep_warm
from orchestrator.words import Action

MIN_TOKEN_CHARS: Final = 16
MAX_HOLD_HOURS_LIMIT: Final = 9999  # what MAX_HOLD_HOURS may be (the template's pattern): keeps dates in range
TOPIC_ARN_PATTERN: Final = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}")
INSTANCE_ID_PATTERN: Final = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")
GROUP_NAME_PATTERN: Final = re.compile(r"[!-9;-~]{1,255}")  # ASCII 33 to 126 but the colon (CreateAutoScalingGroup)
# What BACKEND_INSTANCE_URL may name, with an example of each to check the URL it makes.
INSTANCE_FIELDS: Final = {"private_ip": "10.0.1.50", "private_dns_name": "ip-10-0-1-50.ec2.internal",
                          "instance_id": "i-0abc123def4567890"}  # fmt: skip
REGION_PATTERN: Final = re.compile(r"[a-z]{2}(?:-[a-z0-9]+)+", re.ASCII)
BOOLEANS: Final = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Config:
    """Every setting but AUTH_TOKEN (see AuthToken), with its default: the one place defaults are written."""

    instance_id: str = ""
    auto_scaling_group_name: str = ""
    backend_base_url: str | None = None
    backend_instance_url: str | None = None  # in a group: each instance's own, with {private_ip} or the like
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
        if self.instance_id and self.auto_scaling_group_name:
            raise ConfigError(
                "INSTANCE_ID and AUTO_SCALING_GROUP_NAME are both set: set exactly one, INSTANCE_ID for one backend "
                "instance or AUTO_SCALING_GROUP_NAME for an Auto Scaling group of them."
            )
        if not self.instance_id and not self.auto_scaling_group_name:
            raise ConfigError(
                "INSTANCE_ID is not set. Set it to the backend's EC2 instance ID, e.g. i-0abc123def4567890 (or set "
                "AUTO_SCALING_GROUP_NAME instead, to the name of an Auto Scaling group of backends)."
            )
        if self.backend_instance_url and not self.auto_scaling_group_name:
            raise ConfigError(
                "BACKEND_INSTANCE_URL is set without AUTO_SCALING_GROUP_NAME: it is each instance's URL in a group. "
                "Remove it, or set AUTO_SCALING_GROUP_NAME instead of INSTANCE_ID."
            )

    @property
    def target(self) -> tuple[str, str]:
        """What the function looks after, as its metrics' dimension: (InstanceId, ID), (AutoScalingGroupName, name)."""
        if self.auto_scaling_group_name:
            return "AutoScalingGroupName", self.auto_scaling_group_name
        return "InstanceId", self.instance_id

    def base_url_of(self, instance_id: str, private_ip: str | None, private_dns_name: str | None) -> str | None:
        """Where an instance's own backend answers: BACKEND_INSTANCE_URL filled in for it, in a group (None if the
        instance lacks what it names); else BACKEND_BASE_URL."""
        if self.backend_instance_url is None:
            return self.backend_base_url
        known = {"instance_id": instance_id, "private_ip": private_ip, "private_dns_name": private_dns_name}
        named = {field for _, field, _, _ in string.Formatter().parse(self.backend_instance_url) if field}
        return None if any(known[field] is None for field in named) else self.backend_instance_url.format(**known)

    def open_window(self, now: datetime) -> Window | None:
        """The first keep-warm window open at `now`, if any."""
        return next((window for window in self.keep_warm if window.holds(now)), None)

    def last_window_end(self, after: datetime, before: datetime) -> datetime | None:
        """When a keep-warm window last closed in (after, before], if one did."""
        return max((end for window in self.keep_warm if (end := window.last_end(after, before))), default=None)

    def require_backend_url(self, action: Action) -> str:
        if self.auto_scaling_group_name and action is Action.CHECK_IDLE:  # each instance's backend, not the balancer
            if self.backend_instance_url is None:
                raise ConfigError(
                    "BACKEND_INSTANCE_URL is not set and check_idle needs it for an Auto Scaling group: set it to each "
                    "instance's own base URL, e.g. http://{private_ip}:8000."
                )
            return self.backend_instance_url
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


def _parse_group_name(name: str, raw: str) -> str:
    if not GROUP_NAME_PATTERN.fullmatch(raw):
        raise ConfigError(
            f"{name}={raw!r} is not an Auto Scaling group name: 1 to 255 printable ASCII characters without spaces or "
            "colons, e.g. pyelli-backend (the name, not the ARN)."
        )
    return raw


def _parse_instance_url(name: str, raw: str) -> str:
    example = "e.g. http://{private_ip}:8000"
    _no_credentials(name, raw)
    try:
        parts = list(string.Formatter().parse(raw))
    except ValueError:
        raise ConfigError(f"{name}={raw!r} has an unmatched brace: {example}.") from None
    named = [(field, spec, conversion) for _, field, spec, conversion in parts if field is not None]
    wrong = [field for field, spec, conversion in named if field not in INSTANCE_FIELDS or spec or conversion]
    if not named or wrong:
        fields = ", ".join(f"{{{field}}}" for field in INSTANCE_FIELDS)
        raise ConfigError(f"{name}={raw!r} must name each instance with {fields} (and nothing else): {example}.")
    try:
        _parse_base_url(name, raw.format(**INSTANCE_FIELDS))
    except ConfigError:
        raise ConfigError(f"{name}={raw!r} does not make an http(s) base URL for an instance: {example}.") from None
    return raw.rstrip("/")


def _no_credentials(name: str, raw: str) -> None:
    shown = re.sub(r"^([^:/?#]*:)?//[^/?#]*@", r"\1//***@", raw)  # never a password, even in a broken URL
    if shown != raw:
        raise ConfigError(
            f"{name}={shown!r} carries a user name or password, which would travel in clear and reach the logs: "
            "remove them, and restrict who reaches the backend with its security group instead."
        )


def _parse_base_url(name: str, raw: str) -> str:
    _no_credentials(name, raw)
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


# Every variable the function reads but AUTH_TOKEN (see AuthToken): the field it sets and the parser that checks it.
VARIABLES: Final[dict[str, tuple[str, Callable[[str, str], Any]]]] = {
    "INSTANCE_ID": ("instance_id", _parse_instance_id),
    "AUTO_SCALING_GROUP_NAME": ("auto_scaling_group_name", _parse_group_name),
    "BACKEND_BASE_URL": ("backend_base_url", _parse_base_url),
    "BACKEND_INSTANCE_URL": ("backend_instance_url", _parse_instance_url),
    "IDLE_TIMEOUT_SECONDS": ("idle_timeout_seconds", _parse_positive_int),
    "AWS_REGION": ("region", _parse_region),
    "HTTP_TIMEOUT_SECONDS": ("http_timeout_seconds", _parse_positive_float),
    "STOP_HIBERNATE": ("stop_hibernate", _parse_bool),
    "DRY_RUN": ("dry_run", _parse_bool),
    "LAST_ACTIVITY_PATH": ("last_activity_path", _parse_path),
    "HEALTH_PATH": ("health_path", _parse_path),
    "LOG_LEVEL": ("log_level", _parse_log_level),
    "METRICS_NAMESPACE": ("metrics_namespace", lambda _, raw: raw),
    "KEEP_WARM": ("keep_warm", parse_keep_warm),
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


class Settings(NamedTuple):
    """The environment, read once: the configuration if every variable is valid, every bad variable, and the token
    (AuthToken), which alone decides who may learn any of it."""

    token: AuthToken
    config: Config | None  # of the good variables (None without one target): preflight checks on with it
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
        return self.valid
