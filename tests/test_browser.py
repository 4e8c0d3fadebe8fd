"""What a person sees: the Prefect UI shows the flow run, the MLflow UI the champion.

Headless Debian Chromium (``chromium`` + ``chromium-driver``) driven by Selenium, against a real
``prefect server start`` and ``mlflow server`` on localhost. Screenshots go to the test's temporary
folder, and to ``docs/`` when ``SHOPRANK_UPDATE_SCREENSHOTS=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.release.promotion import promote_version
from tests.test_deploy import start_prefect_server
from tests.test_registry import FAST, register_version
from tests.test_serving import BIN, free_port, start_group, stop_group, wait_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS = Path(__file__).resolve().parents[1] / "docs"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1440,1100")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_shop_dir) -> tuple[str, Path]:
    """A store whose ``shoprank`` went through two releases.

    v1 (buy-again, evaluated) won and was released as v2; v3 (popularity) lost, and the
    champion's recipe was released again as v4 (a refresh): champion v4, challenger v3.
    """
    root = tmp_path_factory.mktemp("browser-store")
    (root / "mlruns").mkdir()
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    for family in ("buy_again", "popularity"):
        version = register_version(root, demo_shop_dir, uri, family, recipe=True)
        promote_version("shoprank", version, uri, FAST)
    return uri, root


@pytest.fixture(scope="module")
def servers(trained, tmp_path_factory):
    """A Prefect server and an MLflow server, started together so that they boot in parallel."""
    uri, _ = trained
    folder = tmp_path_factory.mktemp("servers")
    prefect_proc, api, prefect_log = start_prefect_server(folder, wait=False)
    port, mlflow_log = free_port(), folder / "mlflow-server.log"
    mlflow_proc = start_group([str(BIN / "mlflow"), "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              mlflow_log, {"MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_http(f"{api}/health", prefect_proc, prefect_log)
        wait_http(f"http://127.0.0.1:{port}/health", mlflow_proc, mlflow_log)
        yield {"prefect_api": api, "mlflow": f"http://127.0.0.1:{port}", "folder": folder}
    finally:
        stop_group(prefect_proc)
        stop_group(mlflow_proc)


def _wait_for_text(driver, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in driver.find_element("tag name", "body").text:
            return
        time.sleep(0.5)
    pytest.fail(f"{text!r} not shown at {driver.current_url}; the page shows:\n"
                f"{driver.find_element('tag name', 'body').text[:2000]}")


def _close_side_panel(driver) -> None:
    """Close MLflow's assistant panel when it is open, so the versions fill the screenshot."""
    for button in driver.find_elements("css selector", "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
            time.sleep(0.5)


def _save(driver, folder: Path, name: str) -> None:
    path = folder / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if os.environ.get("SHOPRANK_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS / name)


def test_prefect_ui_shows_the_flow_run(browser, trained, servers):
    uri, root = trained
    api = servers["prefect_api"]
    done = subprocess.run(
        [str(BIN / "shoprank"), "recommend", "--tracking-uri", uri, "--out",
         str(root / "recs.parquet")], env={**os.environ, "PREFECT_API_URL": api}, cwd=root,
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs()
    assert run.state.is_completed()
    ui = api.removesuffix("/api")
    browser.get(f"{ui}/runs")
    _wait_for_text(browser, run.name)
    _wait_for_text(browser, "recommend")
    browser.get(f"{ui}/runs/flow-run/{run.id}")
    _wait_for_text(browser, "Completed")
    _wait_for_text(browser, "from shoprank v4")  # the run's log line
    _save(browser, servers["folder"], "prefect-ui.png")


def test_mlflow_ui_shows_the_champion(browser, servers):
    browser.set_window_size(1440, 1800)  # both versions, tags included
    browser.get(f"{servers['mlflow']}/#/models/shoprank")
    _wait_for_text(browser, "champion")
    _wait_for_text(browser, "challenger")
    _wait_for_text(browser, "Version 4")
    _close_side_panel(browser)
    _save(browser, servers["folder"], "mlflow-models.png")
    browser.get(f"{servers['mlflow']}/#/models/shoprank/versions/3")  # the rejected challenger
    _wait_for_text(browser, "REJECTED")
    _close_side_panel(browser)
    _save(browser, servers["folder"], "mlflow-version.png")


@pytest.mark.slow  # a train and a monitor run: `make test-release` runs it
def test_the_monitor_series_in_both_uis(browser, trained, servers, tmp_path):
    """A champion trained before a shop's regime change, watched for five days."""
    from mlflow import MlflowClient

    from tasks.data.demo_data import generate_shop
    from tests.test_monitor_flow import _shop_until

    uri, _ = trained
    api = servers["prefect_api"]
    events, items = generate_shop(40_000, seed=3, shift_day=45)
    past = _shop_until(events, items, 45, tmp_path / "past")
    later = _shop_until(events, items, 50, tmp_path / "later")
    env = {**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": uri}
    common = ["--format", "parquet", "--name", "watched", "--model-name", "shoprank-watched",
              "--output-dir", str(tmp_path / "out")]
    for argv, code in ((["train", "--data", str(past), "--no-ranker", "--no-transformer"], 0),
                       (["monitor", "--data", str(later)], 3)):
        done = subprocess.run([str(BIN / "shoprank"), *argv, *common], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == code, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("watched").experiment_id
    [watch] = client.search_runs([experiment], "tags.`shoprank.monitor_of` = 'shoprank-watched/2'")
    browser.set_window_size(1440, 1100)
    browser.get(f"{servers['mlflow']}/#/experiments/{experiment}/runs/{watch.info.run_id}"
                "/model-metrics")
    _wait_for_text(browser, "Model metrics")
    _close_side_panel(browser)
    deadline = time.monotonic() + 60
    while not browser.find_elements("css selector", "input[placeholder*='Search metric']"):
        assert time.monotonic() < deadline, "no metric search box on the run page"
        time.sleep(0.5)
    browser.find_element("css selector", "input[placeholder*='Search metric']").send_keys(
        "realised.ndcg")  # the realised quality charts
    _wait_for_text(browser, "realised.ndcg_at_10")
    time.sleep(2)  # the charts draw
    _save(browser, servers["folder"], "mlflow-monitor.png")
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as prefect:
        [run] = [r for r in prefect.read_flow_runs() if prefect.read_flow(r.flow_id).name
                 == "monitor"]
        [artifact] = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["monitor-shoprank-watched"])))
    assert run.state.is_completed()
    assert artifact.flow_run_id == run.id
    browser.get(f"{api.removesuffix('/api')}/artifacts/artifact/{artifact.id}")
    _wait_for_text(browser, "decay ndcg@10")
    time.sleep(2)  # the plot draws
    _save(browser, servers["folder"], "prefect-monitor.png")
