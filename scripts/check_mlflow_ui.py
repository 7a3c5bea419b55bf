"""Check in a real browser (headless Chromium) what a person sees of one flow run in the MLflow UI.

    apt-get install chromium && .venv/bin/pip install -e '.[screenshots]'   # Debian's browser, Playwright
    .venv/bin/python scripts/check_mlflow_ui.py --tracking-uri http://127.0.0.1:5000 \\
        --experiment embedding-distillation-smoke --out /tmp/mlflow-ui

The ids come from the MLflow API (the newest parent run of the experiment unless --parent-run-id names one,
its child runs, the registered model named by its ``distill.champion_model`` tag); the browser only checks
what the UI shows, one screenshot per step in --out:

1. runs-table.png: the experiment opens on the runs table (not the GenAI overview) once the UI is in
   "Model training" mode; the trade-off metrics are shown as columns; the parent run expands to its children.
2. compare.png: the child runs, ticked in the table, open in the compare view, which lists the metrics.
3. parent-plots.png: the parent run's artifact ``report/tradeoff.png`` is shown as an image.
4. registered-model.png: the registered model's page shows the ``champion`` alias on its version.

Exit status: 0 when every check passes, 1 when one fails (the message names it; a ``*-failed.png`` screenshot
is saved), 2 when Chromium or Playwright is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import quote, unquote

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]  # fmt: skip  (the flags of scripts/screenshots.py)
METRICS = [
    "sts_test_retention_pct", "speedup_vs_teacher", "bytes_per_vector", "size_mb", "on_frontier",
    "sts_test_spearman",
]  # fmt: skip
HIDDEN_COLUMNS = ["Dataset", "Source", "Models"]  # default columns untick to make room for the metrics
INSTALL = "install them with `apt-get install chromium` and `.venv/bin/pip install -e '.[screenshots]'`"
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}  # not minutes
LOAD_MS = 60_000  # the first page load (the UI's bundle)
WAIT_MS = 30_000


class CheckFailed(AssertionError):
    """One check of what the UI shows failed; the message names the check."""


class BrowserMissing(RuntimeError):
    """Chromium or Playwright is not installed."""


class Target:
    """The ids of what is checked, found through the MLflow API."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.base = tracking_uri.rstrip("/")
        client = MlflowClient(self.base)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise CheckFailed(f"mlflow api: no experiment named {experiment!r} on {self.base}")
        self.experiment_id = exp.experiment_id
        if parent_run_id:
            self.parent = client.get_run(parent_run_id)
            if self.parent.info.experiment_id != self.experiment_id:
                raise CheckFailed(f"mlflow api: run {parent_run_id} is not in experiment {experiment!r}")
        else:
            parents = client.search_runs(
                [self.experiment_id],
                "tags.`mlflow.parentRunId` IS NULL",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if not parents:
                raise CheckFailed(f"mlflow api: experiment {experiment!r} has no parent run")
            self.parent = parents[0]
        self.parent_id = self.parent.info.run_id
        self.parent_name = self.parent.info.run_name
        self.children = client.search_runs(
            [self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent_id}'", max_results=1000
        )
        if not self.children:
            raise CheckFailed(f"mlflow api: parent run {self.parent_name} ({self.parent_id}) has no children")
        self.model_name = self.parent.data.tags.get("distill.champion_model") or f"{experiment}-student"
        try:
            self.champion_version = client.get_model_version_by_alias(self.model_name, "champion").version
        except Exception as error:  # MlflowException: no such model, or no such alias
            champion = self.parent.data.tags.get("distill.champion", "unset")
            raise CheckFailed(
                f"mlflow api: registered model {self.model_name!r} has no 'champion' alias "
                f"(distill.champion={champion} on {self.parent_name}): {error}"
            ) from error

    def url(self, fragment: str) -> str:
        return f"{self.base}/#/{fragment}"


def close_assistant(page) -> None:
    """Close the MLflow Assistant side panel (it takes a third of the width) and any first-visit tip."""
    for locator in (
        page.get_by_role("button", name="Got it"),
        page.locator("[data-component-id='mlflow.assistant.chat_panel.close']"),
    ):
        if locator.count() and locator.first.is_visible():
            locator.first.click()
            page.wait_for_timeout(300)


def wait_for_experiment_landing(page, target: Target) -> str:
    """Open the experiment's page as a link to it does; returns the tab it lands on (runs, overview...)."""
    page.goto(target.url(f"experiments/{target.experiment_id}"), wait_until="commit")
    pattern = re.compile(rf"#/experiments/{target.experiment_id}/([\w-]+)")
    page.wait_for_url(pattern, timeout=LOAD_MS)
    page.wait_for_timeout(1000)  # a redirect may follow
    return pattern.search(page.url).group(1)


def check_runs_table(page, target: Target, out: Path) -> None:
    landing = wait_for_experiment_landing(page, target)
    if landing != "runs":
        # MLflow 3.17 picks the landing tab from the browser's GenAI / Model training switch (stored per
        # browser, default GenAI), not from the experiment's mlflow.experimentKind tag.
        print(
            f"note: a fresh browser opens the experiment on the {landing!r} tab (GenAI mode); "
            "switching to Model training"
        )
        switch = page.get_by_text("Model training", exact=True)
        switch.wait_for(timeout=WAIT_MS)
        tip = page.get_by_role("button", name="Got it")  # a modal first-visit tip of the GenAI overview
        with contextlib.suppress(Exception):
            tip.wait_for(timeout=5000)
        close_assistant(page)
        switch.click()
        page.wait_for_url(re.compile(r"workflowType=machine_learning"), timeout=WAIT_MS)
        landing = wait_for_experiment_landing(page, target)  # the switch is remembered
    if landing != "runs":
        raise CheckFailed(f"the experiment opens on the {landing!r} tab, not the runs table ({page.url})")
    parent_link = page.get_by_role("link", name=target.parent_name, exact=True)
    try:
        parent_link.first.wait_for(timeout=LOAD_MS)
    except Exception as error:
        raise CheckFailed(f"the runs table does not show the parent run {target.parent_name}") from error
    if page.get_by_role("heading", name="Overview").count():
        raise CheckFailed("the GenAI overview is shown instead of the runs table")
    close_assistant(page)

    page.get_by_role("button", name="Columns").click()
    search = page.get_by_placeholder("Search columns")
    for column in HIDDEN_COLUMNS + METRICS:
        search.fill(column)
        node = page.locator(".du-bois-light-tree-treenode").filter(
            has=page.locator(".du-bois-light-tree-title", has_text=re.compile(rf"^{re.escape(column)}$"))
        )  # the exact name: searching size_mb also lists the parameter selection.max_size_mb
        try:
            node.first.wait_for(timeout=5000)
        except Exception as error:
            if column in HIDDEN_COLUMNS:
                continue
            raise CheckFailed(f"the column selector offers no metric {column!r}") from error
        checked = "checkbox-checked" in (node.first.get_attribute("class") or "")
        if checked == (column in METRICS):
            continue
        node.first.locator(".du-bois-light-tree-title").click()
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    missing = [m for m in METRICS if not page.get_by_role("columnheader", name=m, exact=True).count()]
    if missing:
        raise CheckFailed(f"the runs table shows no column for {missing}")

    parent_row = page.locator("div[role='row']").filter(has=parent_link)
    parent_row.first.locator("button").first.click()  # the expander of the parent's child runs
    expected = sorted(c.info.run_name for c in target.children)
    child_links = page.get_by_role("link", name=re.compile(rf" · {re.escape(target.parent_name)}$"))
    deadline = time.monotonic() + WAIT_MS / 1000
    shown: list[str] = []
    while time.monotonic() < deadline:
        shown = sorted(set(child_links.all_inner_texts()))
        if shown == expected:
            break
        page.wait_for_timeout(300)
    else:
        raise CheckFailed(
            f"expanding {target.parent_name} shows {len(shown)} child runs, expected {len(expected)}: "
            f"missing {sorted(set(expected) - set(shown))[:5]}"
        )
    page.wait_for_timeout(500)
    page.screenshot(path=str(out / "runs-table.png"))


def check_compare(page, target: Target, out: Path) -> None:
    child_rows = page.locator("div[role='row']").filter(
        has=page.get_by_role("link", name=re.compile(rf" · {re.escape(target.parent_name)}$"))
    )
    for i in range(child_rows.count()):
        child_rows.nth(i).locator("input.ag-checkbox-input").first.check(force=True)
    page.get_by_role("button", name="Compare", exact=True).click()
    try:
        page.wait_for_url(re.compile(r"#/compare-runs\?"), timeout=WAIT_MS)
    except Exception as error:
        raise CheckFailed("the Compare button does not open the compare view") from error
    runs = re.search(r"runs=([^&]+)", unquote(page.url))
    compared = set(json.loads(runs.group(1))) if runs else set()
    expected = {c.info.run_id for c in target.children}
    if compared != expected:
        raise CheckFailed(
            f"the compare view shows {len(compared)} runs, not the {len(expected)} child runs of "
            f"{target.parent_name} ({len(compared - expected)} others, {len(expected - compared)} missing)"
        )
    heading = page.get_by_text(f"Comparing {len(expected)} Runs", exact=False)
    try:
        heading.first.wait_for(timeout=WAIT_MS)
    except Exception as error:
        raise CheckFailed(f"the compare view does not say 'Comparing {len(expected)} Runs'") from error
    switch = page.get_by_role("switch", name="Metrics - Show diff only")
    switch.wait_for(timeout=WAIT_MS)
    section = page.locator(".du-bois-light-collapse-item").filter(has=switch)
    names = section.get_by_title("Plot chart")  # each metric's name links to its chart
    names.first.wait_for(timeout=WAIT_MS)
    section.evaluate("e => e.scrollIntoView({block: 'start'})")
    grids = section.get_by_role("grid")  # the metric names, then their values (which scroll)
    values = grids.last
    seen: set[str] = set()
    for _ in range(60):  # a virtualised grid: scroll it until every metric has been rendered
        seen.update(n.strip() for n in names.all_inner_texts())
        if seen.issuperset(METRICS):
            break
        values.hover()
        page.mouse.wheel(0, 150)
        page.wait_for_timeout(150)
    # MLflow 3.17.2 moves the names to the values' previous scroll position (it reads the grid's state before
    # the update), so after a scroll the names lag the values by one step: a 1-pixel step lines them up.
    values.hover()
    page.mouse.wheel(0, 1)
    page.wait_for_timeout(300)
    tops = grids.evaluate_all("grids => grids.map(g => g.scrollTop)")
    if abs(tops[0] - tops[-1]) >= 45:  # a row
        raise CheckFailed(f"the metrics table's names are out of line with their values (scrollTop {tops})")
    missing = [m for m in METRICS if m not in seen]
    if missing:
        raise CheckFailed(f"the compare view's metrics table lists no {missing} (seen: {sorted(seen)})")
    close_assistant(page)
    page.screenshot(path=str(out / "compare.png"))


def check_parent_plots(page, target: Target, out: Path) -> None:
    page.goto(target.url(f"experiments/{target.experiment_id}/runs/{target.parent_id}"), wait_until="commit")
    tab = page.get_by_role("tab", name="Artifacts")
    try:
        tab.wait_for(timeout=WAIT_MS)
    except Exception as error:
        raise CheckFailed(f"the page of parent run {target.parent_name} has no Artifacts tab") from error
    tab.click()
    close_assistant(page)
    for name in ("report", "tradeoff.png"):
        entry = page.get_by_text(name, exact=True)
        try:
            entry.first.wait_for(timeout=WAIT_MS)
        except Exception as error:
            raise CheckFailed(f"the parent run's artifact tree shows no {name!r}") from error
        entry.first.click()
    image = page.get_by_role("img", name="report/tradeoff.png")
    try:
        image.first.wait_for(timeout=WAIT_MS)
        loaded = "img => img.complete && img.naturalWidth > 0"
        page.wait_for_function(loaded, arg=image.first.element_handle(), timeout=WAIT_MS)
    except Exception as error:
        raise CheckFailed("the parent run's artifact report/tradeoff.png is not shown as an image") from error
    page.wait_for_timeout(500)
    page.screenshot(path=str(out / "parent-plots.png"))


def check_registered_model(page, target: Target, out: Path) -> None:
    page.goto(target.url(f"models/{quote(target.model_name)}"), wait_until="commit")
    version = page.get_by_role("link", name=f"Version {target.champion_version}", exact=True)
    try:
        version.first.wait_for(timeout=WAIT_MS)
    except Exception as error:
        raise CheckFailed(
            f"the page of registered model {target.model_name!r} lists no version {target.champion_version}"
        ) from error
    alias = page.get_by_role("row").filter(has=version).get_by_title("champion", exact=True)
    try:
        alias.first.wait_for(timeout=WAIT_MS)
    except Exception as error:
        raise CheckFailed(
            f"registered model {target.model_name!r}: version {target.champion_version} shows no "
            "'champion' alias"
        ) from error
    close_assistant(page)
    page.screenshot(path=str(out / "registered-model.png"))


CHECKS = [
    ("runs-table", check_runs_table),
    ("compare", check_compare),
    ("parent-plots", check_parent_plots),
    ("registered-model", check_registered_model),
]


def require_browser() -> None:
    """Raise BrowserMissing unless Playwright imports and Chromium is where it is launched from."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as error:
        raise BrowserMissing("Playwright is not installed") from error
    if not Path(CHROMIUM).is_file():
        raise BrowserMissing(f"no Chromium at {CHROMIUM}")


def run_checks(target: Target, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as error:
            raise BrowserMissing(f"Chromium at {CHROMIUM} does not start: {error}") from error
        try:
            page = browser.new_context(viewport={"width": 1900, "height": 1100}).new_page()
            for name, check in CHECKS:
                started = time.monotonic()
                try:
                    check(page, target, out)
                except Exception as error:
                    page.screenshot(path=str(out / f"{name}-failed.png"))
                    if isinstance(error, CheckFailed):
                        raise CheckFailed(f"{name}: {error}") from error
                    raise CheckFailed(f"{name}: {type(error).__name__}: {error}") from error
                print(f"ok {name} ({time.monotonic() - started:.1f} s) -> {out / (name + '.png')}")
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="the MLflow server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--experiment", required=True, help="the experiment's name")
    parser.add_argument("--parent-run-id", help="the flow run's parent run (default: the newest parent run)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the screenshots")
    args = parser.parse_args(argv)
    try:
        require_browser()
        for name, value in MLFLOW_HTTP.items():
            os.environ.setdefault(name, value)
        try:
            target = Target(args.tracking_uri, args.experiment, args.parent_run_id)
        except CheckFailed:
            raise
        except Exception as error:  # the server does not answer, an unknown run id...
            raise CheckFailed(f"mlflow api: {type(error).__name__}: {error}") from error
        print(
            f"checking {target.parent_name} ({target.parent_id}, {len(target.children)} child runs) and "
            f"{target.model_name}@champion (version {target.champion_version}) on {target.base}"
        )
        run_checks(target, args.out)
    except BrowserMissing as error:
        print(f"check_mlflow_ui: {error}; {INSTALL}", file=sys.stderr)
        return 2
    except CheckFailed as error:
        print(f"check_mlflow_ui: FAILED {error}", file=sys.stderr)
        return 1
    print("all MLflow UI checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
