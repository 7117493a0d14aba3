"""The worker's side of training jobs: take one job at a time, run it in a child process (so the worker's own
encoding, and in the embedded default the API's requests, keep their latency and a crash stays in the child),
hold its lease while the child lives, stop the child when the job is cancelled, and settle the job when the
child dies: run again while attempts are left, else failed with the reason."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading

from sqlalchemy.orm import Session, sessionmaker

from learning import jobs, train_job
from llmatch.db import transaction
from llmatch.models import CANCELLED, JOB_FAILED
from llmatch.settings import Settings

log = logging.getLogger("llmatch.learning")

GRACE_SECONDS = 10.0  # a child asked to stop (SIGTERM) is killed after this long


class JobRunner:
    """Runs training jobs one after another until ``stop_event`` is set."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings):
        self.session_factory = session_factory
        self.settings = settings
        self.stop_event = threading.Event()
        self.child: multiprocessing.process.BaseProcess | None = None  # the running job's process (tests kill it)

    def run(self) -> None:
        while not self.stop_event.wait(self.settings.training_poll_seconds):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the worker's job loop
                log.exception("training job runner failed; retrying")

    def start(self) -> threading.Thread:
        """Run jobs in a thread of this process (the standalone worker's); the caller joins it after ``stop``."""
        thread = threading.Thread(target=self.run, name="training-jobs", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stop_event.set()

    def run_once(self) -> str | None:
        """Claim and run one job to its end (or until this runner stops); returns its id, None when none ran."""
        settings = self.settings
        claimed = jobs.claim_job(self.session_factory, settings.training_lease_seconds, settings.training_max_attempts)
        if claimed is None:
            return None
        log.info("training job %s (attempt %d) starts", claimed.id, claimed.attempts)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks of this one
        child = context.Process(
            target=train_job.main,
            args=(settings, claimed.id, claimed.token, os.getpid()),
            name=f"llmatch-train-{claimed.id[:8]}",
            daemon=True,
        )
        child.start()
        self.child = child
        try:
            self._supervise(claimed, child)
        finally:
            self.child = None
        return claimed.id

    def _supervise(self, claimed: jobs.ClaimedJob, child: multiprocessing.process.BaseProcess) -> None:
        renew_every = self.settings.training_lease_seconds / 3
        while True:
            child.join(timeout=min(1.0, renew_every))
            if not child.is_alive():
                self._settle(claimed, child.exitcode)
                return
            if self.stop_event.is_set():  # the worker shuts down: the job waits for the next one, uncharged
                _stop(child)
                jobs.give_back(self.session_factory, claimed.id, claimed.token)
                return
            if jobs.cancel_requested(self.session_factory, claimed.id):
                _stop(child)
                with transaction(self.session_factory) as session:
                    jobs.finish(session, claimed.id, claimed.token, CANCELLED, error="cancelled")
                log.info("training job %s cancelled", claimed.id)
                return
            if not jobs.renew(self.session_factory, claimed.id, claimed.token, self.settings.training_lease_seconds):
                _stop(child)  # ended or taken meanwhile (e.g. this worker stalled past its lease)
                return

    def _settle(self, claimed: jobs.ClaimedJob, exitcode: int | None) -> None:
        """The child is gone. A job it left unfinished ran into a crash: run it again, or fail it with the reason."""
        if exitcode == 0:
            with transaction(self.session_factory) as session:  # a clean exit ends the job; this is a safety net
                jobs.finish(session, claimed.id, claimed.token, JOB_FAILED, error="the training process ended early")
            return
        reason = f"the training process died (exit code {exitcode})"
        if claimed.attempts < self.settings.training_max_attempts:
            if jobs.give_back(self.session_factory, claimed.id, claimed.token, charge=True):
                log.warning("training job %s: %s; it runs again", claimed.id, reason)
            return
        with transaction(self.session_factory) as session:
            if jobs.finish(session, claimed.id, claimed.token, JOB_FAILED, error=f"{reason}, {claimed.attempts} times"):
                log.warning("training job %s failed: %s", claimed.id, reason)


def _stop(child: multiprocessing.process.BaseProcess) -> None:
    child.terminate()
    child.join(GRACE_SECONDS)
    if child.is_alive():
        child.kill()
        child.join()
