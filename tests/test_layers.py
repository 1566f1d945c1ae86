"""The package's imports run one way: each module of lambda/orchestrator/ imports only the modules below it in
LAYERS (read from the code, not from a banner), the handler file only the top, and the pure rules nothing that does
I/O: they are testable without boto3."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lambda" / "orchestrator"
# Bottom up: a module may import the ones before it, never one after it.
LAYERS = (
    "words", "values", "logs", "errors", "windows", "settings", "budget", "events", "targets", "activity", "holds",
    "rules", "aws", "backend", "fleet", "group", "actions", "idle", "present", "preflight", "entry",
)  # fmt: skip
PURE = ("words", "values", "errors", "windows", "settings", "targets", "activity", "holds", "rules")
IO_LIBRARIES = {"boto3", "botocore", "socket", "ssl", "http", "urllib.request", "requests", "urllib3"}
MAX_LINES = 400


def sources() -> dict[str, str]:
    """{module: its source} for the package's modules."""
    return {path.stem: path.read_text() for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def imported(source: str) -> set[str]:
    """Every module a source imports, at its top or inside a function, by its full dotted name."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names if node.module == "orchestrator"}
    return names


def violations(modules: dict[str, str]) -> list[str]:
    """Each import of a module of the package that is not below the importer in LAYERS."""
    found = []
    for name, source in modules.items():
        if name not in LAYERS:
            found.append(f"{name} is in no layer: add it to LAYERS where it belongs")
            continue
        below = set(LAYERS[: LAYERS.index(name)])
        found += [
            f"{name} imports {module}, which is not below it"
            for module in imported(source)
            if module.startswith("orchestrator.") and module.split(".")[1] not in below
        ]
    return found


def test_the_package_is_the_layers_and_each_module_imports_only_those_below_it() -> None:
    assert set(sources()) == set(LAYERS)
    assert violations(sources()) == []


@pytest.mark.parametrize(
    ("module", "line"),
    [
        pytest.param("words", "from orchestrator.entry import handle", id="the-bottom-imports-the-top"),
        pytest.param("rules", "from orchestrator.fleet import Instance", id="the-rules-import-an-edge"),
        pytest.param("aws", "import orchestrator.actions", id="an-edge-imports-an-action"),
        pytest.param("present", "from orchestrator import preflight", id="a-sibling-above"),
    ],
)
def test_an_upward_import_added_by_hand_is_caught(module: str, line: str) -> None:
    modules = sources()
    modules[module] = f"{line}\n{modules[module]}"
    assert len(violations(modules)) == 1


def test_the_handler_file_imports_only_the_top_and_is_a_few_lines() -> None:
    handler = (ROOT / "lambda" / "backend_orchestrator.py").read_text()
    ours = {module for module in imported(handler) if module.startswith("orchestrator")}
    assert ours == {"orchestrator.entry", "orchestrator.aws"}  # handle, and warm_clients for INIT
    code = [line for line in handler.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) <= 15


def test_no_module_is_over_about_400_lines() -> None:
    assert {
        name: len(source.splitlines()) for name, source in sources().items() if len(source.splitlines()) > MAX_LINES
    } == {}


def test_the_pure_rules_import_nothing_that_does_io() -> None:
    modules = sources()
    for name in PURE:
        reached = {module for module in imported(modules[name]) if not module.startswith("orchestrator")}
        assert not {module for module in reached if module.split(".")[0] in IO_LIBRARIES or module in IO_LIBRARIES}, (
            name
        )
        assert {
            module.split(".")[1] for module in imported(modules[name]) if module.startswith("orchestrator.")
        } <= set(PURE), name


def test_the_rules_run_without_boto3() -> None:
    probe = """
import sys
for blocked in ("boto3", "botocore", "socket", "ssl", "http", "urllib.request"):
    sys.modules[blocked] = None  # importing any of them now fails
from datetime import UTC, datetime, timedelta
from orchestrator.activity import Activity
from orchestrator.rules import judge
from orchestrator.settings import Config
from orchestrator.targets import InstanceInfo
now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
info = InstanceInfo("running", now - timedelta(hours=2), 2)
judged = judge(Config(instance_id="i-0abc123def4567890"), info, None, now, backend=lambda: Activity(5000.0),
               metrics=lambda *_: (True, "idle"))
print(judged.verdict.decision)
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT / "lambda", capture_output=True, text=True, check=False, timeout=60
    )
    assert (done.returncode, done.stdout.strip()) == (0, "stop"), done.stderr
