"""Every promised bound holds under faults: no action outlives its context, and no backend request
outlives its time or reads past its byte limit, whatever EC2 or the backend does."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests import function as bo
from tests.helpers import (
    REGION,
    Answer,
    FakeClock,
    RealContext,
    ScriptedBackend,
    SilentServer,
    instance_state,
    invoke_for_real,
    invoke_handler,
)

pytestmark = pytest.mark.integration
CONTEXT_SECONDS = 12.0  # a short Lambda timeout, so that the test is short too


@pytest.fixture
def silent_ec2(monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentServer]:
    """An EC2 endpoint that accepts connections and never answers."""
    server = SilentServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    bo.aws_client.cache_clear()
    yield server
    server.close()


def assert_every_action_answers_unreachable_in_time(
    backend: ScriptedBackend, capsys: pytest.CaptureFixture[str], finally_: Callable[[], None] = lambda: None
) -> None:
    """start, status, check_idle and stop against an EC2 endpoint that cannot answer, each with a real context of
    CONTEXT_SECONDS: each answers aws_unreachable with time to spare, and writes its log line and its metrics line.
    `finally_` runs once they have answered (or failed)."""
    environ = {"INSTANCE_ID": "i-0123456789abcdef0", "AWS_REGION": REGION, "BACKEND_BASE_URL": backend.url}
    bo.warm_clients(environ)  # INIT, as Lambda runs it before the invocations

    def invoke(action: str) -> tuple[dict[str, Any], int]:
        context = RealContext(CONTEXT_SECONDS)
        return bo.handle({"action": action}, context, environ), context.get_remaining_time_in_millis()

    actions = ["start", "status", "check_idle", "stop"]
    try:
        with ThreadPoolExecutor(max_workers=len(actions)) as pool:  # concurrently, to keep the test short
            results = dict(zip(actions, pool.map(invoke, actions), strict=True))
    finally:
        finally_()
    for action, (body, remaining_ms) in results.items():
        assert body["error"]["code"] == "aws_unreachable", (action, body)
        assert remaining_ms > 1000, action  # answered with time to spare: Lambda would not have killed it
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(line["action"] for line in lines if "level" in line) == sorted(actions)  # each wrote its log line
    assert sum(1 for line in lines if "_aws" in line) == len(actions)  # and its metrics line


def test_no_action_outlives_its_context_when_ec2_never_answers(
    silent_ec2: SilentServer, backend: ScriptedBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_every_action_answers_unreachable_in_time(backend, capsys)


@pytest.mark.parametrize(
    ("context_seconds", "fallback", "calls_kept"),
    [
        pytest.param(12.0, "0", 1, id="room-for-StopInstances"),
        pytest.param(18.0, "5", 2, id="room-for-GetMetricData-and-StopInstances"),
    ],
)
def test_a_backend_request_gets_only_the_time_that_leaves_room_for_what_follows(
    running: str, backend: ScriptedBackend, context_seconds: float, fallback: str, calls_kept: int
) -> None:
    # HTTP_TIMEOUT_SECONDS is longer than the whole context: the GET is cut to what leaves the next calls room.
    # The context's time follows a clock that stands still but for the test, so the grant is exact however busy the
    # machine (the Describe before it takes no time); the silent backend's socket still times out for real.
    backend.answer("/api/last-activity", Answer(mode="silent"))
    started = time.monotonic()
    environ = {"INSTANCE_ID": running, "AWS_REGION": REGION, "BACKEND_BASE_URL": backend.url}
    environ |= {"HTTP_TIMEOUT_SECONDS": "30", "IDLE_CPU_PERCENT": fallback}
    body = invoke_handler({"action": "check_idle"}, environ, clock=FakeClock(), timeout_seconds=context_seconds)
    granted = context_seconds - bo.ANSWER_MARGIN_SECONDS - calls_kept * bo.aws_call_seconds(1)
    assert body["decision"] == "keep"
    waited = float(re.search(r"timed out after ([0-9.]+)s", body["reason"]).group(1))  # type: ignore[union-attr]
    assert waited == pytest.approx(granted, abs=0.05)  # the reason shows tenths
    assert time.monotonic() - started < context_seconds - bo.ANSWER_MARGIN_SECONDS


SLOW = [
    pytest.param(Answer(mode="silent"), "timed out", id="never-answers"),
    pytest.param(Answer(mode="trickle-status"), "timed out", id="trickles-its-status-line"),
    pytest.param(Answer(mode="trickle-headers"), "timed out", id="trickles-its-headers"),
    pytest.param(Answer(body=b'{"idle_seconds": 5000}' * 20, mode="trickle-length"), "timed out", id="trickles-a-body"),
    pytest.param(Answer(body=b"1" * 200, mode="trickle-close"), "timed out", id="trickles-a-body-until-close"),
    pytest.param(Answer(mode="endless"), "more than 64 KiB", id="sends-for-ever"),
]


@pytest.mark.parametrize(("answer", "reason"), SLOW)
def test_the_activity_read_ends_within_its_timeout_whatever_the_backend_does(
    running: str, backend: ScriptedBackend, answer: Answer, reason: str
) -> None:
    backend.answer("/api/last-activity", answer)
    started = time.monotonic()
    body = invoke_for_real("check_idle", running, backend.url, HTTP_TIMEOUT_SECONDS="1")
    elapsed = time.monotonic() - started
    assert body["decision"] == "keep"
    assert reason in body["reason"]
    # One second of HTTP time plus moto's round trips; a trickle left unbounded runs for 30 s.
    assert elapsed < 1 + 2


@pytest.mark.parametrize(
    ("answer", "healthy"),
    [
        pytest.param(Answer(mode="silent"), None, id="never-answers"),
        pytest.param(Answer(mode="trickle-status"), None, id="trickles-its-status-line"),
        pytest.param(Answer(mode="trickle-headers"), True, id="trickles-its-headers"),  # the status line suffices
        pytest.param(Answer(mode="endless"), True, id="sends-for-ever"),
    ],
)
def test_the_health_probe_reads_only_the_status_line_within_its_timeout(
    running: str, backend: ScriptedBackend, answer: Answer, healthy: bool | None
) -> None:
    backend.answer("/health", answer)
    started = time.monotonic()
    body = invoke_for_real("status", running, backend.url, HTTP_TIMEOUT_SECONDS="1")
    assert time.monotonic() - started < 1 + 2
    assert body["backend"]["healthy"] is bool(healthy)
    assert body["backend"]["reachable"] is (healthy is not None)


def test_a_backend_that_sends_for_ever_costs_bounded_memory(backend: ScriptedBackend) -> None:
    backend.answer("/api/last-activity", Answer(mode="endless"))
    tracemalloc.start()
    try:
        result = bo.fetch_activity(backend.url + "/api/last-activity", 2.0, bo.Clock())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, bo.ActivityUnknown)
    assert peak < 4 * bo.MAX_ACTIVITY_BYTES


def test_a_dns_lookup_that_hangs_is_bounded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # No DNS server can be made slow here: stand in for one whose answer never comes, and say so.
    released = threading.Event()

    def hanging_lookup(*_: Any, **__: Any) -> Any:
        released.wait(30)
        raise OSError("released")

    monkeypatch.setattr("socket.getaddrinfo", hanging_lookup)
    started = time.monotonic()
    try:
        result = bo.fetch_activity("http://backend.internal:8000/api/last-activity", 1.0, bo.Clock())
    finally:
        released.set()
    assert isinstance(result, bo.ActivityUnknown)
    assert "timed out" in result.reason
    assert time.monotonic() - started < 1 + 1


# --- Answers that made the read raise, and interim responses ------------------------------------------------------
DECLARED_TOO_LARGE = [
    # http.client's read() allocates what is declared: MemoryError, or OverflowError past a C ssize_t.
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n{}", "more than 64 KiB", id="a-terabyte"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775807\r\n\r\n{}", "more than 64 KiB", id="int64"),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n{}",
        "IncompleteRead",
        id="chunk-2**64",
    ),
]


@pytest.mark.parametrize(("raw", "says"), DECLARED_TOO_LARGE)
def test_a_declared_size_past_the_limit_allocates_nothing_and_is_an_unknown_activity(
    backend: ScriptedBackend, raw: bytes, says: str
) -> None:
    backend.answer("/api/last-activity", Answer(body=raw, mode="raw"))
    backend.answer("/api/drain", Answer(body=raw, mode="raw"))
    tracemalloc.start()
    try:
        activity = bo.fetch_activity(backend.url + "/api/last-activity", 2.0, bo.Clock())
        with pytest.raises(bo.NotDrainedError) as refused:
            bo.drain(
                backend.url + "/api/drain", 2.0, bo.Deadline(time.monotonic() + 10, bo.Clock()), keep=bo.NOTHING_AFTER
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(activity, bo.ActivityUnknown)
    assert says in activity.reason
    assert "the drain" in str(refused.value)
    assert peak < 4 * bo.MAX_ACTIVITY_BYTES


def test_check_idle_on_a_declared_terabyte_keeps_and_reaches_the_second_signal(
    running: str, backend: ScriptedBackend
) -> None:
    backend.answer("/api/last-activity", Answer(body=DECLARED_TOO_LARGE[0].values[0], mode="raw"))  # type: ignore[arg-type]
    body = invoke_for_real("check_idle", running, backend.url)
    assert (body["ok"], body["decision"]) == (True, "keep")
    assert "sent more than 64 KiB" in body["reason"]


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def test_interim_responses_are_skipped_by_the_activity_read_and_the_health_probe(backend: ScriptedBackend) -> None:
    final = b'HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{"idle_seconds": 42}'
    backend.answer("/api/last-activity", Answer(body=EARLY_HINTS + CONTINUE + final, mode="raw"))
    backend.answer("/health", Answer(body=CONTINUE + EARLY_HINTS + b"HTTP/1.1 200 OK\r\n\r\n", mode="raw"))
    assert bo.fetch_activity(backend.url + "/api/last-activity", 2.0, bo.Clock()) == bo.Activity(42.0)
    healthy = bo.probe_health(backend.url + "/health", 2.0, bo.Clock())
    assert healthy == {"reachable": True, "healthy": True, "status_code": 200}


def test_a_storm_of_interim_responses_is_cut_at_the_byte_limit(backend: ScriptedBackend) -> None:
    backend.answer("/api/last-activity", Answer(body=EARLY_HINTS * 2000, mode="raw"))
    activity = bo.fetch_activity(backend.url + "/api/last-activity", 2.0, bo.Clock())
    assert isinstance(activity, bo.ActivityUnknown)
    assert "more than 64 KiB" in activity.reason


def test_a_host_name_the_lookup_refuses_is_named_invalid_not_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def idna_lookup(host: str, *_: Any, **__: Any) -> Any:  # what getaddrinfo does first with a name
        host.encode("idna")
        raise AssertionError("not reached for these names")

    monkeypatch.setattr("socket.getaddrinfo", idna_lookup)
    activity = bo.fetch_activity("http://a..b/api/last-activity", 5.0, bo.Clock())
    assert isinstance(activity, bo.ActivityUnknown)
    assert "timed out" not in activity.reason
    assert "gaierror" in activity.reason


# --- The AWS endpoint's name ---------------------------------------------------------------------------------------
def test_no_action_outlives_its_context_when_the_aws_endpoint_name_resolves_slowly(
    moto_server: str, backend: ScriptedBackend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No resolver can be made slow here: stand in for one that answers the endpoint's name after 14 s (a dead
    # first nameserver). botocore's connect timeout starts only once the name is resolved.
    released = threading.Event()
    lookup = socket.getaddrinfo  # the hermetic one: loopback only

    def slow_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "ec2.slow.test":
            released.wait(14)
            host = "127.0.0.1"
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.replace("127.0.0.1", "ec2.slow.test"))
    bo.aws_client.cache_clear()
    assert_every_action_answers_unreachable_in_time(backend, capsys, finally_=released.set)


def test_a_slow_drain_is_given_only_what_leaves_the_whole_stop_its_time(
    running: str, moto_url: str, backend: ScriptedBackend
) -> None:
    # Room after the read for the shortest drain and a stop with its hibernation fallback, and a little more: a
    # drain that takes its time must be cut where the stop would no longer fit, or the backend is left drained.
    backend.answer("/api/last-activity", Answer.json({"idle_seconds": 5000}))
    backend.answer("/api/drain", Answer(body=b'{"drained": true}', mode="trickle-length", interval=0.27))  # 4.6 s
    environ = {"DRAIN_PATH": "/api/drain", "STOP_HIBERNATE": "true", "IDLE_CPU_PERCENT": "0"}
    config = bo.Config.from_env({"INSTANCE_ID": running, **environ})
    context_seconds = bo.shortest_check_seconds(config) + 2  # the read gets 3 s, the drain 4 s, not its 5 s
    time.sleep(1.2)  # moto launched the instance just now: let it be idle past a 1 s timeout
    body = invoke_for_real("check_idle", running, backend.url, context_seconds, IDLE_TIMEOUT_SECONDS="1", **environ)
    assert body["decision"] == "keep"
    assert "the drain (POST" in body["reason"]
    waited = float(re.search(r"timed out after ([0-9.]+)s", body["reason"]).group(1))  # type: ignore[union-attr]
    # Not its own 5 s: what leaves one short attempt of the stop and of the plain stop after a refused hibernation.
    budget = context_seconds - bo.answer_margin(context_seconds)
    assert waited <= budget - bo.stop_seconds(config, bo.AWS_MIN_ATTEMPT_SECONDS)
    assert instance_state(moto_url, running) == "running"
