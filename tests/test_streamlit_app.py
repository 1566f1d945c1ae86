"""The Streamlit page, run headless by Streamlit's AppTest against the sandbox: moto, the reference backend that
serves while its instance runs, and the local Function URL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from examples.wake_backend import wake_backend
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
        assert (box.state, box.label) == ("complete", "Submitted")
        lines = [element.value for element in box.markdown]
        assert lines[0] == "0 s: Checking whether the backend is up"
        assert any(line.endswith("Waiting for the backend to answer /health") for line in lines)
        assert "The backend accepted the grid search: {'accepted': True, 'seconds': 2.0}" in app.success[0].value
        assert starts(sandbox) == 1


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


def test_a_held_backend_says_until_when_and_why(page: Any) -> None:
    with Sandbox() as sandbox:
        sandbox.invoke({"action": "hold", "state": "stopped", "hours": 2, "reason": "patching the OS"})
        app = page(sandbox)
        assert app.caption[0].value.startswith("Backend: held stopped until ")
        app = submit(app)
        assert "under maintenance until" in app.error[0].value
        assert "(patching the OS)" in app.error[0].value
