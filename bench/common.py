"""What the benchmarks share: reading a table, a real server in a subprocess, HTTP helpers, statistics, reports."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASETS_DIR = REPO_ROOT.parent / "shared" / "datasets"
DEFAULT_TABLE = DATASETS_DIR / "dirty_walmart_amazon" / "tableB.csv"
OUT_DIR = REPO_ROOT / "bench" / "out"
DATASET = "bench"
ENCODER = "minilm"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and shows every option's default."""


@dataclass(frozen=True)
class Table:
    """Records of one CSV table in DeepMatcher layout: the first column is the id, empty cells are null."""

    path: Path
    columns: list[str]
    records: list[dict[str, Any]]


def read_table(path: Path, limit: int | None = None, *, exact: bool = True) -> Table:
    """The first ``limit`` records of ``path``; with ``exact``, fewer than ``limit`` is an error."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise SystemExit(f"{path} has no header row")
        id_column, *columns = reader.fieldnames
        records = []
        for row in reader:
            if limit is not None and len(records) >= limit:
                break
            attributes = {name: (row[name] if row[name] != "" else None) for name in columns}
            records.append({"id": row[id_column], "attributes": attributes})
    if exact and limit is not None and len(records) < limit:
        raise SystemExit(f"{path} holds {len(records)} records, fewer than the {limit} asked for")
    return Table(path, columns, records)


def rendered_texts(table: Table) -> list[str]:
    """Each record's text exactly as the service renders it (default tagged config, columns as seen order)."""
    from encoding.render import RenderConfig, render

    config = RenderConfig()
    return [render(record["attributes"], config, table.columns) for record in table.records]


def load_encoder_pool(encoder: str = ENCODER) -> Any:
    """An encoder of the service's configuration (default MiniLM) on CPU, loaded and warmed up in this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from encoding.encoder import EncoderInput
    from encoding.registry import EncoderPool
    from llmatch.settings import Settings

    pool = EncoderPool(Settings(device="cpu"))
    pool.encode(encoder, [EncoderInput(None, "warm up")])
    return pool


def encoder_inputs(texts: Sequence[str]) -> list[Any]:
    from encoding.encoder import EncoderInput

    return [EncoderInput(None, text) for text in texts]


def wait_until_ready(
    url: str, process: subprocess.Popen, timeout: float, log_tail: Callable[[], str], started: float | None = None
) -> float:
    """Seconds from ``started`` (default: now) until ``url/readyz`` answers 200; an exited process or the timeout
    raise RuntimeError with ``log_tail()``."""
    began = time.monotonic() if started is None else started
    while time.monotonic() - began < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"llmatch serve exited with {process.returncode}:\n{log_tail()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"llmatch serve not ready after {timeout:.0f} s:\n{log_tail()}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llmatch_command() -> str:
    """The ``llmatch`` console script of the running interpreter's environment."""
    beside = Path(sys.executable).parent / "llmatch"
    found = str(beside) if beside.exists() else shutil.which("llmatch")
    if not found:
        raise SystemExit("cannot find the `llmatch` command; install the project (pip install -e .)")
    return found


@contextmanager
def fresh_database(url: str | None) -> Iterator[str | None]:
    """A new, empty PostgreSQL database on the server ``url`` names, dropped afterwards; None stays None.

    The database name in ``url`` is used as a prefix, so that runs never collide or reuse data.
    """
    if url is None:
        yield None
        return
    import psycopg
    from psycopg import sql
    from sqlalchemy import make_url

    parsed = make_url(url)
    name = f"{(parsed.database or 'llmatch_bench')[:40]}_{uuid.uuid4().hex[:10]}"
    admin = parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def link_checkout_models(data_dir: Path) -> None:
    """Make ``data_dir/models`` the models folder of this process's settings (``.data/models`` by default, where
    ``make smollm2`` and ``make mpnet`` put them), when there is one."""
    from llmatch.settings import Settings

    models = Settings().models_dir.resolve()
    if models.is_dir():
        (data_dir / "models").symlink_to(models, target_is_directory=True)


class Server:
    """``llmatch migrate`` then ``llmatch serve`` on a free port with a fresh data directory; stopped on exit.
    The data directory links to this checkout's downloaded models (``.data/models``: SmolLM2, mpnet), so that
    the server finds the encoders the benchmark names."""

    def __init__(
        self,
        database_url: str | None = None,
        worker_batch_size: int | None = None,
        log_copy: Path | None = None,
        ready_timeout: float = 300.0,
        extra_env: dict[str, str] | None = None,
    ):
        self.database_url = database_url
        self.extra_env = extra_env or {}
        self.worker_batch_size = worker_batch_size
        self.log_copy = log_copy
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def data_dir(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def environment(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update(LLMATCH_DATA_DIR=str(self.data_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("LLMATCH_DATABASE_URL", None)
        if self.database_url:
            env["LLMATCH_DATABASE_URL"] = self.database_url
        if self.worker_batch_size:
            env["LLMATCH_WORKER_BATCH_SIZE"] = str(self.worker_batch_size)
        return env | self.extra_env

    def __enter__(self) -> Server:
        self._tmp = tempfile.TemporaryDirectory(prefix="llmatch-bench-")
        try:
            link_checkout_models(self.data_dir)
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        env = self.environment()
        command = llmatch_command()
        migrated = subprocess.run([command, "migrate"], env=env, capture_output=True, text=True)
        if migrated.returncode != 0:
            raise RuntimeError(f"llmatch migrate failed:\n{migrated.stdout}{migrated.stderr}")
        self._log = self.log_path.open("wb")
        serve = [command, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self._process = subprocess.Popen(serve, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._process is not None
        wait_until_ready(self.url, self._process, self.ready_timeout, self.log_tail)

    def log_tail(self, lines: int = 40) -> str:
        if self._tmp is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def client(self, connections: int = 10) -> httpx.Client:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.Client(base_url=self.url, timeout=600, limits=limits)

    def __exit__(self, *_exc: object) -> None:
        self._stop()
        if self._log is not None:
            self._log.close()
        if self._tmp is not None:
            if self.log_copy is not None and self.log_path.exists():
                self.log_copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.log_path, self.log_copy)
            self._tmp.cleanup()
            self._tmp = None

    def _stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            stop_process(self._process, 60)


def stop_process(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL when it has not exited within ``timeout`` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def check(response: httpx.Response, expected: int = 200) -> httpx.Response:
    if response.status_code != expected:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} answered {response.status_code} "
            f"(expected {expected}): {response.text[:300]}"
        )
    return response


def create_dataset(client: httpx.Client, name: str = DATASET, encoder: str = ENCODER) -> None:
    check(client.put(f"/datasets/{name}", json={"encoder": encoder}), 201)


def post_records(
    client: httpx.Client, source: str, records: Sequence[dict], batch: int, dataset: str = DATASET
) -> list[float]:
    """POST records in batches; returns each request's latency in seconds."""
    latencies = []
    with tqdm(total=len(records), desc=f"POST /records {source}", unit=" records") as bar:
        for start in range(0, len(records), batch):
            chunk = records[start : start + batch]
            body = {"dataset": dataset, "source": source, "records": chunk}
            began = time.perf_counter()
            response = client.post("/records", json=body)
            latencies.append(time.perf_counter() - began)
            check(response, 202)
            bar.update(len(chunk))
    return latencies


def wait_encoded(
    client: httpx.Client, expected: int, timeout: float, poll: float = 0.25, dataset: str = DATASET
) -> float:
    """Poll GET /datasets/{dataset} until ``expected`` records are encoded; returns the perf_counter time."""
    deadline = time.monotonic() + timeout
    with tqdm(total=expected, desc="encoded", unit=" records") as bar:
        while True:
            totals = check(client.get(f"/datasets/{dataset}")).json()["totals"]
            bar.update(totals["encoded"] - bar.n)
            if totals["failed"]:
                raise RuntimeError(f"{totals['failed']} records failed to encode: {totals}")
            if totals["encoded"] >= expected:
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise TimeoutError(f"not all {expected} records encoded after {timeout:.0f} s: {totals}")
            time.sleep(poll)


def is_searchable(client: httpx.Client, source: str, record: dict, dataset: str = DATASET) -> bool:
    """The record has neighbours (GET /candidates, k=1, its own source) and is found itself by its content."""
    params = {"dataset": dataset, "source": source, "id": record["id"], "k": 1, "target_source": source}
    if not check(client.get("/candidates", params=params)).json()["candidates"]:
        return False
    body = {"dataset": dataset, "record": {"attributes": record["attributes"]}, "k": 1, "target_source": source}
    hits = check(client.post("/candidates", json=body)).json()["candidates"]
    return bool(hits) and (hits[0]["id"] == record["id"] or hits[0]["score"] >= 0.9999)


def wait_searchable(
    client: httpx.Client, probes: Sequence[tuple[str, dict]], timeout: float, poll: float = 0.1
) -> float:
    """Poll until every probe record is searchable; returns the perf_counter time."""
    deadline = time.monotonic() + timeout
    pending = list(probes)
    while pending:
        pending = [(source, record) for source, record in pending if not is_searchable(client, source, record)]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} probe records not searchable after {timeout:.0f} s")
        if pending:
            time.sleep(poll)
    return time.perf_counter()


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Latency statistics in milliseconds."""
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "n": int(values.size),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "max_ms": float(values.max()),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores": cores,
        "python": platform.python_version(),
    }


def default_out(name: str) -> Path:
    return OUT_DIR / f"{name}.json"


def publish(path: Path, report: dict[str, Any], table: str) -> None:
    """Print the Markdown table and write the report (with the table) as JSON."""
    report["markdown"] = table
    print()
    print(table)
    write_report(path, report)


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the server every benchmark starts."""
    parser.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL URL (its database name is the prefix of a fresh one); None: SQLite",
    )
    parser.add_argument(
        "--worker-batch-size", type=int, default=None, help="LLMATCH_WORKER_BATCH_SIZE; None: the service default"
    )


def interval(values: np.ndarray) -> tuple[float, float]:
    """The mean and the half-width of its 95% t-interval (0 for one value)."""
    from scipy import stats

    if len(values) < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
