"""Import directions between the top-level packages, read from every Python file's syntax tree.

- ``encoding/`` (encoders, rendering, the recipe, the wire format) imports neither the worker, the API,
  training, evaluation nor bench.
- ``service/`` imports ``encoder_worker`` only where it wires the in-process worker.
- ``training/``, ``evaluation/`` and ``bench/`` take encoders from ``encoding``, never ``encoder_worker.encoders``.
- Every import of a project module names a module that exists (nothing left behind at an old path).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {"__pycache__", "build", "dist", "node_modules", "out", "eval-out"}
PROJECT = (
    "llmatch",
    "service",
    "encoding",
    "matching",
    "learning",
    "encoder_worker",
    "training",
    "evaluation",
    "bench",
    "migrations",
)
# The in-process worker (`llmatch serve` without --no-worker): the only files of the API that import the worker.
SERVICE_WORKER_WIRING = {"service/state.py"}
MOVED_TO_ENCODING = ("encoders", "render", "smollm2", "mpnet", "wire")


def python_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if any(part.startswith(".") or part in SKIPPED_DIRS or part.endswith(".egg-info") for part in parts[:-1]):
            continue
        found.append(path)
    return sorted(found)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at any depth; ``from a import b`` gives ``a.b``
    when ``a.b`` is a module of the project, else ``a``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                nested = f"{node.module}.{alias.name}"
                found.append((node.lineno, nested if module_exists(nested) else node.module))
    return found


def module_exists(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base.is_dir() and any(base.glob("*.py")))  # not a bare __pycache__


def package(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


FILES = python_files()


def test_the_walk_sees_every_package():
    seen = {package(path) for path in FILES}
    assert {"encoding", "encoder_worker", "service", "llmatch", "training", "evaluation", "bench", "tests"} <= seen


def violations(rule) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in FILES
        for line, module in imports(path)
        if rule(path.relative_to(ROOT).as_posix(), module)
    ]


def test_encoding_imports_neither_worker_nor_api_nor_tools():
    def rule(rel: str, module: str) -> bool:
        return rel.startswith("encoding/") and within(
            module, "encoder_worker", "service", "training", "evaluation", "bench"
        )

    assert violations(rule) == []


def test_service_imports_the_worker_only_to_wire_it_in_process():
    def rule(rel: str, module: str) -> bool:
        return rel.startswith("service/") and within(module, "encoder_worker") and rel not in SERVICE_WORKER_WIRING

    assert violations(rule) == []


@pytest.mark.parametrize("tool", ["training", "evaluation", "bench"])
def test_tools_take_encoders_from_encoding(tool):
    def rule(rel: str, module: str) -> bool:
        return rel.startswith(f"{tool}/") and within(module, "encoder_worker.encoders")

    assert violations(rule) == []
    assert any(within(module, "encoding") for path in FILES if package(path) == tool for _, module in imports(path))


def test_project_imports_name_modules_that_exist():
    def rule(rel: str, module: str) -> bool:
        return within(module, *PROJECT) and not module_exists(module)

    assert violations(rule) == []


def test_learning_sits_under_the_worker_and_the_api():
    """Training jobs are run by workers and started by the API: learning/ imports neither of them."""

    def rule(rel: str, module: str) -> bool:
        return rel.startswith("learning/") and within(
            module, "service", "encoder_worker", "evaluation", "bench", "fastapi", "starlette", "pydantic"
        )

    assert any(package(path) == "learning" for path in FILES)
    assert violations(rule) == []


def test_nothing_left_at_the_old_encoding_paths():
    left = [name for name in MOVED_TO_ENCODING if module_exists(f"encoder_worker.{name}")]
    assert left == [], f"encoder_worker/ still holds {left}: encoding lives in encoding/"
