"""Preflight: every check ok on a good setup, each one failing for its own reason, and nothing changed anywhere."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import function as bo
from tests.helpers import (
    ACTIVITY_PATH,
    REGION,
    Answer,
    Ec2World,
    FakeClock,
    FakeContext,
    Invoke,
    ScriptedBackend,
    act_as,
    body_of,
    ec2_error,
    http_event,
    refused_port,
    setup_client,
)

PREFLIGHT = {"action": "preflight"}
ROOT = Path(__file__).resolve().parent.parent


def statuses(body: dict[str, Any]) -> dict[str, str]:
    return {check["check"]: check["status"] for check in body["checks"]}


def check(body: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in body["checks"] if c["check"] == name]
    return found[0]


def put(clock: FakeClock, namespace: str, name: str, instance_id: str, minutes_ago: list[int], value: float) -> None:
    """Datapoints as CloudWatch holds them: EC2's own, or the function's EMF lines turned into metrics."""
    data = [
        {"MetricName": name, "Dimensions": [{"Name": "InstanceId", "Value": instance_id}], "Value": value,
         "Timestamp": clock.now() - timedelta(minutes=minutes)}
        for minutes in minutes_ago
    ]  # fmt: skip
    setup_client("cloudwatch").put_metric_data(Namespace=namespace, MetricData=data)


@pytest.fixture
def healthy(ec2: Ec2World, backend: ScriptedBackend, clock: FakeClock) -> Ec2World:
    """A good setup: a running instance with CPU data, a schedule that ran, a backend that answers the contract."""
    backend.answer("/health", Answer.json({"status": "ok"}))
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 140}))
    put(clock, "AWS/EC2", "CPUUtilization", ec2.instance_id, [50, 30, 10], 3.0)
    put(clock, "BackendOrchestrator", "CheckIdleRequested", ec2.instance_id, [13, 8, 3], 1.0)
    return ec2


def test_a_good_setup_is_all_ok_and_changes_nothing(
    invoke: Invoke, healthy: Ec2World, topic: tuple[str, Any], backend: ScriptedBackend
) -> None:
    topic_arn, received = topic
    body = invoke(
        {**PREFLIGHT, "notify": True}, NOTIFY_TOPIC_ARN=topic_arn, KEEP_WARM="Mon-Fri 08:00-18:00 Europe/Berlin"
    )
    assert body["ok"] is True
    assert set(statuses(body).values()) == {"ok", "skip"}, body
    assert [name for name, status in statuses(body).items() if status == "skip"] == ["drain"]
    assert list(statuses(body)) == list(bo.PREFLIGHT_CHECKS)
    assert check(body, "schedule")["detail"] == "the schedule ran 3 times in 15 minutes"
    assert check(body, "activity_contract")["detail"].endswith("idle for 140s")
    assert re.fullmatch(
        r"(open now .*, closes|closed now; .* opens) \w{3} [-0-9]+ [0-9:]+ Europe/Berlin",
        check(body, "keep_warm")["detail"],
    )
    # Nothing changed: DryRun for every write, the test message the only SNS message, no drain, no tag.
    assert healthy.calls == ["DescribeInstances", "StartInstances", "StopInstances", "CreateTags", "DeleteTags",
                             "GetMetricData", "GetMetricData", "Publish"]  # fmt: skip
    assert healthy.state() == "running"
    assert healthy.client.describe_tags()["Tags"] == []
    assert [message["MessageAttributes"]["decision"]["Value"] for message in received()] == ["test"]
    assert [call.path for call in backend.calls] == ["/health", ACTIVITY_PATH]


def test_without_notify_no_message_is_sent(invoke: Invoke, healthy: Ec2World, topic: tuple[str, Any]) -> None:
    topic_arn, received = topic
    body = invoke(PREFLIGHT, NOTIFY_TOPIC_ARN=topic_arn)
    assert check(body, "notifications")["status"] == "skip"
    assert '"notify": true' in check(body, "notifications")["detail"]
    assert received() == []
    assert "Publish" not in healthy.calls


@pytest.mark.parametrize(
    ("operation", "name", "iam_action"),
    [
        ("StartInstances", "start_permission", "ec2:StartInstances"),
        ("StopInstances", "stop_permission", "ec2:StopInstances"),
        ("DeleteTags", "tag_permission", "ec2:DeleteTags"),
    ],
)
def test_a_denied_write_fails_its_check_and_names_the_iam_action(
    invoke: Invoke, healthy: Ec2World, operation: str, name: str, iam_action: str
) -> None:
    # moto enforces no IAM here: inject EC2's answer to a DryRun the role may not make.
    healthy.on_function_calls(f"before-call.ec2.{operation}", lambda **_: ec2_error("UnauthorizedOperation", "no"))
    body = invoke(PREFLIGHT)
    assert body["ok"] is False
    failed = check(body, name)
    assert (failed["status"], iam_action in failed["fix"]) == ("fail", True)
    assert [n for n, status in statuses(body).items() if status == "fail"] == [name]  # the others still ran


@pytest.mark.parametrize(
    ("health", "activity", "name", "says"),
    [
        pytest.param(None, None, "backend_health", "could not be reached", id="down"),
        pytest.param(Answer(500), Answer.json({"idle_seconds": 1}), "backend_health", "answered HTTP 500", id="500"),
        pytest.param(Answer.json({}), Answer(500, b"oops"), "activity_contract", "answered HTTP 500", id="a-500"),
        pytest.param(
            Answer.json({}), Answer.json({"idle": "a while"}), "activity_contract", "no idle time", id="outside"
        ),
        pytest.param(
            Answer.json({}), Answer.json({"busy": "yes"}), "activity_contract", "'busy' is 'yes'", id="busy-text"
        ),
    ],
)
def test_a_backend_that_fails_the_contract_is_named(
    invoke: Invoke,
    healthy: Ec2World,
    backend: ScriptedBackend,
    health: Answer | None,
    activity: Answer | None,
    name: str,
    says: str,
) -> None:
    environ = {}
    if health is None:
        environ["BACKEND_BASE_URL"] = f"http://127.0.0.1:{refused_port()}"
    else:
        backend.answer("/health", health)
        backend.answer(ACTIVITY_PATH, activity or Answer.json({}))
    body = invoke(PREFLIGHT, **environ)
    failed = check(body, name)
    assert failed["status"] == "fail"
    assert says in failed["detail"]
    assert healthy.state() == "running"


def test_a_stopped_instance_skips_the_backend_checks(invoke: Invoke, healthy: Ec2World) -> None:
    healthy.set_state("stopped")
    body = invoke(PREFLIGHT)
    assert check(body, "backend_health")["status"] == check(body, "activity_contract")["status"] == "skip"
    assert "start it and run preflight again" in check(body, "backend_health")["detail"]
    assert healthy.state() == "stopped"


@pytest.mark.parametrize(
    ("minutes_ago", "status"), [pytest.param([], "warn", id="never-ran"), pytest.param([120, 60], "fail", id="stopped")]
)
def test_a_schedule_that_did_not_run_in_15_minutes_is_named(
    invoke: Invoke, ec2: Ec2World, clock: FakeClock, minutes_ago: list[int], status: str
) -> None:
    if minutes_ago:
        put(clock, "BackendOrchestrator", "CheckIdleRequested", ec2.instance_id, minutes_ago, 1.0)
    found = check(invoke(PREFLIGHT), "schedule")
    assert found["status"] == status
    assert "EventBridge rule is enabled" in found["fix"]


def test_hibernation_asked_of_an_instance_that_cannot_hibernate_fails(invoke: Invoke, healthy: Ec2World) -> None:
    found = check(invoke(PREFLIGHT, STOP_HIBERNATE="true"), "instance")
    assert found["status"] == "fail"
    assert "not configured to hibernate" in found["detail"]
    assert "STOP_HIBERNATE=false" in found["fix"]


def test_every_bad_variable_is_listed_and_the_token_never_shown(invoke: Invoke, healthy: Ec2World) -> None:
    token = "a-secret-token-0123456789"
    bad = {"IDLE_TIMEOUT_SECONDS": "soon", "KEEP_WARM": "Mon 08:00-18:00 Europe", "HEALTH_PATH": "health"}
    body = invoke(PREFLIGHT, AUTH_TOKEN=token, **bad)
    found = check(body, "config")
    assert found["status"] == "fail"
    assert all(name in found["detail"] for name in bad)
    assert token not in json.dumps(body)
    assert check(body, "instance")["status"] == "ok"  # the rest ran on the good variables


def test_without_an_instance_id_the_instance_checks_are_skipped(invoke: Invoke, healthy: Ec2World) -> None:
    body = invoke(PREFLIGHT, INSTANCE_ID="")
    assert statuses(body)["config"] == "fail"
    assert set(list(statuses(body).values())[1:]) == {"skip"}
    assert healthy.calls == []


def test_preflight_is_refused_over_http(invoke: Invoke, healthy: Ec2World) -> None:
    response = invoke(http_event(body='{"action": "preflight"}'))
    assert (response["statusCode"], body_of(response)["error"]["code"]) == (403, "action_not_allowed")


@pytest.mark.parametrize(
    ("seconds", "status", "said"),
    [
        pytest.param(60, "ok", "check_idle has whole first attempts", id="recommended"),
        pytest.param(20, "warn", "check_idle makes one attempt of each call, no retries", id="no-retries"),
        pytest.param(3, "warn", "start makes one attempt of each call", id="lambdas-default"),
        pytest.param(2, "fail", "check_idle cannot run (it needs 2.8 s)", id="too-short-to-decide"),
        pytest.param(0.4, "fail", "start cannot run (it needs 1 s)", id="too-short-for-anything"),
    ],
)
def test_the_timeout_says_what_each_action_can_do(
    healthy: Ec2World, env: dict[str, str], clock: FakeClock, seconds: float, status: str, said: str
) -> None:
    body = bo.handle(PREFLIGHT, FakeContext(clock, seconds), env, clock=clock.as_clock())
    timeout = check(body, "timeout")
    assert timeout["status"] == status
    assert said in timeout["detail"]
    if status != "ok":
        assert timeout["fix"] == f"raise the function's Timeout to {bo.RECOMMENDED_TIMEOUT_SECONDS} s"
    if seconds < 0.5:  # too short for one AWS call too: those checks answer skip, out of time, and the answer comes
        assert check(body, "instance")["status"] == "skip"
        assert "out of time" in check(body, "instance")["detail"]
    else:
        assert check(body, "instance")["status"] == "ok"


# --- As an IAM principal that holds iam-policy-example.json's actions (moto's IAM) -----------------------------
def example_actions() -> list[str]:
    """The example policy's actions, named as moto names them (CloudWatch is monitoring:*)."""
    policy = json.loads((ROOT / "iam-policy-example.json").read_text())
    actions = [a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
    return [action.replace("cloudwatch:", "monitoring:") for action in actions]


def as_principal(monkeypatch: pytest.MonkeyPatch, world: Ec2World, actions: list[str]) -> None:
    """From now on, calls are made by a user allowed these actions, and moto enforces IAM (helpers.act_as); the
    fixture's own client (its hooks mimic real EC2) acts as an administrator."""
    admin = act_as(monkeypatch, actions)
    monkeypatch.setattr(world, "client", admin.client("ec2"))


PERMISSION_CHECKS = {
    "ec2:DescribeInstances": "instance",
    "ec2:StartInstances": "start_permission",
    "ec2:StopInstances": "stop_permission",
    "ec2:CreateTags": "tag_permission",
    "ec2:DeleteTags": "tag_permission",
    "monitoring:GetMetricData": "metrics",
}


def test_as_the_example_policy_every_permission_check_is_ok(
    invoke: Invoke, healthy: Ec2World, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert set(PERMISSION_CHECKS) <= set(example_actions())
    as_principal(monkeypatch, healthy, example_actions())
    body = invoke(PREFLIGHT)
    assert {statuses(body)[name] for name in PERMISSION_CHECKS.values()} == {"ok"}, body


@pytest.mark.parametrize("removed", list(PERMISSION_CHECKS))
def test_without_one_action_of_the_example_policy_its_check_fails_and_names_it(
    invoke: Invoke, healthy: Ec2World, monkeypatch: pytest.MonkeyPatch, removed: str
) -> None:
    as_principal(monkeypatch, healthy, [action for action in example_actions() if action != removed])
    body = invoke(PREFLIGHT)
    failed = check(body, PERMISSION_CHECKS[removed])
    assert failed["status"] == "fail", body
    named = removed.replace("monitoring:", "cloudwatch:")  # the function names the IAM action a role needs
    assert named in (failed["fix"] or "") + failed["detail"]
    assert REGION  # the principal's calls went to the same moto region


def test_make_preflight_prints_each_check_and_the_fix_of_a_failure(invoke: Invoke, healthy: Ec2World) -> None:
    from tools.preflight import render

    table = render(invoke(PREFLIGHT, STOP_HIBERNATE="true"))
    assert table.splitlines()[0] == f"preflight of {healthy.instance_id}"
    assert re.search(r"^  FAIL  instance +running, t3.medium", table, flags=re.MULTILINE)
    assert "-> enable hibernation on the instance" in table
    assert table.endswith("some checks FAILED: fix them, then run make preflight again")
    assert len([line for line in table.splitlines() if re.match(r"  (ok  |WARN|FAIL|skip)  ", line)]) == 13


# --- Whatever is wrong, the table answers ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "says"),
    [
        pytest.param("", "BACKEND_BASE_URL is not set, so the backend cannot be asked", id="unset"),
        pytest.param(
            "ftp://10.0.1.50:8000", "BACKEND_BASE_URL='ftp://10.0.1.50:8000' is not an http(s) base URL", id="invalid"
        ),
        pytest.param("http://user:pw@10.0.1.50", "carries a user name or password", id="credentials"),
    ],
)
def test_a_bad_or_missing_backend_url_fails_the_backend_checks_with_its_reason_and_the_others_answer(
    ec2: Ec2World, env: dict[str, str], clock: FakeClock, url: str, says: str
) -> None:
    body = bo.handle(PREFLIGHT, FakeContext(clock), {**env, "BACKEND_BASE_URL": url}, clock=clock.as_clock())
    assert "error" not in body  # no 500: the table
    assert body["instance_id"] == ec2.instance_id  # named, although a setting is broken
    for name in ("backend_health", "activity_contract"):
        assert check(body, name)["status"] == "fail"
        assert says in check(body, name)["detail"]
        assert "set BACKEND_BASE_URL" in check(body, name)["fix"]
    assert (check(body, "instance")["status"], check(body, "start_permission")["status"]) == ("ok", "ok")
    assert statuses(body)["config"] == ("ok" if not url else "fail")  # unset is valid: only check_idle needs it
    assert "pw" not in json.dumps(body)


def test_a_dry_run_that_succeeds_is_a_failure_it_may_have_acted(
    invoke: Invoke, healthy: Ec2World, backend: ScriptedBackend
) -> None:
    # An endpoint that ignores DryRun (injected: moto honours it) answers StartInstances as if it had acted.
    from botocore.awsrequest import AWSResponse, HTTPHeaders

    def acted(params: dict[str, Any], **_: Any) -> Any:
        change = {"InstanceId": healthy.instance_id, "CurrentState": {"Name": "pending", "Code": 0},
                  "PreviousState": {"Name": "stopped", "Code": 80}}  # fmt: skip
        return AWSResponse("https://ec2.test/", 200, HTTPHeaders(), None), {"StartingInstances": [change]}

    healthy.on_function_calls("before-call.ec2.StartInstances", acted)
    body = invoke(PREFLIGHT)
    start = check(body, "start_permission")
    assert start["status"] == "fail"
    assert "did not honour DryRun, and it may have acted" in start["detail"]
    assert check(body, "stop_permission")["status"] == "ok"
    assert body["ok"] is False
