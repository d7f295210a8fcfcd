"""A screenshot of an experiment's ``report.html`` in headless Chromium, to check that the page renders
as meant (1280 px wide, a laptop screen) without a network.

    python benchmarks/report_screenshot.py [results/quickstart/report/report.html] [--out PNG]
        [--width 1280] [--height 2000]

Needs Chromium (Debian: ``apt-get install -y chromium``). Writes ``report_screenshot.png`` next to the
page by default and prints its path and the time Chromium took.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(f"no headless browser found (tried {', '.join(BROWSERS)}); "
                            "install one: apt-get install -y chromium")


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2000, timeout: float = 120.0) -> float:
    """Renders ``page`` into ``out`` (PNG); returns the seconds it took. The browser profile is a fresh
    temporary folder, and the network is off (a page that needs it renders broken, which shows)."""
    page = page.resolve()
    if not page.is_file():
        raise FileNotFoundError(f"report page not found: {page} (write it with: dynexit report RESULTS_DIR)")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                   f"--window-size={width},{height}", f"--screenshot={out}", page.as_uri()]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", nargs="?", default="results/quickstart/report/report.html", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: next to the page)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    out = args.out or args.page.with_name("report_screenshot.png")
    seconds = screenshot(args.page, out, args.width, args.height)
    print(f"{out} ({args.width}x{args.height}), chromium {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
