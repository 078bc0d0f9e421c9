"""The cache's budgets: which entries to evict before an admission, per tenant first, then globally.

Without a per-tenant budget one tenant's admissions evict everyone's entries (and a tenant probing or flooding the
cache could empty it for the others). With tenant isolation on, an admission that takes its tenant partition over
`max_entries_per_tenant` / `max_bytes_per_tenant` evicts inside that partition first, in LCBFU order; the global
budget (`max_entries` / `max_bytes`) is then enforced as before, over every tenant's entries.

Victims are read from the start of the mirror's `EvictionOrder` (kept as entries change), so an admission at
capacity evicts just what it needs, at a cost that barely grows with the cache: a sort of every entry took 0.3 s
at 30k entries and grew with the cache (hence an earlier 2% slack that made it rare).
"""

from __future__ import annotations

from collections.abc import Iterable

from nirvana.cache.mirror import Mirror
from nirvana.cache.policy import BudgetInfeasible, EntryStats, LCBFUPolicy
from nirvana.config import CacheConfig


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
        incoming = (incoming_entries, incoming_bytes)
        with mirror.lock:
            if self.tenant_policy is not None:
                _check_fits(self.tenant_policy, "per-tenant budget", incoming)
                ordered = mirror.in_eviction_order(tenant)
                chosen = _take(self.tenant_policy, ordered, mirror.tenant_usage(tenant), incoming)
            _check_fits(self.policy, "budget", incoming)
            gone = {(v.prompt_id, v.k) for v in chosen}
            freed = sum(v.nbytes for v in chosen)
            left = (mirror.entries - len(chosen) + incoming_entries, total_bytes - freed + incoming_bytes)
            if self.policy.over_budget(*left):
                # Whether to evict: the store's bytes on disk; how far: the bytes of the entries the mirror holds,
                # the only ones eviction can free (a replica's disk total also counts other replicas' latents)
                held = (mirror.entries - len(chosen), mirror.entry_bytes - freed)
                others = (e for e in mirror.in_eviction_order() if (e.prompt_id, e.k) not in gone)
                chosen += _take(self.policy, others, held, incoming)
        return chosen


def _check_fits(policy: LCBFUPolicy, what: str, incoming: tuple[int, int]) -> None:
    """BudgetInfeasible when the incoming (entries, bytes) alone exceed `policy` (`what`: its name)."""
    if policy.over_budget(*incoming):
        raise BudgetInfeasible(
            f"incoming {incoming[0]} entries / {incoming[1]} bytes exceed the {what} "
            f"(max_entries={policy.max_entries}, max_bytes={policy.max_bytes})"
        )


def _take(
    policy: LCBFUPolicy, ordered: Iterable[EntryStats], held: tuple[int, int], incoming: tuple[int, int]
) -> list[EntryStats]:
    """The first of `ordered` (in eviction order) until what is `held` (entries, bytes) and what is `incoming`
    fit `policy`."""
    entries, nbytes = held[0] + incoming[0], held[1] + incoming[1]
    chosen = []
    for entry in ordered:
        if not policy.over_budget(entries, nbytes):
            break
        chosen.append(entry)
        entries, nbytes = entries - 1, nbytes - entry.nbytes
    return chosen
