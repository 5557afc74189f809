"""Keys and tokens for the auth tests: real keys made with ``cryptography``, good tokens signed
with PyJWT, and the bad ones (``alg: none``, HMAC keyed with a public key) forged by hand, since
PyJWT refuses to make them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

SECRET = b"0123456789abcdef0123456789abcdef-test-secret"
OTHER_SECRET = b"fedcba9876543210fedcba9876543210-not-the-hub"
AUDIENCE = "backchannel-test"
ISSUER = "https://issuer.test"
#: What the matrix tokens may do: the "ok" channel and queue, nothing else.
GRANTS = {"publish": ["ok.*"], "subscribe": ["ok.*"], "submit": ["ok.*"], "claim": ["ok.*"]}
EVERYTHING = {
    "publish": ["**"],
    "subscribe": ["**"],
    "submit": ["**"],
    "claim": ["**"],
    "admin": True,
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def forge(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A token built by hand; ``sign(signing_input) -> bytes`` or no signature."""
    signing_input = f"{b64(_json(header))}.{b64(_json(claims))}"
    signature = sign(signing_input.encode()) if sign is not None else b""
    return f"{signing_input}.{b64(signature)}"


def pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@dataclass
class Keys:
    """One RSA and one EC (P-256) key pair, plus decoys, written to ``folder`` for the hub."""

    folder: Path
    clock: Any = time.time
    rsa_key: Any = field(init=False)
    ec_key: Any = field(init=False)

    def __post_init__(self) -> None:
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.folder.mkdir(parents=True, exist_ok=True)
        self.secret_file.write_bytes(SECRET + b"\n")
        self.rsa_pem.write_bytes(pem(self.rsa_key))
        self.ec_pem.write_bytes(pem(self.ec_key))
        jwks = {
            "keys": [
                {**json.loads(RSAAlgorithm.to_jwk(self.rsa_key.public_key())), "kid": "rsa-1"},
                {
                    **json.loads(ECAlgorithm.to_jwk(self.ec_key.public_key())),
                    "kid": "ec-1",
                    "alg": "ES256",
                },
            ]
        }
        self.jwks.write_text(json.dumps(jwks))

    @property
    def secret_file(self) -> Path:
        return self.folder / "secret"

    @property
    def rsa_pem(self) -> Path:
        return self.folder / "rsa.pem"

    @property
    def ec_pem(self) -> Path:
        return self.folder / "ec.pem"

    @property
    def jwks(self) -> Path:
        return self.folder / "jwks.json"

    @cached_property
    def other_rsa(self) -> Any:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @cached_property
    def other_ec(self) -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(self.clock())
        claims: dict[str, Any] = {
            "sub": "tester",
            "iat": now,
            "exp": now + 300,
            "aud": AUDIENCE,
            "iss": ISSUER,
            "bc": GRANTS,
        }
        for name, value in changes.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def token(self, alg: str = "HS256", *, kid: str | None = None, **changes: Any) -> str:
        key = {"HS256": SECRET, "RS256": self.rsa_key, "ES256": self.ec_key}[alg]
        headers = {"kid": kid} if kid else None
        return jwt.encode(self.claims(**changes), key, algorithm=alg, headers=headers)

    # -- the bad ones --

    def alg_none(self) -> str:
        return forge({"alg": "none", "typ": "JWT"}, self.claims())

    def hmac_with_public_key(self) -> str:
        """HS256 keyed with the hub's RSA public key PEM: verifies wherever a server lets the
        token's alg pick how a public key is used."""
        secret = self.rsa_pem.read_bytes()
        return forge(
            {"alg": "HS256", "typ": "JWT"},
            self.claims(),
            lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
        )

    def wrong_signature(self, alg: str = "HS256") -> str:
        key = {"HS256": OTHER_SECRET, "RS256": self.other_rsa, "ES256": self.other_ec}[alg]
        return jwt.encode(self.claims(), key, algorithm=alg)

    def bad(self, case: str) -> str | None:
        """The token of a matrix case (None: send no token)."""
        now = int(self.clock())
        return {
            "none": lambda: self.alg_none(),
            "hmac-public-key": lambda: self.hmac_with_public_key(),
            "wrong-signature": lambda: self.wrong_signature(),
            "expired": lambda: self.token(exp=now - 30, iat=now - 330),
            "not-yet-valid": lambda: self.token(nbf=now + 300),
            "wrong-audience": lambda: self.token(aud="someone-else"),
            "wrong-issuer": lambda: self.token(iss="https://evil.test"),
            "no-token": lambda: None,
            "garbage": lambda: "not-a-jwt",
        }[case]()


#: Matrix cases refused with 401, and the problem slug each gets.
REFUSED = {
    "none": "invalid-token",
    "hmac-public-key": "invalid-token",
    "wrong-signature": "invalid-token",
    "expired": "token-expired",
    "not-yet-valid": "invalid-token",
    "wrong-audience": "invalid-token",
    "wrong-issuer": "invalid-token",
    "no-token": "token-required",
    "garbage": "invalid-token",
}
