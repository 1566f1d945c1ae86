"""Build the Lambda deployment zip: reproducible, and for Lambda's platform rather than this machine's.

    python tools/package.py --python 3.12 --arch x86_64 --output dist/lambda_backend_orchestrator.zip

The zip holds the contents of lambda/ at its root (the handler backend_orchestrator.py and the package orchestrator/
beside it) and the pinned, hash-checked wheels of lambda/requirements.txt, installed for manylinux2014 on the chosen
architecture and CPython version (a native module for the wrong machine fails the build). boto3 is left out: the
runtime has it. Two builds of the same commit are byte-identical: sorted entries, a fixed timestamp, fixed
permissions, no bytecode and no installer records.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAMBDA = ROOT / "lambda"
HANDLER = LAMBDA / "backend_orchestrator.py"
PACKAGE = LAMBDA / "orchestrator"
SOURCES = (HANDLER.name, PACKAGE.name)  # what the zip holds of lambda/: the handler file and the package
REQUIREMENTS = ROOT / "lambda" / "requirements.txt"
PYTHONS = ("3.11", "3.12", "3.13", "3.14")
PLATFORMS = {"x86_64": "manylinux2014_x86_64", "arm64": "manylinux2014_aarch64"}
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
# Written by the installer, not by the package: they differ between builds or say nothing useful.
INSTALLER_RECORDS = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
# ELF e_machine values: https://refspecs.linuxfoundation.org/elf/gabi4+/ch4.eheader.html
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64"}


class PackageError(Exception):
    """A build that cannot go on; the message says what to change."""


def install_dependencies(python: str, arch: str, target: Path) -> None:
    if not pinned(REQUIREMENTS):
        return  # nothing to ship beside the handler
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--require-hashes", "--no-deps", "--no-compile", "--only-binary=:all:",
        "--platform", PLATFORMS[arch], "--implementation", "cp", "--python-version", python,
        "--target", str(target), "-r", str(REQUIREMENTS),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PackageError(
            f"pip could not install {REQUIREMENTS.name} for {PLATFORMS[arch]} cp{python}:\n{result.stderr}"
        )


def pinned(requirements: Path) -> dict[str, str]:
    """{name: version} of each requirement pinned with == in a compiled requirements file."""
    pins = (line.split(" ")[0].split("==") for line in requirements.read_text().splitlines() if "==" in line)
    return {name: version for name, version in pins if not name.startswith("#")}


def zip_entries(site: Path) -> list[tuple[str, Path]]:
    """(name in the zip, file on disk), sorted; the handler and the package at the root."""
    entries = [(HANDLER.name, HANDLER)]
    entries += [(path.relative_to(LAMBDA).as_posix(), path) for path in sorted(PACKAGE.glob("*.py"))]
    for path in sorted(site.rglob("*")):
        relative = path.relative_to(site)
        top = relative.parts[0]
        if path.is_dir() or top == "bin" or {"__pycache__", "tests"} & set(relative.parts):
            continue  # bin/ holds console scripts, tests/ a package's own tests: the function uses neither
        if path.suffix == ".pyc" or (top.endswith(".dist-info") and path.name in INSTALLER_RECORDS):
            continue
        entries.append((relative.as_posix(), path))
    return sorted(entries)


def write_zip(entries: list[tuple[str, Path]], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w") as archive:
        for name, path in entries:
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.create_system = 3  # Unix, so that the permission bits below are honoured
            mode = 0o755 if path.suffix == ".so" else 0o644  # fixed, whatever the umask
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes(), compresslevel=9)
    partial.replace(output)


def native_modules(archive: Path) -> dict[str, str]:
    """Each compiled module in the zip and the machine its ELF header names."""
    found = {}
    with zipfile.ZipFile(archive) as zipped:
        for name in zipped.namelist():
            if name.endswith(".so"):
                header = zipped.read(name)[:20]
                machine = int.from_bytes(header[18:20], "little")
                found[name] = ELF_MACHINES.get(machine, f"unknown machine {machine:#x}")
    return found


def build(python: str, arch: str, output: Path) -> Path:
    if python not in PYTHONS:
        raise PackageError(f"LAMBDA_PYTHON={python!r} is not a Lambda Python runtime: use one of {', '.join(PYTHONS)}.")
    if arch not in PLATFORMS:
        raise PackageError(f"LAMBDA_ARCH={arch!r} is not a Lambda architecture: use x86_64 or arm64.")
    with tempfile.TemporaryDirectory(prefix="lambda-package-") as temporary:
        site = Path(temporary)
        install_dependencies(python, arch, site)
        write_zip(zip_entries(site), output)
    expected = "aarch64" if arch == "arm64" else "x86_64"
    wrong = {name: machine for name, machine in native_modules(output).items() if machine != expected}
    if wrong:
        output.unlink()
        raise PackageError(f"native modules built for the wrong machine (expected {expected}): {wrong}")
    return output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the Lambda runtime's Python version (3.11 to 3.14)")
    parser.add_argument("--arch", default="x86_64", help="x86_64 or arm64")
    parser.add_argument("--output", type=Path, default=ROOT / "dist" / "lambda_backend_orchestrator.zip")
    args = parser.parse_args()
    try:
        output = build(args.python, args.arch, args.output)
    except PackageError as error:
        print(f"make package: {error}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    print(f"{output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")
    print(f"  for   python{args.python} {args.arch} ({PLATFORMS[args.arch]})")
    print(f"  size  {output.stat().st_size:,} bytes")
    print(f"  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
