"""Retake the README's two screenshots from the real UIs of a running stack, with headless Chromium.

    apt-get install chromium && .venv/bin/pip install -e '.[screenshots]'   # Debian's browser, Playwright
    make stack
    .venv/bin/python scripts/screenshots.py      # -> docs/images/prefect-run-form.png, mlflow-runs.png

It fills the ``on-demand`` deployment's run form in the Prefect UI (profile smoke, one field overridden),
photographs it, presses Submit (a real UI trigger), waits for the flow run to complete, then photographs the
MLflow runs table of that flow run with its child runs expanded and the trade-off columns shown.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deployments.stack import DEFAULT_HOME, StackState, api  # noqa: E402

OUT = REPO / "docs" / "images"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
METRICS = [
    "sts_test_spearman", "sts_test_retention_pct", "heldout_mean_spearman", "speedup_vs_teacher",
    "size_mb", "bytes_per_vector",
]  # fmt: skip


def run_form(page, state: StackState, corpus_sentences: int) -> str:
    """Fill and photograph the on-demand run form, submit it; returns the new flow run's id."""
    deployment = api(state.prefect_api_url, "/deployments/name/distill-embeddings/on-demand")
    page.goto(f"{state.prefect_url}/deployments/deployment/{deployment['id']}/run", wait_until="networkidle")
    page.locator("button.p-select-button__control").first.focus()
    page.keyboard.press("ArrowDown")  # opens the profile select (a click only focuses it headless)
    page.get_by_role("option", name="smoke").click()
    page.locator("input[type=number]").first.fill(str(corpus_sentences))  # corpus_wiki_sentences
    page.wait_for_timeout(500)
    page.screenshot(path=str(OUT / "prefect-run-form.png"), full_page=True)
    before = {r["id"] for r in _runs_of(state, deployment["id"])}
    page.get_by_role("button", name="Submit").click()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = [r for r in _runs_of(state, deployment["id"]) if r["id"] not in before]
        if new:
            return new[0]["id"]
        time.sleep(0.5)
    raise RuntimeError("submitting the form created no flow run")


def _runs_of(state: StackState, deployment_id: str) -> list[dict]:
    return api(state.prefect_api_url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})


def wait_completed(state: StackState, flow_run_id: str, timeout: float = 900) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        run = api(state.prefect_api_url, f"/flow_runs/{flow_run_id}")
        if run["state_type"] == "COMPLETED":
            print(f"flow run {run['name']} completed in {time.monotonic() - started:.0f} s")
            return
        if run["state_type"] in ("FAILED", "CRASHED", "CANCELLED"):
            raise RuntimeError(f"flow run {run['name']} ended {run['state_type']}: {run['state']['message']}")
        time.sleep(2)
    raise RuntimeError(f"flow run {flow_run_id} did not finish within {timeout:.0f} s")


def runs_table(page, state: StackState, flow_run_id: str) -> None:
    """The MLflow runs table with the flow run's parent run expanded and the trade-off columns shown."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(state.mlflow_url)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    url = f"{state.mlflow_url}/#/experiments/{parent.info.experiment_id}/runs?workflowType=machine_learning"
    page.goto(url, wait_until="commit")  # MLflow's UI never goes network-idle
    page.wait_for_selector(f"text={parent.info.run_name}", timeout=60_000)
    page.wait_for_timeout(1000)
    close_assistant = page.locator("button[aria-label='Close']")
    if close_assistant.count():
        close_assistant.first.click()
    page.get_by_role("button", name="Columns").click()
    search = page.get_by_placeholder("Search columns")
    for column in ("Dataset", "Source", "Models", *METRICS, "kind"):  # untick 3 defaults, tick ours
        search.fill(column)
        page.wait_for_timeout(300)
        # the title that is exactly the name: searching size_mb also lists the param selection.max_size_mb
        page.locator(
            ".du-bois-light-tree-title", has_text=re.compile(rf"^{re.escape(column)}$")
        ).first.click()
    page.keyboard.press("Escape")
    row = page.locator("div[role='row']", has_text=parent.info.run_name)
    row.locator("button").first.click()  # the parent's expander shows its child runs
    page.wait_for_timeout(1500)
    page.screenshot(path=str(OUT / "mlflow-runs.png"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="the stack's folder (make stack)")
    parser.add_argument("--corpus-sentences", type=int, default=250, help="the field overridden in the form")
    args = parser.parse_args()
    state = StackState.load(args.home)
    if state is None:
        print(f"screenshots: no stack running from {args.home}: start one with `make stack`", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1750})
            flow_run_id = run_form(page, state, args.corpus_sentences)
            wait_completed(state, flow_run_id)
            page.set_viewport_size({"width": 1700, "height": 900})
            runs_table(page, state, flow_run_id)
        finally:
            browser.close()
    print(f"wrote {OUT / 'prefect-run-form.png'} and {OUT / 'mlflow-runs.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
