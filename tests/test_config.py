"""Configuration: read in one place, and every bad value named with what to do, before any EC2 call."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import function as bo
from tests.function import FUNCTION_MODULES
from tests.helpers import Ec2World, Invoke, body_of, http_event


def test_defaults() -> None:
    config = bo.Config.from_env({"INSTANCE_ID": "i-0abc123def4567890"})
    assert config == bo.Config(instance_id="i-0abc123def4567890")
    assert (config.idle_timeout_seconds, config.http_timeout_seconds) == (900, 5.0)
    assert (config.last_activity_path, config.health_path) == ("/api/last-activity", "/health")
    assert (config.stop_hibernate, config.dry_run, config.backend_base_url) == (False, False, None)
    assert bo.AuthToken.from_env({}).value is None


def test_every_variable_is_read() -> None:
    config = bo.Config.from_env(
        {
            "INSTANCE_ID": "i-0abc1234",
            "BACKEND_BASE_URL": "https://backend.example.com/",
            "IDLE_TIMEOUT_SECONDS": "600",
            "AWS_REGION": "eu-west-1",
            "HTTP_TIMEOUT_SECONDS": "2.5",
            "STOP_HIBERNATE": "Yes",
            "DRY_RUN": "1",
            "AUTH_TOKEN": "t0ken-value-0123456789",
            "LAST_ACTIVITY_PATH": "/idle",
            "HEALTH_PATH": "/healthz",
            "LOG_LEVEL": "debug",
            "METRICS_NAMESPACE": "PyElli",
        }
    )
    assert config.backend_base_url == "https://backend.example.com"  # trailing slash dropped
    assert (config.idle_timeout_seconds, config.region, config.http_timeout_seconds) == (600, "eu-west-1", 2.5)
    assert (config.stop_hibernate, config.dry_run) == (True, True)
    assert (config.last_activity_path, config.health_path, config.log_level) == ("/idle", "/healthz", "DEBUG")
    assert config.metrics_namespace == "PyElli"
    token = bo.AuthToken.from_env({"AUTH_TOKEN": " t0ken-value-0123456789 "})
    assert token == bo.AuthToken("t0ken-value-0123456789")
    assert "t0ken-value" not in repr(config) + repr(token)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        pytest.param("INSTANCE_ID", "", "not set", id="instance-id-missing"),
        pytest.param("INSTANCE_ID", "i-123", "8 or 17", id="instance-id-short"),
        pytest.param("INSTANCE_ID", "i-0ABC123DEF4567890", "lowercase", id="instance-id-uppercase"),
        pytest.param("INSTANCE_ID", "0abc123def4567890", "i-", id="instance-id-no-prefix"),
        pytest.param("INSTANCE_ID", "arn:aws:ec2:us-east-1:123456789012:instance/i-0abc123def4567890", "i-", id="arn"),
        pytest.param("BACKEND_BASE_URL", "10.0.1.50:8000", "http", id="url-without-scheme"),
        pytest.param("BACKEND_BASE_URL", "ftp://10.0.1.50", "http", id="url-ftp"),
        pytest.param("BACKEND_BASE_URL", "http://", "http", id="url-without-host"),
        pytest.param("BACKEND_BASE_URL", "http://host/?x=1", "http", id="url-with-query"),
        pytest.param("BACKEND_BASE_URL", "http://host:99999", "http", id="url-port-out-of-range"),
        pytest.param("BACKEND_BASE_URL", "http://host:eighty", "http", id="url-port-not-a-number"),
        pytest.param("IDLE_TIMEOUT_SECONDS", "15m", "positive whole number", id="timeout-with-unit"),
        pytest.param("IDLE_TIMEOUT_SECONDS", "0", "positive", id="timeout-zero"),
        pytest.param("IDLE_TIMEOUT_SECONDS", "-900", "positive", id="timeout-negative"),
        pytest.param("IDLE_TIMEOUT_SECONDS", "900.5", "whole", id="timeout-fraction"),
        pytest.param("HTTP_TIMEOUT_SECONDS", "fast", "positive number", id="http-timeout-word"),
        pytest.param("HTTP_TIMEOUT_SECONDS", "0", "positive", id="http-timeout-zero"),
        pytest.param("HTTP_TIMEOUT_SECONDS", "inf", "positive", id="http-timeout-infinite"),
        pytest.param("HTTP_TIMEOUT_SECONDS", "nan", "positive", id="http-timeout-nan"),
        pytest.param("STOP_HIBERNATE", "maybe", "true/false", id="hibernate-not-boolean"),
        pytest.param("DRY_RUN", "on", "true/false", id="dry-run-not-boolean"),
        pytest.param("LAST_ACTIVITY_PATH", "api/last-activity", "start with /", id="path-without-slash"),
        pytest.param("HEALTH_PATH", "/health?full=1", "start with /", id="path-with-query"),
        pytest.param("HEALTH_PATH", "/health check", "no spaces", id="path-with-space"),
        pytest.param("HEALTH_PATH", "/santé", "printable ASCII", id="path-not-ascii"),
        pytest.param("LOG_LEVEL", "VERBOSE", "DEBUG", id="log-level-unknown"),
    ],
)
def test_config_error_names_the_variable_and_value_and_changes_nothing(
    invoke: Invoke, ec2: Ec2World, variable: str, value: str, says: str
) -> None:
    ec2.set_state("stopped")
    response = invoke(http_event(), **{variable: value})
    body = body_of(response)
    assert response["statusCode"] == 500
    assert body["error"]["code"] == "config_error"
    message = body["error"]["message"]
    assert variable in message
    assert value in message
    assert says in message
    assert ec2.calls == []
    assert ec2.state() == "stopped"


def test_start_works_without_backend_url(invoke: Invoke, ec2: Ec2World) -> None:
    ec2.set_state("stopped")
    assert invoke({"action": "start"}, BACKEND_BASE_URL="")["ok"] is True


def test_a_config_error_is_shown_only_to_an_authenticated_http_caller(invoke: Invoke, ec2: Ec2World, log_lines) -> None:
    broken = {"AUTH_TOKEN": "s3cret-token-1234", "BACKEND_BASE_URL": "10.0.1.50:8000"}
    anonymous = invoke(http_event(), **broken)
    assert anonymous["statusCode"] == 401
    assert "10.0.1.50" not in anonymous["body"]
    known = invoke(http_event(headers={"authorization": "Bearer s3cret-token-1234"}), **broken)
    assert known["statusCode"] == 500
    assert "BACKEND_BASE_URL='10.0.1.50:8000'" in body_of(known)["error"]["message"]
    assert "s3cret-token-1234" not in str(anonymous) + str(known) + str(log_lines())
    assert ec2.calls == []


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://admin:hunter2-password@10.0.1.50:8000", id="user-and-password"),
        pytest.param("https://:hunter2-password@backend.example.com", id="password-only"),
        pytest.param("http://admin@10.0.1.50:8000", id="user-only"),
    ],
)
def test_credentials_in_the_backend_url_are_refused_and_never_echoed(
    invoke: Invoke, ec2: Ec2World, log_lines: Any, url: str
) -> None:
    body = invoke({"action": "check_idle"}, BACKEND_BASE_URL=url)
    assert body["error"]["code"] == "config_error"
    assert "BACKEND_BASE_URL" in body["error"]["message"]
    assert "user name or password" in body["error"]["message"]
    assert "hunter2" not in str(body) + str(log_lines())
    assert "admin" not in str(body)
    assert ec2.calls == []


@pytest.mark.parametrize(
    ("token", "says"),
    [
        pytest.param("   ", "blank", id="only-spaces"),
        pytest.param("\t\n", "blank", id="only-whitespace"),
        pytest.param("short-secret", "12 characters long", id="shorter-than-16"),
    ],
)
def test_a_blank_or_short_token_is_refused_without_showing_it(
    invoke: Invoke, ec2: Ec2World, log_lines: Any, token: str, says: str
) -> None:
    body = invoke({"action": "start"}, AUTH_TOKEN=token)
    assert body["error"]["code"] == "config_error"
    assert "AUTH_TOKEN" in body["error"]["message"]
    assert says in body["error"]["message"]
    assert str(bo.MIN_TOKEN_CHARS) in body["error"]["message"]
    if token.strip():
        assert token not in str(body) + str(log_lines())
    assert ec2.calls == []


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer "}, {"authorization": "Bearer    "}])
def test_a_blank_token_lets_no_http_caller_through(invoke: Invoke, ec2: Ec2World, headers: dict[str, str]) -> None:
    # Blank used to mean "no authentication": now it fails closed, and the schedule's log says why.
    ec2.set_state("stopped")
    response = invoke(http_event(headers=headers), AUTH_TOKEN="   ")
    assert response["statusCode"] == 401
    assert ec2.calls == []
    assert ec2.state() == "stopped"


def test_no_environment_read_outside_config() -> None:
    """Settings.from_env reads the environment once (Config.read every variable but AUTH_TOKEN, AuthToken.from_env
    that one); nothing else looks."""
    import ast
    import inspect

    readers: dict[str, set[str]] = {}

    class Finder(ast.NodeVisitor):
        def __init__(self) -> None:
            self.where = ["<module>"]

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            self.where.append(node.name)
            self.generic_visit(node)
            self.where.pop()

        def visit_Attribute(self, node: ast.Attribute) -> None:
            self._seen(node)
            self.generic_visit(node)

        def visit_Name(self, node: ast.Name) -> None:
            self._seen(node)

        def _seen(self, node: ast.expr) -> None:
            name = ast.unparse(node)
            if name in ("os.environ", "os.getenv", "os.putenv", "environ", "getenv", "putenv"):
                readers.setdefault(self.where[-1], set()).add(name)

    for module in (bo.handler, *FUNCTION_MODULES):  # the handler file and every module of the package
        Finder().visit(ast.parse(inspect.getsource(module)))
    assert readers == {
        "<module>": {"os.environ"},  # INIT hands it to warm_clients, once
        "warm_clients": {"environ"},  # passes it to Config.from_env
        "lambda_handler": {"os.environ"},  # hands it over, once
        "handle": {"environ"},  # passes it on
        "respond": {"environ"},  # passes it to Settings.from_env: the one read, for every action and preflight
        "from_env": {"environ"},  # Settings', Config's and AuthToken's
        "read": {"environ"},  # Config's: every variable, and every bad one
    }


# --- Hostile values: every one is a config_error naming its variable, never an internal_error -----------------
@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        # The zone is a directory of the time zone database: ZoneInfo raised IsADirectoryError.
        pytest.param("KEEP_WARM", "Mon-Fri 08:00-18:00 Europe", "not an IANA time zone", id="zone-a-directory"),
        pytest.param("KEEP_WARM", f"Mon 08:00-18:00 {'A' * 300}", "not an IANA time zone", id="zone-name-too-long"),
        pytest.param("KEEP_WARM", "Mon- 08:00-18:00", "not a list of days", id="day-range-without-end"),
        pytest.param("KEEP_WARM", "Mon \uff10\uff18:00-18:00", "not a window", id="non-ascii-digits"),
        # urlsplit raised ValueError for these three.
        pytest.param("BACKEND_BASE_URL", "http://[abc]/", "not an http(s) base URL", id="url-bracket-not-ipv6"),
        pytest.param("BACKEND_BASE_URL", "http://[1.2.3]:80", "not an http(s) base URL", id="url-bracket-ipv4ish"),
        pytest.param("BACKEND_BASE_URL", "http://[::1", "not an http(s) base URL", id="url-bracket-unclosed"),
        # The IDNA codec refuses these at every lookup, which read as "timed out" after 0 s.
        pytest.param("BACKEND_BASE_URL", "http://a..b/", "not a valid DNS name", id="url-empty-label"),
        pytest.param("BACKEND_BASE_URL", f"http://{'a' * 64}.internal/", "not a valid DNS name", id="url-long-label"),
        pytest.param("IDLE_NETWORK_KB_PER_5MIN", "lots", "number of KB", id="network-limit-in-kb"),
        pytest.param("AWS_REGION", "us east 1", "not an AWS region", id="region-with-spaces"),
        pytest.param("MAX_HOLD_HOURS", "1e308", "more than 9999 hours", id="max-hold-out-of-range"),
        pytest.param("STUCK_BUSY_SECONDS", "-5", "0 turns it off", id="stuck-busy-negative"),
    ],
)
def test_a_value_no_parser_expected_is_a_config_error_naming_the_variable(
    invoke: Invoke, ec2: Ec2World, variable: str, value: str, says: str
) -> None:
    for event in ({"action": "check_idle"}, {"action": "start"}):
        body = invoke(event, **{variable: value})
        assert body["error"]["code"] == "config_error", body
        assert variable in body["error"]["message"]
        assert says in body["error"]["message"]
    assert ec2.calls == []


def test_a_broken_url_with_a_password_never_shows_the_password(invoke: Invoke, ec2: Ec2World) -> None:
    body = invoke({"action": "check_idle"}, BACKEND_BASE_URL="http://admin:hunter2@[abc]/")
    assert body["error"]["code"] == "config_error"
    assert "hunter2" not in str(body)


def test_an_anonymous_caller_gets_401_whatever_the_configuration_holds(invoke: Invoke, ec2: Ec2World) -> None:
    broken = {
        "AUTH_TOKEN": "s3cret-token-1234",
        "KEEP_WARM": "Mon 08:00-18:00 Europe",
        "BACKEND_BASE_URL": "http://[::1",
    }
    assert invoke(http_event(), **broken)["statusCode"] == 401
    # A lone surrogate in the header (a direct invocation can carry one) is a wrong token, not a UnicodeEncodeError.
    response = invoke(http_event(headers={"authorization": "Bearer \ud800"}), **broken)
    assert response["statusCode"] == 401
    assert ec2.calls == []


# Any text, lone surrogates included (what os.environ makes of bytes that are not UTF-8), and the
# characters the grammars split on.
HOSTILE_TEXT = st.text(
    st.one_of(st.characters(), st.sampled_from(["\ud800", "\udcff", "/", "[", "]", ":", "@", ".", "-", ";", " "])),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(variable=st.sampled_from(sorted(bo.VARIABLES)), value=HOSTILE_TEXT)
def test_no_value_of_any_variable_raises_anything_but_a_config_error(variable: str, value: str) -> None:
    with contextlib.suppress(bo.ConfigError):
        bo.Config.from_env({"INSTANCE_ID": "i-0abc123def4567890", variable: value})
    with contextlib.suppress(bo.ConfigError):
        bo.Settings.from_env({"INSTANCE_ID": "i-0abc123def4567890", "AUTH_TOKEN": value}).required()


@settings(max_examples=100, deadline=None)
@given(zone=HOSTILE_TEXT.filter(lambda text: text.strip() and not any(c.isspace() for c in text)))
def test_no_time_zone_name_raises_anything_but_a_config_error(zone: str) -> None:
    with contextlib.suppress(bo.ConfigError):
        bo.Config.from_env({"INSTANCE_ID": "i-0abc123def4567890", "KEEP_WARM": f"Mon 08:00-18:00 {zone}"})
