"""All configuration in one place: environment variables prefixed ``LLMATCH_``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process settings. None is needed for the embedded default (SQLite file, CPU, MiniLM)."""

    model_config = SettingsConfigDict(env_prefix="LLMATCH_", extra="ignore")

    data_dir: Path = Field(default=Path(".data"), description="Index files, caches and the SQLite file.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: a SQLite file under data_dir.")
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
    worker_lease_seconds: float = Field(default=600.0, gt=0)
    worker_max_attempts: int = Field(default=3, ge=1)
    worker_log_seconds: float = Field(default=10.0, gt=0)
    index_sync_seconds: float = Field(default=0.5, gt=0)
    max_body_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    log_level: str = "INFO"

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
