"""kombu's Redis transport, made to survive its own bookkeeping keys holding the wrong type.

kombu keeps, beside each queue's list, a few keys of its own in the same Redis database: the ``unacked`` hash and the
``unacked_index`` sorted set (messages delivered but not yet acknowledged, which ``acks_late`` jobs always are), the
``unacked_mutex`` lock (a string) that guards restoring them, and a ``_kombu.binding.<exchange>`` set (plus
``_kombu.binding_permanent.<exchange>``) per exchange. If anything else writes one of those names (a queue called
``unacked_index`` is a list of that name), every command kombu runs on it fails with ``WRONGTYPE``: the worker dies at
start (restoring unacked messages reads ``unacked_index``) or at its next delivery (``ZADD unacked_index``), and a
publish to the exchange fails (``SMEMBERS _kombu.binding.<exchange>``).

A queue's own list (and its priority lists) can be clobbered the same way by a stray write; BRPOP over the consumed
queues then fails as a whole, and a publish to the queue fails.

The API refuses such queue names (``app.settings.check_queue_name``), but a key written before that, by an older
version, or by hand must not stop the service. So each operation below that touches a bookkeeping key catches
``WRONGTYPE``, moves every wrong-typed key it uses aside (``RENAME`` to ``vopd:quarantine:<key>:<time>``, kept for a
week for whoever investigates, then expired by Redis), logs it, and runs once more. The quarantine name holds a ':',
which no queue name may, so it cannot collide with a queue. Messages that sat in a quarantined key (the job published
to the bad queue) are not delivered; the database still has their job, which the reconciler fails with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from queue import Empty
from typing import Any, TypeVar

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

QUARANTINE_PREFIX = "vopd:quarantine:"
QUARANTINE_TTL_S = 7 * 24 * 3600
UNACKED_KEYS = {"unacked": "hash", "unacked_index": "zset", "unacked_mutex": "string"}
T = TypeVar("T")


def is_wrongtype(error: BaseException) -> bool:
    return "WRONGTYPE" in str(error)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def quarantine_wrong_types(client: Any, expected: dict[str, str]) -> list[str]:
    """Move aside every key of ``expected`` (name -> Redis type) that exists with another type; return what was
    repaired (the new names; the old one where another process moved it first). A missing key is fine (kombu creates
    it on first use)."""
    moved: list[str] = []
    for key, kind in expected.items():
        actual = _text(client.type(key))
        if actual in ("none", kind):
            continue
        target = f"{QUARANTINE_PREFIX}{key}:{time.time():.6f}"
        try:
            client.rename(key, target)
            client.expire(target, QUARANTINE_TTL_S)
        except Exception as error:  # another process moved it first (RENAME of a key gone): fine now either way
            if _text(client.type(key)) in ("none", kind):
                moved.append(key)  # repaired all the same: the caller may run its command again
                continue
            raise RuntimeError(f"could not move the wrong-typed broker key {key!r} aside: {error}") from error
        log.error(
            "broker key %r held a %s where kombu keeps a %s (a queue of that name, or a stray write): moved aside to "
            "%r so that delivery goes on; messages in it are not delivered (their jobs are failed by the API's "
            "reconciler)",
            key,
            actual,
            kind,
            target,
        )
        moved.append(target)
    return moved


def binding_keys(channel: kombu_redis.Channel, exchange: str) -> dict[str, str]:
    return {channel.keyprefix_queue % (exchange,): "set", channel.keyprefix_binding_permanent % (exchange,): "set"}


def _unacked_keys(channel: kombu_redis.Channel) -> dict[str, str]:
    return {
        channel.unacked_key: "hash",
        channel.unacked_index_key: "zset",
        channel.unacked_mutex_key: "string",
    }


def _with_repair(channel: kombu_redis.Channel, keys: Callable[[], dict[str, str]], run: Callable[[], T]) -> T:
    """``run()``; on WRONGTYPE, quarantine the wrong-typed ``keys()`` and run it once more."""
    try:
        return run()
    except channel.ResponseError as error:
        if not is_wrongtype(error):
            raise
        with channel.conn_or_acquire() as client:
            if not quarantine_wrong_types(client, keys()):
                raise  # the wrong type is somewhere we do not manage: fail as kombu would
        return run()


class QoS(kombu_redis.QoS):
    """Delivery bookkeeping (``unacked``, ``unacked_index``, ``unacked_mutex``) that repairs wrong-typed keys."""

    _checked = False

    def _keys(self) -> dict[str, str]:
        return _unacked_keys(self.channel)

    def append(self, message: Any, delivery_tag: Any) -> None:
        _with_repair(self.channel, self._keys, lambda: super(QoS, self).append(message, delivery_tag))

    def ack(self, delivery_tag: Any) -> None:
        _with_repair(self.channel, self._keys, lambda: super(QoS, self).ack(delivery_tag))

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        _with_repair(self.channel, self._keys, lambda: super(QoS, self).reject(delivery_tag, requeue))

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        if not self._checked:
            # A list where the mutex should be makes every restore think another worker holds the lock (no error,
            # messages of dead workers never restored): only a type check finds that, once per channel.
            with self.channel.conn_or_acquire() as client:
                quarantine_wrong_types(client, self._keys())
            self._checked = True
        _with_repair(self.channel, self._keys, lambda: super(QoS, self).restore_visible(start, num, interval))

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        _with_repair(self.channel, self._keys, lambda: super(QoS, self).restore_by_tag(tag, client, leftmost))


class Channel(kombu_redis.Channel):
    """Exchange bindings (``_kombu.binding.<exchange>``) and queue lists that repair wrong-typed keys."""

    QoS = QoS

    def _queue_keys(self, queues: list[str]) -> dict[str, str]:
        return {self._q_for_pri(queue, step): "list" for queue in queues for step in self.priority_steps}

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        publish = super()._put
        _with_repair(self, lambda: self._queue_keys([queue]), lambda: publish(queue, message, **kwargs))

    def _get(self, queue: str) -> Any:
        return _with_repair(self, lambda: self._queue_keys([queue]), lambda: super(Channel, self)._get(queue))

    def _size(self, queue: str) -> int:
        return _with_repair(self, lambda: self._queue_keys([queue]), lambda: super(Channel, self)._size(queue))

    def _brpop_read(self, **options: Any) -> Any:
        """The blocking read of the consumed queues: a queue key of another type fails the whole BRPOP, so every
        consumed queue's keys are checked, the wrong ones moved aside, and the loop simply polls again."""
        try:
            return super()._brpop_read(**options)
        except self.ResponseError as error:
            if not is_wrongtype(error):
                raise
            with self.conn_or_acquire() as client:
                if not quarantine_wrong_types(client, self._queue_keys(list(self.active_queues))):
                    raise
            raise Empty() from error

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        _with_repair(
            self,
            lambda: binding_keys(self, exchange),
            lambda: super(Channel, self)._queue_bind(exchange, routing_key, pattern, queue),
        )

    def get_table(self, exchange: str) -> list[tuple[str, ...]]:
        return _with_repair(
            self, lambda: binding_keys(self, exchange), lambda: super(Channel, self).get_table(exchange)
        )


class Transport(kombu_redis.Transport):
    Channel = Channel
