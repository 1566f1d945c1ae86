"""The reference backend serves the activity contract the function reads, over real HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import requests

from examples.reference_backend import ReferenceBackend
from tests import function as bo


@pytest.fixture
def server() -> Iterator[ReferenceBackend]:
    backend = ReferenceBackend(("127.0.0.1", 0))
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    yield backend
    backend.shutdown()
    backend.server_close()
    thread.join(5)


def activity(server: ReferenceBackend) -> bo.Activity | bo.ActivityUnknown:
    return bo.fetch_activity(server.url + "/api/last-activity", 2.0, bo.Clock())


def test_probes_do_not_count_as_activity(server: ReferenceBackend) -> None:
    time.sleep(0.3)
    for _ in range(3):
        assert requests.get(server.url + "/health", timeout=2).status_code == 200
        activity(server)
    result = activity(server)
    assert isinstance(result, bo.Activity)
    assert result.idle_seconds is not None
    assert result.idle_seconds >= 0.3
    assert result.busy_reason is None


def test_a_real_request_resets_the_idle_time(server: ReferenceBackend) -> None:
    time.sleep(0.3)
    requests.get(server.url + "/api/anything", timeout=2)
    result = activity(server)
    assert isinstance(result, bo.Activity)
    assert result.idle_seconds is not None
    assert result.idle_seconds < 0.3


def test_a_running_job_reads_as_busy_then_idle(server: ReferenceBackend) -> None:
    assert requests.post(server.url + "/api/jobs?seconds=0.5", timeout=2).status_code == 202
    time.sleep(0.1)
    busy = activity(server)
    assert isinstance(busy, bo.Activity)
    assert busy.busy_reason == "busy is true"
    deadline = time.monotonic() + 5
    while server.jobs_done == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    done = activity(server)
    assert isinstance(done, bo.Activity)
    assert done.busy_reason is None


def test_health_is_503_while_booting() -> None:
    backend = ReferenceBackend(("127.0.0.1", 0), boot_seconds=60)
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    try:
        assert requests.get(backend.url + "/health", timeout=2).status_code == 503
    finally:
        backend.shutdown()
        backend.server_close()
        thread.join(5)


def drain(server: ReferenceBackend) -> dict[str, object]:
    answer: dict[str, object] = requests.post(server.url + "/api/drain", timeout=2).json()
    return answer


def test_a_drain_is_refused_when_a_request_arrived_since_the_last_report(server: ReferenceBackend) -> None:
    activity(server)  # the orchestrator reads the activity...
    requests.get(server.url + "/api/anything", timeout=2)  # ...a user's request arrives...
    answer = drain(server)  # ...and the drain that follows is refused: the stop would kill that user's work
    assert answer["drained"] is False
    assert requests.get(server.url + "/api/anything", timeout=2).status_code == 404  # still serving


def test_a_drain_is_refused_while_a_job_runs(server: ReferenceBackend) -> None:
    requests.post(server.url + "/api/jobs?seconds=0.5", timeout=2)
    activity(server)
    assert drain(server)["drained"] is False


def test_a_drained_backend_refuses_new_work_with_retry_after(server: ReferenceBackend) -> None:
    activity(server)
    assert drain(server) == {"drained": True, "lease_seconds": 120.0}
    refused = requests.post(server.url + "/api/jobs?seconds=1", timeout=2)
    assert refused.status_code == 503
    assert 0 < int(refused.headers["Retry-After"]) <= 120
    assert requests.get(server.url + "/health", timeout=2).json() == {"status": "draining"}
    still_idle = activity(server)
    assert isinstance(still_idle, bo.Activity)
    assert still_idle.busy_reason is None  # the refused request did not count as use
    assert server.jobs_done == 0


def test_a_drain_ends_at_once_when_the_orchestrator_says_resume(server: ReferenceBackend) -> None:
    activity(server)
    assert drain(server)["drained"] is True
    assert requests.delete(server.url + "/api/drain", timeout=2).json() == {"drained": False, "resumed": True}
    assert requests.post(server.url + "/api/jobs?seconds=0", timeout=2).status_code == 202  # serving again
    assert requests.get(server.url + "/health", timeout=2).json() == {"status": "ok"}
    assert requests.delete(server.url + "/api/drain", timeout=2).json() == {"drained": False, "resumed": False}


def test_busy_since_is_when_the_oldest_work_still_in_flight_began(server: ReferenceBackend) -> None:
    tracker = server.tracker
    assert "busy_since" not in tracker.report()  # not busy: nothing to say
    first = tracker.request_started()
    time.sleep(0.05)
    with tracker.job():
        began = tracker.report()["busy_since"]
        tracker.request_finished(first)  # the oldest ends: the job is now the oldest in flight
        later = tracker.report()["busy_since"]
        assert later > began
        read = activity(server)  # as the function reads it
        assert isinstance(read, bo.Activity)
        assert read.busy_since is not None
        assert read.busy_since.isoformat() == later
    assert "busy_since" not in tracker.report()


def test_a_request_finished_without_its_ticket_ends_the_oldest(server: ReferenceBackend) -> None:
    tracker = server.tracker
    tracker.request_started()
    time.sleep(0.05)
    second = tracker.request_started()
    oldest = tracker.report()["busy_since"]
    tracker.request_finished()  # busy_since moves later, never earlier than the truth
    assert tracker.report()["busy_since"] > oldest
    tracker.request_finished(second)
    assert tracker.report()["busy"] is False
