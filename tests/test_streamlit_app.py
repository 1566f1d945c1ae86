"""The Streamlit page, run headless by Streamlit's AppTest against the sandbox: moto, the reference backend that
serves while its instance runs, and the local Function URL."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.element_tree import Progress as ProgressBar

from examples.wake_backend import wake_backend
from tests.helpers import Answer, ScriptedBackend
from tools.sandbox import Sandbox

pytestmark = pytest.mark.integration
PAGE = str(Path(__file__).resolve().parent.parent / "examples" / "streamlit_app.py")


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Opens the page (a new browser session) pointed at a sandbox the test started, and stopped, itself."""

    def open_page(sandbox: Sandbox, **environ: str) -> AppTest:
        monkeypatch.setenv("BACKEND_START_LAMBDA_URL", sandbox.function_url)
        monkeypatch.setenv("BACKEND_URL", sandbox.backend_url)
        monkeypatch.setenv("BACKEND_PREWARM", "false")
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        st.cache_resource.clear()  # the page caches its settings per server process: each test is a new one
        return AppTest.from_file(PAGE, default_timeout=30).run()

    yield open_page
    st.cache_resource.clear()


def submit(app: AppTest) -> AppTest:
    return app.button[0].click().run()


def starts(sandbox: Sandbox) -> int:
    return sandbox.function_url_server.actions.count("start")


def test_a_cold_wake_shows_its_progress_and_the_jobs_answer(page: Any) -> None:
    with Sandbox() as sandbox:
        app = page(sandbox)
        assert app.caption[0].value == "Backend: stopped"
        app = submit(app)
        assert not app.exception
        [box] = app.status
        assert box.state == "complete"
        assert re.fullmatch(r"Backend is up \(\d+ s\)", box.label)
        [bar] = box.get("progress")  # the wake is one bar that moves: the seconds, and how long a wake usually takes
        assert isinstance(bar, ProgressBar)
        assert bar.value == 100
        assert re.fullmatch(r"up, \d+ s of about 45 s", bar.text)
        [lines] = box.markdown  # the last few messages, in one element
        assert lines.value.splitlines() == [
            "- Asking the orchestrator to start the backend",
            "- Waiting for the backend to answer /health",
            "- Backend is up",
        ]
        assert app.caption[0].value == "Backend: running and healthy"  # the state, refreshed after the wake
        assert "The backend accepted the grid search: {'accepted': True, 'seconds': 2.0}" in app.success[0].value
        assert starts(sandbox) == 1


def test_the_next_wake_expects_as_long_as_the_last_one_took(page: Any) -> None:
    with Sandbox() as sandbox:
        app = submit(page(sandbox))
        took = int(re.findall(r"\d+", app.status[0].label)[0])
        sandbox.invoke({"action": "stop"})
        sandbox.backend_host.wait_until_off(time.monotonic() + 10)
        app = submit(app)  # the same server process: it remembers
        [bar] = app.status[0].get("progress")
        assert isinstance(bar, ProgressBar)
        assert re.fullmatch(rf"up, \d+ s (of about {took} s|\(it usually takes {took} s\))", bar.text)


def test_a_warm_backend_is_used_without_a_start(page: Any) -> None:
    with Sandbox() as sandbox:
        wake_backend(sandbox.function_url, sandbox.backend_url, deadline_seconds=20)  # up and healthy already
        sandbox.function_url_server.actions.clear()
        app = submit(page(sandbox))
        assert app.status[0].state == "complete"
        assert starts(sandbox) == 0


def test_the_prewarm_runs_once_per_browser_session(page: Any) -> None:
    with Sandbox() as sandbox:
        app = page(sandbox, BACKEND_PREWARM="true")
        app.run()
        app.run()  # reruns of the same session
        assert starts(sandbox) == 1
        assert page(sandbox, BACKEND_PREWARM="true") is not None  # a second browser session prewarms again
        assert starts(sandbox) == 2


def test_a_refused_call_says_what_devops_must_grant(page: Any) -> None:
    with Sandbox(environment={"AUTH_TOKEN": "right-token-0123456789"}) as sandbox:
        opened = page(sandbox, BACKEND_TOKEN="wrong-token-0123456789", BACKEND_PREWARM="true")  # refused, quietly
        assert not opened.exception
        app = submit(opened)
        assert not app.exception
        assert app.status[0].state == "error"
        assert "DevOps must grant the app's task role lambda:InvokeFunctionUrl" in app.error[0].value


def test_still_stopping_is_retried_and_then_the_wake_succeeds(page: Any) -> None:
    with Sandbox() as sandbox:
        server = sandbox.function_url_server
        real = server.handler
        refused: list[Any] = []

        def still_stopping_once(event: Any, context: Any) -> Any:
            if not refused and json.loads(event.get("body") or "{}").get("action") == "start":
                refused.append(event)
                body = {"ok": False, "error": {"code": "still_stopping", "message": "still stopping"}}
                return {"statusCode": 503, "headers": {"Retry-After": "1"}, "body": json.dumps(body)}
            return real(event, context)

        server.handler = still_stopping_once
        app = submit(page(sandbox))
        lines = [element.value for element in app.status[0].markdown]
        assert any("still stopping" in line for line in lines)
        assert app.status[0].state == "complete"
        assert starts(sandbox) == 2


def test_a_backend_that_never_turns_healthy_ends_in_the_timeout_message(page: Any) -> None:
    with Sandbox(boot_seconds=3600) as sandbox:
        app = submit(page(sandbox, BACKEND_WAKE_DEADLINE_SECONDS="2"))
        assert app.status[0].state == "error"
        assert "did not come up in time" in app.error[0].value
        assert "not healthy after 2s" in app.error[0].value


def test_a_held_backend_says_until_when_and_why(page: Any) -> None:
    with Sandbox() as sandbox:
        sandbox.invoke({"action": "hold", "state": "stopped", "hours": 2, "reason": "patching the OS"})
        app = page(sandbox)
        assert app.caption[0].value.startswith("Backend: held stopped until ")
        app = submit(app)
        assert "under maintenance until" in app.error[0].value
        assert "(patching the OS)" in app.error[0].value


# --- One sentence, never a traceback ------------------------------------------------------------------------------
@pytest.mark.parametrize("deadline", ["abc", "0", "-5", "nan", "inf", " "])
def test_a_bad_wake_deadline_is_one_sentence_that_names_it(page: Any, deadline: str) -> None:
    with Sandbox() as sandbox:
        app = page(sandbox, BACKEND_WAKE_DEADLINE_SECONDS=deadline)
        if deadline.strip():
            assert not app.exception
            assert app.error[0].value.startswith(f"BACKEND_WAKE_DEADLINE_SECONDS={deadline!r} is not a number")
            assert not app.button  # the page stops there: nothing to submit
        else:  # blank is unset: the default
            assert not app.error
        assert starts(sandbox) == 0


def test_a_job_answer_that_is_not_json_is_one_sentence(page: Any, backend: ScriptedBackend) -> None:
    backend.answer("/health", Answer.json({"status": "ok"}))
    backend.answer(
        "/api/jobs", Answer(200, b"<html><body>Welcome to the proxy</body></html>", {"Content-Type": "text/html"})
    )
    with Sandbox() as sandbox:
        app = submit(page(sandbox, BACKEND_URL=backend.url))
        assert not app.exception
        assert app.error[0].value == "The backend's answer to the job (HTTP 200) is not JSON: tell the backend team."


def test_a_job_the_backend_refuses_is_one_sentence(page: Any, backend: ScriptedBackend) -> None:
    backend.answer("/health", Answer.json({"status": "ok"}))
    backend.answer("/api/jobs", Answer(mode="drop"))
    with Sandbox() as sandbox:
        app = submit(page(sandbox, BACKEND_URL=backend.url))
        assert not app.exception
        assert app.error[0].value.startswith("The backend is up but did not take the job (ConnectionError)")


def test_a_hold_without_a_reason_is_shown_without_one(page: Any) -> None:
    with Sandbox() as sandbox:
        sandbox.invoke({"action": "hold", "state": "stopped", "hours": 2})
        server, real = sandbox.function_url_server, sandbox.function_url_server.handler

        def no_reason_key(event: Any, context: Any) -> Any:  # an older function, say, that sends no reason at all
            answer = real(event, context)
            body = json.loads(answer["body"])
            if isinstance(body.get("hold"), dict):
                body["hold"].pop("reason")
            return {**answer, "body": json.dumps(body)}

        server.handler = no_reason_key
        app = page(sandbox)
        assert not app.exception
        assert re.fullmatch(r"Backend: held stopped until \S+", app.caption[0].value)
        app = submit(app)
        assert not app.exception
        assert app.error[0].value.startswith("The backend is under maintenance until ")
        assert app.error[0].value.endswith(". Try again after that.")
