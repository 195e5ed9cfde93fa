"""Publishing job ids to the broker, and asking whether the broker is reachable."""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
from typing import Any

from app.celery_app import PUBLISH_RETRY, TASK_NAMES, make_celery
from app.redis_broker import UNACKED_KEYS, is_wrongtype, quarantine_wrong_types
from app.settings import Settings


class BrokerUnavailable(RuntimeError):
    """The job row exists but could not be queued: it stays queued and the reaper publishes it once the broker is
    back (``app.crud.reconcile_queued``)."""


def routed_queue(queue: str, gpus: int, nodes: int = 1) -> str:
    """The broker queue of a job that runs on ``gpus`` devices (of each of ``nodes`` machines): the queue itself for
    one device, ``QUEUE.gpusN`` for N on one machine, ``QUEUE.nodesM.gpusN`` for a job over M machines.
    A worker with G devices consumes its queue and QUEUE.gpus2 .. QUEUE.gpusG, so it only takes jobs that fit; the
    first worker of a group of M machines also consumes QUEUE.nodesM.gpus1 .. QUEUE.nodesM.gpusG."""
    if nodes > 1:
        return f"{queue}.nodes{nodes}.gpus{gpus}"
    return queue if gpus <= 1 else f"{queue}.gpus{gpus}"


def join_queue(queue: str, nodes: int, node_rank: int) -> str:
    """Where the first machine of a node group asks machine ``node_rank`` to start its share of a job's processes;
    only that machine's worker consumes it (one node group per queue name)."""
    return f"{queue}.nodes{nodes}.rank{node_rank}"


_ROUTED = re.compile(r"^(?P<base>.+?)(?:\.nodes(?P<nodes>\d+))?\.gpus(?P<gpus>\d+)$")


def queue_shape(queue: str) -> tuple[str, int, int]:
    """(queue, gpus per machine, machines) of a broker queue name made by ``routed_queue``."""
    match = _ROUTED.match(queue)
    if match is None:
        return queue, 1, 1
    return match["base"], int(match["gpus"]), int(match["nodes"] or 1)


PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport names a queue's priority lists queue + this + step


def queue_not_allowed(settings: Settings, queue: str) -> str:
    """The 422 message for a queue name a client may not use."""
    allowed = ", ".join(repr(name) for name in settings.allowed_queues)
    return (
        f"queue {queue!r} is not one of this server's queues ({allowed}); the server derives the queues of "
        "multi-device jobs itself (resources.gpus / nodes). An administrator adds queues with VOPD_QUEUES."
    )


def job_queue_problem(settings: Settings, queue: str) -> str | None:
    """Why a stored job's broker queue must not be published to, or None: it is an allowed queue or a form the
    server derives from one (``routed_queue``); a node group's private queue (``join_queue``) never carries a job."""
    base, gpus, nodes = queue_shape(queue)
    if base in settings.allowed_queues and queue == routed_queue(base, gpus, nodes):
        return None
    return queue_not_allowed(settings, queue)


def job_id_of(message: Any) -> int | None:
    """The job id a kombu message (as the Redis and SQLite transports store it) carries, or None."""
    try:
        if isinstance(message, str | bytes):
            message = json.loads(message)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return int(args[0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


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

    def pending_job_ids(self, queue: str) -> set[int]:
        """Job ids whose message the broker holds for ``queue``: waiting, or delivered to a worker and not yet
        acknowledged. Raises BrokerUnavailable when the broker cannot be read."""
        try:
            if self.settings.embedded_broker:
                return self._pending_embedded(queue)
            return self._pending_redis(queue)
        except Exception as error:  # any transport error: we cannot tell, so nothing is republished this pass
            raise BrokerUnavailable(f"the broker at {self._where()} could not be read: {error}") from error

    def _pending_redis(self, queue: str) -> set[int]:
        import redis

        client = redis.Redis.from_url(self.settings.broker_url, socket_connect_timeout=2, socket_timeout=5)
        try:
            # kombu keeps a queue's waiting messages in a list named after it (one more per priority step), and
            # messages delivered but not yet acknowledged (a running job, with acks_late) in the "unacked" hash.
            lists = [queue, *(f"{queue}{PRIORITY_SEP}{step}" for step in (3, 6, 9))]
            waiting = [item for key in lists for item in client.lrange(key, 0, -1)]
            try:
                values = client.hvals("unacked")
            except redis.ResponseError as error:  # moved aside (app.redis_broker), then read again
                if not is_wrongtype(error) or not quarantine_wrong_types(client, UNACKED_KEYS):
                    raise
                values = client.hvals("unacked")
            unacked = [json.loads(value) for value in values]  # [message, exchange, routing key]
            delivered = [entry[0] for entry in unacked if entry[2] == queue]
        finally:
            client.close()
        return {job for job in map(job_id_of, [*waiting, *delivered]) if job is not None}

    def _pending_embedded(self, queue: str) -> set[int]:
        path = self.settings.broker_url.removeprefix("sqlite:///")
        if not os.path.exists(path):  # deleted (or never written): whatever it held is gone
            return set()
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as connection:
            try:
                # Messages handed to a worker stay in the table, invisible: only visible ones are still waiting.
                rows = connection.execute(
                    "SELECT m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
                    "WHERE q.name = ? AND m.visible = 1",
                    (queue,),
                ).fetchall()
            except sqlite3.OperationalError as error:
                if "no such table" in str(error):  # nothing was ever published
                    return set()
                raise
        return {job for job in (job_id_of(row[0]) for row in rows) if job is not None}

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
