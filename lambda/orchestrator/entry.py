"""The entry point: classify the event, authorise the caller, read the settings, dispatch the action (one match over
every action), publish its notices, render the answer, and write its one log line and one metrics line. It is the
only place that catches broad exceptions: a bug is logged with its traceback and answered 500, so that no exception
escapes (an async invocation that raises is retried twice for nothing)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from orchestrator.actions import Run, hold, release, start, status, stop
from orchestrator.aws import publish
from orchestrator.budget import Clock, Deadline, shortest_timeout
from orchestrator.errors import AwsError, OrchestratorError, OutOfTimeError, TimeoutTooShortError
from orchestrator.events import EventRequest, HttpRequest, http_action, is_http, parse_event
from orchestrator.group import fleet_of
from orchestrator.idle import check_idle
from orchestrator.logs import LOG, emit_metrics, log_invocation
from orchestrator.preflight import preflight
from orchestrator.present import Answer, present
from orchestrator.settings import Config, Settings
from orchestrator.values import some
from orchestrator.words import Action, Source


def act(action: Action, settings: Settings, deadline: Deadline, fields: Mapping[str, Any]) -> Answer:
    """Run the action, present what it did, and publish its notices to NOTIFY_TOPIC_ARN. Preflight reads the settings
    as they are (it lists every bad variable); every other action needs a valid configuration."""
    prepared = partial(_run, action, settings, deadline, fields)
    match action:
        case Action.PREFLIGHT:
            return preflight(settings, deadline, fields)
        case Action.START:
            done = start(prepared())
        case Action.STATUS:
            done = status(prepared())
        case Action.CHECK_IDLE:
            done = check_idle(prepared())
        case Action.STOP:
            done = stop(prepared())
        case Action.HOLD:
            done = hold(prepared())
        case Action.RELEASE:
            done = release(prepared())
    config = settings.required()
    answer = present(done, config, deadline.clock.now())
    warnings, topic = list(answer.warnings), config.notify_topic_arn
    for notice in answer.notices:
        try:
            if topic:
                publish(topic, notice, deadline)
        except (AwsError, OutOfTimeError) as error:  # a notice changes neither the decision nor the answer
            warnings.append(f"The notification was not published: {error.message}")
    return answer._replace(warnings=tuple(warnings))


def _run(action: Action, settings: Settings, deadline: Deadline, fields: Mapping[str, Any]) -> Run:
    """What an action takes: a valid configuration, and a timeout that holds one attempt of each call it needs."""
    config = _configured(settings)
    shortest = shortest_timeout(action, config)
    if deadline.whole < shortest:  # not one attempt of each call would fit: no retry can succeed
        raise TimeoutTooShortError(action, deadline.whole, shortest)
    return Run(config, deadline, fleet_of(config, deadline), fields)


def _configured(settings: Settings) -> Config:
    """The configuration, or what is wrong with it (told only to a caller the token admitted); its LOG_LEVEL set."""
    config = settings.required()
    LOG.setLevel(config.log_level)
    return config


@dataclass(frozen=True)
class Response:
    """One invocation, answered: what it asked, as far as it was understood, and what came of it."""

    answer: Answer
    over_http: bool  # a Function URL or API Gateway event: answered as one
    source: Source | None = None
    action: Action | None = None
    config: Config | None = None  # Settings.valid; for preflight, the configuration of the good variables
    authorized: bool = False  # may see the instance ID: an HTTP caller without the token may not
    bug: Exception | None = None
    caller: str | None = None  # who IAM verified, behind an AWS_IAM Function URL


def respond(event: object, environ: Mapping[str, str], deadline: Deadline) -> Response:
    """Classify, authorise, configure and act; every failure becomes a Response that says what to fix."""
    over_http = is_http(event)  # the one look at the event's shape: it also decides how the answer is rendered
    source, action, settings, authorized, caller = None, None, None, False, None
    try:
        request = parse_event(event, over_http)
        source = Source.HTTP if isinstance(request, HttpRequest) else request.source
        caller = request.iam_caller if isinstance(request, HttpRequest) else None
        settings = Settings.from_env(environ)
        if isinstance(request, HttpRequest) and request.iam_caller is None:  # IAM checked its signature instead
            settings.token.admit(request.authorization)
        authorized = True  # direct and scheduled invocations need no token
        if isinstance(request, HttpRequest):
            _configured(settings)  # what is wrong with it, before what the body asks is read
            action = http_action(request)
        else:
            action = request.action
        answer = act(action, settings, deadline, request.fields if isinstance(request, EventRequest) else {})
        if isinstance(request, EventRequest) and request.warning:
            answer = answer._replace(warnings=(request.warning, *answer.warnings))
    except OrchestratorError as error:
        valid = settings and settings.valid
        return Response(_failure(error), over_http, source, action, valid, authorized, caller=caller)
    except Exception as bug:  # noqa: BLE001 - the one broad catch: a bug is logged with its traceback, answered 500
        failure = _failure(OrchestratorError("Unexpected error: the function's log has the traceback."))
        return Response(failure, over_http, source, action, settings and settings.valid, authorized, bug, caller)
    config = settings.config if action is Action.PREFLIGHT else settings.valid  # preflight names what it can
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
    warnings = (*answer.warnings, *some(deadline.warning))
    instance_id, group = (
        (config.instance_id or None, config.auto_scaling_group_name or None) if config else (None, None)
    )
    named = {"instance_id": instance_id, **({"auto_scaling_group_name": group} if group else {})}
    hidden = dict.fromkeys(named) if not response.authorized else named  # an HTTP caller without the token: nothing
    body = {"ok": answer.status_code < 400, "action": response.action, **hidden, **answer.fields}
    logged = {"source": response.source, "caller": response.caller, **body, **named}  # the log names them
    logged |= {"status_code": answer.status_code, "warnings": list(warnings) or None}
    logged |= {"aws_request_id": getattr(context, "aws_request_id", None)}
    log_invocation(
        {**logged, "duration_ms": round((clock.monotonic() - started) * 1000, 1)}, answer.level, response.bug
    )
    requested = {f"{response.action.title().replace('_', '')}Requested": 1} if response.action else {}
    namespace = config.metrics_namespace if config else Config.metrics_namespace
    emit_metrics(namespace, config.target if config else None, {**requested, **answer.metrics}, clock.now())
    return render(response, body)
