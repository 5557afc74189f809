"""The shared store: one Redis server (or anything speaking its protocol) behind many hub nodes.

Every change is one Lua script, so it is atomic across every process using the same Redis: an
append allocates the channel's next sequence number, checks the idempotency key, writes the
message, trims by count and publishes a notification in one step that no other node can
interleave with. Scripts run with EVALSHA and are loaded again when Redis answers NOSCRIPT (after
a restart or SCRIPT FLUSH).

Keys, all under ``<prefix>:`` so that several hubs or tests can share one Redis (channel and
queue names cannot contain ``|``, which separates a name from an idempotency key)::

    c:<channel>          hash    seq (last sequence number), time (last time), count, age
    m:<channel>          stream  one entry per retained message, id "<seq>-0",
                                 fields t (time_ms), c (content type), d (data)
    i:<channel>|<key>    hash    s, t, d (digest), x (expiry): an idempotency key
    channels             set     every channel name, for trim
    j:<id>               hash    v (version), doc (the job, see _encode_job)
    jq:<queue>           zset    queued jobs by created_ms (ties by id)
    jr:<queue>, jr       zset    running jobs by lease expiry, per queue and all queues
    jf                   zset    finished jobs by updated_ms, for job_trim
    jk:<queue>|<key>     hash    id, x (expiry): a job idempotency key
    notify               pub/sub channel of every append and job change

The message log is a Redis stream because its entry ids sort numerically, so the sequence
number can be the id: ``XRANGE`` reads after a cursor in O(log n), ``XTRIM MINID`` applies count
retention, and the stream keeps its last id when trimmed empty. The sequence number itself lives
in the channel's hash, so it is never reused even if the stream key is deleted. Idempotency keys
and job keys carry their expiry for the hub's clock (``now_ms``) and a Redis TTL of the same
length, so Redis drops them itself; ``trim`` deletes messages hidden by age.

Listeners. Each store holds one pub/sub connection subscribed to ``<prefix>:notify``, and every
append and job change publishes the new message or job on it, from inside the script. So every
node hears every change, its own included, in the order Redis ran the scripts, and only through
pub/sub: a node never calls its listeners for its own append a second time. Pub/sub is at most
once: when the link drops, notifications sent meanwhile are lost. When the link is back (the
server confirms the subscription again), the store calls its resync listeners, which read what
they may have missed from the store (see :mod:`backchannel.core.fanout`).

Redis commands are never retried by the client library: a retried append whose reply was lost
would append twice. A command that fails on the connection raises
:class:`~backchannel.core.errors.Unavailable`, which the server answers with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..core.channels import Retention
from ..core.errors import IdempotencyKeyReused, Unavailable
from ..core.jobs import Job, JobState
from ..core.messages import Appended, ChannelStats, Draft, Message
from ..core.store import JobListener, Listener, ResyncListener
from .base import DEFAULT_IDEMPOTENCY_TTL_MS, DEFAULT_RETENTION, shown_url

log = logging.getLogger("backchannel.store.redis")

DEFAULT_PREFIX = "backchannel"
_PREFIX = re.compile(r"[A-Za-z0-9_\-.:@]{1,100}")
#: Connection defaults, each overridable in the URL's query (redis-py's names).
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_POOL_TIMEOUT = 10.0  # seconds a command waits for a free connection
DEFAULT_SOCKET_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds between attempts to get the pub/sub link back.
RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)
#: Ids handed to one script call at most (trim, job trim).
SCRIPT_BATCH = 500

# -- Lua ----------------------------------------------------------------------------------------
# Numbers: Lua 5.1 numbers are doubles, exact to 2**53; times in ms and sequence numbers stay far
# below. Strings made from them use %d, never tostring, which would switch to exponents.

# The smallest seq in [lo, hi] whose message is not older than `oldest`, or hi + 1. Messages are
# contiguous from the oldest kept to hi and their times never decrease, so a missing entry
# (trimmed) counts as too old and a binary search is exact.
_FIRST_LIVE = """
local function first_live(stream, lo, hi, oldest)
  local function live(seq)
    local found = redis.call('XRANGE', stream, string.format('%d-0', seq),
                             string.format('%d-0', seq))
    return #found > 0 and tonumber(found[1][2][2]) >= oldest
  end
  if lo > hi then return hi + 1 end
  if live(lo) then return lo end
  local bad, good = lo, hi + 1
  while good - bad > 1 do
    local mid = math.floor((bad + good) / 2)
    if live(mid) then good = mid else bad = mid end
  end
  return good
end
local function policy(meta, default_count, default_age)
  return tonumber(meta[2]) or tonumber(default_count), tonumber(meta[3]) or tonumber(default_age)
end
"""

# KEYS: meta, stream, idempotency key hash (or the meta key again when there is none), channels
# ARGV: channel, now_ms, content type, data, has key (0/1), digest, key ttl ms, default count,
#       notify channel
_APPEND = """
local meta, stream, ikey = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[2])
if ARGV[5] == '1' then
  local earlier = redis.call('HMGET', ikey, 's', 't', 'd', 'x')
  if earlier[1] and tonumber(earlier[4]) > now then
    if earlier[3] ~= ARGV[6] then return {-1} end
    return {1, tonumber(earlier[1]), tonumber(earlier[2])}
  end
end
local state = redis.call('HMGET', meta, 'time', 'count')
local time = now
if state[1] and tonumber(state[1]) > now then time = tonumber(state[1]) end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
local seq_s, time_s = string.format('%d', seq), string.format('%d', time)
redis.call('HSET', meta, 'time', time_s)
redis.call('XADD', stream, seq_s .. '-0', 't', time_s, 'c', ARGV[3], 'd', ARGV[4])
local count = tonumber(state[2]) or tonumber(ARGV[8])
if seq > count then
  redis.call('XTRIM', stream, 'MINID', string.format('%d-0', seq - count + 1))
end
if ARGV[5] == '1' then
  redis.call('HSET', ikey, 's', seq_s, 't', time_s, 'd', ARGV[6],
             'x', string.format('%d', now + tonumber(ARGV[7])))
  redis.call('PEXPIRE', ikey, ARGV[7])
end
if seq == 1 then redis.call('SADD', KEYS[4], ARGV[1]) end
redis.call('PUBLISH', ARGV[9], 'm' .. seq_s .. ' ' .. time_s .. ' ' .. #ARGV[1] .. ' ' ..
           #ARGV[3] .. '\\n' .. ARGV[1] .. ARGV[3] .. ARGV[4])
return {0, seq, time}
"""

# KEYS: meta, stream. ARGV: after, limit, max bytes, now_ms, default count, default age.
# Returns seq, time, content type, data, seq, ... for the messages to hand out.
_READ = (
    _FIRST_LIVE
    + """
local meta = redis.call('HMGET', KEYS[1], 'seq', 'count', 'age')
local last = tonumber(meta[1])
if not last then return {} end
local count, age = policy(meta, ARGV[5], ARGV[6])
local lo = math.max(tonumber(ARGV[1]) + 1, last - count + 1)
local start = first_live(KEYS[2], lo, last, tonumber(ARGV[4]) - age)
if start > last then return {} end
local entries = redis.call('XRANGE', KEYS[2], string.format('%d-0', start), '+',
                           'COUNT', tonumber(ARGV[2]))
local out, size, budget = {}, 0, tonumber(ARGV[3])
for _, entry in ipairs(entries) do
  local f = entry[2]
  size = size + #f[6]
  if #out > 0 and size > budget then break end
  out[#out + 1] = tonumber(string.match(entry[1], '^(%d+)'))
  out[#out + 1] = tonumber(f[2])
  out[#out + 1] = f[4]
  out[#out + 1] = f[6]
end
return out
"""
)

# KEYS: meta, stream. ARGV: now_ms, default count, default age. Returns last, first, retained.
_STATS = (
    _FIRST_LIVE
    + """
local meta = redis.call('HMGET', KEYS[1], 'seq', 'count', 'age')
local last = tonumber(meta[1]) or 0
local count, age = policy(meta, ARGV[2], ARGV[3])
local first = first_live(KEYS[2], math.max(1, last - count + 1), last, tonumber(ARGV[1]) - age)
return {last, first, last - first + 1}
"""
)

# KEYS: meta, stream, channels. ARGV: channel, count or '', age or '', default count.
_SET_RETENTION = """
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], 'count')
else redis.call('HSET', KEYS[1], 'count', ARGV[2]) end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], 'age')
else redis.call('HSET', KEYS[1], 'age', ARGV[3]) end
redis.call('SADD', KEYS[3], ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local count = tonumber(ARGV[2]) or tonumber(ARGV[4])
if last and last > count then
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', last - count + 1))
end
return 0
"""

# KEYS: meta, stream. ARGV: now_ms, default count, default age. Returns messages deleted.
_TRIM = (
    _FIRST_LIVE
    + """
local meta = redis.call('HMGET', KEYS[1], 'seq', 'count', 'age')
local last = tonumber(meta[1])
if not last then return 0 end
local count, age = policy(meta, ARGV[2], ARGV[3])
local first = first_live(KEYS[2], math.max(1, last - count + 1), last, tonumber(ARGV[1]) - age)
return redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', first))
"""
)

# Index upkeep shared by job create and update. KEYS[2..5]: jq:<queue>, jr:<queue>, jr, jf.
_JOB_INDEX = """
local function index(id, state, created, lease, updated)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZREM', KEYS[5], id)
  if state == 'queued' then
    redis.call('ZADD', KEYS[2], created, id)
  elseif state == 'running' then
    redis.call('ZADD', KEYS[3], lease, id)
    redis.call('ZADD', KEYS[4], lease, id)
  else
    redis.call('ZADD', KEYS[5], updated, id)
  end
end
"""

# KEYS: job, jq, jr:q, jr, jf, job key hash (or the job key again when there is none).
# ARGV: id, version, state, created, lease expiry, updated, doc, has key, key ttl, now, notify,
#       job key prefix
# Returns {0} when stored, {1, doc} for the job an idempotency key already names.
_JOB_CREATE = (
    _JOB_INDEX
    + """
if ARGV[8] == '1' then
  local earlier = redis.call('HMGET', KEYS[6], 'id', 'x')
  if earlier[1] and tonumber(earlier[2]) > tonumber(ARGV[10]) then
    local doc = redis.call('HGET', ARGV[12] .. earlier[1], 'doc')
    if doc then return {1, doc} end
  end
  redis.call('HSET', KEYS[6], 'id', ARGV[1],
             'x', string.format('%d', tonumber(ARGV[10]) + tonumber(ARGV[9])))
  redis.call('PEXPIRE', KEYS[6], ARGV[9])
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'doc', ARGV[7])
index(ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
redis.call('PUBLISH', ARGV[11], 'j' .. ARGV[7])
return {0}
"""
)

# KEYS: job, jq, jr:q, jr, jf. ARGV: id, version, state, created, lease expiry, updated, doc,
# the version stored now must have, notify. Returns 1 when stored, 0 when the version moved on.
_JOB_UPDATE = (
    _JOB_INDEX
    + """
local stored = redis.call('HGET', KEYS[1], 'v')
if not stored or stored ~= ARGV[8] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'doc', ARGV[7])
index(ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
redis.call('PUBLISH', ARGV[9], 'j' .. ARGV[7])
return 1
"""
)

# KEYS: jq, jr:q. ARGV: job key prefix, now, limit. Queued docs oldest first, then 0, then the
# docs of running jobs whose lease has expired.
_JOB_CANDIDATES = """
local out = {}
local limit = tonumber(ARGV[3])
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, limit - 1)) do
  local doc = redis.call('HGET', ARGV[1] .. id, 'doc')
  if doc then out[#out + 1] = doc end
end
out[#out + 1] = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, limit)) do
  local doc = redis.call('HGET', ARGV[1] .. id, 'doc')
  if doc then out[#out + 1] = doc end
end
return out
"""

# KEYS: jr. ARGV: job key prefix, now, limit.
_JOB_EXPIRED = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2],
                               'LIMIT', 0, tonumber(ARGV[3]))) do
  local doc = redis.call('HGET', ARGV[1] .. id, 'doc')
  if doc then out[#out + 1] = doc end
end
return out
"""

# KEYS: jf. ARGV: job key prefix, cutoff (updated before it), batch. Returns how many went.
_JOB_TRIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2],
                       'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('DEL', ARGV[1] .. id)
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"""


# -- encodings ----------------------------------------------------------------------------------

_JOB_BYTES = ("payload", "progress", "result")


def _encode_job(job: Job) -> bytes:
    """The job as one string: a JSON header line, then its byte fields one after the other (the
    header gives their lengths; -1 for None)."""
    header: dict[str, Any] = {
        "id": job.id,
        "queue": job.queue,
        "state": job.state.value,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created_ms": job.created_ms,
        "updated_ms": job.updated_ms,
        "version": job.version,
        "error": job.error,
        "lease": job.lease,
        "lease_expires_ms": job.lease_expires_ms,
        "cancel_requested": job.cancel_requested,
    }
    parts: list[bytes] = []
    lengths: list[int] = []
    for name in _JOB_BYTES:
        value: bytes | None = getattr(job, name)
        lengths.append(-1 if value is None else len(value))
        if value is not None:
            parts.append(value)
    header["lengths"] = lengths
    return orjson.dumps(header) + b"\n" + b"".join(parts)


def _decode_job(doc: bytes) -> Job:
    line, _, rest = doc.partition(b"\n")
    header: dict[str, Any] = orjson.loads(line)
    at = 0
    for name, length in zip(_JOB_BYTES, header.pop("lengths"), strict=True):
        if length < 0:
            header[name] = None
        else:
            header[name] = rest[at : at + length]
            at += length
    header["state"] = JobState(header["state"])
    return Job(**header)


def _decode_message(payload: bytes) -> Message:
    """A message from its notification (see _APPEND): ``<seq> <time> <len channel> <len content
    type>\\n<channel><content type><data>``."""
    line, _, rest = payload.partition(b"\n")
    seq, time_ms, channel_len, type_len = map(int, line.split(b" "))
    return Message(
        channel=rest[:channel_len].decode(),
        seq=seq,
        time_ms=time_ms,
        content_type=rest[channel_len : channel_len + type_len].decode(),
        data=rest[channel_len + type_len :],
    )


def _job_args(job: Job) -> list[Any]:
    lease = job.lease_expires_ms if job.lease_expires_ms is not None else 2**52
    return [job.id, job.version, job.state.value, job.created_ms, lease, job.updated_ms]


class _Script:
    """A Lua script run with EVALSHA, loaded again when Redis answers NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha: str | None = None

    async def __call__(
        self, client: aioredis.Redis, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        if self.sha is None:
            self.sha = await client.script_load(self.source)
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


class RedisStore:
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        retention: Retention = DEFAULT_RETENTION,
        idempotency_ttl_ms: int = DEFAULT_IDEMPOTENCY_TTL_MS,
    ) -> None:
        if _PREFIX.fullmatch(prefix) is None:
            raise ValueError(f"{prefix!r} is not a key prefix: use 1 to 100 of A-Z a-z 0-9 _-.:@")
        self.url = url
        self.prefix = prefix
        self.default_retention = retention
        self.idempotency_ttl_ms = idempotency_ttl_ms
        self._p = prefix + ":"
        self._notify = self._p + "notify"
        self._channels_key = self._p + "channels"
        self._listeners: list[Listener] = []
        self._job_listeners: list[JobListener] = []
        self._resync_listeners: list[ResyncListener] = []
        self._client: aioredis.Redis | None = None
        self._listening: asyncio.Task[None] | None = None
        self._linked = False  # is the pub/sub link subscribed now?
        self._subscribed = asyncio.Event()
        self._scripts = {
            name: _Script(source)
            for name, source in (
                ("append", _APPEND),
                ("read", _READ),
                ("stats", _STATS),
                ("set_retention", _SET_RETENTION),
                ("trim", _TRIM),
                ("job_create", _JOB_CREATE),
                ("job_update", _JOB_UPDATE),
                ("job_candidates", _JOB_CANDIDATES),
                ("job_expired", _JOB_EXPIRED),
                ("job_trim", _JOB_TRIM),
            )
        }

    # -- life cycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        options: dict[str, Any] = {
            "max_connections": DEFAULT_MAX_CONNECTIONS,
            "timeout": DEFAULT_POOL_TIMEOUT,
            "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
            "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),  # never retried: see the module's docstring
        }
        if not self.url.startswith("unix:"):
            options["socket_keepalive"] = True  # TCP only
        # Options in the URL's query win over these defaults (redis-py applies them last).
        pool = aioredis.BlockingConnectionPool.from_url(self.url, **options)
        client = aioredis.Redis(connection_pool=pool)
        self._client = client
        self._subscribed = asyncio.Event()
        try:
            await client.ping()
            self._listening = asyncio.get_running_loop().create_task(
                self._listen_forever(client), name="backchannel-redis-listener"
            )
            # Appends made once open() returns must reach this store's own listeners.
            await asyncio.wait_for(self._subscribed.wait(), DEFAULT_CONNECT_TIMEOUT * 2)
        except (RedisError, OSError, TimeoutError) as exc:
            await self.close()
            raise Unavailable(f"cannot reach Redis at {shown_url(self.url)}: {exc}") from None

    async def close(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
        client, self._client = self._client, None
        self._linked = False
        if client is not None:
            await client.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        client = self._live()
        if not self._linked:
            raise Unavailable("the Redis pub/sub link is down; reconnecting")
        await self._run(client.ping())

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_job_listener(self, listener: JobListener) -> None:
        self._job_listeners.append(listener)

    def add_resync_listener(self, listener: ResyncListener) -> None:
        self._resync_listeners.append(listener)

    def _live(self) -> aioredis.Redis:
        if self._client is None:
            raise Unavailable("the Redis store is closed")
        return self._client

    async def _run(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except ResponseError as exc:
            # Refusals such as OOM or READONLY: not the caller's fault either.
            log.error("Redis refused a command: %s", exc)
            raise Unavailable(f"Redis refused the command: {exc}") from None
        except (RedisError, OSError) as exc:  # redis-py's connection errors are RedisErrors
            await self._forget_idle_connections()
            raise Unavailable(f"Redis does not answer: {exc}") from None

    async def _forget_idle_connections(self) -> None:
        """Close the pool's idle connections. After Redis restarted, each of them is dead but
        does not know it yet; the first command on each would fail. Fresh ones are opened as
        needed."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.connection_pool.disconnect(inuse_connections=False)

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._run(self._scripts[name](self._live(), keys, args))

    # -- the pub/sub link ---------------------------------------------------------------------

    async def _listen_forever(self, client: aioredis.Redis) -> None:
        """Hear every notification; get the link back whenever it drops, then resync."""
        failures = 0
        ever = False
        while True:
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._notify)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    kind = message["type"]
                    if kind == "message":
                        self._dispatch(message["data"])
                    elif kind == "subscribe":
                        # Also seen when redis-py reconnected and subscribed again by itself.
                        self._linked = True
                        failures = 0
                        self._subscribed.set()
                        if ever:
                            await self._forget_idle_connections()
                            self._resync()
                        ever = True
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            except Exception as exc:
                self._linked = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                if failures == 1:
                    log.warning("Redis pub/sub link lost (%s); reconnecting", exc)
                await asyncio.sleep(delay)

    def _dispatch(self, payload: bytes) -> None:
        try:
            if payload[:1] == b"m":
                message = _decode_message(payload[1:])
                batch = [message]
                for listener in self._listeners:
                    listener(message.channel, batch)
            elif payload[:1] == b"j":
                job = _decode_job(payload[1:])
                for job_listener in self._job_listeners:
                    job_listener(job)
        except Exception:
            log.exception("a notification could not be handled")

    def _resync(self) -> None:
        log.warning("Redis pub/sub link is back; catching up from the store")
        for listener in self._resync_listeners:
            try:
                listener()
            except Exception:
                log.exception("a resync listener failed")

    # -- keys ---------------------------------------------------------------------------------

    def _meta(self, channel: str) -> str:
        return f"{self._p}c:{channel}"

    def _stream(self, channel: str) -> str:
        return f"{self._p}m:{channel}"

    def _defaults(self) -> tuple[int, int]:
        policy = self.default_retention
        return policy.max_count, policy.max_age_ms

    # -- messages -----------------------------------------------------------------------------

    async def append(self, channel: str, draft: Draft, *, now_ms: int) -> Appended:
        meta = self._meta(channel)
        key = draft.idempotency_key
        ikey = f"{self._p}i:{channel}|{key}" if key is not None else meta
        found = await self._script(
            "append",
            [meta, self._stream(channel), ikey, self._channels_key],
            [
                channel,
                now_ms,
                draft.content_type,
                draft.data,
                0 if key is None else 1,
                draft.digest,
                self.idempotency_ttl_ms,
                self.default_retention.max_count,
                self._notify,
            ],
        )
        if found[0] == -1:
            raise IdempotencyKeyReused(f"Idempotency-Key {key!r} was used for a different message")
        message = Message(
            channel=channel,
            seq=int(found[1]),
            time_ms=int(found[2]),
            content_type=draft.content_type,
            data=draft.data,
        )
        return Appended(message, replayed=found[0] == 1)

    async def read(
        self, channel: str, *, after: int, limit: int, max_bytes: int, now_ms: int
    ) -> list[Message]:
        flat = await self._script(
            "read",
            [self._meta(channel), self._stream(channel)],
            [after, limit, max_bytes, now_ms, *self._defaults()],
        )
        return [
            Message(
                channel=channel,
                seq=int(flat[i]),
                time_ms=int(flat[i + 1]),
                content_type=flat[i + 2].decode(),
                data=flat[i + 3],
            )
            for i in range(0, len(flat), 4)
        ]

    async def stats(self, channel: str, *, now_ms: int) -> ChannelStats:
        last, first, retained = await self._script(
            "stats", [self._meta(channel), self._stream(channel)], [now_ms, *self._defaults()]
        )
        return ChannelStats(last_seq=int(last), first_seq=int(first), retained=int(retained))

    async def get_retention(self, channel: str) -> Retention:
        count, age = await self._run(self._live().hmget(self._meta(channel), ["count", "age"]))
        return self.default_retention.override(
            None if count is None else int(count), None if age is None else int(age)
        )

    async def set_retention(
        self, channel: str, *, max_count: int | None, max_age_ms: int | None
    ) -> None:
        await self._script(
            "set_retention",
            [self._meta(channel), self._stream(channel), self._channels_key],
            [
                channel,
                "" if max_count is None else max_count,
                "" if max_age_ms is None else max_age_ms,
                self.default_retention.max_count,
            ],
        )

    async def trim(self, *, now_ms: int) -> int:
        client = self._live()
        removed = 0
        cursor: int = 0
        while True:
            cursor, names = await self._run(
                client.sscan(self._channels_key, cursor, count=SCRIPT_BATCH)
            )
            for raw in names:
                channel = raw.decode()
                removed += int(
                    await self._script(
                        "trim",
                        [self._meta(channel), self._stream(channel)],
                        [now_ms, *self._defaults()],
                    )
                )
            if cursor == 0:
                return removed

    # -- jobs ---------------------------------------------------------------------------------

    def _job_keys(self, job: Job) -> list[str]:
        p = self._p
        return [f"{p}j:{job.id}", f"{p}jq:{job.queue}", f"{p}jr:{job.queue}", f"{p}jr", f"{p}jf"]

    async def job_create(
        self, job: Job, *, idempotency_key: str | None, now_ms: int
    ) -> tuple[Job, bool]:
        keys = self._job_keys(job)
        key_hash = (
            keys[0] if idempotency_key is None else f"{self._p}jk:{job.queue}|{idempotency_key}"
        )
        found = await self._script(
            "job_create",
            [*keys, key_hash],
            [
                *_job_args(job),
                _encode_job(job),
                0 if idempotency_key is None else 1,
                self.idempotency_ttl_ms,
                now_ms,
                self._notify,
                f"{self._p}j:",
            ],
        )
        if found[0] == 1:
            return _decode_job(found[1]), True
        return job, False

    async def job_get(self, job_id: str) -> Job | None:
        doc = await self._run(self._live().hget(f"{self._p}j:{job_id}", "doc"))
        return None if doc is None else _decode_job(doc)

    async def job_update(self, job: Job) -> bool:
        stored = await self._script(
            "job_update",
            self._job_keys(job),
            [*_job_args(job), _encode_job(job), job.version - 1, self._notify],
        )
        return bool(stored)

    async def job_candidates(self, queue: str, *, now_ms: int, limit: int) -> list[Job]:
        docs = await self._script(
            "job_candidates",
            [f"{self._p}jq:{queue}", f"{self._p}jr:{queue}"],
            [f"{self._p}j:", now_ms, limit],
        )
        split = docs.index(0)
        queued = [_decode_job(doc) for doc in docs[:split]]
        expired = sorted(
            (_decode_job(doc) for doc in docs[split + 1 :]), key=lambda j: (j.created_ms, j.id)
        )
        return (queued + expired)[:limit]

    async def job_expired(self, *, now_ms: int, limit: int) -> list[Job]:
        docs = await self._script("job_expired", [f"{self._p}jr"], [f"{self._p}j:", now_ms, limit])
        return [_decode_job(doc) for doc in docs]

    async def job_trim(self, *, now_ms: int, keep_ms: int) -> int:
        removed = 0
        while True:
            batch = int(
                await self._script(
                    "job_trim", [f"{self._p}jf"], [f"{self._p}j:", now_ms - keep_ms, SCRIPT_BATCH]
                )
            )
            removed += batch
            if batch < SCRIPT_BATCH:
                return removed
