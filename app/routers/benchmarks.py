"""/api/benchmarks: the published suites an administrator placed in the server's benchmarks folder."""

from __future__ import annotations

from fastapi import APIRouter

from app.crud import benchmarks_dir, found_benchmarks
from app.deps import ApiKeyDep, SettingsDep
from app.paths import public_text
from app.schemas import BenchmarkFolderList, BenchmarkFolderOut

router = APIRouter(prefix="/api/benchmarks", tags=["benchmarks"])


@router.get("", response_model=BenchmarkFolderList)
def list_benchmarks(settings: SettingsDep, key: ApiKeyDep) -> BenchmarkFolderList:
    """Each entry of ``$VOPD_HOME/benchmarks`` named after a suite (``vstar``, ``zoombench``, ``hrbench-4k``...),
    with the suite it holds: an eval job names them as ``config.benchmark`` and ``config.data``."""
    items = [BenchmarkFolderOut(suite=suite, data=data) for suite, data in found_benchmarks(settings)]
    return BenchmarkFolderList(items=items, folder=public_text(str(benchmarks_dir(settings)), settings.home))
