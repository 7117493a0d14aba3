"""The `llmatch evaluate` command."""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
import warnings
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # starlette prefers httpx2; httpx is the pinned client
    from fastapi.testclient import TestClient

from encoding.manifest import is_trained_folder
from encoding.recipe import render_options
from encoding.registry import configured_specs
from evaluation import deepmatcher, report
from evaluation.runner import ConfigResult, EvalConfig, Evaluation, grid
from llmatch.db import make_engine
from llmatch.migrate import upgrade_to_head
from llmatch.settings import Settings
from service.app import create_app

log = logging.getLogger("llmatch.evaluate")


def run(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per in-process request is noise here
    try:
        benchmark = deepmatcher.load(args.dataset_dir)
    except deepmatcher.DatasetError as error:
        print(f"llmatch evaluate: {error}")
        return 2
    if args.paired_only:
        benchmark = deepmatcher.paired_only(benchmark)
    encoder = args.encoder or settings.default_encoder
    serialization, instruction = render_options(encoder, args.serialization, args.instruction)
    if is_trained_folder(encoder):  # a folder from `llmatch train`: named after its run and stage
        folder = Path(encoder).expanduser().resolve()
        encoder = folder.parent.name + "-" + folder.name
        settings = settings.model_copy(update={"encoders": {**settings.encoders, encoder: str(folder)}})
    configs = grid(encoder) if args.grid else [EvalConfig(encoder, serialization, instruction)]
    out = args.out or Path("eval-out") / benchmark.name
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmatch-eval-") as scratch:
        results = _evaluate(benchmark, configs, _settings(settings, Path(scratch), args.database_url))
    selected = max(results, key=lambda r: r.valid["f1"])  # valid only: test never chooses
    meta = {
        "benchmark_dir": str(args.dataset_dir),
        "records": {"a": len(benchmark.table_a), "b": len(benchmark.table_b)},
        "pairs": {"valid": len(benchmark.valid), "test": len(benchmark.test)},
        "seconds": round(time.perf_counter() - started, 1),
        "machine": platform.platform(),
        "identifier_weight": _identifier_weight(encoder, settings),
    }
    summary = report.report_dict(benchmark.name, selected, results, meta)
    written = report.write(out, summary, selected, {"valid": benchmark.valid, "test": benchmark.test})
    print(report.markdown(summary))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _identifier_weight(encoder: str, settings: Settings) -> float:
    """The share of the cosine the encoder gives to exact identifier tokens (0 for a dense-only encoder)."""
    spec = configured_specs(settings).get(encoder)
    return spec.identifier_weight if spec else 0.0


def _settings(settings: Settings, scratch: Path, database_url: str | None) -> Settings:
    """The user's encoders and models, with a database and index files of the evaluation's own."""
    url = database_url or f"sqlite:///{scratch / 'evaluation.sqlite3'}"
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    return settings.model_copy(update={"database_url": url, "index_directory": scratch / "indexes"})


def _evaluate(benchmark: deepmatcher.Benchmark, configs: list[EvalConfig], settings: Settings) -> list[ConfigResult]:
    with TestClient(create_app(settings, run_worker=False), base_url="http://localhost") as api:
        api.delete(f"/datasets/{benchmark.name}")  # a reused database starts from a clean dataset
        evaluation = Evaluation(api, benchmark)
        results = []
        for number, config in enumerate(configs, start=1):
            log.info("configuration %d/%d: %s", number, len(configs), config)
            results.append(evaluation.run(config))
        return results
