"""Worker faults: ``llmatch worker`` processes encode a load while a driver SIGKILLs one at random; the same
load is first drained without faults, on a fresh database of its own, as the baseline.

What a kill hits (``target``):
- ``encoder``: the encoding process, as an out-of-memory kill or a segfault in native code ends it; the
  worker's parent process, which holds the loaded encoder, forks a new one.
- ``worker``: the whole command (parent and child, as when a machine or container goes), which the driver then
  starts again from cold: importing torch and loading the model.

When kills happen (``policy``):
- ``clock``: at moments drawn by a clock of its own (every ``kill_every`` seconds), independent of what the
  workers are doing; a moment that finds no busy worker (one that has encoded since its start) passes without
  a kill. This is how crashes arrive.
- ``eager``: as soon as the interval has passed *and* a worker is busy. When kills come faster than workers
  start, every kill lands just after the victim's first encoder call returns, before its vectors are stored:
  the worst moment, every time, and the drain time measures mostly start-ups.

Counted: records lost (ingested but absent), failed and still pending at the end; inputs encoded more than
once (from the encoder-call logs of every worker incarnation, see ``counted.py``), beyond those of the
fault-free run; time to drain, and its ratio to the fault-free drain."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass

from sqlalchemy import text

from bench.reliability.data import Record, create_dataset, ingest
from bench.reliability.procs import Server, Store, Worker, fresh_store, running

DATASET = "worker_faults"
POLICIES = ("clock", "eager")
TARGETS = ("encoder", "worker")


@dataclass
class DrainRun:
    kills_asked: int
    kills: int
    workers: int
    records: int
    drain_seconds: float
    stored: int
    encoded: int
    failed: int
    pending: int
    lost: int
    encoder_inputs: int
    distinct_inputs: int
    encoded_twice: int  # distinct inputs encoded more than once
    extra_encodes: int  # encoder inputs beyond one per distinct input
    max_attempts: int
    worker_starts: int  # processes that encoded: each start of a worker, each fork of an encoding process


def drain(
    items: list[Record],
    *,
    workers: int,
    kills: int,
    backend: str = "pg",
    lease_seconds: float = 6.0,
    kill_every: tuple[float, float] = (0.5, 2.0),
    batch_size: int = 64,
    timeout: float = 1800.0,
    seed: int = 0,
    policy: str = "clock",
    target: str = "encoder",
) -> DrainRun:
    """Ingest ``items`` into a fresh store, then drain them with ``workers`` workers while ``kills`` SIGKILLs
    hit a randomly chosen busy worker (one that has encoded since its start), timed by ``policy``."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: choose among {', '.join(POLICIES)}")
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: choose among {', '.join(TARGETS)}")
    rng = random.Random(seed)
    settings = {"worker_lease_seconds": lease_seconds, "worker_batch_size": batch_size, "worker_poll_seconds": 0.2}
    with fresh_store(backend, **settings) as store:
        server = Server(store, worker=False)
        with running(server):
            server.wait_ready()
            with server.client() as client:
                create_dataset(client, DATASET)
                ingest(client, DATASET, items)
            pool = [Worker(store, f"worker-{i}") for i in range(workers)]
            done_kills = 0
            started = time.monotonic()
            with running(*pool):
                next_kill = started + rng.uniform(*kill_every)
                while _remaining(store) > 0:
                    now = time.monotonic()
                    if now - started > timeout:
                        raise TimeoutError(f"the queue did not drain in {timeout:.0f} s ({_counts(store)})")
                    for worker in pool:  # a worker that exits by itself is a finding, and is restarted
                        if not worker.alive():
                            worker.start()
                    if done_kills < kills and now >= next_kill:
                        busy = [w for w in pool if w.alive() and w.encoded_inputs() > 0]
                        if busy:
                            done_kills += _kill(rng.choice(busy), target)
                        if busy or policy == "clock":
                            next_kill = now + rng.uniform(*kill_every)
                    time.sleep(0.1)
                drained = time.monotonic() - started
            starts = sum(w.starts for w in pool) + (done_kills if target == "encoder" else 0)
            return _outcome(store, len(items), kills, done_kills, workers, drained, starts)


def _kill(victim: Worker, target: str) -> int:
    """SIGKILL the victim's encoding process, or the whole worker (started again at once); 1 when killed."""
    if target == "encoder":
        return int(victim.kill_encoder())
    victim.kill()
    victim.start()
    return 1


def _remaining(store: Store) -> int:
    """Records neither encoded nor failed."""
    counts = _counts(store)
    return sum(n for status, n in counts.items() if status not in ("encoded", "failed"))


def _counts(store: Store) -> dict[str, int]:
    with store.engine().connect() as connection:
        rows = connection.execute(text("SELECT status, count(*) FROM records GROUP BY status")).all()
    return {status: int(count) for status, count in rows}


def _outcome(store: Store, records: int, asked: int, kills: int, workers: int, drained: float, starts: int) -> DrainRun:
    counts = _counts(store)
    with store.engine().connect() as connection:
        max_attempts = connection.execute(text("SELECT coalesce(max(attempts), 0) FROM records")).scalar_one()
    calls = Counter(store.encoder_calls())
    stored = sum(counts.values())
    return DrainRun(
        kills_asked=asked,
        kills=kills,
        workers=workers,
        records=records,
        drain_seconds=round(drained, 1),
        stored=stored,
        encoded=counts.get("encoded", 0),
        failed=counts.get("failed", 0),
        pending=stored - counts.get("encoded", 0) - counts.get("failed", 0),
        lost=records - stored,
        encoder_inputs=sum(calls.values()),
        distinct_inputs=len(calls),
        encoded_twice=sum(1 for n in calls.values() if n > 1),
        extra_encodes=sum(calls.values()) - len(calls),
        max_attempts=int(max_attempts),
        worker_starts=starts,
    )


def run(items: list[Record], *, workers: int, kills: int, policies: tuple[str, ...] = ("clock",), **options) -> dict:
    """The fault-free baseline, then the same load under ``kills`` SIGKILLs timed by each policy in turn."""
    baseline = drain(items, workers=workers, kills=0, **options)
    faulted = []
    for policy in policies:
        run = drain(items, workers=workers, kills=kills, policy=policy, **options)
        faulted.append(
            {
                "policy": policy,
                **asdict(run),
                "drain_ratio": round(run.drain_seconds / baseline.drain_seconds, 2),
                "extra_encodes_from_faults": run.extra_encodes - baseline.extra_encodes,
            }
        )
    return {
        "baseline": asdict(baseline),
        "faulted": faulted,
        "kill_every": options.get("kill_every"),
        "target": options.get("target", "encoder"),
    }
