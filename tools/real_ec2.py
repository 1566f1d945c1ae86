"""What real EC2 sends that moto does not, for the tests, the sandbox and the benchmark: DescribeInstances'
CpuOptions (cores, threads per core), from which the function reads the vCPU count (EC2 API reference,
CpuOptions). Standard library only: the benchmark's runtime imports it before the function."""

from __future__ import annotations

from typing import Any

# The instance types the tests, the sandbox and moto's default launch.
CPU_OPTIONS = {"t3.medium": (1, 2), "c6i.xlarge": (2, 2), "m5.16xlarge": (32, 2), "m1.small": (1, 1)}


def add_cpu_options(parsed: dict[str, Any], **_: Any) -> None:
    """A botocore after-call hook for DescribeInstances: add CpuOptions as real EC2 sends them."""
    for reservation in parsed.get("Reservations", []):
        for instance in reservation.get("Instances", []):
            cores, threads = CPU_OPTIONS[instance["InstanceType"]]
            instance.setdefault("CpuOptions", {"CoreCount": cores, "ThreadsPerCore": threads})
