"""Readiness: the database (checked in a thread, with a timeout), the indexes, and the background threads that
keep them current (the index follower and, on the embedded default, the in-process encoder worker)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from service.state import ServiceState

FOLLOWER_THREAD = "index-sync"
WORKER_THREAD = "encoder-worker"


class DatabaseProbe:
    """``SELECT 1`` in a thread of its own, one check at a time: a slow or hung database makes /readyz answer
    "not ready" after the timeout instead of holding the event loop or piling up threads."""

    def __init__(self, state: ServiceState):
        self.state = state
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readyz-database")
        self._lock = threading.Lock()
        self._running: Future[bool] | None = None

    async def ok(self, timeout: float) -> bool:
        with self._lock:
            if self._running is None or self._running.done():
                self._running = self._executor.submit(self.state.database_ok)
            running = self._running
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(running)), timeout)
        except TimeoutError:
            return False


def _thread_alive(state: ServiceState, name: str) -> bool:
    return any(thread.name == name and thread.is_alive() for thread in state.threads)


async def readiness(state: ServiceState, probe: DatabaseProbe) -> tuple[bool, dict[str, Any]]:
    """(ready, body): the body names every check, the follower's lag and, when not ready, what is wrong."""
    settings = state.settings
    checks = {"database": await probe.ok(settings.ready_timeout_seconds), "indexes": state.registry.loaded}
    last = state.synchronizer.last_success
    lag = None if last is None else round(time.monotonic() - last, 3)
    follower = {"alive": _thread_alive(state, FOLLOWER_THREAD), "lag_seconds": lag}
    problems = [f"{name} unavailable" for name, ok in checks.items() if not ok]
    if not follower["alive"]:
        problems.append("the index follower thread is not running (restart the process)")
    elif lag is not None and lag > settings.index_max_lag_seconds:
        problems.append(f"the index follower has not applied the change log for {lag:.0f} s (see the server log)")
    body: dict[str, Any] = {
        "checks": checks,
        "index_follower": follower,
        "encoder_worker": None,
        "process": os.getpid(),
    }
    if state.worker is not None:
        body["encoder_worker"] = {"alive": _thread_alive(state, WORKER_THREAD)}
        if not body["encoder_worker"]["alive"]:
            problems.append("the in-process encoder worker thread is not running (restart the process)")
    ready = not problems
    body = {"status": "ready" if ready else "not ready", **body}
    if problems:
        body["detail"] = "Not ready: " + "; ".join(problems) + "."
    return ready, body
