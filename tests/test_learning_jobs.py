"""Training jobs end to end on a real (small) benchmark, MiniLM and both databases: the job trains in a child
process, is judged on held-out labels, re-encodes every record while the current version answers, and switches;
cancellation, a training process killed mid-job, a worker whose lease ran out, and the refusals."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import records_body
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from bench import judge_audit
from encoding.registry import EncoderPool
from encoding.versions import SERVING_STAGE, version_root
from evaluation import deepmatcher
from learning import jobs, train_job
from learning.judge import judge
from learning.runner import JobRunner
from learning.train_job import FOLD_CHOOSES_WEIGHT_FROM_MATCHES
from llmatch.db import transaction
from llmatch.models import (
    CANCELLED,
    DONE,
    ENCODED,
    JOB_FAILED,
    QUEUED,
    TRAINING,
    Calibration,
    Dataset,
    Embedding,
    EncoderVersion,
    Label,
    Record,
    TrainingJob,
)
from llmatch.settings import Settings

SMALL = Path(__file__).parent / "data" / "abt_buy_small"
# The job's process does the same on both databases; the switch is checked on both, the rest on SQLite only
# (each of those tests trains a real model in a child process).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
FINISHED = (DONE, JOB_FAILED, CANCELLED)


@pytest.fixture
def benchmark() -> deepmatcher.Benchmark:
    return deepmatcher.load(SMALL)


@pytest.fixture
def labelled(client: TestClient, drain, counting_pool: EncoderPool, settings: Settings, benchmark) -> str:
    """Dataset 'abt' with the small benchmark's records encoded and its train and valid pairs labelled."""
    counting_pool.models_dir = settings.models_dir  # the shared test pool resolves versions where the job writes them
    assert client.put("/datasets/abt", json={"attributes": benchmark.attributes}).status_code == 201
    for source, table in (("a", benchmark.table_a), ("b", benchmark.table_b)):
        rows = [(record["id"], record["attributes"]) for record in table]
        assert client.post("/records", json=records_body("abt", source, rows)).status_code == 202
    drain()
    pairs = [
        {"left_source": "a", "left_id": p.left_id, "right_source": "b", "right_id": p.right_id, "label": p.label}
        for split in ("train", "valid")
        for p in benchmark.splits[split]
    ]
    assert client.put("/datasets/abt/labels", json={"pairs": pairs}).status_code == 200
    return "abt"


def start(client: TestClient, dataset: str) -> str:
    state = client.app.state.service
    with transaction(state.session_factory) as session:
        job = jobs.start_job(session, session.scalar(select(Dataset).where(Dataset.name == dataset)))
        return job.id


def job_row(client: TestClient, job_id: str) -> TrainingJob:
    with client.app.state.service.session_factory() as session:
        return session.get(TrainingJob, job_id)


def wait_for(predicate, timeout: float = 300.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def in_background(runner: JobRunner) -> threading.Thread:
    thread = threading.Thread(target=runner.run_once, daemon=True)
    thread.start()
    return thread


def test_a_job_trains_judges_on_held_out_labels_reencodes_and_switches(client, labelled, settings, benchmark):
    state = client.app.state.service
    job_id = start(client, labelled)
    runner = JobRunner(state.session_factory, settings)
    thread = in_background(runner)
    probe = benchmark.test[0]
    query = f"/match?dataset=abt&left_source=a&left_id={probe.left_id}&right_source=b&right_id={probe.right_id}"
    seen: set[str] = set()
    while thread.is_alive():  # the current version answers throughout the job
        answer = client.get(query)
        assert answer.status_code == 200, answer.text
        seen.add(job_row(client, job_id).status)
        time.sleep(0.2)
    thread.join()
    job = job_row(client, job_id)
    assert job.status == DONE, job.error
    assert TRAINING in seen
    metrics = job.metrics
    with state.session_factory() as session:
        held_out = session.scalar(select(func.count()).select_from(Label).where(Label.holdout.is_(True)))
        trained_on = session.scalar(select(func.count()).select_from(Label).where(Label.holdout.is_(False)))
    assert held_out + trained_on == job.labels == 120
    assert metrics["holdout_pairs"] == held_out and metrics["train_pairs"] == trained_on
    assert 0.25 <= held_out / job.labels <= 0.35
    assert set(metrics["candidate"]) == {"threshold", "precision", "recall", "f1"}
    assert 0.0 < metrics["current_average_precision"] <= 1.0 and 0.0 < metrics["candidate_average_precision"] <= 1.0
    assert metrics["holdout_matches"] < FOLD_CHOOSES_WEIGHT_FROM_MATCHES
    assert metrics["identifier_weight_chosen_on"] == "labels"
    by_weight = metrics["labels_average_precision_by_identifier_weight"]
    best = max(by_weight, key=lambda weight: (by_weight[weight], -float(weight)))
    assert metrics["identifier_weight"] == float(best), "the weight is chosen before training, on every label"
    assert job.adopted is (metrics["candidate"]["f1"] >= metrics["current"]["f1"])
    assert job.adopted, f"training on 84 labels of the small benchmark should beat the untrained encoder: {metrics}"

    with state.session_factory() as session:
        dataset = session.scalar(select(Dataset).where(Dataset.name == "abt"))
        version = session.scalar(select(EncoderVersion).where(EncoderVersion.name == job.version))
        assert dataset.encoder_version == job.version and dataset.encoder == "minilm"
        assert version.status == "serving" and version.base_encoder == "minilm"
        keys = session.execute(
            select(Embedding.encoder_key, func.count())
            .join(Record, Record.embedding_id == Embedding.id)
            .where(Record.status == ENCODED)
            .group_by(Embedding.encoder_key)
        ).all()
        records = session.scalar(select(func.count()).select_from(Record))
        assert keys == [(version.encoder_key, records)], "every record has the new version's vector"
        old = session.scalar(
            select(func.count()).select_from(Embedding).where(Embedding.encoder_key != version.encoder_key)
        )
        assert old == 0, "the old version's vectors are removed"
        calibration = session.scalar(select(Calibration).where(Calibration.dataset_id == dataset.id))
        assert calibration.encoder_key == version.encoder_key
        assert calibration.pairs == held_out, "the new threshold is fitted on labels the version did not train on"
        vectors = {
            (source, rid): np.frombuffer(blob, dtype="<f4")
            for source, rid, blob in session.execute(
                select(Record.source, Record.external_id, Embedding.vector).join(
                    Embedding, Record.embedding_id == Embedding.id
                )
            )
        }
    assert (version_root(settings.models_dir, job.version) / "identifiers" / "llmatch_encoder.json").exists() or any(
        version_root(settings.models_dir, job.version).rglob("*.json")
    )
    rendering = client.get("/datasets/abt").json()
    cut = settings.max_text_chars
    read = judge_audit.kept_version_scores(settings.models_dir, job.version, benchmark, rendering, cut)
    stored = [float(vectors[("a", p.left_id)] @ vectors[("b", p.right_id)]) for p in benchmark.valid]
    assert read == pytest.approx(stored, abs=1e-4), "bench.judge_audit renders and encodes as the service does"
    state.synchronizer.poll()
    answer = client.get(query).json()
    expected = float(vectors[("a", probe.left_id)] @ vectors[("b", probe.right_id)])
    assert answer["score"] == pytest.approx(expected, abs=1e-5)
    assert answer["threshold"] == pytest.approx(calibration.threshold)
    inline = client.post(
        "/match",
        json={
            "dataset": "abt",
            "left": {"attributes": next(r["attributes"] for r in benchmark.table_a if r["id"] == probe.left_id)},
            "right": {"source": "b", "id": probe.right_id},
        },
    )
    assert inline.status_code == 200, inline.text
    assert inline.json()["score"] == pytest.approx(expected, abs=1e-4), "inline records are encoded by the version"
    candidates = client.get(f"/candidates?dataset=abt&source=a&id={probe.left_id}&k=3")
    assert candidates.status_code == 200, candidates.text
    for limit in (5, 20, 60):  # the review page asks with the new version's vectors and threshold
        review = client.get(f"/datasets/abt/review?limit={limit}")
        assert review.status_code == 200, review.text
        assert review.json()["threshold"] == pytest.approx(calibration.threshold)


@SQLITE_ONLY
def test_cancelling_a_running_job_stops_its_process_and_the_current_encoder_keeps_serving(client, labelled, settings):
    state = client.app.state.service
    job_id = start(client, labelled)
    runner = JobRunner(state.session_factory, settings)
    thread = in_background(runner)
    wait_for(lambda: job_row(client, job_id).status == TRAINING and runner.child is not None)
    child = runner.child
    with transaction(state.session_factory) as session:
        dataset_id = session.scalar(select(Dataset.id).where(Dataset.name == labelled))
        assert jobs.cancel_job(session, dataset_id).cancel_requested
    thread.join(timeout=60)
    assert not thread.is_alive() and not child.is_alive()
    job = job_row(client, job_id)
    assert job.status == CANCELLED and job.adopted is None
    with state.session_factory() as session:
        assert session.scalar(select(Dataset.encoder_version).where(Dataset.id == dataset_id)) is None


@SQLITE_ONLY
def test_a_training_process_killed_mid_job_fails_the_job_with_its_reason_once_attempts_are_spent(
    client, labelled, settings
):
    state = client.app.state.service
    job_id = start(client, labelled)
    runner = JobRunner(state.session_factory, settings.model_copy(update={"training_max_attempts": 1}))
    thread = in_background(runner)
    wait_for(lambda: runner.child is not None and job_row(client, job_id).progress >= 0.02)
    os.kill(runner.child.pid, signal.SIGKILL)
    thread.join(timeout=60)
    job = job_row(client, job_id)
    assert job.status == JOB_FAILED
    assert "died (exit code -9)" in job.error


@SQLITE_ONLY
def test_a_killed_training_process_is_run_again_while_attempts_remain(client, labelled, settings):
    state = client.app.state.service
    job_id = start(client, labelled)
    runner = JobRunner(state.session_factory, settings)  # two attempts
    thread = in_background(runner)
    wait_for(lambda: runner.child is not None and job_row(client, job_id).progress >= 0.02)
    os.kill(runner.child.pid, signal.SIGKILL)
    thread.join(timeout=60)
    job = job_row(client, job_id)
    assert job.status == QUEUED and job.attempts == 1 and job.claim_token is None
    again = jobs.claim_job(state.session_factory, settings.training_lease_seconds, settings.training_max_attempts)
    assert again is not None and again.id == job_id and again.attempts == 2  # a run to the end: the switch test


@SQLITE_ONLY
@pytest.mark.parametrize("keep", [False, True])
def test_a_version_not_adopted_is_recorded_and_its_folder_deleted_unless_kept(
    client, labelled, settings, monkeypatch, keep
):
    """The job runs in this process, with a judge that rejects whatever it is shown."""
    state = client.app.state.service
    job_id = start(client, labelled)
    claimed = jobs.claim_job(state.session_factory, settings.training_lease_seconds, settings.training_max_attempts)
    assert claimed is not None and claimed.id == job_id

    def rejecting(labels, current, candidate):
        return replace(judge(labels, current, candidate), adopted=False, reason="rejected by the test")

    monkeypatch.setattr(train_job, "judge", rejecting)
    handle = train_job.JobHandle(state.session_factory, job_id, claimed.token, os.getppid())
    train_job.run(state.session_factory, settings.model_copy(update={"keep_rejected_versions": keep}), handle)

    job = job_row(client, job_id)
    assert job.status == DONE and job.adopted is False and job.metrics["reason"] == "rejected by the test"
    assert 0.0 <= job.metrics["candidate_average_precision"] <= 1.0
    assert (version_root(settings.models_dir, job.version) / SERVING_STAGE).is_dir() is keep
    with state.session_factory() as session:
        version = session.scalar(select(EncoderVersion).where(EncoderVersion.name == job.version))
        assert version.status == "rejected"
        assert session.scalar(select(Dataset.encoder_version).where(Dataset.name == labelled)) is None


@pytest.mark.parametrize("attempts, outcome", [(0, TRAINING), (2, JOB_FAILED)])
def test_a_job_whose_worker_died_is_taken_again_or_failed(sqlite_url, attempts, outcome):
    """A worker that dies leaves its job's lease to run out; the next claim runs it again or fails it."""
    from llmatch.db import make_engine, make_session_factory

    factory = make_session_factory(make_engine(sqlite_url))
    with transaction(factory) as session:
        dataset = Dataset(name="d", encoder="minilm", serialization="tagged", seen_attributes=[])
        session.add(dataset)
        session.flush()
        session.add(
            TrainingJob(
                id="a" * 32,
                dataset_id=dataset.id,
                status=TRAINING,
                progress=0.4,
                labels=30,
                options={},
                cancel_requested=False,
                attempts=attempts + 1 if attempts else 1,
                claim_token="dead",
                lease_until=jobs.utcnow() - timedelta(seconds=1),
            )
        )
    claimed = jobs.claim_job(factory, lease_seconds=30, max_attempts=2)
    with factory() as session:
        job = session.get(TrainingJob, "a" * 32)
    if outcome == TRAINING:
        assert claimed is not None and claimed.attempts == 2 and job.claim_token == claimed.token
        assert not jobs.report(factory, job.id, "dead", progress=0.9), "the dead worker's token writes nothing"
    else:
        assert claimed is None and job.status == JOB_FAILED and "stopped before it finished, 3 times" in job.error


@SQLITE_ONLY
def test_too_few_labels_and_a_second_job_are_refused(client, labelled):
    from learning.errors import JobUnfinished, TooFewLabels

    state = client.app.state.service
    start(client, labelled)
    with pytest.raises(JobUnfinished):
        start(client, labelled)
    with transaction(state.session_factory) as session:
        session.execute(update(TrainingJob).values(status=CANCELLED))
        session.execute(Label.__table__.delete().where(Label.label == 1))
    with pytest.raises(TooFewLabels, match="at least 10 matches and 10 non-matches.*it has 0 and"):
        start(client, labelled)
