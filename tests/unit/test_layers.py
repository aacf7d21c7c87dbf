"""The arrows point inwards: domain imports only itself and the standard library; app never reaches an adapter
or the HTTP layer; the HTTP layer reaches adapters only through the container."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(layer: str) -> list[Path]:
    return sorted((SERVICE / layer).rglob("*.py"))


@pytest.mark.parametrize("path", modules("domain"), ids=lambda p: p.name)
def test_the_domain_imports_only_itself_and_the_standard_library(path: Path) -> None:
    outside = {
        name for name in imports_of(path)
        if name.split(".")[0] not in sys.stdlib_module_names and not name.startswith("service.domain")
    }
    assert not outside, f"{path.name} imports {sorted(outside)}"


def test_the_domain_knows_no_framework_database_or_vendor() -> None:
    forbidden = ("fastapi", "starlette", "sqlite3", "redis", "openai", "httpx", "uvicorn", "sse_starlette")
    for path in modules("domain"):
        hits = {name for name in imports_of(path) if name.split(".")[0] in forbidden}
        assert not hits, f"{path.name} imports {sorted(hits)}"


@pytest.mark.parametrize("path", modules("app"), ids=lambda p: p.name)
def test_use_cases_reach_neither_adapters_nor_http(path: Path) -> None:
    bad = {n for n in imports_of(path) if n.startswith(("service.adapters", "service.api", "fastapi", "starlette"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("api"), ids=lambda p: p.name)
def test_the_http_layer_never_imports_an_adapter(path: Path) -> None:
    bad = {n for n in imports_of(path) if n.startswith("service.adapters")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_checks_see_real_imports() -> None:
    # Guards the test itself: a parser that found nothing would pass every check above.
    assert "service.domain.events" in imports_of(SERVICE / "domain" / "engine.py")
    assert "fastapi" in imports_of(SERVICE / "api" / "deps.py")
