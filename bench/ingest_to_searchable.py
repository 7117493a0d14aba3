"""Ingest to searchable: how long from the first POST /records until every record can be searched.

Baseline, measured in the same run before the server starts: the encoder's raw records/s in this process
(``EncoderPool.encode``, the worker's own path) on exactly the texts the service embeds, in chunks of
the POST batches. ``--encoder smollm2`` measures the LLM2Vec path (after ``make smollm2``).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

try:
    from bench import common
except ModuleNotFoundError:
    import common  # type: ignore[no-redef]

NAME = "ingest_to_searchable"
SOURCE = "b"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--records", type=int, default=20_000, help="records to ingest")
    parser.add_argument("--encoder", default=common.ENCODER, help="encoder of the dataset (minilm, smollm2, ...)")
    parser.add_argument("--table", type=Path, default=common.DEFAULT_TABLE, help="CSV table, first column the id")
    parser.add_argument("--batch", type=int, default=1000, help="records per POST /records")
    common.add_server_arguments(parser)
    parser.add_argument(
        "--worker-commit-size", type=int, default=None, help="records per encoder call of the worker (server default)"
    )
    parser.add_argument("--probes", type=int, default=5, help="records checked for searchability")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds to wait for searchability")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between status polls")
    parser.add_argument("--no-warm-encoder", action="store_true", help="let the first batch load the model")
    parser.add_argument("--seed", type=int, default=0, help="random choices of records")
    parser.add_argument("--out", type=Path, default=common.default_out(NAME), help="JSON report")
    args = parser.parse_args(argv)
    if args.records < 2:
        parser.error("--records must be at least 2")
    return args


def raw_encoder(texts: list[str], chunk: int, encoder: str) -> dict[str, Any]:
    """The encoder alone, in this process, on the same texts (chunked like the POST batches)."""
    pool = common.load_encoder_pool(encoder)
    inputs = common.encoder_inputs(texts)
    started = time.perf_counter()
    for start in tqdm(range(0, len(inputs), chunk), desc="raw encoder", unit=" chunks"):
        pool.encode(encoder, inputs[start : start + chunk])
    seconds = time.perf_counter() - started
    del pool
    gc.collect()
    return {"seconds": seconds, "records_per_s": len(texts) / seconds, "chunk": chunk}


def warm_server_encoder(client: Any) -> bool:
    """Load the encoder in the server (an inline query on the empty dataset) so the timing excludes it."""
    body = {"dataset": common.DATASET, "record": {"attributes": {"title": "warm up"}}, "k": 1}
    return client.post("/candidates", json=body).status_code == 200


def probe_records(records: list[dict], count: int, seed: int) -> list[tuple[str, dict]]:
    """The last record posted plus random others."""
    rng = random.Random(seed)
    others = rng.sample(records[:-1], min(count - 1, len(records) - 1)) if count > 1 else []
    return [(SOURCE, record) for record in [records[-1], *others]]


def measure_ingest(server: common.Server, table: common.Table, args: argparse.Namespace) -> dict[str, Any]:
    records = table.records
    with server.client() as client:
        common.create_dataset(client, encoder=args.encoder)
        warmed = False if args.no_warm_encoder else warm_server_encoder(client)
        started = time.perf_counter()
        latencies = common.post_records(client, SOURCE, records, args.batch)
        posted = time.perf_counter()
        encoded = common.wait_encoded(client, len(records), args.timeout, args.poll)
        remaining = max(1.0, args.timeout - (encoded - started))
        searchable = common.wait_searchable(client, probe_records(records, args.probes, args.seed), remaining)
    return {
        "server_encoder_warmed": warmed,
        "post_latencies_s": latencies,
        "post_phase_s": posted - started,
        "encoded_after_s": encoded - started,
        "searchable_after_s": searchable - started,
    }


def build_report(args: argparse.Namespace, texts: list[str], raw: dict, run: dict) -> dict[str, Any]:
    n = len(texts)
    post = common.summarize(run["post_latencies_s"])
    post_rps = n / sum(run["post_latencies_s"])
    end_to_end_rps = n / run["searchable_after_s"]
    return {
        "benchmark": NAME,
        "machine": common.machine(),
        "config": {
            "records": n,
            "unique_texts": len(set(texts)),
            "table": str(args.table),
            "batch": args.batch,
            "backend": "postgresql" if args.database_url else "sqlite",
            "worker_batch_size": args.worker_batch_size or "default",
            "worker_commit_size": args.worker_commit_size or "default",
            "encoder": args.encoder,
            "server_encoder_warmed": run["server_encoder_warmed"],
            "probes": args.probes,
        },
        "baseline": {"raw_encoder": raw},
        "results": {
            "post_records": {**post, "requests": len(run["post_latencies_s"]), "records_per_s": post_rps},
            "post_latencies_ms": [round(s * 1000, 3) for s in run["post_latencies_s"]],
            "post_phase_s": run["post_phase_s"],
            "encoded_after_s": run["encoded_after_s"],
            "searchable_after_s": run["searchable_after_s"],
            "end_to_end_records_per_s": end_to_end_rps,
        },
        "ratios": {
            "end_to_end_vs_raw_encoder": end_to_end_rps / raw["records_per_s"],
            "post_records_vs_raw_encoder": post_rps / raw["records_per_s"],
        },
    }


def markdown(report: dict[str, Any]) -> str:
    config, results, ratios = report["config"], report["results"], report["ratios"]
    raw, post = report["baseline"]["raw_encoder"], results["post_records"]
    rows = [
        ("raw encoder, in-process (baseline)", f"{raw['records_per_s']:,.1f} records/s", f"{raw['seconds']:.1f} s"),
        ("POST /records alone", f"{post['records_per_s']:,.1f} records/s", f"{post['requests']} requests"),
        ("POST /records latency p50 / p99", f"{post['p50_ms']:,.1f} / {post['p99_ms']:,.1f} ms", ""),
        ("POST phase (wall)", f"{results['post_phase_s']:.2f} s", ""),
        ("all encoded after", f"{results['encoded_after_s']:.2f} s", "GET /datasets totals.encoded"),
        ("all searchable after", f"{results['searchable_after_s']:.2f} s", f"{config['probes']} probes"),
        ("end to end", f"{results['end_to_end_records_per_s']:,.1f} records/s", "first POST to searchable"),
        ("end to end / raw encoder", f"{ratios['end_to_end_vs_raw_encoder']:.2f}x", ""),
        ("POST /records / raw encoder", f"{ratios['post_records_vs_raw_encoder']:.2f}x", ""),
    ]
    title = (
        f"## Ingest to searchable, {config['encoder']}: {config['records']:,} records "
        f"({config['unique_texts']:,} distinct texts), "
        f"{config['backend']}, batch {config['batch']}, worker batch {config['worker_batch_size']}, "
        f"worker commit {config['worker_commit_size']}, "
        f"{report['machine']['cpu_cores']} CPU cores"
    )
    return title + "\n\n" + common.markdown_table(("measure", "value", "note"), rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table = common.read_table(args.table, args.records)
    texts = common.rendered_texts(table)
    raw = raw_encoder(texts, args.batch, args.encoder)
    log_copy = args.out.with_suffix(".server.log")
    with common.fresh_database(args.database_url) as database_url:
        commit = {"LLMATCH_WORKER_COMMIT_SIZE": str(args.worker_commit_size)} if args.worker_commit_size else {}
        with common.Server(database_url, args.worker_batch_size, log_copy=log_copy, extra_env=commit) as server:
            run = measure_ingest(server, table, args)
    report = build_report(args, texts, raw, run)
    common.publish(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
