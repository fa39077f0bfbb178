#!/usr/bin/env python3
"""Open a volta3d report in headless Chromium and fail (exit 1) on console errors, script exceptions,
images that do not load, or any request that leaves the machine; optionally save a full-page screenshot.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (file descriptors
3 and 4, NUL-terminated JSON messages), so no WebSocket client is needed. Not required by CI.

    python scripts/check_report.py runs/report/report.html --screenshot report.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe"]
IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({
  src: i.getAttribute('src').slice(0, 40), ok: i.complete && i.naturalWidth > 0, alt: i.alt})))"""
WIDTH, MAX_HEIGHT = 1280, 20000


class DevTools:
    """Minimal DevTools client over the pipe: ``call`` sends a command and returns its result,
    keeping every event seen on the way in ``events``."""

    def __init__(self, write_fd: int, read_fd: int, timeout: float) -> None:
        self.write_fd, self.read_fd, self.deadline = write_fd, read_fd, time.monotonic() + timeout
        self.buffer, self.next_id, self.events = b"", 0, []

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise ConnectionError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._message())


def problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions, error log entries and non-local requests among the events."""
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            det = p.get("exceptionDetails", {})
            desc = det.get("exception", {}).get("description", "").split("\n")[0]
            out.append(f"exception: {det.get('text', '?')} {desc}".strip())
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log error: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        elif m == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            if not url.startswith(("file://", "data:")):
                out.append(f"request leaves the machine: {url}")
    return out


@contextlib.contextmanager
def devtools_session(chromium: str, timeout: float, height: int = 900) -> Iterator[tuple[DevTools, str]]:
    """Start headless Chromium on a throw-away profile, attach to a blank page; yield ``(client, session)``
    and always close the browser, its pipes and its profile afterwards."""
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def wire_pipe() -> None:  # in the child: Chromium reads commands on fd 3, writes replies on fd 4
        os.dup2(to_chrome_r, 3)
        os.dup2(from_chrome_w, 4)

    with tempfile.TemporaryDirectory(prefix="check-report-") as profile:
        proc = subprocess.Popen([str(chromium), *FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{height}",
                                 "about:blank"], preexec_fn=wire_pipe, pass_fds=(3, 4),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        try:
            dt = DevTools(to_chrome_w, from_chrome_r, timeout)
            target = dt.call("Target.createTarget", url="about:blank")["targetId"]
            yield dt, dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            with contextlib.suppress(ConnectionError, RuntimeError):  # it may close the pipe before answering
                dt.call("Browser.close")
        finally:
            os.close(to_chrome_w)
            os.close(from_chrome_r)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def check(report: Path, screenshot: Path | None, chromium: str, timeout: float) -> list[str]:
    """Load ``report``; return the problems found (empty: the page is fine)."""
    with devtools_session(chromium, timeout) as (dt, s):
        for domain in ("Runtime", "Log", "Network", "Page"):
            dt.call(f"{domain}.enable", s)
        dt.events.clear()
        dt.call("Emulation.setDeviceMetricsOverride", s, width=WIDTH, height=900, deviceScaleFactor=1, mobile=False)
        dt.call("Page.navigate", s, url=report.resolve().as_uri())
        dt.wait_for("Page.loadEventFired")
        images = json.loads(dt.call("Runtime.evaluate", s, expression=IMAGES_JS, returnByValue=True)["result"]["value"])
        found = problems(dt.events)
        found += [f"image did not load: {i['alt'] or i['src']}" for i in images if not i["ok"]]
        print(f"{report}: {sum(i['ok'] for i in images)} images loaded, {len(images)} in the page")
        if screenshot is not None:
            size = dt.call("Page.getLayoutMetrics", s)["cssContentSize"]
            height = min(int(size["height"]) + 1, MAX_HEIGHT)
            dt.call("Emulation.setDeviceMetricsOverride", s, width=WIDTH, height=height, deviceScaleFactor=1, mobile=False)
            png = dt.call("Page.captureScreenshot", s, format="png", captureBeyondViewport=True)["data"]
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(png))
            print(f"screenshot: {screenshot} ({WIDTH} x {height})")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="report.html written by `volta3d report`")
    parser.add_argument("--screenshot", type=Path, default=None, help="save a full-page PNG screenshot here")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable (default /usr/bin/chromium)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed for the whole check")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"check_report: report not found: {args.report}", file=sys.stderr)
        return 2
    if not shutil.which(args.chromium):
        print(f"check_report: Chromium not found at {args.chromium} (apt-get install chromium)", file=sys.stderr)
        return 2
    found = check(args.report, args.screenshot, args.chromium, args.timeout)
    for f in found:
        print(f"FAIL {f}")
    print("OK" if not found else f"{len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
