"""Publishing job ids to the broker, and asking whether the broker is reachable."""

from __future__ import annotations

from app.settings import Settings
from worker.celery_app import PUBLISH_RETRY, TASK_NAMES, make_celery


class BrokerUnavailable(RuntimeError):
    """The job row exists but could not be queued; the caller marks it failed and answers 503."""


class JobQueue:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = make_celery(settings)

    def enqueue(self, job_id: int, kind: str, queue: str) -> None:
        """Only the id travels: the worker reads everything else from the database."""
        try:
            self.celery.send_task(TASK_NAMES[kind], args=[job_id], queue=queue, retry=True, retry_policy=PUBLISH_RETRY)
        except Exception as error:  # kombu raises transport-specific errors: all mean "not queued"
            raise BrokerUnavailable(f"the broker at {self._where()} did not accept the job: {error}") from error

    def check(self) -> tuple[bool, str]:
        try:
            with self.celery.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            return True, f"reachable ({self._where()})"
        except Exception as error:  # any transport error means unreachable
            return False, f"unreachable ({self._where()}): {error}"

    def _where(self) -> str:
        return "embedded SQLite broker" if self.settings.embedded_broker else "REDIS_URL"

    def close(self) -> None:
        self.celery.close()
