"""What real EC2 sends that moto does not, for the tests, the sandbox and the benchmark: DescribeInstances'
CpuOptions (cores, threads per core), from which the function reads the vCPU count (EC2 API reference,
CpuOptions), and a LaunchTime of the last start. Standard library only: the benchmark's runtime imports it before
the function (tools.harness.RealEc2 plays the rest in the tests' and the sandbox's own process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

# The instance types the tests, the sandbox and moto's default launch.
CPU_OPTIONS = {"t3.medium": (1, 2), "c6i.xlarge": (2, 2), "m5.16xlarge": (32, 2), "m1.small": (1, 1)}


def described_instances(parsed: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each instance in a DescribeInstances answer, across its reservations."""
    for reservation in parsed.get("Reservations", []):
        yield from reservation.get("Instances", [])


def add_cpu_options(parsed: dict[str, Any], **_: Any) -> None:
    """A botocore after-call hook for DescribeInstances: add CpuOptions as real EC2 sends them."""
    for instance in described_instances(parsed):
        cores, threads = CPU_OPTIONS[instance["InstanceType"]]
        instance.setdefault("CpuOptions", {"CoreCount": cores, "ThreadsPerCore": threads})


def launch_times_from(path: Path) -> Any:
    """An after-call hook for DescribeInstances that sets LaunchTime from a JSON file {instance ID: ISO time}, for
    a process apart from the one that decides when the instance started (the benchmark's runtime)."""

    def hook(parsed: dict[str, Any], **_: Any) -> None:
        launched = json.loads(path.read_text()) if path.exists() else {}
        for instance in described_instances(parsed):
            if instance["InstanceId"] in launched:
                instance["LaunchTime"] = datetime.fromisoformat(launched[instance["InstanceId"]])

    return hook
