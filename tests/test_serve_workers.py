"""`llmatch serve --workers N`: API processes forked after the indexes are loaded once, on one port. Real
processes, the real MiniLM worker (in the first API process), real FAISS."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.test_cli import LLMATCH, REPO, _env, _free_port, _wait_ready

RECORDS = [f"product number {i} in colour {colour}" for i, colour in enumerate(["red", "green", "blue"] * 10)]


def _serve(env: dict[str, str], port: int, log: Path, workers: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        [*LLMATCH, "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def _processes(url: str, wanted: int, attempts: int = 300) -> set[int]:
    """The API processes seen answering /readyz over new connections (until ``wanted`` distinct ones)."""
    seen: set[int] = set()
    for _ in range(attempts):
        answer = httpx.get(f"{url}/readyz")  # a new connection each time: the kernel picks the process
        assert answer.status_code == 200, answer.text
        seen.add(answer.json()["process"])
        if len(seen) >= wanted:
            break
    return seen


def _candidates(url: str, times: int) -> list[list[str]]:
    """The same candidate query over ``times`` new connections: whichever process answers."""
    answers = []
    for _ in range(times):
        answer = httpx.get(f"{url}/candidates", params=dict(dataset="shop", source="a", id="3", k=5))
        assert answer.status_code == 200, answer.text
        answers.append([hit["id"] for hit in answer.json()["candidates"]])
    return answers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _encoded(url: str) -> int:
    return httpx.get(f"{url}/datasets/shop").json()["totals"]["encoded"]


def test_api_processes_share_a_port_follow_the_log_and_are_replaced(tmp_path):
    env = _env(tmp_path / "data")
    assert subprocess.run([*LLMATCH, "migrate"], env=env, cwd=REPO, capture_output=True).returncode == 0
    port, log = _free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    server = _serve(env, port, log)
    try:
        _wait_ready(url)
        first = _processes(url, 2)
        assert len(first) == 2, log.read_text()
        assert httpx.put(f"{url}/datasets/shop", json={}).status_code == 201
        for source in ("a", "b"):
            rows = [{"id": str(i), "attributes": {"title": t}} for i, t in enumerate(RECORDS)]
            body = {"dataset": "shop", "source": source, "records": rows}
            assert httpx.post(f"{url}/records", json=body).status_code == 202
        deadline = time.monotonic() + 120
        while _encoded(url) < 2 * len(RECORDS):  # encoded by the worker of the first API process
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        time.sleep(1.5)  # a few index sync intervals: every process follows the change log
        answers = _candidates(url, 20)
        assert answers[0][0] == "3" and all(answer == answers[0] for answer in answers)

        killed = min(first)
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # the parent forks a replacement, which catches up from the log
            assert time.monotonic() < deadline, log.read_text()
            now = _processes(url, 2, attempts=40)
            if len(now) == 2 and killed not in now:
                break
            time.sleep(0.5)
        assert all(answer == answers[0] for answer in _candidates(url, 20))
        children = now
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=90)
    assert code == 0, log.read_text()
    assert not any(_alive(pid) for pid in children)
    text = log.read_text()
    assert f"API process {killed} (slot" in text and "signal SIGKILL" in text

    # Restarted over the saved index files: the parent loads them once, both processes answer at once.
    server = _serve(env, port, log)
    try:
        _wait_ready(url)
        assert len(_processes(url, 2)) == 2
        assert all(answer == answers[0] for answer in _candidates(url, 10))
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=90) == 0
    assert "2 loaded from file, 0 rebuilt" in log.read_text()[len(text) :]


@pytest.mark.parametrize("workers", ["0", "65", "two"])
def test_serve_refuses_a_bad_number_of_processes(tmp_path, workers):
    result = subprocess.run(
        [*LLMATCH, "serve", "--workers", workers], env=_env(tmp_path), cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2 and "from 1 to 64" in result.stderr
