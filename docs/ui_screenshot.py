"""Take the README's screenshot of the review page (docs/ui.png) with the same headless Chromium the tests use.

    .venv/bin/python docs/ui_screenshot.py [--data tests/data/abt_buy_small] [--out docs/ui.png]

Serves the API on a free loopback port over a temporary SQLite database with the default encoder, loads a
DeepMatcher-layout dataset (tableA as source a, tableB as source b), stores its train.csv pairs as labels,
then in the browser recalibrates from them, shows the review queue's first pair with its explanation and an
entity's details, and saves the page. Needs chromium and chromedriver (`make browser`) and selenium.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from llmatch.db import make_engine
from llmatch.migrate import upgrade_to_head
from llmatch.settings import Settings
from service.app import create_app

ROOT = Path(__file__).resolve().parent.parent
DATASET = "abt_buy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "tests" / "data" / "abt_buy_small")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui.png")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1250)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{Path(scratch) / 'llmatch.sqlite3'}"
        engine = make_engine(url)
        upgrade_to_head(engine)
        engine.dispose()
        settings = Settings(database_url=url, data_dir=Path(scratch) / "data", worker_poll_seconds=0.05)
        base, server, thread = serve(settings)
        try:
            prepare(base, args.data)
            shoot(base, args.out, args.width, args.height)
        finally:
            server.should_exit = True
            thread.join(timeout=60)
    print(f"wrote {args.out}")


def serve(settings: Settings) -> tuple[str, uvicorn.Server, threading.Thread]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the API did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def prepare(base: str, data: Path) -> None:
    """Records in, encoded, and train.csv stored as labels."""
    api = httpx.Client(base_url=base, timeout=120)
    api.put(f"/datasets/{DATASET}", json={}).raise_for_status()
    total = 0
    for source, table in (("a", "tableA.csv"), ("b", "tableB.csv")):
        with open(data / table, newline="") as handle:
            rows = list(csv.DictReader(handle))
        total += len(rows)
        for start in range(0, len(rows), 1000):
            records = [
                {"id": row.pop("id"), "attributes": {k: (v if v != "" else None) for k, v in row.items()}}
                for row in rows[start : start + 1000]
            ]
            api.post("/records", json={"dataset": DATASET, "source": source, "records": records}).raise_for_status()
    while (totals := api.get(f"/datasets/{DATASET}").json()["totals"])["encoded"] + totals["failed"] < total:
        print(f"encoding: {totals['encoded']}/{total}", flush=True)
        time.sleep(2)
    with open(data / "train.csv", newline="") as handle:
        pairs = [
            {"left_source": "a", "left_id": r["ltable_id"], "right_source": "b", "right_id": r["rtable_id"],
             "label": int(r["label"])}
            for r in csv.DictReader(handle)
        ]  # fmt: skip
    api.put(f"/datasets/{DATASET}/labels", json={"pairs": pairs}).raise_for_status()


def shoot(base: str, out: Path, width: int, height: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    binary = next(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n))
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"{base}/ui")
        until(lambda: driver.find_elements(By.CSS_SELECTOR, "body[data-ready='true']"))
        driver.find_element(By.ID, "recalibrate").click()
        until(lambda: driver.find_element(By.ID, "calibrate-result").is_displayed())
        until(lambda: driver.find_elements(By.CSS_SELECTOR, "#pair[data-explained='true']"), timeout=300)
        until(lambda: driver.find_elements(By.CSS_SELECTOR, "#entities > li"))
        driver.find_element(By.CSS_SELECTOR, "#entities > li:first-child .head button").click()
        until(lambda: driver.find_elements(By.CSS_SELECTOR, "#entities > li:first-child .detail tr"))
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("the page did not reach the expected state in time")
        time.sleep(0.2)


if __name__ == "__main__":
    main()
