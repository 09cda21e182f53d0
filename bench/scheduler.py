"""Scheduler overhead: dispatch throughput through the FleetScheduler vs bare Ray tasks,
and the scheduler's memory with 100,000 tasks queued.

1. Throughput. N attempts of `true` with the in-memory FakeBackend (each still makes,
   diffs and removes a real workspace, and writes its archive), on one local Ray with
   8 CPUs and 8 sandbox slots, in alternating rounds (medians; the machine is shared):
   - bare: N Ray tasks calling the same `scheduler.runner.execute` with the same
     resources (`attempt_options`), all submitted at once, `ray.get` of all;
   - fleet: the same N attempts as one batch through the FleetScheduler (queue, fair
     share, quotas, start notices, ledger events and a `tasks` row per attempt).
   Ratio = fleet tasks/s / bare tasks/s. Target >= 0.75.
2. Memory. A batch of 100,000 tasks submitted to a scheduler on a cluster with no
   sandbox slot (everything stays queued); the actor's RSS (psutil) before and after.
   Target < 1 GiB.

    .venv/bin/python bench/scheduler.py [--quick]

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This file is bench/scheduler.py: `import scheduler` must find the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import ray  # noqa: E402

from accounting.policies import Policies  # noqa: E402
from scheduler.fleet import get_scheduler  # noqa: E402
from scheduler.plan import Backend, Plan  # noqa: E402
from scheduler.runner import AttemptRequest, attempt_options, attempt_request, execute  # noqa: E402
from scheduler.testing import local_ray, make_plan, stop_fleet  # noqa: E402

THROUGHPUT_TARGET = 0.75
MEMORY_TARGET = 1 << 30
POLICIES = Policies.model_validate(
    {"defaults": {"weight": 1, "max_sandboxes": 100_000, "max_cpus": 100_000,
                  "max_memory": "100000g", "daily_usd": None, "monthly_usd": None}}
)  # fmt: skip


@ray.remote(max_retries=0)
def bare_attempt(request: AttemptRequest) -> dict[str, Any]:
    from sandbox.fake_backend import FakeBackend

    return execute(FakeBackend(), request, ray.get_runtime_context().get_node_id())


def _plan(work: Path, name: str, n: int) -> Plan:
    return make_plan(work, name, "bench", ["true"] * n, backend=Backend.FAKE)


def bare_rate(plan: Plan, data_dir: str) -> float:
    template = next(iter(plan.templates.values()))
    requests = [attempt_request(plan, t, 1, data_dir) for t in plan.tasks]
    start = time.perf_counter()
    refs = [bare_attempt.options(**attempt_options(template)).remote(r) for r in requests]
    results = ray.get(refs)
    elapsed = time.perf_counter() - start
    assert all(r["outcome"] == "succeeded" for r in results)
    return len(refs) / elapsed


def fleet_rate(scheduler: Any, plan: Plan) -> float:
    start = time.perf_counter()
    ray.get(scheduler.submit.remote(plan))
    while True:
        batch = ray.get(scheduler.wait.remote(plan.batch_id, 5.0))["batches"][plan.batch_id]
        if batch["done"]:
            break
    elapsed = time.perf_counter() - start
    assert batch["states"] == {"succeeded": len(plan.tasks)}, batch
    return len(plan.tasks) / elapsed


def throughput(n: int, rounds: int, work: Path) -> dict[str, Any]:
    """Alternate bare and fleet runs (the machine is shared): medians of each."""
    bare: list[float] = []
    fleet: list[float] = []
    with local_ray(num_cpus=8, slots=8):
        bare_rate(_plan(work, "warmup", 16), str(work / "warm-data"))  # start the workers
        scheduler = get_scheduler(str(work / "fleet-data"), policies=POLICIES)
        ray.get(scheduler.status.remote())  # the actor is up before any clock starts
        for r in range(rounds):
            bare.append(bare_rate(_plan(work, f"bare{r}", n), str(work / "bare-data")))
            fleet.append(fleet_rate(scheduler, _plan(work, f"fleet{r}", n)))
        stop_fleet()
    b, f = statistics.median(bare), statistics.median(fleet)
    return {"tasks": n, "rounds": rounds, "bare_per_s": round(b, 2), "fleet_per_s": round(f, 2),
            "bare_runs": [round(x, 1) for x in bare], "fleet_runs": [round(x, 1) for x in fleet],
            "ratio": round(f / b, 3)}  # fmt: skip


def memory(n: int, work: Path) -> dict[str, Any]:
    import psutil  # Ray's vendored copy, on sys.path once ray is imported

    t0 = time.perf_counter()
    plan = _plan(work, "queued", n)
    planned_s = time.perf_counter() - t0
    with local_ray(num_cpus=1, slots=0):  # no slot: every task stays queued
        scheduler = get_scheduler(str(work / "mem-data"), policies=POLICIES)
        pid = ray.get(scheduler.pid.remote())
        before = psutil.Process(pid).memory_info().rss
        t1 = time.perf_counter()
        status = ray.get(scheduler.submit.remote(plan))
        submit_s = time.perf_counter() - t1
        after = psutil.Process(pid).memory_info().rss
        assert status["batches"][plan.batch_id]["states"] == {"queued": n}
        stop_fleet()
    return {"tasks": n, "rss_before_mib": round(before / 2**20, 1),
            "rss_after_mib": round(after / 2**20, 1), "plan_s": round(planned_s, 2),
            "submit_s": round(submit_s, 2)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer tasks (a smoke run).")
    args = parser.parse_args()
    n, rounds, queued = (200, 2, 20_000) if args.quick else (1000, 3, 100_000)
    with tempfile.TemporaryDirectory(prefix="sf-bench-") as tmp:
        work = Path(tmp)
        rate = throughput(n, rounds, work)
        print(f"dispatch: bare Ray {rate['bare_per_s']}/s, fleet {rate['fleet_per_s']}/s, "
              f"ratio {rate['ratio']} (target >= {THROUGHPUT_TARGET})")  # fmt: skip
        mem = memory(queued, work)
        print(f"memory: {queued} tasks queued: scheduler RSS {mem['rss_before_mib']} -> "
              f"{mem['rss_after_mib']} MiB (target < 1024); submit {mem['submit_s']}s")  # fmt: skip
    figures = {
        "bench": "scheduler",
        "quick": args.quick,
        "throughput": rate,
        "throughput_ok": rate["ratio"] >= THROUGHPUT_TARGET,
        "memory": mem,
        "memory_ok": mem["rss_after_mib"] * 2**20 < MEMORY_TARGET,
    }
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
