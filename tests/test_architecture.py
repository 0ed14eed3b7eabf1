"""The package's shape holds: no import cycle among deskgpu's modules (lazy imports counted),
every top-level module sits in one layer of the import contracts, and the contracts catch a
violation (docs/architecture.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (Python 3.11+)")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "deskgpu"


def _contracts() -> list[dict[str, object]]:
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts: list[dict[str, object]] = doc["tool"]["importlinter"]["contracts"]
    return contracts


def _top_level() -> set[str]:
    names = {p.stem for p in SRC.glob("*.py")} | {
        p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()
    }
    return names - {"__init__"}


def _cycles(graph: object) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)  # type: ignore[attr-defined]
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}  # type: ignore[attr-defined]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_among_deskgpus_modules() -> None:
    graph = grimp.build_graph("deskgpu", cache_dir=None, exclude_type_checking_imports=True)
    assert len(graph.modules) > 90
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    class Graph:
        modules = frozenset({"a", "b", "c"})

        @staticmethod
        def find_modules_directly_imported_by(m: str) -> set[str]:
            return {"a": {"b"}, "b": {"a"}, "c": {"a"}}[m]

    assert _cycles(Graph()) == [["a", "b"]]


def test_every_top_level_module_is_in_exactly_one_layer() -> None:
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    placed = [name.strip() for layer in layers["layers"] for name in str(layer).split(":")]  # type: ignore[union-attr]
    assert sorted(placed) == sorted(set(placed)), "a module in two layers"
    assert set(placed) == _top_level() | {"__main__"}


def test_the_no_cli_contract_covers_every_core_module() -> None:
    (no_cli,) = [c for c in _contracts() if "deskgpu.cli" in c.get("forbidden_modules", [])]  # type: ignore[operator]
    sources = {str(m).removeprefix("deskgpu.") for m in no_cli["source_modules"]}  # type: ignore[union-attr]
    assert sources == _top_level() - {"cli", "docs", "__main__", "schemas"}


@pytest.mark.skipif(
    shutil.which("lint-imports") is None
    and not (Path(sys.executable).parent / "lint-imports").exists(),
    reason="no lint-imports",
)
def test_a_deliberate_violation_breaks_the_contracts(tmp_path: Path) -> None:
    """A copy of the package whose units module imports typer: lint-imports must fail."""
    copy = tmp_path / "src"
    shutil.copytree(SRC, copy / "deskgpu", ignore=shutil.ignore_patterns("__pycache__"))
    units = copy / "deskgpu" / "units.py"
    units.write_text(units.read_text() + "\nimport typer  # a deliberate violation\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run(
        [str(lint), "--no-cache"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "deskgpu.units -> typer" in run.stdout
    assert "BROKEN" in run.stdout
