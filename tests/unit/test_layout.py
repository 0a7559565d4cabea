"""The package's shape: no import circle among job/'s modules (imports inside functions count
too), and the pipeline imported by the CLI alone."""

from __future__ import annotations

import ast
from pathlib import Path

JOB = Path(__file__).resolve().parents[2] / "job"


def imports() -> dict[str, set[str]]:
    """Each module of job/ and the modules of job/ it imports, anywhere in it (typing-only imports aside)."""
    graph: dict[str, set[str]] = {}
    for path in JOB.glob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
        found = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "job":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("job."):
                found.add(node.module.split(".")[1])
        graph[path.stem] = {m for m in found if (JOB / f"{m}.py").exists()} - {path.stem}
    return graph


# Read once, as the tests are collected: CPython 3.11 before 3.11.8 can fail any later ast.parse in a
# process whose AST constructor once failed ("AST constructor recursion depth mismatch",
# python/cpython#106905), and an xdist worker has run many tests in-process by the time it gets here.
GRAPH = imports()


def test_no_module_of_job_imports_itself_through_others() -> None:
    graph = GRAPH
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for imported in graph[module]:
            if imported in path:
                circles.append(path[path.index(imported):] + [imported])
            elif len(path) < len(graph):
                visit(imported, path + [imported])

    for module in graph:
        visit(module, [module])
    assert [] == circles


def test_only_the_cli_imports_the_pipeline() -> None:
    # (and the rehearsal, which runs that very pipeline on its copy, and the fleet, on each of its
    # databases: the same code as `run`)
    assert ["cli", "fleet", "rehearse"] == sorted(m for m, imported in GRAPH.items() if "pipeline" in imported)
