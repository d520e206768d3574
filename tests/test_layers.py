"""The layers point one way, and SQL lives where the architecture says (shared/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "mediavault"
GENERATED = ("storage/v1", "media/v1")
# The composition roots: the CLI's commands (worker, jobs, dev) start the arq layer.
MAY_IMPORT_WORKERS = {"cli.py", "dev.py"}
SQL = re.compile(r"\b(SELECT\b[\s\S]*\bFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|(CREATE|DROP|ALTER)\s+(TABLE|DATABASE|INDEX))\b")


def modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not any(g in p.relative_to(root).as_posix() for g in GENERATED))


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sql_strings(path: Path) -> list[str]:
    return [
        node.value.strip()[:60]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value)
    ]


def test_no_library_module_imports_the_workers():
    offenders = [
        p.relative_to(PACKAGE).as_posix()
        for p in modules(PACKAGE)
        if p.relative_to(PACKAGE).as_posix() not in MAY_IMPORT_WORKERS
        and any(name == "workers" or name.startswith("workers.") for name in imported(p))
    ]
    assert offenders == []


@pytest.mark.parametrize("layer", ["domain", "imaging"])
def test_domain_and_imaging_know_nothing_of_grpc(layer: str):
    offenders = {
        p.relative_to(PACKAGE).as_posix(): sorted(n for n in imported(p) if n.startswith(("grpc", "mediavault.rpc", "mediavault.storage", "mediavault.media")))
        for p in modules(PACKAGE / layer)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_imaging_touches_no_database():
    offenders = [p.name for p in modules(PACKAGE / "imaging") if any(n.startswith(("asyncpg", "redis", "arq")) for n in imported(p))]
    assert offenders == []


def test_sql_lives_in_domain_and_db_only():
    outside = [p for p in [*modules(PACKAGE), *modules(ROOT / "workers")] if not p.is_relative_to(PACKAGE / "domain") and not p.is_relative_to(PACKAGE / "db")]
    found = {p.relative_to(ROOT).as_posix(): sql_strings(p) for p in outside}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_sql_detector_finds_sql():
    assert sql_strings(PACKAGE / "domain" / "accounts.py")
    assert SQL.search("SELECT count(*) FROM accounts")
    assert not SQL.search("select the best one from these")
