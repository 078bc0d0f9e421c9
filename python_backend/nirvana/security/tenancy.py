"""Which tenant a request belongs to: an identity the deployment established, never just what a client typed.

`tenant_source` (`nirvana.config.SecurityConfig`):
* "header": the header an authenticating gateway sets after checking the caller (Triton forwards it to the model
  as a request parameter through `--grpc-header-forward-pattern` / `--http-header-forward-pattern`). The gateway
  must set it on every request it passes (overwriting what the client sent) and be the only way in (NetworkPolicy).
* "token": a signed token `<tenant>.<hex HMAC-SHA256(secret, tenant)>`, in that header or in `TENANT`; holds even
  where a client reaches Triton directly.
* "client": `TENANT` as typed (development: anyone can name any tenant).
In every mode a `TENANT` that disagrees with the established identity is refused, and so are empty and reserved
names.
"""

from __future__ import annotations

import hashlib
import hmac

from nirvana.config import SecurityConfig
from nirvana.request import DEFAULT_TENANT, RequestError, check_tenant
from nirvana.security.credential import DuplicateParameterError, read_parameters, read_secret

__all__ = ["TenantResolver", "sign_tenant"]


def sign_tenant(tenant: str, secret: str) -> str:
    """The token that proves `tenant` under `secret` (what an identity service hands a client)."""
    return f"{tenant}.{_digest(tenant, secret)}"


def _digest(tenant: str, secret: str) -> str:
    return hmac.new(secret.encode(), tenant.encode(), hashlib.sha256).hexdigest()


class TenantResolver:
    """`resolve(typed, parameters_json)` → the request's tenant; RequestError naming the field otherwise."""

    def __init__(self, config: SecurityConfig) -> None:
        self.source, self.header = config.tenant_source, config.tenant_header
        self._secret = None
        if config.tenant_source == "token":
            assert config.tenant_token_secret_file is not None  # the config validator guarantees it
            self._secret = read_secret(config.tenant_token_secret_file, "security.tenant_token_secret_file")

    def resolve(self, typed: str | None, parameters: str | None) -> str:
        if self.source == "client":
            return check_tenant("TENANT", DEFAULT_TENANT if typed is None else typed)
        try:
            forwarded = read_parameters(parameters).get(self.header)
        except DuplicateParameterError as err:
            raise RequestError(self.header, "<given twice>", f"{err}; the gateway sets it") from None
        if self.source == "header":
            if not isinstance(forwarded, str) or not forwarded:
                raise RequestError(
                    self.header,
                    None,
                    "missing: this deployment takes the tenant from the header its authenticating gateway sets",
                )
            tenant = check_tenant(self.header, forwarded)
        else:
            token = forwarded if isinstance(forwarded, str) and forwarded else typed
            tenant = self._verified(token)
            typed = None if token == typed else typed
        if typed is not None and typed != tenant:
            raise RequestError("TENANT", typed, "differs from the authenticated tenant; omit TENANT")
        return tenant

    def _verified(self, token: str | None) -> str:
        field = f"{self.header}/TENANT"
        if not token:
            raise RequestError(field, None, "missing: this deployment needs a signed tenant token")
        tenant, _, digest = token.rpartition(".")
        assert self._secret is not None
        if not tenant or not hmac.compare_digest(digest.encode(), _digest(tenant, self._secret).encode()):
            raise RequestError(field, "<token>", "is not a valid signed tenant token")
        return check_tenant(field, tenant)
