"""Measure a report's first screen in headless Chromium: element boxes at a 1400 x 900 viewport and
a PNG of exactly that screen. Used by test_report.py, and by hand to look at a real report:

    .venv/bin/python -m tests.evaluation.browser runs/demo/report/report.html first_screen.png
"""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
WIDTH, HEIGHT = 1400, 900
FIRST_SCREEN_IDS = ("provenance", "headline-table", "forest-plot")
BOXES_JS = """JSON.stringify(Object.fromEntries(%s.map(id => {
  const el = document.getElementById(id);
  const box = el && (el.querySelector('img') || el).getBoundingClientRect();
  return [id, box ? {top: box.top, bottom: box.bottom, left: box.left, right: box.right} : null];
})))"""


def _check_report() -> ModuleType:
    """scripts/check_report.py (not a package): its DevTools-over-pipe client drives Chromium here too."""
    spec = importlib.util.spec_from_file_location("check_report", REPO / "scripts" / "check_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measure(dt: Any, session: str, report: Path, screenshot: Path) -> dict[str, dict | None]:
    """Load ``report`` in a WIDTH x HEIGHT viewport: the boxes of FIRST_SCREEN_IDS (an element's image
    when it holds one) in viewport pixels, and the screenshot of that viewport only."""
    dt.call("Page.enable", session)
    dt.call(
        "Emulation.setDeviceMetricsOverride",
        session,
        width=WIDTH,
        height=HEIGHT,
        deviceScaleFactor=1,
        mobile=False,
    )
    dt.call("Page.navigate", session, url=report.resolve().as_uri())
    dt.wait_for("Page.loadEventFired")
    expr = BOXES_JS % json.dumps(list(FIRST_SCREEN_IDS))
    boxes = json.loads(
        dt.call("Runtime.evaluate", session, expression=expr, returnByValue=True)["result"]["value"]
    )
    png = dt.call("Page.captureScreenshot", session, format="png")["data"]
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(base64.b64decode(png))
    return boxes


def first_screen(report: Path, screenshot: Path, chromium: Path = CHROMIUM, timeout: float = 90.0) -> dict:
    """Boxes (top, bottom, left, right in CSS pixels) of the first-screen elements of ``report``,
    None for an element the page lacks; writes the first screen to ``screenshot``."""
    with _check_report().devtools_session(str(chromium), timeout, height=HEIGHT) as (dt, session):
        return _measure(dt, session, report, screenshot)


if __name__ == "__main__":
    print(json.dumps(first_screen(Path(sys.argv[1]), Path(sys.argv[2])), indent=1))
