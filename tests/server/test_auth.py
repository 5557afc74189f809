"""Token verification, keys and settings (``backchannel.server.auth``), with a fake clock; and
the app's route policy over in-memory ASGI. The same matrix over every real transport is in
``tests/e2e/test_auth.py``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import RSAAlgorithm

from backchannel import Settings, create_app
from backchannel.core.grants import Action
from backchannel.server import BackchannelApp
from backchannel.server.auth import (
    ANONYMOUS,
    AuthConfigError,
    Authenticator,
    bearer_token,
    exposure_error,
    is_loopback,
    jwks_keys,
    load_keys,
    mint,
    pem_key,
    secret_key,
)
from backchannel.server.problems import HTTPProblem
from backchannel.server.routes import ROUTES
from backchannel.store import MemoryStore

from ..jwt_keys import AUDIENCE, ISSUER, REFUSED, SECRET, Keys, pem


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def clock(keys: Keys) -> Iterator[Clock]:
    fake = Clock()
    keys.clock = fake
    yield fake
    keys.clock = __import__("time").time


def settings_for(keys: Keys, **extra: object) -> Settings:
    values: dict[str, object] = {
        "auth_secret_file": str(keys.secret_file),
        "auth_public_keys": f"{keys.rsa_pem},{keys.ec_pem}",
        "auth_audience": AUDIENCE,
        "auth_issuer": ISSUER,
        "store": "memory://",
    }
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def auth(keys: Keys, clock: Clock) -> Authenticator:
    return Authenticator.from_settings(settings_for(keys), clock)


def refusal(auth: Authenticator, token: str | None) -> HTTPProblem:
    with pytest.raises(HTTPProblem) as caught:
        auth.authenticate(token)
    return caught.value


# -- The matrix, as pure function calls -----------------------------------------------------------


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_tokens(auth: Authenticator, keys: Keys, case: str) -> None:
    problem = refusal(auth, keys.bad(case))
    assert problem.type.status == 401
    assert problem.type.slug == REFUSED[case]
    (name, value), *_ = problem.headers
    assert name == b"www-authenticate"
    assert value.startswith(b'Bearer realm="backchannel"')
    if case == "no-token":
        assert b"error=" not in value  # RFC 6750 3.1: no error code without credentials
    else:
        assert b'error="invalid_token"' in value


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256"])
def test_each_algorithm_verifies_with_its_key_and_not_another(
    auth: Authenticator, keys: Keys, alg: str
) -> None:
    identity = auth.authenticate(keys.token(alg))
    assert identity.subject == "tester"
    assert identity.allows(Action.PUBLISH, "ok.x")
    assert not identity.allows(Action.PUBLISH, "other")
    assert refusal(auth, keys.wrong_signature(alg)).type.slug == "invalid-token"


def test_allow_list_is_derived_from_the_keys(keys: Keys, clock: Clock) -> None:
    full = Authenticator.from_settings(settings_for(keys), clock)
    assert "none" not in full.algorithms
    assert {"HS256", "RS256", "PS256", "ES256"} <= set(full.algorithms)
    rsa_only = Authenticator.from_settings(
        settings_for(keys, auth_secret_file="", auth_public_keys=str(keys.rsa_pem)), clock
    )
    assert set(rsa_only.algorithms) == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    # With no secret, HS256 is not even tried: the confusion token names an algorithm that is
    # not on the list.
    problem = refusal(rsa_only, keys.hmac_with_public_key())
    assert "not accepted" in problem.detail
    assert refusal(rsa_only, keys.token("ES256")).type.slug == "invalid-token"
    assert rsa_only.authenticate(keys.token("RS256")).subject == "tester"


def test_a_secret_of_32_bytes_gets_hs256_only() -> None:
    assert secret_key(b"x" * 32, "s").algorithms == {"HS256"}
    assert secret_key(b"x" * 64, "s").algorithms == {"HS256", "HS384", "HS512"}
    with pytest.raises(AuthConfigError, match="at least 32"):
        secret_key(b"x" * 31, "s")


def test_expiry_is_checked_on_every_use_even_from_the_cache(
    auth: Authenticator, keys: Keys, clock: Clock
) -> None:
    token = keys.token(exp=int(clock.now) + 10)
    identity = auth.authenticate(token)
    assert identity.expires == int(clock.now) + 10
    assert auth.authenticate(token) is identity  # cached
    clock.now += 10
    assert refusal(auth, token).type.slug == "token-expired"


def test_not_before_passes_once_it_is_time(auth: Authenticator, keys: Keys, clock: Clock) -> None:
    token = keys.token(nbf=int(clock.now) + 5)
    assert refusal(auth, token).type.slug == "invalid-token"
    clock.now += 5
    assert auth.authenticate(token).subject == "tester"


def test_leeway_widens_both_ends(keys: Keys, clock: Clock) -> None:
    lenient = Authenticator.from_settings(settings_for(keys, auth_leeway=30), clock)
    now = int(clock.now)
    assert lenient.authenticate(keys.token(exp=now - 10)).expires == now + 20
    assert lenient.authenticate(keys.token(nbf=now + 10)).subject == "tester"
    assert refusal(lenient, keys.token(exp=now - 31)).type.slug == "token-expired"


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"exp": None}, "no exp"),
        ({"exp": "tomorrow"}, "exp"),
        ({"bc": {"publish": "ok.*"}}, "list of patterns"),
        ({"bc": {"pub": ["ok"]}}, "unknown keys"),
        ({"aud": None}, "aud"),
        ({"iss": None}, "iss"),
    ],
)
def test_malformed_claims(auth: Authenticator, keys: Keys, changes: dict, detail: str) -> None:
    token = jwt.encode(keys.claims(**changes), SECRET, algorithm="HS256")
    problem = refusal(auth, token)
    assert problem.type.slug == "invalid-token"
    assert detail in problem.detail


def test_audience_and_issuer_are_not_checked_unless_configured(keys: Keys, clock: Clock) -> None:
    loose = Authenticator.from_settings(settings_for(keys, auth_audience="", auth_issuer=""), clock)
    assert loose.authenticate(keys.token(aud="anyone", iss="anybody")).subject == "tester"


def test_no_grants_claim_grants_nothing(auth: Authenticator, keys: Keys) -> None:
    identity = auth.authenticate(keys.token(bc=None))
    assert not any(identity.allows(a, "ok.x") for a in Action)


def test_tokens_longer_than_the_limit(keys: Keys, clock: Clock) -> None:
    small = Authenticator.from_settings(settings_for(keys, max_token_bytes=100), clock)
    assert "longer than 100" in refusal(small, keys.token()).detail


def test_the_cache_is_bounded(keys: Keys, clock: Clock) -> None:
    tiny = Authenticator.from_settings(settings_for(keys, auth_cache_tokens=2), clock)
    for n in range(5):
        tiny.authenticate(keys.token(sub=f"user{n}"))
    assert len(tiny._cache) == 2


def test_details_never_quote_the_token(auth: Authenticator, keys: Keys) -> None:
    for case in REFUSED:
        token = keys.bad(case)
        problem = refusal(auth, token)
        if token:
            assert token not in problem.detail
            assert token.encode() not in b"".join(v for _, v in problem.headers)


def test_auth_off_lets_everyone_do_everything() -> None:
    off = Authenticator(())
    assert not off.enabled
    assert off.authenticate(None) is ANONYMOUS
    assert off.authenticate("anything") is ANONYMOUS


# -- Keys -----------------------------------------------------------------------------------------


def test_jwks_picks_the_key_by_kid(keys: Keys, clock: Clock) -> None:
    only_jwks = Authenticator.from_settings(
        settings_for(keys, auth_secret_file="", auth_public_keys="", auth_jwks=str(keys.jwks)),
        clock,
    )
    assert only_jwks.authenticate(keys.token("RS256", kid="rsa-1")).subject == "tester"
    assert only_jwks.authenticate(keys.token("ES256", kid="ec-1")).subject == "tester"
    assert only_jwks.authenticate(keys.token("ES256")).subject == "tester"  # no kid: by alg
    assert "no key has the id" in refusal(only_jwks, keys.token("RS256", kid="gone")).detail
    # The EC key's kid with an RSA signature: the key named cannot verify it.
    assert refusal(only_jwks, keys.token("RS256", kid="ec-1")).type.slug == "invalid-token"
    assert refusal(only_jwks, keys.token("HS256")).type.slug == "invalid-token"
    assert refusal(only_jwks, keys.hmac_with_public_key()).type.slug == "invalid-token"


def test_jwks_alg_narrows_the_key(keys: Keys) -> None:
    document = json.loads(keys.jwks.read_text())
    loaded = jwks_keys(document, "jwks")
    assert {k.kid: set(k.algorithms) for k in loaded} == {
        "rsa-1": {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"},
        "ec-1": {"ES256"},
    }
    document["keys"][0]["alg"] = "ES256"
    with pytest.raises(AuthConfigError, match="does not fit"):
        jwks_keys(document, "jwks")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "is not a JWKS"),
        ({"keys": []}, "no signing key"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "auth_secret"),
        ({"keys": [{"kty": "RSA", "n": "AQAB"}]}, "cannot be read"),
        ({"keys": [{"kty": "EC", "use": "enc"}]}, "no signing key"),
    ],
)
def test_bad_jwks(document: object, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        jwks_keys(document, "jwks")


def test_a_private_jwk_is_refused() -> None:
    private = json.loads(
        RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    )
    with pytest.raises(AuthConfigError, match="private key"):
        jwks_keys({"keys": [private]}, "jwks")


def test_pem_keys(keys: Keys) -> None:
    assert pem_key(keys.ec_pem.read_bytes(), "ec").algorithms == {"ES256"}
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert pem_key(pem(p384), "p384").algorithms == {"ES384"}
    assert pem_key(pem(ed25519.Ed25519PrivateKey.generate()), "ed").algorithms == {"EdDSA"}
    private = keys.ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(AuthConfigError, match="private key"):
        pem_key(private, "private.pem")
    with pytest.raises(AuthConfigError, match="not a PEM"):
        pem_key(b"hello", "junk.pem")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(AuthConfigError, match="under 2048"):
        pem_key(pem(weak), "weak.pem")


def test_eddsa_tokens_verify(tmp_path: Path, clock: Clock, keys: Keys) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.pem").write_bytes(pem(private))
    auth = Authenticator.from_settings(
        settings_for(keys, auth_secret_file="", auth_public_keys=str(tmp_path / "ed.pem")), clock
    )
    assert auth.algorithms == ("EdDSA",)
    assert auth.authenticate(jwt.encode(keys.claims(), private, algorithm="EdDSA"))


def test_load_keys_errors(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(AuthConfigError, match="cannot read"):
        load_keys(Settings(auth_secret_file=str(tmp_path / "missing")))
    with pytest.raises(AuthConfigError, match="not both"):
        load_keys(Settings(auth_secret="x" * 32, auth_secret_file=str(keys.secret_file)))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(AuthConfigError, match="not JSON"):
        load_keys(Settings(auth_jwks=str(tmp_path / "bad.json")))
    assert load_keys(Settings()) == []
    # The trailing newline of a secret file is not part of the secret.
    (loaded,) = load_keys(Settings(auth_secret_file=str(keys.secret_file)))
    assert loaded.key == SECRET


def test_a_bad_key_stops_the_app_before_it_opens_the_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        create_app(Settings(auth_secret="short", data_dir=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()


def test_secrets_stay_out_of_repr() -> None:
    assert "s3cret" not in repr(Settings(auth_secret="s3cret" * 6))


def test_minted_tokens_verify(keys: Keys, clock: Clock, auth: Authenticator) -> None:
    token = mint(
        SECRET,
        grants={"subscribe": ["ok.*"], "admin": True},
        ttl=60,
        subject="dev",
        audience=AUDIENCE,
        issuer=ISSUER,
        clock=clock,
    )
    identity = auth.authenticate(token)
    assert identity.subject == "dev" and identity.grants.admin
    assert identity.expires == int(clock.now) + 60
    with pytest.raises(ValueError):
        mint(SECRET, grants={"subscribe": ["bad pattern"]}, ttl=60)


# -- Small pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "query", "expected"),
    [
        ("Bearer abc", None, "abc"),
        ("bearer   abc ", None, "abc"),
        ("Bearer abc", "xyz", "abc"),  # the header wins
        (None, "xyz", "xyz"),
        (None, "", None),
        (None, None, None),
    ],
)
def test_bearer_token(authorization: str | None, query: str | None, expected: str | None) -> None:
    assert bearer_token(authorization, query) == expected


@pytest.mark.parametrize("authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "abc"])
def test_other_authorization_schemes_are_refused(authorization: str) -> None:
    with pytest.raises(HTTPProblem) as caught:
        bearer_token(authorization, None)
    assert caught.value.type.slug == "invalid-token"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_exposure_rule() -> None:
    assert exposure_error(Settings(), enabled=False) is None
    assert "refusing" in str(exposure_error(Settings(host="0.0.0.0"), enabled=False))
    assert exposure_error(Settings(host="0.0.0.0"), enabled=True) is None
    assert exposure_error(Settings(host="0.0.0.0", insecure=True), enabled=False) is None


def test_auth_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="auth_leeway"):
        Settings(auth_leeway=-1)
    with pytest.raises(ValueError, match="auth_cache_tokens"):
        Settings(auth_cache_tokens=0)
    assert Settings.from_env({"BACKCHANNEL_AUTH_SECRET_FILE": "/s"}).auth_configured
    assert not Settings().auth_configured


# -- The route policy, over in-memory ASGI --------------------------------------------------------

PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/problems/{slug}"}


def test_only_health_and_the_api_description_are_public() -> None:
    assert {r.path for r in ROUTES if r.public} == PUBLIC
    in_query = {r.path for r in ROUTES if r.token_in_query}
    assert in_query == {
        "/v1/channels/{channel}/events",
        "/v1/events",
        "/v1/jobs/{job}/events",
        "/v1/jobs/events",
        "/v1/channels/{channel}/ws",
        "/v1/ws",
        "/v1/echo",
    }


@pytest.fixture
async def app(keys: Keys) -> AsyncIterator[BackchannelApp]:
    application = create_app(settings_for(keys), store=MemoryStore())
    await application.startup()
    yield application
    await application.shutdown()


@pytest.fixture
async def http(app: BackchannelApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as c:
        yield c


def _example(path: str) -> str:
    return (
        path.replace("{channel}", "ok.a")
        .replace("{queue}", "ok.a")
        .replace("{job}", "0" * 32)
        .replace("{slug}", "forbidden")
    )


@pytest.mark.parametrize(
    "route", [r for r in ROUTES if r.method != "WEBSOCKET"], ids=lambda r: f"{r.method} {r.path}"
)
async def test_every_route_without_a_token(http: httpx.AsyncClient, route: object) -> None:
    response = await http.request(route.method, _example(route.path))  # type: ignore[attr-defined]
    if route.public:  # type: ignore[attr-defined]
        assert response.status_code < 400
    else:
        assert response.status_code == 401
        assert response.json()["type"] == "/problems/token-required"
        assert response.headers["www-authenticate"] == 'Bearer realm="backchannel"'


async def test_query_tokens_only_where_browsers_need_them(
    http: httpx.AsyncClient, keys: Keys
) -> None:
    token = keys.token()
    refused = await http.get("/v1/channels/ok.a/messages", params={"token": token})
    assert refused.status_code == 401
    allowed = await http.get(
        "/v1/channels/ok.a/messages", headers={"authorization": f"Bearer {token}"}
    )
    assert allowed.status_code == 200


async def test_retention_needs_admin(http: httpx.AsyncClient, keys: Keys) -> None:
    body = {"retention": {"max_count": 5}}
    user = {"authorization": f"Bearer {keys.token()}"}
    admin = {"authorization": f"Bearer {keys.token(bc={'admin': True})}"}
    refused = await http.put("/v1/channels/ok.a", json=body, headers=user)
    assert refused.status_code == 403
    assert refused.json()["type"] == "/problems/forbidden"
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    assert (await http.put("/v1/channels/ok.a", json=body, headers=admin)).status_code == 200


def test_openapi_names_the_bearer_scheme_on_every_route_but_the_public_ones(keys: Keys) -> None:
    from backchannel.server import openapi

    spec = openapi.build(settings_for(keys))
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            if path in PUBLIC:
                assert "security" not in operation
            else:
                assert operation["security"] == [{"bearer": []}]
                assert {"401", "403"} <= set(operation["responses"])
    assert "securitySchemes" not in openapi.build(Settings())["components"]


def test_the_echo_socket_needs_a_token_with_any_grants(keys: Keys) -> None:
    from starlette.testclient import TestClient, WebSocketDenialResponse

    app = create_app(settings_for(keys, ws_echo=True), store=MemoryStore())
    no_grants = keys.token(bc=None)
    with TestClient(app) as client:
        for refused, slug in (("", "token-required"), ("?token=not-a-jwt", "invalid-token")):
            with pytest.raises(WebSocketDenialResponse) as denied:
                client.websocket_connect("/v1/echo" + refused).__enter__()
            assert denied.value.status_code == 401
            assert denied.value.json()["type"] == f"/problems/{slug}"
        connections = (
            client.websocket_connect(f"/v1/echo?token={no_grants}"),
            client.websocket_connect("/v1/echo", headers={"authorization": f"Bearer {no_grants}"}),
        )
        for connection in connections:
            with connection as ws:
                ws.send_text("hello")
                assert ws.receive_text() == "hello"
