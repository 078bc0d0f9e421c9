"""The mirror's kept eviction order is the order the LCBFU policy would get by sorting every entry, after any mix
of admissions, hits, removals and re-entered entries, globally and per tenant."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nirvana.cache.budget import Budget
from nirvana.cache.mirror import Mirror
from nirvana.cache.policy import EntryStats, LCBFUPolicy
from nirvana.cache.records import EntryMeta, PromptRecord
from nirvana.config import CacheConfig

DIM = 4
TENANTS = ("a", "b")

ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "hit", "pop", "replace"]),
        st.integers(1, 6),  # prompt id
        st.sampled_from([5, 10, 25]),  # K
        st.integers(0, 3),  # a small clock, so last-access ties happen
    ),
    max_size=60,
)


def _policy_order(mirror: Mirror, keep: int, tenant: str | None) -> list[tuple[int, int]]:
    """Every entry in the order `LCBFUPolicy.victims` evicts them (a budget of 1 entry with 1 incoming: all go)."""
    stats = [
        EntryStats(r.id, k, e.hits, e.last_access, e.nbytes)
        for r in mirror.records()
        if tenant is None or r.tenant == tenant
        for k, e in r.entries.items()
    ]
    victims = LCBFUPolicy(max_entries=1, min_entries_per_prompt=keep).victims(stats, incoming_entries=1)
    return [(v.prompt_id, v.k) for v in victims]


def _vector(prompt_id: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[prompt_id % DIM] = 1.0
    return v


loaded = st.dictionaries(  # prompts loaded in bulk at open: id → {K: (hits, last access)}
    st.integers(1, 6),
    st.dictionaries(st.sampled_from([5, 10, 25]), st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(loaded, ops, st.integers(0, 2))
def test_kept_order_equals_the_policy_sorting_every_entry(at_open, operations, keep) -> None:
    mirror = Mirror(DIM, keep_per_prompt=keep)
    mirror.add_many(
        [
            PromptRecord(
                prompt_id,
                f"p{prompt_id}",
                "key",
                TENANTS[prompt_id % 2],
                _vector(prompt_id),
                0.0,
                {k: EntryMeta(hits=h, last_access=float(t), nbytes=9) for k, (h, t) in entries.items()},
            )
            for prompt_id, entries in at_open.items()
        ]
    )
    for op, prompt_id, k, when in operations:
        record = mirror.get(prompt_id)
        if op == "admit":
            if record is None:
                tenant = TENANTS[prompt_id % 2]
                record = PromptRecord(prompt_id, f"p{prompt_id}", "key", tenant, _vector(prompt_id), 0.0)
                mirror.add(record)
            mirror.put_entry(record, k, EntryMeta(last_access=float(when), nbytes=100 + k))
        elif record is None or k not in record.entries:
            continue
        elif op == "hit":
            mirror.count_hit(record, k, "replica", float(when))
        elif op == "pop":
            mirror.pop_entry(prompt_id, k)
        else:  # another replica's merge: the prompt's entries replaced at once
            mirror.set_entries(record, {k: EntryMeta(hits=when, last_access=float(when), nbytes=7)})
    for tenant in (None, *TENANTS):
        kept = [(e.prompt_id, e.k) for e in mirror.in_eviction_order(tenant)]
        assert kept == _policy_order(mirror, keep, tenant)
    assert len(mirror.order) == mirror.entries


def test_a_reset_mirror_has_no_order() -> None:
    mirror = Mirror(DIM)
    record = PromptRecord(1, "p", "key", "a", _vector(1), 0.0, {25: EntryMeta(nbytes=1)})
    mirror.add(record)
    assert list(mirror.order.first()) == [(1, 25)]
    mirror.reset()
    assert list(mirror.order.first()) == [] and len(mirror.order) == 0


def test_eviction_stops_when_the_mirrors_own_bytes_fit() -> None:
    """A replica's disk total also counts latents it holds no entry for (other replicas', orphans kept): it says
    when to evict, but evicting stops once the entries this mirror holds fit, instead of emptying the mirror."""
    mirror = Mirror(DIM)
    for prompt_id in (1, 2, 3):
        mirror.add(PromptRecord(prompt_id, f"p{prompt_id}", "key", "a", _vector(prompt_id), 0.0))
        mirror.put_entry(mirror.get(prompt_id), 25, EntryMeta(last_access=float(prompt_id), nbytes=100))
    budget = Budget(CacheConfig(max_bytes=1000, max_entries_per_tenant=None, max_bytes_per_tenant=None))
    assert budget.victims(mirror, total_bytes=5000, tenant="a", incoming_entries=1, incoming_bytes=100) == []
    tight = Budget(CacheConfig(max_bytes=250, max_entries_per_tenant=None, max_bytes_per_tenant=None))
    victims = tight.victims(mirror, total_bytes=5000, tenant="a", incoming_entries=1, incoming_bytes=100)
    assert [(v.prompt_id, v.k) for v in victims] == [(1, 25), (2, 25)]  # 300 + 100 incoming → 200: two go, LRU first
