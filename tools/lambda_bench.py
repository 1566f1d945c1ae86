"""`make bench`, at Lambda's CPU share: the built zip under awslambdaric, the runtime interface client AWS's Python
images use, against moto's server and the reference backend, with the Runtime API played here.

Lambda runs INIT (the import) on a full vCPU, but each invocation on memory / 1,769 MB of one: 7.2 % at 128 MB,
where a CPU millisecond costs about 14 ms of wall time. So INIT runs at full speed here too, and from the first
invocation on the runtime process is held to its memory's share by a cgroup (v1) CPU quota. Where no cgroup can
be made, the invocation's CPU time is read from /proc and scaled by 1,769 / memory instead, and the output says so.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MB_PER_VCPU = 1769  # Lambda: a function gets one vCPU's worth of CPU at 1,769 MB, in proportion below
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_CPUACCT = Path("/sys/fs/cgroup/cpuacct")
CFS_PERIOD_US = 20_000  # short, so that a few ms of CPU cannot slip through one period unthrottled (quota >= 1 ms)
CONTAINERS = 5  # cold containers per memory size: the figures are medians
SHORT_TIMEOUT_SECONDS = 3.0  # Lambda's default timeout
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")

# moto's DescribeInstances has no CpuOptions, which real EC2 always sends and the fallback needs, and keeps the first
# LaunchTime: the runtime process gets both the way the tests and the sandbox do (tools.real_ec2).
SITECUSTOMIZE = """
import os, pathlib, boto3
from tools.real_ec2 import add_cpu_options, launch_times_from
boto3.setup_default_session()
boto3.DEFAULT_SESSION.events.register("after-call.ec2.DescribeInstances", add_cpu_options)
launched = launch_times_from(pathlib.Path(os.environ["BENCH_LAUNCH_TIMES"]))
boto3.DEFAULT_SESSION.events.register("after-call.ec2.DescribeInstances", launched)
"""


# --- The Runtime API, for one runtime process ---------------------------------------------------------------
@dataclass
class Invocation:
    event: dict[str, Any]
    timeout_seconds: float = 60.0  # the function's Timeout: the deadline the runtime is given
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    sent_at: float = 0.0
    answered_at: float = 0.0
    answer: Any = None
    done: threading.Event = field(default_factory=threading.Event)


class RuntimeApi(ThreadingHTTPServer):
    """https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html: next, response, error, init error."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RuntimeApiRequest)
        self.pending: queue.Queue[Invocation] = queue.Queue()
        self.by_id: dict[str, Invocation] = {}
        self.waiting = threading.Event()  # the runtime asked for its next event: INIT is over (the first time)
        self.init_error: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # the runtime was killed while it waited: expected
            super().handle_error(request, client_address)


class _RuntimeApiRequest(BaseHTTPRequestHandler):
    server: RuntimeApi
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if not self.path.endswith("/runtime/invocation/next"):
            self._answer(404, b"{}")
            return
        self.server.waiting.set()
        invocation = self.server.pending.get()
        self.server.by_id[invocation.request_id] = invocation
        deadline_ms = int((time.time() + invocation.timeout_seconds) * 1000)
        invocation.sent_at = time.monotonic()
        self._answer(
            200,
            json.dumps(invocation.event).encode(),
            {
                "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
                "Lambda-Runtime-Invoked-Function-Arn": "arn:aws:lambda:us-east-1:123456789012:function:bench",
                "Lambda-Runtime-Trace-Id": "Root=1-00000000-000000000000000000000000",
            },
        )

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(202, b'{"status": "OK"}')
        if self.path.endswith("/init/error"):
            self.server.init_error = body.decode(errors="replace")
            self.server.waiting.set()
            return
        match = re.search(r"/runtime/invocation/([^/]+)/(response|error)$", self.path)
        if match:
            invocation = self.server.by_id[match[1]]
            invocation.answered_at = time.monotonic()
            invocation.answer = json.loads(body) if match[2] == "response" else {"runtime_error": body.decode()}
            invocation.done.set()

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


# --- The CPU share ----------------------------------------------------------------------------------------------
class CpuShare:
    """Hold a process to `memory_mb` / 1,769 of a CPU with a cgroup v1 quota, and read its CPU time; or, where no
    cgroup can be made, read its CPU time from /proc and scale it (the output says which)."""

    def __init__(self, memory_mb: int) -> None:
        self.share = memory_mb / MB_PER_VCPU
        name = f"backend-orchestrator-bench-{os.getpid()}-{memory_mb}"
        self.cpu, self.cpuacct = CGROUP_CPU / name, CGROUP_CPUACCT / name
        try:
            self.cpu.mkdir()
            self.cpuacct.mkdir()
            (self.cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (self.cpu / "cpu.cfs_quota_us").write_text(str(round(CFS_PERIOD_US * self.share)))
            self.throttled = True
        except OSError:
            self.remove()
            self.throttled = False

    @property
    def how(self) -> str:
        if self.throttled:
            return f"a cgroup CPU quota of {self.share:.1%} of a CPU"
        return f"no cgroup could be made: CPU time from /proc, wall time estimated as CPU x {1 / self.share:.1f}"

    def hold(self, pid: int) -> None:
        if self.throttled:
            (self.cpu / "cgroup.procs").write_text(str(pid))
            (self.cpuacct / "cgroup.procs").write_text(str(pid))

    def throttled_periods(self) -> int:
        if not self.throttled:
            return 0
        stat = dict(line.split() for line in (self.cpu / "cpu.stat").read_text().splitlines())
        return int(stat.get("nr_throttled", 0))

    def cpu_seconds(self, pid: int) -> float:
        if self.throttled:
            return int((self.cpuacct / "cpuacct.usage").read_text()) / 1e9
        return process_cpu_seconds(pid)

    def remove(self) -> None:
        for group in (self.cpu, self.cpuacct):
            if group.exists():
                for task in (group / "cgroup.procs").read_text().split():
                    (group.parent / "cgroup.procs").write_text(task)
                group.rmdir()


def process_cpu_seconds(pid: int) -> float:
    """User and system time of the whole process, exited threads included (/proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


# --- One container ----------------------------------------------------------------------------------------------
@contextmanager
def function_zip() -> Iterator[Path]:
    """The zip `make package` builds, for this interpreter's Python, unpacked as Lambda's task root."""
    from tools import package

    work = Path(tempfile.mkdtemp(prefix="bench-zip-"))
    try:
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        archive = package.build(python, "x86_64", work / "function.zip")
        with zipfile.ZipFile(archive) as unzipped:
            unzipped.extractall(work / "task")
        (work / "bench-site").mkdir()
        (work / "bench-site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Measured:
    name: str
    cpu_ms: float
    wall_ms: float
    answer: dict[str, Any]


@dataclass
class Container:
    init_wall_ms: float
    init_cpu_ms: float
    how: str
    throttled_periods: int
    invocations: list[Measured]


def run_container(
    work: Path, memory_mb: int, environ: dict[str, str], steps: list[tuple[str, Any]], timeout_seconds: float = 60.0
) -> Container:
    """Start the runtime (INIT at full speed), hold it to its CPU share, run each step's event in turn, each with a
    deadline of `timeout_seconds`. A step is (name, event) or (name, callable that prepares the sandbox and returns
    the event)."""
    api = RuntimeApi()
    threading.Thread(target=api.serve_forever, name="runtime-api", daemon=True).start()
    share = CpuShare(memory_mb)
    env = {
        **environ,
        "AWS_LAMBDA_RUNTIME_API": api.address,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
        "AWS_LAMBDA_FUNCTION_NAME": "bench",
        "PYTHONPATH": os.pathsep.join([str(work / "task"), str(work / "bench-site"), str(ROOT)]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    started = time.monotonic()
    runtime = subprocess.Popen(
        [sys.executable, "-B", "-m", "awslambdaric", "backend_orchestrator.lambda_handler"],
        cwd=work / "task",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if not api.waiting.wait(60) or api.init_error:
            raise RuntimeError(f"INIT failed: {api.init_error or 'the runtime never asked for an event'}")
        init_wall, init_cpu = time.monotonic() - started, process_cpu_seconds(runtime.pid)
        share.hold(runtime.pid)
        measured = []
        for name, step in steps:
            invocation = Invocation(step() if callable(step) else step, timeout_seconds)
            before = share.cpu_seconds(runtime.pid)
            api.pending.put(invocation)
            if not invocation.done.wait(120):
                raise RuntimeError(f"{name}: no answer within 120 s")
            cpu = share.cpu_seconds(runtime.pid) - before
            wall = invocation.answered_at - invocation.sent_at if share.throttled else cpu / share.share
            measured.append(Measured(name, cpu * 1000, wall * 1000, invocation.answer))
        throttled = share.throttled_periods()
    finally:
        runtime.kill()
        runtime.wait(10)
        share.remove()
        api.shutdown()
        api.server_close()
    return Container(init_wall * 1000, init_cpu * 1000, share.how, throttled, measured)


def report(memory_mb: int, containers: list[Container]) -> None:
    """Medians over the containers, one line per invocation."""
    first = containers[0]
    print(f"{memory_mb} MB, {first.how}; medians of {len(containers)} cold containers:")
    init_wall = statistics.median(c.init_wall_ms for c in containers)
    init_cpu = statistics.median(c.init_cpu_ms for c in containers)
    print(f"  {'INIT (import, clients built), at full speed':44s} {init_cpu:8.0f} {init_wall:9.0f}")
    print(f"  {'invocation':44s} {'CPU ms':>8s} {'wall ms':>9s}   answer")
    for index, row in enumerate(first.invocations):
        cpu = statistics.median(c.invocations[index].cpu_ms for c in containers)
        wall = statistics.median(c.invocations[index].wall_ms for c in containers)
        answer = row.answer.get("decision") or row.answer.get("state") or row.answer.get("error", {}).get("code")
        print(f"  {row.name:44s} {cpu:8.0f} {wall:9.0f}   {answer}")
    if first.throttled_periods:
        print(f"  (the quota throttled the runtime in {statistics.median(c.throttled_periods for c in containers):.0f} "
              f"periods of {CFS_PERIOD_US // 1000} ms per container)")  # fmt: skip


def template_memory_mb() -> int:
    found = re.search(r"^\s+MemorySize:\s*(\d+)", (ROOT / "template.yaml").read_text(), flags=re.MULTILINE)
    return int(found[1]) if found else 128


@dataclass
class Lab:
    """The sandbox the runtime works against, and the scenes each benchmark step sets up before its event."""

    sandbox: Any
    launch_times: Path  # what the runtime's DescribeInstances answers as LaunchTime

    def power(self, state: str, crashed: bool = False) -> None:
        sandbox, host = self.sandbox, self.sandbox.backend_host
        if state == "stopped":
            sandbox.ec2.stop_instances(InstanceIds=[sandbox.instance_id])
            host.wait_until_off(time.monotonic() + 10)
        else:
            host.crashed = crashed
            sandbox.ec2.start_instances(InstanceIds=[sandbox.instance_id])
            give_up = time.monotonic() + 10
            while not host.powered and time.monotonic() < give_up:
                time.sleep(0.05)

    def stopped(self) -> dict[str, str]:
        self.power("stopped")
        return {"action": "start"}

    def running(self) -> dict[str, str]:
        give_up = time.monotonic() + 10
        while self.sandbox.backend_host.backend is None and time.monotonic() < give_up:
            time.sleep(0.05)  # the host serves the reference backend once moto says running
        return {"action": "status"}

    def crashed(self) -> dict[str, str]:
        from tools.harness import published_periods

        self.power("stopped")
        self.power("running", crashed=True)
        launched = published_periods(datetime.now(UTC), self.sandbox.idle_timeout_seconds)[0] - timedelta(minutes=1)
        self.launch_times.write_text(json.dumps({self.sandbox.instance_id: launched.isoformat()}))  # CloudWatch decides
        return {"action": "check_idle"}

    def crashed_and_idle(self) -> dict[str, str]:
        self.sandbox.publish_instance_metrics(cpu_percent=0.8, network_bytes=30 * 1024)
        return {"action": "check_idle"}

    def idle_past_a_second(self) -> dict[str, str]:
        self.running()  # started by the step before: the backend serves, and has had nothing to do
        time.sleep(1.5)  # past IDLE_TIMEOUT_SECONDS=1
        return {"action": "check_idle"}

    def up(self) -> dict[str, str]:
        self.power("stopped")
        self.power("running")
        return {"action": "check_idle"}


def main() -> None:
    from tools.harness import REGION
    from tools.sandbox import FAKE_CREDENTIALS, Sandbox

    with function_zip() as work, Sandbox(idle_timeout_seconds=900, boot_seconds=0) as sandbox:
        lab = Lab(sandbox, work / "launch-times.json")
        topic_arn = _sns(sandbox.moto_url).create_topic(Name="backend-orchestrator")["TopicArn"]
        environ = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYTHON"))},
            **FAKE_CREDENTIALS,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": sandbox.moto_url,
            "AWS_EC2_METADATA_DISABLED": "true",
            "INSTANCE_ID": sandbox.instance_id,
            "BACKEND_BASE_URL": sandbox.backend_url,
            "NOTIFY_TOPIC_ARN": topic_arn,  # as the template sets it
            "BENCH_LAUNCH_TIMES": str(lab.launch_times),
        }
        by_memory(lab, work, environ)
        at_lambdas_default_timeout(lab, work, environ)


def by_memory(lab: Lab, work: Path, environ: dict[str, str]) -> None:
    """Each action, cold and warm, at 128 MB and at the template's memory."""
    steps: list[tuple[str, Any]] = [
        ("start, cold (the container's first)", lab.stopped),
        ("start, warm", lab.stopped),
        ("status (running, /health)", lab.running),
        ("check_idle, backend idle (keep)", {"action": "check_idle"}),
        ("check_idle, backend down, fallback (keep)", lab.crashed),
        ("check_idle, fallback stops, SNS notice", lab.crashed_and_idle),
    ]
    print("the built zip under awslambdaric, against moto's server and the reference backend:")
    for memory_mb in sorted({128, template_memory_mb()}):
        containers = []
        for _ in range(CONTAINERS):
            lab.power("stopped")
            lab.sandbox.backend_host.crashed = False
            containers.append(run_container(work, memory_mb, environ, steps))
        report(memory_mb, containers)


def at_lambdas_default_timeout(lab: Lab, work: Path, environ: dict[str, str]) -> None:
    """The original console setup: 128 MB and Lambda's default timeout of 3 s, one attempt of each call. How long
    each action takes, and the least time any of them had left when it answered (what the answer margin kept)."""
    lambdas_default = {**environ, "IDLE_TIMEOUT_SECONDS": "1", "IDLE_CPU_PERCENT": "0", "HTTP_TIMEOUT_SECONDS": "5"}
    with SilentServer() as silent:
        hangs = {**lambdas_default, "BACKEND_BASE_URL": silent.url}
        cases = [
            (lambdas_default, [("start, a stopped instance", lab.stopped),
                               ("check_idle, backend idle past the timeout", lab.idle_past_a_second)]),
            (hangs, [("check_idle, a backend that never answers", lab.up)]),
        ]  # fmt: skip
        print(f"128 MB with a {SHORT_TIMEOUT_SECONDS:g} s timeout (Lambda's default); medians of {CONTAINERS}:")
        print(f"  {'invocation':44s} {'CPU ms':>8s} {'wall ms':>9s} {'left ms':>8s}   answer")
        for env, case in cases:
            containers = []
            for _ in range(CONTAINERS):
                lab.power("stopped")
                containers.append(run_container(work, 128, env, case, SHORT_TIMEOUT_SECONDS))
            for index, (name, _) in enumerate(case):
                rows = [container.invocations[index] for container in containers]
                cpu, wall = statistics.median(r.cpu_ms for r in rows), statistics.median(r.wall_ms for r in rows)
                least_left = SHORT_TIMEOUT_SECONDS * 1000 - max(r.wall_ms for r in rows)
                answer = rows[0].answer
                said = answer.get("decision") or answer.get("state") or answer.get("error", {}).get("code")
                print(f"  {name:44s} {cpu:8.0f} {wall:9.0f} {least_left:8.0f}   {said}")
    print(f"  (left ms: the least time any of the {CONTAINERS} had left when it answered, of the 3,000)")


class SilentServer:
    """A backend that accepts connections on 127.0.0.1 and never answers."""

    def __enter__(self) -> SilentServer:
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        return self

    def __exit__(self, *_: object) -> None:
        self.listener.close()


def _sns(endpoint: str) -> Any:
    import boto3

    return boto3.client("sns", region_name="us-east-1", endpoint_url=endpoint)


if __name__ == "__main__":
    main()
