"""Keep one encoding process alive: the parent loads the encoder once and forks the child that runs the worker
loop; when the child dies (an out-of-memory kill, a segfault in a native library), the parent forks a new one at
once, so a crash costs a fork instead of a cold start (importing torch and loading the model: seconds).

The records a dead child held are dealt with by the queue, as after any crash: their lease ends, the attempts
they spent count, and a record that keeps killing its process ends ``failed`` alone. The parent only restarts;
it backs off when children die young or exit with an error, so that a fault that is no record's (a database
that refuses connections, a broken install) does not become a busy loop.

The parent must never run the model itself: the OpenMP thread pool a forward pass starts does not survive a
fork (the child hangs in its first forward pass), and a CUDA context cannot be shared with a child either, so on
a GPU the parent loads nothing and every child starts cold."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from encoding.registry import EncoderPool
    from llmatch.settings import Settings

log = logging.getLogger("llmatch.worker")

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class RestartPolicy:
    """How soon a dead child is replaced: at once after a crash (a signal) of a child that lived
    ``young_seconds`` or more; after ``first_delay`` when a child that lived ``settled_seconds`` exits with an
    error; otherwise (young deaths, early errors) after a delay doubling up to ``max_delay``."""

    young_seconds: float = 0.5
    settled_seconds: float = 60.0
    first_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, previous: float, lived: float, crashed: bool) -> float:
        """Seconds to wait before the next child, given the last wait and how the child ended."""
        if crashed and lived >= self.young_seconds:
            return 0.0
        if lived >= self.settled_seconds:
            return self.first_delay
        return min(self.max_delay, max(self.first_delay, previous * 2))


class Supervisor:
    """Fork ``run_child`` (which returns an exit code) again each time its process dies abnormally; stop on
    SIGTERM or SIGINT (passed on to the child) or when a child exits with 0."""

    def __init__(self, run_child: Callable[[], int], policy: RestartPolicy | None = None):
        self.run_child = run_child
        self.policy = policy or RestartPolicy()
        self.child: int | None = None
        self.stopping = False
        self.restarts = 0

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        delay = 0.0
        try:
            while True:
                started = time.monotonic()
                self.child = self._fork()
                status = self._wait(self.child)
                self.child = None
                code = os.waitstatus_to_exitcode(status)
                if self.stopping or code == 0:
                    return max(code, 0)
                lived = time.monotonic() - started
                crashed = code < 0
                delay = self.policy.delay(delay, lived, crashed)
                what = f"was killed by signal {-code}" if crashed else f"exited with code {code}"
                log.warning(
                    "encoding process %s after %.1f s; starting another%s",
                    what,
                    lived,
                    f" in {delay:.1f} s" if delay else "",
                )
                if delay and self._sleep(delay):
                    return 0
                self.restarts += 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _fork(self) -> int:
        parent = os.getpid()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _die_with_parent(parent)
            code = self.run_child()
        except KeyboardInterrupt:
            code = 0
        except BaseException:  # noqa: BLE001 - the child reports and exits; the parent decides what follows
            log.exception("encoding process failed")
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _wait(self, pid: int) -> int:
        try:
            _, status = os.waitpid(pid, 0)  # retried by Python when a signal handler interrupts it
            return status
        except ChildProcessError:  # already reaped: treat as a clean exit
            return 0

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        if self.child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGTERM)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; True when asked."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, deadline - time.monotonic()))
        return self.stopping


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this child when the parent dies (a SIGKILLed parent cannot pass a signal on)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        except (OSError, AttributeError):
            return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def preloaded_pool(settings: Settings) -> EncoderPool | None:
    """An encoder pool with the default encoder loaded, for children to inherit; None when the encoder would run
    on a GPU (or might: ``auto`` with a CUDA build of torch), where each child must load its own."""
    import torch

    if settings.device == "cuda" or (settings.device == "auto" and (torch.version.cuda or torch.version.hip)):
        return None
    from encoding.registry import EncoderPool, EncoderUnavailableError

    pool = EncoderPool(settings)
    try:
        pool.get(settings.default_encoder)
    except EncoderUnavailableError as error:  # each child retries, and reports the outage as the worker does
        log.warning("%s; encoding processes will load it themselves", error)
    # transformers' SDPA attention imports torch._dynamo in its first forward pass (about a second of CPU);
    # importing it here spares every restarted child that second. The parent itself never runs the model.
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:
        pass
    return pool
