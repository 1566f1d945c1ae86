"""Where the action comes from, and every bad input answered clearly with nothing changed."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import JSON, Ec2World, Invoke, body_of, http_event, load_event


@pytest.mark.parametrize(
    ("event_name", "action", "is_http"),
    [
        pytest.param("function_url_start", "start", True, id="function-url-json"),
        pytest.param("function_url_start_base64", "start", True, id="function-url-base64"),
        pytest.param("function_url_empty_body", "start", True, id="function-url-empty-body-means-start"),
        pytest.param("function_url_get_status", "status", True, id="function-url-get-status"),
        pytest.param("apigateway_rest_start", "start", True, id="api-gateway-rest"),
        pytest.param("direct_start", "start", False, id="direct"),
        pytest.param("eventbridge_constant_input", "check_idle", False, id="eventbridge-constant-input"),
        pytest.param("eventbridge_scheduled_event", "check_idle", False, id="rule-without-input-is-check-idle"),
        pytest.param("scheduler_scheduled_event", "check_idle", False, id="scheduler-without-input-is-check-idle"),
    ],
)
def test_each_documented_event_runs_its_action(
    invoke: Invoke, ec2: Ec2World, event_name: str, action: str, is_http: bool
) -> None:
    ec2.set_state("stopped")
    response = invoke(load_event(event_name))
    assert ("statusCode" in response) is is_http
    body = body_of(response)
    assert body["ok"] is True, body
    assert body["action"] == action
    assert body["instance_id"] == ec2.instance_id
    if is_http:
        assert response["headers"]["Content-Type"] == "application/json"


def test_direct_event_without_action_means_start(invoke: Invoke, ec2: Ec2World) -> None:
    ec2.set_state("stopped")
    body = invoke({})
    assert (body["action"], body["previous_state"]) == ("start", "stopped")
    assert ec2.state() in ("pending", "running")  # moto moves on to running at once


def test_schedule_without_input_warns_to_set_the_input(invoke: Invoke, ec2: Ec2World, log_lines) -> None:
    ec2.set_state("stopped")
    body = invoke(load_event("eventbridge_scheduled_event"))
    assert body["decision"] == "skip"
    assert ec2.mutations() == []  # a schedule can never start the backend
    log = log_lines()[0]
    assert log["level"] == "WARNING"
    assert log["source"] == "schedule"
    assert '{"action": "check_idle"}' in log["warnings"][0]


BIG = '{"action": "start", "pad": "' + "x" * 17_000 + '"}'
DEEP = '{"action": "start", "pad": ' + "[" * 8000 + "]" * 8000 + "}"  # 16,028 bytes: under the size limit


@pytest.mark.parametrize(
    ("event", "status", "code"),
    [
        # HTTP bodies
        pytest.param(http_event(body="{not json"), 400, "malformed_json", id="malformed-json"),
        pytest.param(http_event(body="not base64!", base64=True), 400, "invalid_base64", id="invalid-base64"),
        pytest.param(
            http_event(body=base64.b64encode(b"\xff\xfe").decode(), base64=True), 400, "malformed_json", id="not-utf8"
        ),
        pytest.param(http_event(body='["start"]'), 400, "invalid_body", id="body-is-a-list"),
        pytest.param(http_event(body='"start"'), 400, "invalid_body", id="body-is-a-string"),
        pytest.param(http_event(body='{"action": "reboot"}'), 400, "unknown_action", id="unknown-action"),
        pytest.param(http_event(body='{"action": 1}'), 400, "invalid_action", id="action-is-a-number"),
        pytest.param(http_event(body='{"action": null}'), 400, "invalid_action", id="action-is-null"),
        pytest.param(http_event(body='{"action": "Start"}'), 400, "unknown_action", id="actions-are-case-sensitive"),
        pytest.param(http_event(body=BIG), 413, "payload_too_large", id="body-over-16-KiB"),
        pytest.param(http_event(body=DEEP), 400, "malformed_json", id="nested-too-deep-within-16-KiB"),
        pytest.param(
            http_event(body='{"action": "status", "action": "start"}'), 400, "malformed_json", id="repeated-key"
        ),
        # HTTP actions and methods
        pytest.param(http_event(body='{"action": "stop"}'), 403, "action_not_allowed", id="stop-over-http"),
        pytest.param(http_event(body='{"action": "check_idle"}'), 403, "action_not_allowed", id="check-idle-over-http"),
        pytest.param(http_event("DELETE"), 405, "method_not_allowed", id="delete"),
        pytest.param(http_event("PUT", '{"action": "start"}'), 405, "method_not_allowed", id="put"),
        pytest.param(
            {**http_event("GET"), "queryStringParameters": {"action": "start"}},
            405,
            "method_not_allowed",
            id="get-start",
        ),
        # direct and scheduled events
        pytest.param({"action": "reboot"}, 400, "unknown_action", id="direct-unknown-action"),
        pytest.param({"action": ["start"]}, 400, "invalid_action", id="direct-action-is-a-list"),
        pytest.param(["start"], 400, "invalid_event", id="event-is-a-list"),
        pytest.param("check_idle", 400, "invalid_event", id="event-is-a-string"),
        pytest.param(None, 400, "invalid_event", id="event-is-null"),
        pytest.param(
            {"detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2", "detail": {}},
            400,
            "unsupported_event",
            id="other-eventbridge-event",
        ),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    invoke: Invoke, ec2: Ec2World, event: object, status: int, code: str
) -> None:
    ec2.set_state("stopped")
    response = invoke(event)
    body = body_of(response)
    if "statusCode" in response:
        assert response["statusCode"] == status
    assert body["ok"] is False
    assert body["error"]["code"] == code
    assert len(body["error"]["message"]) > 20  # a sentence, not a bare code
    assert ec2.calls == []  # not even a Describe
    assert ec2.state() == "stopped"


def test_405_names_the_allowed_methods(invoke: Invoke, ec2: Ec2World) -> None:
    response = invoke(http_event("PATCH"))
    assert response["headers"]["Allow"] == "GET, POST"


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        pytest.param({}, "no header", id="missing"),
        pytest.param({"authorization": "Bearer wrong-token-value"}, "wrong token", id="wrong"),
        pytest.param({"authorization": "Basic czNjcmV0LXRva2VuLTEyMzQ="}, "wrong scheme", id="basic"),
        pytest.param({"authorization": "s3cret-token-1234"}, "no scheme", id="no-scheme"),
    ],
)
def test_wrong_or_missing_token_is_401_and_touches_nothing(
    invoke: Invoke, ec2: Ec2World, log_lines, headers: dict[str, str], why: str
) -> None:
    ec2.set_state("stopped")
    response = invoke(http_event(body='{"action": "start"}', headers=headers), AUTH_TOKEN="s3cret-token-1234")
    assert response["statusCode"] == 401, why
    assert response["headers"]["WWW-Authenticate"] == "Bearer"
    assert body_of(response)["error"]["code"] == "unauthorized"
    assert body_of(response)["instance_id"] is None  # an anonymous caller learns nothing about the instance
    lines = log_lines()
    assert lines[0]["instance_id"] == ec2.instance_id  # the private log still names it
    assert ec2.calls == []
    assert "s3cret-token-1234" not in str(response) + str(lines)


def test_right_token_in_any_header_case_is_accepted(invoke: Invoke, ec2: Ec2World, log_lines) -> None:
    ec2.set_state("stopped")
    event = load_event("apigateway_rest_start")  # REST APIs keep the client's header case
    event["headers"]["Authorization"] = "bearer s3cret-token-1234"
    response = invoke(event, AUTH_TOKEN="s3cret-token-1234")
    assert response["statusCode"] == 202
    assert ec2.state() in ("pending", "running")
    assert "s3cret-token-1234" not in str(response) + str(log_lines())


def test_a_caller_iam_verified_needs_no_token_and_its_signature_is_neither_read_nor_logged(
    invoke: Invoke, ec2: Ec2World, log_lines
) -> None:
    # Behind an AWS_IAM Function URL, Lambda checks the SigV4 signature and puts the caller in
    # requestContext.authorizer.iam; the Authorization header then holds the signature, not a bearer token.
    ec2.set_state("stopped")
    event = load_event("function_url_start_iam")
    response = invoke(event, AUTH_TOKEN="s3cret-token-1234")
    assert response["statusCode"] == 202, body_of(response)
    assert ec2.state() in ("pending", "running")
    [line, _] = log_lines()
    assert line["caller"] == "arn:aws:sts::123456789012:assumed-role/pyelli-app-task/1f3c"  # who woke it
    signature = event["headers"]["authorization"]
    assert signature.split("Signature=")[1] not in str(response) + str(line)
    assert "AWS4-HMAC-SHA256" not in str(line)


@pytest.mark.parametrize(
    "authorizer",
    [
        pytest.param(None, id="no-authorizer"),
        pytest.param({}, id="empty-authorizer"),
        pytest.param({"iam": {}}, id="empty-iam"),
        pytest.param({"iam": "arn:aws:iam::123456789012:root"}, id="iam-not-an-object"),
        pytest.param({"jwt": {"claims": {"sub": "x"}}}, id="another-authorizer"),
    ],
)
def test_the_same_signed_event_without_an_iam_caller_still_needs_the_token(
    invoke: Invoke, ec2: Ec2World, log_lines, authorizer: object
) -> None:
    ec2.set_state("stopped")
    event = load_event("function_url_start_iam")
    if authorizer is None:
        del event["requestContext"]["authorizer"]
    else:
        event["requestContext"]["authorizer"] = authorizer
    response = invoke(event, AUTH_TOKEN="s3cret-token-1234")
    assert (response["statusCode"], body_of(response)["error"]["code"]) == (401, "unauthorized")
    assert ec2.calls == []
    assert "AWS4-HMAC-SHA256" not in str(response) + str(log_lines())


def test_a_rest_api_event_cannot_claim_an_iam_caller(invoke: Invoke, ec2: Ec2World) -> None:
    # Only payload 2.0 carries requestContext.authorizer.iam: a REST API (1.0) event that holds one needs the token.
    event = load_event("apigateway_rest_start")
    event["requestContext"]["authorizer"] = {"iam": {"userArn": "arn:aws:iam::123456789012:user/mallory"}}
    assert invoke(event, AUTH_TOKEN="s3cret-token-1234")["statusCode"] == 401


def test_direct_invocation_needs_no_token(invoke: Invoke, ec2: Ec2World) -> None:
    ec2.set_state("stopped")
    assert invoke({"action": "start"}, AUTH_TOKEN="s3cret-token-1234")["ok"] is True


@pytest.mark.parametrize(
    "event",
    [
        pytest.param({"requestContext": {"http": "not-a-dict"}, "body": 5}, id="odd-request-context"),
        pytest.param({"httpMethod": None, "headers": None, "body": None}, id="rest-with-nulls"),
        pytest.param({"requestContext": {"http": {}}, "headers": {"authorization": 5}}, id="no-method"),
        pytest.param(12.5, id="number"),
    ],
)
def test_no_event_whatsoever_raises(invoke: Invoke, ec2: Ec2World, event: object) -> None:
    response = invoke(event)
    body = body_of(response)
    assert body["ok"] is False
    assert body["error"]["code"] in ("invalid_event", "unsupported_event", "method_not_allowed"), body
    assert response.get("statusCode", 400) in (400, 405)
    assert ec2.mutations() == []


SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "action": JSON | st.sampled_from(["start", "status", "check_idle", "stop"]),
        "requestContext": JSON | st.fixed_dictionaries({"http": st.fixed_dictionaries({}, optional={"method": JSON})}),
        "httpMethod": JSON,
        "headers": JSON,
        "body": JSON,
        "isBase64Encoded": JSON,
        "queryStringParameters": JSON,
        "detail-type": JSON | st.just("Scheduled Event"),
        "source": JSON,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=JSON | SHAPED)
def test_no_exception_escapes_for_any_event(invoke: Invoke, ec2: Ec2World, event: object) -> None:
    response = invoke(event, DRY_RUN="true")
    assert isinstance(response, dict)
    body = body_of(response)
    assert isinstance(body["ok"], bool)
    if not body["ok"]:
        assert body["error"]["code"] != "internal_error", body
    if "statusCode" in response:
        assert response["statusCode"] in {200, 202, 400, 401, 403, 405, 409, 413, 500, 502, 503}
