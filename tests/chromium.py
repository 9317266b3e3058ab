"""Open an HTML file in headless Chromium: which images rendered, and a screenshot.

    python tests/chromium.py REPORT.html [SCREENSHOT.png]

Chromium runs with no network activity of its own and a throw-away profile. The page is copied
with a small inline script that, once the page has loaded, writes every <img>'s naturalWidth
into a data attribute of <body>; --dump-dom then prints the DOM with it.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
PROBE = ("<script>window.addEventListener('load', () => { document.body.dataset.imageWidths = "
         "Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0).join(','); });</script>")


def _run(args: list[str], profile: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                           *args], capture_output=True, text=True, timeout=timeout)


def image_widths(html_file: Path) -> list[int]:
    """naturalWidth of every <img> on the page after load (0 = did not render)."""
    with tempfile.TemporaryDirectory(prefix="invmon-chromium-") as tmp:
        probe = Path(tmp) / "page.html"
        probe.write_text(html_file.read_text().replace("</body>", PROBE + "</body>"))
        done = _run(["--dump-dom", probe.as_uri()], str(Path(tmp) / "profile"))
    found = re.search(r'data-image-widths="([0-9,]*)"', done.stdout)
    if not found:
        raise RuntimeError(f"chromium printed no DOM with the probe (rc {done.returncode}): {done.stderr[-500:]}")
    return [int(w) for w in found.group(1).split(",") if w]


def screenshot(html_file: Path, png: Path, width: int = 1200, height: int = 2400) -> Path:
    with tempfile.TemporaryDirectory(prefix="invmon-chromium-") as tmp:
        _run([f"--screenshot={png.resolve()}", f"--window-size={width},{height}", html_file.resolve().as_uri()],
             str(Path(tmp) / "profile"))
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot at {png}")
    return png


if __name__ == "__main__":
    page = Path(sys.argv[1])
    widths = image_widths(page)
    print(f"{len(widths)} images, {sum(1 for w in widths if w > 0)} rendered")
    if len(sys.argv) > 2:
        print(f"screenshot: {screenshot(page, Path(sys.argv[2]))}")
    sys.exit(0 if widths and all(widths) else 1)
