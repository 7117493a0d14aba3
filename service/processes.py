"""``llmatch serve --workers N``: N API processes on one port that share one copy of the index memory.

The parent process loads every index once (from its files, or rebuilt from the stored vectors), binds the
listening socket, then forks the N API processes. Each inherits the loaded indexes copy-on-write: the pages no
process changes (nearly all of a large index; a change copies only the pages it writes) stay one copy in memory
instead of N. Each child opens its own database connections, follows the change log from where the parent loaded
(or reloads, when the log was pruned past that point) and accepts connections on the shared socket, so requests
run on as many cores as there are processes instead of one interpreter's lock. Child 0 also runs the embedded
encoder worker and training jobs (unless ``--no-worker``) and writes the index files. The parent only supervises:
it forks a child again when one exits, and stops them all on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llmatch.settings import Settings
from matching.index_sync import IndexSynchronizer

log = logging.getLogger("llmatch.api")

# A child that exits with an error sooner than this after its start (not killed by a signal) failed to start;
# after this many such exits in a row the parent gives up instead of forking it again and again.
QUICK_EXIT_SECONDS = 10.0
QUICK_EXITS_ALLOWED = 3


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    workers: int
    run_worker: bool  # the embedded encoder worker (and training jobs), in child 0


def listening_socket(host: str, port: int) -> socket.socket:
    """The socket every child accepts on (bound once, before the fork)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


def preload_indexes(settings: Settings) -> IndexSynchronizer:
    """Every index loaded once in this process, in a thread of its own: the forking thread then never ran FAISS's
    OpenMP threads, whose pool a forked child could not use. Nothing here touches CUDA either (a forked child
    cannot use a CUDA that its parent initialised): the encoder pool only names configurations (``cpu``), and the
    indexes stay on the CPU. The database connections are closed afterwards."""
    from encoding.registry import EncoderPool
    from llmatch.db import make_session_factory
    from service.state import connect, load_indexes

    def load() -> IndexSynchronizer:
        engine = connect(settings)
        try:
            names_only = EncoderPool(settings.model_copy(update={"device": "cpu"}))
            return load_indexes(settings, make_session_factory(engine), names_only)
        finally:
            engine.dispose()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-preload") as executor:
        return executor.submit(load).result()


@dataclass
class Supervisor:
    """Forks the API processes, forks again the ones that exit, stops them all on a signal."""

    settings: Settings
    options: ServeOptions
    sock: socket.socket
    loaded: IndexSynchronizer
    children: dict[int, int] = field(default_factory=dict)  # pid -> slot
    started: dict[int, float] = field(default_factory=dict)  # slot -> time.monotonic() of its last fork
    stopping: bool = False
    quick_exits: int = 0

    def run(self) -> int:
        """Serve until a signal stops the children; 1 when a child keeps failing at start."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for slot in range(self.options.workers):
            self._fork(slot)
        code = 0
        while self.children:
            pid, status = os.wait()
            slot = self.children.pop(pid, None)
            if slot is None or self.stopping:
                continue
            code = self._replace(slot, pid, status)
        return code

    def _replace(self, slot: int, pid: int, status: int) -> int:
        """Fork again the child of ``slot`` that exited; stop everything when it keeps failing at start."""
        lived = time.monotonic() - self.started[slot]
        log.error("API process %d (slot %d) exited (%s) after %.1f s", pid, slot, _describe(status), lived)
        failed_start = os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0 and lived < QUICK_EXIT_SECONDS
        self.quick_exits = self.quick_exits + 1 if failed_start else 0
        if self.quick_exits >= QUICK_EXITS_ALLOWED:
            log.error("API processes keep exiting at start; stopping (see the messages above)")
            self._stop(signal.SIGTERM, None)
            return 1
        time.sleep(1.0)
        if not self.stopping:
            self._fork(slot)
        return 0

    def _fork(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(_serve_child(slot, self.settings, self.options, self.sock, self.loaded))
        self.children[pid] = slot
        self.started[slot] = time.monotonic()
        log.info("API process %d started (slot %d of %d)", pid, slot, self.options.workers)

    def _stop(self, signum: int, _frame) -> None:
        """First signal: ask every child to finish its requests and stop; a second one: kill them."""
        kill = signal.SIGKILL if self.stopping else signal.SIGTERM
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, kill)
            except ProcessLookupError:
                pass


def _serve_child(slot: int, settings: Settings, options: ServeOptions, sock: socket.socket, loaded) -> int:
    """One API process over the inherited indexes; returns its exit code."""
    try:
        import uvicorn

        from service.app import create_app

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # uvicorn installs its own handlers when it starts
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        primary = slot == 0
        app = create_app(settings, run_worker=options.run_worker and primary, loaded=loaded, save_indexes=primary)
        server = uvicorn.Server(uvicorn.Config(app, log_level=settings.log_level.lower()))
        server.run(sockets=[sock])
        return 0 if server.started else 3
    except SystemExit as stop:  # uvicorn exits this way when the app fails to start
        return stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - a child never returns into the parent's code
        log.exception("API process (slot %d) failed", slot)
        return 1


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def serve_processes(settings: Settings, options: ServeOptions) -> int:
    """Bind, load every index once, fork ``options.workers`` API processes and supervise them."""
    settings = settings.model_copy(update={"faiss_gpu": "off"})  # shared memory is CPU memory
    sock = listening_socket(options.host, options.port)
    started = time.perf_counter()
    loaded = preload_indexes(settings)
    log.info(
        "indexes loaded once for %d API processes in %.2fs; serving on %s:%d",
        options.workers,
        time.perf_counter() - started,
        options.host,
        options.port,
    )
    return Supervisor(settings, options, sock, loaded).run()
