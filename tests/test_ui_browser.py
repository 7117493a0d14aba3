"""The review page /ui in a real headless Chromium (Selenium and chromedriver): a person opens it, labels twenty
pairs with the keyboard, recalibrates and sees entities. The API runs with uvicorn on a loopback port (SQLite,
the real MiniLM, the in-process encoder worker). Skipped, saying why, where no browser is installed
(`make browser` installs one as root)."""

from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from encoding.registry import EncoderPool
from llmatch.settings import Settings
from service.app import create_app
from tests.live_server import live_server

DATA = Path(__file__).parent / "data" / "abt_buy_small"
DATASET = "abt_small"
REVIEW_ROUTES = {"/datasets/{name}/labels", "/datasets/{name}/review", "/datasets/{name}/entities"}
TRAIN_ROUTE = "/datasets/{name}/train"
TO_LABEL = 20


def _browser() -> tuple[str, str] | None:
    """(Chromium binary, chromedriver) when both are installed."""
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def _selenium_missing() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return True
    return False


BROWSER = _browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None or _selenium_missing(),
    reason="no Chromium and chromedriver found (or selenium is not installed): as root, `make browser` installs "
    "them (apt-get install chromium chromium-driver); `pip install -e .[dev]` installs selenium",
)


def _has_review_api() -> bool:
    return REVIEW_ROUTES <= set(create_app(Settings(device="cpu")).openapi()["paths"])


needs_review_api = pytest.mark.skipif(
    not _has_review_api(), reason="this build has no labels, /review and entities routes yet (contract v1.1)"
)


def _has_learning_api() -> bool:
    return TRAIN_ROUTE in create_app(Settings(device="cpu")).openapi()["paths"]


needs_learning_api = pytest.mark.skipif(
    not _has_learning_api(), reason="this build has no /datasets/{name}/train routes yet (contract v1.2)"
)


# ---------------------------------------------------------------------------------------------- the live server


@pytest.fixture
def live_settings(sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=sqlite_url,
        data_dir=tmp_path / "data",
        worker_poll_seconds=0.05,
        index_sync_seconds=0.1,
        auth_cache_seconds=0.5,
        device="cpu",
    )


@pytest.fixture
def live(live_settings: Settings, pool: EncoderPool) -> Iterator[str]:
    """The base URL of the real app (with its encoder worker) served on a free loopback port."""
    with live_server(create_app(live_settings, pool=pool)) as (url, _app):
        yield url


def _read_table(name: str) -> list[dict[str, Any]]:
    with open(DATA / name, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{"id": row.pop("id"), "attributes": {k: (v if v != "" else None) for k, v in row.items()}} for row in rows]


def _gold(*splits: str) -> dict[tuple[str, str], int]:
    """The labelled pairs of the slice's splits (default: all), (tableA id, tableB id) -> label."""
    gold = {}
    for split in splits or ("train.csv", "valid.csv", "test.csv"):
        with open(DATA / split, newline="") as handle:
            for row in csv.DictReader(handle):
                gold[(row["ltable_id"], row["rtable_id"])] = int(row["label"])
    return gold


def _load_and_encode(api: httpx.Client) -> int:
    """The Abt-Buy slice as sources a and b, encoded by the server's worker; returns the record count."""
    assert api.put(f"/datasets/{DATASET}", json={}).status_code == 201
    total = 0
    for source, table in (("a", "tableA.csv"), ("b", "tableB.csv")):
        records = _read_table(table)
        total += len(records)
        answer = api.post("/records", json={"dataset": DATASET, "source": source, "records": records})
        assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 400
    while (totals := api.get(f"/datasets/{DATASET}").json()["totals"])["encoded"] < total:
        assert totals["failed"] == 0, totals
        assert time.monotonic() < deadline, f"records still not encoded: {totals}"
        time.sleep(0.5)
    return total


# ---------------------------------------------------------------------------------------------- the browser


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = BROWSER
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - an element replaced while read: look again
            last_error = error
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def message(driver: Any) -> str:
    box = by_id(driver, "message")
    return "" if box.get_attribute("hidden") is not None else by_id(driver, "message-text").text


def press(driver: Any, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def side(text: str) -> tuple[str, str]:
    source, _, record_id = text.partition("/")
    return source, record_id


# ---------------------------------------------------------------------------------------------- tests


def test_page_and_assets_are_served_offline(client: TestClient) -> None:
    """The page, its script and style come from the service itself, with a policy that forbids anything else."""
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        answer = client.get(f"/ui/{asset}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
        assert f'"ui/{asset}"' in page.text
        for text in (page.text, answer.text):
            assert "http://" not in text and "https://" not in text and "//cdn" not in text
    missing = client.get("/ui/secrets.txt")
    assert missing.status_code == 404 and "open /ui" in missing.json()["detail"]
    assert client.get("/ui/..%2Fapp.py").status_code == 404
    assert not any(path.startswith("/ui") for path in client.get("/openapi.json").json()["paths"])


@needs_browser
@needs_review_api
def test_label_twenty_pairs_recalibrate_and_see_entities(live: str, browser: Any) -> None:
    api = httpx.Client(base_url=live, timeout=60)
    total = _load_and_encode(api)
    gold = _gold()

    browser.get(f"{live}/ui")
    wait_for(lambda: browser.find_element("css selector", "body[data-ready='true']"), "the page to start")
    item = browser.find_element("css selector", f"#datasets li[data-name='{DATASET}']")
    assert f"{total}/{total} encoded" in item.text and "uncalibrated" in item.text

    # An error from the API reaches the person: no labels are stored yet, so calibrating from them is refused.
    refused = api.post(f"/datasets/{DATASET}/calibrate", json={"from": "labels"})
    assert 400 <= refused.status_code < 500
    by_id(browser, "recalibrate").click()
    wait_for(lambda: refused.json()["detail"] in message(browser), "the API's refusal shown on the page")

    # The first pair, side by side, with the explanation the API gives for it.
    pair_box = wait_for(
        lambda: browser.find_element("css selector", "#pair[data-explained='true']"), "the explanation", timeout=180
    )
    left, right = side(pair_box.get_attribute("data-left")), side(pair_box.get_attribute("data-right"))
    explained = api.get(
        "/match",
        params={
            "dataset": DATASET,
            "left_source": left[0],
            "left_id": left[1],
            "right_source": right[0],
            "right_id": right[1],
            "explain": "true",
        },
    ).json()["explanation"]
    rows = browser.find_elements("css selector", "#comparison tbody tr")
    assert [r.get_attribute("data-attribute") for r in rows] == [a["name"] for a in explained["attributes"]]
    for row, attribute in zip(rows, explained["attributes"], strict=True):
        expected = (
            "sim-missing"
            if attribute["similarity"] is None
            else "sim-high"
            if attribute["similarity"] >= 0.8
            else "sim-low"
            if attribute["similarity"] < 0.5
            else "sim-mid"
        )
        assert row.get_attribute("class") == expected, (attribute, row.get_attribute("class"))
    for group in ("shared", "left_only", "right_only"):
        marks = browser.find_elements("css selector", f"#identifiers [data-group='{group}'] mark")
        assert [m.text for m in marks] == explained["identifiers"][group]

    # Twenty pairs labelled with the keyboard: y for the slice's matches, n otherwise.
    pressed: dict[tuple[tuple[str, str], tuple[str, str]], int] = {}
    while len(pressed) < TO_LABEL:
        box = wait_for(lambda: browser.find_element("css selector", "#pair[data-state='ready']"), "a pair to label")
        left, right = side(box.get_attribute("data-left")), side(box.get_attribute("data-right"))
        a, b = (left, right) if left[0] == "a" else (right, left)
        label = gold.get((a[1], b[1]), 0)
        before = box.get_attribute("data-pair")
        press(browser, "y" if label else "n")
        pressed[(left, right)] = label
        count = str(len(pressed))
        wait_for(
            lambda n=count: by_id(browser, "session-count").get_attribute("data-labelled") == n,
            f"label {count} to be stored",
        )
        wait_for(
            lambda b=before: (by_id(browser, "pair").get_attribute("data-pair") or "") != b,
            "the next pair",
        )
        assert not message(browser), message(browser)

    # What the keys stored is what was pressed.
    stored = api.get(f"/datasets/{DATASET}/labels").json()
    assert stored["total"] == TO_LABEL
    assert by_id(browser, "labels-count").get_attribute("data-total") == str(TO_LABEL)
    got = {((p["left_source"], p["left_id"]), (p["right_source"], p["right_id"])): p["label"] for p in stored["pairs"]}
    assert {frozenset(k): v for k, v in got.items()} == {frozenset(k): v for k, v in pressed.items()}

    # A skipped pair is not labelled.
    box = wait_for(lambda: browser.find_element("css selector", "#pair[data-state='ready']"), "a pair to skip")
    before = box.get_attribute("data-pair")
    press(browser, "s")
    wait_for(lambda: (by_id(browser, "pair").get_attribute("data-pair") or "") != before, "the pair after a skip")
    before = by_id(browser, "pair").get_attribute("data-pair")
    by_id(browser, "label-skip").click()  # the buttons do what the keys do
    wait_for(lambda: (by_id(browser, "pair").get_attribute("data-pair") or "") != before, "the pair after a click")
    assert api.get(f"/datasets/{DATASET}/labels").json()["total"] == TO_LABEL

    # The queue offered matches too (after the first non-matches it looks above them), so the labels calibrate.
    assert any(pressed.values()), "the review queue offered no match in twenty pairs"
    labels_total = api.get(f"/datasets/{DATASET}/labels").json()["total"]

    # Recalibrate from the stored labels: the page reports the service's new calibration.
    by_id(browser, "recalibrate").click()
    result = wait_for(
        lambda: by_id(browser, "calibrate-result").is_displayed() and by_id(browser, "calibrate-result"),
        "the calibration result",
    )
    calibration = api.get(f"/datasets/{DATASET}").json()["calibration"]
    assert calibration["pairs"] == labels_total
    assert (
        f"threshold {calibration['threshold']:.3f}" in result.text and f"{labels_total} labelled pairs" in result.text
    )
    wait_for(lambda: "uncalibrated" not in by_id(browser, "datasets").text, "the dataset list to show the calibration")

    # The entities the service formed are the ones the page lists.
    def listed() -> list[tuple[str, str]]:
        items = browser.find_elements("css selector", "#entities > li")
        if not items:
            by_id(browser, "reload-entities").click()
            time.sleep(0.5)
        return [(i.get_attribute("data-entity"), i.get_attribute("data-size")) for i in items]

    shown = wait_for(listed, "entities on the page")
    entities = api.get(f"/datasets/{DATASET}/entities", params={"min_size": 2, "limit": 20}).json()
    assert shown == [(e["id"], str(e["size"])) for e in entities["entities"]]
    assert by_id(browser, "entities-total").get_attribute("data-total") == str(entities["total"])

    # An entity's details: its records, read from the service.
    first = entities["entities"][0]
    browser.find_element("css selector", "#entities > li:first-child .head button").click()
    detail_rows = wait_for(
        lambda: browser.find_elements("css selector", "#entities > li:first-child .detail table:first-child tbody tr"),
        "the entity's records",
    )
    expected = [f"{r['source']}:{r['id']}" for r in first["records"][:20]] + (["…"] if first["size"] > 20 else [])
    assert [r.find_element("css selector", "td").text for r in detail_rows] == expected

    # Everything the page loaded came from the service itself.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(live + "/") for url in loaded), loaded


@needs_browser
@needs_review_api
def test_page_asks_for_a_key_when_access_control_is_on(live_settings: Settings, pool: EncoderPool, capsys, browser):
    keys = pytest.importorskip("service.keys", reason="this build has no API keys yet (contract v1.1, Access)")

    def create(name: str, scope: str) -> str:
        assert keys.run_keys_command(live_settings, "create", name, [scope], None) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]

    admin, reader = create("admin", "admin"), create("reader", f"{DATASET}:read")
    with live_server(create_app(live_settings, pool=pool)) as (url, _app):
        headers = {"Authorization": f"Bearer {admin}"}
        assert httpx.put(f"{url}/datasets/{DATASET}", json={}, headers=headers).status_code == 201

        browser.get(f"{url}/ui")
        wait_for(lambda: browser.find_element("css selector", "body[data-ready='true']"), "the page to start")
        wait_for(lambda: "needs an API key" in message(browser), "the page asking for a key")
        assert "wanted" in by_id(browser, "key-form").get_attribute("class")
        assert not browser.find_elements("css selector", "#datasets li")

        by_id(browser, "api-key").send_keys(reader)
        by_id(browser, "use-key").click()
        wait_for(lambda: browser.find_elements("css selector", f"#datasets li[data-name='{DATASET}']"), "the list")
        assert not message(browser)
        assert browser.execute_script("return sessionStorage.getItem('llmatch.apiKey')") == reader

        # A read-only key cannot calibrate: the 403 names the scope and asks for another key.
        by_id(browser, "recalibrate").click()
        wait_for(lambda: f"{DATASET}:manage" in message(browser), "the missing scope named on the page")
        assert "does not allow this" in message(browser)


# ---------------------------------------------------------------------------------------------- training


def _open(browser: Any, url: str, dataset: str) -> None:
    browser.get(f"{url}/ui#{dataset}")
    wait_for(lambda: browser.find_element("css selector", "body[data-ready='true']"), "the page to start")
    wait_for(lambda: by_id(browser, "dataset-name").text.startswith(dataset), f"dataset {dataset} selected")


def _labels(pairs: list[tuple[str, str, int]]) -> dict:
    return {
        "pairs": [
            {"left_source": "a", "left_id": a, "right_source": "b", "right_id": b, "label": label}
            for a, b, label in pairs
        ]
    }


@needs_browser
@needs_learning_api
def test_train_from_labels_with_too_few_labels_shows_the_refusal(live: str, browser: Any) -> None:
    api = httpx.Client(base_url=live, timeout=60)
    assert api.put("/datasets/few", json={}).status_code == 201
    rows = [{"id": f"r{i}", "attributes": {"name": f"item {i}"}} for i in range(3)]
    for source in ("a", "b"):
        assert api.post("/records", json={"dataset": "few", "source": source, "records": rows}).status_code == 202
    assert api.put("/datasets/few/labels", json=_labels([("r0", "r0", 1), ("r0", "r1", 0)])).status_code == 200
    refused = api.post("/datasets/few/train", json={})
    assert refused.status_code == 409 and refused.json()["detail"]

    _open(browser, live, "few")
    assert by_id(browser, "encoder-version").text == "as configured"
    assert by_id(browser, "train-status").text == "" and not by_id(browser, "train-cancel").is_displayed()
    by_id(browser, "train").click()
    answer = wait_for(lambda: by_id(browser, "train-answer").is_displayed() and by_id(browser, "train-answer"), "409")
    assert answer.text == refused.json()["detail"] and answer.get_attribute("data-status") == "409"
    assert by_id(browser, "training").get_attribute("data-status") is None, "no job: nothing shown"
    assert not by_id(browser, "train-progress").is_displayed() and not by_id(browser, "train-metrics").is_displayed()
    assert api.get("/datasets/few/train").status_code == 404


@needs_browser
@needs_learning_api
def test_a_queued_training_job_shows_progress_and_cancel_ends_it(
    live_settings: Settings, pool: EncoderPool, browser: Any
) -> None:
    """No worker runs here, so the job the button starts stays queued until Cancel ends it."""
    with live_server(create_app(live_settings, pool=pool, run_worker=False)) as (url, _app):
        api = httpx.Client(base_url=url, timeout=60)
        assert api.put("/datasets/enough", json={}).status_code == 201
        rows = [{"id": f"r{i}", "attributes": {"name": f"item {i}"}} for i in range(10)]
        for source in ("a", "b"):
            answer = api.post("/records", json={"dataset": "enough", "source": source, "records": rows})
            assert answer.status_code == 202
        pairs = [(f"r{i}", f"r{i}", 1) for i in range(10)] + [(f"r{i}", f"r{(i + 1) % 10}", 0) for i in range(10)]
        assert api.put("/datasets/enough/labels", json=_labels(pairs)).status_code == 200

        _open(browser, url, "enough")
        by_id(browser, "train").click()
        wait_for(lambda: by_id(browser, "train-answer").get_attribute("data-status") == "202", "the job started")
        job = api.get("/datasets/enough/train").json()
        assert job["status"] == "queued"
        assert job["id"] in by_id(browser, "train-answer").text
        assert by_id(browser, "training").get_attribute("data-status") == "queued"
        assert "queued, 0%" in by_id(browser, "train-status").text
        assert by_id(browser, "train-progress").is_displayed() and by_id(browser, "train-cancel").is_displayed()
        assert not by_id(browser, "train-outcome").is_displayed()

        # A second press while the job is unfinished: the service's 409 says so, and the job stays shown.
        by_id(browser, "train").click()
        wait_for(lambda: by_id(browser, "train-answer").get_attribute("data-status") == "409", "the second 409")
        assert by_id(browser, "train-answer").text == api.post("/datasets/enough/train", json={}).json()["detail"]

        by_id(browser, "train-cancel").click()
        wait_for(lambda: by_id(browser, "training").get_attribute("data-status") == "cancelled", "the cancelled job")
        cancelled = api.get("/datasets/enough/train").json()
        assert cancelled["status"] == "cancelled"
        outcome = by_id(browser, "train-outcome")
        assert outcome.is_displayed() and "status: cancelled" in outcome.text and "adopted: null" in outcome.text
        assert cancelled["error"] is None or f"error: {cancelled['error']}" in outcome.text
        assert not by_id(browser, "train-cancel").is_displayed() and not by_id(browser, "train-progress").is_displayed()


# A job the page reads while it runs and after it ends, answered by the page's own fetch (no training here).
FAKE_TRAINING = """
const steps = arguments[0];
const real = window.fetch.bind(window);
window.__calls = [];
window.fetch = (input, init) => {
  const url = String(input);
  const method = (init && init.method) || "GET";
  window.__calls.push(`${method} ${url.replace(location.origin, "")}`);
  if (url.endsWith("/train") && method === "GET") {
    const body = steps.length > 1 ? steps.shift() : steps[0];
    return Promise.resolve(new Response(JSON.stringify(body), {status: 200}));
  }
  return real(input, init);
};
"""


@needs_browser
@needs_learning_api
def test_a_finished_job_shows_its_outcome_and_metrics_and_reloads_when_adopted(live: str, browser: Any) -> None:
    api = httpx.Client(base_url=live, timeout=60)
    assert api.put("/datasets/done", json={}).status_code == 201
    _open(browser, live, "done")
    job = {"id": "j1", "labels": 40, "version": "done-v1", "adopted": None, "metrics": None, "error": None}
    metrics = {
        "holdout_pairs": 12,
        "candidate": {"f1": 0.91666, "threshold": 0.5},
        "current": {"f1": 0.8},
        "reason": "better F1",
    }
    steps = [
        {**job, "status": "training", "progress": 0.25},
        {**job, "status": "encoding", "progress": 0.75},
        {**job, "status": "done", "progress": 1.0, "adopted": True, "metrics": metrics},
    ]
    browser.execute_script(FAKE_TRAINING, steps)
    by_id(browser, "train").click()  # the real POST: too few labels, 409; then the (fake) job is read
    wait_for(lambda: by_id(browser, "training").get_attribute("data-status") == "training", "the running job")
    assert "training, 25%" in by_id(browser, "train-status").text and by_id(browser, "train-cancel").is_displayed()
    wait_for(lambda: by_id(browser, "training").get_attribute("data-status") == "done", "the job's end", timeout=20)
    outcome = by_id(browser, "train-outcome")
    assert outcome.text == "status: done · adopted: true · version: done-v1"
    shown = {
        row.get_attribute("data-metric"): row.find_elements("css selector", "td")[1].text
        for row in browser.find_elements("css selector", "#train-metrics tbody tr")
    }
    assert shown == {
        "holdout_pairs": "12",
        "candidate.f1": "0.917",
        "candidate.threshold": "0.500",
        "current.f1": "0.800",
        "reason": "better F1",
    }
    assert not by_id(browser, "train-cancel").is_displayed() and not by_id(browser, "train-progress").is_displayed()

    def reloaded() -> bool:
        calls = browser.execute_script("return window.__calls")
        ended = max(i for i, call in enumerate(calls) if call == "GET /datasets/done/train")
        return {"GET /datasets", "GET /datasets/done/review?limit=20"} <= set(calls[ended:])

    wait_for(reloaded, "the summary and the review pairs read again after adoption")
