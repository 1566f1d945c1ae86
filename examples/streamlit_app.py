"""A heavy-work page shaped like the PyElli app's: it wakes the backend when a person submits work.

Configured by environment only, as the app's ECS task sets it; read once per server process:
    BACKEND_START_LAMBDA_URL   the orchestrator's Function URL
    BACKEND_URL                the backend, as the app reaches it (e.g. http://10.0.1.50:8000)
    BACKEND_AUTH               none (default) or aws_iam (SigV4 with the task role)
    BACKEND_TOKEN              the orchestrator's bearer token, with auth none and AUTH_TOKEN set
    AWS_REGION                 the function's region, with aws_iam
    BACKEND_PREWARM            true (default): start the instance once per browser session, when the page opens
    BACKEND_WAKE_DEADLINE_SECONDS  how long a wake may take before the page gives up (default 300)
    BACKEND_EXPECTED_WAKE_SECONDS  how long a cold wake usually takes, shown while waiting (default 45; the page
                                   then learns it from the wakes it sees)

Run it: streamlit run examples/streamlit_app.py (or `make app`, against the local sandbox).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import requests
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # in an app: import wake_backend where you copy it
from examples.wake_backend import (
    Auth,
    Progress,
    WakeAuthError,
    WakeError,
    WakeHeldError,
    WakeServerError,
    WakeTimeout,
    backend_status,
    request_start,
    wake_backend,
)

LINES_SHOWN = 3  # the wake's last few messages stay readable inside its box
PHASES = {"checking": "checking", "starting": "starting", "booting": "booting", "healthy": "up"}


class Settings(NamedTuple):
    orchestrator: dict[str, Any]  # function_url, auth, token, region: what the client's calls take
    backend_url: str
    deadline_seconds: float
    expected_seconds: float
    prewarm: bool


@st.cache_resource
def settings() -> Settings | str:
    """The page's settings, read once per server process, or what is wrong with them in one sentence."""
    environ = os.environ
    missing = [name for name in ("BACKEND_START_LAMBDA_URL", "BACKEND_URL") if not environ.get(name)]
    if missing:
        return f"Set {' and '.join(missing)} in the app's environment: the page cannot reach the backend without it."
    seconds = {}
    for name, default in (("BACKEND_WAKE_DEADLINE_SECONDS", "300"), ("BACKEND_EXPECTED_WAKE_SECONDS", "45")):
        raw = environ.get(name, "").strip() or default
        try:
            seconds[name] = float(raw)
        except ValueError:
            seconds[name] = math.nan
        if not (seconds[name] > 0 and math.isfinite(seconds[name])):
            return f"{name}={raw!r} is not a number of seconds above 0: set it to e.g. {default}."
    auth: Auth = "aws_iam" if environ.get("BACKEND_AUTH", "none") == "aws_iam" else "none"
    token, region = environ.get("BACKEND_TOKEN") or None, environ.get("AWS_REGION") or None
    orchestrator = {"function_url": environ["BACKEND_START_LAMBDA_URL"], "auth": auth, "token": token, "region": region}
    prewarm = environ.get("BACKEND_PREWARM", "true") == "true"
    return Settings(orchestrator, environ["BACKEND_URL"], seconds["BACKEND_WAKE_DEADLINE_SECONDS"],
                    seconds["BACKEND_EXPECTED_WAKE_SECONDS"], prewarm)  # fmt: skip


@st.cache_resource
def wakes_seen() -> list[float]:
    """How long the cold wakes this server process saw took: the next one is expected to take as long."""
    return []


def sentence(error: WakeError) -> str:
    """What the person reads, and can act on, for each way a wake fails."""
    if isinstance(error, WakeHeldError):
        reason = f" ({error.hold['reason']})" if error.hold.get("reason") else ""
        return f"The backend is under maintenance until {error.hold.get('until')}{reason}. Try again after that."
    if isinstance(error, WakeAuthError):
        return (
            "This app may not wake the backend. DevOps must grant the app's task role lambda:InvokeFunctionUrl "
            f"and lambda:InvokeFunction on the orchestrator, or set its token. ({error})"
        )
    if isinstance(error, WakeTimeout):
        return f"The backend did not come up in time. It may still be starting: try again in a minute. ({error})"
    if isinstance(error, WakeServerError):
        return f"The backend cannot be started right now: try again in a minute. ({error})"
    return f"The backend could not be woken: {error}"


def state_line(status: dict[str, Any] | None) -> str:
    if status is None:
        return "Backend: unknown (the orchestrator did not answer)"
    hold = status.get("hold")
    if isinstance(hold, dict):
        why = f": {hold['reason']}" if hold.get("reason") else ""
        return f"Backend: held {hold.get('state')} until {hold.get('until')}{why}"
    state, backend = status.get("state"), status.get("backend")
    if state == "running":
        healthy = isinstance(backend, dict) and backend.get("healthy") is True
        return "Backend: running and healthy" if healthy else "Backend: starting"
    return {"pending": "Backend: starting", "stopping": "Backend: stopping"}.get(str(state), f"Backend: {state}")


def show_state(line: DeltaGenerator, config: Settings) -> None:
    try:
        line.caption(state_line(backend_status(**config.orchestrator, deadline_seconds=5)))
    except WakeAuthError:
        line.caption("Backend: unknown (this app may not ask the orchestrator)")


def wake(config: Settings, line: DeltaGenerator) -> str | None:
    """Wake the backend inside one status box: a bar with the seconds elapsed and the usual boot time, and the last
    few messages under it. Returns what went wrong, in one sentence, or None."""
    seen = wakes_seen()
    expected = seen[-1] if seen else config.expected_seconds
    with st.status("Waking the backend", expanded=True) as box:
        bar, lines = box.progress(0.0, text="checking"), box.empty()
        said: list[str] = []
        phases: set[str] = set()

        def progress(update: Progress) -> None:
            phases.add(update.phase)
            elapsed = update.elapsed_seconds
            usual = f"of about {expected:.0f} s" if elapsed <= expected else f"(it usually takes {expected:.0f} s)"
            done = 1.0 if update.phase == "healthy" else min(elapsed / expected, 0.99)
            bar.progress(done, text=f"{PHASES[update.phase]}, {elapsed:.0f} s {usual}")
            if not said or said[-1] != update.message:
                said.append(update.message)
                lines.markdown("\n".join(f"- {message}" for message in said[-LINES_SHOWN:]))
            if update.phase == "starting":  # the state shown above is no longer "stopped"
                line.caption("Backend: starting")

        try:
            took = wake_backend(
                **config.orchestrator, backend_url=config.backend_url, deadline_seconds=config.deadline_seconds,
                on_progress=progress,
            )  # fmt: skip
        except WakeError as error:
            box.update(label="The backend could not be woken", state="error")
            return sentence(error)
        if "booting" in phases:  # it was down: a cold wake, worth learning from
            seen.append(took)
        box.update(label=f"Backend is up ({took:.0f} s)", state="complete", expanded=False)
    return None


def submit(backend_url: str, seconds: float) -> tuple[str, str]:
    """POST the job; ("success" or "error", one sentence) whatever the backend answers."""
    try:
        job = requests.post(f"{backend_url}/api/jobs", params={"seconds": seconds}, timeout=10)
    except requests.RequestException as error:
        return "error", f"The backend is up but did not take the job ({type(error).__name__}). Try again."
    try:
        answer = job.json()
    except (ValueError, RecursionError):
        answer = None
    if job.status_code == 503:
        return "error", "The backend is about to stop (it drains before a stop): run it again, and it is woken anew."
    if not job.ok:
        return "error", f"The backend refused the job (HTTP {job.status_code}). Try again, or tell the backend team."
    if not isinstance(answer, dict):
        return "error", f"The backend's answer to the job (HTTP {job.status_code}) is not JSON: tell the backend team."
    return "success", f"The backend accepted the grid search: {answer}"


st.title("Grid search")
config = settings()
if isinstance(config, str):
    st.error(config)
    st.stop()
if "prewarmed" not in st.session_state and config.prewarm:
    st.session_state.prewarmed = True  # once per browser session: the instance boots while the person chooses
    with contextlib.suppress(WakeError):  # the wake below tries again when the work is submitted
        request_start(**config.orchestrator, deadline_seconds=10)
state = st.empty()
show_state(state, config)

with st.form("grid_search"):
    seconds = st.number_input("Simulated run time (seconds)", min_value=0, max_value=60, value=2)
    submitted = st.form_submit_button("Run grid search")

if submitted:
    failure = wake(config, state)
    show_state(state, config)  # what the wake left: running and healthy, or why not
    kind, said = ("error", failure) if failure else submit(config.backend_url, seconds)
    if kind == "error":  # below the status box, which folds up once it is done
        st.error(said)
    else:
        st.success(said)
