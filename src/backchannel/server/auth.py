"""Authentication: JWT bearer tokens, checked the same way on every transport.

This module owns the keys, the algorithm allow-list, token verification and the errors a refused
token gets; what a verified token may *do* is :mod:`backchannel.core.grants`.
``docs/auth.md`` is the user's view.

- Keys come from :class:`~.config.Settings`: a shared secret (HS256/384/512, by its length),
  PEM public keys or certificates (RSA: RS*/PS*; EC: ES256/384/512 by curve; Ed25519: EdDSA),
  a JWKS file (the same key types, public parts only; a key's ``alg`` narrows its algorithms).
- The allow-list is the union of the configured keys' algorithms and nothing else: ``none`` is
  never on it, and a token's ``alg`` picks the keys of its family only, so a public key is never
  tried as an HMAC secret (the key-confusion attack).
- A token must carry ``exp``; ``nbf`` is checked when present, ``aud`` and ``iss`` when the hub
  is configured with them. Times are checked here, against the app's clock, with the leeway.
- Verified tokens are cached (by their exact text, up to ``auth_cache_tokens``) so a client
  that sends the same token on every request pays for one signature check; every use still
  checks the token's times.
- Tokens are secrets: nothing here logs one, and details never quote one.

Errors: :class:`~.problems.HTTPProblem` with the slugs ``token-required``, ``invalid-token``,
``token-expired`` (401, with ``WWW-Authenticate: Bearer …`` as RFC 6750 asks) and
``forbidden`` (403).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ..core.grants import ALLOW_ALL, Action, Grants, InvalidGrants
from .problems import HTTPProblem

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("backchannel.auth")

REALM = "backchannel"
#: The claim that carries the grants.
GRANTS_CLAIM = "bc"
MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
_HMAC = {"HS256": 32, "HS384": 48, "HS512": 64}  # algorithm: the shortest secret it may use
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_JWK_READERS: dict[str, Any] = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}
#: Keys tried for one token without a ``kid``, at most (a JWKS may hold many of one family).
MAX_CANDIDATES = 8


class AuthConfigError(ValueError):
    """The auth settings cannot be used (unreadable file, weak secret, private key given…)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, and until when. ``expires`` is when the token stops being accepted
    (``exp`` plus the leeway), in seconds since the epoch; None when the hub has no auth."""

    subject: str | None
    grants: Grants
    expires: float | None

    def allows(self, action: Action, name: str) -> bool:
        return self.grants.allows(action, name)


#: Every caller of a hub without authentication.
ANONYMOUS = Identity(None, ALLOW_ALL, None)


@dataclass(frozen=True, slots=True)
class VerifyKey:
    key: Any  # bytes (a secret) or a cryptography public key
    algorithms: frozenset[str]
    kid: str | None
    source: str  # where it came from, for messages


# -- Problems ------------------------------------------------------------------------------------


def _quoted(text: str) -> str:
    """``text`` fit for a quoted-string of WWW-Authenticate (RFC 6750: %x20-21 / %x23-5B /
    %x5D-7E)."""
    return "".join(c for c in text if " " <= c <= "~" and c not in '"\\')[:200]


def unauthorized(slug: str, detail: str) -> HTTPProblem:
    """A 401: ``token-required`` (no error code, as RFC 6750 asks of requests that sent no
    credentials), ``invalid-token`` or ``token-expired`` (``error="invalid_token"``)."""
    challenge = f'Bearer realm="{REALM}"'
    if slug != "token-required":
        challenge += f', error="invalid_token", error_description="{_quoted(detail)}"'
    return HTTPProblem(slug, detail, headers=[(b"www-authenticate", challenge.encode())])


def forbidden(detail: str) -> HTTPProblem:
    challenge = (
        f'Bearer realm="{REALM}", error="insufficient_scope", error_description="{_quoted(detail)}"'
    )
    return HTTPProblem("forbidden", detail, headers=[(b"www-authenticate", challenge.encode())])


def require(identity: Identity, action: Action, name: str) -> None:
    """Raise ``forbidden`` unless ``identity`` may do ``action`` on ``name``."""
    if not identity.grants.allows(action, name):
        what = "queue" if action in (Action.SUBMIT, Action.CLAIM) else "channel"
        raise forbidden(f"the token does not grant {action.value} on {what} {name!r}")


def require_job(identity: Identity, queue: str, action: Action | None = None) -> None:
    """Raise ``forbidden`` unless ``identity`` may touch a job of ``queue``: read it (``action``
    None: submit or claim on the queue), cancel it (SUBMIT), or work on it (CLAIM)."""
    if action is None:
        if not identity.grants.allows_job(queue):
            raise forbidden(f"the token grants neither submit nor claim on queue {queue!r}")
        return
    require(identity, action, queue)


def require_admin(identity: Identity) -> None:
    if not identity.grants.admin:
        raise forbidden("the token does not grant admin")


# -- Keys ----------------------------------------------------------------------------------------


def _algorithms_for(key: Any, source: str) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise AuthConfigError(f"{source}: an RSA key of {key.key_size} bits, under 2048")
        return frozenset(_RSA)
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC.get(key.curve.name)
        if alg is None:
            raise AuthConfigError(f"{source}: the curve {key.curve.name} is not supported")
        return frozenset({alg})
    if isinstance(key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    raise AuthConfigError(f"{source}: {type(key).__name__} keys are not supported")


def secret_key(secret: bytes, source: str) -> VerifyKey:
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthConfigError(
            f"{source}: the secret is {len(secret)} bytes; HS256 needs at least "
            f"{MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    algorithms = frozenset(alg for alg, least in _HMAC.items() if len(secret) >= least)
    return VerifyKey(secret, algorithms, None, source)


def pem_key(data: bytes, source: str) -> VerifyKey:
    """A public key, or the public key of a certificate, in PEM."""
    if b"PRIVATE KEY-----" in data:
        raise AuthConfigError(f"{source} holds a private key: give the hub the public key only")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise AuthConfigError(f"{source} is not a PEM public key or certificate: {exc}") from None
    return VerifyKey(key, _algorithms_for(key, source), None, source)


def jwks_keys(document: Any, source: str) -> list[VerifyKey]:
    """The signing keys of a JWKS document (RFC 7517)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise AuthConfigError(f'{source} is not a JWKS: it needs {{"keys": [...]}}')
    keys: list[VerifyKey] = []
    for index, jwk in enumerate(document["keys"]):
        where = f"{source} key {index}"
        if not isinstance(jwk, dict):
            raise AuthConfigError(f"{where} is not a JSON object")
        if jwk.get("use", "sig") != "sig":
            continue  # an encryption key: not for us
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthConfigError(f"{where}: kid must be a string")
        if kid is not None:
            where = f"{source} key {kid!r}"
        if "d" in jwk:
            raise AuthConfigError(f"{where} is a private key: the hub needs public keys only")
        kty = jwk.get("kty")
        reader: Any = _JWK_READERS.get(str(kty))
        if reader is None:
            raise AuthConfigError(
                f"{where}: kty {kty!r} is not supported (RSA, EC or OKP; put shared secrets "
                "in auth_secret)"
            )
        try:
            key = reader.from_jwk(jwk)
        except (jwt.InvalidKeyError, ValueError, KeyError, TypeError) as exc:
            raise AuthConfigError(f"{where} cannot be read: {exc}") from None
        algorithms = _algorithms_for(key, where)
        alg = jwk.get("alg")
        if alg is not None:
            if alg not in algorithms:
                raise AuthConfigError(f"{where}: alg {alg!r} does not fit a {kty} key")
            algorithms = frozenset({alg})
        keys.append(VerifyKey(key, algorithms, kid, where))
    if not keys:
        raise AuthConfigError(f"{source} holds no signing key")
    return keys


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


def load_keys(settings: Settings) -> list[VerifyKey]:
    """Every key the settings name; empty when auth is off."""
    keys: list[VerifyKey] = []
    if settings.auth_secret and settings.auth_secret_file:
        raise AuthConfigError("give auth_secret or auth_secret_file, not both")
    if settings.auth_secret:
        keys.append(secret_key(settings.auth_secret.encode(), "auth_secret"))
    if settings.auth_secret_file:
        # A trailing newline is what editors and `echo` add, never part of the secret.
        secret = _read(settings.auth_secret_file, "secret file").rstrip(b"\r\n")
        keys.append(secret_key(secret, settings.auth_secret_file))
    for path in (p.strip() for p in settings.auth_public_keys.split(",")):
        if path:
            keys.append(pem_key(_read(path, "public key file"), path))
    if settings.auth_jwks:
        try:
            document = json.loads(_read(settings.auth_jwks, "JWKS file"))
        except ValueError as exc:
            raise AuthConfigError(f"{settings.auth_jwks} is not JSON: {exc}") from None
        keys.extend(jwks_keys(document, settings.auth_jwks))
    return keys


# -- Verification --------------------------------------------------------------------------------


class Authenticator:
    """Verifies tokens against ``keys``. With no keys the hub has no auth: every caller is
    :data:`ANONYMOUS` and tokens are ignored."""

    def __init__(
        self,
        keys: Sequence[VerifyKey],
        *,
        audience: str = "",
        issuer: str = "",
        leeway: float = 0.0,
        cache_tokens: int = 1024,
        max_token_bytes: int = 8192,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = tuple(keys)
        self.algorithms: tuple[str, ...] = tuple(
            sorted({alg for key in self.keys for alg in key.algorithms})
        )
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.cache_tokens = cache_tokens
        self.max_token_bytes = max_token_bytes
        self.clock = clock
        self._cache: OrderedDict[str, tuple[Identity, float | None]] = OrderedDict()

    @classmethod
    def from_settings(
        cls, settings: Settings, clock: Callable[[], float] = time.time
    ) -> Authenticator:
        return cls(
            load_keys(settings),
            audience=settings.auth_audience,
            issuer=settings.auth_issuer,
            leeway=settings.auth_leeway,
            cache_tokens=settings.auth_cache_tokens,
            max_token_bytes=settings.max_token_bytes,
            clock=clock,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def describe(self) -> str:
        """One line for the log: what is accepted (no key material)."""
        if not self.enabled:
            return "auth off: every caller may do everything"
        parts = [f"auth on: algorithms {', '.join(self.algorithms)}"]
        parts.append(f"audience {self.audience!r}" if self.audience else "any audience")
        if self.issuer:
            parts.append(f"issuer {self.issuer!r}")
        return "; ".join(parts)

    def authenticate(self, token: str | None) -> Identity:
        """The identity ``token`` proves, or a 401 problem. ``None``: no token was sent."""
        if not self.enabled:
            return ANONYMOUS
        if token is None:
            raise unauthorized(
                "token-required",
                "this needs a bearer token: send Authorization: Bearer TOKEN "
                "(or ?token= on event streams and WebSockets)",
            )
        if len(token) > self.max_token_bytes:
            raise unauthorized(
                "invalid-token", f"the token is longer than {self.max_token_bytes} bytes"
            )
        cached = self._cache.get(token)
        if cached is not None:
            identity, not_before = cached
            self._check_times(identity, not_before)
            return identity
        identity, not_before = self._verify(token)
        self._check_times(identity, not_before)
        self._cache[token] = (identity, not_before)
        if len(self._cache) > self.cache_tokens:
            self._cache.popitem(last=False)
        return identity

    def _check_times(self, identity: Identity, not_before: float | None) -> None:
        now = self.clock()
        assert identity.expires is not None
        if now >= identity.expires:
            self._forget_expired(now)
            raise unauthorized("token-expired", "the token has expired")
        if not_before is not None and now < not_before:
            raise unauthorized("invalid-token", "the token is not valid yet (nbf)")

    def _forget_expired(self, now: float) -> None:
        for token in [t for t, (i, _) in self._cache.items() if i.expires <= now]:  # type: ignore[operator]
            del self._cache[token]

    def _verify(self, token: str) -> tuple[Identity, float | None]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise unauthorized("invalid-token", f"the token is not a JWT: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise unauthorized(
                "invalid-token",
                f"the algorithm {str(alg)[:20]!r} is not accepted here "
                f"(accepted: {', '.join(self.algorithms)})",
            )
        candidates = [key for key in self.keys if alg in key.algorithms]
        kid = header.get("kid")
        if kid is not None:
            named = [key for key in candidates if key.kid == kid]
            # Keys without a kid (a secret, a PEM file) may sign tokens that name one.
            candidates = named or [key for key in candidates if key.kid is None]
            if not candidates:
                raise unauthorized("invalid-token", f"no key has the id {str(kid)[:40]!r}")
        claims: dict[str, Any] | None = None
        for key in candidates[:MAX_CANDIDATES]:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    audience=self.audience or None,
                    issuer=self.issuer or None,
                    options={
                        "verify_exp": False,  # checked by _check_times, on every use
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": bool(self.audience),
                        "verify_iss": bool(self.issuer),
                    },
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAudienceError:
                raise unauthorized(
                    "invalid-token", f"the token is not meant for audience {self.audience!r}"
                ) from None
            except jwt.InvalidIssuerError:
                raise unauthorized(
                    "invalid-token", f"the token was not issued by {self.issuer!r}"
                ) from None
            except jwt.MissingRequiredClaimError as exc:
                raise unauthorized("invalid-token", f"the token has no {exc.claim!r}") from None
            except jwt.InvalidTokenError as exc:
                raise unauthorized("invalid-token", f"the token is not valid: {exc}") from None
        if claims is None:
            raise unauthorized("invalid-token", "the token's signature does not verify")
        return self._identity(claims)

    def _identity(self, claims: dict[str, Any]) -> tuple[Identity, float | None]:
        exp = _number(claims.get("exp"), "exp")
        if exp is None:
            raise unauthorized("invalid-token", "the token has no exp: the hub needs one")
        nbf = _number(claims.get("nbf"), "nbf")
        try:
            grants = Grants.from_claim(claims.get(GRANTS_CLAIM))
        except InvalidGrants as exc:
            raise unauthorized("invalid-token", str(exc)) from None
        subject = claims.get("sub")
        name = subject if isinstance(subject, str) else None
        identity = Identity(name, grants, exp + self.leeway)
        return identity, None if nbf is None else nbf - self.leeway


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise unauthorized("invalid-token", f"{name} must be a number of seconds")
    return float(value)


def bearer_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token of a request: from ``Authorization: Bearer``, else from ``?token=`` (where the
    route takes one). Raises ``invalid-token`` for another scheme."""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("invalid-token", "the Authorization header is not 'Bearer TOKEN'")
        return token
    return query_token or None


def mint(
    secret: bytes,
    *,
    grants: dict[str, Any],
    ttl: float,
    subject: str | None = None,
    audience: str = "",
    issuer: str = "",
    clock: Callable[[], float] = time.time,
) -> str:
    """An HS256 token for development (``backchannel token``): ``grants`` is the ``bc``
    claim, checked the way the hub will read it."""
    secret_key(secret, "the secret")  # refuses a short one
    Grants.from_claim(grants)  # raises InvalidGrants for a bad pattern
    now = int(clock())
    claims: dict[str, Any] = {"iat": now, "exp": now + max(1, math.ceil(ttl)), GRANTS_CLAIM: grants}
    if subject:
        claims["sub"] = subject
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


# -- Start-up ------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Is ``host`` an address only this machine can reach? Names other than ``localhost`` are
    not resolved: they count as reachable from elsewhere."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_error(settings: Settings, enabled: bool) -> str | None:
    """Why ``backchannel serve`` must not start with these settings, if it must not: no auth on
    an address other machines can reach, without ``--insecure``."""
    if enabled or settings.insecure or is_loopback(settings.host):
        return None
    return (
        f"refusing to serve on {settings.host} without authentication: anyone who can reach "
        "it could read and publish everything. Configure a key (--auth-secret-file, "
        "--auth-public-keys or --auth-jwks; see docs/auth.md), bind to 127.0.0.1, or pass "
        "--insecure if something in front of the hub authenticates callers"
    )


__all__ = [
    "ANONYMOUS",
    "AuthConfigError",
    "Authenticator",
    "Identity",
    "VerifyKey",
    "bearer_token",
    "exposure_error",
    "forbidden",
    "is_loopback",
    "load_keys",
    "mint",
    "require",
    "require_admin",
    "require_job",
    "unauthorized",
]
