"""Spec loading and queue cost at 100,000 tasks: load time (JSONL, Parquet), queue memory
and operation rates. Not a test: prints figures, ends with one JSON line.

    .venv/bin/python bench/queue_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from scheduler.queue import Capacity, FleetQueue, QueueItem, TeamPolicy
from scheduler.spec import load_batch


def write_tables(folder: Path, n: int) -> None:
    rows = [
        {
            "id": f"task-{i}" if i % 3 else None,
            "repo": f"https://git.example.invalid/r{i % 50}.git",
            "ref": "main",
            "prompt": f"fix issue {i} in module {i % 97}",
            "task_type": "swe",
        }
        for i in range(n)
    ]
    with (folder / "tasks.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), folder / "tasks.parquet")
    for kind in ("jsonl", "parquet"):
        (folder / f"{kind}.yaml").write_text(f"name: big\nteam: ml\ntasks_from: tasks.{kind}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 tasks instead of 100,000")
    n = 10_000 if parser.parse_args().quick else 100_000
    figures: dict[str, float] = {"tasks": n}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_tables(folder, n)
        for kind in ("jsonl", "parquet"):
            start = time.perf_counter()
            specs = load_batch(folder / f"{kind}.yaml").task_specs()
            figures[f"load_{kind}_s"] = round(time.perf_counter() - start, 2)
            print(f"load + expand {len(specs):,} tasks from {kind}: {figures[f'load_{kind}_s']} s")

    tracemalloc.start()
    items = [
        QueueItem(s.task_id, s.batch, "abcd"[s.index % 4], s.index % 3, 1.0, 1 << 30) for s in specs
    ]
    del specs
    queue = FleetQueue({"a": TeamPolicy(weight=2, max_sandboxes=64)})
    start = time.perf_counter()
    queue.push_many(items)
    push_s = time.perf_counter() - start
    del items
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    figures["queue_mib"] = round(used / 2**20, 1)
    figures["push_per_s"] = round(n / push_s)
    figures["rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"queue of {n:,} items: {figures['queue_mib']} MiB (items + queue; ids not counted)")
    print(f"whole process peak RSS (incl. loading the specs): {figures['rss_mib']} MiB")
    start = time.perf_counter()
    while len(queue):
        for admission in queue.pop_admissible(Capacity(slots=100)):
            queue.release(admission.item.task_id)
    figures["admit_release_per_s"] = round(n / (time.perf_counter() - start))
    print(f"push {figures['push_per_s']:,}/s, admit+release {figures['admit_release_per_s']:,}/s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
