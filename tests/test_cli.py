"""The `llmatch` command end to end: migrate, serve (with its in-process worker), ingest a CSV."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
LLMATCH = [sys.executable, "-m", "llmatch.cli"]


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMATCH_")}
    env.update(LLMATCH_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", LLMATCH_DEVICE="cpu")
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", ["serve", "worker", "migrate", "ingest", "fetch-smollm2"])
def test_every_subcommand_has_help(command):
    result = subprocess.run([*LLMATCH, command, "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "usage: llmatch " + command in result.stdout


def test_serve_refuses_a_database_behind_on_migrations(tmp_path):
    """A new embedded store creates itself (tests/test_faults.py); one at an older revision is never changed
    implicitly."""
    from alembic import command

    from llmatch.db import make_engine
    from llmatch.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'llmatch.sqlite3'}"
    with make_engine(url).begin() as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    result = subprocess.run(
        [*LLMATCH, "serve"], capture_output=True, text=True, cwd=REPO, env=_env(tmp_path), timeout=120
    )
    assert result.returncode == 2 and "run `llmatch migrate` first" in result.stderr


def test_ingest_csv_into_a_running_service(tmp_path):
    env = _env(tmp_path / "data")
    assert subprocess.run([*LLMATCH, "migrate"], env=env, cwd=REPO, capture_output=True).returncode == 0
    table = tmp_path / "table.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title", "price"])
        writer.writerows([[i, f"product number {i}", "" if i % 2 else f"{i}.99"] for i in range(120)])
    port = _free_port()
    server = subprocess.Popen(
        [*LLMATCH, "serve", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url)
        refused = subprocess.run(
            [*LLMATCH, "ingest", "shop", "a", str(table), "--url", url],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 1 and "PUT /datasets/shop" in refused.stderr
        assert httpx.put(f"{url}/datasets/shop", json={}).status_code == 201
        result = subprocess.run(
            [*LLMATCH, "ingest", "shop", "a", str(table), "--url", url, "--batch-size", "50"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert "accepted 120, created 120" in result.stdout
        _wait_encoded(url, 120)
        record = httpx.get(f"{url}/records/shop/a/3").json()
        assert record["attributes"] == {"title": "product number 3", "price": None}
        hits = httpx.get(f"{url}/candidates", params=dict(dataset="shop", source="a", id="7", k=3)).json()
        assert len(hits["candidates"]) == 3
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert list((tmp_path / "data" / "indexes").glob("*.faiss")), "index files saved at shutdown"


def _wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def _wait_encoded(url: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/datasets/shop").json()["totals"]["encoded"] < count:
        assert time.monotonic() < deadline, "records were not encoded by the in-process worker"
        time.sleep(0.2)
    time.sleep(1.0)  # one index sync interval
