"""``llmatch worker`` runs its loop in a child process that its parent, holding the loaded encoder, forks again
when it dies: a crash costs a fork, not a cold start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import records_body
from fastapi.testclient import TestClient
from sqlalchemy import text

from encoder_worker.supervisor import RestartPolicy, Supervisor
from llmatch.db import make_engine
from llmatch.settings import Settings
from service.app import create_app

REPO = Path(__file__).resolve().parents[1]


def test_a_crashed_child_is_forked_again_and_a_clean_exit_ends_the_supervisor(tmp_path):
    def child() -> int:
        started = len(list(tmp_path.glob("start-*")))
        (tmp_path / f"start-{started}").write_text(str(os.getpid()))
        if started < 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    supervisor = Supervisor(child, RestartPolicy(young_seconds=0.0))
    assert supervisor.run() == 0
    assert supervisor.restarts == 2
    pids = {path.read_text() for path in tmp_path.glob("start-*")}
    assert len(pids) == 3 and str(os.getpid()) not in pids


def test_young_deaths_and_errors_back_off_and_crashes_restart_at_once():
    policy = RestartPolicy(young_seconds=0.5, settled_seconds=60.0, first_delay=0.5, max_delay=4.0)
    assert policy.delay(0.0, lived=3.0, crashed=True) == 0.0  # a crash after a working life: at once
    delays = [0.0]
    for _ in range(5):  # dying young, again and again
        delays.append(policy.delay(delays[-1], lived=0.1, crashed=True))
    assert delays[1:] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.delay(2.0, lived=3.0, crashed=False) == 4.0  # an error exit: the delay grows
    assert policy.delay(4.0, lived=120.0, crashed=False) == 0.5  # an error after a settled life: a short pause


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _encoded(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM records WHERE status = 'encoded'")).scalar_one()
    finally:
        engine.dispose()


def _wait(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_killed_encoding_process_is_replaced_without_loading_the_model_again(sqlite_url, tmp_path, counting_pool):
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path, device="cpu")
    rows = [(f"r{i}", {"title": f"product {i} with a model number x{i * 7919 % 100000}"}) for i in range(400)]
    with TestClient(create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost") as api:
        api.put("/datasets/shop", json={})
        assert api.post("/records", json=records_body("shop", "a", rows)).status_code == 202
    env = {
        **os.environ,
        "LLMATCH_DATABASE_URL": sqlite_url,
        "LLMATCH_DATA_DIR": str(tmp_path),
        "LLMATCH_DEVICE": "cpu",
        "LLMATCH_WORKER_BATCH_SIZE": "16",
        "LLMATCH_WORKER_LEASE_SECONDS": "3",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "llmatch.cli", "worker"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait(lambda: _encoded(sqlite_url) > 0)
        (first,) = _children(worker.pid)
        os.kill(first, signal.SIGKILL)
        _wait(lambda: _children(worker.pid) not in ([], [first]))
        _wait(lambda: _encoded(sqlite_url) == len(rows))
        (second,) = _children(worker.pid)
        os.kill(worker.pid, signal.SIGKILL)  # the parent gone, its child stops too
        _wait(lambda: not Path(f"/proc/{second}").exists() or "Z" in _state(second), timeout=30)
    finally:
        worker.kill()
        worker.wait()
    output = log_path.read_text()
    assert output.count("loading encoder") == 1, output
    assert "encoding process was killed by signal 9" in output, output
    assert output.count("encoder worker started") == 2, output


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return "Z"
