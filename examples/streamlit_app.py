"""A heavy-work page shaped like the PyElli app's: it wakes the backend when a person submits work.

Configured by environment only, as the app's ECS task sets it:
    BACKEND_START_LAMBDA_URL   the orchestrator's Function URL
    BACKEND_URL                the backend, as the app reaches it (e.g. http://10.0.1.50:8000)
    BACKEND_AUTH               none (default) or aws_iam (SigV4 with the task role)
    BACKEND_TOKEN              the orchestrator's bearer token, with auth none and AUTH_TOKEN set
    AWS_REGION                 the function's region, with aws_iam
    BACKEND_PREWARM            true (default): start the instance once per browser session, when the page opens
    BACKEND_WAKE_DEADLINE_SECONDS  how long a wake may take before the page gives up (default 300)

Run it: streamlit run examples/streamlit_app.py (or `make app`, against the local sandbox).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import requests
import streamlit as st

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


@st.cache_resource
def settings() -> dict[str, Any]:
    """The orchestrator's settings, read once per server process."""
    auth: Auth = "aws_iam" if os.environ.get("BACKEND_AUTH", "none") == "aws_iam" else "none"
    return {
        "function_url": os.environ["BACKEND_START_LAMBDA_URL"],
        "auth": auth,
        "token": os.environ.get("BACKEND_TOKEN") or None,
        "region": os.environ.get("AWS_REGION") or None,
    }


@st.cache_resource
def http() -> requests.Session:
    """One HTTP session for the page's calls, kept across reruns (its connections too)."""
    return requests.Session()


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
        return "The backend did not come up in time. It may still be starting: try again in a minute."
    if isinstance(error, WakeServerError):
        return f"The backend cannot be started right now: try again in a minute. ({error})"
    return f"The backend could not be woken: {error}"


def state_line(status: dict[str, Any] | None) -> str:
    if status is None:
        return "Backend: unknown (the orchestrator did not answer)"
    if status.get("hold"):
        hold = status["hold"]
        why = f": {hold['reason']}" if hold["reason"] else ""
        return f"Backend: held {hold['state']} until {hold['until']}{why}"
    state, backend = status.get("state"), status.get("backend") or {}
    if state == "running":
        return "Backend: running and healthy" if backend.get("healthy") else "Backend: starting"
    return {"pending": "Backend: starting", "stopping": "Backend: stopping"}.get(str(state), f"Backend: {state}")


config = settings()
st.title("Grid search")
if "prewarmed" not in st.session_state and os.environ.get("BACKEND_PREWARM", "true") == "true":
    st.session_state.prewarmed = True  # once per browser session: the instance boots while the person chooses
    with contextlib.suppress(WakeError):  # the wake below tries again when the work is submitted
        request_start(**config, session=http())
try:
    st.caption(state_line(backend_status(**config, session=http())))
except WakeAuthError:
    st.caption("Backend: unknown (this app may not ask the orchestrator)")

with st.form("grid_search"):
    seconds = st.number_input("Simulated run time (seconds)", min_value=0, max_value=60, value=2)
    submitted = st.form_submit_button("Run grid search")

if submitted:
    backend_url = os.environ["BACKEND_URL"]
    deadline = float(os.environ.get("BACKEND_WAKE_DEADLINE_SECONDS", "300"))
    failure: str | None = None
    with st.status("Waking the backend...", expanded=True) as box:

        def progress(update: Progress) -> None:
            box.write(f"{update.elapsed_seconds:.0f} s: {update.message}")

        try:
            wake_backend(**config, backend_url=backend_url, deadline_seconds=deadline, on_progress=progress,
                         session=http())  # fmt: skip
            job = http().post(f"{backend_url}/api/jobs", params={"seconds": seconds}, timeout=10)
            job.raise_for_status()
        except WakeError as error:
            box.update(label="The backend could not be woken", state="error")
            failure = sentence(error)
        except requests.RequestException as error:
            box.update(label="The backend refused the job", state="error")
            failure = f"The backend is up but refused the job: {error}. Try again."
        else:
            box.update(label="Submitted", state="complete")
    if failure:  # below the status box, which folds up once it is done
        st.error(failure)
    else:
        st.success(f"The backend accepted the grid search: {job.json()}")
