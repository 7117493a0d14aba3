"""All configuration in one place: environment variables prefixed ``LLMATCH_``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmatch.db import DEFAULT_POOL_SIZE


class Settings(BaseSettings):
    """Process settings. None is needed for the embedded default (SQLite file, CPU, MiniLM)."""

    model_config = SettingsConfigDict(env_prefix="LLMATCH_", extra="ignore")

    data_dir: Path = Field(default=Path(".data"), description="Index files, caches and the SQLite file.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: a SQLite file under data_dir.")
    db_pool_size: int = Field(
        default=DEFAULT_POOL_SIZE,
        ge=1,
        le=1000,
        description="Database connections each process keeps open (at least the requests it serves at once).",
    )
    index_directory: Path | None = Field(default=None, description="Index files; default: data_dir/indexes.")
    default_encoder: str = "minilm"
    encoders: dict[str, dict[str, Any] | str] = Field(
        default_factory=dict,
        description='Extra named encoders, e.g. {"mistral": {"kind": "llm2vec", "model": "/models/m"}}; a name '
        "may also map to a folder written by `llmatch train`.",
    )
    encoders_file: Path | None = Field(default=None, description="JSON file with more named encoders.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    faiss_gpu: Literal["auto", "off"] = "auto"

    worker_batch_size: int = Field(default=256, ge=1, le=10_000)
    worker_poll_seconds: float = Field(default=0.5, gt=0)
    worker_commit_size: int = Field(
        default=64, ge=1, le=10_000, description="Records per encoder call, stored as soon as they are encoded."
    )
    worker_lease_seconds: float = Field(
        default=30.0, ge=1, description="A claim's lease, renewed every third of it while its worker is alive."
    )
    worker_max_attempts: int = Field(default=3, ge=1)
    worker_claim_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="A claim stops taking records once their stored attributes (JSON, in bytes) would pass this; "
        "it always takes one. Bounds a worker's memory when records are large.",
    )
    worker_log_seconds: float = Field(default=10.0, gt=0)
    # Training jobs (contract "Learning"): run by encoder workers, each in a child process of its own.
    training_poll_seconds: float = Field(default=1.0, gt=0, description="How often a worker looks for a training job.")
    training_lease_seconds: float = Field(
        default=30.0,
        ge=2,
        description="A running job's lease, renewed while its worker lives; a dead worker's job "
        "runs again (or fails) once it runs out.",
    )
    training_max_attempts: int = Field(
        default=2, ge=1, description="Runs a training job gets before it fails (its process or worker died each time)."
    )
    training_seed: int = Field(default=42, description="Seed of the training stages a job runs.")
    keep_rejected_versions: bool = Field(
        default=False,
        description="Keep the folder of a version its job did not adopt (for inspection); by default it is deleted.",
    )
    index_sync_seconds: float = Field(default=0.5, gt=0)
    index_kind: Literal["auto", "flat", "ivf"] = Field(
        default="auto", description="FAISS structure per (dataset, source); auto: exact below index_approximate_above."
    )
    index_approximate_above: int = Field(
        default=50_000, ge=1, description="Vectors from which an auto index is an inverted file (IVF), not exact."
    )
    index_nprobe: int = Field(
        default=32, ge=1, description="Inverted lists an IVF search visits at least (recall vs time)."
    )
    index_target_recall: float = Field(
        default=0.99,
        ge=0,
        le=1,
        description="An IVF's nprobe is raised at build time until recall@10 on 100 of its own vectors reaches this; "
        "0: exactly index_nprobe.",
    )
    index_lists_per_sqrt: float = Field(
        default=1.0,
        gt=0,
        le=64,
        description="An IVF of n vectors has about this many times sqrt(n) lists: more lists, shorter scans at a "
        "given recall, longer training (docs/performance.md compares 1 and 2).",
    )
    index_storage: Literal["float32", "float16"] = Field(
        default="float32", description="float16 halves index memory (scalar-quantised vectors) at a small recall cost."
    )
    index_save_seconds: float = Field(
        default=300.0, ge=0, description="Changed indexes are written to their files this often; 0: only at shutdown."
    )
    index_max_lag_seconds: float = Field(
        default=60.0, gt=0, description="/readyz answers 503 when the index follower is this far behind the log."
    )
    ready_timeout_seconds: float = Field(default=2.0, gt=0, description="How long /readyz waits for the database.")
    # Access and bounds (README "Keys and access" and "Limits").
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Larger request bodies get 413. Default: one record at the contract's maxima (256 attributes "
        "of 65,536 characters, 3 bytes each in UTF-8: 48 MiB) plus names and JSON syntax, rounded up.",
    )
    max_text_chars: int = Field(
        default=16_384,
        ge=256,
        description="Rendered text per record is cut to this many characters before tokenisation (far beyond "
        "the 512 tokens an encoder keeps by default).",
    )
    # Explanations (`explain` on /match): the work one may do, each value first cut to max_text_chars.
    explain_max_values: int = Field(
        default=128,
        ge=2,
        le=1_024,
        description="Distinct attribute values one explanation embeds; attributes past it get similarity null.",
    )
    explain_max_chars: int = Field(
        default=131_072,
        ge=256,
        le=16_777_216,
        description="Characters one explanation embeds, and scans per record for identifiers; values past it are "
        "left out (similarity null).",
    )
    explanation_cache_rows: int = Field(
        default=10_000,
        ge=0,
        le=100_000_000,
        description="Attribute vectors each dataset keeps cached for explanations; the oldest go past it (0: none).",
    )
    max_dataset_attributes: int = Field(
        default=1_024, ge=1, description="Distinct attribute names per dataset; a batch that would exceed it gets 422."
    )
    max_dataset_sources: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Sources per dataset (each one is searched by every candidates query); a batch of records for "
        "a new source past it gets 422.",
    )
    max_dataset_labels: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="Labelled pairs per dataset (GET /datasets/NAME/labels lists them all, a training job reads them "
        "all); a PUT that would store more gets 422.",
    )
    max_inline_encodes: int = Field(
        default=8, ge=1, description="Concurrent on-the-spot encodes (POST /match, POST /candidates); more get 429."
    )
    inline_encoder_url: str | None = Field(
        default=None,
        description="Send on-the-spot encodes to a worker started with `--serve-inline PORT` (e.g. "
        "http://worker:8001) instead of encoding in the API process; unreachable: 503.",
    )
    inline_encoder_timeout_seconds: float = Field(
        default=30.0, gt=0, description="How long the API waits for the inline encoder's answer before a 503."
    )
    # The worker's inline endpoint (`llmatch worker --serve-inline PORT`).
    inline_server_timeout_seconds: float = Field(
        default=10.0, gt=0, description="An inline endpoint connection idle this long (sending or reading) is closed."
    )
    inline_server_max_connections: int = Field(
        default=32, ge=1, description="Connections the inline endpoint handles at once; more wait, then get 503."
    )
    auth_cache_seconds: float = Field(
        default=5.0, ge=0, description="How long API keys are cached in memory (revocation takes effect within it)."
    )
    admin_key: SecretStr | None = Field(
        default=None, description="At `llmatch serve`: ensure an admin key with this value exists (deployments)."
    )
    admin_key_file: Path | None = Field(default=None, description="Like admin_key, read from a file (a secret).")
    admin_key_name: str = Field(default="admin", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    insecure_no_auth: bool = Field(
        default=False,
        description="Set by `llmatch serve --insecure-no-auth`: while no key exists, serve any Host header "
        "(otherwise only localhost and loopback addresses are answered, against DNS rebinding).",
    )
    log_level: str = "INFO"
    review_candidates: int = Field(default=10, ge=1, le=100, description="Candidates per record /review considers.")
    entity_candidates: int = Field(default=10, ge=1, le=100, description="Candidates per record entities link.")
    entity_guard: Literal["none", "support", "centroid"] = Field(
        default="support", description="What two groups must show to merge (none: plain connected components)."
    )
    entity_min_support: float = Field(
        default=0.5, ge=0, le=1, description="support guard: share of cross pairs at or above the threshold."
    )
    entity_max_size: int = Field(default=3, ge=0, description="Largest entity a merge may make; 0: no cap.")
    review_max_records: int = Field(
        default=2000, ge=1, le=1_000_000, description="Records whose candidates one /review call reads at most."
    )

    # The pair export (contract v1.2).
    pairs_page_records: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Records one GET /datasets/NAME/pairs response queries before its cursor line; the client "
        "follows the cursor for the rest.",
    )

    @field_validator("encoders", mode="before")
    @classmethod
    def _parse_encoders(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to ``data_dir/llmatch.sqlite3``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'llmatch.sqlite3').resolve()}"

    @property
    def index_dir(self) -> Path:
        return self.index_directory or self.data_dir / "indexes"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
