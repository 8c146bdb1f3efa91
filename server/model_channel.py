"""Model-update channel on Redis: ``lma publish`` records a new bundle version, every replica hot-swaps.

Publishing (:func:`publish`) verifies the bundle first (:func:`export.bundle.load_bundle`: its
signature when trusted keys are given, format version, sizes, sha256), so a bad bundle is refused
before anyone hears of it. Replicas verify again on their own (with their ``LMA_TRUSTED_KEYS``):
the announcement is a hint where to look, never a reason to trust. Then, in one MULTI/EXEC, it
records the version and announces it:

- ``lma:models`` (set): every published model name;
- ``lma:models:<name>`` (hash): the current version, ``{name, version, path, published_at}``;
- ``lma:models:<name>:history`` (list, newest first, the last :data:`HISTORY_LENGTH`): JSON records;
- ``PUBLISH lma:model-updates <JSON record>``.

``path`` is the bundle folder as an absolute path: replicas must see the same path (a shared volume,
or the same image layout).

:class:`ModelUpdateSubscriber` runs in each server replica. It subscribes, then reads the recorded
current version of every model and applies those it has not applied yet (so a replica started later,
or one that was cut off from Redis while a version was announced, still ends on the current
version), then applies each announcement as it arrives, one at a time, by awaiting
``on_update(name, path)`` (the server's registry swap). When Redis goes away it reconnects with
exponential backoff and reads the current versions again. A failing ``on_update`` is logged and the
subscriber carries on: the registry reports a refused version itself (metric, log) and keeps the
old one serving.

Example::

    subscriber = ModelUpdateSubscriber("redis://127.0.0.1:6379/0", registry_callback(registry))
    await subscriber.start()        # or: task = asyncio.create_task(subscriber.run()); task.cancel()
    ...
    await subscriber.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from export.bundle import NAME_PATTERN
from server.redis_store import redact_url

log = logging.getLogger(__name__)

CHANNEL = "lma:model-updates"
NAMES_KEY = "lma:models"
HISTORY_LENGTH = 100

OnUpdate = Callable[[str, str], Awaitable[object]]  # (model name, bundle path) -> awaited

if TYPE_CHECKING:
    from export.signing import TrustedKeys
    from server.registry import ModelRegistry


def current_key(name: str) -> str:
    return f"{NAMES_KEY}:{name}"


def history_key(name: str) -> str:
    return f"{NAMES_KEY}:{name}:history"


@dataclass(frozen=True)
class ModelUpdate:
    """One published version: the announcement on the channel and the record in Redis."""

    name: str
    version: str
    path: str  # absolute path of the bundle folder
    published_at: float  # seconds since the epoch, of the publisher's clock

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_hash(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "path": self.path, "published_at": repr(self.published_at)}

    @classmethod
    def from_mapping(cls, d: Any, where: str) -> ModelUpdate:
        """Parse a JSON object or a Redis hash; a ValueError names ``where`` and what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        missing = [k for k in ("name", "version", "path", "published_at") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        name, version, path = d["name"], d["version"], d["path"]
        if not all(isinstance(v, str) and v for v in (name, version, path)):
            raise ValueError(
                f"{where}: name, version and path must be non-empty strings, got {name!r}, {version!r}, {path!r}"
            )
        if not NAME_PATTERN.match(name):
            raise ValueError(f"{where}: invalid model name {name!r} (a name matches {NAME_PATTERN.pattern})")
        if "\x00" in path or not Path(path).is_absolute():
            raise ValueError(f"{where}: path must be an absolute path without NUL bytes, got {path!r}")
        try:
            published_at = float(d["published_at"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: published_at must be a number, got {d['published_at']!r}") from None
        return cls(name, version, path, published_at)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> ModelUpdate:
        try:
            d = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        return cls.from_mapping(d, where)


# ----------------------------------------------------------------------------------------------
# Publisher


def publish(
    redis_url: str, artifact_dir: str | Path, *, trust: TrustedKeys | None = None, now: float | None = None
) -> tuple[ModelUpdate, int]:
    """Verify the bundle at ``artifact_dir``, record it as its model's current version and announce it.

    Args:
        redis_url: the Redis of the model-update channel.
        artifact_dir: a bundle folder, or a model's folder of versions (its latest is published).
        trust: the keys one of which must have signed the bundle; None: checksums only.
        now: the ``published_at`` to record (default: the time now).

    Returns:
        The record, and how many subscribers received the announcement (replicas listening now).

    Raises:
        SignatureError: ``trust`` is given and the bundle is not what one of its keys signed.
        BundleError: the bundle is refused (nothing is recorded or announced).
        ValueError: Redis cannot be reached.
    """
    from export.bundle import load_bundle, resolve_bundle

    bundle = load_bundle(resolve_bundle(artifact_dir), trust)
    update = ModelUpdate(bundle.name, bundle.version, str(bundle.path.resolve()), time.time() if now is None else now)
    client = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=10)
    try:
        # One MULTI/EXEC: a replica that hears the announcement reads the record it announces.
        pipe = client.pipeline(transaction=True)
        pipe.sadd(NAMES_KEY, update.name)
        pipe.hset(current_key(update.name), mapping=update.to_hash())  # type: ignore[arg-type]
        pipe.lpush(history_key(update.name), update.to_json())
        pipe.ltrim(history_key(update.name), 0, HISTORY_LENGTH - 1)
        pipe.publish(CHANNEL, update.to_json())
        receivers = int(pipe.execute()[-1])
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise ValueError(f"Redis at {redact_url(redis_url)}: {e}") from None
    finally:
        client.close()
    log.info("published %s version %s (%s) to %d subscribers", update.name, update.version, update.path, receivers)
    return update, receivers


def read_current(redis_url: str) -> dict[str, ModelUpdate]:
    """The recorded current version of every published model (synchronous; for tools and tests)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=10, decode_responses=True)
    try:
        names = sorted(str(n) for n in client.smembers(NAMES_KEY))  # type: ignore[union-attr]
        return {name: ModelUpdate.from_mapping(client.hgetall(current_key(name)), current_key(name)) for name in names}
    finally:
        client.close()


# ----------------------------------------------------------------------------------------------
# Subscriber


def registry_callback(registry: ModelRegistry) -> OnUpdate:
    """``on_update`` for a server: swap the registry to the announced bundle, unless it serves it already.

    A replica that loaded the current version from its model folder at start-up hears of that same
    version when it subscribes; reloading it would cost a load and a warm-up for nothing.
    """

    async def on_update(name: str, path: str) -> None:
        bundle_path = Path(path)
        if name in registry and registry.get(name).bundle.path.resolve() == bundle_path.resolve():
            log.info("model-update channel: %s already serves %s", name, path)
            return
        await registry.swap(name, bundle_path, reason="publish")  # logs, counts and keeps the old one on failure

    return on_update


class ModelUpdateSubscriber:
    """Background task that applies published model versions to this replica (see the module docstring).

    Args:
        redis_url: Redis URL (``redis://``, ``rediss://``, ``unix://``), as redis-py reads it.
        on_update: awaited with (name, bundle path) for each version to apply, one at a time.
        backoff_s: first wait before reconnecting; doubles (with jitter) up to ``max_backoff_s``.
        ping_interval_s: after this long without a message, PING Redis; no answer within another
            interval counts as a lost connection (catches peers that vanish without closing the socket).

    Attributes:
        connected: an ``asyncio.Event`` set while subscribed and caught up with the recorded versions.
        connects: how many times it has subscribed and caught up (1 after start, +1 per reconnect).
    """

    def __init__(
        self,
        redis_url: str,
        on_update: OnUpdate,
        *,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        ping_interval_s: float = 5.0,
    ) -> None:
        if not 0 < backoff_s <= max_backoff_s:
            raise ValueError(f"need 0 < backoff_s <= max_backoff_s, got {backoff_s} and {max_backoff_s}")
        if not ping_interval_s > 0:
            raise ValueError(f"ping_interval_s must be > 0, got {ping_interval_s}")
        self.url = redis_url
        self.where = redact_url(redis_url)
        self.on_update = on_update
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.ping_interval_s = ping_interval_s
        self.connected = asyncio.Event()
        self.connects = 0
        self._applied: dict[str, ModelUpdate] = {}  # name -> the last record handed to on_update
        self._task: asyncio.Task[None] | None = None

    @property
    def applied(self) -> dict[str, ModelUpdate]:
        """The last record applied (or tried) per model name."""
        return dict(self._applied)

    async def start(self) -> None:
        """Start the background task (returns at once; ``connected`` tells when it has caught up)."""
        if self._task is not None:
            raise RuntimeError("the model-update subscriber is already running")
        self._task = asyncio.create_task(self.run(), name="lma-model-updates")

    async def stop(self) -> None:
        """Cancel the task and wait for it (an ``on_update`` in progress is cancelled with it)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # stop() itself was cancelled
        self.connected.clear()

    async def __aenter__(self) -> ModelUpdateSubscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self) -> None:
        """Subscribe and apply updates until cancelled (what :meth:`start` runs as a task)."""
        delay = self.backoff_s
        while True:
            connects = self.connects
            try:
                await self._session()
            except (redis.RedisError, OSError, TimeoutError) as e:
                if self.connects > connects:
                    delay = self.backoff_s  # it had been working: start the backoff over
                log.warning("model-update channel: Redis at %s: %s; reconnecting in %.2f s", self.where, e, delay)
            except Exception:  # never let one surprise end the updates of this replica
                log.exception("model-update channel: unexpected error; reconnecting in %.2f s", delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.max_backoff_s)

    async def _session(self) -> None:
        """One connection's life: subscribe, catch up, then apply announcements until the connection fails."""
        # No retries inside redis-py: its PubSub would reconnect and resubscribe silently, and the
        # versions announced while it was away would be lost. Failures come here; we catch up.
        # No socket_timeout: with one, redis-py sends through asyncio.wait_for, which on Python
        # 3.11 can swallow a cancellation (stop() would then hang); every wait below has its own
        # deadline instead. Replies stay bytes: with decode_responses, redis-py 8 takes a RESP3
        # "PONG" for a subscribe confirmation and drops it, and the PING below would go unanswered.
        client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.ping_interval_s,
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),
            client_name="lma-model-updates",
        )
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(self.ping_interval_s):
                await pubsub.subscribe(CHANNEL)
                current = await self._read_current(client)  # after SUBSCRIBE: nothing can slip by
            await self._catch_up(current)
            self.connects += 1
            self.connected.set()
            log.info("model-update channel: subscribed to %s at %s", CHANNEL, self.where)
            awaiting_pong = False
            while True:
                message = await pubsub.get_message(timeout=self.ping_interval_s)
                if message is None:
                    if awaiting_pong:
                        raise TimeoutError(f"no answer to PING within {self.ping_interval_s:g} s")
                    await pubsub.ping()
                    awaiting_pong = True
                    continue
                awaiting_pong = False
                if message["type"] == "message":
                    try:
                        update = ModelUpdate.from_json(message["data"], f"message on {CHANNEL}")
                    except ValueError as e:
                        log.error("model-update channel: ignored a message: %s", e)
                        continue
                    await self._apply(update)
        finally:
            self.connected.clear()
            # Closing must not hang on a dead peer, and a cancelled stop() must still close.
            with contextlib.suppress(redis.RedisError, OSError, TimeoutError):
                await asyncio.shield(_close(pubsub, client))

    @staticmethod
    async def _read_current(client: aioredis.Redis) -> list[tuple[str, dict[bytes, bytes]]]:
        """Every published name and its current-version record, in one round trip after SMEMBERS.

        What another client wrote wrong (a member that is not UTF-8, a name whose key is not a hash, a
        ``lma:models`` that is not a set) is logged and skipped: it must not keep the other models from
        updating, and reconnecting would only read it again.
        """
        try:
            members = await client.smembers(NAMES_KEY)  # type: ignore[misc]
        except redis.ResponseError as e:
            log.error("model-update channel: cannot read the published names from %s: %s", NAMES_KEY, e)
            return []
        names = []
        for member in sorted(members):
            try:
                names.append(member.decode() if isinstance(member, bytes) else member)
            except UnicodeDecodeError:
                log.error("model-update channel: ignored a member of %s that is not UTF-8: %r", NAMES_KEY, member)
        if not names:
            return []
        async with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(current_key(name))
            records = await pipe.execute(raise_on_error=False)
        current = []
        for name, record in zip(names, records, strict=True):
            if isinstance(record, redis.ResponseError):
                log.error("model-update channel: ignored %s: %s", current_key(name), record)
            elif record:
                current.append((name, record))
        return current

    async def _catch_up(self, current: list[tuple[str, dict[bytes, bytes]]]) -> None:
        """Apply each model's recorded current version that this subscriber has not applied."""
        for name, record in current:
            try:
                update = ModelUpdate.from_mapping(_decoded(record), current_key(name))
            except (UnicodeDecodeError, ValueError) as e:
                log.error("model-update channel: ignored a record: %s", e)
                continue
            await self._apply(update)

    async def _apply(self, update: ModelUpdate) -> None:
        if self._applied.get(update.name) == update:
            return  # heard twice (the announcement and the record read on connect)
        self._applied[update.name] = update
        log.info("model-update channel: applying %s version %s from %s", update.name, update.version, update.path)
        try:
            await self.on_update(update.name, update.path)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("model-update channel: applying %s version %s failed", update.name, update.version)


async def _close(pubsub: aioredis.client.PubSub, client: aioredis.Redis) -> None:
    async with asyncio.timeout(1.0):
        await pubsub.aclose()
        await client.aclose()


def _decoded(record: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in record.items()}
