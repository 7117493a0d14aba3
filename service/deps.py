"""Request-scoped access to the process state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from pydantic import AfterValidator

from service.schemas import DATASET_NAME, SOURCE_NAME, storable_id
from service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]
DatasetPath = Annotated[str, Path(pattern=DATASET_NAME, description="[a-z0-9_-]{1,64}")]
SourcePath = Annotated[str, Path(pattern=SOURCE_NAME, description="[A-Za-z0-9_-]{1,64}")]
RecordIdPath = Annotated[str, Path(min_length=1, max_length=256), AfterValidator(storable_id)]
