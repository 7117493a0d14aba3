"""Request and response bodies of the REST contract (v1)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

DATASET_NAME = r"^[a-z0-9_-]{1,64}$"
SOURCE_NAME = r"^[A-Za-z0-9_-]{1,64}$"
MAX_ATTRIBUTES = 256
MAX_VALUE_CHARS = 65_536
MAX_RECORDS = 10_000
MAX_PAIRS = 200_000

DatasetName = Annotated[str, StringConstraints(pattern=DATASET_NAME)]
SourceName = Annotated[str, StringConstraints(pattern=SOURCE_NAME)]
AttributeName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def record_id_text(value: Any) -> str:
    """Record ids are strings; numbers are kept as their decimal text."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("record ids must be strings or numbers")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("record ids must be finite numbers")
        value = int(value) if value.is_integer() else repr(value)
    text = str(value)
    if not 1 <= len(text) <= 256:
        raise ValueError("record ids must have 1 to 256 characters")
    return text


def check_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    if len(attributes) > MAX_ATTRIBUTES:
        raise ValueError(f"a record has at most {MAX_ATTRIBUTES} attributes, this one has {len(attributes)}")
    for name, value in attributes.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float | None):
            raise ValueError(f"attribute {name!r} must be a string, a number or null, not {type(value).__name__}")
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            raise ValueError(f"attribute {name!r} has {len(value)} characters; the limit is {MAX_VALUE_CHARS}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"attribute {name!r} is not a finite number")
    return attributes


RecordId = Annotated[str, Field(description="1-256 characters; numbers are kept as decimal text")]


class InlineRecord(Strict):
    attributes: dict[AttributeName, Any]

    _check = field_validator("attributes")(check_attributes)


class RecordIn(InlineRecord):
    id: RecordId

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> str:
        return record_id_text(value)


class RecordsIn(Strict):
    dataset: DatasetName
    source: SourceName
    records: list[RecordIn] = Field(min_length=1, max_length=MAX_RECORDS)

    @model_validator(mode="after")
    def _unique_ids(self) -> RecordsIn:
        seen: set[str] = set()
        for record in self.records:
            if record.id in seen:
                raise ValueError(f"record id {record.id!r} appears more than once in this batch")
            seen.add(record.id)
        return self


class IngestResult(BaseModel):
    accepted: int
    created: int
    updated: int
    unchanged: int


class DatasetConfigIn(Strict):
    encoder: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    serialization: Literal["tagged", "plain"] | None = None
    attributes: list[AttributeName] | None = Field(default=None, min_length=1, max_length=MAX_ATTRIBUTES)
    instruction: Annotated[str, StringConstraints(max_length=4096)] | None = None

    @field_validator("attributes")
    @classmethod
    def _unique_attributes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("attributes must not repeat a name")
        return value


class CalibrationOut(BaseModel):
    threshold: float
    precision: float
    recall: float
    f1: float
    pairs: int
    positives: int
    objective: str
    created_at: datetime | None = None


class StatusCounts(BaseModel):
    pending: int = 0
    encoded: int = 0
    failed: int = 0
    total: int = 0


class DatasetOut(BaseModel):
    name: str
    encoder: str
    serialization: str
    attributes: list[str] | None
    instruction: str | None
    seen_attributes: list[str]
    records: dict[str, StatusCounts]
    totals: StatusCounts
    calibration: CalibrationOut | None
    created_at: datetime
    updated_at: datetime


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


class RecordOut(BaseModel):
    dataset: str
    source: str
    id: str
    attributes: dict[str, Any]
    text: str
    instruction: str | None
    status: str
    error: str | None
    encoded_at: datetime | None


class RecordRef(Strict):
    source: SourceName
    id: RecordId

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> str:
        return record_id_text(value)


def ref_or_inline(value: Any) -> RecordRef | InlineRecord:
    """A side of POST /match: ``{"source", "id"}`` names a stored record, ``{"attributes"}`` is inline."""
    if isinstance(value, RecordRef | InlineRecord):
        return value
    if isinstance(value, dict) and "attributes" in value:
        return InlineRecord.model_validate(value)
    if isinstance(value, dict) and ("source" in value or "id" in value):
        return RecordRef.model_validate(value)
    raise ValueError('give either {"source": ..., "id": ...} or {"attributes": {...}}')


RefOrInline = Annotated[RecordRef | InlineRecord, BeforeValidator(ref_or_inline)]


class MatchIn(Strict):
    dataset: DatasetName
    left: RefOrInline
    right: RefOrInline


class MatchOut(BaseModel):
    score: float
    threshold: float | None
    match: bool | None
    probability: float | None


class CandidatesIn(Strict):
    dataset: DatasetName
    record: InlineRecord
    k: int = Field(default=10, ge=1, le=1000)
    target_source: SourceName | None = None


class Candidate(BaseModel):
    source: str
    id: str
    score: float
    match: bool | None


class CandidatesOut(BaseModel):
    candidates: list[Candidate]


class LabelledPair(Strict):
    left_source: SourceName
    left_id: RecordId
    right_source: SourceName
    right_id: RecordId
    label: Literal[0, 1]

    @field_validator("left_id", "right_id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> str:
        return record_id_text(value)

    @field_validator("label", mode="before")
    @classmethod
    def _label_is_integer(cls, value: Any) -> Any:
        if isinstance(value, bool) or value not in (0, 1):
            raise ValueError("labels are 0 (non-match) or 1 (match)")
        return int(value)


class CalibrateIn(Strict):
    pairs: list[LabelledPair] = Field(min_length=1, max_length=MAX_PAIRS)
    objective: Literal["f1"] = "f1"

    @model_validator(mode="after")
    def _both_classes(self) -> CalibrateIn:
        positives = sum(pair.label for pair in self.pairs)
        if positives == 0 or positives == len(self.pairs):
            missing = "matches (label 1)" if positives == 0 else "non-matches (label 0)"
            raise ValueError(f"calibration needs both matches and non-matches; these pairs have no {missing}")
        return self


class CalibrateOut(BaseModel):
    threshold: float
    precision: float
    recall: float
    f1: float
    pairs: int
    positives: int
    objective: str
