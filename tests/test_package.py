"""`make package`: a reproducible zip for Lambda's platform, smoke-tested the way the runtime loads it."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import boto3
import pytest

from tests.helpers import REGION, instance_state, stopped_instance
from tools import package

HOST_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
    platform.machine().lower()
)
NETWORK_FAILURES = ("NewConnectionError", "Failed to establish", "Temporary failure in name resolution",
                    "Network is unreachable", "ConnectTimeoutError", "Max retries exceeded")  # fmt: skip
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "six.py", "urllib3")
pytestmark = pytest.mark.xdist_group("zips")  # one worker builds each zip once (make test runs with --dist loadgroup)


def build(python: str, arch: str, output: Path) -> Path:
    try:
        return package.build(python, arch, output)
    except package.PackageError as error:
        if any(marker in str(error) for marker in NETWORK_FAILURES):
            pytest.skip(f"pip cannot reach the package index here: {str(error).splitlines()[-1]}")
        raise


@pytest.fixture(scope="module")
def host_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zip for this machine's CPython and architecture, so that it can run here."""
    if HOST_PYTHON not in package.PYTHONS or HOST_ARCH is None:
        pytest.skip(f"no Lambda runtime matches this Python {HOST_PYTHON} on {platform.machine()}")
    return build(HOST_PYTHON, HOST_ARCH, tmp_path_factory.mktemp("zip") / "lambda.zip")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_builds_are_byte_identical(host_zip: Path, tmp_path: Path) -> None:
    again = build(HOST_PYTHON, HOST_ARCH or "x86_64", tmp_path / "again.zip")
    assert sha256(again) == sha256(host_zip)


def test_the_zip_holds_the_handler_and_its_pinned_dependencies_and_nothing_else(host_zip: Path) -> None:
    with zipfile.ZipFile(host_zip) as archive:
        infos = archive.infolist()
    names = [info.filename for info in infos]
    assert names == sorted(names)
    top = {name.split("/")[0] for name in names}
    packages = {name for name in top if not name.endswith(".dist-info")}
    pinned = {name.replace("-", "_") for name in package.pinned(package.REQUIREMENTS)}
    assert packages == {*package.SOURCES, *pinned}  # the handler file, the package beside it, and the pins
    assert {name.split("-")[0] for name in top if name.endswith(".dist-info")} == pinned
    for name in names:
        assert "__pycache__" not in name, name
        assert not name.endswith(".pyc"), name
        assert "/tests/" not in name, name
        assert name.rsplit("/", 1)[-1] not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"), name
    assert not top & {"boto3", "botocore", "s3transfer", "jmespath", "bin"}
    assert {info.date_time for info in infos} == {package.FIXED_TIME}
    assert {info.external_attr >> 16 for info in infos} <= {0o100644, 0o100755}
    assert (host_zip.parent / "lambda.zip").stat().st_size < 1024 * 1024


def test_the_pinned_versions_are_the_ones_shipped(host_zip: Path) -> None:
    pins = package.pinned(package.REQUIREMENTS)
    with zipfile.ZipFile(host_zip) as archive:
        shipped = {name.split("/")[0] for name in archive.namelist() if ".dist-info/" in name}
    assert {f"{name.replace('-', '_')}-{version}.dist-info" for name, version in pins.items()} == shipped


SMOKE = r"""
import importlib, importlib.util, json, sys
task, runtime = sys.argv[1], sys.argv[2]
sys.path[:0] = [task, runtime]  # Lambda puts /var/task before the runtime's own packages
module_name, function_name = "backend_orchestrator.lambda_handler".rsplit(".", 1)
handler = getattr(importlib.import_module(module_name), function_name)
result = handler(json.loads(sys.argv[3]), None)
print(json.dumps({"result": result, "handler": sys.modules[module_name].__file__,
                  "requests": importlib.util.find_spec("requests") is not None}))
"""


def run_from_zip(
    python: str, extracted: Path, runtime: Path, event: dict[str, str], env: dict[str, str]
) -> dict[str, object]:
    """The handler in a fresh interpreter that sees only the zip, boto3 and its dependencies."""
    base = {"PATH": os.environ["PATH"], "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}  # fmt: skip
    # -I: no user site, no PYTHONPATH; -S: no site-packages: only the zip and the runtime's packages. Bytecode goes
    # to a directory beside the runtime's, so that each interpreter compiles boto3 once, not at every run.
    pycache = f"pycache_prefix={runtime.with_name('pycache')}"
    command = [python, "-I", "-S", "-X", pycache, "-c", SMOKE, str(extracted), str(runtime), json.dumps(event)]
    done = subprocess.run(command, env={**base, **env}, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    output: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return output


def lambda_python(version: str) -> str | None:
    """An interpreter of this version here: the running one, one on PATH, or pyenv's; None if none."""
    if version == HOST_PYTHON:
        return sys.executable
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [
        shutil.which(f"python{version}"),
        *sorted(glob.glob(f"{pyenv}/versions/{version}.*/bin/python{version}")),
    ]
    check = f"import sys; sys.exit(sys.version_info[:2] != {tuple(map(int, version.split('.')))})"
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", check], capture_output=True, check=False, timeout=30).returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the Lambda runtime ships besides the standard library: boto3 and its dependencies."""
    runtime = tmp_path_factory.mktemp("runtime")
    site = Path(boto3.__file__).parent.parent
    for name in RUNTIME_PACKAGES:
        (runtime / name).symlink_to(site / name)
    return runtime


@pytest.fixture(scope="module", params=package.PYTHONS, ids=[f"python{v}" for v in package.PYTHONS])
def lambda_task(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(interpreter, extracted zip) for one Lambda Python version, built for this machine's architecture."""
    version: str = request.param
    python = lambda_python(version)
    if python is None or HOST_ARCH is None:
        pytest.skip(f"no python{version} for {platform.machine()} on this machine to run its zip with")
    if version == HOST_PYTHON:
        archive: Path = request.getfixturevalue("host_zip")  # the same build: made once
    else:
        archive = build(version, HOST_ARCH, tmp_path_factory.mktemp("zip") / f"lambda-{version}.zip")
    task = tmp_path_factory.mktemp("task")
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(task)
    return python, task


def test_smoke_config_error_comes_back_clearly(lambda_task: tuple[str, Path], runtime_dir: Path) -> None:
    python, task = lambda_task
    output = run_from_zip(python, task, runtime_dir, {"action": "start"}, {})
    result = output["result"]
    assert isinstance(result, dict)
    assert result["error"]["code"] == "config_error"
    assert "INSTANCE_ID" in result["error"]["message"]
    assert str(output["handler"]).startswith(str(task))
    assert output["requests"] is False  # the function needs nothing the runtime and the zip do not have


def test_smoke_starts_a_stopped_instance_in_moto_server(
    lambda_task: tuple[str, Path], runtime_dir: Path, moto_url: str
) -> None:
    python, task = lambda_task
    instance_id = stopped_instance(moto_url)
    # No system time zone database, as Lambda's image may have none: KEEP_WARM's zone comes from the zip's tzdata.
    env = {"INSTANCE_ID": instance_id, "AWS_ENDPOINT_URL_EC2": moto_url, "PYTHONTZPATH": str(task / "no-zoneinfo"),
           "KEEP_WARM": "Mon-Sun 00:00-24:00 Europe/Berlin"}  # fmt: skip
    result = run_from_zip(python, task, runtime_dir, {"action": "start"}, env)["result"]
    assert isinstance(result, dict)
    assert (result["ok"], result["previous_state"]) == (True, "stopped"), result
    assert instance_state(moto_url, instance_id) in ("pending", "running")


@pytest.mark.parametrize("arch", list(package.PLATFORMS))
def test_the_zip_holds_no_native_module(tmp_path: Path, arch: str) -> None:
    # Pure Python: the same bytes serve x86_64 and arm64; build() refuses a native module for the wrong machine.
    assert package.native_modules(build("3.12", arch, tmp_path / f"{arch}.zip")) == {}


def test_a_native_module_for_the_wrong_machine_is_named(tmp_path: Path) -> None:
    archive = tmp_path / "fake.zip"
    elf_header = b"\x7fELF" + bytes(14) + (0xB7).to_bytes(2, "little")  # e_machine at offset 18: aarch64
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("fast/_speedups.so", elf_header)
    assert package.native_modules(archive) == {"fast/_speedups.so": "aarch64"}


@pytest.mark.parametrize(
    ("python", "arch", "says"), [("3.10", "x86_64", "LAMBDA_PYTHON"), ("3.12", "amd64", "LAMBDA_ARCH")]
)
def test_bad_build_settings_are_refused_clearly(tmp_path: Path, python: str, arch: str, says: str) -> None:
    with pytest.raises(package.PackageError, match=says):
        package.build(python, arch, tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()
