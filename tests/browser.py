"""Headless Chromium for the page and report tests: the DOM after scripts ran, and screenshots under artifacts/."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def render(
    tmp_path: Path,
    url: str,
    *,
    shot: str | None = None,
    window: str = "1300,2000",
    budget_ms: int = 15000,
    min_shot_bytes: int = 5_000,
) -> str:
    """The DOM of `url` after its scripts ran; with `shot`, also a screenshot artifacts/<shot>.png."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium to run the browser tests")
    # The flags of a closed network: without the background-networking ones Chromium keeps dialling out.
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--virtual-time-budget={budget_ms}",
        "--hide-scrollbars",
    ]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    if shot:
        ARTIFACTS.mkdir(exist_ok=True)
        target = ARTIFACTS / f"{shot}.png"
        subprocess.run(
            [*flags, f"--window-size={window}", f"--screenshot={target}", url], capture_output=True, timeout=180
        )
        assert target.exists() and target.stat().st_size > min_shot_bytes
    return dom


def assert_charts_drawn(dom: str, n: int) -> None:
    """Every one of the page's n vega charts rendered to SVG."""
    assert dom.count('data-rendered="yes"') == n, "every chart rendered"
    assert not re.search(r'class="chart"[^>]*>chart failed', dom)
    assert dom.count("<svg") >= n and 'class="mark-' in dom
