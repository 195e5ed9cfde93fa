"""Layers import one way: worker -> app -> vopd. Each layer is imported alone in a fresh interpreter and the modules
it pulled in are checked (the studio's own rule, no torch and no server, is tested beside its callbacks)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

WEB_STACK = ("fastapi", "starlette", "celery", "kombu", "sqlalchemy", "alembic", "gradio", "uvicorn")


def _modules_after_import(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


LIBRARY = [
    "vopd." + name
    for name in (
        "answering",
        "benchmarks",
        "callbacks",
        "chat",
        "config",
        "data",
        "distributed",
        "engines",
        "divergence",
        "evaluate",
        "evidence",
        "guard",
        "token_inspection",
        "models",
        "reproduce",
        "rollout",
        "scoring",
        "synth",
        "teacher",
        "tiny",
        "tiny_models",
        "trainer",
        "views",
        "cli",
    )
]


def test_the_library_imports_no_web_code() -> None:
    loaded = _modules_after_import(LIBRARY)
    web = sorted(name for name in loaded if name.split(".")[0] in WEB_STACK)
    upper = sorted(name for name in loaded if name.split(".")[0] in ("app", "worker", "frontend"))
    assert not web and not upper, (web[:10], upper[:10])


@pytest.mark.parametrize("module", ["app.main", "app.queueing", "app.serve", "app.crud", "app.celery_app"])
def test_the_service_imports_no_worker_and_no_studio(module: str) -> None:
    loaded = _modules_after_import([module])
    assert not sorted(name for name in loaded if name.split(".")[0] in ("worker", "frontend"))


def vopd_import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the ``vopd`` modules it imports anywhere in its text, deferred imports inside functions included (a
    deferred import hides a circle from the interpreter, not from the reader)."""
    names = {
        ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): path
        for path in root.rglob("*.py")
    }
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(target for target in targets if target in names and target != name)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that reach one another (strongly connected components of more than one module)."""
    reach = {name: set() for name in graph}
    for start in graph:
        frontier = list(graph[start])
        while frontier:
            name = frontier.pop()
            if name not in reach[start]:
                reach[start].add(name)
                frontier.extend(graph[name])
    circles = {tuple(sorted({start} | {other for other in reach[start] if start in reach[other]})) for start in graph}
    return sorted(list(circle) for circle in circles if len(circle) > 1)


def test_the_library_has_no_import_circle() -> None:
    graph = vopd_import_graph(Path(__file__).resolve().parent.parent / "vopd")
    assert import_circles(graph) == []
    assert {"vopd.answering", "vopd.benchmarks", "vopd.evidence"} <= graph["vopd.evaluate"]  # it reads real imports


def test_a_deferred_import_circle_is_found(tmp_path: Path) -> None:
    package = tmp_path / "vopd"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from vopd.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from vopd.c import other\n")
    (package / "c.py").write_text("import vopd.a\n")
    (package / "d.py").write_text("from vopd import a\n")
    assert import_circles(vopd_import_graph(package)) == [["vopd.a", "vopd.b", "vopd.c"]]
