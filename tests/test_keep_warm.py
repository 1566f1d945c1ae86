"""Keep-warm windows: read once with the configuration, on the zone's wall clock (summer time included);
inside one, check_idle never stops the instance and starts a stopped one."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import function as bo
from tests.helpers import ACTIVITY_PATH, CHECK, Answer, Ec2World, FakeClock, Invoke, ScriptedBackend, http_event

ROOT = Path(__file__).resolve().parent.parent
BERLIN_WORKDAYS = "Mon-Fri 08:00-18:00 Europe/Berlin"


def window(text: str) -> bo.Window:
    [parsed] = bo.Config.from_env({"INSTANCE_ID": "i-0abc1234", "KEEP_WARM": text}).keep_warm
    return parsed


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "moment", "open_"),
    [
        # Berlin is UTC+1 in winter, UTC+2 in summer.
        pytest.param(BERLIN_WORKDAYS, "2026-11-30 07:00", True, id="monday-08:00-winter"),
        pytest.param(BERLIN_WORKDAYS, "2026-11-30 06:59", False, id="monday-07:59-winter"),
        pytest.param(BERLIN_WORKDAYS, "2026-11-30 16:59", True, id="monday-17:59-winter"),
        pytest.param(BERLIN_WORKDAYS, "2026-11-30 17:00", False, id="monday-18:00-is-closed"),
        pytest.param(BERLIN_WORKDAYS, "2026-07-06 06:00", True, id="monday-08:00-summer"),
        pytest.param(BERLIN_WORKDAYS, "2026-07-06 05:59", False, id="monday-07:59-summer"),
        pytest.param(BERLIN_WORKDAYS, "2026-11-28 10:00", False, id="saturday"),
        # Summer time begins Sunday 2026-03-29: 02:00 CET becomes 03:00 CEST.
        pytest.param(BERLIN_WORKDAYS, "2026-03-27 07:00", True, id="friday-before-the-change-08:00-CET"),
        pytest.param(BERLIN_WORKDAYS, "2026-03-30 06:00", True, id="monday-after-the-change-08:00-CEST"),
        pytest.param(BERLIN_WORKDAYS, "2026-03-30 06:59", True, id="monday-after-08:59-CEST"),
        pytest.param(BERLIN_WORKDAYS, "2026-03-30 05:30", False, id="monday-after-07:30-CEST"),
        pytest.param("Sun 01:00-03:00 Europe/Berlin", "2026-03-29 00:30", True, id="change-day-01:30-CET"),
        pytest.param("Sun 01:00-03:00 Europe/Berlin", "2026-03-29 01:00", False, id="change-day-03:00-CEST"),
        pytest.param("Sun 02:00-03:00 Europe/Berlin", "2026-03-29 00:59", False, id="window-in-the-skipped-hour"),
        # Summer time ends Sunday 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:00-03:00 happens twice.
        pytest.param("Sun 02:00-03:00 Europe/Berlin", "2026-10-25 00:30", True, id="repeated-hour-first-time"),
        pytest.param("Sun 02:00-03:00 Europe/Berlin", "2026-10-25 01:30", True, id="repeated-hour-second-time"),
        pytest.param("Sun 02:00-03:00 Europe/Berlin", "2026-10-25 02:00", False, id="after-the-repeated-hour"),
        pytest.param(BERLIN_WORKDAYS, "2026-10-23 06:00", True, id="friday-before-08:00-CEST"),
        pytest.param(BERLIN_WORKDAYS, "2026-10-26 07:00", True, id="monday-after-08:00-CET"),
        pytest.param(BERLIN_WORKDAYS, "2026-10-26 06:30", False, id="monday-after-07:30-CET"),
        # Crossing midnight: the window belongs to the day it starts on.
        pytest.param("Fri 22:00-02:00", "2026-12-04 23:00", True, id="friday-night"),
        pytest.param("Fri 22:00-02:00", "2026-12-05 01:59", True, id="into-saturday"),
        pytest.param("Fri 22:00-02:00", "2026-12-05 02:00", False, id="saturday-02:00"),
        pytest.param("Fri 22:00-02:00", "2026-12-05 23:00", False, id="saturday-night-is-not-listed"),
        pytest.param("Fri 22:00-02:00", "2026-12-04 01:00", False, id="friday-early-belongs-to-thursday"),
        pytest.param("Mon-Sun 00:00-24:00", "2026-12-06 23:59", True, id="all-day-end-24:00"),
        pytest.param("Sat-Mon 10:00-11:00", "2026-12-07 10:30", True, id="wrapping-range-monday"),
        pytest.param("Sat-Mon 10:00-11:00", "2026-12-08 10:30", False, id="wrapping-range-tuesday"),
        pytest.param("mon,WED 10:00-11:00 UTC", "2026-12-02 10:30", True, id="comma-list-any-case"),
    ],
)
def test_a_window_is_open_on_its_zones_wall_clock(text: str, moment: str, open_: bool) -> None:
    assert window(text).holds(utc(moment)) is open_


def test_several_windows_are_separated_by_semicolons() -> None:
    config = bo.Config.from_env({"INSTANCE_ID": "i-0abc1234", "KEEP_WARM": f"{BERLIN_WORKDAYS}; Sat 10:00-14:00"})
    assert [w.text for w in config.keep_warm] == [BERLIN_WORKDAYS, "Sat 10:00-14:00"]
    saturday_noon = utc("2026-11-28 12:00")
    assert config.open_window(saturday_noon) == config.keep_warm[1]
    assert config.open_window(utc("2026-11-29 12:00")) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("Mon-Fri", "not a window", id="no-times"),
        pytest.param("08:00-18:00", "not a window", id="no-days"),
        pytest.param("Mon-Fri 8:00-18:00", "not a window", id="one-digit-hour"),
        pytest.param("Mon-Fri 08:00-18:00 Europe/Berlin extra", "not a window", id="trailing-words"),
        pytest.param("Monday 08:00-18:00", "not a list of days", id="long-day-name"),
        pytest.param("Mon-Fry 08:00-18:00", "not a list of days", id="misspelt-day"),
        pytest.param("Mon--Fri 08:00-18:00", "not a list of days", id="double-dash"),
        pytest.param("Mon 25:00-26:00", "not a time of day", id="hour-25"),
        pytest.param("Mon 08:60-09:00", "not a time of day", id="minute-60"),
        pytest.param("Mon 24:00-08:00", "starts at 24:00", id="start-24:00"),
        pytest.param("Mon 08:00-08:00", "ends when it starts", id="empty"),
        pytest.param("Mon 08:00-18:00 Mars/Olympus", "not an IANA time zone", id="unknown-zone"),
        pytest.param("Mon 08:00-18:00 ../../etc/passwd", "not an IANA time zone", id="path-as-zone"),
        pytest.param("Mon 08:00-18:00;", "not a window", id="empty-window-after-semicolon"),
    ],
)
def test_a_bad_window_is_a_config_error_before_any_aws_call(
    invoke: Invoke, ec2: Ec2World, text: str, says: str
) -> None:
    response = invoke(http_event(), KEEP_WARM=text)
    body = response["body"]
    assert response["statusCode"] == 500
    assert '"config_error"' in body
    assert "KEEP_WARM" in body
    assert says in body
    assert ec2.calls == []


@pytest.fixture
def monday_morning(clock: FakeClock) -> FakeClock:
    clock.wall = utc("2026-11-30 09:00")  # 10:00 in Berlin
    return clock


def test_inside_a_window_a_running_idle_instance_is_kept_without_asking_the_backend(
    invoke: Invoke, ec2: Ec2World, backend: ScriptedBackend, monday_morning: FakeClock
) -> None:
    ec2.set_launch_time(monday_morning.now() - timedelta(hours=5))
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5 * 3600}))
    body = invoke(CHECK, KEEP_WARM=BERLIN_WORKDAYS)
    assert (body["decision"], body["state"]) == ("keep", "running")
    assert body["reason"] == f"inside the keep-warm window {BERLIN_WORKDAYS!r}"
    assert ec2.calls == ["DescribeInstances"]
    assert backend.calls == []


@pytest.mark.parametrize(
    ("dry_run", "decision", "mutations"),
    [
        pytest.param("false", "start", ["StartInstances"], id="starts"),
        pytest.param("true", "would_start", [], id="dry"),
    ],
)
def test_inside_a_window_a_stopped_instance_is_started(
    invoke: Invoke,
    ec2: Ec2World,
    monday_morning: FakeClock,
    log_lines: Any,
    dry_run: str,
    decision: str,
    mutations: Any,
) -> None:
    ec2.set_state("stopped")
    body = invoke(CHECK, KEEP_WARM=BERLIN_WORKDAYS, DRY_RUN=dry_run)
    assert body["decision"] == decision
    assert "warm when people arrive" in body["reason"]
    assert ec2.mutations() == mutations
    assert ec2.state() == ("stopped" if mutations == [] else "running")
    log, emf = log_lines()
    assert log["decision"] == decision
    assert emf.get("InstanceStarted") == (1 if mutations else None)


def test_outside_a_window_the_usual_rules_stop_an_idle_instance(
    invoke: Invoke, ec2: Ec2World, backend: ScriptedBackend, clock: FakeClock
) -> None:
    clock.wall = utc("2026-11-30 19:00")  # 20:00 in Berlin
    ec2.set_launch_time(clock.now() - timedelta(hours=5))
    backend.answer(ACTIVITY_PATH, Answer.json({"idle_seconds": 5 * 3600}))
    body = invoke(CHECK, KEEP_WARM=BERLIN_WORKDAYS)
    assert body["decision"] == "stop"
    assert ec2.state() == "stopped"


def test_an_operators_stop_inside_a_window_warns_that_the_next_check_starts_it_again(
    invoke: Invoke, ec2: Ec2World, monday_morning: FakeClock, log_lines: Any
) -> None:
    body = invoke({"action": "stop"}, KEEP_WARM=BERLIN_WORKDAYS)
    assert body["decision"] == "stop"
    assert "KEEP_WARM" in log_lines()[0]["warnings"][0]
    assert invoke(CHECK, KEEP_WARM=BERLIN_WORKDAYS)["decision"] == "start"  # as the warning said
    assert ec2.state() == "running"


def test_time_zones_work_with_the_system_database_hidden(tmp_path: Any) -> None:
    # Lambda's image may have no /usr/share/zoneinfo: zoneinfo then reads the tzdata package (shipped in the zip).
    probe = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'lambda')!r}); import datetime as dt;"
        "from orchestrator.settings import Config;"
        "env = {'INSTANCE_ID': 'i-0abc1234', 'KEEP_WARM': 'Mon 08:00-18:00 Europe/Berlin'};"
        "[w] = Config.from_env(env).keep_warm;"
        "print(w.holds(dt.datetime(2026, 7, 6, 6, 0, tzinfo=dt.UTC)), w.zone.key)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONTZPATH": str(tmp_path / "nowhere"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "Europe/Berlin"]
