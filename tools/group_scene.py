"""`make demo`'s last scene: an Auto Scaling group of two backends in moto's Auto Scaling, each instance's reference
backend on its own port. One runs a job and stays, protected; the other idles and is scaled in; then the group goes
to zero, and start wakes it.

GroupNetwork stands in for the VPC and the load balancer on 127.0.0.1: a path /<instance id>/... reaches that
instance's own backend (BACKEND_INSTANCE_URL is http://127.0.0.1:<port>/{instance_id}, where in AWS it would be
http://{private_ip}:8000), and any other path the first instance in service (BACKEND_BASE_URL, the load balancer).
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import requests

from examples.reference_backend import ReferenceBackend
from tools.harness import REGION, group_members, invoke, make_group

GROUP = "pyelli-backend"
Row = Callable[[str, str, str, str], None]  # actor, action, state, result


class GroupNetwork(ThreadingHTTPServer):
    """Each instance the group lists in service gets a reference backend on its own port (sync()); requests reach
    them by /<instance id>/ or, as through a load balancer, the first one."""

    daemon_threads = True

    def __init__(self, autoscaling: Any) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.autoscaling = autoscaling
        self.backends: dict[str, ReferenceBackend] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def sync(self) -> list[str]:
        """Power each instance in service on, and the others off; returns the instances now served."""
        serving = [
            m["InstanceId"] for m in group_members(self.autoscaling, GROUP) if m["LifecycleState"] == "InService"
        ]
        with self._lock:
            for instance_id in [i for i in self.backends if i not in serving]:
                gone = self.backends.pop(instance_id)
                gone.shutdown()
                gone.server_close()
            for instance_id in [i for i in serving if i not in self.backends]:
                backend = ReferenceBackend(("127.0.0.1", 0))
                threading.Thread(target=backend.serve_forever, name=f"backend {instance_id}", daemon=True).start()
                self.backends[instance_id] = backend
        return serving

    def close(self) -> None:
        for backend in self.backends.values():
            backend.shutdown()
            backend.server_close()
        self.shutdown()
        self.server_close()

    def target(self, path: str) -> tuple[ReferenceBackend | None, str]:
        first, _, rest = path.lstrip("/").partition("/")
        with self._lock:
            if first in self.backends:
                return self.backends[first], "/" + rest
            return next(iter(self.backends.values()), None), path


class _Forward(BaseHTTPRequestHandler):
    server: GroupNetwork

    def do_GET(self) -> None:
        backend, path = self.server.target(self.path)
        if backend is None:  # nothing in service behind the balancer
            self.send_error(503, "no instance in service")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        host, port = backend.server_address[:2]
        connection = http.client.HTTPConnection(str(host), int(port), timeout=10)
        try:
            connection.request(self.command, path, body=body)
            answer = connection.getresponse()
            data = answer.read()
        finally:
            connection.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_DELETE = do_GET

    def log_message(self, *_: Any) -> None:
        pass


def play(moto_url: str, row: Row, *, idle_timeout_seconds: int, job_seconds: float, fail: type[Exception]) -> None:
    """The scene; raises `fail` when a step does not happen as it should."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)
    autoscaling = boto3.client("autoscaling", region_name=REGION, endpoint_url=moto_url)
    make_group(ec2, autoscaling, GROUP, desired=2)
    network = GroupNetwork(autoscaling)
    threading.Thread(target=network.serve_forever, name="group-network", daemon=True).start()
    environ = {**os.environ, "INSTANCE_ID": "", "AUTO_SCALING_GROUP_NAME": GROUP, "BACKEND_BASE_URL": network.url,
               "BACKEND_INSTANCE_URL": f"{network.url}/{{instance_id}}",
               "IDLE_TIMEOUT_SECONDS": str(idle_timeout_seconds)}  # fmt: skip
    try:
        worker, idler = network.sync()
        row("demo", "setup", "2 in svc", f"group {GROUP}: {worker} and {idler}, each backend on its own port")
        job = requests.post(f"{network.url}/{worker}/api/jobs?seconds={job_seconds:g}", timeout=5)
        row("app", "POST /api/jobs", "2 in svc", f"{job.status_code}: a {job_seconds:g}s job on {worker}")
        time.sleep(idle_timeout_seconds + 0.5)
        checked = check(environ, network, row, fail)
        expected = {worker: ("keep", True), idler: ("stop", False)}
        if (checked["decision"], decided(checked)) != ("scale_in", expected):
            raise fail(f"the busy instance should stay, protected, and the idle one go; got {checked}")
        while not (ended := network.backends[worker].jobs_done):
            time.sleep(0.1)
        row("app", "job done", "1 in svc", f"{ended} job ended on {worker}")
        time.sleep(idle_timeout_seconds + 0.5)
        if check(environ, network, row, fail)["decision"] != "stop" or network.sync():
            raise fail("the group, idle, should have gone to zero")
        woken = invoke({"action": "start"}, environ)
        served = network.sync()
        row("app", "start", f"{len(served)} in svc", f"{woken.get('previous_state')} -> {woken.get('state')}: desired "
            f"capacity {woken.get('group', {}).get('desired_capacity')}, {', '.join(served)} in service")  # fmt: skip
        health = requests.get(f"{network.url}/health", timeout=5)
        row("app", "GET /health", f"{len(served)} in svc", f"{health.status_code} through the load balancer")
        if (woken.get("state"), health.status_code) != ("pending", 200):
            raise fail(f"start should wake the group from zero and its backend answer; got {woken}, {health}")
        row("demo", "done", f"{len(served)} in svc", "the group: one kept while it worked, scaled in, to zero, woken")
    finally:
        network.close()


def check(environ: dict[str, str], network: GroupNetwork, row: Row, fail: type[Exception]) -> dict[str, Any]:
    result = invoke({"action": "check_idle"}, environ)
    if not result.get("ok"):
        raise fail(f"check_idle failed: {result.get('error')}")
    served = network.sync()
    group = result["group"]
    row("schedule", "check_idle", f"{len(served)} in svc", f"{result['decision']}: desired capacity "
        f"{group['desired_before']} -> {group['desired_after']}")  # fmt: skip
    for instance in result["instances"]:
        shield = ", protected" if instance["protected"] else ""
        row("", "", "", f"  {instance['instance_id']}: {instance['decision']}{shield} ({instance['reason']})")
    return result


def decided(result: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    return {instance["instance_id"]: (instance["decision"], instance["protected"]) for instance in result["instances"]}
