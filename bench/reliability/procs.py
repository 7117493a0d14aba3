"""Real ``llmatch`` processes on 127.0.0.1 for the reliability harness: a fresh store, servers and workers
that can be SIGKILLed and restarted, each encoder call counted, and every process stopped on the way out."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import free_port, wait_until_ready

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/llmatch_reliability"
COUNTED = [sys.executable, "-m", "bench.reliability.counted"]  # `llmatch ...` with encoder calls counted


@dataclass
class Store:
    """A fresh, migrated database (a SQLite file, or a new PostgreSQL database dropped at the end) and a data
    directory for index files, encoder-call logs and process logs."""

    backend: str
    data_dir: Path
    database_url: str
    settings_env: dict[str, str] = field(default_factory=dict)
    _engine: Any = None

    @property
    def encode_log_dir(self) -> Path:
        return self.data_dir / "encoder-calls"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "indexes"

    def environment(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMATCH_")}
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            LLMATCH_DATA_DIR=str(self.data_dir),
            LLMATCH_DATABASE_URL=self.database_url,
            LLMATCH_DEVICE="cpu",
            LLMATCH_BENCH_ENCODE_LOG=str(self.encode_log_dir),
            PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        )
        env.update(self.settings_env)
        env.update(extra)
        return env

    def encoder_calls(self) -> list[str]:
        """Every input any process of this store sent through an encoder (one hash per input)."""
        lines: list[str] = []
        for path in sorted(self.encode_log_dir.glob("*.log")):
            lines += [line for line in path.read_text().splitlines() if line]
        return lines

    def engine(self) -> Any:
        """A SQLAlchemy engine on the store, for the harness's own checks (disposed with the store)."""
        if self._engine is None:
            from llmatch.db import make_engine

            self._engine = make_engine(self.database_url)
        return self._engine


@contextlib.contextmanager
def fresh_store(backend: str, pg_server: str | None = None, **settings: str) -> Iterator[Store]:
    """A new store on ``backend`` ("sqlite" or "pg", on ``pg_server``, default ``PG_SERVER``), migrated with
    ``llmatch migrate``; removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=f"llmatch-reliability-{backend}-"))
    dropped = None
    try:
        if backend == "sqlite":
            url = f"sqlite:///{tmp / 'llmatch.sqlite3'}"
        else:
            url, dropped = _create_pg(pg_server or PG_SERVER)
        store = Store(backend, tmp, url, {f"LLMATCH_{k.upper()}": str(v) for k, v in settings.items()})
        store.encode_log_dir.mkdir(parents=True)
        migrated = subprocess.run(
            [_llmatch(), "migrate"], env=store.environment(), capture_output=True, text=True, timeout=300
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"llmatch migrate failed:\n{migrated.stdout}{migrated.stderr}")
        try:
            yield store
        finally:
            if store._engine is not None:
                store._engine.dispose()
    finally:
        if dropped:
            _drop_pg(*dropped)
        shutil.rmtree(tmp, ignore_errors=True)


def _create_pg(server: str) -> tuple[str, tuple[str, str]]:
    import psycopg
    from psycopg import sql
    from sqlalchemy import make_url

    parsed = make_url(server)
    name = f"{(parsed.database or 'llmatch_reliability')[:40]}_{uuid.uuid4().hex[:10]}"
    admin = parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return parsed.set(database=name).render_as_string(hide_password=False), (admin, name)


def _drop_pg(admin: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _llmatch() -> str:
    beside = Path(sys.executable).parent / "llmatch"
    return str(beside) if beside.exists() else (shutil.which("llmatch") or "llmatch")


class Process:
    """One ``llmatch`` command in its own process group, its output appended to a log file."""

    def __init__(self, store: Store, args: list[str], name: str, env: dict[str, str] | None = None):
        self.store = store
        self.args = args
        self.name = name
        self.env = env or {}
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.starts = 0
        self.log_path = store.data_dir / "logs" / f"{name}.log"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [*COUNTED, *self.args],
                env=self.store.environment(**self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL, the way a crash or an OOM killer ends a process: no clean-up runs."""
        if self.alive():
            assert self.popen is not None
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after ``timeout``."""
        if not self.alive():
            return
        assert self.popen is not None
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def encoding_pid(self) -> int | None:
        """The process that encodes for this command: the command's own."""
        return self.pid

    def encoded_inputs(self) -> int:
        """Inputs the process that encodes (its current incarnation) has sent through an encoder so far."""
        pid = self.encoding_pid()
        path = self.store.encode_log_dir / f"{pid}.log"
        return sum(1 for _ in path.open()) if pid and path.exists() else 0

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Server(Process):
    """``llmatch serve`` on a free port (in-process worker unless ``worker=False``)."""

    def __init__(self, store: Store, name: str = "serve", worker: bool = True, env: dict[str, str] | None = None):
        self.port = free_port()
        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port)] + ([] if worker else ["--no-worker"])
        super().__init__(store, args, name, env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds from start until ``/readyz`` answers 200."""
        return wait_until_ready(self.url, self.popen, timeout, self.log_tail, self.started_at)

    def client(self, connections: int = 20, timeout: float = 120.0) -> httpx.Client:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.Client(base_url=self.url, timeout=timeout, limits=limits)


class Worker(Process):
    """A standalone ``llmatch worker``: a parent holding the loaded encoder, and the encoding process it forks
    (and forks again when that one dies)."""

    def __init__(self, store: Store, name: str, env: dict[str, str] | None = None):
        super().__init__(store, ["worker"], name, env)

    def encoding_pid(self) -> int | None:
        """The encoding process now running (the parent's child), if any (Linux: read from /proc)."""
        if not self.alive():
            return None
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def kill_encoder(self, timeout: float = 10.0) -> bool:
        """SIGKILL the encoding process, as an out-of-memory kill or a segfault ends it, and wait until its
        parent has reaped it. False when there was none to kill."""
        pid = self.encoding_pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.encoding_pid() == pid and time.monotonic() < deadline:
            time.sleep(0.01)
        return True


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[None]:
    """Start the processes; on the way out (errors and Ctrl-C included) stop every one still alive."""
    try:
        for process in processes:
            process.start()
        yield
    finally:
        for process in processes:
            with contextlib.suppress(Exception):
                process.stop(timeout=20)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so that a stopped harness stops its processes too."""

    def interrupt(*_args: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
