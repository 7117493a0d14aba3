"""GET /datasets/{name}/pairs: every candidate pair of a dataset, streamed as NDJSON, resumable by a cursor."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from service import auth
from service import decisions as logic
from service.deps import DatasetPath, State
from service.schemas import ExportedPair

router = APIRouter(tags=["decisions"])

NDJSON = "application/x-ndjson"


def _line_schema() -> dict:
    """ExportedPair's schema with its sides written out (no reference to resolve inside a response example)."""
    schema = ExportedPair.model_json_schema()
    side = schema.pop("$defs")["PairRef"]
    schema["properties"]["left"] = schema["properties"]["right"] = side
    return schema


PAIRS_RESPONSE = {
    200: {
        "description": "One JSON object a line: an ExportedPair per candidate pair (each unordered pair once), "
        'then a last line {"cursor": str | null}; send that cursor back to go on, null means done.',
        "content": {NDJSON: {"schema": _line_schema()}},
    }
}


@router.get("/datasets/{name}/pairs", response_class=StreamingResponse, responses=PAIRS_RESPONSE)  # type: ignore[arg-type]
def export_pairs(
    name: DatasetPath,
    state: State,
    _: auth.Read,
    k: Annotated[int, Query(ge=1, le=1000, description="candidates per record, as for /candidates")] = 10,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0, description="leave out pairs scoring less")] = None,
    cursor: Annotated[
        str | None, Query(pattern=r"^[0-9]{1,18}$", description="the last line's cursor of the previous response")
    ] = None,
) -> StreamingResponse:
    """Every candidate pair across the dataset's sources (a record's k best, as GET /candidates answers them),
    each unordered pair once, with score, decision and probability; at most LLMATCH_PAIRS_PAGE_RECORDS records
    are queried per response, then the cursor line says where to go on."""

    def current() -> tuple:
        with state.session_factory() as session:
            found, calibration = logic.dataset_and_calibration(session, name)
            state.registry.check_current(found.id, found.serving_encoder)
            session.expunge_all()
            return found, calibration

    found, calibration = state.searching(current)
    lines = logic.export_lines(
        state.session_factory,
        state.registry,
        found,
        calibration,
        k,
        min_score,
        int(cursor or 0),
        state.settings.pairs_page_records,
    )
    return StreamingResponse(lines, media_type=NDJSON)
