"""Where the encoder versions that training jobs write live, and how a version's name finds its folder.

A version is named ``DATASET.vN-JOBID6`` (the job's first six hex digits keep a name unique even after its
dataset is deleted and made again), and lives in ``MODELS_DIR/versions/NAME``: one sub-folder per training stage,
the last of which (``SERVING_STAGE``) is what serves. Every process that shares the data directory resolves a
version's name from there, so the API processes and workers agree on it without a configuration change."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from encoding.manifest import is_trained_folder

VERSIONS_FOLDER = "versions"
SERVING_STAGE = "identifiers"
NAME = re.compile(r"(?P<dataset>[a-z0-9_-]{1,64})\.v(?P<number>[0-9]{1,6})-(?P<job>[0-9a-f]{6})")


def version_name(dataset: str, number: int, job_id: str) -> str:
    return f"{dataset}.v{number}-{job_id[:6]}"


def is_version_name(name: str) -> bool:
    return NAME.fullmatch(name) is not None


def same_dataset(one: str, other: str) -> bool:
    """Whether two version names belong to the same dataset (False when either is no version name)."""
    a, b = NAME.fullmatch(one), NAME.fullmatch(other)
    return a is not None and b is not None and a["dataset"] == b["dataset"]


def version_root(models_dir: Path, name: str) -> Path:
    """The folder a version's stages are written to."""
    return models_dir / VERSIONS_FOLDER / name


def serving_folder(models_dir: Path, name: str) -> Path | None:
    """The trained folder that serves the version ``name``; None when it is not a version or not written yet."""
    if not is_version_name(name):
        return None
    folder = version_root(models_dir, name) / SERVING_STAGE
    return folder if is_trained_folder(folder) else None


def remove_version(models_dir: Path, name: str) -> None:
    """Delete a version's folder (a process that loaded it keeps its copy in memory)."""
    if is_version_name(name):
        shutil.rmtree(version_root(models_dir, name), ignore_errors=True)


def remove_dataset_versions(models_dir: Path, dataset: str) -> None:
    """Delete every version folder of a dataset (when the dataset is deleted)."""
    root = models_dir / VERSIONS_FOLDER
    if not root.is_dir():
        return
    for folder in root.iterdir():
        match = NAME.fullmatch(folder.name)
        if match and match["dataset"] == dataset:
            shutil.rmtree(folder, ignore_errors=True)
