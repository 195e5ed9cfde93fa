"""The Celery application, built from settings; the API uses it to enqueue, the worker to consume.

The broker carries only job ids: the database row is the truth, so a task can be redelivered safely
(``acks_late`` + ``task_reject_on_worker_lost``) and every task starts by re-reading its job.
"""

from __future__ import annotations

from celery import Celery

from app.settings import Settings

TASK_NAMES = {"train": "vopd.run_train", "eval": "vopd.run_eval", "join": "vopd.join_ranks"}
EMBEDDED_TRANSPORT = "app.embedded_broker:Transport"
# kombu's Redis transport, repairing its bookkeeping keys when they hold the wrong type (app.redis_broker).
REDIS_TRANSPORT = "app.redis_broker:Transport"
# A publish retries this often before the API answers 503: a dead broker must not hang a request.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}


def make_celery(settings: Settings) -> Celery:
    app = Celery("vopd", broker=settings.broker_url, set_as_current=False)
    transport = None  # rediss:// and sentinel:// keep kombu's own transports
    if settings.embedded_broker:
        transport = EMBEDDED_TRANSPORT
    elif settings.broker_url.startswith("redis://"):
        transport = REDIS_TRANSPORT
    app.conf.update(
        broker_transport=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the jobs table
        task_acks_late=True,  # a job whose worker dies is delivered again (and resumes)...
        task_reject_on_worker_lost=True,  # ...also when the pool process is killed (e.g. out of memory)
        worker_prefetch_multiplier=1,  # never hold a second job while one runs
        worker_concurrency=1,  # one job per GPU
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # The SQLite transport has no fanout exchange, hence no remote control; liveness is in the database.
        worker_enable_remote_control=not settings.embedded_broker,
        task_publish_retry_policy=PUBLISH_RETRY,
        # After a pool process dies, Celery waits this long for a result it might still have sent before it
        # requeues the task; results are never sent here (the database is the truth), so waiting is pointless.
        worker_lost_wait=1.0,
    )
    if not settings.embedded_broker:
        # A job may run for hours: a Redis message is redelivered only after this long without an ack
        # (and a duplicate delivery is skipped anyway while the job's heartbeat is fresh).
        app.conf.broker_transport_options = {"visibility_timeout": 6 * 3600}
    return app
