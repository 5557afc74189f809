"""The embedded store: one SQLite file in WAL mode, written by one thread with group commit.

Writes (appends, retention changes, trims, job changes) go to a single writer thread through a
queue. The thread takes everything queued, applies it in one transaction and commits once, so
many concurrent publishes share one commit. Only then are the callers' futures resolved and the
listeners told: a publish is acknowledged after its transaction is in the WAL file. With
``synchronous=normal`` (the default) that survives a crash or ``kill -9`` of the process;
``synchronous=full`` also fsyncs each commit, which survives a power loss, at the cost of one
fsync per batch.

Reads run on a small pool of threads, each with its own connection. WAL lets them read the
last commit while the writer writes.

The writer keeps each channel's id, last sequence number and last time in memory, which is
only right while it is the only writer: :meth:`SQLiteStore.open` takes an exclusive lock on
``<file>.lock`` and refuses to open a database another process has open.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from ..core.channels import Retention
from ..core.errors import BackchannelError, IdempotencyKeyReused, Unavailable
from ..core.jobs import Job, JobState
from ..core.messages import Appended, ChannelStats, Draft, Message
from ..core.store import Change, JobListener, Listener, ResyncListener, Take
from .base import DEFAULT_IDEMPOTENCY_TTL_MS, DEFAULT_RETENTION

log = logging.getLogger("backchannel.store.sqlite")

# 2 added the job tables. Every statement of the schema is CREATE ... IF NOT EXISTS (or DROP ...
# IF EXISTS), so running it on an older file upgrades it in place. The job indexes were replaced
# later (jobs_waiting and jobs_lease by the partial jobs_queued and jobs_leased) without a new
# version: the rows are the same, and whichever code opens the file makes the indexes it needs.
SCHEMA_VERSION = 2
MAX_BATCH = 1024
# Ids per IN (...) list: below SQLite's oldest limit on bound parameters (999).
_IN_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL UNIQUE,
    last_seq     INTEGER NOT NULL DEFAULT 0,
    last_time_ms INTEGER NOT NULL DEFAULT 0,
    max_count    INTEGER,
    max_age_ms   INTEGER
);
CREATE TABLE IF NOT EXISTS messages (
    channel_id   INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    time_ms      INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    data         BLOB    NOT NULL,
    PRIMARY KEY (channel_id, seq)
);
CREATE TABLE IF NOT EXISTS idempotency (
    channel_id   INTEGER NOT NULL,
    key          TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    time_ms      INTEGER NOT NULL,
    digest       BLOB    NOT NULL,
    expires_ms   INTEGER NOT NULL,
    PRIMARY KEY (channel_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_ms);
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT    NOT NULL PRIMARY KEY,
    queue            TEXT    NOT NULL,
    state            TEXT    NOT NULL,
    payload          BLOB    NOT NULL,
    attempts         INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    created_ms       INTEGER NOT NULL,
    updated_ms       INTEGER NOT NULL,
    version          INTEGER NOT NULL,
    progress         BLOB,
    result           BLOB,
    error            TEXT,
    lease            TEXT,
    lease_expires_ms INTEGER,
    cancel_requested INTEGER NOT NULL
);
DROP INDEX IF EXISTS jobs_waiting;
DROP INDEX IF EXISTS jobs_lease;
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (queue, created_ms) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_expires_ms) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS job_keys (
    queue        TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    job_id       TEXT    NOT NULL,
    expires_ms   INTEGER NOT NULL,
    PRIMARY KEY (queue, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_keys_expiry ON job_keys (expires_ms);
"""

_READ = """
SELECT m.seq, m.time_ms, m.content_type, m.data
FROM channels AS c JOIN messages AS m ON m.channel_id = c.id
WHERE c.name = ?
  AND m.seq > max(?, c.last_seq - COALESCE(c.max_count, ?))
  AND m.time_ms >= ? - COALESCE(c.max_age_ms, ?)
ORDER BY m.seq
LIMIT ?
"""

_STATS = """
SELECT c.last_seq, count(m.seq), min(m.seq)
FROM channels AS c LEFT JOIN messages AS m
  ON m.channel_id = c.id
  AND m.seq > c.last_seq - COALESCE(c.max_count, ?)
  AND m.time_ms >= ? - COALESCE(c.max_age_ms, ?)
WHERE c.name = ?
GROUP BY c.id
"""


# The order of _job_values and _job_from_row.
_JOB_FIELDS = (
    "id",
    "queue",
    "state",
    "payload",
    "attempts",
    "max_attempts",
    "created_ms",
    "updated_ms",
    "version",
    "progress",
    "result",
    "error",
    "lease",
    "lease_expires_ms",
    "cancel_requested",
)
_JOB_COLUMNS = ", ".join(_JOB_FIELDS)
_JOB_INSERT = f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({', '.join('?' * len(_JOB_FIELDS))})"
# Sets every column but the id: takes _job_values(job)[1:], then the id and the version the
# stored row must still have.
_JOB_UPDATE = (
    "UPDATE jobs SET "
    + ", ".join(f"{field} = ?" for field in _JOB_FIELDS[1:])
    + " WHERE id = ? AND version = ?"
)
# A key whose job was trimmed finds nothing: the key is free again.
_JOB_BY_KEY = f"""
SELECT {_JOB_COLUMNS} FROM jobs
WHERE id = (SELECT job_id FROM job_keys WHERE queue = ? AND key = ? AND expires_ms > ?)
"""

# Each half is limited on its own so that it stops early: the queued half walks jobs_queued
# in order, the expired half reads only the leases that ran out (from jobs_leased, which holds
# running jobs only) instead of every running job of the queue. The outer query puts them one
# after the other in a single statement, so both halves read the same snapshot. Jobs created in
# the same millisecond (a batch) go in the order they were stored: rowid, which an index keeps
# after its columns.
_JOB_CANDIDATES = f"""
SELECT {_JOB_COLUMNS} FROM (
    SELECT 0 AS expired, rowid AS stored, * FROM (
        SELECT rowid, * FROM jobs INDEXED BY jobs_queued WHERE state = 'queued' AND queue = ?
        ORDER BY created_ms, rowid LIMIT ?
    )
    UNION ALL
    SELECT 1 AS expired, rowid AS stored, * FROM (
        SELECT rowid, * FROM jobs INDEXED BY jobs_leased
        WHERE state = 'running' AND lease_expires_ms <= ? AND queue = ?
        ORDER BY created_ms, rowid LIMIT ?
    )
)
ORDER BY expired, created_ms, stored
LIMIT ?
"""

_JOB_TRIM = f"""
DELETE FROM jobs
WHERE state IN ({", ".join(f"'{state.value}'" for state in JobState if state.finished)})
  AND updated_ms < ?
"""


def _job_values(job: Job) -> tuple[Any, ...]:
    """The job as the values of ``_JOB_FIELDS``, in that order."""
    return (
        job.id,
        job.queue,
        job.state.value,
        job.payload,
        job.attempts,
        job.max_attempts,
        job.created_ms,
        job.updated_ms,
        job.version,
        job.progress,
        job.result,
        job.error,
        job.lease,
        job.lease_expires_ms,
        int(job.cancel_requested),
    )


_STATES = {state.value: state for state in JobState}


def _job_from_row(row: tuple[Any, ...]) -> Job:
    """The job from a row of ``_JOB_FIELDS``."""
    (
        job_id,
        queue_name,
        state,
        payload,
        attempts,
        max_attempts,
        created_ms,
        updated_ms,
        version,
        progress,
        result,
        error,
        lease,
        lease_expires_ms,
        cancel_requested,
    ) = row
    return Job(
        id=job_id,
        queue=queue_name,
        state=_STATES[state],
        payload=bytes(payload),
        attempts=attempts,
        max_attempts=max_attempts,
        created_ms=created_ms,
        updated_ms=updated_ms,
        version=version,
        progress=None if progress is None else bytes(progress),
        result=None if result is None else bytes(result),
        error=error,
        lease=lease,
        lease_expires_ms=lease_expires_ms,
        cancel_requested=bool(cancel_requested),
    )


def _jobs_by_id(conn: sqlite3.Connection, job_ids: Sequence[str]) -> dict[str, Job]:
    found: dict[str, Job] = {}
    unique = list(dict.fromkeys(job_ids))
    for start in range(0, len(unique), _IN_CHUNK):
        chunk = unique[start : start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id IN ({marks})", chunk):
            job = _job_from_row(row)
            found[job.id] = job
    return found


def _jobs_by_key(
    conn: sqlite3.Connection, keys: Sequence[tuple[str, str]], now_ms: int
) -> dict[tuple[str, str], Job]:
    """The jobs of live idempotency keys among ``keys`` (a key whose job is gone is free)."""
    found: dict[tuple[str, str], Job] = {}
    by_queue: dict[str, list[str]] = {}
    for queue_name, key in dict.fromkeys(keys):
        by_queue.setdefault(queue_name, []).append(key)
    for queue_name, wanted in by_queue.items():
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            query = (
                f"SELECT k.key, {', '.join('j.' + name for name in _JOB_FIELDS)} "
                "FROM job_keys AS k JOIN jobs AS j ON j.id = k.job_id "
                f"WHERE k.queue = ? AND k.expires_ms > ? AND k.key IN ({marks})"
            )
            for key, *row in conn.execute(query, (queue_name, now_ms, *chunk)):
                found[(queue_name, key)] = _job_from_row(tuple(row))
    return found


class StoreLocked(Unavailable):
    pass


@dataclass
class _ChannelRow:
    id: int
    last_seq: int
    last_time_ms: int
    max_count: int | None
    max_age_ms: int | None


@dataclass
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


class SQLiteStore:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention: Retention = DEFAULT_RETENTION,
        idempotency_ttl_ms: int = DEFAULT_IDEMPOTENCY_TTL_MS,
        synchronous: Literal["normal", "full"] = "normal",
        readers: int = 4,
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError("synchronous must be 'normal' or 'full'")
        self.path = os.fspath(path)
        self.default_retention = retention
        self.idempotency_ttl_ms = idempotency_ttl_ms
        self.synchronous = synchronous
        self._readers = readers
        self._listeners: list[Listener] = []
        self._job_listeners: list[JobListener] = []
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Owned by the writer thread only: the channel cache, and the channels the batch being
        # applied has changed.
        self._channels: dict[str, _ChannelRow] = {}
        self._touched: dict[str, _ChannelRow] = {}
        self._appended: dict[str, list[Message]] = {}
        self._created: list[str] = []  # channels the operation being applied created
        self._jobs_changed: list[Job] = []  # jobs the operation being applied stored

    # -- life cycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        self._loop = asyncio.get_running_loop()
        conn = await asyncio.to_thread(self._prepare)
        self._channels = {}
        self._writer = threading.Thread(
            target=self._write_forever, args=(conn,), name="backchannel-sqlite-writer", daemon=True
        )
        self._writer.start()
        self._executor = ThreadPoolExecutor(
            self._readers, thread_name_prefix="backchannel-sqlite-read"
        )

    def _take_lock(self) -> None:
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreLocked(
                f"{self.path} is in use by {holder}: only one hub process may use a SQLite file"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _prepare(self) -> sqlite3.Connection:
        """Create the folder, take the lock, open the writer's connection and the schema."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._take_lock()
        try:
            conn = _connect(self.path, self.synchronous)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                conn.close()
                raise Unavailable(
                    f"{self.path} was written by a newer backchannel (schema {version}); upgrade"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            self._release_lock()
            raise
        return conn

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._ops.put(None)
        await asyncio.to_thread(writer.join)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        self._local = threading.local()
        self._release_lock()

    async def ping(self) -> None:
        if self._writer is None or not self._writer.is_alive():
            raise Unavailable("the SQLite writer is not running")
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_resync_listener(self, listener: ResyncListener) -> None:
        """Never called: this store loses no notification."""

    def add_job_listener(self, listener: JobListener) -> None:
        self._job_listeners.append(listener)

    # -- the writer thread --------------------------------------------------------------------

    async def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._writer is None or self._loop is None:
            raise Unavailable("the SQLite store is closed")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._ops.put(_Op(fn, future))
        return await future

    def _write_forever(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._ops.get()
                if first is None:
                    break
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        op = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if op is None:
                        stop = True
                        break
                    batch.append(op)
                self._run_batch(conn, batch)
                if stop:
                    break
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        outcomes: list[tuple[_Op, Any, BaseException | None]] = []
        touched: dict[str, _ChannelRow] = {}
        self._touched = touched
        appended: dict[str, list[Message]] = {}
        self._appended = appended
        # Kept per operation and added here only once it succeeded: listeners must not hear of
        # a change its savepoint took back.
        jobs_changed: list[Job] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                # A savepoint per operation: one that fails takes only its own writes back,
                # not those of the other callers sharing the commit.
                conn.execute("SAVEPOINT op")
                self._created = []
                self._jobs_changed = []
                try:
                    result = op.fn(conn)
                except BackchannelError as exc:  # refused before writing anything
                    outcomes.append((op, None, exc))
                except Exception as exc:
                    log.exception("a write failed; only its own operation is refused")
                    conn.execute("ROLLBACK TO op")
                    # Channel rows it created are gone with the savepoint: forget them too,
                    # or their ids would be handed to the next new channel.
                    for name in self._created:
                        self._channels.pop(name, None)
                        touched.pop(name, None)
                    outcomes.append((op, None, Unavailable(f"the store could not write: {exc}")))
                else:
                    outcomes.append((op, result, None))
                    jobs_changed.extend(self._jobs_changed)
                conn.execute("RELEASE op")
            for row in touched.values():
                conn.execute(
                    "UPDATE channels SET last_seq = ?, last_time_ms = ? WHERE id = ?",
                    (row.last_seq, row.last_time_ms, row.id),
                )
                max_count = row.max_count or self.default_retention.max_count
                conn.execute(
                    "DELETE FROM messages WHERE channel_id = ? AND seq <= ?",
                    (row.id, row.last_seq - max_count),
                )
            conn.execute("COMMIT")
        except Exception as exc:
            log.exception("SQLite transaction failed; %d operations refused", len(batch))
            if conn.in_transaction:
                conn.rollback()
            self._channels.clear()  # the cache ran ahead of the database: reload it
            failure = Unavailable(f"the store could not write: {exc}")
            outcomes = [(op, None, failure) for op in batch]
            appended = {}
            jobs_changed = []
        assert self._loop is not None
        notify = list(appended.items())
        self._loop.call_soon_threadsafe(self._deliver, outcomes, notify, jobs_changed)

    def _deliver(
        self,
        outcomes: list[tuple[_Op, Any, BaseException | None]],
        notify: list[tuple[str, list[Message]]],
        jobs_changed: list[Job],
    ) -> None:
        for op, result, error in outcomes:
            if op.future.done():
                continue
            if error is None:
                op.future.set_result(result)
            else:
                op.future.set_exception(error)
        for channel, messages in notify:
            for listener in self._listeners:
                listener(channel, messages)
        for job in jobs_changed:
            for job_listener in self._job_listeners:
                job_listener(job)

    def _channel(self, conn: sqlite3.Connection, name: str) -> _ChannelRow:
        row = self._channels.get(name)
        if row is not None:
            return row
        found = conn.execute(
            "SELECT id, last_seq, last_time_ms, max_count, max_age_ms FROM channels WHERE name = ?",
            (name,),
        ).fetchone()
        if found is None:
            cursor = conn.execute("INSERT INTO channels (name) VALUES (?)", (name,))
            assert cursor.lastrowid is not None
            found = (cursor.lastrowid, 0, 0, None, None)
            self._created.append(name)
        row = _ChannelRow(*found)
        self._channels[name] = row
        return row

    # -- writes -------------------------------------------------------------------------------

    async def append(self, channel: str, draft: Draft, *, now_ms: int) -> Appended:
        def run(conn: sqlite3.Connection) -> Appended:
            row = self._channel(conn, channel)
            key = draft.idempotency_key
            if key is not None:
                earlier = conn.execute(
                    "SELECT seq, time_ms, digest FROM idempotency "
                    "WHERE channel_id = ? AND key = ? AND expires_ms > ?",
                    (row.id, key, now_ms),
                ).fetchone()
                if earlier is not None:
                    if earlier[2] != draft.digest:
                        raise IdempotencyKeyReused(
                            f"Idempotency-Key {key!r} was used for a different message"
                        )
                    message = Message(
                        channel=channel,
                        seq=earlier[0],
                        time_ms=earlier[1],
                        content_type=draft.content_type,
                        data=draft.data,
                    )
                    return Appended(message, replayed=True)
            seq = row.last_seq + 1
            time_ms = max(now_ms, row.last_time_ms)
            conn.execute(
                "INSERT INTO messages (channel_id, seq, time_ms, content_type, data) "
                "VALUES (?, ?, ?, ?, ?)",
                (row.id, seq, time_ms, draft.content_type, draft.data),
            )
            if key is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency "
                    "(channel_id, key, seq, time_ms, digest, expires_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    (row.id, key, seq, time_ms, draft.digest, now_ms + self.idempotency_ttl_ms),
                )
            row.last_seq = seq
            row.last_time_ms = time_ms
            self._touched[channel] = row
            message = Message(
                channel=channel,
                seq=seq,
                time_ms=time_ms,
                content_type=draft.content_type,
                data=draft.data,
            )
            self._appended.setdefault(channel, []).append(message)
            return Appended(message)

        result: Appended = await self._write(run)
        return result

    async def set_retention(
        self, channel: str, *, max_count: int | None, max_age_ms: int | None
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            row = self._channel(conn, channel)
            conn.execute(
                "UPDATE channels SET max_count = ?, max_age_ms = ? WHERE id = ?",
                (max_count, max_age_ms, row.id),
            )
            row.max_count = max_count
            row.max_age_ms = max_age_ms
            self._touched[channel] = row  # trims to the new max_count in this transaction

        await self._write(run)

    async def trim(self, *, now_ms: int) -> int:
        default_age = self.default_retention.max_age_ms
        default_count = self.default_retention.max_count

        def run(conn: sqlite3.Connection) -> int:
            removed = 0
            channels = conn.execute(
                "SELECT name, id, last_seq, max_count, max_age_ms FROM channels"
            ).fetchall()
            for name, channel_id, last_seq, max_count, max_age_ms in channels:
                cached = self._channels.get(name)  # ahead of the table within a batch
                newest = cached.last_seq if cached is not None else last_seq
                cursor = conn.execute(
                    "DELETE FROM messages WHERE channel_id = ? AND (time_ms < ? OR seq <= ?)",
                    (
                        channel_id,
                        now_ms - (max_age_ms or default_age),
                        newest - (max_count or default_count),
                    ),
                )
                removed += cursor.rowcount
            conn.execute("DELETE FROM idempotency WHERE expires_ms <= ?", (now_ms,))
            return removed

        removed: int = await self._write(run)
        return removed

    # -- reads --------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, self.synchronous)
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        executor = self._executor
        if executor is None or self._loop is None:
            raise Unavailable("the SQLite store is closed")
        return await self._loop.run_in_executor(executor, lambda: fn(self._reader()))

    async def read(
        self, channel: str, *, after: int, limit: int, max_bytes: int, now_ms: int
    ) -> list[Message]:
        default_age = self.default_retention.max_age_ms
        default_count = self.default_retention.max_count

        def run(conn: sqlite3.Connection) -> list[Message]:
            out: list[Message] = []
            size = 0
            for seq, time_ms, content_type, data in conn.execute(
                _READ, (channel, after, default_count, now_ms, default_age, limit)
            ):
                size += len(data)
                if out and size > max_bytes:
                    break
                out.append(
                    Message(
                        channel=channel,
                        seq=seq,
                        time_ms=time_ms,
                        content_type=content_type,
                        data=bytes(data),
                    )
                )
            return out

        result: list[Message] = await self._read(run)
        return result

    async def stats(self, channel: str, *, now_ms: int) -> ChannelStats:
        default_age = self.default_retention.max_age_ms
        default_count = self.default_retention.max_count

        def run(conn: sqlite3.Connection) -> ChannelStats:
            found = conn.execute(_STATS, (default_count, now_ms, default_age, channel)).fetchone()
            if found is None:
                return ChannelStats(last_seq=0, first_seq=1, retained=0)
            last_seq, retained, first_seq = found
            first = first_seq if retained else last_seq + 1
            return ChannelStats(last_seq=last_seq, first_seq=first, retained=retained)

        result: ChannelStats = await self._read(run)
        return result

    async def get_retention(self, channel: str) -> Retention:
        def run(conn: sqlite3.Connection) -> tuple[int | None, int | None] | None:
            found: tuple[int | None, int | None] | None = conn.execute(
                "SELECT max_count, max_age_ms FROM channels WHERE name = ?", (channel,)
            ).fetchone()
            return found

        found = await self._read(run)
        if found is None:
            return self.default_retention
        return self.default_retention.override(*found)

    # -- jobs ---------------------------------------------------------------------------------

    async def job_create(
        self, job: Job, *, idempotency_key: str | None, now_ms: int
    ) -> tuple[Job, bool]:
        def run(conn: sqlite3.Connection) -> tuple[Job, bool]:
            if idempotency_key is not None:
                earlier = conn.execute(_JOB_BY_KEY, (job.queue, idempotency_key, now_ms)).fetchone()
                if earlier is not None:
                    return _job_from_row(earlier), True
                conn.execute(
                    "INSERT OR REPLACE INTO job_keys (queue, key, job_id, expires_ms) "
                    "VALUES (?, ?, ?, ?)",
                    (job.queue, idempotency_key, job.id, now_ms + self.idempotency_ttl_ms),
                )
            conn.execute(_JOB_INSERT, _job_values(job))
            self._jobs_changed.append(job)
            return job, False

        result: tuple[Job, bool] = await self._write(run)
        return result

    async def job_create_many(
        self, items: Sequence[tuple[Job, str | None]], *, now_ms: int
    ) -> list[tuple[Job, bool]]:
        expires = now_ms + self.idempotency_ttl_ms

        def run(conn: sqlite3.Connection) -> list[tuple[Job, bool]]:
            made: list[tuple[Job, bool]] = []
            new: list[Job] = []
            # The jobs of keys used before (one query per queue and 500 keys), then of keys used
            # earlier in this batch.
            earlier = _jobs_by_key(conn, [(job.queue, key) for job, key in items if key], now_ms)
            keyed: dict[tuple[str, str], Job] = {}  # keys of this batch: their rows wait below
            for job, key in items:
                if key is not None:
                    first = earlier.get((job.queue, key))
                    if first is not None:
                        made.append((first, True))
                        continue
                    keyed[(job.queue, key)] = earlier[(job.queue, key)] = job
                made.append((job, False))
                new.append(job)
            conn.executemany(
                "INSERT OR REPLACE INTO job_keys (queue, key, job_id, expires_ms) "
                "VALUES (?, ?, ?, ?)",
                [(queue, key, job.id, expires) for (queue, key), job in keyed.items()],
            )
            conn.executemany(_JOB_INSERT, [_job_values(job) for job in new])
            self._jobs_changed.extend(new)
            return made

        result: list[tuple[Job, bool]] = await self._write(run)
        return result

    async def job_update(self, job: Job) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            # Compare-and-set: the row changes only if it is still the version this one follows,
            # which an earlier operation of the same batch may already have moved on.
            cursor = conn.execute(_JOB_UPDATE, (*_job_values(job)[1:], job.id, job.version - 1))
            if cursor.rowcount != 1:
                return False
            self._jobs_changed.append(job)
            return True

        updated: bool = await self._write(run)
        return updated

    async def job_update_many(self, jobs: Sequence[Job]) -> list[bool]:
        def run(conn: sqlite3.Connection) -> list[bool]:
            done: list[bool] = []
            for job in jobs:
                values = _job_values(job)
                cursor = conn.execute(_JOB_UPDATE, (*values[1:], job.id, job.version - 1))
                done.append(cursor.rowcount == 1)
                if cursor.rowcount == 1:
                    self._jobs_changed.append(job)
            return done

        updated: list[bool] = await self._write(run)
        return updated

    async def job_claim(self, queue: str, *, now_ms: int, count: int, take: Take) -> list[Job]:
        limit = count + 15  # more than asked: an expired lease may end its job instead

        def run(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                _JOB_CANDIDATES, (queue, limit, now_ms, queue, limit, limit)
            ).fetchall()
            stored: list[Job] = []
            running = 0
            for row in rows:
                if running == count:
                    break
                changed = take(_job_from_row(row))
                if changed is not None:
                    stored.append(changed)
                    running += changed.state is JobState.RUNNING
            # Read and written in this one transaction: every compare-and-set holds.
            self._update_rows(conn, stored)
            return stored

        result: list[Job] = await self._write(run)
        return result

    async def job_change_many(self, job_ids: Sequence[str], change: Change) -> list[Job | None]:
        def run(conn: sqlite3.Connection) -> list[Job | None]:
            current = _jobs_by_id(conn, job_ids)
            out: list[Job | None] = []
            for i, job_id in enumerate(job_ids):
                changed = change(i, current.get(job_id))
                if changed is not None:
                    current[job_id] = changed  # the same id again sees this version
                out.append(changed)
            self._update_rows(conn, [job for job in out if job is not None])
            return out

        result: list[Job | None] = await self._write(run)
        return result

    def _update_rows(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        """Store versions computed from rows this transaction read (writer thread only)."""
        rows = [(*_job_values(job)[1:], job.id, job.version - 1) for job in jobs]
        cursor = conn.executemany(_JOB_UPDATE, rows)
        if cursor.rowcount != len(rows):  # the writer is the only one: this is a bug
            raise RuntimeError(f"{len(rows) - cursor.rowcount} job rows changed under the writer")
        self._jobs_changed.extend(jobs)

    async def job_trim(self, *, now_ms: int, keep_ms: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(_JOB_TRIM, (now_ms - keep_ms,))
            conn.execute("DELETE FROM job_keys WHERE expires_ms <= ?", (now_ms,))
            return cursor.rowcount

        removed: int = await self._write(run)
        return removed

    async def job_get(self, job_id: str) -> Job | None:
        def run(conn: sqlite3.Connection) -> Job | None:
            found = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            return None if found is None else _job_from_row(found)

        result: Job | None = await self._read(run)
        return result

    async def job_get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        found: dict[str, Job] = await self._read(lambda conn: _jobs_by_id(conn, job_ids))
        return [found.get(job_id) for job_id in job_ids]

    async def job_candidates(self, queue: str, *, now_ms: int, limit: int) -> list[Job]:
        def run(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                _JOB_CANDIDATES, (queue, limit, now_ms, queue, limit, limit)
            ).fetchall()
            return [_job_from_row(row) for row in rows]

        result: list[Job] = await self._read(run)
        return result

    async def job_expired(self, *, now_ms: int, limit: int) -> list[Job]:
        def run(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs "
                "WHERE state = 'running' AND lease_expires_ms <= ? "
                "ORDER BY lease_expires_ms, rowid LIMIT ?",
                (now_ms, limit),
            ).fetchall()
            return [_job_from_row(row) for row in rows]

        result: list[Job] = await self._read(run)
        return result
