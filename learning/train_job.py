"""A training job, run in a process of its own that an encoder worker starts (``learning/runner.py``): folds,
training (the ``llmatch train`` recipe: supervised, then the identifier weight), the held-out judgement, encoding
every record with the new version, and the switch. Every write is made under the job's claim token; when the job is
no longer this process's (cancelled, or its worker died and another took it) or its worker is gone, it stops."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from encoding.registry import load_encoder, resolve_device, spec_from_options
from encoding.versions import SERVING_STAGE, remove_version, version_name, version_root
from learning import jobs
from learning.dataset_data import DatasetConfig, record_key, training_data
from learning.errors import LearningError
from learning.judge import judge, served_vectors
from learning.labels import StoredLabel, assign_folds, check_enough, not_trained_on, usable_labels
from learning.reencode import encode_records
from learning.switch import ConfigurationChanged, switch_version
from llmatch.db import make_engine, make_session_factory, transaction
from llmatch.models import DONE, ENCODING, JOB_FAILED, Dataset, EncoderVersion, TrainingJob
from llmatch.settings import Settings
from training.data import TrainingData

if TYPE_CHECKING:
    from training.stages import BaseEncoder

log = logging.getLogger("llmatch.learning")

# Share of the job's progress each phase ends at.
TRAINED, JUDGED, ENCODED = 0.7, 0.8, 0.98
STAGES = ("supervised", SERVING_STAGE)
# From this many held-out matches on, the held-out fold chooses the identifier weight after training (as the lab's
# `llmatch train` does on valid.csv); below it, every label scored by the base encoder does. A fold of tens of pairs
# chose the weight by chance, while from about 1,000 labels the trained dense part wants a smaller weight than the
# base encoder's scores pick (docs/learning.md, "The identifier weight").
FOLD_CHOOSES_WEIGHT_FROM_MATCHES = 30
SELECTION = (
    "hold-out fold: 30% of each class of labels, fixed per label the first time a job reads it and never trained on "
    "by any version; the checkpoint, threshold, probabilities and adoption are chosen on it. The identifier weight "
    f"is chosen on it too, after training, once it holds {FOLD_CHOOSES_WEIGHT_FROM_MATCHES} matches; with fewer, "
    "before training, on every label scored by the base encoder, which trained on none of them"
)
# The checkpoint and the identifier weight are chosen on average precision: with tens of pairs, best-threshold F1
# ties across most candidates and its ties go to the smallest weight.
SELECTION_METRIC = "average_precision"


class Stopped(Exception):
    """The job is no longer this process's to run."""


class JobHandle:
    """This process's hold on the job: progress reports (at most a few a second) that fail once it is lost."""

    def __init__(self, session_factory: sessionmaker[Session], job_id: str, token: str, parent_pid: int):
        self.session_factory, self.job_id, self.token, self.parent_pid = session_factory, job_id, token, parent_pid
        self._last = 0.0

    def report(self, force: bool = False, **values) -> None:
        if os.getppid() != self.parent_pid:
            raise Stopped("the worker that started this job is gone")
        if not force and time.monotonic() - self._last < 0.5:
            return
        self._last = time.monotonic()
        if not jobs.report(self.session_factory, self.job_id, self.token, **values):
            raise Stopped("the job was cancelled or taken by another worker")

    def progress(self, start: float, end: float):
        """A callback (done, total) -> None reporting progress between ``start`` and ``end``."""
        return lambda done, total: self.report(progress=round(start + (end - start) * done / max(total, 1), 4))


def main(settings: Settings, job_id: str, token: str, parent_pid: int) -> None:
    """The child process's entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    handle = JobHandle(factory, job_id, token, parent_pid)
    try:
        run(factory, settings, handle)
    except Stopped as why:
        log.info("training job %s stopped: %s", job_id, why)
    except (LearningError, ConfigurationChanged) as error:
        _fail(factory, handle, str(error))
    except Exception as error:  # noqa: BLE001 - the job fails with its reason; the worker goes on
        log.exception("training job %s failed", job_id)
        _fail(factory, handle, f"{type(error).__name__}: {error}")
    finally:
        engine.dispose()


def run(factory: sessionmaker[Session], settings: Settings, handle: JobHandle) -> None:
    started = time.monotonic()
    with transaction(factory) as session:
        job = session.get(TrainingJob, handle.job_id)
        dataset = session.get(Dataset, job.dataset_id)
        _forget_earlier_attempts(session, settings, handle.job_id)
        stored = usable_labels(session, dataset.id)
        labels = assign_folds(session, stored, settings.training_seed)
        check_enough(dataset.name, labels)
        data = training_data(session, dataset, labels, settings.max_text_chars)
        config, serving = DatasetConfig.of(dataset), dataset.serving_encoder
        number = 1 + (session.scalar(select(func.count()).where(EncoderVersion.dataset_id == dataset.id)) or 0)
        name = version_name(dataset.name, number, handle.job_id)
        dataset_id, dataset_name = dataset.id, dataset.name
    handle.report(force=True, labels=len(labels), version=name, progress=0.02)
    folder = version_root(settings.models_dir, name)
    shutil.rmtree(folder, ignore_errors=True)  # a run before this one of the same job left it half-written
    device = resolve_device(settings.device)
    trained = train_version(config.encoder, data, folder, settings, device, handle)
    train_seconds = time.monotonic() - started
    spec = spec_from_options(name, folder / SERVING_STAGE)
    encoder = load_encoder(spec, device)
    held = not_trained_on(labels)
    with factory() as session:
        now = served_vectors(session, dataset_id, held)
    inputs = {r: data.inputs[key] for x in held for r, key in _record_keys(dataset_name, x)}
    ordered = sorted(inputs)
    new = dict(zip(ordered, encoder.encode([inputs[r] for r in ordered], batch_size=spec.batch_size), strict=True))
    verdict = judge(held, now, new)
    metrics = {
        "selection": SELECTION,
        "train_pairs": len(data.pairs("train")),
        "train_matches": sum(p.label for p in data.pairs("train")),
        **verdict.as_metrics(),
        "current_encoder": serving,
        **trained,
        "train_seconds": round(train_seconds, 1),
    }
    with transaction(factory) as session:
        session.add(
            EncoderVersion(
                dataset_id=dataset_id,
                name=name,
                base_encoder=config.encoder,
                encoder_key=spec.key,
                job_id=handle.job_id,
                status="trained" if verdict.adopted else "rejected",
                metrics=metrics,
            )
        )
    if not verdict.adopted:
        if not settings.keep_rejected_versions:
            remove_version(settings.models_dir, name)
        _finish(factory, handle, adopted=False, metrics=metrics)
        return
    handle.report(force=True, status=ENCODING, progress=JUDGED, metrics=metrics)
    encode_started = time.monotonic()
    encode_records(
        factory,
        dataset_id,
        spec.key,
        encoder,
        spec.batch_size,
        settings.max_text_chars,
        handle.progress(JUDGED, ENCODED),
    )
    handle.report(force=True, progress=ENCODED)  # still held: the switch below is this job's to make
    with transaction(factory) as session:
        switched = switch_version(session, dataset_id, name, spec.key, config, settings.max_text_chars)
        metrics |= {
            "encode_seconds": round(time.monotonic() - encode_started, 1),
            "switched_records": switched.records,
            "requeued_records": switched.requeued,
            "calibration": switched.calibration,
            "seconds": round(time.monotonic() - started, 1),
        }
        if not jobs.finish(session, handle.job_id, handle.token, DONE, adopted=True, metrics=metrics, progress=1.0):
            raise Stopped("the job was cancelled or taken by another worker before the switch")
    if switched.retired:
        remove_version(settings.models_dir, switched.retired)


def train_version(base_name: str, data, folder: Path, settings: Settings, device: str, handle: JobHandle) -> dict:
    """Run the recipe's stages into ``folder``; returns what the selection chose."""
    from training.command import parse_weights, resolve_base, stage_options
    from training.stages import run_stage

    base = resolve_base(base_name, settings)
    args = recipe_arguments(settings.training_seed)
    chosen_on = weight_chosen_on(sum(p.label for p in data.pairs("valid")))
    by_weight: dict[str, float] | None = None
    if chosen_on == "labels":
        weight, by_weight = choose_identifier_weight(base, data, parse_weights(args.identifier_weights), device)
        args.identifier_weights = str(weight)  # the serving stage serves it and records its held-out figures
    handle.report(force=True, progress=0.05)
    supervised = stage_options("supervised", base.spec, args, device)
    supervised = replace(supervised, on_step=handle.progress(0.05, TRAINED - 0.05))
    base = run_stage("supervised", base, data, supervised, folder / "supervised", device)
    handle.report(force=True, progress=TRAINED - 0.05)
    chosen = run_stage(
        SERVING_STAGE, base, data, stage_options(SERVING_STAGE, base.spec, args, device), folder / SERVING_STAGE, device
    )
    stages = chosen.history
    handle.report(force=True, progress=TRAINED)
    return {
        "best_step": stages[0].get("best_step"),
        "steps": stages[0].get("steps"),
        "identifier_weight": chosen.spec.identifier_weight,
        "identifier_weight_chosen_on": chosen_on,
        "labels_average_precision_by_identifier_weight": by_weight,
        "selection_metric": SELECTION_METRIC,
        "holdout_f1_at_selection": stages[-1].get("valid_f1"),
        "holdout_average_precision_at_selection": stages[-1].get(f"valid_{SELECTION_METRIC}"),
    }


def weight_chosen_on(holdout_matches: int) -> str:
    """Where a job chooses the identifier weight: ``fold`` (the held-out fold, after training) once the fold holds
    ``FOLD_CHOOSES_WEIGHT_FROM_MATCHES`` matches, else ``labels`` (every label, the base encoder, before training)."""
    return "fold" if holdout_matches >= FOLD_CHOOSES_WEIGHT_FROM_MATCHES else "labels"


def choose_identifier_weight(
    base: BaseEncoder, data: TrainingData, weights: tuple[float, ...], device: str
) -> tuple[float, dict[str, float]]:
    """The identifier weight of the best average precision over every label (both folds) scored by the base
    encoder, and each candidate weight's average precision. The base encoder trained on none of the labels, so all
    of them can choose: a held-out fold of tens of pairs picks the weight by chance."""
    from training.stages import best_identifier_weight, select_identifier_weight

    every = TrainingData(data.names, data.serialization, data.instruction, data.inputs)
    for name in data.names:
        every.splits["valid"][name] = data.splits["train"].get(name, []) + data.splits["valid"].get(name, [])
    selection = select_identifier_weight(base.spec, every, device, weights, SELECTION_METRIC)
    best = best_identifier_weight(selection, SELECTION_METRIC)
    return best["weight"], {f"{row['weight']:g}": row[f"valid_{SELECTION_METRIC}"] for row in selection}


def recipe_arguments(seed: int) -> argparse.Namespace:
    """The options ``llmatch train`` takes by default (its recipe), with the job's seed."""
    from training.command import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args, _ = parser.parse_known_args(["unused"])
    args.seed = seed
    args.selection_metric = SELECTION_METRIC
    return args


def _record_keys(dataset: str, label: StoredLabel) -> list[tuple[int, str]]:
    return [
        (label.left_record, record_key(dataset, label.left)),
        (label.right_record, record_key(dataset, label.right)),
    ]


def _forget_earlier_attempts(session: Session, settings: Settings, job_id: str) -> None:
    """A run of this job that died left a version behind (a row, a folder): this run makes its own."""
    for version in session.scalars(select(EncoderVersion).where(EncoderVersion.job_id == job_id)):
        if version.status != "serving":
            remove_version(settings.models_dir, version.name)
            session.delete(version)


def _finish(factory: sessionmaker[Session], handle: JobHandle, **values) -> None:
    with transaction(factory) as session:
        if not jobs.finish(session, handle.job_id, handle.token, DONE, progress=1.0, **values):
            raise Stopped("the job was cancelled or taken by another worker")


def _fail(factory: sessionmaker[Session], handle: JobHandle, reason: str) -> None:
    with transaction(factory) as session:
        jobs.finish(session, handle.job_id, handle.token, JOB_FAILED, error=reason[:2000])
    log.warning("training job %s failed: %s", handle.job_id, reason)
