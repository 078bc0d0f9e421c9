"""`nirvana bench routing`: client-side placement over two unequal replicas, measured, then simulated.

Two real tritonservers on this machine serve the same tiny model, made unequal honestly by their runtime: one
with profile `cpu` (ONNX Runtime sub-models), one with profile `torch` (torch sub-models), each with its own
cache. With `pin`, the machine's cores are split between them (each replica of a real pool has its own GPU);
the client runs on all cores. One run:

1. Speed: the same prompts, sequential, CACHE_MODE=bypass, on each replica; the ratio of median server ms.
2. Warm-up: a balancer learns each replica's cost model (bypass, 1, 2, 3, 4 and 6 requests at once, one replica at
   a time); every policy's balancer starts from a copy of it.
3. Capacity: each replica busy alone, then both at once (closed loop, bypass, 2 requests each) — the joint
   no-cache requests/s, of which load is a fraction as in `nirvana_sim`. Unpinned, the two share this machine's
   cores, so each runs slower beside the other: alone ÷ joint requests/s is its shared-host slowdown.
4. Policies: each runs the same seeded Poisson schedule of the same workload prompts (its own TENANT, so each
   starts from an empty cache) through a `Balancer`; latency, replica shares, prediction error by hit/miss.
5. Simulation: `nirvana_sim` on the same arrivals and each policy's measured steps per request, with the
   curves and fixed ms learnt in the warm-up (each replica alone) — as separate hosts, and as one host with the
   measured slowdowns — and with the curves learnt during the policy's own run; simulated means beside the
   measured one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS_PROMPTS = [f"a {c} lighthouse on a cliff at dusk, oil painting {i}" for i, c in enumerate(
    ["red", "blue", "green", "golden", "silver", "purple"]
)]  # fmt: skip
POLICY_NAMES = ("round-robin", "least-outstanding", "predicted-completion")


def _median_server_ms(client, prompts: list[str], steps: int) -> dict:
    from nirvana_client import GenerateOptions

    client.generate(prompts[0], GenerateOptions(seed=0, steps=steps, cache_mode="bypass"))  # warm the runtimes
    server, latency = [], []
    for prompt in prompts:
        result = client.generate(prompt, GenerateOptions(seed=0, steps=steps, cache_mode="bypass"))
        server.append(result.server_timings_ms["total_ms"])
        latency.append(result.latency_ms)
    return {"server_ms": statistics.median(server), "latency_ms": statistics.median(latency)}


def _capacity(urls: list[str], steps: int, concurrency: int, seconds: float) -> dict:
    """Requests/s the replicas complete together, each kept `concurrency` busy (bypass), for about `seconds`."""
    import threading

    from nirvana_client import GenerateOptions, NirvanaClient

    counts = [[0] * concurrency for _ in urls]  # each slot written by its own thread only
    stop = time.perf_counter() + seconds

    def worker(index: int, slot: int) -> None:
        client = NirvanaClient(urls[index])
        try:
            while time.perf_counter() < stop:
                options = GenerateOptions(seed=slot, steps=steps, cache_mode="bypass")
                client.generate(f"capacity probe {index}.{slot}: a quiet harbour at dawn", options)
                counts[index][slot] += 1
        finally:
            client.close()

    start = time.perf_counter()
    threads = [
        threading.Thread(target=worker, args=(i, s), daemon=True) for i in range(len(urls)) for s in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start  # the last requests run past `stop`: count them over the real span
    per_replica = [sum(slots) / elapsed for slots in counts]
    return {
        "concurrency_each": concurrency,
        "seconds": elapsed,
        "per_replica_rps": per_replica,
        "joint_rps": sum(per_replica),
    }


def _shared_host_capacity(urls: list[str], steps: int, seconds: float) -> dict:
    """Each replica alone, then all together: joint requests/s and each replica's slowdown beside the others."""
    alone = [_capacity([url], steps, 2, seconds)["joint_rps"] for url in urls]
    joint = _capacity(urls, steps, 2, seconds)
    slowdown = [max(a / j, 1.0) for a, j in zip(alone, joint["per_replica_rps"], strict=True)]
    return joint | {"alone_rps": alone, "shared_slowdown": slowdown}


def _sim_kinds(
    costs: list, names: list[str], slowdowns: list[float] | None = None, client_ms: list[float] | None = None
) -> list:
    """`nirvana_sim` replica kinds from learnt cost models: their step-cost curve, bypass fixed ms (plus the
    client's own ms per request, measured latency − server time) as encode+decode, what the cached path adds on
    top as cache ms, and the slowdown beside the other replica (None: 1.0)."""
    from nirvana_sim.model import GpuKind

    kinds = []
    for i, (name, cost) in enumerate(zip(names, costs, strict=True)):
        bypass_ms, cached_ms = cost.fixed(bypass=True), cost.fixed(bypass=False)
        slowdown = slowdowns[i] if slowdowns else 1.0
        fixed_ms = bypass_ms + (client_ms[i] if client_ms else 0.0)
        extra = max(cached_ms - bypass_ms, 0.0)
        # learnt by requests in flight on the replica, so the simulator looks the curve up that way
        kinds.append(GpuKind(name, cost.curve(), fixed_ms, 0.0, extra, slowdown, by_in_flight=True))
    return kinds


def _simulated(
    kinds: list, offsets: np.ndarray, records: list, steps: int, policy: str, max_active: int, shared: bool = False
) -> dict:
    """The same arrivals and each request's measured steps (N − K it skipped) through the simulator; `shared`:
    all replicas on one host."""
    from nirvana_client.routing import make_policy
    from nirvana_sim.engine import Workload, simulate
    from nirvana_sim.experiments import summarise

    skipped = {r.index: r.skipped_steps for r in records if r.ok}
    sent = sorted(r.index for r in records)
    run_steps = np.array([max(steps - skipped.get(i, 0), 1) for i in sent])
    workload = Workload(np.asarray(offsets)[sent] * 1e3, run_steps)
    hosts = [0] * len(kinds) if shared else None
    return summarise(simulate(kinds, workload, make_policy(policy), cache=True, max_active=max_active, hosts=hosts))


def _cores(count: int, pin: bool) -> list[tuple[int, ...] | None]:
    """The usable cores split evenly between `count` replicas when pinning (and there are enough); else None for
    each: every replica may use all of them."""
    import os

    cores = sorted(os.sched_getaffinity(0))
    if not pin or len(cores) < count:
        return [None] * count
    share = len(cores) // count
    return [tuple(cores[i * share : (i + 1) * share]) for i in range(count)]


@contextlib.contextmanager
def _replicas(root: Path, checkpoint: Path, profiles: tuple[str, ...], cores: list[tuple[int, ...] | None]):
    """Start one tritonserver per profile (own cache and repository), all READY before yielding their gRPC URLs."""
    from nirvana_dev.install import ServerPorts, free_ports
    from nirvana_dev.launch import ServeOptions, make_server, prepare

    ports = free_ports(3 * len(profiles))  # all at once, so they are distinct
    with contextlib.ExitStack() as stack:
        urls = []
        for i, (profile, cpus) in enumerate(zip(profiles, cores, strict=True)):
            options = ServeOptions(
                cache_dir=root / f"replica-{i}-{profile}",
                checkpoint=checkpoint,
                ports=ServerPorts(*ports[3 * i : 3 * i + 3]),
                profile=profile,
                cpus=cpus,
            )
            repo, _ = prepare(options)
            server = stack.enter_context(make_server(options, repo))
            urls.append(server.urls.grpc)
        yield urls


def run_routing(
    workload: Path,
    checkpoint: Path | None = None,
    requests: int = 80,
    steps: int = 20,
    load: float = 0.7,
    seed: int = 0,
    profiles: tuple[str, ...] = ("cpu", "torch"),
    max_active: int = 8,
    max_in_flight: int = 16,
    capacity_seconds: float = 15.0,
    policy_limit_s: float = 150.0,
    pin: bool = False,
    work_dir: Path | None = None,
) -> dict:
    from nirvana_client import GenerateOptions, NirvanaClient
    from nirvana_client.balancer import Balancer, latency_summary, run_balanced, server_prediction_errors
    from nirvana_client.load import Deadline, Timing, schedule
    from nirvana_client.workload import load_workload
    from nirvana_dev.tiny_model import make_tiny_model

    items = load_workload(workload, limit=requests)
    names = [f"{i}:{profile}" for i, profile in enumerate(profiles)]
    report: dict = {"workload": str(workload), "requests": len(items), "steps": steps, "load": load, "seed": seed}
    report |= {"replicas": names, "max_active": max_active, "max_in_flight": max_in_flight}
    report["cores"] = _cores(len(profiles), pin)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        checkpoint = checkpoint or make_tiny_model(root / "tiny-model")
        with _replicas(root, checkpoint, profiles, report["cores"]) as urls:
            report["startup_s"] = time.perf_counter() - started
            speed = {}
            for name, url in zip(names, urls, strict=True):
                client = NirvanaClient(url)
                speed[name] = _median_server_ms(client, STEPS_PROMPTS, steps)
                client.close()
            medians = [speed[n]["server_ms"] for n in names]
            report["speed"] = speed | {"slow_over_fast": max(medians) / min(medians)}
            warm = Balancer(urls, max_active=max_active)
            warm.warm_up(STEPS_PROMPTS * 2, steps, concurrency=(1, 2, 3, 4, 6))
            report["warm_up"] = warm.snapshot()
            costs = warm.learnt_costs()
            warm.close()
            capacity = _shared_host_capacity(urls, steps, capacity_seconds)
            rate = load * capacity["joint_rps"]
            report["capacity"] = capacity | {"rate_rps": rate}
            timing = Timing("poisson", rate=rate, max_in_flight=max_in_flight, seed=seed)
            offsets = schedule(timing, len(items))
            report["offsets_s"] = [float(o) for o in offsets]
            alone_kinds = _sim_kinds(costs, names)
            client_ms = [speed[n]["latency_ms"] - speed[n]["server_ms"] for n in names]
            shared_kinds = _sim_kinds(costs, names, capacity["shared_slowdown"], client_ms)
            report["policies"] = {}
            for policy in POLICY_NAMES:
                # its own tenant: every policy starts from an empty cache on both replicas
                pairs = [
                    (item.prompt, GenerateOptions(seed=item.seed, steps=steps, tenant=f"routing-{policy}"))
                    for item in items
                ]
                balancer = Balancer(urls, policy, max_active=max_active, costs=costs)
                records = run_balanced(balancer, pairs, timing, Deadline(policy_limit_s), offsets)
                row = latency_summary(records, len(urls)) | {"prediction_error": balancer.error_summary()}
                row["server_prediction_error"] = server_prediction_errors(records)
                row["learnt"] = balancer.snapshot()
                row["records"] = [dataclasses.asdict(r) for r in records]
                sim_args = (offsets, records, steps, policy, max_active)
                row["simulated_warm_up_curves"] = _simulated(alone_kinds, *sim_args)
                row["simulated_shared_host"] = _simulated(shared_kinds, *sim_args, shared=True)
                # curves learnt during this policy's run: on a shared host they hold what its neighbour's load cost
                row["simulated_run_curves"] = _simulated(_sim_kinds(balancer.learnt_costs(), names), *sim_args)
                balancer.close()
                report["policies"][policy] = row
    report["wall_s"] = time.perf_counter() - started
    rows = report["policies"]
    rr, pc = rows["round-robin"]["mean_ms"], rows["predicted-completion"]["mean_ms"]
    report["predicted_completion_gain_over_round_robin"] = 1.0 - pc / rr
    return report


def print_table(report: dict) -> None:
    """The policies side by side: measured latency, shares, prediction error, simulated mean."""
    from rich.console import Console
    from rich.table import Table

    speed, capacity = report["speed"], report["capacity"]
    slowdown = "/".join(f"{f:.2f}" for f in capacity["shared_slowdown"])
    title = (
        f"{' vs '.join(report['replicas'])}: slow/fast {speed['slow_over_fast']:.2f}x, shared-host slowdown "
        f"{slowdown}, joint capacity "
        f"{capacity['joint_rps']:.2f} req/s, Poisson {capacity['rate_rps']:.2f} req/s ({report['load']:.0%}), "
        f"{report['requests']} requests, N={report['steps']}"
    )
    table = Table(title=title)
    columns = ["policy", "mean ms", "p50 ms", "p99 ms", "share", "hits", "err miss med/p90", "err hit med/p90"]
    columns.append("server err med/p90")
    sims = ("simulated_warm_up_curves", "simulated_shared_host", "simulated_run_curves")
    for column in [*columns, "sim mean: warm-up alone / shared host / run curves", "sim/meas"]:
        table.add_column(column, justify="left" if column == "policy" else "right")
    fmt = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
    for policy, row in report["policies"].items():
        errors, server = row["prediction_error"], row["server_prediction_error"]
        simulated = [row[key]["mean_ms"] for key in sims]
        table.add_row(
            policy,
            f"{row['mean_ms']:.0f}",
            f"{row['p50_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
            "/".join(f"{s:.0%}" for s in row["share"]),
            f"{row['hit_rate']:.0%}",
            f"{fmt(errors['misses']['median'])}/{fmt(errors['misses']['p90'])}",
            f"{fmt(errors['hits']['median'])}/{fmt(errors['hits']['p90'])}",
            f"{fmt(server['median'])}/{fmt(server['p90'])}",
            " / ".join(f"{ms:.0f}" for ms in simulated),
            " / ".join(f"{ms / row['mean_ms']:.2f}" for ms in simulated),
        )
    console = Console(width=170)
    console.print(table)
    gain = report["predicted_completion_gain_over_round_robin"]
    console.print(f"predicted-completion's mean latency is {gain:.0%} below round-robin's (acceptance: >= 20%)")
