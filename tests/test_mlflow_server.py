"""A sweep against a real remote `mlflow server`, then checked as a person would see it.

The sweep runs with `--tracking-uri http://127.0.0.1:PORT`. Its trials, metrics and
artifacts must all land on that server; then MLflow's REST API, and the MLflow UI in
headless Chromium, must show the parent run with its children nested under it, a
child's metric chart, and the parent's PNG artifacts. The REST checks say which fact
broke when the browser checks fail; the browser checks skip, with the reason, only
where Debian's chromium and chromium-driver or selenium are missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests
from conftest import MlflowServer, reported_epochs, small_sweep, start_search_run, sweep_args
from mlflow.tracking import MlflowClient

from trainables.config import DataSettings
from trainables.names import (
    CHECKPOINT_ARTIFACT,
    CHECKPOINT_FILE,
    METRIC,
    REPORTED_METRICS,
    ROLE_TAG,
    SPEC_FILE,
    SWEEP_SETTINGS_ARTIFACT,
)
from trainables.names import REPORT_ARTIFACTS as REPORT_FILES

pytestmark = pytest.mark.slow

NUM_SAMPLES = 3
EPOCHS = 2
EXPERIMENT = "remote-sweep"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The README's picture of the UI (docs/mlflow-ui.png) is this test's screenshot, taken again with
# MLFLOW_UI_PICTURE=docs/mlflow-ui.png MLFLOW_UI_DATA=<real images> pytest tests/test_mlflow_server.py
PICTURE, PICTURE_DATA = os.environ.get("MLFLOW_UI_PICTURE"), os.environ.get("MLFLOW_UI_DATA")


@pytest.fixture(scope="module")
def remote_sweep(image_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished sweep whose only store is a real MLflow server, which stays up for the checks."""
    workdir = tmp_path_factory.mktemp("remote")
    server = MlflowServer(workdir / "server")
    server.folder.mkdir()
    server.start()
    images = image_folder if PICTURE_DATA is None else Path(PICTURE_DATA)
    data = DataSettings(
        source=str(images), root=str(workdir / "cache"), val_size=9 if PICTURE_DATA is None else 300
    )
    settings = small_sweep(
        images, workdir, data=data, num_samples=NUM_SAMPLES, epochs=EPOCHS, scheduler="fifo", name="remote",
        tracking_uri=server.uri, experiment=EXPERIMENT,
    )  # fmt: skip
    sweep = start_search_run(sweep_args(settings), cwd=workdir)
    _, stderr = sweep.communicate(timeout=300)
    try:
        assert sweep.returncode == 0, stderr
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        parents = client.search_runs([experiment.experiment_id], "tags.role = 'sweep'")
        children = client.search_runs([experiment.experiment_id], "tags.role = 'trial'")
        yield {"server": server, "client": client, "experiment": experiment, "parents": parents,
               "children": children, "workdir": workdir}  # fmt: skip
    finally:
        server.kill()


def rest(server: MlflowServer, endpoint: str, **params) -> dict:
    response = requests.get(f"{server.uri}/api/2.0/mlflow/{endpoint}", params=params, timeout=10)
    response.raise_for_status()
    return response.json()


# A remote tracking server receives everything -------------------------------------------


def test_every_trial_lands_on_the_server_as_a_finished_child_of_one_parent(remote_sweep):
    parents, children = remote_sweep["parents"], remote_sweep["children"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == NUM_SAMPLES
    assert {child.data.tags["mlflow.parentRunId"] for child in children} == {parents[0].info.run_id}
    assert all(child.info.status == "FINISHED" for child in children)


def test_every_metric_of_every_epoch_lands_on_the_server(remote_sweep):
    for child in remote_sweep["children"]:
        for name in REPORTED_METRICS:
            epochs = reported_epochs(remote_sweep["server"].uri, child, name)
            assert epochs == list(range(1, EPOCHS + 1)), (child.info.run_name, name)


def test_every_artifact_lands_in_the_servers_own_artifact_store(remote_sweep, tmp_path):
    client = remote_sweep["client"]
    parent = remote_sweep["parents"][0]
    parent_files = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {*REPORT_FILES, SWEEP_SETTINGS_ARTIFACT} <= parent_files
    for child in remote_sweep["children"]:
        files = {item.path for item in client.list_artifacts(child.info.run_id, CHECKPOINT_ARTIFACT)}
        assert files == {f"{CHECKPOINT_ARTIFACT}/{CHECKPOINT_FILE}", f"{CHECKPOINT_ARTIFACT}/{SPEC_FILE}"}
    # The files went through the server (proxied artifacts), not onto the client's disk.
    served = remote_sweep["server"].folder / "artifacts"
    stored = {path.name for path in served.rglob("*") if path.is_file()}
    assert {*REPORT_FILES, CHECKPOINT_FILE, SPEC_FILE} <= stored
    for run in (parent, *remote_sweep["children"]):  # proxied: the runs know no client-side path
        assert client.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert not (remote_sweep["workdir"] / "mlruns").exists()
    best_json = client.download_artifacts(parent.info.run_id, "best.json", str(tmp_path))
    best = json.loads(Path(best_json).read_text())
    assert best["mlflow"]["tracking_uri"] == remote_sweep["server"].uri


# The same facts the browser checks, through MLflow's REST API ---------------------------


def test_rest_lists_the_parent_with_its_children_nested_under_it(remote_sweep):
    server, experiment = remote_sweep["server"], remote_sweep["experiment"]
    response = requests.post(
        f"{server.uri}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment.experiment_id], "max_results": 100},
        timeout=10,
    )
    response.raise_for_status()
    runs = response.json()["runs"]
    tags = [{tag["key"]: tag["value"] for tag in run["data"]["tags"]} for run in runs]
    roles = zip(runs, tags, strict=True)
    parent_ids = [run["info"]["run_id"] for run, tag in roles if tag[ROLE_TAG] == "sweep"]
    nested = [tag for tag in tags if tag.get("mlflow.parentRunId") == parent_ids[0]]
    assert len(parent_ids) == 1 and len(nested) == NUM_SAMPLES


def test_rest_serves_a_childs_metric_history(remote_sweep):
    child = remote_sweep["children"][0]
    history = rest(remote_sweep["server"], "metrics/get-history", run_id=child.info.run_id, metric_key=METRIC)
    steps = [point["step"] for point in history["metrics"]]
    # A step counts the images seen; under FIFO a trial reports at each epoch's end, an epoch apart.
    assert len(steps) == EPOCHS and steps == [steps[0] * epoch for epoch in range(1, EPOCHS + 1)]


def test_rest_lists_the_parents_png_artifacts_and_serves_real_pngs(remote_sweep):
    server, parent = remote_sweep["server"], remote_sweep["parents"][0]
    listed = rest(server, "artifacts/list", run_id=parent.info.run_id)
    pngs = sorted(item["path"] for item in listed["files"] if item["path"].endswith(".png"))
    assert pngs == sorted(name for name in REPORT_FILES if name.endswith(".png"))
    for png in pngs:
        response = requests.get(
            f"{server.uri}/get-artifact", params={"path": png, "run_uuid": parent.info.run_id}, timeout=10
        )
        assert response.status_code == 200 and response.content.startswith(PNG_SIGNATURE)


# The same facts in the MLflow UI, in headless Chromium ------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
UI_WAIT_S = 60  # the first page loads a 4 MB script bundle from a one-worker server
# MLflow 3 opens a fresh browser on its GenAI views; the runs table lives in this workflow.
MODEL_TRAINING = "workflowType=machine_learning"


@pytest.fixture(scope="module")
def browser(remote_sweep, tmp_path_factory: pytest.TempPathFactory):
    """Headless Debian Chromium through selenium, with a fresh profile; never downloads a browser."""
    from selenium import webdriver

    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        message = f"no {' or '.join(missing)}: install Debian's chromium and chromium-driver"
        if os.environ.get("CI"):  # .ci/run installs them: their absence there is a failure
            pytest.fail(message)
        pytest.skip(message)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    # No sandbox as root; no background networking, which a closed network would refuse.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,800", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(UI_WAIT_S)
    # Keep MLflow's assistant panel closed, so the runs table has the page's width.
    driver.get(f"{remote_sweep['server'].uri}/health")
    driver.execute_script(
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    )
    screenshots = tmp_path_factory.mktemp("screenshots")
    yield driver, screenshots
    driver.quit()


def open_page(driver, remote_sweep, path: str):
    experiment_id = remote_sweep["experiment"].experiment_id
    driver.get(f"{remote_sweep['server'].uri}/#/experiments/{experiment_id}{path}?{MODEL_TRAINING}")


def wait_for(driver, condition, screenshots: Path, name: str):
    """Waits for the condition; on a timeout, keeps a screenshot and the page to look at."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, UI_WAIT_S).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(screenshots / f"{name}-timeout.png"))
        (screenshots / f"{name}-timeout.html").write_text(driver.page_source)
        raise


def test_the_ui_lists_the_parent_run_with_its_children_nested_under_it(remote_sweep, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown

    driver, screenshots = browser
    parent = remote_sweep["parents"][0]
    open_page(driver, remote_sweep, "/runs")
    expander = (By.XPATH, row(parent.info.run_id) + '//button[contains(@data-component-id, "runnamecell")]')
    wait_for(driver, shown.element_to_be_clickable(expander), screenshots, "runs").click()
    child_links = {
        child.info.run_id: (By.XPATH, f'//div[@role="row"]//a[span="{child.info.run_name}"]')
        for child in remote_sweep["children"]
    }
    for link in child_links.values():
        wait_for(driver, shown.visibility_of_element_located(link), screenshots, "runs-expanded")
    widen_the_run_name_column(driver)  # as a user does, to read the trials' names
    driver.save_screenshot(PICTURE or str(screenshots / "experiment.png"))

    def row_index(run_id: str) -> int:
        return int(driver.find_element(By.XPATH, row(run_id)).get_attribute("aria-rowindex"))

    def indent(run_id: str) -> int:  # the spacer before a run's name grows with its nesting level
        spacer = row(run_id) + '//div[@role="gridcell"]//div[starts-with(@style, "width")]'
        return int(driver.find_element(By.XPATH, spacer).value_of_css_property("width").removesuffix("px"))

    parent_index = row_index(parent.info.run_id)
    child_indices = sorted(row_index(run_id) for run_id in child_links)
    assert child_indices == list(range(parent_index + 1, parent_index + 1 + len(child_links)))
    assert all(indent(run_id) > indent(parent.info.run_id) for run_id in child_links)
    for run_id, link in child_links.items():
        assert driver.find_element(*link).get_attribute("href").endswith(f"/runs/{run_id}")


def widen_the_run_name_column(driver, by_px: int = 330) -> None:
    """Drags the edge of the runs table's Run Name header, which is narrower than a trial's name."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    edge = driver.find_element(
        By.XPATH, '//div[@role="columnheader" and .//*[text()="Run Name"]]//div[contains(@class, "resize")]'
    )
    ActionChains(driver).click_and_hold(edge).move_by_offset(by_px, 0).release().perform()


def row(run_id: str) -> str:
    return f'//div[@role="row" and @row-id="{run_id}"]'


def test_the_ui_renders_a_childs_metric_chart(remote_sweep, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown

    driver, screenshots = browser
    child = remote_sweep["children"][0]
    open_page(driver, remote_sweep, f"/runs/{child.info.run_id}/model-metrics")
    card = (By.XPATH, f'//div[@data-testid="experiment-view-compare-runs-card"][.//*[text()="{METRIC}"]]')
    points = ".js-plotly-plot .scatterlayer path.point"  # Plotly draws a marker per logged epoch

    def chart_drawn(driver) -> bool:
        return len(driver.find_element(*card).find_elements(By.CSS_SELECTOR, points)) >= EPOCHS

    # The page draws the first few charts only; a person would search for the one they want.
    search = (By.CSS_SELECTOR, 'input[placeholder="Search metric charts"]')
    wait_for(driver, shown.element_to_be_clickable(search), screenshots, "metrics").send_keys(METRIC)
    wait_for(driver, chart_drawn, screenshots, "metrics-chart")
    driver.save_screenshot(str(screenshots / "child-metrics.png"))
    chart = driver.find_element(*card)
    line = chart.find_element(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer path.js-line")
    assert line.get_attribute("d").startswith("M") and "L" in line.get_attribute("d")  # a drawn line
    assert f"{child.info.run_name} ({METRIC})" in chart.text


def test_the_ui_lists_the_parents_png_artifacts_and_shows_one(remote_sweep, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown

    driver, screenshots = browser
    parent = remote_sweep["parents"][0]
    open_page(driver, remote_sweep, f"/runs/{parent.info.run_id}/artifacts")
    pngs = sorted(name for name in REPORT_FILES if name.endswith(".png"))
    tree_node = '[data-testid="artifact-tree-node"]'
    first = (By.CSS_SELECTOR, f'{tree_node}[artifact-name="{pngs[0]}"]')
    wait_for(driver, shown.visibility_of_element_located(first), screenshots, "artifacts").click()
    listed = {
        node.get_attribute("artifact-name") for node in driver.find_elements(By.CSS_SELECTOR, tree_node)
    }
    assert set(pngs) <= listed

    def preview_decoded(driver) -> bool:
        images = driver.find_elements(By.CSS_SELECTOR, f'img[alt="{pngs[0]}"]')
        decoded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
        return any(driver.execute_script(decoded, image) for image in images)

    wait_for(driver, preview_decoded, screenshots, "artifact-preview")
    driver.save_screenshot(str(screenshots / "parent-artifacts.png"))
