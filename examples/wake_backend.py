"""The app's side: wake the backend through the orchestrator's Function URL, then wait until healthy.

Copy this file into the Streamlit app or import it. It needs only the standard library, and botocore for
Function URLs with auth type AWS_IAM (the ECS task role then needs lambda:InvokeFunctionUrl and
lambda:InvokeFunction).

    import streamlit as st
    from wake_backend import WakeError, request_start, wake_backend

    if "prewarmed" not in st.session_state:  # once per browser session: boot while the user chooses
        st.session_state.prewarmed = True
        try:
            request_start(os.environ["BACKEND_START_LAMBDA_URL"], auth="aws_iam", deadline_seconds=10)
        except WakeError:
            pass  # wake_backend() tries again when the work is submitted

    with st.status("Waking the backend...") as box:
        wake_backend(
            os.environ["BACKEND_START_LAMBDA_URL"], BACKEND_URL, auth="aws_iam",
            on_progress=lambda p: box.update(label=p.message),
        )

Each call keeps its deadline as a total: the name lookup, connect, TLS, the request and every read of the answer
share the time left, so an orchestrator or a backend that hangs, or sends a byte a second, cannot hold the app past
it (requests cannot promise this: its timeouts apply to each socket operation, and a trickle never trips one).
Answers are read up to 64 KiB; redirects are not followed, so /health is healthy only when it answers 2xx itself;
proxies are not used (the Function URL and the backend are reached directly, as from an ECS task). Every failure is
a WakeError, whose message says what was waited for and what to do; no other exception leaves these functions.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cache
from typing import Any, Literal
from urllib.parse import urlsplit

Auth = Literal["none", "aws_iam"]
Phase = Literal["checking", "starting", "booting", "healthy"]
POLL_SECONDS = 1.0  # /health while the instance boots: a steady second, so the wait ends within one of healthy
STATUS_EVERY_SECONDS = 10.0  # ask the orchestrator whether the instance is still up, while /health fails
HEALTH_SECONDS = 2.0  # one /health probe at most: a stopped instance's address drops packets
START_SECONDS = 70.0  # one start at most: the orchestrator answers within its own timeout (60 s, the template's)
STATUS_SECONDS = 10.0  # one status call at most, during a wake (the health polls go on meanwhile)
MAX_ANSWER_BYTES = 64 * 1024
RETRY_AFTER_DEFAULT_SECONDS = 10.0
RETRY_AFTER_BOUNDS = (1.0, 60.0)
STOPPED_STATES = ("stopping", "stopped")


class WakeError(Exception):
    """The backend could not be woken; the message says why and what to do. Every failure is one."""


class WakeAuthError(WakeError):
    """401 or 403, or no credentials to sign with: the token or the IAM permission is wrong; retrying will not help."""


class WakeServerError(WakeError):
    """The orchestrator failed, could not be reached, or answered what it never sends. Safe to retry later."""


class WakeTimeout(WakeError):
    """The deadline came first: the backend was not healthy by then, or the orchestrator did not answer in time."""


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
    deadline_seconds: float = START_SECONDS,
) -> StartAnswer:
    """POST start once and return the orchestrator's answer, within `deadline_seconds`, without waiting for the
    backend. For pre-warming: call it when a user opens the page, so that the instance boots while they choose what
    to run; wake_backend() later finds it healthy or booting. A page view then starts the instance, which runs (and
    costs) until check_idle stops it. Raises WakeTimeout if the orchestrator does not answer in time, and another
    WakeError if it cannot be reached or refuses (401/403, or an error other than a 503 that says when to retry)."""
    return _Orchestrator(function_url, auth, token, region).start(deadline_seconds)


def backend_status(
    function_url: str,
    *,
    auth: Auth = "none",
    token: str | None = None,
    region: str | None = None,
    deadline_seconds: float = STATUS_SECONDS,
) -> dict[str, Any] | None:
    """The orchestrator's status answer (state, backend health, hold) within `deadline_seconds`, or None when it
    cannot say by then. Raises WakeAuthError when the call is refused (401/403)."""
    return _Orchestrator(function_url, auth, token, region).status(deadline_seconds)


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
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    poll_seconds: float = POLL_SECONDS,
    status_every_seconds: float = STATUS_EVERY_SECONDS,
) -> float:
    """Make sure the backend is up within `deadline_seconds`; return the seconds it took. Raises a WakeError
    subclass, and nothing else.

    A healthy backend costs one GET and no call to the orchestrator. Otherwise: POST start (again after
    Retry-After while the instance is still stopping or AWS has no capacity), then GET the health endpoint every
    `poll_seconds` until it answers 2xx. Every `status_every_seconds` while it does not, ask the orchestrator for
    the instance's state, and start it again if it was stopped meanwhile. Every call gets only what is left.
    """
    health_url = backend_url.rstrip("/") + health_path
    if urlsplit(health_url).scheme not in ("http", "https"):
        raise WakeError(f"backend_url={backend_url!r} is not an http(s) URL, e.g. http://10.0.1.50:8000.")
    wait = _Wait(sleep, monotonic, on_progress, monotonic() + deadline_seconds, deadline_seconds)
    orchestrator = _Orchestrator(function_url, auth, token, region)
    wait.report("checking", "Checking whether the backend is up")
    if not _healthy(health_url, wait.left()):
        wait.start(orchestrator, "Asking the orchestrator to start the backend")
        next_poll = monotonic()
        next_status = next_poll + status_every_seconds
        while not _healthy(health_url, wait.left()):
            if wait.left() <= 0:
                raise WakeTimeout(
                    f"The backend at {health_url} was not healthy after {deadline_seconds:g}s. It may still be "
                    "booting: call again, or check the backend's service and the orchestrator's status action."
                )
            if monotonic() >= next_status:
                next_status = monotonic() + status_every_seconds
                status = orchestrator.status(min(STATUS_SECONDS, wait.left()))
                if status is not None and status.get("state") in STOPPED_STATES:
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
        while (answer := orchestrator.start(min(START_SECONDS, self.left()))).retry_after is not None:
            if self.left() <= answer.retry_after:
                raise WakeServerError(f"{_why_not_yet(answer)} The deadline came first: call again in a while.")
            self.report("starting", f"{_why_not_yet(answer)} Trying again in {answer.retry_after:g}s")
            self.sleep(answer.retry_after)


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


@dataclass(frozen=True)
class _Orchestrator:
    """The orchestrator's Function URL: start and status, signed or with a token."""

    function_url: str
    auth: Auth
    token: str | None
    region: str | None

    def start(self, seconds: float) -> StartAnswer:
        answer = self._post("start", seconds)
        if answer.status in (200, 202, 503):
            body = _json_object(answer, strict=answer.status != 503)
            return StartAnswer(
                answer.status,
                _text(body.get("state")),
                _text(body.get("previous_state")),
                _text(_error(body).get("code")),
                _retry_after(answer) if answer.status == 503 else None,
            )
        raise self._failure(answer)

    def status(self, seconds: float) -> dict[str, Any] | None:
        """The status answer; None if the orchestrator cannot tell by then. A refusal (401/403) raises."""
        try:
            answer = self._post("status", seconds)
            if answer.status in (401, 403):
                raise self._failure(answer)
            return _json_object(answer, strict=True) if answer.status == 200 else None
        except (WakeServerError, WakeTimeout):
            return None  # the health polls go on; the next status call may get through

    def _post(self, action: str, seconds: float) -> _Answer:
        body = json.dumps({"action": action}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.auth == "aws_iam":  # signed afresh for each call: a SigV4 signature is valid for five minutes
            headers.update(_sigv4_headers(self.function_url, body, headers, self.region))
        try:
            return _exchange("POST", self.function_url, seconds, body, headers)
        except TimeoutError:
            raise WakeTimeout(
                f"The orchestrator at {self.function_url} did not answer {action} within {seconds:.1f}s "
                "(the time the call had left): call again, or check the function's log."
            ) from None
        except (OSError, http.client.HTTPException, _TooLargeError) as error:
            raise WakeServerError(
                f"The orchestrator at {self.function_url} could not be reached or read ({_named(error)})."
            ) from None

    def _failure(self, answer: _Answer) -> WakeError:
        body = _json_object(answer, strict=False)
        error = _error(body)
        detail = f", {error.get('code')}: {error.get('message')}" if error else ""
        hold = body.get("hold")
        if answer.status == 409 and error.get("code") == "held_stopped" and isinstance(hold, dict):
            reason = f": {hold.get('reason')}" if hold.get("reason") else ""
            return WakeHeldError(f"The backend is held stopped until {hold.get('until')}{reason}.", hold)
        if answer.status in (401, 403):
            return WakeAuthError(
                f"The orchestrator refused the call ({answer.status}{detail}). Check the token, "
                "or the task role's lambda:InvokeFunctionUrl and lambda:InvokeFunction permissions."
            )
        if answer.status >= 500:
            return WakeServerError(f"The orchestrator failed ({answer.status}{detail}).")
        return WakeError(f"The orchestrator answered {answer.status}{detail}.")


def _why_not_yet(answer: StartAnswer) -> str:
    if answer.error_code == "insufficient_capacity":
        return "AWS has no capacity for the backend's instance type in its zone right now."
    if answer.error_code == "still_stopping":
        return "The instance is still stopping; it can start once it has stopped."
    return f"The orchestrator cannot start the instance yet ({answer.error_code or 'HTTP 503'})."


def _retry_after(answer: _Answer) -> float:
    """Retry-After as seconds, whatever the header holds: seconds, an HTTP date, junk or nothing."""
    value = (answer.headers.get("Retry-After") or "").strip()
    try:
        seconds = (
            float(value) if value.isdigit() else (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        )
    except (TypeError, ValueError, IndexError, OverflowError):  # parsedate_to_datetime's failures vary by version
        seconds = RETRY_AFTER_DEFAULT_SECONDS
    low, high = RETRY_AFTER_BOUNDS
    return min(max(seconds, low), high)


def _json_object(answer: _Answer, *, strict: bool) -> dict[str, Any]:
    """The answer's JSON object. What is not one (not JSON, nested too deep, not an object) is a WakeServerError
    where the body must say what happened (`strict`), and an empty object where the status says enough."""
    try:
        body = json.loads(answer.body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        body = None
    if isinstance(body, dict):
        return body
    if strict:
        shown = answer.body[:60].decode("utf-8", "replace")
        raise WakeServerError(
            f"The orchestrator answered HTTP {answer.status} with a body that is not its JSON (a proxy's page?): "
            f"{shown!r}. Check what stands between the app and the Function URL."
        )
    return {}


def _error(body: dict[str, Any]) -> dict[str, Any]:
    error = body.get("error")
    return error if isinstance(error, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _named(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


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


def _healthy(url: str, seconds: float) -> bool:
    """Whether GET `url` answers 2xx itself (a redirect is not healthy) within HEALTH_SECONDS and `seconds`."""
    try:
        return 200 <= _exchange("GET", url, min(HEALTH_SECONDS, seconds), status_only=True).status < 300
    except (OSError, http.client.HTTPException, _TooLargeError):  # TimeoutError is an OSError
        return False


# --- One HTTP exchange that ends by its deadline, whatever the server does ---------------------------------------
class _TooLargeError(Exception):
    """The server sent more than MAX_ANSWER_BYTES."""

    def __init__(self) -> None:
        super().__init__(f"the answer is longer than {MAX_ANSWER_BYTES // 1024} KiB")


def _exchange(
    method: str,
    url: str,
    seconds: float,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    status_only: bool = False,
) -> _Answer:
    """One HTTP/1.1 request that ends within `seconds`: DNS, connect, TLS, the send and every read share them,
    and at most MAX_ANSWER_BYTES are read. TimeoutError when the time is up."""
    ends_at = time.monotonic() + seconds
    parts = urlsplit(url)
    https = parts.scheme == "https"
    sock = _connect(parts.hostname or "", parts.port or (443 if https else 80), https, ends_at)
    try:
        stream = _DeadlineStream(sock, ends_at, MAX_ANSWER_BYTES + 8192)  # the answer and its headers
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items() if name.lower() != "host"]
        lines += [f"Content-Length: {len(body)}"] if method != "GET" else []
        stream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        response = http.client.HTTPResponse(stream, method=method)  # type: ignore[arg-type]
        response.begin()
        if status_only:
            return _Answer(response.status, response.msg, b"")
        if response.length is not None and response.length > MAX_ANSWER_BYTES:
            raise _TooLargeError
        data = response.read(MAX_ANSWER_BYTES + 1)
        if len(data) > MAX_ANSWER_BYTES:
            raise _TooLargeError
        return _Answer(response.status, response.msg, data)
    finally:
        sock.close()


class _DeadlineStream(io.RawIOBase):
    """A socket whose every send and receive ends by one deadline, and that yields at most `limit` bytes."""

    def __init__(self, sock: socket.socket, ends_at: float, limit: int) -> None:
        super().__init__()
        self._sock, self._ends_at, self._left = sock, ends_at, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise _TooLargeError
        self._sock.settimeout(_seconds_left(self._ends_at))
        received = self._sock.recv_into(buffer, min(len(buffer), self._left))
        self._left -= received
        return received

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_seconds_left(self._ends_at))  # sendall's timeout is its total since Python 3.5
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(self)


def _connect(host: str, port: int, https: bool, ends_at: float) -> socket.socket:
    """DNS (on a worker thread: getaddrinfo takes no timeout), TCP and TLS, all before `ends_at`."""
    found: list[Any] = []
    lookup = threading.Thread(target=lambda: found.append(_addresses(host, port)), daemon=True)
    lookup.start()
    lookup.join(_seconds_left(ends_at))
    if not found:
        raise TimeoutError(f"looking up {host} took all the time left")
    if isinstance(found[0], OSError):
        raise found[0]
    failure: OSError = ConnectionError(f"no address found for {host}")
    for family, kind, protocol, _, address in found[0]:
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(_seconds_left(ends_at))
            sock.connect(address)
            if https:  # the socket's timeout bounds the whole handshake: give it only what is left
                sock.settimeout(_seconds_left(ends_at))
                sock = _tls().wrap_socket(sock, server_hostname=host)
            return sock
        except OSError as error:
            sock.close()
            failure = error
    raise failure


def _addresses(host: str, port: int) -> list[Any] | OSError:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:  # UnicodeError: a name the IDNA codec refuses
        return error if isinstance(error, OSError) else socket.gaierror(f"{host!r} is not a valid host name")


@cache
def _tls() -> ssl.SSLContext:
    """The system's certificate authorities, or certifi's where it is installed (as requests would use)."""
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def _seconds_left(ends_at: float) -> float:
    left = ends_at - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left
