"""Batch makespan: N real sandboxed tasks through `sandfleet run` vs `xargs -P` of raw
`docker run` with the same image and flags.

Both run `true` in the minimal template's sandbox, P at a time (P = this machine's CPUs):

- sandfleet: `sandfleet run BATCH --slots P --json` as a subprocess (an embedded Ray is
  started and stopped inside it). Each attempt also prepares a workspace (copied from an
  empty folder), follows the logs, collects the diff, archives, and writes its ledger
  rows. Two makespans: `wall` (the whole command, Ray's start included) and `batch`
  (from the `batch_submitted` event to the last terminal state, from the ledger).
- baseline: `xargs -P P` running `docker run --rm` with the CLI flags equivalent to the
  same container spec (bench/sandbox_start.py's `docker_run_argv`), each with its own
  empty workspace folder.

Same image, same hardening flags and limits, same concurrency (P slots: `--slots P`, a
minimal-template task takes one CPU of the P the embedded Ray has, and the team's quota
is larger). What sandfleet adds to its containers stays on its side of the ratio: the
canary credential mounts and their watch, the capture of every command, the ledger rows.

One setting of sandfleet's containers has no `docker run` flag: their networking is
disabled (`sandbox.container_spec.NETWORK`), so dockerd builds no network sandbox and runc
does not re-execute dockerd per container; the sandbox still has a network namespace of
its own with loopback only, as with `--network none`. That makes each container about
half as costly to start and remove on this machine (bench/sandbox_start.py). So that the
ratio does not hide sandfleet's own overhead behind that saving, a third measurement runs
the very containers sandfleet makes (same spec, networking disabled) straight through the
engine API, P at a time, with nothing else: create, start, wait, remove (`api_floor_s`,
and `ratio_api_floor`, which has no target: it is the price of everything sandfleet does
around a container).

Ratio = sandfleet makespan / baseline makespan. Target <= 1.10 (on the batch makespan).
On a shared machine the load drifts between the two measurements: `--rounds R` runs R
rounds, alternating which side goes first, and judges the median ratio (of an even
count, the higher middle one).

    .venv/bin/python bench/batch.py [--quick] [--tasks N] [--rounds R]

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# This folder also holds bench/scheduler.py: `import scheduler` must find the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import yaml  # noqa: E402

from sandbox.container_spec import container_spec, sandbox_labels, sandbox_name  # noqa: E402
from sandbox.images import image_ref  # noqa: E402
from sandbox.liveness import current_owner  # noqa: E402
from sandbox.templates import load_template  # noqa: E402

TARGET = 1.10


def _docker_run_argv() -> Any:
    spec = importlib.util.spec_from_file_location("sandbox_start", _HERE / "sandbox_start.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.docker_run_argv


def _specs(n: int, work: Path, kind: str) -> list[dict[str, Any]]:
    """n container specs of `true` in the minimal template (sandfleet's own plan), each
    with its own empty workspace folder under `work`."""
    template = load_template("minimal")
    image = image_ref(template.image)
    batch = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    specs = []
    for i in range(n):
        workspace = work / kind / f"t{i}"
        workspace.mkdir(parents=True)
        workspace.chmod(0o777)
        labels = sandbox_labels(batch=batch, task=f"t{i}", attempt=1, team="bench",
                                owner=current_owner().token(), template=template.name)  # fmt: skip
        specs.append(container_spec(template, image=image, labels=labels,
                                    workspace_host_path=str(workspace),
                                    name=sandbox_name(batch, f"t{i}", 1, uuid.uuid4().hex[:6]),
                                    command=["true"]))  # fmt: skip
    return specs


def baseline(n: int, parallel: int, work: Path) -> float:
    """Makespan of `xargs -P parallel` over n raw `docker run ... true`."""
    docker_run_argv = _docker_run_argv()
    lines = [shlex.join(docker_run_argv(spec)) for spec in _specs(n, work, "raw")]
    script = work / "raw.txt"
    script.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with script.open() as commands:
        done = subprocess.run(
            ["xargs", "-P", str(parallel), "-d", "\n", "-n", "1", "sh", "-c"],
            stdin=commands, capture_output=True, text=True, check=False,
        )  # fmt: skip
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"xargs docker run failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


def api_floor(n: int, parallel: int, work: Path) -> float:
    """Makespan of n containers of sandfleet's own spec through the engine API, `parallel`
    at a time: create, start, wait, remove, and nothing else."""
    from sandbox.backend import SandboxSpec
    from sandbox.docker_backend import DockerBackend

    specs = _specs(n, work, "api")
    backend = DockerBackend()

    def one(spec: dict[str, Any]) -> int:
        box = backend.create(SandboxSpec(spec))
        try:
            backend.start(box)
            return backend.wait(box, timeout=120).exit_code
        finally:
            backend.remove(box)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        codes = list(pool.map(one, specs))
    elapsed = time.perf_counter() - start
    backend.close()
    if any(codes):
        sys.exit(f"a container of the API floor exited non-zero: {codes}")
    return elapsed


def through_sandfleet(n: int, parallel: int, work: Path) -> dict[str, float]:
    """Makespans of `sandfleet run` over n tasks of `true`: whole command, and batch only."""
    empty = work / "empty"
    empty.mkdir(parents=True)
    batch_file = work / "bench.yaml"
    batch_file.write_text(yaml.safe_dump({
        "name": f"bench-{uuid.uuid4().hex[:8]}",
        "team": "bench",
        "defaults": {"template": "minimal", "timeout": 120, "max_attempts": 1},
        "tasks": [{"id": f"t{i:04d}", "repo": str(empty), "command": ["true"]} for i in range(n)],
    }))  # fmt: skip
    data_dir = work / "data"
    ray_tmp = tempfile.mkdtemp(prefix="sfray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    sandfleet = str(Path(sys.executable).parent / "sandfleet")
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sandfleet, "run", str(batch_file), "--data-dir", str(data_dir),
             "--slots", str(parallel), "--json"],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        wall = time.perf_counter() - start
        from scheduler.testing import kill_leftovers

        kill_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if done.returncode != 0:
        sys.exit(f"sandfleet run exited {done.returncode}: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    from accounting.views import connect

    with connect(data_dir) as con:
        (span,) = con.execute(
            "SELECT epoch(max(time) FILTER (WHERE kind = 'task_state' AND "
            "json_extract_string(payload, '$.state') = 'succeeded')) - "
            "epoch(min(time) FILTER (WHERE kind = 'batch_submitted')) FROM events"
        ).fetchone() or (None,)
    assert report["states"] == {"succeeded": n}, report
    return {"wall_s": wall, "batch_s": float(span)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 tasks (a smoke run).")
    parser.add_argument("--tasks", type=int, help="Tasks (default 40; --quick: 10).")
    parser.add_argument("--rounds", type=int, default=1, help="Rounds (default 1; median ratio).")
    args = parser.parse_args()
    n = args.tasks or (10 if args.quick else 40)
    parallel = os.cpu_count() or 1
    rounds: list[tuple[float, dict[str, float], float]] = []
    with tempfile.TemporaryDirectory(prefix="sf-bench-batch-") as tmp:
        work = Path(tmp)
        baseline(min(n, 4), parallel, work / "warm")  # warm the engine for all three
        api_floor(min(n, 4), parallel, work / "warm")
        for r in range(max(args.rounds, 1)):
            got: dict[str, Any] = {}
            runs: list[tuple[str, Any]] = [
                ("raw", lambda to: baseline(n, parallel, to)),
                ("fleet", lambda to: through_sandfleet(n, parallel, to)),
                ("api", lambda to: api_floor(n, parallel, to)),
            ]
            for name, run in runs[r % 3 :] + runs[: r % 3]:  # each goes first in turn
                got[name] = run(work / f"{name}{r}")
            raw, fleet, api = float(got["raw"]), dict(got["fleet"]), float(got["api"])
            rounds.append((raw, fleet, api))
            ratio_batch, ratio_wall = fleet["batch_s"] / raw, fleet["wall_s"] / raw
            print(f"{n} tasks, {parallel} at a time: xargs docker run {raw:.2f}s; sandfleet "
                  f"run {fleet['wall_s']:.2f}s wall ({ratio_wall:.2f}x), {fleet['batch_s']:.2f}s "
                  f"batch ({ratio_batch:.2f}x; target <= {TARGET}); the same containers "
                  f"through the engine API {api:.2f}s ({fleet['batch_s'] / api:.2f}x)")  # fmt: skip
    ratios = [fleet["batch_s"] / raw for raw, fleet, _ in rounds]
    raw, fleet, api = rounds[ratios.index(statistics.median_high(ratios))]
    ratio_batch = fleet["batch_s"] / raw
    ratio_wall = fleet["wall_s"] / raw
    figures = {
        "bench": "batch",
        "quick": args.quick,
        "tasks": n,
        "parallel": parallel,
        "rounds": len(rounds),
        "xargs_docker_run_s": round(raw, 3),
        "sandfleet_wall_s": round(fleet["wall_s"], 3),
        "sandfleet_batch_s": round(fleet["batch_s"], 3),
        "ratio_batch": round(ratio_batch, 3),
        "ratio_wall": round(ratio_wall, 3),
        "ratio_batch_rounds": [round(r, 3) for r in ratios],
        "api_floor_s": round(api, 3),
        "ratio_api_floor": round(fleet["batch_s"] / api, 3),
        "ratio_api_floor_rounds": [round(f["batch_s"] / a, 3) for _, f, a in rounds],
        "target": TARGET,
        "ok": ratio_batch <= TARGET,
    }
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
