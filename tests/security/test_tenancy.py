"""Where a request's tenant comes from: the gateway's header, a signed token, or (development) TENANT as typed."""

from __future__ import annotations

import json

import pytest

from nirvana.config import SecurityConfig
from nirvana.request import RequestError
from nirvana.security.tenancy import TenantResolver, sign_tenant

SECRET = "a tenant-token secret of enough characters"


def _params(**values: str) -> str:
    return json.dumps({k.replace("_", "-"): v for k, v in values.items()})


@pytest.fixture
def token_resolver(tmp_path) -> TenantResolver:
    path = tmp_path / "tenant.secret"
    path.write_text(SECRET + "\n")
    return TenantResolver(SecurityConfig(tenant_source="token", tenant_token_secret_file=path))


def test_client_mode_takes_tenant_as_typed_but_refuses_empty_and_reserved() -> None:
    resolver = TenantResolver(SecurityConfig(tenant_source="client"))
    assert resolver.resolve("acme", None) == "acme" and resolver.resolve(None, None) == "default"
    for bad, needle in (("", "1-128"), ("*", "reserved"), (" acme", "1-128"), ("a" * 129, "1-128")):
        with pytest.raises(RequestError, match="TENANT") as err:
            resolver.resolve(bad, None)
        assert needle in str(err.value)


def test_header_mode_takes_the_gateways_identity_only() -> None:
    resolver = TenantResolver(SecurityConfig())  # the default: the gateway's header
    assert resolver.resolve(None, _params(x_nirvana_tenant="acme")) == "acme"
    assert resolver.resolve("acme", _params(x_nirvana_tenant="acme")) == "acme"  # typed and equal: fine
    with pytest.raises(RequestError, match="x-nirvana-tenant=None: missing"):
        resolver.resolve("acme", None)  # no gateway identity: naming a tenant is not enough
    with pytest.raises(RequestError, match="TENANT='victim': differs"):
        resolver.resolve("victim", _params(x_nirvana_tenant="mallory"))
    with pytest.raises(RequestError, match="reserved"):
        resolver.resolve(None, _params(x_nirvana_tenant="*"))


def test_header_shadowed_by_a_request_parameter_is_refused() -> None:
    """Triton hands a model the forwarded header and a client's same-named request parameter side by side."""
    resolver = TenantResolver(SecurityConfig())
    shadowed = '{"x-nirvana-tenant":"victim","x-nirvana-tenant":"mallory"}'
    with pytest.raises(RequestError, match="more than once"):
        resolver.resolve(None, shadowed)


def test_token_mode_verifies_the_signature(token_resolver) -> None:
    token = sign_tenant("acme", SECRET)
    assert token_resolver.resolve(token, None) == "acme"  # in TENANT
    assert token_resolver.resolve(None, _params(x_nirvana_tenant=token)) == "acme"  # in the header
    forged = [sign_tenant("acme", "another secret of enough chars"), "acme", "acme.", token[:-1] + "0", ".abc"]
    for bad in forged:
        with pytest.raises(RequestError, match="x-nirvana-tenant/TENANT"):
            token_resolver.resolve(bad, None)
    with pytest.raises(RequestError, match="differs"):
        token_resolver.resolve("victim", _params(x_nirvana_tenant=token))


def test_token_mode_needs_its_secret() -> None:
    with pytest.raises(ValueError, match="tenant_token_secret_file"):
        SecurityConfig(tenant_source="token")
