"""Open the generated pages in a real headless Chromium (Debian's ``chromium``), no network, no CDP.

Chromium runs with ``--dump-dom`` after a virtual-time budget, so the DOM we read is the one after every
script ran; ``--enable-logging=stderr`` writes each console message (errors, uncaught exceptions, and
anything plotly logs) as a "CONSOLE" line, and the page must produce none. Screenshots go to
``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmtune.report import write_report

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")]


def _chromium(url: str, tmp: Path, *extra: str) -> tuple[str, str]:
    """Run headless Chromium on ``url``; return (stdout, console lines)."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=8000", *extra, url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, "\n".join(console)


def _check_rendered(dom: str, page: str) -> int:
    """Every chart div holds a drawn plotly SVG with at least one trace (or heatmap image) and its title."""
    ids = re.findall(r'data-chart="(chart-\d+)"', page)
    assert ids, "no charts on the page"
    starts = [m.start() for m in re.finditer(r'data-chart="chart-\d+"', dom)]
    assert len(starts) == len(ids), "chart containers missing from the rendered DOM"
    for k, chart_id in enumerate(ids):
        seg = dom[starts[k]:starts[k + 1] if k + 1 < len(starts) else len(dom)]
        assert f'id="{chart_id}"' in seg
        assert 'class="main-svg"' in seg, f"{chart_id}: plotly did not draw"
        assert re.search(r'class="[^"]*\b(trace|scatterlayer|barlayer|heatmaplayer)\b', seg), f"{chart_id}: no trace layer"
        assert re.search(r"<(path|image)\b", seg), f"{chart_id}: nothing drawn"
        assert 'class="gtitle"' in seg, f"{chart_id}: no title"
        assert 'class="g-xtitle"' in seg, f"{chart_id}: no x-axis title"
    for table in re.findall(r"<table\b.*?</table>", dom, re.S):
        assert re.search(r"<tbody>\s*<tr", table), "empty table"
    return len(ids)


def _screenshot(html: Path, name: str, tmp: Path, height: int) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    if shot.exists():
        shot.unlink()
    _chromium(html.as_uri(), tmp, f"--screenshot={shot}", f"--window-size=1280,{height}")
    assert shot.exists() and shot.stat().st_size > 20_000, "screenshot missing or blank"
    return shot


def test_run_report_in_chromium(run_dir: Path, tmp_path):
    html = Path(write_report(str(run_dir)))
    dom, console = _chromium(html.as_uri(), tmp_path, "--dump-dom")
    assert console == "", f"console output:\n{console}"
    n = _check_rendered(dom, html.read_text())
    assert n >= 8
    _screenshot(html, "report-run", tmp_path, 8600)


def test_study_report_in_chromium(study_dir: Path, tmp_path):
    html = Path(write_report(str(study_dir)))
    dom, console = _chromium(html.as_uri(), tmp_path, "--dump-dom")
    assert console == "", f"console output:\n{console}"
    n = _check_rendered(dom, html.read_text())
    assert n >= 15  # 7 study charts + the best trial's embedded run report
    _screenshot(html, "report-study", tmp_path, 14000)


def test_leaderboard_sorts_on_click(study_dir: Path, tmp_path):
    html = Path(write_report(str(study_dir)))
    probe = tmp_path / "probe.html"
    click = ("<script>var th = document.querySelector('#leaderboard ~ .table-wrap table th:nth-child(2) button');"
             "th.click();</script></body>")
    probe.write_text(html.read_text().replace("</body>", click, 1))
    dom, console = _chromium(probe.as_uri(), tmp_path, "--dump-dom")
    assert console == "", f"console output:\n{console}"
    table = re.search(r'id="leaderboard".*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    trials = [int(x) for x in re.findall(r"<tr[^>]*>\s*<td[^>]*>[^<]*</td>\s*<td[^>]*>(\d+)</td>", table)]
    assert trials == sorted(trials) and len(trials) == 8
    assert 'aria-sort="ascending"' in dom


def test_chromium_reports_console_errors(tmp_path):
    """The check above is only worth something if a broken page fails it."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    _, console = _chromium(bad.as_uri(), tmp_path, "--dump-dom")
    assert "Uncaught ReferenceError" in console
