"""Near-miss probing is counted per tenant in a window, and a tenant over the limit is flagged."""

from nirvana.cache.probing import ProbeMonitor


def test_flags_a_tenant_with_many_near_misses_and_forgets_after_the_window() -> None:
    now = [0.0]
    monitor = ProbeMonitor(margin=0.05, window_s=60, max_near_misses=3, clock=lambda: now[0])
    assert not monitor.observe("mallory", 0.30, 0.65)  # far below: an ordinary miss
    for _ in range(4):
        assert monitor.observe("mallory", 0.63, 0.65)
    monitor.observe("alice", 0.62, 0.65)
    assert monitor.suspects() == 1 and monitor.near_misses == 5
    now[0] = 61.0
    assert monitor.suspects() == 0
