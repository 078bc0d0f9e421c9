"""The cache's budgets: which entries to evict before an admission, per tenant first, then globally.

Without a per-tenant budget one tenant's admissions evict everyone's entries (and a tenant probing or flooding the
cache could empty it for the others). With tenant isolation on, an admission that takes its tenant partition over
`max_entries_per_tenant` / `max_bytes_per_tenant` evicts inside that partition first, in LCBFU order; the global
budget (`max_entries` / `max_bytes`) is then enforced as before, over every tenant's entries. Both evict a little
below the limit (`EVICTION_SLACK`) so that eviction, a scan of the entries, runs rarely.
"""

from __future__ import annotations

from nirvana.cache.mirror import Mirror
from nirvana.cache.policy import BudgetInfeasible, EntryStats, LCBFUPolicy
from nirvana.config import CacheConfig

EVICTION_SLACK = 0.02  # evict 2% below the budget so eviction (a scan of all entries) runs rarely


class Budget:
    """The global LCBFU policy and, with tenant isolation on and a cap set, the per-tenant one."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.policy = LCBFUPolicy(config.max_entries, config.max_bytes, config.min_entries_per_prompt)
        capped = config.max_entries_per_tenant is not None or config.max_bytes_per_tenant is not None
        self.tenant_policy = (
            LCBFUPolicy(config.max_entries_per_tenant, config.max_bytes_per_tenant, config.min_entries_per_prompt)
            if capped and config.tenant_isolation
            else None
        )

    def victims(
        self, mirror: Mirror, total_bytes: int, tenant: str, incoming_entries: int, incoming_bytes: int
    ) -> list[EntryStats]:
        """Entries to evict so that `incoming_*` fit the tenant's budget, then the global one. BudgetInfeasible
        when the incoming entries alone exceed either."""
        chosen: list[EntryStats] = []
        if self.tenant_policy is not None:
            entries, nbytes = mirror.tenant_usage(tenant)
            if self.tenant_policy.over_budget(entries + incoming_entries, nbytes + incoming_bytes):
                chosen = _with_slack(self.tenant_policy, mirror.entry_stats(tenant), incoming_entries, incoming_bytes)
            elif self.tenant_policy.over_budget(incoming_entries, incoming_bytes):
                raise BudgetInfeasible(
                    f"incoming {incoming_entries} entries / {incoming_bytes} bytes exceed the per-tenant budget"
                )
        gone = {(v.prompt_id, v.k) for v in chosen}
        left_entries = mirror.entries - len(chosen) + incoming_entries
        left_bytes = total_bytes - sum(v.nbytes for v in chosen) + incoming_bytes
        if self.policy.over_budget(left_entries, left_bytes):
            stats = [e for e in mirror.entry_stats() if (e.prompt_id, e.k) not in gone]
            chosen += _with_slack(self.policy, stats, incoming_entries, incoming_bytes)
        elif self.policy.over_budget(incoming_entries, incoming_bytes):
            raise BudgetInfeasible(f"incoming {incoming_entries} entries / {incoming_bytes} bytes exceed the budget")
        return chosen


def _with_slack(
    policy: LCBFUPolicy, stats: list[EntryStats], incoming_entries: int, incoming_bytes: int
) -> list[EntryStats]:
    slack_entries = int((policy.max_entries or 0) * EVICTION_SLACK)
    slack_bytes = int((policy.max_bytes or 0) * EVICTION_SLACK)
    try:
        return policy.victims(stats, incoming_entries + slack_entries, incoming_bytes + slack_bytes)
    except BudgetInfeasible:  # the slack does not fit a tiny budget: evict just enough
        return policy.victims(stats, incoming_entries, incoming_bytes)
