"""Import directions of the engine: ``matching/`` sits under the API, and the offline tools use the engine, not
the API. Read from the source with ``ast`` (nothing imported), so a forbidden import fails here before it runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Offline tools that drive the API itself on purpose, with why.
API_USERS = {
    "evaluation/command.py": "runs the API in-process (service.app.create_app) to score through it",
    "bench/text_cap.py": "measures the largest record the API accepts (service.schemas limits)",
    "bench/gpu_check.py": "times the API's client of the inline encoder (service.inline_encoder)",
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def offending(path: Path, roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(path) if m.split(".")[0] in roots)


def test_the_engine_package_exists_and_is_installed():
    assert python_files("matching"), "matching/ holds the engine"
    assert '"matching*"' in (ROOT / "pyproject.toml").read_text(), "packages.find must include matching"


@pytest.mark.parametrize("path", python_files("matching"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_engine_imports_neither_the_api_nor_fastapi(path: Path):
    assert offending(path, ("service", "fastapi", "starlette", "pydantic")) == []


@pytest.mark.parametrize(
    "path",
    [p for package in ("training", "evaluation", "bench") for p in python_files(package)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_training_evaluation_and_bench_use_the_engine_not_the_api(path: Path):
    if str(path.relative_to(ROOT)) in API_USERS:
        pytest.skip(API_USERS[str(path.relative_to(ROOT))])
    assert offending(path, ("service",)) == []


def test_the_exceptions_still_exist_and_still_need_to_be():
    for name in API_USERS:
        assert offending(ROOT / name, ("service",)), f"{name} no longer imports service: drop it from API_USERS"
