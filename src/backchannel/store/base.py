"""Defaults shared by every store implementation."""

from ..core.channels import Retention

DEFAULT_RETENTION = Retention(max_count=10_000, max_age_ms=24 * 3600 * 1000)
DEFAULT_IDEMPOTENCY_TTL_MS = 24 * 3600 * 1000
