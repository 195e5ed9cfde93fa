"""Layers import one way: worker -> app -> vopd. Each layer is imported alone in a fresh interpreter and the modules
it pulled in are checked (the studio's own rule, no torch and no server, is tested beside its callbacks)."""

from __future__ import annotations

import json
import subprocess
import sys

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
        "benchmarks",
        "callbacks",
        "config",
        "data",
        "distributed",
        "divergence",
        "evaluate",
        "guard",
        "token_inspection",
        "models",
        "reproduce",
        "rollout",
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
