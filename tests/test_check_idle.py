"""check_idle: never stop a working backend, never leave an idle one running."""

from __future__ import annotations

import json
from datetime import timedelta, timezone
from typing import Any

import pytest

from tests import function as bo
from tests.helpers import ACTIVITY_PATH as ACTIVITY
from tests.helpers import CHECK, Answer, Ec2World, FakeClock, Invoke, ScriptedBackend, ec2_error, refused_port

HOUR = 3600


# --- The state table -----------------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["stopped", "pending", "stopping", "shutting-down", "terminated"])
def test_not_running_is_skip_with_one_call_and_no_http(
    invoke: Invoke, ec2: Ec2World, backend: ScriptedBackend, state: str
) -> None:
    ec2.set_state(state)
    body = invoke(CHECK)
    assert (body["decision"], body["state"]) == ("skip", state)
    assert ec2.calls == ["DescribeInstances"]
    assert len(backend.calls) == 0


def test_running_and_idle_past_timeout_stops_with_exactly_two_ec2_calls_and_one_get(
    invoke: Invoke, long_running: Ec2World, backend: ScriptedBackend
) -> None:
    backend.answer(ACTIVITY, Answer.json({"idle_seconds": 1200}))
    body = invoke(CHECK)
    assert body["decision"] == "stop", body
    assert body["idle_seconds"] == 1200
    assert long_running.calls == ["DescribeInstances", "StopInstances"]
    assert len(backend.calls) == 1
    assert long_running.state() == "stopped"


def test_running_and_recently_active_keeps_with_one_call_and_one_get(
    invoke: Invoke, long_running: Ec2World, backend: ScriptedBackend
) -> None:
    backend.answer(ACTIVITY, Answer.json({"idle_seconds": 120}))
    body = invoke(CHECK)
    assert body["decision"] == "keep"
    assert "120s" in body["reason"]
    assert long_running.calls == ["DescribeInstances"]
    assert len(backend.calls) == 1
    assert long_running.state() == "running"


def test_a_freshly_started_instance_gets_a_full_timeout(
    invoke: Invoke, ec2: Ec2World, backend: ScriptedBackend, clock: FakeClock
) -> None:
    # The backend remembers activity from before the last stop; the real LaunchTime (set on
    # start by the fixture, as EC2 does and moto does not) wins.
    ec2.set_state("stopped")
    assert invoke({"action": "start"})["ok"]
    clock.advance(60)
    backend.answer(ACTIVITY, Answer.json({"idle_seconds": 5 * HOUR}))
    body = invoke(CHECK)
    assert body["decision"] == "keep"
    assert body["idle_seconds"] == pytest.approx(60, abs=1)  # EC2 reports LaunchTime in whole seconds
    assert ec2.state() == "running"
    clock.advance(900)
    assert invoke(CHECK)["decision"] == "stop"
    assert ec2.state() == "stopped"


def test_the_timeout_is_configurable(invoke: Invoke, long_running: Ec2World, backend: ScriptedBackend) -> None:
    backend.answer(ACTIVITY, Answer.json({"idle_seconds": 120}))
    assert invoke(CHECK, IDLE_TIMEOUT_SECONDS="60")["decision"] == "stop"


def test_paths_are_configurable(invoke: Invoke, long_running: Ec2World, backend: ScriptedBackend) -> None:
    backend.answer("/custom/idle", Answer.json({"idle_seconds": 2000}))
    assert invoke(CHECK, LAST_ACTIVITY_PATH="/custom/idle", BACKEND_BASE_URL=backend.url + "/")["decision"] == "stop"


def test_dry_run_says_would_stop_and_stops_nothing(
    invoke: Invoke, long_running: Ec2World, backend: ScriptedBackend
) -> None:
    backend.answer(ACTIVITY, Answer.json({"idle_seconds": 2000}))
    body = invoke(CHECK, DRY_RUN="true")
    assert (body["decision"], body["dry_run"]) == ("would_stop", True)
    assert long_running.mutations() == []
    assert long_running.state() == "running"


def test_hibernate_is_passed_to_ec2(invoke: Invoke, long_running: Ec2World, backend: ScriptedBackend) -> None:
    seen: list[Any] = []
    long_running.on_function_calls(
        "provide-client-params.ec2.StopInstances", lambda params, **_: seen.append(params.get("Hibernate"))
    )
    backend.answer(ACTIVITY, Answer.json({"idle_seconds": 2000}))
    assert invoke(CHECK, STOP_HIBERNATE="yes")["decision"] == "stop"
    assert seen == [True]


def test_hibernation_refused_falls_back_to_a_plain_stop_with_a_warning(
    invoke: Invoke, long_running: Ec2World, backend: ScriptedBackend, log_lines: Any
) -> None:
    # moto hibernates anything; real EC2 answers UnsupportedHibernationConfiguration for an
    # instance launched without hibernation: inject that answer for Hibernate=True only.
    def refuse_hibernate(params: dict[str, Any], **_: Any) -> Any:
        if params["body"].get("Hibernate") == "true":
            return ec2_error("UnsupportedHibernationConfiguration", "The instance is not configured for hibernation.")
        return None

    long_running.on_function_calls("before-call.ec2.StopInstances", refuse_hibernate)
    backend.answer(ACTIVITY, Answer.json({"idle_seconds": 2000}))
    body = invoke(CHECK, STOP_HIBERNATE="true")
    assert body["decision"] == "stop"
    assert long_running.calls == ["DescribeInstances", "StopInstances", "StopInstances"]
    assert long_running.state() == "stopped"
    log = log_lines()[0]
    assert log["level"] == "WARNING"
    assert "hibernate" in log["warnings"][0]


def test_check_idle_without_backend_url_is_a_config_error_before_any_ec2_call(
    invoke: Invoke, long_running: Ec2World
) -> None:
    body = invoke(CHECK, BACKEND_BASE_URL="")
    assert body["error"]["code"] == "config_error"
    assert "BACKEND_BASE_URL" in body["error"]["message"]
    assert long_running.calls == []


# --- The activity contract -------------------------------------------------------------------------------
def ago(seconds: float, suffix: str = "Z") -> Any:
    """An ISO-8601 time `seconds` before the clock's now, in UTC with the given suffix."""
    return lambda clock: (clock.now() - timedelta(seconds=seconds)).replace(tzinfo=None).isoformat() + suffix


def epoch_ago(seconds: float, scale: int = 1) -> Any:
    return lambda clock: round((clock.now() - timedelta(seconds=seconds)).timestamp() * scale)


PLUS_TWO = timezone(timedelta(hours=2))


@pytest.mark.parametrize(
    ("payload", "decision", "idle"),
    [
        pytest.param({"idle_seconds": 1000}, "stop", 1000, id="idle-seconds"),
        pytest.param({"idle_seconds": 1000.5}, "stop", 1000.5, id="idle-seconds-float"),
        pytest.param({"idleSeconds": 1000}, "stop", 1000, id="alias-idleSeconds"),
        pytest.param({"seconds_since_last_activity": 1000}, "stop", 1000, id="alias-seconds-since"),
        pytest.param({"idle_seconds": 100}, "keep", 100, id="recent"),
        pytest.param({"idle_seconds": 0}, "keep", 0, id="just-now"),
        pytest.param({"idle_seconds": 900}, "keep", 900, id="exactly-the-timeout-keeps"),
        pytest.param({"last_activity": ago(1000)}, "stop", 1000, id="iso-Z"),
        pytest.param({"last_activity": ago(1000, "+00:00")}, "stop", 1000, id="iso-offset"),
        pytest.param({"last_activity": ago(1000, "")}, "stop", 1000, id="iso-naive-means-utc"),
        pytest.param(
            {"last_activity": lambda c: (c.now() - timedelta(seconds=100)).astimezone(PLUS_TWO).isoformat()},
            "keep",
            100,
            id="iso-plus-two-hours",
        ),
        pytest.param({"last_activity_at": ago(1000)}, "stop", 1000, id="alias-last-activity-at"),
        pytest.param({"lastActivity": ago(1000)}, "stop", 1000, id="alias-lastActivity"),
        pytest.param({"last_request_at": ago(100)}, "keep", 100, id="alias-last-request-at"),
        pytest.param({"last_activity": epoch_ago(1000)}, "stop", 1000, id="epoch-seconds"),
        pytest.param({"last_activity": epoch_ago(1000, 1000)}, "stop", 1000, id="epoch-milliseconds"),
        pytest.param({"last_activity": ago(-600)}, "keep", 0, id="future-is-idle-zero"),
        pytest.param({"idle_seconds": 5000, "busy": True}, "keep", 5000, id="busy"),
        pytest.param({"idle_seconds": 5000, "active_requests": 1}, "keep", 5000, id="active-requests"),
        pytest.param({"idle_seconds": 5000, "active_jobs": 2}, "keep", 5000, id="active-jobs"),
        pytest.param({"busy": True}, "keep", None, id="busy-without-idle-time"),
        pytest.param(
            {"idle_seconds": 5000, "busy": False, "active_requests": 0, "active_jobs": 0}, "stop", 5000, id="all-quiet"
        ),
        # Shapes outside the contract: keep; never stop on missing information.
        pytest.param({}, "keep", None, id="empty-object"),
        pytest.param({"status": "ok"}, "keep", None, id="unknown-shape"),
        pytest.param({"idle_seconds": -5}, "keep", None, id="negative"),
        pytest.param({"idle_seconds": "1000"}, "keep", None, id="string-number"),
        pytest.param({"idle_seconds": True}, "keep", None, id="boolean"),
        pytest.param({"idle_seconds": 5000, "busy": "no"}, "keep", None, id="busy-not-boolean"),
        pytest.param({"idle_seconds": 5000, "active_jobs": "2"}, "keep", None, id="jobs-not-number"),
        pytest.param({"last_activity": "yesterday"}, "keep", None, id="bad-timestamp"),
        pytest.param({"last_activity": None}, "keep", None, id="null-timestamp-is-absent"),
        # A null means absent, as it does for event fields: it never hides a valid idle time.
        pytest.param(
            {"idle_seconds": 1000, "busy": None, "active_jobs": None}, "stop", 1000, id="null-optional-fields"
        ),
        pytest.param({"idle_seconds": None, "last_activity": ago(1000)}, "stop", 1000, id="null-idle-seconds"),
        pytest.param([1000], "keep", None, id="list"),
        pytest.param(1000, "keep", None, id="number"),
    ],
)
def test_activity_contract(
    invoke: Invoke,
    long_running: Ec2World,
    backend: ScriptedBackend,
    clock: FakeClock,
    payload: Any,
    decision: str,
    idle: Any,
) -> None:
    if isinstance(payload, dict):
        payload = {key: value(clock) if callable(value) else value for key, value in payload.items()}
    backend.answer(ACTIVITY, Answer(body=json.dumps(payload).encode()))
    body = invoke(CHECK)
    assert body["decision"] == decision, body["reason"]
    assert body["idle_seconds"] == (None if idle is None else pytest.approx(idle, abs=0.5))
    assert long_running.state() == ("stopped" if decision == "stop" else "running")


@pytest.mark.parametrize(
    ("answer", "reason_has"),
    [
        pytest.param(Answer.json({"error": "boom"}, status=500), "HTTP 500", id="http-500"),
        pytest.param(Answer(404, b"not found"), "HTTP 404", id="http-404"),
        pytest.param(Answer(302, b"", {"Location": "/login"}), "HTTP 302", id="redirect-not-followed"),
        pytest.param(Answer(body=b"<html>Bad gateway</html>"), "not JSON", id="html"),
        pytest.param(Answer(body=b"x" * bo.MAX_ACTIVITY_BYTES), "more than 64 KiB", id="huge"),
        pytest.param(Answer(mode="silent"), "timed out after 0.5s", id="never-answers"),
        pytest.param(Answer(body=b"\xff\xfe{}"), "not JSON", id="not-utf8"),
    ],
)
def test_backend_failure_keeps_with_a_reason_and_an_error_log(
    invoke: Invoke, long_running: Ec2World, backend: ScriptedBackend, log_lines: Any, answer: Answer, reason_has: str
) -> None:
    backend.answer(ACTIVITY, answer)
    body = invoke(CHECK, HTTP_TIMEOUT_SECONDS="0.5")
    assert body["decision"] == "keep"
    assert reason_has in body["reason"]
    assert long_running.mutations() == []
    assert long_running.state() == "running"
    log, metrics = log_lines()
    assert log["level"] == "ERROR"
    assert metrics["BackendUnreachable"] == 1


def test_a_backend_that_is_down_is_kept(invoke: Invoke, long_running: Ec2World) -> None:
    body = invoke(CHECK, BACKEND_BASE_URL=f"http://127.0.0.1:{refused_port()}")
    assert body["decision"] == "keep"
    assert "ConnectionRefusedError" in body["reason"]
    assert long_running.mutations() == []


def test_the_request_is_one_plain_get_of_the_activity_path(
    invoke: Invoke, long_running: Ec2World, backend: ScriptedBackend
) -> None:
    backend.answer(ACTIVITY, Answer.json({"idle_seconds": 1}))
    invoke(CHECK)
    [call] = backend.calls
    assert (call.method, call.path, call.body) == ("GET", ACTIVITY, b"")
    assert call.headers["host"] == backend.url.removeprefix("http://")
    assert call.headers["accept"] == "application/json"
