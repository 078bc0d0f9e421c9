"""Per-tenant token buckets: a burst, then the sustained rate; other tenants untouched; memory bounded."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nirvana.security.ratelimit import RateLimited, TenantBuckets


def test_burst_then_rate_per_tenant() -> None:
    now = [0.0]
    buckets = TenantBuckets(rate=4.0, burst=2, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [None, None, pytest.approx(0.25)]
    assert buckets.take("b") is None  # another tenant has its own bucket
    now[0] = 0.25
    assert buckets.take("a") is None and buckets.refused == 1


def test_zero_rate_turns_it_off() -> None:
    buckets = TenantBuckets(rate=0, burst=1)
    assert not buckets.enabled and all(buckets.take("a") is None for _ in range(100))


def test_retry_hint_is_rounded_up_to_a_tenth() -> None:
    assert "retry in 0.1 s" in str(RateLimited(0.0001)) and RateLimited(1.26).retry_after_s == 1.3


@given(st.lists(st.text(min_size=1, max_size=4), max_size=300), st.integers(1, 8))
def test_never_more_than_burst_plus_rate_times_time_and_memory_bounded(tenants, burst) -> None:
    now = [0.0]
    buckets = TenantBuckets(rate=1.0, burst=burst, max_tenants=16, clock=lambda: now[0])
    granted: dict[str, int] = {}
    for tenant in tenants:
        now[0] += 0.01
        if buckets.take(tenant) is None:
            granted[tenant] = granted.get(tenant, 0) + 1
        assert len(buckets._buckets) <= 16
    if len(set(tenants)) <= 16:  # nothing forgotten: the bound holds exactly
        assert all(n <= burst + now[0] * 1.0 + 1e-9 for n in granted.values())
