"""/datasets/{name}/entities: records grouped through accepted matches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from service import auth
from service import entities as logic
from service.datasets import get_dataset
from service.deps import DatasetPath, State
from service.schemas import MAX_COUNT, EntitiesOut, EntityOut

router = APIRouter(prefix="/datasets", tags=["entities"])


@router.get("/{name}/entities", response_model=EntitiesOut)
def list_entities(
    name: DatasetPath,
    state: State,
    _: auth.Read,
    min_size: Annotated[int, Query(ge=1, le=MAX_COUNT)] = 2,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_COUNT)] = 0,
) -> EntitiesOut:
    """Entities of at least ``min_size`` records, largest first."""
    with state.session_factory() as session:
        return logic.list_entities(session, get_dataset(session, name), min_size, limit, offset)


@router.get("/{name}/entities/{entity_id}", response_model=EntityOut)
def get_entity(
    name: DatasetPath, entity_id: Annotated[str, Path(min_length=1, max_length=64)], state: State, _: auth.Read
) -> EntityOut:
    """An entity, its records and the accepted pairs that link them."""
    with state.session_factory() as session:
        return logic.get_entity(session, get_dataset(session, name), entity_id)
