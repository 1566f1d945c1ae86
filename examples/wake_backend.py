"""The app's side: wake the backend through the orchestrator's Function URL, then wait until healthy.

Copy this file into the Streamlit app or import it. It needs `requests`, and `botocore` for
Function URLs with auth type AWS_IAM (the ECS task role then needs lambda:InvokeFunctionUrl).

    import streamlit as st
    from wake_backend import WakeError, request_start, wake_backend

    if "prewarmed" not in st.session_state:  # once per browser session: boot while the user chooses
        st.session_state.prewarmed = True
        try:
            request_start(os.environ["BACKEND_START_LAMBDA_URL"], auth="aws_iam")
        except WakeError:
            pass  # wake_backend() tries again when the work is submitted

    with st.status("Waking the backend...") as box:
        wake_backend(
            os.environ["BACKEND_START_LAMBDA_URL"], BACKEND_URL, auth="aws_iam",
            on_progress=lambda p: box.update(label=p.message),
        )
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import requests

Auth = Literal["none", "aws_iam"]
Phase = Literal["checking", "starting", "booting", "healthy"]
POLL_SECONDS = 1.0  # /health while the instance boots: a steady second, so the wait ends within one of healthy
STATUS_EVERY_SECONDS = 10.0  # ask the orchestrator whether the instance is still up, while /health fails
HEALTH_TIMEOUT = (1.0, 2.0)  # (connect, read): a stopped instance's address drops packets, so connect is short
RETRY_AFTER_DEFAULT_SECONDS = 10.0
RETRY_AFTER_BOUNDS = (1.0, 60.0)
STOPPED_STATES = ("stopping", "stopped")


class WakeError(Exception):
    """The backend could not be woken; the message says why and what to do. Every failure is one."""


class WakeAuthError(WakeError):
    """401 or 403, or no credentials to sign with: the token or the IAM permission is wrong; retrying will not help."""


class WakeServerError(WakeError):
    """The orchestrator failed or could not be reached; its error code and message are included. Safe to retry later."""


class WakeTimeout(WakeError):
    """The backend was not healthy by the deadline."""


class WakeHeldError(WakeError):
    """An operator holds the backend stopped until `hold["until"]` (and says why in `hold["reason"]`): retrying
    before then is pointless, so the wait ends at once."""

    def __init__(self, message: str, hold: dict[str, Any]) -> None:
        super().__init__(message)
        self.hold = hold


@dataclass(frozen=True)
class Progress:
    """What the wait is doing now, for st.status or st.progress."""

    phase: Phase
    message: str
    elapsed_seconds: float
    fraction: float  # 0..1 of the deadline used; 1.0 when healthy


@dataclass(frozen=True)
class StartAnswer:
    """The orchestrator's answer to one start: 202 starting, 200 already up, 503 not yet (see retry_after)."""

    status_code: int
    state: str | None
    previous_state: str | None
    error_code: str | None = None  # still_stopping or insufficient_capacity with a 503
    retry_after: float | None = None


def request_start(
    function_url: str,
    *,
    auth: Auth = "none",
    token: str | None = None,
    region: str | None = None,
    session: requests.Session | None = None,
) -> StartAnswer:
    """POST start once and return the orchestrator's answer at once, without waiting for the backend.

    For pre-warming: call it when a user opens the page, so that the instance boots while they choose
    what to run; wake_backend() later finds it healthy or booting. A page view then starts the instance,
    which runs (and costs) until check_idle stops it. Raises a WakeError subclass if the orchestrator
    cannot be reached or refuses (401/403, or an error other than a 503 that says when to retry).
    """
    orchestrator = _Orchestrator(function_url, auth, token, region, requests.Session() if session is None else session)
    return orchestrator.start()


def backend_status(
    function_url: str,
    *,
    auth: Auth = "none",
    token: str | None = None,
    region: str | None = None,
    session: requests.Session | None = None,
) -> dict[str, Any] | None:
    """The orchestrator's status answer (state, backend health, hold), or None when it cannot say right now.
    Raises WakeAuthError when the call is refused (401/403)."""
    orchestrator = _Orchestrator(function_url, auth, token, region, requests.Session() if session is None else session)
    return orchestrator.status()


def wake_backend(
    function_url: str,
    backend_url: str,
    *,
    auth: Auth = "none",
    token: str | None = None,
    region: str | None = None,
    health_path: str = "/health",
    deadline_seconds: float = 300.0,
    on_progress: Callable[[Progress], None] | None = None,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    poll_seconds: float = POLL_SECONDS,
    status_every_seconds: float = STATUS_EVERY_SECONDS,
) -> float:
    """Make sure the backend is up; return the seconds it took. Raises a WakeError subclass, and nothing else.

    A healthy backend costs one GET and no call to the orchestrator. Otherwise: POST start (again after
    Retry-After while the instance is still stopping or AWS has no capacity), then GET the health
    endpoint every `poll_seconds` until it answers 2xx. Every `status_every_seconds` while it does not,
    ask the orchestrator for the instance's state, and start it again if it was stopped meanwhile.
    """
    http = requests.Session() if session is None else session
    health_url = backend_url.rstrip("/") + health_path
    if urlsplit(health_url).scheme not in ("http", "https"):
        raise WakeError(f"backend_url={backend_url!r} is not an http(s) URL, e.g. http://10.0.1.50:8000.")
    wait = _Wait(sleep, monotonic, on_progress, monotonic() + deadline_seconds, deadline_seconds)
    orchestrator = _Orchestrator(function_url, auth, token, region, http)
    wait.report("checking", "Checking whether the backend is up")
    if not _healthy(http, health_url):
        wait.start(orchestrator, "Asking the orchestrator to start the backend")
        next_poll = monotonic()
        next_status = next_poll + status_every_seconds
        while not _healthy(http, health_url):
            if wait.left() <= 0:
                raise WakeTimeout(
                    f"The backend at {health_url} was not healthy after {deadline_seconds:g}s. It may still be "
                    "booting: call again, or check the backend's service and the orchestrator's status action."
                )
            if monotonic() >= next_status:
                next_status = monotonic() + status_every_seconds
                if orchestrator.state() in STOPPED_STATES:
                    wait.start(orchestrator, "The backend was stopped while waking; starting it again")
            wait.report("booting", f"Waiting for the backend to answer {health_path}")
            next_poll += poll_seconds  # a steady cadence: a slow poll shortens the next sleep
            sleep(max(0.0, min(next_poll - monotonic(), wait.left())))
    wait.report("healthy", "Backend is up")
    return deadline_seconds - wait.left()


@dataclass
class _Wait:
    sleep: Callable[[float], None]
    monotonic: Callable[[], float]
    on_progress: Callable[[Progress], None] | None
    deadline: float
    deadline_seconds: float

    def left(self) -> float:
        return max(0.0, self.deadline - self.monotonic())

    def report(self, phase: Phase, message: str) -> None:
        if self.on_progress:
            elapsed = self.deadline_seconds - self.left()
            fraction = 1.0 if phase == "healthy" else min(elapsed / self.deadline_seconds, 0.99)
            self.on_progress(Progress(phase, message, round(elapsed, 1), fraction))

    def start(self, orchestrator: _Orchestrator, message: str) -> None:
        """POST start; after a 503 (still stopping, no capacity) wait Retry-After and POST again, until the deadline."""
        self.report("starting", message)
        while (answer := orchestrator.start()).retry_after is not None:
            if self.left() <= answer.retry_after:
                raise WakeServerError(f"{_why_not_yet(answer)} The deadline came first: call again in a while.")
            self.report("starting", f"{_why_not_yet(answer)} Trying again in {answer.retry_after:g}s")
            self.sleep(answer.retry_after)


@dataclass
class _Orchestrator:
    """The orchestrator's Function URL: start and status, signed or with a token."""

    function_url: str
    auth: Auth
    token: str | None
    region: str | None
    http: requests.Session

    def start(self) -> StartAnswer:
        response = self._post({"action": "start"})
        body = _json_object(response)
        error = _error(body)
        if response.status_code in (200, 202, 503):
            return StartAnswer(
                response.status_code,
                _text(body.get("state")),
                _text(body.get("previous_state")),
                _text(error.get("code")),
                _retry_after(response) if response.status_code == 503 else None,
            )
        raise self._failure(response, error)

    def status(self) -> dict[str, Any] | None:
        """The status answer; None if the orchestrator cannot tell right now. A refusal (401/403) raises."""
        try:
            response = self._post({"action": "status"})
        except WakeServerError:
            return None  # the health polls go on; the next status call may get through
        if response.status_code in (401, 403):
            raise self._failure(response, _error(_json_object(response)))
        return _json_object(response) if response.status_code == 200 else None

    def state(self) -> str | None:
        """The instance's state as the orchestrator sees it; None if it cannot tell right now."""
        status = self.status()
        return None if status is None else _text(status.get("state"))

    def _post(self, payload: dict[str, str]) -> requests.Response:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.auth == "aws_iam":  # signed afresh for each call: a SigV4 signature is valid for five minutes
            headers.update(_sigv4_headers(self.function_url, body, headers, self.region))
        try:
            return self.http.post(self.function_url, data=body, headers=headers, timeout=(5, 70))
        except requests.RequestException as error:
            raise WakeServerError(f"The orchestrator at {self.function_url} could not be reached: {error}") from error

    def _failure(self, response: requests.Response, error: dict[str, Any]) -> WakeError:
        detail = f", {error.get('code')}: {error.get('message')}" if error else ""
        hold = _json_object(response).get("hold")
        if response.status_code == 409 and error.get("code") == "held_stopped" and isinstance(hold, dict):
            reason = f": {hold.get('reason')}" if hold.get("reason") else ""
            return WakeHeldError(f"The backend is held stopped until {hold.get('until')}{reason}.", hold)
        if response.status_code in (401, 403):
            return WakeAuthError(
                f"The orchestrator refused the call ({response.status_code}{detail}). Check the token, "
                "or the task role's lambda:InvokeFunctionUrl and lambda:InvokeFunction permissions."
            )
        if response.status_code >= 500:
            return WakeServerError(f"The orchestrator failed ({response.status_code}{detail}).")
        return WakeError(f"The orchestrator answered {response.status_code}{detail}.")


def _why_not_yet(answer: StartAnswer) -> str:
    if answer.error_code == "insufficient_capacity":
        return "AWS has no capacity for the backend's instance type in its zone right now."
    if answer.error_code == "still_stopping":
        return "The instance is still stopping; it can start once it has stopped."
    return f"The orchestrator cannot start the instance yet ({answer.error_code or 'HTTP 503'})."


def _retry_after(response: requests.Response) -> float:
    """Retry-After as seconds, whatever the header holds: seconds, an HTTP date, junk or nothing."""
    value = response.headers.get("Retry-After", "").strip()
    try:
        seconds = (
            float(value) if value.isdigit() else (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        )
    except (TypeError, ValueError, IndexError, OverflowError):  # parsedate_to_datetime's failures vary by version
        seconds = RETRY_AFTER_DEFAULT_SECONDS
    low, high = RETRY_AFTER_BOUNDS
    return min(max(seconds, low), high)


def _json_object(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error(body: dict[str, Any]) -> dict[str, Any]:
    error = body.get("error")
    return error if isinstance(error, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _sigv4_headers(function_url: str, body: bytes, headers: dict[str, str], region: str | None) -> dict[str, str]:
    """Sign exactly the bytes sent, for a Function URL with auth type AWS_IAM."""
    try:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.session import Session
    except ImportError as error:
        raise WakeAuthError("auth='aws_iam' needs botocore: pip install botocore (or boto3).") from error

    credentials = Session().get_credentials()
    if credentials is None:
        raise WakeAuthError("No AWS credentials found to sign the call (AWS_IAM): give the ECS task a role.")
    # https://<url-id>.lambda-url.<region>.on.aws/
    region = region or function_url.rsplit(".lambda-url.", maxsplit=1)[-1].split(".", maxsplit=1)[0]
    request = AWSRequest(method="POST", url=function_url, data=body, headers=headers)
    SigV4Auth(credentials.get_frozen_credentials(), "lambda", region).add_auth(request)
    return dict(request.headers.items())


def _healthy(http: requests.Session, url: str) -> bool:
    try:
        response = http.get(url, timeout=HEALTH_TIMEOUT)
    except requests.RequestException:
        return False
    response.close()
    return response.ok
