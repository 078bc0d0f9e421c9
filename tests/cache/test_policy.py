"""LCBFU eviction policy (nirvana.cache.policy): examples and hypothesis properties."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nirvana.cache.policy import (
    BudgetInfeasible,
    EntryStats,
    InvalidBudget,
    LCBFUPolicy,
    emptied_prompts,
    eviction_order,
)


def entry(prompt_id: int, k: int, hits: int = 0, last_access: float = 0.0, nbytes: int = 10) -> EntryStats:
    return EntryStats(prompt_id=prompt_id, k=k, hits=hits, last_access=last_access, nbytes=nbytes)


# --- examples -------------------------------------------------------------------------------------------------------


def test_score_is_hits_times_k() -> None:
    assert entry(1, 25, hits=0).score == 0
    assert entry(1, 25, hits=3).score == 75


def test_lowest_score_goes_first() -> None:
    entries = [entry(1, 25, hits=2), entry(2, 5, hits=3), entry(3, 10, hits=1)]  # scores 50, 15, 10
    victims = LCBFUPolicy(max_entries=1).victims(entries)
    assert [(v.prompt_id, v.score) for v in victims] == [(3, 10), (2, 15)]


def test_ties_go_least_recently_used_first() -> None:
    entries = [entry(1, 5, last_access=30.0), entry(2, 25, last_access=10.0), entry(3, 10, last_access=20.0)]
    victims = LCBFUPolicy(max_entries=2).victims(entries)
    assert victims == [entries[1]]  # all score 0; oldest access loses, whatever its K


def test_within_budget_evicts_nothing() -> None:
    entries = [entry(1, 5), entry(1, 10)]
    assert LCBFUPolicy(max_entries=2, max_bytes=20).victims(entries) == []
    assert LCBFUPolicy().victims(entries, incoming_entries=100, incoming_bytes=10**9) == []


def test_incoming_entries_make_room() -> None:
    entries = [entry(1, 5, hits=1), entry(1, 10, hits=1), entry(2, 25, hits=1)]
    victims = LCBFUPolicy(max_entries=4).victims(entries, incoming_entries=3)
    assert [(v.prompt_id, v.k) for v in victims] == [(1, 5), (1, 10)]


def test_byte_budget_stops_as_soon_as_met() -> None:
    entries = [entry(1, 5, nbytes=100), entry(2, 5, hits=1, nbytes=10), entry(3, 5, hits=2, nbytes=10)]
    policy = LCBFUPolicy(max_bytes=100)
    assert policy.victims(entries) == [entries[0]]
    assert policy.victims(entries, incoming_bytes=85) == [entries[0], entries[1]]


def test_prompt_whose_last_latent_goes_is_reported() -> None:
    entries = [entry(1, 5), entry(1, 10, hits=1), entry(2, 5, hits=5), entry(3, 25, hits=9)]
    victims = LCBFUPolicy(max_entries=1).victims(entries)
    assert {(v.prompt_id, v.k) for v in victims} == {(1, 5), (1, 10), (2, 5)}
    assert emptied_prompts(entries, victims) == {1, 2}
    assert emptied_prompts(entries, victims[:1]) == set()


def test_min_entries_per_prompt_keeps_small_k_latents() -> None:
    # Prompt 1 has one popular entry; prompt 2 has five large-K entries with more hits each.
    entries = [entry(1, 5, hits=2)] + [entry(2, k, hits=4, last_access=k) for k in (5, 10, 15, 20, 25)]
    plain = LCBFUPolicy(max_entries=4).victims(entries)
    assert [(v.prompt_id, v.k) for v in plain] == [(1, 5), (2, 5)]
    protective = LCBFUPolicy(max_entries=4, min_entries_per_prompt=1).victims(entries)
    assert [(v.prompt_id, v.k) for v in protective] == [(2, 5), (2, 10)]


def test_budget_beats_min_entries_per_prompt() -> None:
    entries = [entry(p, 5, hits=p) for p in range(4)]  # every entry protected by min=1
    victims = LCBFUPolicy(max_entries=2, min_entries_per_prompt=1).victims(entries)
    assert [v.prompt_id for v in victims] == [0, 1]


def test_incoming_larger_than_budget_is_infeasible() -> None:
    policy = LCBFUPolicy(max_entries=3, max_bytes=1000)
    assert policy.over_budget(5, 0)
    with pytest.raises(BudgetInfeasible, match="5 entries"):
        policy.victims([entry(1, 5)], incoming_entries=5)
    with pytest.raises(BudgetInfeasible):
        policy.victims([], incoming_bytes=1001)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_entries": 0}, "max_entries must be an int >= 1 or None, got 0"),
        ({"max_bytes": -5}, "max_bytes must be an int >= 1 or None, got -5"),
        ({"max_bytes": 1.5}, "max_bytes must be an int >= 1 or None, got 1.5"),
        ({"max_entries": True}, "max_entries must be an int >= 1 or None, got True"),
        ({"min_entries_per_prompt": -1}, "min_entries_per_prompt must be an int >= 0, got -1"),
        ({"min_entries_per_prompt": None}, "min_entries_per_prompt must be an int >= 0, got None"),
    ],
)
def test_invalid_limits_name_field_and_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(InvalidBudget) as info:
        LCBFUPolicy(**kwargs)
    assert needle in str(info.value)


# --- properties -----------------------------------------------------------------------------------------------------


@st.composite
def caches(draw: st.DrawFn) -> list[EntryStats]:
    """Up to 30 entries with unique (prompt_id, k); small value ranges so that ties are common."""
    keys = draw(
        st.lists(
            st.tuples(st.integers(0, 5), st.sampled_from([1, 2, 3, 5, 10, 15, 20, 25])),
            unique=True,
            max_size=30,
        )
    )
    return [
        EntryStats(
            prompt_id=p,
            k=k,
            hits=draw(st.integers(0, 4)),
            last_access=draw(st.sampled_from([0.0, 1.0, 2.5, 3.0])),
            nbytes=draw(st.integers(1, 100)),
        )
        for p, k in keys
    ]


policies = st.builds(
    LCBFUPolicy,
    max_entries=st.none() | st.integers(1, 25),
    max_bytes=st.none() | st.integers(1, 2000),
    min_entries_per_prompt=st.integers(0, 3),
)
incoming = st.tuples(st.integers(0, 3), st.integers(0, 150))


def protected_entries(entries: list[EntryStats], minimum: int) -> set[EntryStats]:
    """Each prompt's best ``minimum`` entries: the last ones in eviction order."""
    by_prompt: dict[int, list[EntryStats]] = {}
    for e in sorted(entries, key=eviction_order):
        by_prompt.setdefault(e.prompt_id, []).append(e)
    return {e for group in by_prompt.values() for e in group[max(0, len(group) - minimum) :]} if minimum else set()


def usage_after(entries: list[EntryStats], evicted: list[EntryStats], extra: tuple[int, int]) -> tuple[int, int]:
    gone = set(evicted)
    kept = [e for e in entries if e not in gone]
    return len(kept) + extra[0], sum(e.nbytes for e in kept) + extra[1]


@settings(max_examples=300, deadline=None)
@given(entries=caches(), policy=policies, extra=incoming)
def test_budget_met_whenever_feasible(entries: list[EntryStats], policy: LCBFUPolicy, extra: tuple[int, int]) -> None:
    if policy.over_budget(*extra):
        with pytest.raises(BudgetInfeasible):
            policy.victims(entries, *extra)
        return
    victims = policy.victims(entries, *extra)
    assert len(set(victims)) == len(victims) and set(victims) <= set(entries)
    assert not policy.over_budget(*usage_after(entries, victims, extra))
    if not policy.over_budget(*usage_after(entries, [], extra)):
        assert victims == []


@settings(max_examples=300, deadline=None)
@given(entries=caches(), policy=policies, extra=incoming)
def test_victims_are_minimal(entries: list[EntryStats], policy: LCBFUPolicy, extra: tuple[int, int]) -> None:
    if policy.over_budget(*extra):
        return
    victims = policy.victims(entries, *extra)
    if victims:
        assert policy.over_budget(*usage_after(entries, victims[:-1], extra))


@settings(max_examples=300, deadline=None)
@given(entries=caches(), policy=policies, extra=incoming)
def test_victims_precede_survivors_in_lcbfu_order(
    entries: list[EntryStats], policy: LCBFUPolicy, extra: tuple[int, int]
) -> None:
    if policy.over_budget(*extra):
        return
    victims = policy.victims(entries, *extra)
    survivors = set(entries) - set(victims)
    protected = protected_entries(entries, policy.min_entries_per_prompt)
    for victim in victims:
        for survivor in survivors:
            # The one exception: the first pass skips protected entries, so they may rank below a victim.
            if survivor in protected and victim not in protected:
                continue
            assert eviction_order(victim) < eviction_order(survivor)


@settings(max_examples=300, deadline=None)
@given(entries=caches(), policy=policies, extra=incoming)
def test_min_entries_per_prompt_respected_when_budget_allows(
    entries: list[EntryStats], policy: LCBFUPolicy, extra: tuple[int, int]
) -> None:
    if policy.over_budget(*extra):
        return
    protected = protected_entries(entries, policy.min_entries_per_prompt)
    if policy.over_budget(*usage_after(entries, [e for e in entries if e not in protected], extra)):
        return  # the budget cannot be met without breaking the minimum
    victims = policy.victims(entries, *extra)
    before = Counter(e.prompt_id for e in entries)
    after = Counter(e.prompt_id for e in set(entries) - set(victims))
    for prompt_id, count in before.items():
        assert after[prompt_id] >= min(count, policy.min_entries_per_prompt)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), entries=caches(), policy=policies, extra=incoming)
def test_victims_do_not_depend_on_input_order(
    data: st.DataObject, entries: list[EntryStats], policy: LCBFUPolicy, extra: tuple[int, int]
) -> None:
    if policy.over_budget(*extra):
        return
    shuffled = data.draw(st.permutations(entries))
    assert policy.victims(shuffled, *extra) == policy.victims(entries, *extra)
    assert policy.victims(iter(entries), *extra) == policy.victims(entries, *extra)


@settings(max_examples=200, deadline=None)
@given(entries=caches(), policy=policies, extra=incoming)
def test_emptied_prompts_are_exactly_those_without_survivors(
    entries: list[EntryStats], policy: LCBFUPolicy, extra: tuple[int, int]
) -> None:
    if policy.over_budget(*extra):
        return
    victims = policy.victims(entries, *extra)
    survivors = set(entries) - set(victims)
    expected = {e.prompt_id for e in entries} - {e.prompt_id for e in survivors}
    assert emptied_prompts(entries, victims) == expected
