"""Monitor latency: from `ingest` to the live state, and to the dashboard's JSON API.

A `MonitorCore` with all eight rules is fed the stream of N busy sandboxes (a command,
a file change and a resource sample per sandbox per tick, an LLM call now and then),
in batches as the LedgerActor would tee them. Measured:

- ingest: seconds for one batch to be folded in (live state + rules + metrics), per
  event and per batch, p50/p99;
- api: seconds from ingesting a new command to `GET /api/fleet` (real HTTP on loopback)
  returning it, p50/p99;
- scrape: seconds for one `GET /metrics`.

Ends with one JSON line. `--quick` runs a smaller stream.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from datetime import UTC, datetime, timedelta

from scheduler.dashboard import DashboardServer
from scheduler.event_builder import AttemptEvents
from scheduler.monitor import MonitorCore


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller stream")
    ap.add_argument("--sandboxes", type=int, default=16)
    args = ap.parse_args()
    ticks = 60 if args.quick else 600
    probes = 20 if args.quick else 100
    t0 = datetime.now(UTC) - timedelta(seconds=ticks)
    core = MonitorCore()
    boxes = [AttemptEvents("bench", "b1", f"t{i}", t0=t0) for i in range(args.sandboxes)]
    core.ingest([e for b in boxes for e in (b.state(0, "queued"), b.state(0.1, "running"))])
    per_batch: list[float] = []
    per_event: list[float] = []
    events = 0
    words = ["build", "lint", "test", "fmt", "check", "doc", "bench", "pack"]
    for s in range(ticks):
        batch = []
        for i, b in enumerate(boxes):
            batch.append(b.command(s + 0.2, ["make", words[(s + i) % len(words)]]))
            batch.append(b.file(s + 0.3, f"/workspace/src/{words[s % len(words)]}.py"))
            batch.append(b.sample(s + 0.5, s * 300_000, (200 + s % 50) << 20))
            if s % 10 == i % 10:
                batch.append(b.llm(s + 0.6, 2000, 200))
        start = time.perf_counter()
        core.ingest(batch)
        per_batch.append(time.perf_counter() - start)
        per_event.append(per_batch[-1] / len(batch))
        events += len(batch)
    with DashboardServer(core, "127.0.0.1", 0) as server:
        api: list[float] = []
        for n in range(probes):
            marker = f"probe-{n}"
            start = time.perf_counter()
            core.ingest([boxes[0].command(ticks + n, ["echo", marker])])
            while True:
                with urllib.request.urlopen(server.url + "api/fleet", timeout=10) as r:
                    if marker.encode() in r.read():
                        break
            api.append(time.perf_counter() - start)
        start = time.perf_counter()
        with urllib.request.urlopen(server.url + "metrics", timeout=10) as r:
            r.read()
        scrape = time.perf_counter() - start
    result = {
        "bench": "monitor_latency",
        "sandboxes": args.sandboxes,
        "events": events,
        "ingest_batch_p50_s": round(pct(per_batch, 0.5), 6),
        "ingest_batch_p99_s": round(pct(per_batch, 0.99), 6),
        "ingest_event_p50_s": round(pct(per_event, 0.5), 7),
        "ingest_event_p99_s": round(pct(per_event, 0.99), 7),
        "ingest_events_per_s": round(events / sum(per_batch)),
        "api_p50_s": round(pct(api, 0.5), 5),
        "api_p99_s": round(pct(api, 0.99), 5),
        "api_mean_s": round(statistics.fmean(api), 5),
        "metrics_scrape_s": round(scrape, 5),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
