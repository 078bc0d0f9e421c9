"""A client-side balancer over several nirvana-triton replicas, placing each request by a routing policy.

The replica servers are unchanged: everything a policy needs is kept here, from what this client sent and what the
replicas answered. Per replica it holds

* the requests it has in flight (steps each is expected to run, when it was sent), and
* an online cost model learnt from that replica's own responses (`ReplicaCost`): the per-request fixed ms
  (TIMINGS total_ms − unet_ms) and UNet ms per denoising step against how many requests were in flight on the
  replica while the request ran. Requests in flight share one UNet execution per step (2 rows each), so that
  count, doubled, is the row axis of a `StepCost` curve.

Steps a request will run are N − K, and K (the steps a cache hit skips) is only known once the server has looked
the prompt up. The balancer guesses it as the pool's running mean of skipped steps over the cached requests
answered so far (misses count as K = 0), so a hit is predicted too slow and a miss too fast by about that mean;
`error_summary()` reports the prediction error of hits and misses separately to show what the guess costs.
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from nirvana_client.client import GenerateOptions, GenerateResult, NirvanaClient, Protocol
from nirvana_client.load import Deadline, Timing, run, schedule
from nirvana_client.routing import PredictedCompletion, ReplicaState, StepCost, make_policy, predict_drain_ms

# (replica index, prompt, options) → the replica's answer; NirvanaClient by default, a stub in tests.
Send = Callable[[int, str, GenerateOptions], GenerateResult]
DEFAULT_STEPS = 50  # what the server runs when a request does not say (the engine's default N)


def expand_urls(urls: Sequence[str]) -> list[str]:
    """``dns:HOST:PORT`` → ``IP:PORT`` for every address HOST resolves to (a Kubernetes headless Service lists each
    ready pod), in a stable order; other URLs as given. ValueError names a name that does not resolve."""
    out: list[str] = []
    for url in urls:
        if not url.startswith("dns:"):
            out.append(url)
            continue
        host, _, port = url.removeprefix("dns:").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{url!r}: write dns:HOST:PORT")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise ValueError(f"{url!r}: {host} does not resolve ({err.strerror})") from None
        addresses = sorted({info[4][0] for info in infos})
        out += [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]
    return out


class ReplicaCost:
    """Online cost model of one replica: EWMA per-request fixed ms, and EWMA UNet ms/step per concurrency level.

    Not thread-safe on its own: the balancer updates it under its lock.
    """

    def __init__(self, alpha: float = 0.3, max_active: int = 8) -> None:
        self.alpha, self.max_active = alpha, max_active
        self.fixed_ms: dict[str, float] = {}  # by cache path: "bypass" (no lookup/admit) or "cached"
        self.step_ms: dict[int, float] = {}  # requests in flight (1..max_active) → ms per step
        self.observations = 0

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)

    def observe(self, concurrency: float, steps_run: int, timings_ms: dict[str, float], bypass: bool) -> None:
        """Learn from one answer: `concurrency` = mean requests in flight on the replica while it ran."""
        total, unet = timings_ms.get("total_ms"), timings_ms.get("unet_ms")
        if total is None or unet is None:
            return  # a server without TIMINGS teaches nothing
        path = "bypass" if bypass else "cached"
        self.fixed_ms[path] = self._ewma(self.fixed_ms.get(path), max(total - unet, 0.0))
        if steps_run > 0 and unet > 0:
            level = min(max(round(concurrency), 1), self.max_active)
            self.step_ms[level] = self._ewma(self.step_ms.get(level), unet / steps_run)
        self.observations += 1

    def fixed(self, bypass: bool) -> float:
        """Fixed ms of a request on this path; the other path's figure until this one has been seen."""
        path = "bypass" if bypass else "cached"
        other = "cached" if bypass else "bypass"
        return self.fixed_ms.get(path, self.fixed_ms.get(other, 0.0))

    def curve(self) -> StepCost | None:
        """The learnt ms/step by rows (2 per request); None before any answer. More rows are never cheaper (a
        running maximum), so noise at one level cannot make a busier replica look faster."""
        if not self.step_ms:
            return None
        levels = sorted(self.step_ms)
        ms = np.maximum.accumulate([self.step_ms[level] for level in levels])
        return StepCost(tuple(2 * level for level in levels), tuple(float(m) for m in ms))


@dataclass
class InFlight:
    """One request a replica holds: steps it is expected to run, and when it was sent (clock seconds)."""

    steps: int
    sent_at: float
    area_at_send: float  # the replica's ∫ in-flight dt at send: its mean concurrency comes from the difference


@dataclass(frozen=True)
class Prediction:
    """Predicted vs actual server time (TIMINGS total_ms) of one answered request."""

    replica: int
    predicted_ms: float
    actual_ms: float
    cache_hit: bool
    expected_steps: int
    steps_run: int

    @property
    def relative_error(self) -> float:
        return abs(self.predicted_ms - self.actual_ms) / self.actual_ms


class _Replica:
    def __init__(self, name: str, max_active: int, alpha: float) -> None:
        self.name = name
        self.cost = ReplicaCost(alpha, max_active)
        self.held: dict[int, InFlight] = {}
        self.area = 0.0  # ∫ len(held) dt up to `area_at`
        self.area_at = 0.0
        self.answered = 0
        self.errors = 0

    def tick(self, now: float) -> None:
        self.area += len(self.held) * (now - self.area_at)
        self.area_at = now


class Balancer:
    """`Balancer(["127.0.0.1:8001", "127.0.0.1:9001"]).generate("a red fox", options)` → (result, replica, ms).

    `policy`: round-robin | least-outstanding | predicted-completion (`routing.make_policy`). `max_active`: the
    requests a replica batches into one step (its `nirvana` instances). `send` replaces the Triton transport
    (tests); by default each thread gets its own `NirvanaClient` per replica. `costs` starts the replicas' cost
    models from copies of these (one warm-up shared by several balancers). `generate` is thread-safe.
    """

    def __init__(
        self,
        urls: Sequence[str],
        policy: str = "predicted-completion",
        protocol: Protocol = "grpc",
        max_active: int = 8,
        send: Send | None = None,
        timeout_s: float = 600.0,
        alpha: float = 0.3,
        clock: Callable[[], float] = time.perf_counter,
        costs: Sequence[ReplicaCost] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("Balancer needs at least one replica URL")
        if max_active < 1:
            raise ValueError(f"max_active={max_active}: must be at least 1")
        self.urls, self.policy_name, self.protocol, self.max_active = list(urls), policy, protocol, max_active
        self._policy = make_policy(policy)
        self._clock, self._timeout_s = clock, timeout_s
        self._send = send or self._send_triton
        self._lock = threading.Lock()
        self._replicas = [_Replica(url, max_active, alpha) for url in self.urls]
        if costs is not None:  # start from what another balancer learnt (e.g. one shared warm-up)
            if len(costs) != len(self.urls):
                raise ValueError(f"{len(costs)} cost models for {len(self.urls)} replicas")
            for replica, cost in zip(self._replicas, costs, strict=True):
                replica.cost = copy.deepcopy(cost)
        self._next_id = 0
        self._skipped_sum, self._cached_answers = 0, 0
        self._predictions: list[Prediction] = []
        self._local = threading.local()
        self._clients: list[NirvanaClient] = []

    # transport ----------------------------------------------------------------------------------------------
    def _send_triton(self, index: int, prompt: str, options: GenerateOptions) -> GenerateResult:
        clients = getattr(self._local, "clients", None)
        if clients is None:  # tritonclient's HTTP client is not safe across threads: one set per thread
            clients = self._local.clients = {}
        if index not in clients:
            clients[index] = NirvanaClient(self.urls[index], self.protocol, timeout_s=self._timeout_s)
            with self._lock:
                self._clients.append(clients[index])
        return clients[index].generate(prompt, options)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    # prediction ---------------------------------------------------------------------------------------------
    def expected_skipped(self) -> float:
        """The pool's running mean of K over cached (non-bypass) answers, misses as 0: the guess before lookup."""
        with self._lock:
            return self._skipped_sum / self._cached_answers if self._cached_answers else 0.0

    def _expected_steps(self, options: GenerateOptions) -> int:
        steps = options.steps or DEFAULT_STEPS
        if options.cache_mode in ("bypass", "refresh") or not self._cached_answers:
            return steps
        return max(1, round(steps - self._skipped_sum / self._cached_answers))

    def _state(self, replica: _Replica, now: float, bypass: bool) -> ReplicaState:
        """What the policy sees of one replica now; its learnt curve, or a flat 1 ms/step before any answer."""
        cost = replica.cost.curve() or StepCost((2,), (1.0,))
        held = list(replica.held.values())
        step_ms = cost.ms(2 * min(len(held), self.max_active)) if held else 0.0
        # steps done so far are estimated from elapsed time at the present batch's pace (FIFO: oldest first)
        left = [max(1, h.steps - int((now - h.sent_at) * 1e3 / step_ms)) if step_ms else h.steps for h in held]
        drain = predict_drain_ms(cost, left, self.max_active) if held else 0.0
        return ReplicaState(replica.name, len(held), drain, cost, replica.cost.fixed(bypass), self.max_active)

    def _register(self, index: int, steps: int, now: float) -> int:
        """Add a request to a replica's in-flight set (lock held); returns its id."""
        replica = self._replicas[index]
        replica.tick(now)
        request_id, self._next_id = self._next_id, self._next_id + 1
        replica.held[request_id] = InFlight(steps, now, replica.area)
        return request_id

    def _place(self, options: GenerateOptions) -> tuple[int, int, float]:
        """Choose a replica and register the request there: (replica, request id, predicted ms)."""
        bypass = options.cache_mode == "bypass"
        with self._lock:
            now = self._clock()
            steps = self._expected_steps(options)
            states = [self._state(replica, now, bypass) for replica in self._replicas]
            index = self._policy.choose(states, steps)
            # what predicted-completion minimises, whichever policy chose: wait + service on the chosen replica
            predicted = PredictedCompletion.completion_ms(states[index], steps)
            request_id = self._register(index, steps, now)
        return index, request_id, predicted

    def _settle(self, index: int, request_id: int) -> tuple[InFlight, float]:
        """Remove a request from its replica's in-flight set; returns it and its mean concurrency (lock held)."""
        replica, now = self._replicas[index], self._clock()
        replica.tick(now)
        record = replica.held.pop(request_id)
        span = now - record.sent_at
        concurrency = (replica.area - record.area_at_send) / span if span > 0 else len(replica.held) + 1.0
        return record, concurrency

    def generate(self, prompt: str, options: GenerateOptions | None = None) -> tuple[GenerateResult, int, float]:
        """Send one request to the replica the policy picks: (its answer, replica index, predicted server ms)."""
        options = options or GenerateOptions()
        index, request_id, predicted = self._place(options)
        try:
            result = self._send(index, prompt, options)
        except BaseException:
            with self._lock:
                self._settle(index, request_id)
                self._replicas[index].errors += 1
            raise
        bypass = options.cache_mode == "bypass"
        with self._lock:
            record, concurrency = self._settle(index, request_id)
            replica = self._replicas[index]
            replica.answered += 1
            steps_run = max((options.steps or DEFAULT_STEPS) - result.skipped_steps, 0)
            replica.cost.observe(concurrency, steps_run, result.server_timings_ms, bypass)
            if options.cache_mode in (None, "auto"):
                self._skipped_sum += result.skipped_steps
                self._cached_answers += 1
            actual = result.server_timings_ms.get("total_ms")
            if actual:
                self._predictions.append(
                    Prediction(index, predicted, float(actual), result.cache_hit, record.steps, steps_run)
                )
        return result, index, predicted

    # reporting ----------------------------------------------------------------------------------------------
    def prediction_errors(self) -> list[Prediction]:
        """Every answered request's predicted vs actual server time, in answer order."""
        with self._lock:
            return list(self._predictions)

    def error_summary(self, since: int = 0) -> dict[str, dict[str, float | int | None]]:
        """Median and p90 of |predicted − actual| / actual for hits, misses and all (from prediction `since`)."""
        records = self.prediction_errors()[since:]
        groups = {"hits": [p for p in records if p.cache_hit], "misses": [p for p in records if not p.cache_hit]}
        groups["all"] = records
        summary = {name: relative_error_stats([p.relative_error for p in group]) for name, group in groups.items()}
        for name, group in groups.items():  # signed: > 0 means predicted too slow
            signed = [(p.predicted_ms - p.actual_ms) / p.actual_ms for p in group]
            summary[name]["median_signed"] = float(np.median(signed)) if signed else None
        return summary

    def snapshot(self) -> list[dict]:
        """Per replica: requests in flight and answered, errors, learnt fixed ms and ms/step by concurrency."""
        with self._lock:
            return [
                {
                    "url": replica.name,
                    "in_flight": len(replica.held),
                    "answered": replica.answered,
                    "errors": replica.errors,
                    "fixed_ms": dict(replica.cost.fixed_ms),
                    "step_ms_by_concurrency": dict(sorted(replica.cost.step_ms.items())),
                }
                for replica in self._replicas
            ]

    def learnt_costs(self) -> list[ReplicaCost]:
        """Copies of every replica's cost model, to start another balancer from (`costs=`)."""
        with self._lock:
            return [copy.deepcopy(replica.cost) for replica in self._replicas]

    def warm_up(self, prompts: Sequence[str], steps: int, concurrency: Sequence[int] = (1, 2)) -> None:
        """Fill every replica's cost model before real traffic: `prompts` sent to each replica with
        CACHE_MODE=bypass (no cache is read or written), at each level of `concurrency` in turn."""
        for index in range(len(self._replicas)):
            for level in concurrency:
                threads = [
                    threading.Thread(target=self._warm_one, args=(index, prompts[i::level], steps), daemon=True)
                    for i in range(level)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()

    def _warm_one(self, index: int, prompts: Sequence[str], steps: int) -> None:
        options = GenerateOptions(seed=0, steps=steps, cache_mode="bypass")
        for prompt in prompts:
            with self._lock:
                request_id = self._register(index, steps, self._clock())
            try:
                result = self._send(index, prompt, options)
            finally:
                with self._lock:
                    _, concurrency = self._settle(index, request_id)
            with self._lock:
                self._replicas[index].cost.observe(concurrency, steps, result.server_timings_ms, bypass=True)


@dataclass(frozen=True)
class BalancedRecord:
    """One request of `run_balanced`: where it went, what was predicted, what came back (ms; `sent_s` from start)."""

    index: int
    prompt: str
    sent_s: float
    replica: int | None
    predicted_ms: float | None
    latency_ms: float
    server_ms: float | None
    cache_hit: bool = False
    skipped_steps: int = 0
    ok: bool = True
    error: str | None = None
    schedule_lag_ms: float | None = None
    server_predicted_ms: float | None = None  # the replica's own prediction (TIMINGS predicted_total_ms)


def run_balanced(
    balancer: Balancer,
    requests: Sequence[tuple[str, GenerateOptions]],
    timing: Timing,
    deadline: Deadline,
    offsets: Sequence[float] | None = None,
) -> list[BalancedRecord]:
    """Send (prompt, options) pairs through `balancer` under `timing`; a failed request is a record, not a crash.

    Open-loop timings take `offsets` from `load.schedule` (computed here for Poisson when not given).
    """
    if offsets is None and timing.mode == "poisson":
        offsets = schedule(timing, len(requests))
    start = time.perf_counter()

    def send(pair: tuple[int, tuple[str, GenerateOptions]], scheduled_at: float | None) -> BalancedRecord:
        index, (prompt, options) = pair
        sent = time.perf_counter()
        lag = None if scheduled_at is None else max(0.0, sent - scheduled_at) * 1e3
        base = {"index": index, "prompt": prompt, "sent_s": sent - start, "schedule_lag_ms": lag}
        try:
            result, replica, predicted = balancer.generate(prompt, options)
        except Exception as err:  # tritonclient's and socket errors alike are data here
            message = err.message() if callable(getattr(err, "message", None)) else str(err)
            latency = (time.perf_counter() - sent) * 1e3
            return BalancedRecord(**base, replica=None, predicted_ms=None, latency_ms=latency, server_ms=None,
                                  ok=False, error=message)  # fmt: skip
        return BalancedRecord(
            **base,
            replica=replica,
            predicted_ms=predicted,
            latency_ms=(time.perf_counter() - sent) * 1e3,
            server_ms=result.server_timings_ms.get("total_ms"),
            cache_hit=result.cache_hit,
            skipped_steps=result.skipped_steps,
            server_predicted_ms=result.server_timings_ms.get("predicted_total_ms"),
        )

    done = run(list(enumerate(requests)), send, timing, deadline, offsets)
    return [record for record in done if record is not None]


def latency_summary(records: Sequence[BalancedRecord], replicas: int) -> dict:
    """Mean/p50/p99 latency (ms, client side) of the answered requests and the share each replica got."""
    answered = [r for r in records if r.ok]
    latencies = np.array([r.latency_ms for r in answered]) if answered else np.zeros(1)
    shares = [sum(r.replica == i for r in answered) / max(len(answered), 1) for i in range(replicas)]
    return {
        "requests": len(records),
        "errors": len(records) - len(answered),
        "hit_rate": sum(r.cache_hit for r in answered) / max(len(answered), 1),
        "mean_ms": float(latencies.mean()),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "share": shares,
    }


def server_prediction_errors(records: Sequence[BalancedRecord]) -> dict[str, float | int | None]:
    """Error of the replicas' own predictions (made after their lookups, K known) over the answered requests."""
    pairs = [(r.server_predicted_ms, r.server_ms) for r in records if r.server_predicted_ms and r.server_ms]
    return relative_error_stats([abs(predicted - actual) / actual for predicted, actual in pairs])


def relative_error_stats(errors: Sequence[float]) -> dict[str, float | int | None]:
    """count, median and p90 of relative errors (None when there are none)."""
    if not errors:
        return {"count": 0, "median": None, "p90": None}
    values = np.asarray(errors, dtype=float)
    return {"count": len(values), "median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


__all__ = [
    "BalancedRecord",
    "Balancer",
    "InFlight",
    "Prediction",
    "ReplicaCost",
    "Send",
    "latency_summary",
    "relative_error_stats",
    "run_balanced",
    "server_prediction_errors",
]
