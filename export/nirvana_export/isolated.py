"""Run one step of an export in a process of its own, so what it allocates is returned to the system when it ends.

A full-size export holds a module's fp32 weights, its traced graph, the ONNX proto and an onnxruntime session for the
check at once; in one process those of every sub-model pile up (the allocator does not hand freed memory back). In a
spawned child per sub-model the parent stays small and the peak is the largest single sub-model's, which each child
measures (its maximum resident set size) and returns beside its result.
"""

from __future__ import annotations

import multiprocessing
import resource
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

__all__ = ["ISOLATE_ABOVE_BYTES", "ChildDied", "peak_rss_bytes", "run_isolated"]

# Checkpoints whose weights are larger than this export one sub-model per process (the tiny models in-process: a
# child costs seconds of torch import, which the test suite would pay at every server it starts).
ISOLATE_ABOVE_BYTES = 1 << 30


class ChildDied(RuntimeError):
    """The process of an export step ended without an answer (killed: most often for memory)."""


def _measured(fn: Callable[..., Any], args: tuple) -> tuple[Any, int]:
    result = fn(*args)
    return result, peak_rss_bytes()


def run_isolated(fn: Callable[..., Any], *args: Any, what: str = "an export step") -> tuple[Any, int]:
    """``fn(*args)`` in a fresh spawned process → (its result, the child's peak RSS in bytes). Exceptions raised
    there are raised here (they must pickle, as ours do); a child that dies raises `ChildDied` naming ``what``."""
    context = multiprocessing.get_context("spawn")  # not fork: a copy of this process's torch state is what we avoid
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(_measured, fn, args).result()
        except BrokenProcessPool:
            raise ChildDied(
                f"the process exporting {what} died without an answer (killed for memory? a full-size UNet needs about "
                "3x its fp32 weights; in the chart raise modelRepository.buildResources)"
            ) from None


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (VmHWM: unlike getrusage's ru_maxrss, a spawned child's does not
    start from its parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
