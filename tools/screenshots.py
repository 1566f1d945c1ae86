"""`make screenshots`: the Streamlit page in headless Chromium through a cold wake of the sandbox's backend, as PNGs
(before, during, after) in build/screenshots/, or in docs/images/ with UPDATE_DOCS=1 (then look at them before
committing). Drives Debian's chromium through chromedriver's W3C WebDriver API, with requests alone; installs both
with apt-get when they are missing and it runs as root. Not part of make test.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from tools.demo import ROOT, streamlit_page
from tools.sandbox import Sandbox

DOCS_IMAGES = ROOT / "docs" / "images"
BUILD_IMAGES = ROOT / "build" / "screenshots"  # ignored by git
CHROME_FLAGS = [  # as the workplace's probe runs it: root, no GPU, and no background traffic to the outside
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1000,760",
]  # fmt: skip


def ensure_chromium() -> None:
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(
            "make screenshots needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        )
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True)


class Browser:
    """One headless Chromium session through chromedriver on 127.0.0.1."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.driver = subprocess.Popen(["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        for _ in range(50):
            try:
                requests.get(f"{self.base}/status", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        options = {"binary": "/usr/bin/chromium", "args": [*CHROME_FLAGS, f"--user-data-dir={self.profile}"]}
        capabilities = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
        self.session = self.call("POST", "/session", capabilities)["sessionId"]

    def call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        prefix = "" if path == "/session" else f"/session/{self.session}"
        answer = requests.request(method, f"{self.base}{prefix}{path}", json=payload, timeout=60)
        answer.raise_for_status()
        return answer.json()["value"]

    def find(self, xpath: str, timeout: float = 30) -> str | None:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            found = self.call("POST", "/elements", {"using": "xpath", "value": xpath})
            if found:
                return str(next(iter(found[0].values())))
            time.sleep(0.25)
        return None

    def shot(self, folder: Path, name: str) -> Path:
        path = folder / name
        path.write_bytes(base64.b64decode(self.call("GET", "/screenshot")))
        print(f"wrote {path.relative_to(ROOT)}")
        return path

    def close(self) -> None:
        try:
            self.call("DELETE", "")
        finally:
            self.driver.terminate()
            self.driver.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)


def main() -> int:
    ensure_chromium()
    folder = DOCS_IMAGES if os.environ.get("UPDATE_DOCS") else BUILD_IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.gettempdir()) / "backend-orchestrator-screenshots.jsonl"  # the function's own lines
    with (
        Sandbox(boot_seconds=12.0, function_log=log) as sandbox,
        streamlit_page(sandbox, BACKEND_PREWARM="false") as url,
    ):
        browser = Browser()
        try:
            browser.call("POST", "/url", {"url": url})
            if browser.find("//*[contains(text(), 'Backend: stopped')]") is None:
                sys.exit("the page did not show the backend's state")
            browser.shot(folder, "app-before.png")
            button = browser.find("//button[.//p[text()='Run grid search']]")
            assert button is not None
            browser.call("POST", f"/element/{button}/click", {})
            if browser.find("//*[contains(text(), 'booting, ')]") is None:
                sys.exit("the wake's progress never showed")
            time.sleep(5)  # well into the boot: the bar and the seconds have moved
            browser.shot(folder, "app-during.png")
            if browser.find("//*[contains(text(), 'The backend accepted the grid search')]", timeout=60) is None:
                sys.exit("the job's answer never showed")
            time.sleep(0.5)
            browser.shot(folder, "app-after.png")
        finally:
            browser.close()
    if folder == BUILD_IMAGES:
        print("UPDATE_DOCS=1 writes them to docs/images/ instead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
