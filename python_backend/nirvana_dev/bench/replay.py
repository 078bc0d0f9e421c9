"""`nirvana bench replay`: replay a prompt workload in-process and report what the cache saved.

The full pipeline runs every request on the configured checkpoint (a tiny random-weight model by default),
so hits, Ks and skipped steps are exactly what the service would do; UNet time is reported alongside.

With `compare_bypass` (the default) every request also runs with CACHE_MODE=bypass, in alternating blocks as
`nirvana-client replay --compare-bypass` does (bypass neither reads nor writes the cache, so the cached requests
see the cache exactly as without it); the cache efficiency figures (`nirvana_client.efficiency`) compare the two.
One bypass request, not recorded, warms the models up first.
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nirvana.config import load_config
from nirvana_client.efficiency import Sample, cache_efficiency
from nirvana_client.replay import CACHE_MODE, block_modes, blocks
from nirvana_client.workload import load_workload


def run_replay(
    workload: Path,
    checkpoint: Path | None = None,
    column: str | None = None,
    limit: int | None = None,
    steps: int = 50,
    tenant_column: str | None = None,
    config_path: Path | None = None,
    work_dir: Path | None = None,
    compare_bypass: bool = True,
    block_size: int = 25,
) -> dict:
    from nirvana.pipeline import Pipeline
    from nirvana_dev.tiny_model import make_tiny_model

    items = load_workload(workload, column, tenant_column=tenant_column, limit=limit)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        if checkpoint is None:
            checkpoint = make_tiny_model(Path(tmp) / "tiny-model")
        config = load_config({"checkpoint": str(checkpoint), "cache": {"dir": str(Path(tmp) / "cache")}}, config_path)
        pipe = Pipeline(config)
        results: dict[str, list] = {"cached": [], "bypass": []}
        try:
            if items:  # warm-up, not recorded: the first request pays for lazy initialisation
                pipe.generate(items[0].prompt, steps=steps, seed=items[0].seed, cache_mode="bypass")
            bar = tqdm(total=len(items) * (2 if compare_bypass else 1), desc="replay", unit="req")
            for number, block in enumerate(blocks(items, block_size if compare_bypass else max(1, len(items)))):
                for mode in block_modes(number, compare_bypass):
                    for item in block:
                        options = {"steps": steps, "tenant": item.tenant or "default", "seed": item.seed}
                        result = pipe.generate(item.prompt, cache_mode=CACHE_MODE[mode], **options)
                        results[mode].append((item.index, result))
                        bar.update(1)
            bar.close()
            cache_stats = pipe.cache.stats()
        finally:
            pipe.close()
    report = summarise([r for _, r in results["cached"]], steps, str(workload), cache_stats)
    return report | efficiency_report(results, compare_bypass)


def efficiency_report(results: dict[str, list], compare_bypass: bool) -> dict:
    """Bypass latency and the cache efficiency figures; per-request rows first, so the summary prints last."""
    samples = [
        Sample(mode, r.steps, r.skipped_steps, r.cache_hit, r.timings_ms, index)
        for mode, pairs in results.items()
        for index, r in pairs
    ]
    figures = cache_efficiency(samples)
    bypass_ms = [r.timings_ms["total_ms"] for _, r in results["bypass"]]
    return {
        "compare_bypass": compare_bypass,
        "bypass_latency_ms": {"mean": float(np.mean(bypass_ms)), "p50": float(np.percentile(bypass_ms, 50))}
        if bypass_ms
        else None,
        "per_request_efficiency": figures.pop("requests", []),
        "cache_efficiency": figures,
    }


def summarise(results: list, steps: int, workload: str, cache_stats: dict) -> dict:
    hits = [r for r in results if r.cache_hit]
    skipped = sum(r.skipped_steps for r in results)
    reasons = collections.Counter(r.reason for r in results)
    total_ms = np.array([r.timings_ms["total_ms"] for r in results]) if results else np.zeros(1)

    def stage(name: str) -> dict[str, float]:
        values = [r.timings_ms[name] for r in results if name in r.timings_ms]
        if not values:
            return {}
        return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}

    return {
        "workload": workload,
        "requests": len(results),
        "steps_per_request": steps,
        "hit_rate": len(hits) / max(1, len(results)),
        "k_histogram": dict(sorted(collections.Counter(r.skipped_steps for r in hits).items())),
        "steps_saved_fraction": skipped / max(1, len(results) * steps),
        "unet_steps_run": len(results) * steps - skipped,
        "miss_reasons": {k: v for k, v in reasons.items() if k != "hit"},
        "latency_ms": {"mean": float(total_ms.mean()), "p50": float(np.percentile(total_ms, 50))},
        "stage_ms": {
            s: stage(s)
            for s in ("embed_ms", "search_ms", "select_ms", "latent_load_ms", "unet_ms", "decode_ms", "admit_ms")
        },
        "cache": cache_stats,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
