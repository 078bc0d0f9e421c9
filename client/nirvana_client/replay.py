"""Replay a workload against a running server, optionally with every request repeated under CACHE_MODE=bypass.

Cache on vs off, side by side: with `compare_bypass` the workload is cut into blocks of `block_size` requests;
each block runs twice back to back, once with CACHE_MODE=auto and once with CACHE_MODE=bypass (same prompts,
seeds and arrival pattern), and the order alternates from block to block (auto first, then bypass first).
Why blocks rather than one bypass pass after the whole run: on a shared, noisy machine the two modes then see
the same background load within seconds of each other, and alternating the order cancels what going first or
second does to a block. Why not pair single requests: each mode needs stretches of its own to measure its
throughput, and within a block the pacing (trace, Poisson, closed loop) is the real one. Bypass requests
neither read nor write the cache, so the cached requests see the cache warm exactly as without the comparison.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

from nirvana_client.client import GenerateOptions, NirvanaClient, Protocol
from nirvana_client.load import Deadline, Timing, run, schedule
from nirvana_client.workload import WorkItem

MODES = ("cached", "bypass")
CACHE_MODE = {"cached": "auto", "bypass": "bypass"}  # our mode name -> the CACHE_MODE input sent


@dataclass(frozen=True)
class ReplayOptions:
    """Where to send and how. `steps` is sent with every request (the report's step total needs it)."""

    url: str
    protocol: Protocol = "grpc"
    steps: int = 50
    guidance: float | None = None
    negative_prompt: str | None = None
    tenant: str | None = None
    timing: Timing = field(default_factory=Timing)
    compare_bypass: bool = False
    block_size: int = 25
    max_seconds: float | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be at least 1")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}: must be at least 1")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds={self.max_seconds}: must be positive")


@dataclass
class Record:
    """One request: its response (`ok`) or its error. Times in seconds from the start of the run."""

    index: int
    mode: str  # cached | bypass
    block: int
    prompt: str
    seed: int
    steps: int
    sent_s: float
    latency_ms: float
    ok: bool
    error: str | None = None
    cache_hit: bool = False
    skipped_steps: int = 0
    similarity: float | None = None
    server_timings_ms: dict[str, float] = field(default_factory=dict)
    schedule_lag_ms: float | None = None  # open loop: how late it left against its schedule

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ReplayRun:
    """What a replay produced: every record, the wall time each mode ran, and requests left unsent."""

    records: list[Record]
    mode_wall_s: dict[str, float]
    wall_s: float
    not_sent: dict[str, int]
    started_at: str


class ClientPool:
    """Clients shared by the worker threads of all blocks; one client per concurrent request, made on demand."""

    def __init__(self, factory: Callable[[], NirvanaClient]) -> None:
        self._factory = factory
        self._idle: queue.SimpleQueue[NirvanaClient] = queue.SimpleQueue()
        self._made: list[NirvanaClient] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[NirvanaClient]:
        try:
            client = self._idle.get_nowait()
        except queue.Empty:
            client = self._factory()
            with self._lock:
                self._made.append(client)
        try:
            yield client
        finally:
            self._idle.put(client)

    def close(self) -> None:
        """Close every client: an open HTTP connection would delay the server's shutdown."""
        for client in self._made:
            client.close()


def blocks(items: Sequence[WorkItem], size: int) -> list[Sequence[WorkItem]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def block_modes(block: int, compare_bypass: bool) -> tuple[str, ...]:
    """Mode order of a block: cached only, or both with the order alternating."""
    if not compare_bypass:
        return ("cached",)
    return MODES if block % 2 == 0 else MODES[::-1]


class Replayer:
    """Sends the requests of a run and turns each answer into a `Record`."""

    def __init__(self, options: ReplayOptions, on_record: Callable[[Record], None] | None = None) -> None:
        self.options = options
        self.on_record = on_record
        self.pool = ClientPool(lambda: NirvanaClient(options.url, options.protocol, timeout_s=options.timeout_s))
        self.t0 = time.perf_counter()

    def send(self, item: WorkItem, mode: str, block: int, scheduled_at: float | None) -> Record:
        o = self.options
        tenant = item.tenant if item.tenant is not None else o.tenant  # a tenant column wins over --tenant
        request = GenerateOptions(o.negative_prompt, item.seed, o.steps, o.guidance, CACHE_MODE[mode], tenant)
        with self.pool.borrow() as client:
            sent = time.perf_counter()
            lag = None if scheduled_at is None else max(0.0, sent - scheduled_at) * 1e3
            base = {"index": item.index, "mode": mode, "block": block, "prompt": item.prompt, "seed": item.seed}
            base |= {"steps": o.steps, "sent_s": sent - self.t0, "schedule_lag_ms": lag}
            try:
                res = client.generate(item.prompt, request)
            except Exception as err:  # tritonclient raises its own and socket errors; both are data here
                message = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
                record = Record(**base, latency_ms=(time.perf_counter() - sent) * 1e3, ok=False, error=message)
            else:
                record = Record(
                    **base,
                    latency_ms=res.latency_ms,
                    ok=True,
                    cache_hit=res.cache_hit,
                    skipped_steps=res.skipped_steps,
                    similarity=res.similarity,
                    server_timings_ms=res.server_timings_ms,
                )
        if self.on_record is not None:
            self.on_record(record)
        return record

    def run_block(self, items: Sequence[WorkItem], mode: str, block: int, deadline: Deadline) -> list[Record | None]:
        timing = self.options.timing
        offsets = schedule(timing, len(items), [item.timestamp_s for item in items])
        return run(items, lambda item, at: self.send(item, mode, block, at), timing, deadline, offsets)

    def close(self) -> None:
        self.pool.close()


def replay(
    items: Sequence[WorkItem], options: ReplayOptions, on_record: Callable[[Record], None] | None = None
) -> ReplayRun:
    """Replay `items` (in order) against the server; stops at the end or after `options.max_seconds`."""
    if options.timing.mode == "trace":
        schedule(options.timing, len(items), [item.timestamp_s for item in items])  # fail before sending anything
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    replayer = Replayer(options, on_record)
    deadline = Deadline(options.max_seconds)
    size = options.block_size if options.compare_bypass else max(1, len(items))  # one block: pacing unbroken
    modes = MODES if options.compare_bypass else ("cached",)
    records: list[Record] = []
    wall = dict.fromkeys(modes, 0.0)
    try:
        for number, block in enumerate(blocks(items, size)):
            if deadline.expired():
                break
            for mode in block_modes(number, options.compare_bypass):
                start = time.perf_counter()
                done = replayer.run_block(block, mode, number, deadline)
                wall[mode] += time.perf_counter() - start
                records.extend(r for r in done if r is not None)
    finally:
        replayer.close()
    not_sent = {m: len(items) - sum(r.mode == m for r in records) for m in modes}
    return ReplayRun(records, wall, time.perf_counter() - replayer.t0, not_sent, started_at)
