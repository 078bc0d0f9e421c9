"""Replica kinds (a GPU's UNet step-cost curve and per-request fixed costs) and pool specs such as "h100:8,l4:8".

The one measured curve is the H200's, from this project. Other kinds are that curve scaled by the ratio of
published Stable Diffusion 1.5 (512×512, fp16, 50 steps, batch 1) image latencies, each cited beside it. The
ratios mix software stacks (ONNX Runtime, PyTorch, A1111), so they are coarse: a measured curve plugged in
through a kinds file (`load_kinds`) always beats them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nirvana_client.routing import StepCost


@dataclass(frozen=True)
class GpuKind:
    """One replica kind: ms of one UNet execution by row count, and per-request ms outside the step loop.

    `shared_slowdown`: the time factor of all its work while another replica on its host holds work (2 CPU
    servers on one machine's cores; 1.0 for a GPU of its own). Only used where the simulation is given hosts.
    `by_in_flight`: `step_cost` is indexed by requests the replica holds, its outside-the-loop ms included (2 rows
    each), as a balancer learns it from answers (`ReplicaCost`), not by rows in the UNet batch (published curves).
    """

    name: str
    step_cost: StepCost
    encode_ms: float
    decode_ms: float
    cache_ms: float
    shared_slowdown: float = 1.0
    by_in_flight: bool = False

    def __post_init__(self) -> None:
        if self.shared_slowdown < 1.0:
            raise ValueError(f"kind {self.name!r}: shared_slowdown must be >= 1, got {self.shared_slowdown}")

    def fixed_ms(self, cache: bool) -> float:
        """Per-request ms added to its latency outside the shared step loop (cache path only when on)."""
        return self.encode_ms + self.decode_ms + (self.cache_ms if cache else 0.0)


# SD1.5-size UNet, fp16, measured on an H200 in this project (20-step runs; ms per execution at rows 1/2/4/8/16).
H200_STEP_COST = StepCost((1, 2, 4, 8, 16), (24.4, 23.7, 25.0, 30.1, 50.1))
# Documented assumptions, not measurements: text encode 5 ms, VAE decode 25 ms, cache lookup/store path 3 ms.
H200_ENCODE_MS, H200_DECODE_MS, H200_CACHE_MS = 5.0, 25.0, 3.0

# Time factor of each kind relative to the H200 (2.0 = every GPU cost twice as long). Encode and decode run on
# the GPU and scale with it; the cache path (vector search, latent store) runs off the GPU and does not.
SLOWDOWN_VS_H200 = {
    "h200": 1.0,
    # H100 SXM: the same Hopper compute as the H200 (1,979 FP16 TFLOPS with sparsity on both); only memory
    # differs, and a 512×512 UNet step is compute-bound. https://www.morphllm.com/nvidia-h200 (citing NVIDIA's
    # H200 spec page).
    "h100": 1.0,
    # A100: 1.1 s (A100-SXM4-40GB, ONNX Runtime 1.14.1 CUDA EP) against 0.588 s on H100 80GB HBM3 for the same
    # benchmark.py SD1.5 pipeline → 1.1 / 0.588 = 1.87.
    # https://github.com/microsoft/onnxruntime/blob/main/onnxruntime/python/tools/transformers/models/stable_diffusion/README.md
    # https://github.com/microsoft/onnxruntime/pull/22834
    "a100": 1.1 / 0.588,
    # A10 (not the AWS A10G, for which no SD figure was found): SD1.5 PyTorch 50 iterations 2.95 s
    # (https://huggingface.co/Deci/DeciDiffusion-v1-0) against 1.5 s on A100 with PyTorch 2.0 (ONNX Runtime
    # README above) → 2.95 / 1.5 × 1.87 = 3.68.
    "a10": 2.95 / 1.5 * (1.1 / 0.588),
    # L4, the weakest figure (a chain of three sources): ~2.5 s for 25 steps with A1111 + xformers
    # (https://www.runpod.io/articles/guides/stable-diffusion-l4-gpus), so ~5.0 s for 50; T4 takes 6.9 s with
    # PyTorch + xformers, and T4 / A100 = 6.4 / 1.5 with PyTorch 2.0 (ONNX Runtime README above)
    # → 5.0 / 6.9 × 6.4 / 1.5 × 1.87 = 5.79.
    "l4": 5.0 / 6.9 * 6.4 / 1.5 * (1.1 / 0.588),
}


def _scaled_kind(name: str, factor: float) -> GpuKind:
    return GpuKind(
        name=name,
        step_cost=H200_STEP_COST.scaled(factor),
        encode_ms=H200_ENCODE_MS * factor,
        decode_ms=H200_DECODE_MS * factor,
        cache_ms=H200_CACHE_MS,
    )


BUILTIN_KINDS: dict[str, GpuKind] = {name: _scaled_kind(name, f) for name, f in SLOWDOWN_VS_H200.items()}


def load_kinds(path: Path) -> dict[str, GpuKind]:
    """Kinds from a JSON file: {"name": {"rows": [...], "ms": [...], "encode_ms": x, "decode_ms": y, "cache_ms": z}}
    (optionally "shared_slowdown", and "by_in_flight": true for a curve a balancer learnt by requests in flight)."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a JSON object of kinds, got {type(raw).__name__}")
    kinds = {}
    for name, spec in raw.items():
        missing = {"rows", "ms", "encode_ms", "decode_ms", "cache_ms"} - set(spec)
        if missing:
            raise ValueError(f"{path}: kind {name!r} lacks {', '.join(sorted(missing))}")
        kinds[name] = GpuKind(
            name=name,
            step_cost=StepCost(tuple(int(r) for r in spec["rows"]), tuple(float(m) for m in spec["ms"])),
            encode_ms=float(spec["encode_ms"]),
            decode_ms=float(spec["decode_ms"]),
            cache_ms=float(spec["cache_ms"]),
            shared_slowdown=float(spec.get("shared_slowdown", 1.0)),
            by_in_flight=bool(spec.get("by_in_flight", False)),
        )
    return kinds


def parse_pool(spec: str, kinds: dict[str, GpuKind]) -> list[GpuKind]:
    """ "h100:8,l4:8" → 8 H100 kinds then 8 L4 kinds (one entry per replica, in the order given)."""
    pool: list[GpuKind] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        if name not in kinds:
            raise ValueError(f"unknown replica kind {name!r} in {spec!r}; known: {', '.join(sorted(kinds))}")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"replica count must be a positive integer in {part!r} (like 'h100:8')")
        pool.extend([kinds[name]] * int(count))
    if not pool:
        raise ValueError(f"empty pool spec {spec!r}; expected like 'h100:8,l4:8'")
    return pool
