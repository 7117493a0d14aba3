"""Fuzzing from the published OpenAPI: schemathesis (every check, positive and negative data, stateful links)
against a real server holding a small encoded dataset, so that generated requests reach stored records too."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import REPO_ROOT, llmatch_command
from bench.reliability.data import Record, store_encoded
from bench.reliability.procs import Server, Store, fresh_store, running

DATASET = "shop"


def schemathesis_command() -> str:
    beside = Path(sys.executable).parent / "schemathesis"
    found = str(beside) if beside.exists() else shutil.which("schemathesis")
    if not found:
        raise SystemExit("schemathesis is not installed: pip install -e '.[dev]'")
    return found


def fuzz(url: str, *, key: str | None, max_examples: int, seed: int, timeout: float, workers: int = 2) -> dict:
    """Run schemathesis against ``url`` (with ``key`` as bearer token); the summary's figures and its output."""
    command = [
        schemathesis_command(),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--workers",
        str(workers),
        "--no-color",
        "--generation-database",
        "none",
        "--request-timeout",
        "60",
    ]
    if key:
        command += ["--header", f"Authorization: Bearer {key}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "bench.reliability.schemathesis_hooks"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    return {"returncode": done.returncode, **summary(done.stdout), "output": done.stdout + done.stderr}


def summary(output: str) -> dict:
    """Figures from schemathesis's summary: operations, test cases, failures (by check) and errors."""
    operations = re.search(r"Operations:\s+(\d+) selected / (\d+) total", output)
    cases = re.search(r"(\d+) generated", output)
    failures = {name.strip(): int(count) for name, count in re.findall(r"❌\s+(ST\d+ [^:\n]+):\s+(\d+)", output)}
    errors = re.search(r"🚫 [^:\n]+:\s+(\d+)", output)
    return {
        "operations": int(operations.group(1)) if operations else 0,
        "operations_total": int(operations.group(2)) if operations else 0,
        "cases": int(cases.group(1)) if cases else 0,
        "failures": failures,
        "server_errors": sum(count for name, count in failures.items() if "Server error" in name),
        "errors": int(errors.group(1)) if errors else 0,
    }


def admin_key(store: Store) -> str:
    """``llmatch keys create`` an admin key (auth is on once a key exists); the key is its last line."""
    made = subprocess.run(
        [llmatch_command(), "keys", "create", "--name", "fuzz", "--scope", "admin"],
        env=store.environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if made.returncode != 0:
        raise RuntimeError(f"llmatch keys create failed:\n{made.stdout}{made.stderr}")
    return made.stdout.strip().splitlines()[-1]


def run(items: list[Record], *, backend: str, max_examples: int, seed: int = 1, timeout: float = 1800.0) -> dict:
    """Fuzz a server with auth on (an admin key) holding a small encoded dataset."""
    with fresh_store(backend) as store:
        key = admin_key(store)
        server = Server(store)
        with running(server):
            server.wait_ready()
            with server.client() as client:
                client.headers["Authorization"] = f"Bearer {key}"
                store_encoded(client, DATASET, items, timeout=600)
            result = fuzz(server.url, key=key, max_examples=max_examples, seed=seed, timeout=timeout)
            result["server_log_tracebacks"] = server.log_path.read_text(errors="replace").count("Traceback")
    result["backend"] = backend
    return result
