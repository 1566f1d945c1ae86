"""What an invocation asks, apart from acting on it: a Function URL or API Gateway event (payload 2.0 or the REST
API's 1.0) becomes an HttpRequest, a direct, EventBridge or Scheduler event an EventRequest; an event of no known
shape, or a body that cannot say what it wants, is a 4xx that says what to send.

  https://docs.aws.amazon.com/lambda/latest/dg/urls-invocation.html#urls-payloads
  https://docs.aws.amazon.com/apigateway/latest/developerguide/http-api-develop-integrations-lambda.html
  https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-run-lambda-schedule.html
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, TypeVar

from orchestrator.errors import (
    ForbiddenError,
    InvalidActionError,
    InvalidBase64Error,
    InvalidBodyError,
    InvalidEventError,
    MalformedJsonError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    UnknownActionError,
    UnsupportedEventError,
)
from orchestrator.values import json_type, short, strict_json
from orchestrator.words import HTTP_ACTIONS, Action, Source

MAX_BODY_BYTES: Final = 16 * 1024  # an HTTP event's body
T = TypeVar("T")


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
            f"The event is a JSON {json_type(event)}, not an object. "
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
            f"The HTTP event's {name} is a JSON {json_type(value)}, which AWS never sends: "
            "invoke through the Function URL or API Gateway."
        )
    return value


def is_http(event: object) -> bool:
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
        raise InvalidBodyError(f'The body is a JSON {json_type(payload)}, not an object. Send {{"action": "start"}}.')
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
        raise InvalidActionError(f"The action must be a string, one of {known}; got a JSON {json_type(value)}.")
    try:
        return Action(value)
    except ValueError:
        raise UnknownActionError(f"Unknown action {short(value)}: use one of {known}.") from None
