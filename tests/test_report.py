"""`sweeper report`: one HTML file, written by the real command and rendered in a real headless
Chromium with the network cut off."""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pytest

from sweeper import report
from sweeper.errors import SweepError
from tests.helpers import run_cli

# One xdist worker runs this file's tests, so its module- and session-wide fixtures are built once.
pytestmark = pytest.mark.xdist_group("finished_sweep")

if TYPE_CHECKING:
    from playwright.sync_api import Browser

PLOTS = ["history", "importances", "parallel", "intermediate", "lambda_depth", "timings", "gpu_hours"]


class _RemoteReferences(HTMLParser):
    """Every URL the page's own elements would load (scripts, styles, images, frames)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.urls.append(f"<{tag} {name}={value}>")


def remote_references(page: str) -> list[str]:
    parser = _RemoteReferences()
    parser.feed(page)
    return parser.urls


def render(browser: Browser, path: Path, screenshot: Path) -> dict[str, Any]:
    """Open ``path`` offline; return the plots as drawn, the errors and every request tried."""
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))

        def refuse(route: Any) -> None:
            if route.request.url.startswith("file://"):
                route.continue_()
            else:
                requests.append(route.request.url)
                route.abort()

        page.route("**/*", refuse)
        page.goto(path.as_uri(), wait_until="load")
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length > 0")
        plots = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(div => {
            const box = div.getBoundingClientRect();
            return {id: div.id, traces: (div.data || []).length, svgs: div.querySelectorAll('.main-svg').length,
                    marks: div.querySelectorAll('.main-svg path, .main-svg rect, .main-svg text').length,
                    width: box.width, height: box.height};
        })""")
        page.screenshot(path=str(screenshot), full_page=True)
        return {"plots": {p["id"]: p for p in plots}, "errors": errors, "requests": requests,
                "best_test": page.inner_text("#best-test") if page.query_selector("#best-test") else None,
                "best_params": page.inner_text("#best-params") if page.query_selector("#best-params") else ""}
    finally:
        context.close()


def distinct_colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return len(colours) if colours is not None else 1 << 20


def test_report_renders_every_plot_offline(finished_sweep: dict[str, Any], browser: Browser,
                                            tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = run_cli("report", str(finished_sweep["study"]), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"written to {out}" in result.stdout and f"{len(PLOTS)} plots" in result.stdout

    page = out.read_text(encoding="utf-8")
    # Self-contained: plotly.js is inlined, and no element of the page points anywhere.
    assert remote_references(page) == []
    assert not re.search(r"<script[^>]+src=", page) and "cdn.plot.ly/plotly" not in page
    assert page.count("<script") == 1 + len(PLOTS)  # the library once, then one per figure

    shot = tmp_path / "report.png"
    seen = render(browser, out, shot)
    assert seen["errors"] == [] and seen["requests"] == []
    for key in PLOTS:
        plot = seen["plots"].get(f"plot-{key}")
        assert plot is not None, f"{key} is missing: {sorted(seen['plots'])}"
        assert plot["traces"] >= 1 and plot["svgs"] >= 1 and plot["marks"] > 10, plot
        assert plot["width"] > 400 and plot["height"] > 300, plot
    assert distinct_colours(shot) > 50  # a drawn page, not a blank or single-colour one

    # The best trial's parameters and held-out test figure, as the storage has them.
    study = optuna.load_study(study_name="tiny", storage=str(finished_sweep["url"]))
    best_test = study.user_attrs["best_test"]
    assert seen["best_test"] == f"accuracy {best_test['value']:.4f}"
    best = study.trials[best_test["trial"]]
    for name, value in best.params.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        assert f"{name}\t{shown}" in seen["best_params"], seen["best_params"]


def test_report_explains_the_plots_a_young_study_cannot_have(finished_sweep: dict[str, Any],
                                                             tmp_path: Path) -> None:
    """One complete trial, no λ searched: the report is still written and says what is missing."""
    url = f"sqlite:///{tmp_path / 'young.db'}"
    study = optuna.create_study(study_name="tiny", storage=url, direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        params={"learning_rate": 1e-3},
        distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
        value=0.6, intermediate_values={1: 0.55, 2: 0.6},
        user_attrs={"train_seconds": 1.5, "eval_seconds": 0.2, "samples_per_second": 900.0, "gpu_seconds": 2.0},
    ))
    out = tmp_path / "young.html"
    result = run_cli("report", str(finished_sweep["study"]), "--storage", url, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    said = result.stdout
    assert "importances: Not drawn: importances need at least 2 complete trials; this study has 1" in said
    assert "lambda_depth: Not drawn: neither pretrain_loss_weight (λ) nor unfreeze_depth is searched" in said
    page = out.read_text(encoding="utf-8")
    assert 'id="missing-importances"' in page and 'id="missing-lambda_depth"' in page
    for key in ("history", "parallel", "intermediate", "timings", "gpu_hours"):
        assert f'id="plot-{key}"' in page, key
    assert "not evaluated yet" in page  # no held-out figure recorded for this study


def test_report_names_the_extra_to_install_without_plotly(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "plotly" or m.startswith("plotly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)  # makes `import plotly` raise ImportError
    with pytest.raises(SweepError, match=re.escape("pip install 'sweeper[report]'")):
        report._plotly_js()


def test_report_refuses_a_folder_or_an_unwritable_place(finished_sweep: dict[str, Any], tmp_path: Path) -> None:
    from sweeper import study as study_mod

    sweep = study_mod.load(str(finished_sweep["study"]), [])
    study = optuna.load_study(study_name="tiny", storage=str(finished_sweep["url"]))
    with pytest.raises(SweepError, match="is a folder"):
        report.write(study, sweep, tmp_path)
    assert not list(tmp_path.glob("*.html"))
    with pytest.raises(SweepError, match="cannot write the report to '/proc/sweeper/report.html'"):
        report.write(study, sweep, Path("/proc/sweeper/report.html"))
