"""The app's side: wake the backend through the orchestrator's Function URL, then wait until healthy.

Copy this file into the Streamlit app or import it. It needs `requests`, and `botocore` for
Function URLs with auth type AWS_IAM (the ECS task role then needs lambda:InvokeFunctionUrl).

    import streamlit as st
    from wake_backend import wake_backend

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
from typing import Literal

import requests

START_BODY = json.dumps({"action": "start"}).encode()


class WakeError(Exception):
    """The backend could not be woken; the message says why and what to do."""


class WakeAuthError(WakeError):
    """401 or 403: the token or the IAM permission is wrong; retrying will not help."""


class WakeServerError(WakeError):
    """The orchestrator failed (5xx); its error code and message are included. Safe to retry later."""


class WakeTimeout(WakeError):
    """The backend was not healthy by the deadline."""


@dataclass(frozen=True)
class Progress:
    """What the wait is doing now, for st.status or st.progress."""

    phase: Literal["checking", "starting", "booting", "healthy"]
    message: str
    elapsed_seconds: float
    fraction: float  # 0..1 of the deadline used; 1.0 when healthy


def wake_backend(
    function_url: str,
    backend_url: str,
    *,
    auth: Literal["none", "aws_iam"] = "none",
    token: str | None = None,
    region: str | None = None,
    health_path: str = "/health",
    deadline_seconds: float = 300.0,
    on_progress: Callable[[Progress], None] | None = None,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> float:
    """Make sure the backend is up; return the seconds it took. Raises a WakeError subclass.

    A healthy backend costs one GET and no call to the orchestrator. Otherwise: POST start (again
    after Retry-After while the instance is still stopping), then poll the health endpoint with
    backoff (1 s, growing to 10 s) until it answers 2xx or the deadline passes.
    """
    wake = _Wake(requests.Session() if session is None else session, sleep, monotonic, on_progress,
                 monotonic() + deadline_seconds, deadline_seconds)  # fmt: skip
    health_url = backend_url.rstrip("/") + health_path
    wake.report("checking", "Checking whether the backend is up")
    if not _healthy(wake.http, health_url):
        wake.request_start(function_url, lambda: _headers(function_url, auth, token, region))
        delay = 1.0
        while not _healthy(wake.http, health_url):
            if wake.left() <= 0:
                raise WakeTimeout(
                    f"The backend at {health_url} was not healthy after {deadline_seconds:g}s. It may still be "
                    "booting: call again, or check the backend's service and the orchestrator's status action."
                )
            wake.report("booting", f"Waiting for the backend to answer {health_path}")
            sleep(min(delay, wake.left()))
            delay = min(delay * 1.5, 10.0)
    wake.report("healthy", "Backend is up")
    return deadline_seconds - wake.left()


@dataclass
class _Wake:
    http: requests.Session
    sleep: Callable[[float], None]
    monotonic: Callable[[], float]
    on_progress: Callable[[Progress], None] | None
    deadline: float
    deadline_seconds: float

    def left(self) -> float:
        return max(0.0, self.deadline - self.monotonic())

    def report(self, phase: Literal["checking", "starting", "booting", "healthy"], message: str) -> None:
        if self.on_progress:
            elapsed = self.deadline_seconds - self.left()
            fraction = 1.0 if phase == "healthy" else min(elapsed / self.deadline_seconds, 0.99)
            self.on_progress(Progress(phase, message, round(elapsed, 1), fraction))

    def request_start(self, function_url: str, headers: Callable[[], dict[str, str]]) -> None:
        """POST start; on 503 (still stopping) wait Retry-After and POST again, until the deadline."""
        while True:
            self.report("starting", "Asking the orchestrator to start the backend")
            try:
                # Signed afresh for each attempt: a SigV4 signature is only valid for five minutes.
                response = self.http.post(function_url, data=START_BODY, headers=headers(), timeout=(5, 70))
            except requests.RequestException as error:
                raise WakeServerError(f"The orchestrator at {function_url} could not be reached: {error}") from error
            if response.status_code in (200, 202):
                return
            detail = _error_detail(response)
            if response.status_code in (401, 403):
                raise WakeAuthError(
                    f"The orchestrator refused the call ({response.status_code}{detail}). Check the token, "
                    "or the task role's lambda:InvokeFunctionUrl permission."
                )
            wait = float(response.headers.get("Retry-After", "10"))
            if response.status_code == 503 and self.left() > wait:
                self.report("starting", f"The instance is still stopping; trying again in {wait:g}s")
                self.sleep(wait)
                continue
            if response.status_code >= 500:
                raise WakeServerError(f"The orchestrator failed ({response.status_code}{detail}).")
            raise WakeError(f"The orchestrator answered {response.status_code}{detail}.")


def _headers(function_url: str, auth: str, token: str | None, region: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if auth == "aws_iam":
        headers.update(_sigv4_headers(function_url, headers, region))
    return headers


def _sigv4_headers(function_url: str, headers: dict[str, str], region: str | None) -> dict[str, str]:
    """Sign exactly the bytes sent, for a Function URL with auth type AWS_IAM."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.session import Session

    credentials = Session().get_credentials()
    if credentials is None:
        raise WakeAuthError("No AWS credentials found to sign the call (AWS_IAM): give the ECS task a role.")
    # https://<url-id>.lambda-url.<region>.on.aws/
    region = region or function_url.rsplit(".lambda-url.", maxsplit=1)[-1].split(".", maxsplit=1)[0]
    request = AWSRequest(method="POST", url=function_url, data=START_BODY, headers=headers)
    SigV4Auth(credentials.get_frozen_credentials(), "lambda", region).add_auth(request)
    return dict(request.headers.items())


def _error_detail(response: requests.Response) -> str:
    try:
        error = response.json()["error"]
        return f", {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return ""


def _healthy(http: requests.Session, url: str) -> bool:
    try:
        return http.get(url, timeout=(2, 5)).ok
    except requests.RequestException:
        return False
