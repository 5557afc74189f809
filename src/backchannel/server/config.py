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
from urllib.parse import urlsplit

from ..core.channels import Retention
from ..core.errors import InvalidRequest
from ..core.hub import Limits
from ..core.jobqueue import JobLimits
from ..store import REDIS_SCHEMES

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
MAX_WORKERS = 64


def _setting(
    default: Any, help: str, *, choices: tuple[str, ...] | None = None, secret: bool = False
) -> Any:
    # A secret stays out of repr(), so that logging the settings cannot leak it.
    return field(default=default, repr=not secret, metadata={"help": help, "choices": choices})


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = _setting(
        "127.0.0.1",
        "address to listen on; any but a loopback address needs auth configured, or --insecure",
    )
    port: int = _setting(8000, "HTTP port to listen on (0 picks a free one)")
    data_dir: str = _setting(
        "backchannel-data", "folder for the embedded store's files, used when no store URL is given"
    )
    store: str = _setting(
        "",
        "store URL: sqlite:///relative/file.db, sqlite:////absolute/file.db, memory://, or "
        "redis://host:port/db?prefix=NAME (also rediss://, unix:///path?db=N&prefix=NAME) for a "
        "store shared by several hub processes; empty means backchannel.db in the data dir",
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
    slow_consumer_grace: float = _setting(
        5.0,
        "seconds a push connection cut as a slow consumer has to read what the hub already "
        "sent and then its goodbye (WebSocket close 4008, TCP slow-consumer error, end of the "
        "event stream) before it is dropped (0: drop at once)",
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
        "connection instead of through ASGI send (same bytes, less CPU per message), and hand "
        "started event streams' connections to the fan-out engine (less memory per subscriber)",
    )
    ws_echo: bool = _setting(
        False,
        "serve the WebSocket /v1/echo, which sends every message back unchanged (for "
        "conformance testing and debugging)",
    )
    header_timeout: float = _setting(
        10.0,
        "seconds a client has to send a request's line and headers (a TCP client: its HELLO) "
        "before the hub answers 408 and closes",
    )
    max_header_bytes: int = _setting(
        16_384, "bytes of request target and header lines a request may have (431 above)"
    )
    max_connections: int = _setting(
        0,
        "open connections of every transport at once; past it new ones get 503 (TCP: an "
        "ERROR frame). 0: the open file limit less 128",
    )
    listen_backlog: int = _setting(
        4096,
        "connections (per port) the kernel holds until the hub accepts them; a burst of new "
        "connections beyond it waits a second or more for the client's SYN to be sent again. "
        "Linux caps it at net.core.somaxconn",
    )
    tcp: bool = _setting(True, "serve the raw TCP protocol")
    tcp_port: int = _setting(7000, "TCP port for the binary protocol (0 picks a free one)")
    workers: int = _setting(
        1,
        "hub processes sharing the HTTP and TCP ports; more than 1 needs a store shared between "
        "processes (redis://)",
    )
    auth_secret: str = _setting(
        "",
        "shared secret for HS256 tokens, at least 32 bytes (prefer the variable or "
        "--auth-secret-file: a flag shows in the process list)",
        secret=True,
    )
    auth_secret_file: str = _setting(
        "", "file holding the shared secret for HS256 tokens (a trailing newline is ignored)"
    )
    auth_public_keys: str = _setting(
        "",
        "comma-separated PEM files, each a public key or certificate (RSA: RS256/PS256…, "
        "EC: ES256/ES384/ES512, Ed25519: EdDSA)",
    )
    auth_jwks: str = _setting("", "JWKS file of public keys, chosen by the token's kid")
    auth_audience: str = _setting("", "the aud a token must name (empty: aud is not checked)")
    auth_issuer: str = _setting("", "the iss a token must name (empty: iss is not checked)")
    auth_leeway: float = _setting(
        0.0, "seconds of clock difference allowed when checking exp and nbf"
    )
    auth_cache_tokens: int = _setting(
        1024, "verified tokens remembered, so a repeated token skips the signature check"
    )
    max_token_bytes: int = _setting(8192, "longest token accepted (401 above)")
    insecure: bool = _setting(
        False,
        "serve without auth on an address other machines can reach (something in front of "
        "the hub must authenticate callers)",
    )
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
            "auth_cache_tokens",
            "max_token_bytes",
            "header_timeout",
            "max_header_bytes",
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
        if not 0 <= self.slow_consumer_grace <= 3600:
            raise ValueError("slow_consumer_grace must be between 0 and 3600 seconds")
        if not 1 <= self.listen_backlog <= 65535:
            raise ValueError("listen_backlog must be between 1 and 65535")
        if self.max_connections < 0:
            raise ValueError("max_connections must not be negative (0 derives it)")
        if self.sse_retry < 0:
            raise ValueError("sse_retry must not be negative")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}")
        if self.workers > 1 and urlsplit(self.store_url).scheme not in REDIS_SCHEMES:
            raise ValueError(
                f"--workers {self.workers} needs a store that several processes share, such as "
                f"redis://127.0.0.1:6379/0; {self.store_url} belongs to one process"
            )
        if not 0 <= self.auth_leeway <= 3600:
            raise ValueError("auth_leeway must be between 0 and 3600 seconds")

    @property
    def auth_configured(self) -> bool:
        """Does any setting name a key? (Whether the keys load is checked at start-up.)"""
        return bool(
            self.auth_secret or self.auth_secret_file or self.auth_public_keys or self.auth_jwks
        )

    @property
    def store_url(self) -> str:
        if self.store:
            return self.store
        return "sqlite:///" + os.path.join(self.data_dir, "backchannel.db")

    @property
    def ws_max_size(self) -> int:
        """Bytes of the largest WebSocket message a client may send: a publish over /v1/ws
        carries the body as JSON or base64, so room for that, no more."""
        return self.max_message_bytes * 4 // 3 + 65_536

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
