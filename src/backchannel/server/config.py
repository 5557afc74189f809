"""Configuration: every setting is a command-line flag and a ``BACKCHANNEL_*`` variable.

:class:`Settings` is the one place settings are declared. The CLI builds ``backchannel serve``'s
flags from it, and ``docs/configuration.md`` lists the same table (a test keeps them in step).
Precedence: flag, then environment variable, then default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..core.channels import Retention
from ..core.errors import InvalidRequest
from ..core.hub import Limits
from ..core.jobqueue import JobLimits

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8000, "HTTP port to listen on (0 picks a free one)")
    data_dir: str = _setting(
        "backchannel-data", "folder for the embedded store's files, used when no store URL is given"
    )
    store: str = _setting(
        "",
        "store URL: sqlite:///relative/file.db, sqlite:////absolute/file.db or memory://; "
        "empty means backchannel.db in the data dir",
    )
    sqlite_synchronous: str = _setting(
        "normal",
        "SQLite durability: normal survives a crash of the hub process, full also a power loss",
        choices=("normal", "full"),
    )
    retention_count: int = _setting(
        10_000, "messages a channel keeps at most, unless set per channel"
    )
    retention_age: float = _setting(
        86_400.0, "seconds a message is kept at most, unless set per channel"
    )
    idempotency_ttl: float = _setting(86_400.0, "seconds an Idempotency-Key is remembered")
    max_message_bytes: int = _setting(1_048_576, "largest message body accepted (413 above)")
    default_limit: int = _setting(100, "messages per poll answer when the request gives no limit")
    max_limit: int = _setting(1000, "largest limit a poll may ask for (400 above)")
    max_read_bytes: int = _setting(
        4_194_304, "message bytes per poll answer, past which the answer stops early"
    )
    max_wait: float = _setting(60.0, "longest wait a long poll may ask for, in seconds (400 above)")
    max_long_polls: int = _setting(10_000, "long polls waiting at once (503 above)")
    sweep_interval: float = _setting(60.0, "seconds between deletions of expired messages")
    max_outbound_bytes: int = _setting(
        1_048_576,
        "bytes a push subscriber may fall behind before it is disconnected as a slow consumer",
    )
    max_coalesce_delay: float = _setting(
        0.005,
        "seconds, at most, a busy hub holds pushed messages so that one write carries several "
        "(0: write every message at once)",
    )
    job_attempts: int = _setting(3, "attempts a job gets, unless its submit says otherwise")
    job_lease: float = _setting(30.0, "seconds a claim leases a job for, unless it says otherwise")
    job_max_lease: float = _setting(600.0, "longest lease a claim or heartbeat may ask for")
    job_retention: float = _setting(86_400.0, "seconds a finished job and its result are kept")
    job_max_batch: int = _setting(
        1000, "jobs in one batch submit, batch claim (max=) or batch of results (413 above)"
    )
    job_max_batch_bytes: int = _setting(
        16_777_216, "largest body of a batch submit, batch of results or job watch (413 above)"
    )
    job_max_watch: int = _setting(10_000, "jobs one event stream of many jobs may follow")
    max_subscriptions: int = _setting(
        1000, "channels one WebSocket or TCP connection may subscribe to at once"
    )
    sse_heartbeat: float = _setting(15.0, "seconds of silence after which a stream gets a comment")
    sse_retry: float = _setting(2.0, "seconds a browser waits before reconnecting (SSE retry:)")
    allowed_origins: str = _setting(
        "",
        "comma-separated origins whose browser pages may open WebSockets and event streams "
        "(* for any); same-origin pages are always allowed",
    )
    direct_writes: bool = _setting(
        True,
        "under uvicorn, write pushed SSE chunks and WebSocket frames straight to the "
        "connection instead of through ASGI send (same bytes, less CPU per message)",
    )
    tcp: bool = _setting(True, "serve the raw TCP protocol")
    tcp_port: int = _setting(7000, "TCP port for the binary protocol (0 picks a free one)")
    log_level: str = _setting("info", "log level", choices=LOG_LEVELS)
    access_log: bool = _setting(False, "log every request (costs throughput)")

    @staticmethod
    def env_name(name: str) -> str:
        return "BACKCHANNEL_" + name.upper()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``BACKCHANNEL_*`` variables, then ``overrides``. Raises ``ValueError``
        naming the variable when one does not parse."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(cls.env_name(f.name))
            if raw is not None:
                values[f.name] = parse_value(f.name, raw)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number")
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, not {value!r}")
        positive = (
            "retention_count",
            "max_message_bytes",
            "default_limit",
            "max_limit",
            "max_read_bytes",
            "max_long_polls",
            "retention_age",
            "idempotency_ttl",
            "sweep_interval",
            "max_outbound_bytes",
            "max_subscriptions",
            "sse_heartbeat",
            "job_lease",
            "job_max_lease",
            "job_retention",
            "job_max_batch",
            "job_max_batch_bytes",
            "job_max_watch",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.max_coalesce_delay <= 1:
            raise ValueError("max_coalesce_delay must be between 0 and 1 second")
        if self.max_wait < 0:
            raise ValueError("max_wait must not be negative")
        if self.retention_age < 1:
            raise ValueError("retention_age must be at least 1 second")
        try:
            self.retention  # noqa: B018 - checks the bounds of the retention settings
        except InvalidRequest as exc:
            raise ValueError(f"retention_count or retention_age: {exc.detail}") from None
        if not 1 <= self.job_attempts <= 100:
            raise ValueError("job_attempts must be between 1 and 100")
        if not 1 <= self.job_lease <= self.job_max_lease:
            raise ValueError("job_lease must be at least 1 second and at most job_max_lease")
        if self.default_limit > self.max_limit:
            raise ValueError("default_limit must not exceed max_limit")
        for name in ("port", "tcp_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be between 0 and 65535")
        if self.sse_retry < 0:
            raise ValueError("sse_retry must not be negative")

    @property
    def store_url(self) -> str:
        if self.store:
            return self.store
        return "sqlite:///" + os.path.join(self.data_dir, "backchannel.db")

    @property
    def retention(self) -> Retention:
        return Retention(max_count=self.retention_count, max_age_ms=int(self.retention_age * 1000))

    @property
    def limits(self) -> Limits:
        return Limits(
            max_message_bytes=self.max_message_bytes,
            default_limit=self.default_limit,
            max_limit=self.max_limit,
            max_read_bytes=self.max_read_bytes,
            max_wait=self.max_wait,
            max_long_polls=self.max_long_polls,
            sweep_interval=self.sweep_interval,
            max_outbound_bytes=self.max_outbound_bytes,
            max_coalesce_delay=self.max_coalesce_delay,
        )

    @property
    def job_limits(self) -> JobLimits:
        return JobLimits(
            max_payload_bytes=self.max_message_bytes,
            default_attempts=self.job_attempts,
            default_lease=self.job_lease,
            max_lease=self.job_max_lease,
            max_wait=self.max_wait,
            retention=self.job_retention,
            max_waiting=self.max_long_polls,
            max_batch=self.job_max_batch,
            max_watch=self.job_max_watch,
        )

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(
            o.strip().rstrip("/") for o in self.allowed_origins.split(",") if o.strip()
        )


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_value(name: str, raw: str) -> Any:
    """Parse ``raw`` as the type of setting ``name``."""
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{Settings.env_name(name)}={raw!r} is not a valid {kind}") from None
    return raw
