"""Headless Chromium for the report tests: open a page, check every image decoded and the metrics
table has rows, keep a screenshot. Chromium comes from Debian (`make test` installs it where it can)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandbox without a display or network (Chromium otherwise tries Google's hosts).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND"]
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.rows = document.querySelectorAll('#metrics tbody tr').length;
});
</script></body>"""


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={cwd / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def render_and_check(report: Path, *, expect_images: int, screenshot: Path) -> None:
    """Open the report in headless Chromium: all images decoded, the metrics table has rows."""
    probed = report.with_name("probed.html")
    probed.write_text(report.read_text().replace("</body>", PROBE))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri(), cwd=report.parent).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, "Chromium printed no DOM"
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(0)))
    assert int(attrs["images"]) == expect_images and attrs["loaded"] == attrs["images"], attrs
    assert int(attrs["rows"]) >= 3
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    _chromium("--window-size=1280,2400", f"--screenshot={screenshot}", report.as_uri(), cwd=report.parent)
    assert Image.open(screenshot).size == (1280, 2400)


def needs_chromium() -> None:
    """Skip on a user's machine without Chromium; in CI (CI set) its absence is a failure, not a skip."""
    if CHROMIUM is None:
        message = "Chromium is not installed: `make test` installs Debian's chromium where it can (apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


