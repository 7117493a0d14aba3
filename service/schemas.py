"""Request and response bodies of the REST contract (v1)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

DATASET_NAME = r"^[a-z0-9_-]{1,64}$"
SOURCE_NAME = r"^[A-Za-z0-9_-]{1,64}$"
MAX_ATTRIBUTES = 256
MAX_VALUE_CHARS = 65_536
MAX_RECORDS = 10_000
MAX_PAIRS = 200_000
MAX_COUNT = 2**31 - 1  # sizes, offsets and thresholds of counts: beyond any dataset, within every integer column

DatasetName = Annotated[str, StringConstraints(pattern=DATASET_NAME)]
SourceName = Annotated[str, StringConstraints(pattern=SOURCE_NAME)]
AttributeName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
MAX_ID_NUMBER = 2**53 - 1  # ids sent as numbers: the integers every JSON client represents exactly


def utc(value: datetime) -> datetime:
    """Timestamps leave the service in UTC with their offset; naive ones from the database are UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDateTime = Annotated[datetime, AfterValidator(utc)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def storable_text(value: str, what: str) -> str:
    """Text both databases can store and hash: valid Unicode (no lone surrogate such as \\ud800), no NUL."""
    if "\x00" in value:
        raise ValueError(f"{what} must not contain the NUL character (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = value[error.start]
        raise ValueError(
            f"{what} is not valid Unicode text: it contains a lone surrogate (\\u{ord(bad):04x}); send UTF-8 text"
        ) from None
    return value


def storable_id(value: str) -> str:
    return storable_text(value, "a record id")


def record_id_text(value: Any) -> str:
    """Record ids are strings; numbers are kept as their decimal text."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("record ids must be strings or numbers")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("record ids must be finite numbers")
        value = int(value) if value.is_integer() else repr(value)
    if isinstance(value, int) and abs(value) > MAX_ID_NUMBER:
        raise ValueError(f"record ids sent as numbers must lie within ±{MAX_ID_NUMBER}; send larger ones as strings")
    text = str(value)
    if not 1 <= len(text) <= 256:
        raise ValueError("record ids must have 1 to 256 characters")
    return storable_text(text, "a record id")


def check_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    if len(attributes) > MAX_ATTRIBUTES:
        raise ValueError(f"a record has at most {MAX_ATTRIBUTES} attributes, this one has {len(attributes)}")
    for name, value in attributes.items():
        storable_text(name, "an attribute name")
        if isinstance(value, str):
            storable_text(value, f"attribute {name!r}")
        if isinstance(value, bool) or not isinstance(value, str | int | float | None):
            raise ValueError(f"attribute {name!r} must be a string, a number or null, not {type(value).__name__}")
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            raise ValueError(f"attribute {name!r} has {len(value)} characters; the limit is {MAX_VALUE_CHARS}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"attribute {name!r} is not a finite number")
    return attributes


# What the validators above accept, as JSON Schema (published in /openapi.json).
RECORD_ID_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": 256},
        {"type": "number", "minimum": -MAX_ID_NUMBER, "maximum": MAX_ID_NUMBER},
    ],
    "description": "1-256 characters; numbers are kept as their decimal text",
}
ATTRIBUTES_SCHEMA = {
    "type": "object",
    "maxProperties": MAX_ATTRIBUTES,
    "propertyNames": {"type": "string", "minLength": 1, "maxLength": 256},
    "additionalProperties": {
        "anyOf": [{"type": "string", "maxLength": MAX_VALUE_CHARS}, {"type": "number"}, {"type": "null"}]
    },
}
RecordId = Annotated[str, WithJsonSchema(RECORD_ID_SCHEMA, mode="validation")]


class InlineRecord(Strict):
    attributes: Annotated[dict[AttributeName, Any], WithJsonSchema(ATTRIBUTES_SCHEMA, mode="validation")]

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


class IndexOptionsIn(Strict):
    """A dataset's own FAISS index policy; a field left out (or null) follows the server's LLMATCH_INDEX_* setting."""

    kind: Literal["auto", "flat", "ivf"] | None = None
    approximate_above: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    nprobe: int | None = Field(default=None, ge=1, le=65536)
    storage: Literal["float32", "float16"] | None = None


class IndexOptionsOut(BaseModel):
    """The index policy in force for a dataset: its own options merged over the server's settings."""

    kind: str
    approximate_above: int
    nprobe: int
    storage: str


class DatasetConfigIn(Strict):
    encoder: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    serialization: Literal["tagged", "plain"] | None = None
    attributes: list[AttributeName] | None = Field(
        default=None, min_length=1, max_length=MAX_ATTRIBUTES, json_schema_extra={"uniqueItems": True}
    )
    instruction: Annotated[str, StringConstraints(max_length=4096)] | None = None
    index: IndexOptionsIn | None = None  # null clears the dataset's own index policy

    @field_validator("attributes")
    @classmethod
    def _unique_attributes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("attributes must not repeat a name")
        for name in value or ():
            storable_text(name, "an attribute name")
        return value

    @field_validator("instruction")
    @classmethod
    def _storable_instruction(cls, value: str | None) -> str | None:
        return value if value is None else storable_text(value, "the instruction")


class CalibrationOut(BaseModel):
    """A dataset's active calibration: the answer of POST /datasets/{name}/calibrate, and part of GET /datasets."""

    model_config = ConfigDict(from_attributes=True)

    threshold: float
    precision: float
    recall: float
    f1: float
    pairs: int
    positives: int
    objective: str
    created_at: UtcDateTime | None = None


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
    index: IndexOptionsOut
    render_warning: str | None = Field(
        default=None,
        description="Set when the dataset renders records otherwise than its trained encoder was trained on them.",
    )
    encoder_version: str | None = Field(
        default=None,
        description="The version of the encoder a training job made that serves the dataset; null: the configured "
        "encoder as it came.",
    )
    created_at: UtcDateTime
    updated_at: UtcDateTime


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
    encoded_at: UtcDateTime | None
    entity: str | None = None


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
    explain: bool = False


class MatchOut(BaseModel):
    score: float
    threshold: float | None
    match: bool | None
    probability: float | None
    explanation: Explanation | None = Field(default=None, exclude_if=lambda value: value is None)


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


# Batch forms of POST /candidates and POST /match (contract v1.2). Items are checked one by one by the route, so
# that one bad item is answered in its place; the schema below says what a good item is.
MAX_BATCH_RECORDS = 1_000
MAX_BATCH_PAIRS = 10_000
REF_OR_INLINE_SCHEMA = {
    "anyOf": [RecordRef.model_json_schema(), InlineRecord.model_json_schema()],
    "description": 'a stored record {"source", "id"} or an inline one {"attributes"}',
}
BatchRecord = Annotated[Any, WithJsonSchema(REF_OR_INLINE_SCHEMA, mode="validation")]
BatchPair = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "object",
            "properties": {"left": REF_OR_INLINE_SCHEMA, "right": REF_OR_INLINE_SCHEMA},
            "required": ["left", "right"],
            "additionalProperties": False,
        },
        mode="validation",
    ),
]


def _one_form(value: Any, single: type[BaseModel], batch: str, fields: tuple[str, ...]) -> Any:
    """A body without the ``batch`` field is the single form, checked by its own model (its errors unchanged)."""
    if not isinstance(value, dict) or value.get(batch) is None:
        single.model_validate(value)
        return value
    given = [name for name in fields if name in value]
    if given:
        raise ValueError(f"give either {' and '.join(fields[:2])} or {batch}, not both ({', '.join(given)} given)")
    return value


class CandidatesBatchIn(Strict):
    """The batch form of POST /candidates (as published; the route checks each record alone)."""

    dataset: DatasetName
    records: list[BatchRecord] = Field(min_length=1, max_length=MAX_BATCH_RECORDS)
    k: int = Field(default=10, ge=1, le=1000)
    target_source: SourceName | None = None


class MatchBatchIn(Strict):
    """The batch form of POST /match (as published; the route checks each pair alone). No ``explain``."""

    dataset: DatasetName
    pairs: list[BatchPair] = Field(min_length=1, max_length=MAX_BATCH_PAIRS)


def _published_as(*forms: type[BaseModel]) -> Any:
    """A body model published as "one of these forms" (each with extra fields forbidden, so at most one fits)."""

    def schema(cls: type[BaseModel], _core: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        published = handler(core_schema.union_schema([form.__pydantic_core_schema__ for form in forms]))
        # What every form has in common, said once at the top (the dataset the request is about).
        common = {"dataset": {"type": "string", "pattern": DATASET_NAME}}
        return {"type": "object", "properties": common, "required": list(common), **published}

    return classmethod(schema)


class CandidatesRequest(Strict):
    """POST /candidates: ``record`` (the single form, answered as CandidatesOut) or ``records`` (the batch form,
    answered as CandidatesBatchOut, one result per record in the order given)."""

    __get_pydantic_json_schema__ = _published_as(CandidatesIn, CandidatesBatchIn)

    dataset: DatasetName
    record: InlineRecord | None = None
    records: list[BatchRecord] | None = Field(default=None, min_length=1, max_length=MAX_BATCH_RECORDS)
    k: int = Field(default=10, ge=1, le=1000)
    target_source: SourceName | None = None

    @model_validator(mode="before")
    @classmethod
    def _form(cls, value: Any) -> Any:
        return _one_form(value, CandidatesIn, "records", ("record",))


class MatchRequest(Strict):
    """POST /match: ``left`` and ``right`` (the single form, answered as MatchOut) or ``pairs`` (the batch form,
    answered as MatchBatchOut, one result per pair in the order given; no ``explain``)."""

    __get_pydantic_json_schema__ = _published_as(MatchIn, MatchBatchIn)

    dataset: DatasetName
    left: RefOrInline | None = None
    right: RefOrInline | None = None
    pairs: list[BatchPair] | None = Field(default=None, min_length=1, max_length=MAX_BATCH_PAIRS)
    explain: bool = False

    @model_validator(mode="before")
    @classmethod
    def _form(cls, value: Any) -> Any:
        value = _one_form(value, MatchIn, "pairs", ("left", "right"))
        if isinstance(value, dict) and value.get("pairs") is not None and "explain" in value:
            raise ValueError("explain is not supported with pairs; ask for one pair's explanation with GET /match")
        return value


class BatchPairIn(Strict):
    """One item of ``pairs``."""

    left: RefOrInline
    right: RefOrInline


class ItemError(BaseModel):
    status: int = Field(description="the status the single form would answer for this item: 404, 409 or 422")
    detail: str


class ItemFailed(BaseModel):
    error: ItemError


class CandidatesBatchOut(BaseModel):
    results: list[CandidatesOut | ItemFailed]


class MatchBatchOut(BaseModel):
    results: list[MatchOut | ItemFailed]


class PairRef(BaseModel):
    source: str
    id: str


class ExportedPair(BaseModel):
    """One line of GET /datasets/{name}/pairs (NDJSON); the last line is ``{"cursor": str | null}`` instead."""

    left: PairRef
    right: PairRef
    score: float
    match: bool | None
    probability: float | None


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


def _with_label(label: int) -> dict[str, Any]:
    return {"contains": {"type": "object", "properties": {"label": {"const": label}}, "required": ["label"]}}


class CalibrateIn(Strict):
    # What _both_classes checks, as JSON Schema: pairs holding both labels, or "from": "labels", not both.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["pairs"],
                    "properties": {"pairs": {"type": "array", "allOf": [_with_label(0), _with_label(1)]}},
                    "not": {"required": ["from"], "properties": {"from": {"not": {"type": "null"}}}},
                },
                {
                    "required": ["from"],
                    "properties": {"from": {"const": "labels"}},
                    "not": {"required": ["pairs"], "properties": {"pairs": {"not": {"type": "null"}}}},
                },
            ]
        }
    )

    pairs: list[LabelledPair] | None = Field(default=None, min_length=1, max_length=MAX_PAIRS)
    from_: Literal["labels"] | None = Field(default=None, alias="from", description="calibrate on stored labels")
    objective: Literal["f1"] = "f1"

    @model_validator(mode="after")
    def _both_classes(self) -> CalibrateIn:
        if (self.pairs is None) == (self.from_ is None):
            raise ValueError('give either labelled "pairs" or "from": "labels" (the stored labels)')
        if self.pairs is None:
            return self
        positives = sum(pair.label for pair in self.pairs)
        if positives == 0 or positives == len(self.pairs):
            missing = "matches (label 1)" if positives == 0 else "non-matches (label 0)"
            raise ValueError(f"calibration needs both matches and non-matches; these pairs have no {missing}")
        return self


CalibrateOut = CalibrationOut


# ----------------------------------------------------------------------------------- explanations (v1.1)


class AttributeComparison(BaseModel):
    name: str
    left: str | None
    right: str | None
    similarity: float | None = Field(description="cosine of the two values embedded alone; null if one is empty")


class IdentifierComparison(BaseModel):
    shared: list[str]
    left_only: list[str]
    right_only: list[str]


class Explanation(BaseModel):
    attributes: list[AttributeComparison]
    identifiers: IdentifierComparison


# ----------------------------------------------------------------------------------- labels and review (v1.1)


class LabelsIn(Strict):
    pairs: list[LabelledPair] = Field(min_length=1, max_length=MAX_PAIRS)


class LabelsStored(BaseModel):
    stored: int
    total: int


class LabelOut(LabelledPair):
    updated_at: UtcDateTime | None = None


class LabelsOut(BaseModel):
    pairs: list[LabelOut]
    total: int


class ReviewRecord(BaseModel):
    source: str
    id: str
    attributes: dict[str, Any]


class ReviewPair(BaseModel):
    left: ReviewRecord
    right: ReviewRecord
    score: float
    probability: float | None


class ReviewOut(BaseModel):
    pairs: list[ReviewPair]
    threshold: float | None = Field(description="the score /review asked about: calibrated, from the labels, or mid")
    basis: Literal["calibration", "labels", "middle", "none"]


# ----------------------------------------------------------------------------------- entities (v1.1)


class EntityRecord(BaseModel):
    source: str
    id: str


class EntitySummary(BaseModel):
    id: str
    size: int
    records: list[EntityRecord]


class EntitiesOut(BaseModel):
    entities: list[EntitySummary]
    total: int


class EntityLinkOut(BaseModel):
    left: EntityRecord
    right: EntityRecord
    score: float


class EntityOut(EntitySummary):
    links: list[EntityLinkOut]


class RequeueIn(Strict):
    status: Literal["failed"] = Field(description="which records go back to the queue (only failed ones can)")


class RequeueOut(BaseModel):
    requeued: int


# ------------------------------------------------------------------------------------------- learning (v1.2)


class TrainIn(Strict):
    """The body of POST /datasets/{name}/train: optional, and empty (``{}``) for now; unknown fields are refused."""


class TrainingJobOut(BaseModel):
    """A training job: what it is doing, and what it made."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    status: Literal["queued", "training", "encoding", "done", "failed", "cancelled"]
    progress: float = Field(description="0 to 1, over training and re-encoding")
    labels: int = Field(description="the stored labels (of records that exist) the job started with")
    version: str | None = Field(description="the encoder version it trained; null until it has one")
    adopted: bool | None = Field(
        description="whether the version serves; false when it did worse than the current one on labels neither "
        "trained on (metrics say why); null until judged"
    )
    metrics: dict[str, Any] | None = Field(description="held-out measurements of the new and the current version")
    error: str | None = Field(description="why the job failed or was cancelled")
    created_at: UtcDateTime
    started_at: UtcDateTime | None = None
    finished_at: UtcDateTime | None = None
    attempts: int = Field(description="how many times a worker started it (a worker that died leaves it to another)")
    cancel_requested: bool = Field(description="cancellation was asked for and the job's worker has not stopped yet")
