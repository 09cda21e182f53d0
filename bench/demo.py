"""The demo batch, end to end, as a benchmark: wall time, sandboxes per second, overhead.

Runs the real CLI on the embedded default (local Ray, local Docker, the scripted model):

    .venv/bin/python bench/demo.py [--quick]

--quick runs configs/batches/demo.yaml once; the full run does demo.yaml and
demo-research.yaml, three rounds each (medians; the machine is shared). Each run gets a
fresh data directory (removed afterwards); the demo repositories are made first
(`scheduler.demo_repos`, idempotent).

Figures, per batch, from the CLI's clock and the ledger's `tasks` rows alone:
- wall_s: `sandfleet run` from start to exit (Ray start and stop included);
- sandboxes_per_s: attempts / wall_s;
- outside_agents_share: the share of wall time during which no agent ran at all (union
  of the attempts' agent intervals [end - duration, end]): Ray and driver start-up,
  provisioning, gateway set-up, teardown, ledger writes;
- attempt_overhead_share: 1 - sum(agent time) / sum(attempt time, `started` to end):
  what each attempt spent outside its agent (workspace, container, gateway, diff);
- outcomes, and whether each task ended as its `expect` label says.

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

# This file is bench/demo.py: `import scheduler` must find the package, not a script here.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import duckdb  # noqa: E402

from accounting.config import configs_dir, repo_root  # noqa: E402
from scheduler.demo_repos import make_demo_repos  # noqa: E402
from scheduler.spec import load_batch  # noqa: E402

SANDFLEET = Path(sys.executable).parent / "sandfleet"


def _union_s(intervals: list[tuple[datetime, datetime]]) -> float:
    total, end = timedelta(0), None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total.total_seconds()


def _tasks_rows(data_dir: Path, batch_id: str) -> list[dict[str, Any]]:
    tasks = f"read_parquet('{data_dir}/ledger/tasks/**/*.parquet', hive_partitioning = true)"
    cur = duckdb.connect().execute(
        f"SELECT task, attempt, outcome, started, time, duration_ms FROM {tasks} "
        "WHERE batch = ? ORDER BY time",
        [batch_id],
    )
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def run_once(batch: Path) -> dict[str, Any]:
    """One `sandfleet run` of `batch` in a fresh data directory; figures from its ledger."""
    data_dir = Path(tempfile.mkdtemp(prefix="sandfleet-bench-demo-"))
    try:
        t0 = time.monotonic()
        done = subprocess.run(
            [str(SANDFLEET), "run", str(batch), "--data-dir", str(data_dir), "--json"],
            capture_output=True, text=True, check=False, cwd=repo_root(),
        )  # fmt: skip
        wall_s = time.monotonic() - t0
        if done.returncode not in (0, 1):  # 1: some task did not succeed (by design)
            raise SystemExit(f"sandfleet run {batch} exited {done.returncode}:\n{done.stderr}")
        final = json.loads(done.stdout[done.stdout.index("{") :])
        rows = _tasks_rows(data_dir, final["batch"])
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    last = {r["task"]: r for r in rows}  # the final attempt of each task
    expect = {t.task_id: t.labels_dict.get("expect") for t in load_batch(batch).task_specs()}
    agent = [(r["time"] - timedelta(milliseconds=r["duration_ms"]), r["time"]) for r in rows]
    agent_s = sum(r["duration_ms"] for r in rows) / 1000
    attempt_s = sum((r["time"] - r["started"]).total_seconds() for r in rows if r["started"])
    return {
        "batch": final["batch"],
        "tasks": len(expect),
        "attempts": len(rows),
        "wall_s": round(wall_s, 2),
        "sandboxes_per_s": round(len(rows) / wall_s, 3),
        "outside_agents_share": round(1 - _union_s(agent) / wall_s, 3),
        "attempt_overhead_share": round(1 - agent_s / attempt_s, 3) if attempt_s else None,
        "outcomes": dict(Counter(str(r["outcome"]) for r in last.values())),
        "unexpected": sorted(
            t for t, e in expect.items() if str(last.get(t, {}).get("outcome")) != e
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo.yaml once")
    args = parser.parse_args()
    names = ["demo.yaml"] if args.quick else ["demo.yaml", "demo-research.yaml"]
    rounds = 1 if args.quick else 3
    for repo in make_demo_repos():
        print(f"demo repo {repo.name}: {repo.commit[:12]} ({repo.action})")
    results: dict[str, Any] = {}
    for name in names:
        runs = []
        for i in range(rounds):
            run = run_once(configs_dir() / "batches" / name)
            print(
                f"{name} round {i + 1}: {run['attempts']} sandboxes in {run['wall_s']}s "
                f"({run['sandboxes_per_s']}/s), outside agents {run['outside_agents_share']:.0%},"
                f" outcomes {run['outcomes']}, unexpected: {run['unexpected'] or 'none'}"
            )
            runs.append(run)
        median = {k: statistics.median(r[k] for r in runs)
                  for k in ("wall_s", "sandboxes_per_s", "outside_agents_share")}  # fmt: skip
        results[name] = {**runs[-1], **median, "rounds": rounds}
    print(json.dumps({"bench": "demo", "quick": args.quick, "results": results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
