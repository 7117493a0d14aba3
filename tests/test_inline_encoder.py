"""Inline encodes on the worker: a real ``llmatch worker --serve-inline`` process, and an API that sends its
on-the-spot encodes there (``LLMATCH_INLINE_ENCODER_URL``) instead of encoding them itself."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import PRODUCTS_B, CountingPool, records_body
from fastapi.testclient import TestClient

from encoder_worker.inline_server import InlineEncodeServer
from encoder_worker.worker import EncoderWorker
from encoding.encoder import EncoderInput
from encoding.registry import EncoderPool
from encoding.render import RenderConfig, render
from encoding.sentence_transformer import packaged_minilm_path
from encoding.wire import MAX_BODY_BYTES, MAX_INPUTS, decode_vectors
from llmatch.db import make_engine
from llmatch.migrate import upgrade_to_head
from llmatch.settings import Settings
from service.app import create_app
from service.inline_encoder import RemoteEncodes

ROOT = Path(__file__).resolve().parents[1]
SONY = {"name": "sony bravia kd55x85j 55 inch 4k smart tv, black"}
CANON = {"name": "canon eos r6 full frame mirrorless body"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class WorkerProcess:
    url: str  # of its inline endpoint
    inline_port: int
    metrics_port: int


@pytest.fixture(scope="module")
def worker_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """``llmatch worker --serve-inline PORT --metrics-port PORT`` in a subprocess (its own SQLite queue)."""
    folder = tmp_path_factory.mktemp("inline-worker")
    url = f"sqlite:///{folder / 'worker.sqlite3'}"
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "LLMATCH_DATABASE_URL": url,
        "LLMATCH_DATA_DIR": str(folder / "data"),
        "LLMATCH_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    log = (folder / "worker.log").open("w")
    command = [sys.executable, "-m", "llmatch.cli", "worker", "--serve-inline", str(port)]
    command += ["--metrics-port", str(metrics_port)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (folder / "worker.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the worker never served /healthz"
            time.sleep(0.5)
        yield WorkerProcess(base, port, metrics_port)
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def inline_worker(worker_process: WorkerProcess) -> str:
    """The base URL of the worker process's inline endpoint."""
    return worker_process.url


def listening_addresses(port: int) -> set[str]:
    """Addresses this machine listens on at TCP ``port`` (Linux: /proc/net/tcp and tcp6)."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        pytest.skip("needs /proc/net/tcp")
    found = set()
    for table in (path for path in tables if path.exists()):
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                found.add(str(ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))))
    return found


def test_worker_ports_listen_on_loopback_by_default(worker_process: WorkerProcess) -> None:
    """Neither the metrics nor the inline endpoint has authentication: without a host option, loopback only."""
    for port in (worker_process.metrics_port, worker_process.inline_port):
        addresses = listening_addresses(port)
        assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), (port, addresses)


def api_settings(sqlite_url: str, tmp_path: Path, inline_url: str, **overrides) -> Settings:
    return Settings(
        database_url=sqlite_url,
        data_dir=tmp_path / "data",
        device="cpu",
        index_sync_seconds=0.1,
        inline_encoder_url=inline_url,
        inline_encoder_timeout_seconds=180,
        **overrides,
    )


@pytest.fixture
def inline_client(sqlite_url: str, tmp_path: Path, inline_worker: str, counting_pool: CountingPool):
    settings = api_settings(sqlite_url, tmp_path, inline_worker)
    with TestClient(create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost") as client:
        assert client.put("/datasets/shop", json={}).status_code == 201
        yield client


def test_inline_match_is_encoded_by_the_worker_process(
    inline_client: TestClient, counting_pool: CountingPool, pool: EncoderPool
) -> None:
    response = inline_client.post(
        "/match", json={"dataset": "shop", "left": {"attributes": SONY}, "right": {"attributes": CANON}}
    )
    assert response.status_code == 200, response.text
    assert counting_pool.calls == []  # the API encoded nothing itself
    left, right = pool.encode(
        "minilm", [EncoderInput(None, f"[name] {record['name']} [\\name]") for record in (SONY, CANON)]
    )
    assert response.json()["score"] == pytest.approx(float(left @ right), abs=1e-5)


def test_inline_candidates_are_encoded_by_the_worker_process(
    inline_client: TestClient, counting_pool: CountingPool, sqlite_url: str, tmp_path: Path, inline_worker: str
) -> None:
    assert inline_client.post("/records", json=records_body("shop", "b", PRODUCTS_B)).status_code == 202
    state = inline_client.app.state.service
    EncoderWorker(state.session_factory, counting_pool, api_settings(sqlite_url, tmp_path, inline_worker)).drain()
    state.synchronizer.poll()
    stored = len(counting_pool.calls)
    body = {"dataset": "shop", "record": {"attributes": SONY}, "k": 2, "target_source": "b"}
    response = inline_client.post("/candidates", json=body)
    assert response.status_code == 200, response.text
    assert [c["id"] for c in response.json()["candidates"]][:1] == ["b1"]
    assert len(counting_pool.calls) == stored  # the inline record went to the worker


def test_record_at_the_contracts_maxima_is_encoded_by_the_worker(
    inline_client: TestClient, counting_pool: CountingPool, pool: EncoderPool
) -> None:
    """256 values of 65,536 characters (16 million in all): cut to the text limit before it leaves the API."""
    words = " ".join(f"sony bravia kd{i} 4k smart tv é😀" for i in range(4_000))[:65_536]
    biggest = {f"attribute {i:03d}": f"{i} {words}"[:65_536] for i in range(256)}
    response = inline_client.post(
        "/match", json={"dataset": "shop", "left": {"attributes": biggest}, "right": {"attributes": SONY}}
    )
    assert response.status_code == 200, response.text[:500]
    assert counting_pool.calls == []
    left, right = pool.encode("minilm", [EncoderInput(None, render(r, RenderConfig())) for r in (biggest, SONY)])
    assert response.json()["score"] == pytest.approx(float(left @ right), abs=1e-5)


def test_unreachable_inline_encoder_is_a_503(
    sqlite_url: str, tmp_path: Path, counting_pool: CountingPool, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator's log names the worker's address; the client's detail does not."""
    address = f"127.0.0.1:{free_port()}"
    settings = api_settings(sqlite_url, tmp_path, f"http://{address}")
    with TestClient(create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost") as client:
        assert client.put("/datasets/shop", json={}).status_code == 201
        response = client.post("/candidates", json={"dataset": "shop", "record": {"attributes": SONY}})
    assert response.status_code == 503
    assert "unreachable" in response.json()["detail"] and "LLMATCH_INLINE_ENCODER_URL" in response.json()["detail"]
    assert address not in response.text
    assert any(address in line and "unreachable" in line for line in caplog.messages)
    assert counting_pool.calls == []


def test_worker_with_other_weights_is_refused(
    sqlite_url: str, tmp_path: Path, inline_worker: str, counting_pool: CountingPool
) -> None:
    """The API's ``minilm`` cuts texts at 128 tokens, the worker's does not: other vectors, so a 503."""
    other = {"minilm": {"kind": "sentence-transformers", "model": str(packaged_minilm_path()), "max_length": 128}}
    settings = api_settings(sqlite_url, tmp_path, inline_worker, encoders=other)
    with TestClient(
        create_app(settings, pool=EncoderPool(settings), run_worker=False), base_url="http://localhost"
    ) as client:
        assert client.put("/datasets/shop", json={}).status_code == 201
        response = client.post(
            "/match", json={"dataset": "shop", "left": {"attributes": SONY}, "right": {"attributes": CANON}}
        )
    assert response.status_code == 503
    assert "other weights or settings" in response.json()["detail"]
    assert inline_worker.removeprefix("http://") not in response.text


# --- the endpoint itself, in this process over the real MiniLM ---------------------------------------------------


@pytest.fixture
def server(pool: EncoderPool) -> Iterator[InlineEncodeServer]:
    server = InlineEncodeServer(pool, "127.0.0.1", 0, concurrency=1, wait_seconds=0.2)
    server.start()
    yield server
    server.stop()


def post(server: InlineEncodeServer, body: object) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{server.port}/encode", json=body, timeout=120)


def test_endpoint_answers_the_pools_vectors(server: InlineEncodeServer, pool: EncoderPool) -> None:
    inputs = [EncoderInput(None, "sony tv"), EncoderInput("find the same product", "canon camera")]
    body = {"encoder": "minilm", "key": pool.spec("minilm").key, "inputs": [i.__dict__ for i in inputs]}
    response = post(server, body)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(decode_vectors(response.json(), 2), pool.encode("minilm", inputs), atol=1e-6)


def test_remote_encodes_send_requests_the_worker_accepts(server: InlineEncodeServer, pool: EncoderPool) -> None:
    """More texts than one request takes, and long texts whose JSON passes the body limit together."""
    short = [EncoderInput(None, f"product {i} sony tv") for i in range(2 * MAX_INPUTS + 1)]
    long = [EncoderInput("find the same product", f"{i} " + "😀" * 20_000) for i in range(48)]
    assert sum(len(json.dumps(i.text[: pool.max_text_chars])) for i in long) > MAX_BODY_BYTES
    inputs = short + long
    remote = RemoteEncodes(pool, f"http://127.0.0.1:{server.port}", timeout=120)
    try:
        vectors = remote.encode("minilm", inputs)
    finally:
        remote.close()
    np.testing.assert_allclose(vectors, pool.encode("minilm", inputs), atol=1e-5)


@pytest.fixture
def guarded_server(pool: EncoderPool, request: pytest.FixtureRequest) -> Iterator[InlineEncodeServer]:
    """An endpoint whose connections time out after ``request.param`` seconds, at most two at once."""
    server = InlineEncodeServer(pool, timeout=request.param, max_connections=2)
    server.start()
    yield server
    server.stop()


def connection_threads() -> int:
    """Live handler threads of the threading HTTP servers in this process."""
    return sum("process_request_thread" in thread.name for thread in threading.enumerate())


@pytest.mark.parametrize("guarded_server", [0.5], indirect=True)
def test_a_silent_connection_is_closed_after_the_timeout(guarded_server: InlineEncodeServer) -> None:
    with socket.create_connection(("127.0.0.1", guarded_server.port)) as silent:
        silent.settimeout(20)  # without the server's timeout, recv waits this long and raises
        assert silent.recv(1) == b""  # the server closed the connection


@pytest.mark.parametrize("guarded_server", [2.0], indirect=True)
def test_stalled_connections_hold_at_most_the_cap_and_a_request_still_gets_through(
    guarded_server: InlineEncodeServer,
) -> None:
    stalled = [socket.create_connection(("127.0.0.1", guarded_server.port)) for _ in range(3)]
    try:
        most, until = 0, time.monotonic() + 1.0  # within the timeout: none has been closed yet
        while time.monotonic() < until:
            most = max(most, connection_threads())
            time.sleep(0.01)
        assert most == 2  # the third connection waits for a thread instead of taking one
        response = post(guarded_server, {"encoder": "minilm", "inputs": [{"text": "sony tv"}]})
        assert response.status_code == 200, response.text
    finally:
        for connection in stalled:
            connection.close()


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ("not json", 400, "not valid JSON"),
        ({"encoder": "minilm", "inputs": [{"text": 3}]}, 400, "Each input"),
        ({"encoder": "minilm", "inputs": []}, 400, "at least one"),
        ({"encoder": "nope", "inputs": [{"text": "x"}]}, 404, "unknown encoder"),
        ({"encoder": "minilm", "key": "0" * 32, "inputs": [{"text": "x"}]}, 409, "other weights"),
        ({"encoder": "minilm", "inputs": [{"text": "x"}] * (MAX_INPUTS + 1)}, 413, "POST /records"),
    ],
)
def test_endpoint_refuses_what_it_cannot_answer(server: InlineEncodeServer, body, status: int, words: str) -> None:
    if isinstance(body, str):
        response = httpx.post(f"http://127.0.0.1:{server.port}/encode", content=body, timeout=30)
    else:
        response = post(server, body)
    assert response.status_code == status
    assert words in response.json()["detail"]


def test_endpoint_is_bounded(server: InlineEncodeServer) -> None:
    assert server.slots.acquire(timeout=1)  # the one slot is taken (as by a long encode)
    try:
        response = post(server, {"encoder": "minilm", "inputs": [{"text": "sony tv"}]})
    finally:
        server.slots.release()
    assert response.status_code == 503 and "busy" in response.json()["detail"]
    assert post(server, {"encoder": "minilm", "inputs": [{"text": "sony tv"}]}).status_code == 200
