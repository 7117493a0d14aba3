"""Fault-injection and load harness: real ``llmatch serve`` and ``llmatch worker`` processes on 127.0.0.1, each
on a fresh store (a SQLite file, or a new PostgreSQL database dropped afterwards), killed, corrupted, loaded
and fuzzed; prints one Markdown table per scenario and writes them, with every figure, to ``--out``.

    python -m bench.reliability            # small sizes (a few minutes)
    python -m bench.reliability --full     # the sizes of docs/reliability.md
    python -m bench.reliability --only worker,index

Scenarios: worker (worker processes SIGKILLed while draining, against a fault-free drain), api (the server
SIGKILLed during concurrent ingestion), index (index files deleted, truncated, overwritten; a SIGKILL),
load (concurrent reads alone and beside ingestion and inline encodes, on SQLite and PostgreSQL), fuzz
(schemathesis from the published OpenAPI). PostgreSQL: ``--pg`` names the server (trust authentication)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from bench.common import OUT_DIR, HelpFormatter, machine, markdown_table
from bench.reliability import api_faults, fuzz, index_faults, load, procs, worker_faults
from bench.reliability.data import records
from bench.reliability.procs import PG_SERVER, terminate_on_sigterm

SCENARIOS = ("worker", "api", "index", "load", "fuzz")
SIZES = {
    "small": {
        "worker": {
            "records": 500,
            "workers": 2,
            "kills": 5,
            "policies": "clock",
            "kill_every": "0.5-2",
            "target": "encoder",
        },
        "api": {"records": 400, "kills": 3},
        "index": {"records": 300, "probes": 30},
        "load": {"records": 500, "seconds": 5.0},
        "fuzz": {"max_examples": 25},
    },
    "full": {
        # a kill every 0.5-2 s; `--set worker.kill_every=2-6` spreads the kills over the drain;
        # `--set worker.target=worker` kills whole worker commands (cold starts) instead of encoding processes
        "worker": {
            "records": 10_000,
            "workers": 2,
            "kills": 100,
            "policies": "clock,eager",
            "kill_every": "0.5-2",
            "target": "encoder",
        },
        "api": {"records": 3_000, "kills": 20},
        "index": {"records": 1_000, "probes": 100},
        "load": {"records": 1_000, "seconds": 60.0},
        "fuzz": {"max_examples": 50},  # with the coverage and stateful phases: over 2,000 cases per backend
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reliability", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="the sizes of docs/reliability.md")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios to run")
    parser.add_argument("--pg", default=PG_SERVER, help="PostgreSQL server (its database name is a prefix)")
    parser.add_argument("--lease", type=float, default=5.0, help="LLMATCH_WORKER_LEASE_SECONDS of the workers")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SCENARIO.KEY=VALUE",
        help="override one size, e.g. --set worker.records=2000 --set api.kills=10",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "reliability.json")
    args = parser.parse_args(argv)
    size = {name: dict(values) for name, values in SIZES["full" if args.full else "small"].items()}
    for override in args.set:
        target, _, value = override.partition("=")
        scenario, _, key = target.partition(".")
        if key not in size.get(scenario, {}):
            parser.error(f"--set {override}: no size {target!r}")
        size[scenario][key] = type(size[scenario][key])(value)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    procs.PG_SERVER = args.pg
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose among {', '.join(SCENARIOS)}")
    report: dict = {"size": "full" if args.full else "small", "sizes": size, "machine": machine(), "results": {}}
    report["machine"]["load_average_at_start"] = _load_average()
    tables: list[str] = []
    with terminate_on_sigterm():
        for name in chosen:
            started = time.monotonic()
            print(f"\n== {name}", flush=True)
            result = RUNNERS[name](size[name], args)
            report["results"][name] = {"seconds": round(time.monotonic() - started, 1), "result": result}
            table = TABLES[name](result)
            tables.append(f"### {name}\n\n{table}")
            print(table, flush=True)
    report["machine"]["load_average_at_end"] = _load_average()
    report["markdown"] = "\n\n".join(tables)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(passed(name, r["result"]) for name, r in report["results"].items()) else 1


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in __import__("os").getloadavg()]
    except OSError:
        return None if platform.system() == "Windows" else []


def run_worker(size: dict, args: argparse.Namespace) -> dict:
    return worker_faults.run(
        records(size["records"]),
        workers=size["workers"],
        kills=size["kills"],
        policies=tuple(size["policies"].split(",")),
        kill_every=seconds_range(size["kill_every"]),
        target=size["target"],
        lease_seconds=args.lease,
        seed=args.seed,
    )


def seconds_range(text: str) -> tuple[float, float]:
    """``"2-6"`` as (2.0, 6.0): the bounds of a uniformly drawn interval in seconds."""
    low, _, high = text.partition("-")
    bounds = (float(low), float(high or low))
    if not 0 < bounds[0] <= bounds[1]:
        raise ValueError(f"kill_every {text!r}: give LOW-HIGH seconds, 0 < LOW <= HIGH")
    return bounds


def run_api(size: dict, args: argparse.Namespace) -> dict:
    return api_faults.run(records(size["records"]), kills=size["kills"], seed=args.seed)


def run_index(size: dict, args: argparse.Namespace) -> list[dict]:
    return index_faults.run(records(size["records"]), probes=size["probes"], seed=args.seed)


def run_load(size: dict, args: argparse.Namespace) -> list[dict]:
    items = records(size["records"] * 2)
    stored, extra = items[: size["records"]], items[size["records"] :]
    rows = []
    for backend in ("sqlite", "pg"):
        rows += load.run(stored, extra, backend=backend, seconds=size["seconds"], seed=args.seed)
    return rows


def run_fuzz(size: dict, args: argparse.Namespace) -> list[dict]:
    return [
        fuzz.run(records(20), backend=backend, max_examples=size["max_examples"], seed=args.seed + 1)
        for backend in ("sqlite", "pg")
    ]


RUNNERS = {"worker": run_worker, "api": run_api, "index": run_index, "load": run_load, "fuzz": run_fuzz}


def worker_table(result: dict) -> str:
    keys = (
        "kills", "workers", "records", "lost", "failed", "pending", "encoded_twice", "extra_encodes",
        "max_attempts", "drain_seconds",
    )  # fmt: skip
    rows = [["fault-free", *(result["baseline"][k] for k in keys), "1.00"]]
    every = "" if result.get("kill_every") is None else ", every {}-{} s".format(*result["kill_every"])
    every = {"encoder": ", encoding process", "worker": ", whole worker"}.get(result.get("target"), "") + every
    rows += [
        [f"SIGKILLs ({run['policy']}{every})", *(run[k] for k in keys), run["drain_ratio"]] for run in result["faulted"]
    ]
    return markdown_table(["run", *keys, "drain ratio"], rows)


def api_table(result: dict) -> str:
    keys = (
        "kills", "clients", "acknowledged", "stored", "missing", "content_differs", "encoded", "not_encoded",
        "requests_failed", "answers_5xx", "restart_seconds_mean", "seconds_to_encoded",
    )  # fmt: skip
    return markdown_table(keys, [[result[k] for k in keys]])


def index_table(result: list[dict]) -> str:
    keys = ("mode", "files_touched", "ready_seconds", "queries", "same_answers", "different_answers", "errors",
            "encoder_calls")  # fmt: skip
    return markdown_table(keys, [[row[k] for k in keys] for row in result])


def load_table(result: list[dict]) -> str:
    keys = ("backend", "phase", "client", "clients", "requests", "errors", "refused_429", "qps", "p50_ms", "p99_ms")
    return markdown_table(keys, [[row[k] for k in keys] for row in result])


def fuzz_table(result: list[dict]) -> str:
    keys = ("backend", "operations", "cases", "server_errors", "errors")
    rows = [[*(r[k] for k in keys), ", ".join(f"{n}: {c}" for n, c in r["failures"].items()) or "none"] for r in result]
    return markdown_table([*keys, "failures"], rows)


TABLES = {"worker": worker_table, "api": api_table, "index": index_table, "load": load_table, "fuzz": fuzz_table}


def passed(name: str, result) -> bool:
    """The promises each scenario checks (figures such as the drain ratio are reported, not judged)."""
    if name == "worker":
        runs = [result["baseline"], *result["faulted"]]
        return all(run["lost"] == run["failed"] == run["pending"] == 0 for run in runs)
    if name == "api":
        return result["missing"] == result["content_differs"] == result["not_encoded"] == result["answers_5xx"] == 0
    if name == "index":
        return all(r["different_answers"] == r["errors"] == r["encoder_calls"] == 0 for r in result)
    if name == "load":
        return all(r["errors"] == 0 for r in result)
    if name == "fuzz":
        return all(r["returncode"] == 0 and not r["failures"] and not r["errors"] for r in result)
    return False


if __name__ == "__main__":
    sys.exit(main())
