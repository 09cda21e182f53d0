"""Cold sandbox provisioning latency: DockerBackend vs raw `docker run`, same image and flags.

Latency = request -> command running inside: the host's wall clock (ns) when the request
starts, subtracted from the first thing the command does, `date +%s%N` (the container
shares the host's clock). For DockerBackend the request is building the spec, create and
start through the docker SDK; for the baseline it is `docker run` of the same image with
the equivalent CLI flags (derived from the same spec). Runs alternate between the paths.
Container removal and workspace preparation are outside the measured span.

One setting has no `docker run` flag: sandfleet disables the container's networking
(`sandbox.container_spec.NETWORK`). The sandbox still gets a network namespace of its own
with loopback only, as with `--network none`, but dockerd builds no network sandbox for
it and runc does not re-execute dockerd as a prestart hook, which is most of what makes
the SDK path faster. A third path shows the split: DockerBackend with the engine's
networking left on, the very container `docker run` makes (ratio `engine_network`).

    .venv/bin/python bench/sandbox_start.py [--quick] [--runs N] [--template minimal]

Prints both distributions and their ratio, then one JSON line. Target: ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sandbox.backend import SandboxSpec
from sandbox.container_spec import LABEL_BATCH, container_spec, sandbox_labels, sandbox_name
from sandbox.docker_backend import DockerBackend
from sandbox.images import image_ref
from sandbox.liveness import current_owner
from sandbox.seccomp import PROFILE_PATH
from sandbox.templates import load_template

MARKER = ["sh", "-c", "date +%s%N"]
TARGET = 1.15


def docker_run_argv(spec: dict[str, Any]) -> list[str]:
    """The `docker run` argv equivalent to a container_spec() dict."""
    argv = ["docker", "run", "--rm", "--name", spec["name"], "--hostname", spec["hostname"],
            "--user", spec["user"], "--workdir", spec["working_dir"]]  # fmt: skip
    for key, value in spec["labels"].items():
        argv += ["--label", f"{key}={value}"]
    for key, value in spec["environment"].items():
        argv += ["--env", f"{key}={value}"]
    argv += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
             "--security-opt", f"seccomp={PROFILE_PATH}"]  # fmt: skip
    if spec["read_only"]:
        argv.append("--read-only")
    for path, opts in spec["tmpfs"].items():
        argv += ["--tmpfs", f"{path}:{opts}"]
    for host, bind in spec["volumes"].items():
        argv += ["--volume", f"{host}:{bind['bind']}:{bind['mode']}"]
    argv += ["--network", spec["network_mode"], "--ipc", spec["ipc_mode"],
             "--cgroupns", spec["cgroupns"], "--pids-limit", str(spec["pids_limit"]),
             "--memory", str(spec["mem_limit"]), "--memory-swap", str(spec["memswap_limit"]),
             "--cpus", f"{spec['nano_cpus'] / 1e9:g}"]  # fmt: skip
    if spec["init"]:
        argv.append("--init")
    for u in spec["ulimits"]:
        argv += ["--ulimit", f"{u['Name']}={u['Soft']}:{u['Hard']}"]
    log = spec["log_config"]
    argv += ["--log-driver", log["type"]]
    for key, value in log["config"].items():
        argv += ["--log-opt", f"{key}={value}"]
    if spec.get("runtime"):
        argv += ["--runtime", spec["runtime"]]
    return [*argv, spec["image"], *spec["command"]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[rank]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 0.50), 1),
        "p99_ms": round(percentile(values, 0.99), 1),
        "mean_ms": round(statistics.fmean(values), 1),
        "min_ms": round(min(values), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 runs per path (CI smoke).")
    parser.add_argument("--runs", type=int, help="Runs per path (default 30; --quick: 8).")
    parser.add_argument("--template", default="minimal")
    args = parser.parse_args()
    runs = args.runs or (8 if args.quick else 30)
    template = load_template(args.template)
    image = image_ref(template.image)
    batch = f"bench-{uuid.uuid4().hex[:8]}"
    labels = sandbox_labels(batch=batch, task="start", attempt=1, team="bench",
                            owner=current_owner().token(), template=template.name)  # fmt: skip
    backend = DockerBackend()
    sdk_ms: list[float] = []
    cli_ms: list[float] = []

    net_ms: list[float] = []

    def spec_for(i: int, path: str, workspace: str) -> dict[str, Any]:
        return container_spec(template, image=image, labels=labels, workspace_host_path=workspace,
                              name=sandbox_name(batch, path, i, uuid.uuid4().hex[:6]),
                              command=MARKER)  # fmt: skip

    def via_backend(i: int, workspace: str, engine_network: bool = False) -> float:
        t0 = time.time_ns()
        spec = spec_for(i, "net" if engine_network else "sdk", workspace)
        if engine_network:
            spec["network_disabled"] = False
        box = backend.create(SandboxSpec(spec))
        try:
            backend.start(box)
            waited = backend.wait(box, timeout=60)
            out = b"".join(backend.logs(box, "stdout")).decode()
        finally:
            backend.remove(box)
        if waited.exit_code != 0:
            sys.exit(f"sandbox exited {waited.exit_code}: {out}")
        return (int(out.strip()) - t0) / 1e6

    def via_cli(i: int, workspace: str) -> float:
        argv = docker_run_argv(spec_for(i, "cli", workspace))
        t0 = time.time_ns()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"`docker run` exited {done.returncode}: {done.stderr.strip()}")
        return (int(done.stdout.strip()) - t0) / 1e6

    try:
        with tempfile.TemporaryDirectory(prefix="sandfleet-bench-") as workspace:
            Path(workspace).chmod(0o777)
            via_backend(0, workspace)  # warm the engine's caches for every path
            via_backend(0, workspace, engine_network=True)
            via_cli(0, workspace)
            for i in range(1, runs + 1):
                paths = [
                    (sdk_ms, functools.partial(via_backend, i, workspace)),
                    (net_ms, functools.partial(via_backend, i, workspace, engine_network=True)),
                    (cli_ms, functools.partial(via_cli, i, workspace)),
                ]
                for times, run in paths[i % 3 :] + paths[: i % 3]:  # each goes first in turn
                    times.append(run())
    finally:
        for box in backend.list({LABEL_BATCH: batch}):
            backend.remove(box.id)
        backend.close()

    sdk, net, cli = summary(sdk_ms), summary(net_ms), summary(cli_ms)
    ratio_p50 = round(sdk["p50_ms"] / cli["p50_ms"], 3)
    ratio_p99 = round(sdk["p99_ms"] / cli["p99_ms"], 3)
    ratio_net = round(net["p50_ms"] / cli["p50_ms"], 3)
    print(f"cold start, request -> command running ({runs} runs each, template {template.name})")
    for name, s in (("DockerBackend", sdk), ("  engine net", net), ("docker run", cli)):
        print(f"  {name:14} p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms  "
              f"mean {s['mean_ms']:7.1f} ms  min {s['min_ms']:7.1f} ms")  # fmt: skip
    verdict = "meets" if ratio_p50 <= TARGET else "misses"
    print(f"  ratio p50 {ratio_p50}  p99 {ratio_p99}  ({verdict} the {TARGET} target at p50)")
    print(f"  with the engine's networking on (the container `docker run` makes): p50 ratio "
          f"{ratio_net}")  # fmt: skip
    print(json.dumps({"bench": "sandbox_start", "runs": runs, "template": template.name,
                      "image": image, "backend": sdk, "backend_engine_network": net,
                      "docker_run": cli, "ratio_p50": ratio_p50, "ratio_p99": ratio_p99,
                      "ratio_engine_network_p50": ratio_net, "target": TARGET}))  # fmt: skip


if __name__ == "__main__":
    main()
