"""Training jobs through the API (POST, GET and DELETE /datasets/NAME/train), the dataset's encoder version, and
calibration from labels while a trained version serves; on SQLite and PostgreSQL. The app runs no worker here
(the ``client`` fixture), so a job stays ``queued`` until the test moves it."""

from __future__ import annotations

import pytest
from conftest import records_body
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from learning.labels import MIN_MATCHES, MIN_NON_MATCHES
from llmatch.db import transaction
from llmatch.models import Dataset, EncoderVersion, Label, TrainingJob
from llmatch.settings import Settings
from service import keys
from service.labels import calibration_body
from service.schemas import CalibrateIn

JOB_FIELDS = {
    "id",
    "status",
    "progress",
    "labels",
    "version",
    "adopted",
    "metrics",
    "error",
    "created_at",
    "started_at",
    "finished_at",
    "attempts",
    "cancel_requested",
}
RECORDS = 12


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared fixture's settings, with keys re-read on every request (keys made by a test count at once)."""
    return settings.model_copy(update={"auth_cache_seconds": 0})


def pair(left: str, right: str, label: int) -> dict:
    return {"left_source": "a", "left_id": left, "right_source": "b", "right_id": right, "label": label}


def enough_labels(matches: int = MIN_MATCHES, non_matches: int = MIN_NON_MATCHES) -> list[dict]:
    return [pair(f"a{i}", f"b{i}", 1) for i in range(matches)] + [
        pair(f"a{i}", f"b{(i + 1) % RECORDS}", 0) for i in range(non_matches)
    ]


@pytest.fixture
def shop(client: TestClient) -> str:
    """Dataset 'shop' with records a0..a11 and b0..b11 (stored, not encoded: a job needs only labels of records
    that exist) and no labels."""
    assert client.put("/datasets/shop", json={}).status_code == 201
    for source in ("a", "b"):
        rows = [(f"{source}{i}", {"name": f"product {i} {source}"}) for i in range(RECORDS)]
        assert client.post("/records", json=records_body("shop", source, rows)).status_code == 202
    return "shop"


def store(client: TestClient, pairs: list[dict]) -> None:
    assert client.put("/datasets/shop/labels", json={"pairs": pairs}).status_code == 200


def make_key(client: TestClient, name: str, scopes: list[str]) -> dict[str, str]:
    with transaction(client.app.state.service.session_factory) as session:
        key = keys.create_key(session, name, scopes, None, actor="test")
    return {"Authorization": f"Bearer {key}"}


def set_job(client: TestClient, job_id: str, **values) -> None:
    with transaction(client.app.state.service.session_factory) as session:
        session.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(**values))


def set_encoder_version(client: TestClient, version: str | None) -> None:
    """Make ``version`` the dataset's serving version (its row too), as an adopted job's switch would."""
    with transaction(client.app.state.service.session_factory) as session:
        session.execute(update(Dataset).where(Dataset.name == "shop").values(encoder_version=version))
        dataset_id = session.scalar(select(Dataset.id).where(Dataset.name == "shop"))
        if version is not None and session.scalar(select(EncoderVersion).where(EncoderVersion.name == version)) is None:
            session.add(
                EncoderVersion(
                    dataset_id=dataset_id, name=version, base_encoder="minilm", job_id="0" * 32, status="serving"
                )
            )
        elif version is not None:
            session.execute(update(EncoderVersion).where(EncoderVersion.name == version).values(status="serving"))


def version_status(client: TestClient, version: str) -> str:
    with client.app.state.service.session_factory() as session:
        return session.scalar(select(EncoderVersion.status).where(EncoderVersion.name == version))


def test_too_few_labels_is_409_naming_what_is_needed(client, shop):
    response = client.post("/datasets/shop/train")
    assert response.status_code == 409
    body = response.json()
    assert f"at least {MIN_MATCHES} matches and {MIN_NON_MATCHES} non-matches" in body["detail"]
    assert "it has 0 and 0" in body["detail"] and "/datasets/shop/review" in body["detail"]
    assert (body["matches"], body["non_matches"]) == (0, 0)
    assert (body["needed_matches"], body["needed_non_matches"]) == (MIN_MATCHES, MIN_NON_MATCHES)

    store(client, enough_labels(matches=MIN_MATCHES - 1))
    response = client.post("/datasets/shop/train", json={})
    assert response.status_code == 409
    assert f"it has {MIN_MATCHES - 1} and {MIN_NON_MATCHES}" in response.json()["detail"]
    # Labels of records that do not exist do not count.
    store(client, [pair("a0", "b-gone", 1)])
    assert client.post("/datasets/shop/train").status_code == 409

    missing = client.get("/datasets/shop/train")
    assert missing.status_code == 404
    assert "no training job yet" in missing.json()["detail"] and "POST /datasets/shop/train" in missing.json()["detail"]
    assert client.post("/datasets/nosuch/train").status_code == 404
    assert "PUT /datasets/nosuch" in client.get("/datasets/nosuch/train").json()["detail"]


def test_start_read_and_cancel_a_job(client, shop):
    store(client, enough_labels())
    started = client.post("/datasets/shop/train", json={})
    assert started.status_code == 202, started.text
    job = started.json()
    assert set(job) == JOB_FIELDS
    assert job["status"] == "queued" and job["labels"] == MIN_MATCHES + MIN_NON_MATCHES and job["progress"] == 0
    assert (job["version"], job["adopted"], job["metrics"], job["error"]) == (None, None, None, None)
    assert job["cancel_requested"] is False and job["attempts"] == 0 and job["created_at"].endswith("Z")

    read = client.get("/datasets/shop/train").json()
    assert read["id"] == job["id"] and read["status"] == "queued" and read["labels"] == job["labels"]

    again = client.post("/datasets/shop/train")
    assert again.status_code == 409
    assert job["id"] in again.json()["detail"] and "queued" in again.json()["detail"]
    assert "DELETE /datasets/shop/train" in again.json()["detail"]

    cancelled = client.delete("/datasets/shop/train")
    assert cancelled.status_code == 200
    assert cancelled.json()["id"] == job["id"] and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert client.get("/datasets/shop/train").json()["status"] == "cancelled"
    ended = client.delete("/datasets/shop/train")
    assert ended.status_code == 409 and "already ended (cancelled)" in ended.json()["detail"]

    restarted = client.post("/datasets/shop/train")  # no body at all
    assert restarted.status_code == 202 and restarted.json()["id"] != job["id"]
    assert client.get("/datasets/shop/train").json()["id"] == restarted.json()["id"]


def test_cancelling_a_running_job_asks_its_worker_to_stop(client, shop):
    store(client, enough_labels())
    job = client.post("/datasets/shop/train").json()
    set_job(client, job["id"], status="training", claim_token="held", progress=0.4)
    response = client.delete("/datasets/shop/train")
    assert response.status_code == 200
    assert response.json()["status"] == "training" and response.json()["cancel_requested"] is True
    assert client.post("/datasets/shop/train").status_code == 409, "still unfinished until its worker stops"

    set_job(client, job["id"], status="done", claim_token=None, version="shop.v1-abcdef", adopted=True)
    done = client.get("/datasets/shop/train").json()
    assert (done["status"], done["version"], done["adopted"]) == ("done", "shop.v1-abcdef", True)
    ended = client.delete("/datasets/shop/train")
    assert ended.status_code == 409 and "(done)" in ended.json()["detail"]


def test_train_body_and_missing_job(client, shop):
    assert client.delete("/datasets/shop/train").status_code == 404
    assert "no training job yet" in client.delete("/datasets/shop/train").json()["detail"]
    store(client, enough_labels())
    refused = client.post("/datasets/shop/train", json={"epochs": 3})
    assert refused.status_code == 422 and "epochs" in refused.json()["detail"]
    assert client.post("/datasets/shop/train", json=[]).status_code == 422
    assert client.get("/datasets/shop/train").status_code == 404, "nothing was queued by a refused body"


def test_training_scopes(client, shop):
    store(client, enough_labels())
    reader = make_key(client, "reader", ["shop:read", "shop:write"])
    outsider = make_key(client, "outsider", ["other:read", "other:write", "other:manage"])
    manager = make_key(client, "manager", ["shop:manage"])
    for method in ("POST", "DELETE"):
        refused = client.request(method, "/datasets/shop/train", headers=reader)
        assert refused.status_code == 403 and "shop:manage" in refused.json()["detail"]
    assert client.get("/datasets/shop/train", headers=reader).status_code == 404  # allowed: no job yet
    for method in ("GET", "POST", "DELETE"):
        assert client.request(method, "/datasets/shop/train", headers=outsider).status_code == 403
    assert client.post("/datasets/shop/train", headers=manager).status_code == 202
    assert client.get("/datasets/shop/train", headers=reader).json()["status"] == "queued"
    assert client.get("/datasets/shop/train", headers=manager).status_code == 403, "manage does not imply read"
    assert client.delete("/datasets/shop/train", headers=manager).json()["status"] == "cancelled"


def test_encoder_version_is_shown_and_cleared_when_the_text_changes(client, shop):
    assert client.get("/datasets/shop").json()["encoder_version"] is None
    set_encoder_version(client, "shop.v1-abcdef")
    assert client.get("/datasets/shop").json()["encoder_version"] == "shop.v1-abcdef"
    assert client.get("/datasets").json()["datasets"][0]["encoder_version"] == "shop.v1-abcdef"
    # Changes that leave the embedded text alone keep the version.
    assert client.put("/datasets/shop", json={}).json()["encoder_version"] == "shop.v1-abcdef"
    assert client.put("/datasets/shop", json={"index": {"nprobe": 4}}).json()["encoder_version"] == "shop.v1-abcdef"
    assert client.put("/datasets/shop", json={"serialization": "tagged"}).json()["encoder_version"] == "shop.v1-abcdef"
    # A rendering change re-queues the records: the trained version no longer fits them.
    changed = client.put("/datasets/shop", json={"serialization": "plain"})
    assert changed.status_code == 200 and changed.json()["encoder_version"] is None
    assert version_status(client, "shop.v1-abcdef") == "retired", "the version's row says it serves no more"
    assert changed.json()["totals"]["pending"] == 2 * RECORDS
    set_encoder_version(client, "shop.v1-abcdef")
    assert client.put("/datasets/shop", json={"instruction": "Match products"}).json()["encoder_version"] is None


def test_deleting_a_dataset_removes_its_versions(client, shop, settings):
    versions = settings.models_dir / "versions"
    ours, theirs = versions / "shop.v1-abcdef" / "identifiers", versions / "shopping.v1-abcdef" / "identifiers"
    for folder in (ours, theirs):
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text("{}")
    assert client.delete("/datasets/shop").status_code == 204
    assert not ours.parent.exists() and theirs.is_dir()


# ------------------------------------------------------------------------- calibration from labels


POSITIVES = [("a1", "b1"), ("a2", "b2"), ("a3", "b3"), ("a4", "b4")]
NEGATIVES = [("a1", "b2"), ("a2", "b3"), ("a3", "b4"), ("a4", "b5"), ("a1", "b5"), ("a2", "b1")]


def set_folds(client: TestClient, folds: dict[tuple[str, str], bool | None]) -> None:
    with transaction(client.app.state.service.session_factory) as session:
        for (left, right), holdout in folds.items():
            session.execute(update(Label).where(Label.left_id == left, Label.right_id == right).values(holdout=holdout))


def calibration_pairs(client: TestClient) -> set[tuple[str, str]]:
    with client.app.state.service.session_factory() as session:
        dataset = session.scalar(select(Dataset).where(Dataset.name == "shop"))
        body = calibration_body(session, dataset, CalibrateIn.model_validate({"from": "labels"}))
    return {(p.left_id, p.right_id) for p in body.pairs}


def test_calibration_from_labels_leaves_out_what_the_serving_version_trained_on(client, products):
    store(client, [pair(a, b, 1) for a, b in POSITIVES] + [pair(a, b, 0) for a, b in NEGATIVES])
    trained_on = {("a1", "b1"), ("a2", "b2"), ("a1", "b2"), ("a2", "b3"), ("a3", "b4")}
    set_folds(client, {key: key not in trained_on for key in POSITIVES + NEGATIVES} | {("a4", "b5"): None})
    everything = set(POSITIVES + NEGATIVES)
    assert calibration_pairs(client) == everything, "the configured encoder learned none of them"

    set_encoder_version(client, "shop.v1-abcdef")
    assert calibration_pairs(client) == everything - trained_on, "held out, or stored after the job: both kept"

    set_folds(client, {key: False for key in POSITIVES})  # every match trained on
    refused = client.post("/datasets/shop/calibrate", json={"from": "labels"})
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert "no matches (label 1)" in detail and "7 labels that encoder version shop.v1-abcdef was trained on" in detail

    set_encoder_version(client, None)
    calibrated = client.post("/datasets/shop/calibrate", json={"from": "labels"})
    assert calibrated.status_code == 200 and calibrated.json()["pairs"] == len(everything)
