"""One ``llmatch worker`` process: its options, the supervisor around the encoding process, and what the encoding
process starts (metrics port, inline server, the worker loop). ``llmatch/cli.py`` only parses the command line."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from encoding.registry import EncoderPool
from llmatch.db import make_engine, make_session_factory
from llmatch.settings import Settings


@dataclass(frozen=True)
class WorkerOptions:
    """The command line of ``llmatch worker``."""

    drain: bool = False  # exit once the queue is empty
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    serve_inline: int | None = None  # port of the inline encode server; None: none
    serve_inline_host: str = "127.0.0.1"
    serve_inline_concurrency: int = 4
    restart: bool = True  # a supervisor forks the encoding process again when it dies


def run_worker(settings: Settings, options: WorkerOptions) -> int:
    """Run the worker until SIGTERM (or, with ``drain``, an empty queue); supervised unless ``restart`` is off."""
    if not options.restart:
        return run_encoding_process(settings, options, None)
    from encoder_worker.supervisor import Supervisor, preloaded_pool

    pool = preloaded_pool(settings)
    return Supervisor(lambda: run_encoding_process(settings, options, pool)).run()


def run_encoding_process(settings: Settings, options: WorkerOptions, pool: EncoderPool | None) -> int:
    """The worker loop in this process, on ``pool`` (a new one when None), until SIGTERM or a drained queue."""
    from encoder_worker.metrics import serve_metrics
    from encoder_worker.worker import EncoderWorker
    from learning.runner import JobRunner

    if options.metrics_port:
        serve_metrics(options.metrics_port, options.metrics_host)
    engine = make_engine(settings.resolved_database_url)
    pool = pool or EncoderPool(settings)
    worker = EncoderWorker(make_session_factory(engine), pool, settings)
    if options.serve_inline is not None:
        _start_inline_server(settings, options, pool)
    trainer = None if options.drain else JobRunner(make_session_factory(engine), settings)
    trainer_thread = trainer.start() if trainer is not None else None
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    try:
        if options.drain:
            worker.drain()
        else:
            worker.run()
    except KeyboardInterrupt:
        worker.stop()
    finally:
        if trainer is not None and trainer_thread is not None:  # training jobs run beside the encoding loop
            trainer.stop()
            trainer_thread.join(timeout=60)
        engine.dispose()
    return 0


def _start_inline_server(settings: Settings, options: WorkerOptions, pool: EncoderPool) -> None:
    from encoder_worker.inline_server import InlineEncodeServer

    assert options.serve_inline is not None
    server = InlineEncodeServer(
        pool,
        options.serve_inline_host,
        options.serve_inline,
        options.serve_inline_concurrency,
        timeout=settings.inline_server_timeout_seconds,
        max_connections=settings.inline_server_max_connections,
    )
    server.start(preload=settings.default_encoder)
