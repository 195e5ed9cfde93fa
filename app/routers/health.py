"""/api/health (no key needed): database, broker and live workers; /api/me: whose key this is."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request
from sqlalchemy import select, text

from app.deps import ApiKeyDep, SessionDep, SettingsDep
from app.schemas import ComponentHealth, HealthOut, LocalWorkerOut, MeOut, WorkerOut
from app.tables import Worker, utcnow

router = APIRouter(prefix="/api", tags=["health"])


@router.get("/health", response_model=HealthOut)
def health(request: Request, session: SessionDep, settings: SettingsDep) -> HealthOut:
    try:
        session.execute(text("SELECT 1"))
        database = ComponentHealth(ok=True, detail=session.get_bind().dialect.name)
        cutoff = utcnow() - timedelta(seconds=3 * settings.heartbeat_interval_s)
        workers = [
            WorkerOut.model_validate(row)
            for row in session.scalars(select(Worker).where(Worker.last_seen_at >= cutoff).order_by(Worker.name))
        ]
    except Exception as error:  # any driver error means the database is down
        database, workers = ComponentHealth(ok=False, detail=str(error)), []
    broker_ok, broker_detail = request.app.state.queue.check()
    broker = ComponentHealth(ok=broker_ok, detail=broker_detail)
    supervisor = getattr(request.app.state, "local_worker", None)
    local = LocalWorkerOut(**supervisor.status()) if supervisor is not None else None
    healthy = database.ok and broker.ok and workers and (local is None or local.alive)
    # The worker `vopd serve` started is alive but has not reported yet (importing torch takes tens of seconds on a
    # first start): nothing is wrong, jobs simply wait in the queue until it does.
    booting = database.ok and broker.ok and not workers and local is not None and local.alive
    status = "ok" if healthy else "starting" if booting else "degraded"
    return HealthOut(status=status, database=database, broker=broker, workers=workers, local_worker=local)


@router.get("/me", response_model=MeOut)
def me(key: ApiKeyDep) -> MeOut:
    return MeOut(id=key.id, name=key.name)
