"""Who may call what: the internal credential, the tenant a request belongs to, and per-tenant rate limits.

docs/security.md is the reviewer's view of this package."""
