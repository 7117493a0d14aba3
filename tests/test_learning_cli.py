"""`llmatch train --dataset NAME` and `llmatch label NAME` against a live server (real HTTP, no worker in it: a job
stays queued until the test moves it, as a worker would)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import records_body
from sqlalchemy import update

from learning.labels import MIN_MATCHES, MIN_NON_MATCHES
from llmatch import cli
from llmatch.db import transaction
from llmatch.models import TrainingJob
from service.app import create_app
from tests.live_server import live_server

REPO = Path(__file__).resolve().parent.parent
RECORDS = 12


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """The commands speak HTTP only: one backend is enough (tests/test_learning_api.py runs both)."""
    return sqlite_url


@pytest.fixture
def server(settings, counting_pool):
    with live_server(create_app(settings, pool=counting_pool, run_worker=False)) as (url, app):
        yield url, app


@pytest.fixture
def shop(client) -> str:
    assert client.put("/datasets/shop", json={}).status_code == 201
    for source in ("a", "b"):
        rows = [(f"{source}{i}", {"name": f"product {i} {source}"}) for i in range(RECORDS)]
        assert client.post("/records", json=records_body("shop", source, rows)).status_code == 202
    return "shop"


def label_pairs(matches: int, non_matches: int) -> list[dict]:
    pairs = [(f"a{i}", f"b{i}", 1) for i in range(matches)]
    pairs += [(f"a{i}", f"b{(i + 1) % RECORDS}", 0) for i in range(non_matches)]
    return [{"left_source": "a", "left_id": a, "right_source": "b", "right_id": b, "label": y} for a, b, y in pairs]


def store_enough(client) -> None:
    response = client.put("/datasets/shop/labels", json={"pairs": label_pairs(MIN_MATCHES, MIN_NON_MATCHES)})
    assert response.status_code == 200


def test_train_with_too_few_labels_prints_the_detail_and_exits_2(client, shop, server, capsys):
    url, _ = server
    assert client.put("/datasets/shop/labels", json={"pairs": label_pairs(3, MIN_NON_MATCHES)}).status_code == 200
    assert cli.main(["train", "--dataset", "shop", "--url", url]) == 2
    err = capsys.readouterr().err
    assert f"at least {MIN_MATCHES} matches and {MIN_NON_MATCHES} non-matches" in err and "it has 3 and 10" in err
    assert cli.main(["train", "--dataset", "nosuch", "--url", url]) == 2
    assert "PUT /datasets/nosuch" in capsys.readouterr().err


def _train_in_thread(url: str, results: list[int]) -> threading.Thread:
    args = ["train", "--dataset", "shop", "--url", url, "--poll-seconds", "0.1"]
    thread = threading.Thread(target=lambda: results.append(cli.main(args)), daemon=True)
    thread.start()
    return thread


def _wait_for_job(url: str) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/datasets/shop/train")
        if response.status_code == 200:
            return response.json()
        time.sleep(0.05)
    raise AssertionError("the command started no job")


def test_train_waits_for_the_job_and_prints_its_end(client, shop, server, capsys):
    url, app = server
    store_enough(client)
    results: list[int] = []
    thread = _train_in_thread(url, results)
    job = _wait_for_job(url)
    assert job["status"] == "queued"
    metrics = {"holdout": {"new": {"f1": 0.91, "pairs": 6}, "current": {"f1": 0.8, "pairs": 6}}}
    with transaction(app.state.service.session_factory) as session:
        session.execute(update(TrainingJob).where(TrainingJob.id == job["id"]).values(status="training", progress=0.5))
    time.sleep(0.3)
    with transaction(app.state.service.session_factory) as session:
        session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job["id"])
            .values(status="done", progress=1.0, version="shop.v1-abcdef", adopted=True, metrics=metrics)
        )
    thread.join(timeout=30)
    assert results == [0]
    out = capsys.readouterr().out
    assert f"training job {job['id']} of shop: queued with 20 labels" in out
    assert "status: done" in out and "version: shop.v1-abcdef" in out and "adopted: yes" in out
    assert "holdout.new.f1" in out and "0.9100" in out and "holdout.current.f1" in out


def test_train_exits_1_when_the_job_is_cancelled(client, shop, server, capsys):
    url, _ = server
    store_enough(client)
    results: list[int] = []
    thread = _train_in_thread(url, results)
    _wait_for_job(url)
    assert cli.main(["train", "--dataset", "shop", "--url", url, "--cancel"]) == 0
    thread.join(timeout=30)
    assert results == [1]
    out = capsys.readouterr().out
    assert "status: cancelled" in out and "error: cancelled before it started" in out
    assert cli.main(["train", "--dataset", "shop", "--url", url, "--cancel"]) == 2
    assert "already ended (cancelled)" in capsys.readouterr().err


def test_train_takes_folders_or_a_dataset(capsys, tmp_path):
    assert cli.main(["train"]) == 2
    assert "DATASET_DIR" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path), "--dataset", "shop"]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "shop", "--base", "minilm", "--epochs", "2"]) == 2
    assert "--base, --epochs only apply to training on DATASET_DIR folders" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path), "--cancel"]) == 2


def _label_command(url: str, *args: str, answers: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "llmatch.cli", "label", "shop", "--url", url, *args],
        input=answers,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_label_stores_piped_answers(client, products, server):
    url, _ = server
    # y, n, s on the first page of 3, no recalibration, then quit on the next page.
    done = _label_command(url, "--yes-stdin", "--limit", "3", answers="y\nn\ns\nn\nq\n")
    assert done.returncode == 0, done.stderr
    assert "2 labelled: 1 matches, 1 non-matches, 1 skipped" in done.stdout
    assert "llmatch train --dataset shop" in done.stdout
    first_page, next_page = done.stdout.split("stored (2 labels")
    assert first_page.count("[1/3] score") == 1 and next_page.count("[1/3] score") == 1, "a page, then the next"
    assert "HTTP Request" not in done.stderr
    stored = client.get("/datasets/shop/labels").json()
    assert stored["total"] == 2 and sorted(p["label"] for p in stored["pairs"]) == [0, 1]


def test_label_refuses_input_that_is_not_a_terminal(client, products, server):
    url, _ = server
    refused = _label_command(url, answers="y\n")
    assert refused.returncode == 2 and "--yes-stdin" in refused.stderr
    assert client.get("/datasets/shop/labels").json()["total"] == 0
