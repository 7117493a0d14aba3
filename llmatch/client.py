"""A small HTTP client for the API, used by ``llmatch ingest`` and the evaluation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

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
