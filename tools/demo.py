"""`make demo`: the function's whole life cycle on 127.0.0.1, as a timeline. `make serve`: keep it up.

demo:  an operator holds the backend stopped, and the app's wake is refused with the reason; released,
       the app wakes the backend through the local Function URL and runs a job on it; check_idle
       runs every second with a 3 s idle timeout: keep (busy), keep (recent activity), stop. Then the
       instance is started again with its backend crashed and its metrics idle: check_idle stops it
       on the second signal, CloudWatch. Last, an Auto Scaling group of two (tools/group_scene.py): the
       one running a job is kept and protected, the idle one scaled in; then the group goes to zero,
       and start wakes it.
serve: the same pieces, left running for developing the app against them, with check_idle every
       CHECK_EVERY seconds.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests

from examples.wake_backend import Progress, WakeError, WakeHeldError, wake_backend
from orchestrator.rules import metric_window
from tools import group_scene
from tools.preflight import render
from tools.sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent


class DemoFailure(Exception):
    """A step of the life cycle did not happen as it should; the message says which."""


@dataclass
class Timeline:
    """Rows of (time, actor, action, EC2 state, result), printed as they happen."""

    out: Callable[[str], None] = lambda line: print(line, flush=True)  # each row as it happens, even into a pipe
    started: float = field(default_factory=time.monotonic)
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def header(self) -> None:
        self.out(f"{'time':>6}  {'actor':<9} {'action':<16} {'EC2':<9} result")

    def row(self, actor: str, action: str, state: str, result: str) -> None:
        with self._lock:
            self.rows.append((actor, action, state, result))
            self.out(f"{time.monotonic() - self.started:5.1f}s  {actor:<9} {action:<16} {state:<9} {result}")


def run_demo(
    timeline: Timeline,
    *,
    idle_timeout_seconds: int = 3,
    job_seconds: float = 3.0,
    check_every: float = 1.0,
    deadline_seconds: float = 50.0,
    function_log: Path | None = None,
    group_idle_timeout_seconds: int | None = None,
) -> None:
    """The life cycle; raises DemoFailure if any step goes wrong."""
    give_up_at = time.monotonic() + deadline_seconds
    with Sandbox(
        idle_timeout_seconds=idle_timeout_seconds,
        function_log=function_log,
        on_change=lambda state, message: timeline.row("instance", "power", state, message),
    ) as sandbox:
        timeline.row(
            "demo", "setup", sandbox.state(), f"moto EC2 on {sandbox.moto_url}, instance {sandbox.instance_id}"
        )
        timeline.row("demo", "setup", sandbox.state(), f"local Function URL {sandbox.function_url}")

        def progress(update: Progress) -> None:
            timeline.row("app", update.phase, sandbox.state(), update.message)

        print(render(sandbox.invoke({"action": "preflight"})), flush=True)  # what make preflight shows a deployment
        held_stopped(sandbox, timeline)
        try:
            wake_backend(sandbox.function_url, sandbox.backend_url, deadline_seconds=20, on_progress=progress)
        except WakeError as error:
            raise DemoFailure(f"the app could not wake the backend: {error}") from error
        job = requests.post(f"{sandbox.backend_url}/api/jobs?seconds={job_seconds:g}", timeout=5)
        if job.status_code != 202:
            raise DemoFailure(f"the backend refused the job: HTTP {job.status_code}")
        timeline.row("app", "POST /api/jobs", sandbox.state(), f"{job.status_code}: a {job_seconds:g}s simulated job")

        seen: list[str] = []
        while "stop" not in seen:
            if time.monotonic() > give_up_at:
                raise DemoFailure(f"no stop within {deadline_seconds:g}s; decisions so far: {seen}")
            time.sleep(check_every)
            result = sandbox.invoke({"action": "check_idle"})
            if not result.get("ok"):
                raise DemoFailure(f"check_idle failed: {result.get('error')}")
            decision = result["decision"]
            seen.append("keep-busy" if "busy" in result["reason"] else decision)
            timeline.row("schedule", "check_idle", result["state"], f"{decision}: {result['reason']}")
        expected = ["keep-busy", "keep", "stop"]
        order = [kind for i, kind in enumerate(seen) if i == 0 or seen[i - 1] != kind]
        if order != expected:
            raise DemoFailure(f"check_idle should go {' -> '.join(expected)}; it went {' -> '.join(order)}")
        sandbox.backend_host.wait_until_off(give_up_at)
        final = sandbox.state()
        if final != "stopped":
            raise DemoFailure(f"the instance ended {final}, not stopped")
        timeline.row("demo", "done", final, "the instance is stopped: woken, used, idle, stopped")
        crashed_backend(sandbox, timeline, idle_timeout_seconds, give_up_at)
        group_idle = group_idle_timeout_seconds or idle_timeout_seconds
        group_scene.play(sandbox.moto_url, timeline.row, idle_timeout_seconds=group_idle, job_seconds=group_idle + 2.0,
                         fail=DemoFailure)  # fmt: skip


def held_stopped(sandbox: Sandbox, timeline: Timeline) -> None:
    """An operator holds the backend stopped for maintenance: the app's wake is refused with the reason, until
    the operator releases it."""
    held = sandbox.invoke({"action": "hold", "state": "stopped", "hours": 1, "reason": "patching the OS"})
    if not held.get("ok"):
        raise DemoFailure(f"the hold failed: {held.get('error')}")
    timeline.row("operator", "hold", sandbox.state(), held["reason"])
    try:
        wake_backend(sandbox.function_url, sandbox.backend_url, deadline_seconds=5)
    except WakeHeldError as error:
        timeline.row("app", "refused", sandbox.state(), f"{error} (the page says so)")
    else:
        raise DemoFailure("a backend held stopped was woken")
    released = sandbox.invoke({"action": "release"})
    timeline.row("operator", "release", sandbox.state(), released["reason"])


def crashed_backend(sandbox: Sandbox, timeline: Timeline, idle_timeout_seconds: int, give_up_at: float) -> None:
    """The backend process is dead on a running instance: its metrics show it idle, and check_idle stops it."""
    sandbox.backend_host.crashed = True
    sandbox.publish_instance_metrics(cpu_percent=0.8, network_bytes=30 * 1024)
    timeline.row(
        "demo", "setup", sandbox.state(), "AWS/EC2 metrics as EC2 would publish them: CPU 0.8%, 30 KB per 5 min"
    )
    started = sandbox.invoke({"action": "start"})
    timeline.row("operator", "start", started.get("state", "?"), started.get("message", str(started.get("error"))))
    # The fallback judges only periods of the current run, published minutes late: age the run past them.
    window_start, _ = metric_window(datetime.now(UTC), idle_timeout_seconds)
    launched = window_start - timedelta(minutes=1)
    sandbox.set_launch_time(launched)
    timeline.row("demo", "setup", sandbox.state(), f"LaunchTime set back to {launched:%H:%M} UTC: it has run a while")
    result = sandbox.invoke({"action": "check_idle"})
    if not result.get("ok"):
        raise DemoFailure(f"check_idle failed: {result.get('error')}")
    timeline.row(
        "schedule", "check_idle", result["state"], f"{result['decision']} ({result['signal']}): {result['reason']}"
    )
    if (result["decision"], result["signal"]) != ("stop", "cloudwatch"):
        raise DemoFailure(f"a crashed backend on an idle instance should be stopped by CloudWatch; got {result}")
    sandbox.backend_host.wait_until_off(give_up_at)
    timeline.row("demo", "done", sandbox.state(), "the instance is stopped: its backend died, its metrics said idle")


def serve(check_every: float, idle_timeout_seconds: int, *, page: bool = False, verbose: bool = False) -> None:
    """The sandbox left running, check_idle on a period; with `page`, the Streamlit page too (make app). The
    function's own log lines go to a file unless `verbose`."""
    stop = threading.Event()
    log = None if verbose else Path(tempfile.gettempdir()) / "backend-orchestrator-serve.jsonl"
    with (
        Sandbox(idle_timeout_seconds=idle_timeout_seconds, boot_seconds=3.0, function_log=log) as sandbox,
        ExitStack() as stack,
    ):
        if page:
            print(f"Streamlit page   {stack.enter_context(streamlit_page(sandbox))}   (open it in a browser)")
        print(f"""Local stand-in of the whole system (Ctrl-C to stop):
  Function URL   {sandbox.function_url}      BACKEND_START_LAMBDA_URL={sandbox.function_url}
  backend        {sandbox.backend_url}   (serves only while the instance runs)
  moto EC2       {sandbox.moto_url}   instance {sandbox.instance_id} (stopped)
  check_idle     every {check_every:g}s, idle timeout {idle_timeout_seconds}s
  function log   {log or "here (VERBOSE=1)"}
Try: curl -s -X POST {sandbox.function_url} -d '{{"action": "start"}}'""")
        try:
            while not stop.wait(check_every):
                result = sandbox.invoke({"action": "check_idle"})
                print(f"check_idle: {result.get('decision')} ({result.get('reason') or result.get('error')})")
        except KeyboardInterrupt:
            pass
    print("stopped: moto, the backend and the Function URL are down")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def stop_with_the_parent() -> None:
    """Stop as on Ctrl-C on SIGTERM, and when the process that started this one goes away: `make` does not pass
    a SIGTERM on to its recipe (kill <make's pid> leaves it running), but the recipe's process is then orphaned."""
    signal.signal(signal.SIGTERM, _interrupt)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@contextmanager
def streamlit_page(sandbox: Sandbox, **environ: str) -> Iterator[str]:
    """examples/streamlit_app.py under `streamlit run` on 127.0.0.1, pointed at the sandbox; yields its URL once
    it answers, and stops it on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "BACKEND_START_LAMBDA_URL": sandbox.function_url, "BACKEND_URL": sandbox.backend_url,
           "PYTHONPATH": str(ROOT), **environ}  # fmt: skip
    command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "examples" / "streamlit_app.py"),
               "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--global.developmentMode", "false"]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        give_up = time.monotonic() + 60
        while True:
            try:
                requests.get(url + "_stcore/health", timeout=1).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > give_up or server.poll() is not None:
                    raise DemoFailure(
                        "the Streamlit page did not start: run streamlit run examples/streamlit_app.py"
                    ) from None
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="keep everything running (make serve)")
    parser.add_argument("--app", action="store_true", help="and the Streamlit page (make app)")
    parser.add_argument("--check-every", type=float, default=30.0, help="seconds between check_idle (serve)")
    parser.add_argument("--idle-timeout", type=int, default=120, help="IDLE_TIMEOUT_SECONDS (serve)")
    parser.add_argument("--verbose", action="store_true", help="print the function's own log lines (serve)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # each line as it comes, into a pipe too
    # Ctrl-C stops it even when it was started with SIGINT ignored, as a shell's background job is (`make demo &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_with_the_parent()
    if args.serve or args.app:
        serve(args.check_every, args.idle_timeout, page=args.app, verbose=args.verbose)
        return 0
    timeline = Timeline()
    log = Path(tempfile.gettempdir()) / "backend-orchestrator-demo.jsonl"
    timeline.header()
    try:
        run_demo(timeline, function_log=log)
    except DemoFailure as error:
        print(f"\ndemo FAILED: {error}\nthe function's own log lines are in {log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: everything is stopped", file=sys.stderr)
        return 130
    print(f"\ndemo passed; the function's JSON log and metric lines are in {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
