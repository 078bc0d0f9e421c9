"""Who may call what: the internal credential, the tenant a request belongs to, and per-tenant rate limits.

README "Security model" is the reviewer's view of this package."""
