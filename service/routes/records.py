"""/records: durable ingestion, lookup and deletion."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from llmatch.db import transaction
from service import audit, auth
from service import records as logic
from service.datasets import get_dataset
from service.deps import DatasetPath, RecordIdPath, SourcePath, State
from service.entities import entity_of
from service.schemas import IngestResult, RecordOut, RecordsIn

router = APIRouter(prefix="/records", tags=["records"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=IngestResult)
def post_records(body: RecordsIn, state: State, _: auth.Write) -> IngestResult:
    """Store 1-10,000 records durably (committed before the answer); encoding follows asynchronously."""
    settings = state.settings
    with transaction(state.session_factory) as session:
        result = logic.ingest(
            session,
            body.dataset,
            body.source,
            body.records,
            max_attributes=settings.max_dataset_attributes,
            max_sources=settings.max_dataset_sources,
        )
    return result


@router.get("/{dataset}/{source}/{record_id:path}", response_model=RecordOut)
def get_record(
    dataset: DatasetPath, source: SourcePath, record_id: RecordIdPath, state: State, _: auth.Read
) -> RecordOut:
    with state.session_factory() as session:
        found = get_dataset(session, dataset)
        record = logic.get_record(session, found, source, record_id)
        return logic.record_out(found, record).model_copy(update={"entity": entity_of(session, record.id)})


@router.delete("/{dataset}/{source}/{record_id:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete_record(
    dataset: DatasetPath, source: SourcePath, record_id: RecordIdPath, state: State, access: auth.Write
) -> Response:
    with transaction(state.session_factory) as session:
        record = logic.delete_record(session, dataset, source, record_id)
        audit.record(session, access.actor, "record.delete", f"{dataset}/{source}/{record_id}")
    state.registry.remove((record.dataset_id, source), [record.id])
    return Response(status_code=status.HTTP_204_NO_CONTENT)
