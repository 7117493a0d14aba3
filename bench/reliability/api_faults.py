"""API faults: ``llmatch serve`` (with its in-process worker) is SIGKILLed again and again while concurrent
clients ingest through ``POST /records``; a batch that got no 202 is sent again (identical content changes
nothing). At the end, every record acknowledged with 202 must be stored, with the content sent, and encoded."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import asdict, dataclass

import httpx
from sqlalchemy import text

from bench.reliability.data import Record, batches, create_dataset, wait_encoded
from bench.reliability.procs import Server, fresh_store, running

DATASET = "api_faults"


@dataclass
class ApiFaultsRun:
    backend: str
    kills: int
    clients: int
    records: int
    acknowledged: int
    requests_202: int
    requests_failed: int  # no answer (connection refused or cut by a kill), sent again
    answers_5xx: int
    stored: int
    missing: int  # acknowledged but not stored
    content_differs: int
    encoded: int
    not_encoded: int
    seconds_to_encoded: float
    restart_seconds_mean: float


class Ingestion:
    """Clients sending batches from a shared queue; a batch without a 202 goes back into the queue."""

    def __init__(self, server: Server, items: list[Record], batch: int, clients: int):
        self.server = server
        self.queue = [(source, chunk) for source, chunk in batches(items, batch)]
        self.clients = clients
        self.deadline = time.monotonic()  # batches are spread evenly until then (so that kills hit ingestion)
        self.lock = threading.Lock()
        self.acknowledged: dict[tuple[str, str], dict] = {}
        self.ok = self.failed = self.errors_5xx = 0
        self.stop = threading.Event()

    def take(self) -> tuple[str, list[Record]] | None:
        with self.lock:
            return self.queue.pop(0) if self.queue else None

    def client(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                item = self.take()
                if item is None:
                    return
                source, chunk = item
                body = {"dataset": DATASET, "source": source, "records": [r.body() for r in chunk]}
                try:
                    response = http.post(f"{self.server.url}/records", json=body)
                except httpx.HTTPError:
                    response = None
                with self.lock:
                    if response is not None and response.status_code == 202:
                        self.ok += 1
                        self.acknowledged.update({(source, r.id): r.attributes for r in chunk})
                    else:
                        self.failed += response is None
                        self.errors_5xx += response is not None and response.status_code >= 500
                        self.queue.append(item)
                self.stop.wait(self.pause() if response is not None else 0.2)

    def pause(self) -> float:
        with self.lock:
            left = len(self.queue)
        return max(0.0, self.deadline - time.monotonic()) * self.clients / max(left, 1)


def run(
    items: list[Record],
    *,
    kills: int,
    clients: int = 4,
    batch: int = 20,
    backend: str = "sqlite",
    uptime: tuple[float, float] = (1.0, 3.0),
    timeout: float = 1200.0,
    seed: int = 0,
) -> dict:
    """Kill the server ``kills`` times, each after ``uptime`` seconds of ingestion, restart it, then check.
    The clients spread the records over the expected time of the kills, so that every kill hits ingestion."""
    rng = random.Random(seed)
    with fresh_store(backend, worker_poll_seconds=0.2) as store:
        server = Server(store)
        with running(server):
            first_start = server.wait_ready()
            with server.client() as client:
                create_dataset(client, DATASET)
            ingestion = Ingestion(server, items, batch, clients)
            ingestion.deadline = time.monotonic() + kills * (sum(uptime) / 2 + first_start)
            threads = [threading.Thread(target=ingestion.client, daemon=True) for _ in range(clients)]
            for thread in threads:
                thread.start()
            restarts = []
            try:
                for _ in range(kills):
                    time.sleep(rng.uniform(*uptime))
                    server.kill()
                    server.start()
                    restarts.append(server.wait_ready())
                ingestion.deadline = time.monotonic()
                for thread in threads:
                    thread.join(timeout=timeout)
            finally:
                ingestion.stop.set()
            with server.client() as client:
                acked = ingestion.acknowledged
                try:
                    seconds = wait_encoded(client, DATASET, len(acked), timeout=timeout)
                except TimeoutError:
                    seconds = float("nan")
            stored = _stored(store)
        outcome = ApiFaultsRun(
            backend=backend,
            kills=kills,
            clients=clients,
            records=len(items),
            acknowledged=len(acked),
            requests_202=ingestion.ok,
            requests_failed=ingestion.failed,
            answers_5xx=ingestion.errors_5xx,
            stored=sum(1 for key in acked if key in stored),
            missing=sum(1 for key in acked if key not in stored),
            content_differs=sum(1 for key, attrs in acked.items() if key in stored and stored[key][0] != attrs),
            encoded=sum(1 for key in acked if key in stored and stored[key][1] == "encoded"),
            not_encoded=sum(1 for key in acked if key in stored and stored[key][1] != "encoded"),
            seconds_to_encoded=round(seconds, 1),
            restart_seconds_mean=round(sum(restarts) / len(restarts), 2) if restarts else 0.0,
        )
    return asdict(outcome)


def _stored(store) -> dict[tuple[str, str], tuple[dict, str]]:
    with store.engine().connect() as connection:
        rows = connection.execute(text("SELECT source, external_id, attributes, status FROM records")).all()
    return {(s, i): (a if isinstance(a, dict) else json.loads(a), status) for s, i, a, status in rows}
