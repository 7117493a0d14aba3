"""A small HTTP client for the API, used by ``llmatch ingest``, ``llmatch pairs``, ``llmatch train --dataset`` and the
evaluation."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm


class IngestError(RuntimeError):
    pass


def batches(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def ingest_records(
    url: str,
    dataset: str,
    source: str,
    records: Iterable[dict],
    batch_size: int = 1000,
    progress: bool = False,
    client: httpx.Client | None = None,
    api_key: str | None = None,
) -> dict[str, int]:
    """POST records in batches; returns the summed counts. Stops at the first refused batch."""
    totals = {"accepted": 0, "created": 0, "updated": 0, "unchanged": 0}
    owned = client is None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    client = client or httpx.Client(base_url=url, timeout=300)
    bar = tqdm(desc=f"ingest {dataset}/{source}", unit=" records", disable=not progress)
    try:
        for batch in batches(records, batch_size):
            body = {"dataset": dataset, "source": source, "records": batch}
            response = client.post("/records", json=body, headers=headers)
            if response.status_code != 202:
                raise IngestError(f"POST /records answered {response.status_code}: {_detail(response)}")
            for key, value in response.json().items():
                totals[key] = totals.get(key, 0) + value
            bar.update(len(batch))
    except httpx.HTTPError as error:
        raise IngestError(f"cannot reach the API at {url} ({error}); is `llmatch serve` running?") from error
    finally:
        bar.close()
        if owned:
            client.close()
    return totals


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text[:200]


PAIR_COLUMNS = ["left_source", "left_id", "right_source", "right_id", "score", "match", "probability"]


class ExportError(RuntimeError):
    pass


def export_pairs(
    url: str,
    dataset: str,
    out: Path,
    k: int = 10,
    min_score: float | None = None,
    progress: bool = False,
    client: httpx.Client | None = None,
    api_key: str | None = None,
    retries: int = 3,
) -> int:
    """Every candidate pair of ``dataset`` (GET /datasets/NAME/pairs, following its cursors) written to ``out`` as
    CSV; returns the number of pairs. A response cut short is asked again from its cursor (up to ``retries``
    times in a row): a page's pairs are written only once its cursor line has arrived, so none is written twice."""
    owned = client is None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    client = client or httpx.Client(base_url=url, timeout=httpx.Timeout(300, connect=10))
    bar = tqdm(desc=f"pairs {dataset}", unit=" pairs", disable=not progress)
    written, cursor, failures = 0, None, 0
    try:
        with out.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(PAIR_COLUMNS)
            while True:
                params: dict[str, Any] = {"k": k}
                if min_score is not None:
                    params["min_score"] = min_score
                if cursor is not None:
                    params["cursor"] = cursor
                try:
                    page, done, cursor_after = _pairs_page(client, dataset, params, headers)
                except (httpx.TransportError, _CutShort) as error:
                    failures += 1
                    if failures > retries:
                        raise ExportError(
                            f"the export of {dataset!r} was cut short {failures} times: {error}"
                        ) from error
                    continue
                failures = 0
                writer.writerows(page)
                written += len(page)
                bar.update(len(page))
                if done:
                    return written
                cursor = cursor_after
    except httpx.HTTPError as error:
        raise ExportError(f"cannot reach the API at {url} ({error}); is `llmatch serve` running?") from error
    finally:
        bar.close()
        if owned:
            client.close()


class _CutShort(Exception):
    pass


def _pairs_page(
    client: httpx.Client, dataset: str, params: dict[str, Any], headers: dict[str, str] | None
) -> tuple[list[list[Any]], bool, str | None]:
    """One response of the export: its pairs as CSV rows, whether it was the last, and the cursor to go on."""
    rows: list[list[Any]] = []
    with client.stream("GET", f"/datasets/{dataset}/pairs", params=params, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            raise ExportError(f"GET /datasets/{dataset}/pairs answered {response.status_code}: {_detail(response)}")
        for line in response.iter_lines():
            if not line.strip():
                continue
            item = json.loads(line)
            if "cursor" in item:
                return rows, item["cursor"] is None, item["cursor"]
            match = "" if item["match"] is None else str(item["match"]).lower()
            probability = "" if item["probability"] is None else item["probability"]
            left, right = item["left"], item["right"]
            rows.append([left["source"], left["id"], right["source"], right["id"], item["score"], match, probability])
    raise _CutShort("the response ended before its cursor line")


# ------------------------------------------------------------------------------------ training jobs (v1.2)

JOB_ENDED = ("done", "failed", "cancelled")


class TrainingError(RuntimeError):
    """A training job could not be started, followed or cancelled: ``method`` the request (POST starts, GET
    follows, DELETE cancels), ``status`` the HTTP status that refused it (None: no answer), ``detail`` why."""

    def __init__(self, message: str, method: str, status: int | None = None, detail: str | None = None):
        super().__init__(message)
        self.method, self.status, self.detail = method, status, detail or message

    @property
    def refused(self) -> bool:
        """The service answered 4xx: the request, not the service, must change."""
        return self.status is not None and 400 <= self.status < 500


def start_training(client: httpx.Client, dataset: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST /datasets/NAME/train: the queued job."""
    return _job_call(client, "POST", dataset, 202, headers, json={})


def training_job(client: httpx.Client, dataset: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """GET /datasets/NAME/train: the dataset's latest job."""
    return _job_call(client, "GET", dataset, 200, headers)


def cancel_training(client: httpx.Client, dataset: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """DELETE /datasets/NAME/train: the cancelled job (or the running one, asked to stop)."""
    return _job_call(client, "DELETE", dataset, 200, headers)


def follow_training(
    url: str,
    dataset: str,
    api_key: str | None = None,
    poll_seconds: float = 1.0,
    progress: bool = False,
    client: httpx.Client | None = None,
    started: Callable[[dict[str, Any]], None] | None = None,
    transient_retries: int = 5,
) -> dict[str, Any]:
    """Start a training job of ``dataset`` and wait for it to end, with a progress bar (its status as the
    description); returns the ended job. A refused start raises ``TrainingError`` with its status; Ctrl-C
    (``KeyboardInterrupt``) stops the waiting, never the job. ``started`` is called with the queued job."""
    owned = client is None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    client = client or httpx.Client(base_url=url, timeout=httpx.Timeout(60, connect=10))
    bar = tqdm(total=1.0, desc="queued", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}", disable=not progress)
    try:
        job = start_training(client, dataset, headers)
        if started is not None:
            started(job)
        failures = 0
        while True:
            bar.set_description_str(job["status"], refresh=False)
            bar.n = min(max(float(job["progress"] or 0.0), 0.0), 1.0)
            bar.refresh()
            if job["status"] in JOB_ENDED:
                return job
            time.sleep(poll_seconds)
            try:
                job = training_job(client, dataset, headers)
                failures = 0
            except TrainingError as error:
                failures += 1  # the service restarting: ask again a few times before giving up
                if error.refused or failures > transient_retries:
                    raise
    finally:
        bar.close()
        if owned:
            client.close()


def _job_call(
    client: httpx.Client, method: str, dataset: str, expected: int, headers: dict[str, str] | None, **kwargs: Any
) -> dict[str, Any]:
    path = f"/datasets/{dataset}/train"
    try:
        response = client.request(method, path, headers=headers, **kwargs)
    except httpx.HTTPError as error:
        raise TrainingError(
            f"cannot reach the API at {client.base_url} ({error}); is `llmatch serve` running?", method
        ) from error
    if response.status_code != expected:
        detail = _detail(response)
        message = f"{method} {path} answered {response.status_code}: {detail}"
        raise TrainingError(message, method, response.status_code, detail)
    return response.json()
