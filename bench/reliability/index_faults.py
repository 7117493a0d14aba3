"""Index faults: with every record encoded, the server is stopped, its index files are deleted, truncated or
overwritten with garbage (or the server is SIGKILLed, so nothing is saved at exit), and it is started again.
Each restart must rebuild what it cannot trust, answer ``GET /candidates`` exactly as before, and encode
nothing (counted from the encoder-call log, see ``counted.py``)."""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.reliability.data import Record, store_encoded
from bench.reliability.procs import Server, fresh_store, running

DATASET = "index_faults"
MODES = ("deleted", "truncated", "garbage", "sigkill")


@dataclass
class IndexFaultRun:
    mode: str
    files_touched: int
    ready_seconds: float
    queries: int
    same_answers: int
    different_answers: int
    errors: int
    encoder_calls: int


def corrupt(index_dir: Path, mode: str, rng: random.Random) -> int:
    """Damage every file under ``index_dir``; returns how many files were touched."""
    files = [p for p in index_dir.rglob("*") if p.is_file()]
    for path in files:
        size = path.stat().st_size
        if mode == "deleted":
            path.unlink()
        elif mode == "truncated":
            os.truncate(path, size // 2)
        elif mode == "garbage":
            path.write_bytes(rng.randbytes(max(size, 64)))
    return len(files)


def answers(server: Server, probes: list[Record], k: int) -> dict[tuple[str, str], list | str]:
    """GET /candidates of each probe: its (source, id, rounded score) list, or the error it got."""
    found: dict[tuple[str, str], list | str] = {}
    with server.client() as client:
        for record in probes:
            params = {"dataset": DATASET, "source": record.source, "id": record.id, "k": k}
            response = client.get("/candidates", params=params)
            if response.status_code != 200:
                found[(record.source, record.id)] = f"{response.status_code}: {response.text[:200]}"
                continue
            hits = response.json()["candidates"]
            found[(record.source, record.id)] = [(h["source"], h["id"], round(h["score"], 5)) for h in hits]
    return found


def run(
    items: list[Record],
    *,
    probes: int = 50,
    k: int = 10,
    backend: str = "sqlite",
    modes: tuple[str, ...] = MODES,
    seed: int = 0,
) -> list[dict]:
    rng = random.Random(seed)
    sample = rng.sample(items, min(probes, len(items)))
    runs: list[IndexFaultRun] = []
    with fresh_store(backend) as store:
        server = Server(store)
        with running(server):
            server.wait_ready()
            with server.client() as client:
                store_encoded(client, DATASET, items, timeout=1800)
            time.sleep(2)  # the follower applies the last changes (it polls every half second)
            before = answers(server, sample, k)
            check_before(before)
            for mode in modes:
                if mode == "sigkill":
                    server.kill()
                    touched = 0
                else:
                    server.stop()
                    touched = corrupt(store.index_dir, mode, rng)
                calls_before = len(store.encoder_calls())
                server.start()
                ready = server.wait_ready()
                after = answers(server, sample, k)
                errors = sum(1 for value in after.values() if isinstance(value, str))
                same = sum(1 for key, value in after.items() if value == before[key])
                runs.append(
                    IndexFaultRun(
                        mode=mode,
                        files_touched=touched,
                        ready_seconds=round(ready, 1),
                        queries=len(after),
                        same_answers=same,
                        different_answers=len(after) - same - errors,
                        errors=errors,
                        encoder_calls=len(store.encoder_calls()) - calls_before,
                    )
                )
    return [asdict(r) for r in runs]


def check_before(before: dict) -> None:
    bad = {key: value for key, value in before.items() if isinstance(value, str)}
    if bad:
        raise RuntimeError(f"GET /candidates failed before any fault: {list(bad.items())[:3]}")
