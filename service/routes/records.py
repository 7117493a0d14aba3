"""/records: durable ingestion, lookup and deletion."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from llmatch.db import transaction
from service import records as logic
from service.datasets import get_dataset
from service.deps import DatasetPath, RecordIdPath, SourcePath, State
from service.schemas import IngestResult, RecordOut, RecordsIn

router = APIRouter(prefix="/records", tags=["records"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=IngestResult)
def post_records(body: RecordsIn, state: State) -> IngestResult:
    """Store 1-10,000 records durably (committed before the answer); encoding follows asynchronously."""
    with transaction(state.session_factory) as session:
        result = logic.ingest(session, body.dataset, body.source, body.records)
    return result


@router.get("/{dataset}/{source}/{record_id:path}", response_model=RecordOut)
def get_record(dataset: DatasetPath, source: SourcePath, record_id: RecordIdPath, state: State) -> RecordOut:
    with state.session_factory() as session:
        found = get_dataset(session, dataset)
        return logic.record_out(found, logic.get_record(session, found, source, record_id))


@router.delete("/{dataset}/{source}/{record_id:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete_record(dataset: DatasetPath, source: SourcePath, record_id: RecordIdPath, state: State) -> Response:
    with transaction(state.session_factory) as session:
        record = logic.delete_record(session, dataset, source, record_id)
    state.registry.remove((record.dataset_id, source), [record.id])
    return Response(status_code=status.HTTP_204_NO_CONTENT)
