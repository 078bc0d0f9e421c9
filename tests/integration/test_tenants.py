"""Tenant isolation through the served model: one tenant's cached prompts never serve or inform another."""

from __future__ import annotations

import math

import pytest

from nirvana_client import GenerateOptions

pytestmark = pytest.mark.integration
SECRET = "confidential product launch: a purple giraffe wearing a golden crown"


def test_tenant_b_never_hits_or_sees_tenant_a(connect) -> None:
    client = connect("grpc")
    client.generate(SECRET, GenerateOptions(steps=6, tenant="alice", seed=1))
    # Bob asks for the very same prompt: no hit, and SIMILARITY says nothing about Alice's cache.
    probe = client.generate(SECRET, GenerateOptions(steps=6, tenant="bob", seed=1))
    assert not probe.cache_hit and probe.skipped_steps == 0 and math.isnan(probe.similarity)
    client.generate("a bowl of ramen on a wooden table", GenerateOptions(steps=6, tenant="bob"))
    probe = client.generate(SECRET, GenerateOptions(steps=6, tenant="bob", seed=2))
    # Only Bob's own prompts (his ramen, and the secret he generated himself) are candidates now.
    assert probe.cache_hit and probe.similarity == pytest.approx(1.0, abs=1e-4)
    assert client.generate(SECRET + "!", GenerateOptions(steps=6, tenant="alice")).cache_hit
    assert not client.generate(SECRET, GenerateOptions(steps=6, tenant="carol")).cache_hit
