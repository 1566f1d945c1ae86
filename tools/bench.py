"""`make bench`: each action's worst-case wall time, what a cold start costs beyond boto3, each action's
latency against moto, and (tools/lambda_bench.py) the built zip under awslambdaric at Lambda's CPU share.

Timings live here, not in tests: they vary with the machine. Medians of several runs. The worst-case
table is arithmetic on the function's constants, so it is exact, and docs/deploy.md carries it (a test
keeps the two equal).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNS = 9
TEMPLATE_TIMEOUT_SECONDS = 60  # template.yaml's Function Timeout (a test keeps them equal)


# The configuration whose actions wait longest: every option that adds a step on (a drain, hibernation, notices).
LONGEST_ENVIRONMENT = {
    "INSTANCE_ID": "i-0abc123def4567890",
    "BACKEND_BASE_URL": "http://10.0.1.50:8000",
    "DRAIN_PATH": "/api/drain",
    "STOP_HIBERNATE": "true",
    "NOTIFY_TOPIC_ARN": "arn:aws:sns:eu-central-1:123456789012:backend-orchestrator",
}


def worst_case_table(timeout_seconds: float = TEMPLATE_TIMEOUT_SECONDS) -> str:
    """Each action's longest path, as the function computes it (longest_path), as a Markdown table."""
    sys.path.insert(0, str(ROOT / "lambda"))
    from orchestrator import budget as times
    from orchestrator.settings import Config
    from orchestrator.words import Action

    config = Config.from_env(LONGEST_ENVIRONMENT)
    budget = timeout_seconds - times.answer_margin(timeout_seconds)
    call = times.aws_call_seconds(times.AWS_MAX_ATTEMPTS)
    backoff = call - times.AWS_MAX_ATTEMPTS * (times.AWS_CONNECT_TIMEOUT_SECONDS + times.AWS_READ_TIMEOUT_SECONDS)
    lines = [
        f"| action | what it may wait for, each at its worst | sum | answered within ({timeout_seconds:g} s timeout) |",
        "|---|---|---|---|",
        f"| one AWS API call | {times.AWS_MAX_ATTEMPTS} attempts of {times.AWS_CONNECT_TIMEOUT_SECONDS:g} s connect "
        f"and {times.AWS_READ_TIMEOUT_SECONDS:g} s read, and {backoff:g} s of retry backoff | {call:g} s "
        f"| {min(call, budget):g} s |",
    ]
    for action in Action:
        steps = times.longest_path(action, config)
        total = sum(seconds for _, seconds in steps)
        shown = ", ".join(step if math.isinf(seconds) else f"{step} {seconds:g} s" for step, seconds in steps)
        sum_text = "no bound" if math.isinf(total) else f"{total:g} s"
        lines.append(f"| `{action}` | {shown} | {sum_text} | {min(total, budget):g} s |")
    return "\n".join(lines)


def timeouts_table() -> str:
    """Each action's shortest timeout and the one from which its calls get whole first attempts (docs/deploy.md)."""
    sys.path.insert(0, str(ROOT / "lambda"))
    from orchestrator import budget as times
    from orchestrator.settings import Config
    from orchestrator.words import Action

    instance = Config.from_env({"INSTANCE_ID": "i-0abc123def4567890"})
    group = Config.from_env({"AUTO_SCALING_GROUP_NAME": "pyelli-backend"})
    lines = ["| action | `timeout_too_short` below | whole first attempts from |", "|---|---|---|"]
    for config, of in ((instance, ""), (group, ", a group")):
        for action in Action:
            if action is not Action.PREFLIGHT:  # it answers what it could check, whatever the time
                shortest, whole = times.shortest_timeout(action, config), times.whole_attempts_timeout(action, config)
                lines.append(f"| `{action}`{of} | {shortest:g} s | {whole:g} s |")
    return "\n".join(lines)


IMPORT_PROBE = """
import sys, time
t0 = time.perf_counter(); import boto3; t1 = time.perf_counter()
sys.path.insert(0, {lambda_dir!r}); import backend_orchestrator; t2 = time.perf_counter()
heavy = sorted({{m.split(".")[0] for m in sys.modules}} - {{m.split(".")[0] for m in {before}}})
print((t1 - t0) * 1000, (t2 - t1) * 1000, ",".join(heavy))
"""


def import_cost() -> None:
    before = subprocess.run(
        [sys.executable, "-c", "import sys, boto3; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A fresh copy and -B: compiled from source each time, as on Lambda (the zip carries no .pyc).
    fresh = Path(tempfile.mkdtemp())
    shutil.copy(ROOT / "lambda" / "backend_orchestrator.py", fresh)
    shutil.copytree(
        ROOT / "lambda" / "orchestrator", fresh / "orchestrator", ignore=shutil.ignore_patterns("__pycache__")
    )
    probe = IMPORT_PROBE.format(lambda_dir=str(fresh), before=before)
    boto, ours, heavy = [], [], ""
    for _ in range(RUNS):
        out = subprocess.run(
            [sys.executable, "-B", "-c", probe], capture_output=True, text=True, check=True
        ).stdout.split()
        boto.append(float(out[0]))
        ours.append(float(out[1]))
        heavy = out[2] if len(out) > 2 else ""
    shutil.rmtree(fresh)
    print(f"cold import, median of {RUNS} fresh interpreters:")
    print(f"  import boto3                      {statistics.median(boto):7.1f} ms")
    print(f"  import backend_orchestrator after {statistics.median(ours):7.1f} ms (compiled from source, as on Lambda)")
    print(f"  modules it imports that boto3 had not: {heavy or 'none'}")


def action_latency() -> None:
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        MOTO_EC2_LOAD_DEFAULT_AMIS="false",
    )
    sys.path.insert(0, str(ROOT / "lambda"))
    import boto3
    from moto import mock_aws

    from examples.reference_backend import ReferenceBackend
    from orchestrator.entry import handle
    from orchestrator.logs import LOG, METRICS_LOG

    server = ReferenceBackend(("127.0.0.1", 0))  # the same backend the demo and the README use
    threading.Thread(target=server.serve_forever, daemon=True).start()
    LOG.disabled = METRICS_LOG.disabled = True
    try:
        with mock_aws():
            ec2 = boto3.client("ec2", region_name="us-east-1")
            instance_id = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0][
                "InstanceId"
            ]
            env = {
                "INSTANCE_ID": instance_id,
                "AWS_REGION": "us-east-1",
                "BACKEND_BASE_URL": server.url,
            }
            cases = {
                "start (running instance)": {"action": "start"},
                "status (running, /health)": {"action": "status"},
                "check_idle (running, keep)": {"action": "check_idle"},
                "check_idle (stopped, skip)": {"action": "check_idle"},
            }
            print(f"handler latency against moto (in-process), median of {RUNS} warm calls:")
            for name, event in cases.items():
                if "stopped" in name:
                    ec2.stop_instances(InstanceIds=[instance_id])
                handle(event, None, env)  # warm: the client is built once per container
                samples = []
                for _ in range(RUNS):
                    t0 = time.perf_counter()
                    result = handle(event, None, env)
                    samples.append((time.perf_counter() - t0) * 1000)
                    assert result["ok"], result
                print(f"  {name:32s} {statistics.median(samples):7.1f} ms")
    finally:
        server.shutdown()
        server.server_close()


def group_check_idle(sizes: tuple[int, ...] = (1, 4, 16), answer_seconds: float = 0.5, runs: int = 3) -> None:
    """check_idle of an Auto Scaling group of 1, 4 and 16 instances in moto, each instance's backend answering after
    `answer_seconds`: wall time and AWS calls, side by side (the backends are read at once, the calls are a few)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import boto3
    from moto import mock_aws

    from orchestrator.entry import handle
    from orchestrator.logs import LOG, METRICS_LOG
    from tools.harness import make_group

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(answer_seconds)
            body = b'{"idle_seconds": 10}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    class Backends(ThreadingHTTPServer):  # every instance's backend, at /<instance id>/
        daemon_threads = True
        request_queue_size = 64  # the 16 reads arrive at once: the default backlog of 5 would make some retry a SYN

    server = Backends(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{{instance_id}}"
    LOG.disabled = METRICS_LOG.disabled = True
    calls: list[str] = []
    print(f"check_idle of an Auto Scaling group, each backend answering after {answer_seconds:g} s (moto in-process), "
          f"median of {runs} (the instances protected by a first, warm check):")  # fmt: skip
    try:
        for size in sizes:
            with mock_aws():
                boto3.setup_default_session()  # the function's clients come from it: its events count their calls
                boto3.DEFAULT_SESSION.events.register(  # type: ignore[union-attr]
                    "before-parameter-build", lambda model, **_: calls.append(model.name)
                )
                make_group(
                    boto3.client("ec2"), boto3.client("autoscaling"), f"bench-{size}", desired=size, max_size=size
                )
                env = {
                    "AUTO_SCALING_GROUP_NAME": f"bench-{size}",
                    "AWS_REGION": "us-east-1",
                    "BACKEND_INSTANCE_URL": url,
                }
                handle({"action": "check_idle"}, None, env)  # warm: the clients are built once per container
                samples = []
                for _ in range(runs):
                    calls.clear()
                    started = time.perf_counter()
                    result = handle({"action": "check_idle"}, None, env)
                    samples.append(time.perf_counter() - started)
                    assert len(result["instances"]) == size, result
            print(f"  {size:2d} instances   {statistics.median(samples):5.2f} s   {len(calls)} AWS calls: "
                  f"{', '.join(calls)}")  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()


def wake_overshoot(boot_delays: tuple[float, ...] = (2.0, 3.3, 4.7), runs: int = 3) -> None:
    """How long wake_backend() returns after the backend turned healthy, on the local sandbox."""
    from examples.wake_backend import wake_backend
    from tools.sandbox import Sandbox

    overshoots: list[float] = []
    with Sandbox(function_log=Path(tempfile.gettempdir()) / "backend-orchestrator-bench.jsonl") as sandbox:
        host = sandbox.backend_host
        for boot_seconds in boot_delays:
            host.boot_seconds = boot_seconds
            for _ in range(runs):
                wake_backend(sandbox.function_url, sandbox.backend_url, deadline_seconds=60)
                returned = time.monotonic()
                assert host.backend is not None
                overshoots.append(returned - host.backend.ready_at)
                sandbox.invoke({"action": "stop"})
                host.wait_until_off(time.monotonic() + 10)  # powered off: the next wake starts cold
    print(f"wake_backend() after the backend turned healthy ({runs} wakes each after {boot_delays} s of boot):")
    print(f"  overshoot median {statistics.median(overshoots):5.2f} s, max {max(overshoots):5.2f} s")


def client_deadline(deadline_seconds: float = 5.0) -> None:
    """wake_backend(deadline_seconds=5) against an orchestrator that hangs, and one that sends a byte a second."""
    import socket

    from examples.wake_backend import WakeError, wake_backend

    def hang(connection: socket.socket) -> None:
        connection.recv(65536)
        time.sleep(30)

    def trickle(connection: socket.socket) -> None:
        connection.recv(65536)
        for byte in b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n\r\n" + b"{}" * 100:
            connection.sendall(bytes([byte]))
            time.sleep(1.0)

    print(f"wake_backend(deadline_seconds={deadline_seconds:g}) against an orchestrator that misbehaves:")
    for name, behave in (("never answers", hang), ("sends a byte a second", trickle)):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/"

            def serve(listener: socket.socket = listener, behave: Any = behave) -> None:
                connection, _ = listener.accept()
                with connection:
                    behave(connection)

            threading.Thread(target=serve, daemon=True).start()
            started, said = time.monotonic(), "woken (it should not be)"
            try:
                wake_backend(url, "http://127.0.0.1:9/", deadline_seconds=deadline_seconds)  # port 9: nothing listens
            except WakeError as error:
                said = f"{type(error).__name__}: {str(error)[:70]}..."
            print(f"  {name:24s} returned after {time.monotonic() - started:5.2f} s   {said}")


if __name__ == "__main__":
    print("worst-case wall time per action (docs/deploy.md, 'Time bounds'):")
    print(worst_case_table())
    print()
    print("each action's shortest timeout (docs/deploy.md, 'Time bounds'):")
    print(timeouts_table())
    print()
    wake_overshoot()
    print()
    client_deadline()
    print()
    import_cost()
    action_latency()
    print()
    group_check_idle()
    print()
    from tools import lambda_bench

    lambda_bench.main()
