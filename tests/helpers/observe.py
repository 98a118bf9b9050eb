"""Reading what the stack exposes: metrics scraped and parsed, status pages, a real headless Chromium."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.config import PROJECT_ROOT
from controlplane.node import processes

ARTIFACTS = PROJECT_ROOT / "test-artifacts"


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(control_plane: Any, path: str = "/metrics") -> str:
    status, body = processes.http_get(f"http://127.0.0.1:{control_plane.metrics_port}{path}")
    assert status == 200, body
    return body


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("chromium not found: ./dev test installs Debian's chromium package")
    return found


@contextlib.contextmanager
def driven_browser(profile: Path) -> Iterator[Any]:
    """Debian's chromium driven by its chromium-driver through Selenium (no browser or driver download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if not driver_path:
        pytest.fail("chromedriver not found: ./dev test installs Debian's chromium-driver package")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--window-size=1280,1400",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def browser(*args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=60)


def status(control_plane: Any) -> dict[str, Any]:
    return json.loads(scrape(control_plane, "/api/status"))  # type: ignore[no-any-return]
