"""A real hardened sandbox wired to its node's gateway, inside a real local Ray.

A Ray task (as the runner will) finds its node's `NodeGateway`, opens the attempt
(`node_attempt`) and runs it with `run_attempt_in_sandbox` and the hooks: the agent —
stdlib urllib in the base image — calls the gateway's `scripted` model through the
forwarder. The `ledger` actor writes real Parquet, read back with DuckDB: the llm_call
event and its charges, the commands captured, the compute charges, the budget events.
A task whose budget leaves less than one call's worth gets HTTP 402, and the node
stops its (otherwise endless) agent: the attempt is `budget_exceeded`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from accounting.config import configs_dir
from accounting.pricing import load_pricing
from sandbox.attempt import archive_dir
from sandbox.container_spec import LABEL_BATCH
from sandbox.templates import load_template
from sandbox.workspace import workspace_root
from scheduler.budget import compute_rate_nusd_per_s

pytestmark = [pytest.mark.docker, pytest.mark.ray, pytest.mark.slow]

LEASE_S = 600  # one lease outlasts every attempt here: no renewal races the 402
TEAM = "team-gw"

AGENT = textwrap.dedent(
    """
    import json, os, signal, subprocess, time, urllib.error, urllib.request
    subprocess.run(["/bin/echo", "agent-step"], check=True)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "say hello"}]}
    request = urllib.request.Request(
        os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
                 "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            out = {"status": r.status, "body": json.load(r)}
    except urllib.error.HTTPError as e:
        out = {"status": e.code, "body": json.load(e)}
    out["token_in_env"] = os.environ["OPENAI_API_KEY"].startswith("sft1.")
    print(json.dumps(out), flush=True)
    if out["status"] == 402:
        signal.pause()  # only the node's stop ends this agent
    open("/workspace/ready", "w").close()
    end = time.monotonic() + 120  # the test releases it once the node sampled it
    while not os.path.exists("/workspace/release") and time.monotonic() < end:
        time.sleep(0.05)
    """
)


def _attempt(request: Any, workspace: str, options: dict[str, Any]) -> dict[str, Any]:
    """The runner's part, in a Ray task on the node."""
    from sandbox.attempt import run_attempt_in_sandbox
    from sandbox.docker_backend import DockerBackend
    from scheduler.node_attempt import gateway_for_this_node, node_attempt

    gateway = gateway_for_this_node(request.data_dir, **options)
    backend = DockerBackend()
    try:
        with node_attempt(request, task_type="probe", gateway=gateway) as hooks:
            result = run_attempt_in_sandbox(
                backend, request.template, data_dir=request.data_dir, image=request.image,
                batch=request.batch, task=request.task, attempt=request.attempt,
                team=request.team, command=request.command, workspace_dir=workspace,
                timeout_s=request.timeout_s, env=dict(request.env), hooks=hooks,
            )  # fmt: skip
    finally:
        backend.close()
    return {"outcome": result.outcome.value, "exit_code": result.exit_code,
            "report": dict(result.node_report or {}), "archive": result.archive_dir}  # fmt: skip


@pytest.fixture(scope="module")
def image(docker_client: Any) -> str:
    from docker.errors import ImageNotFound

    from sandbox.images import image_ref

    ref = image_ref("base")
    try:
        docker_client.images.get(ref)
    except ImageNotFound:
        reason = f"image {ref} is not built (run `sandfleet images build`)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{reason} (CI=true: images are required; run `make setup`)")
        pytest.skip(reason)
    return ref


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Local Ray with the ledger and budget actors, and where the gateway keeps sockets."""
    import ray
    import ray.cloudpickle

    from scheduler.budget_keeper import get_budget_keeper
    from scheduler.ledger_actor import get_ledger
    from scheduler.node_attempt import close_node_gateways

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    data_dir = str(tmp_path_factory.mktemp("gwdata") / "sandfleet-data")
    root = tempfile.mkdtemp(prefix="sfgw-", dir="/tmp")  # short: unix socket paths
    providers = tmp_path_factory.mktemp("gwconf") / "providers.yaml"
    script = configs_dir() / "scripts" / "test.yaml"
    providers.write_text(
        "providers:\n  - {name: scripted, kind: scripted, models: [scripted], "
        f"script: {json.dumps(str(script))}}}\n"
    )
    ray.init(address="local", num_cpus=2, resources={"sandbox_slots": 2},
             namespace=f"pytest-{uuid.uuid4().hex[:6]}", include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    try:
        ledger = get_ledger(data_dir)
        keeper = get_budget_keeper(data_dir=data_dir)
        options = {"root": root, "providers_path": str(providers), "lease_s": LEASE_S}
        yield {"ray": ray, "data_dir": data_dir, "root": root, "ledger": ledger,
               "keeper": keeper, "options": options}  # fmt: skip
        close_node_gateways()  # what the driver does: open attempts closed, rows flushed
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def _request(
    cluster: dict[str, Any], image: str, batch: str, timeout_s: float, model: str = "scripted"
) -> Any:
    from scheduler.plan import Backend
    from scheduler.runner import AttemptRequest

    env = {"SANDFLEET_MODEL": model, "SANDFLEET_TASK": "t1"} if model else {"SANDFLEET_TASK": "t1"}
    return AttemptRequest(
        batch=batch, task="t1", attempt=1, team=TEAM, template=load_template("minimal"),
        image=image, command=("python3", "/workspace/agent.py"), repo="", ref="HEAD",
        timeout_s=timeout_s, env=tuple(sorted(env.items())), data_dir=cluster["data_dir"],
        backend=Backend.DOCKER,
    )  # fmt: skip


def _start(cluster: dict[str, Any], request: Any, tmp_path: Path) -> Any:
    ray = cluster["ray"]
    workspace = tmp_path / "given"
    workspace.mkdir()
    (workspace / "agent.py").write_text(AGENT)
    task = ray.remote(num_cpus=1, resources={"sandbox_slots": 1}, max_retries=0)(_attempt)
    return task.remote(request, str(workspace), cluster["options"])


def _sampled(cluster: dict[str, Any], request: Any) -> bool:
    """The node's capture has sampled the running attempt twice (memory GiB-seconds are
    integrated between samples)."""
    ray = cluster["ray"]
    gateway = ray.get_actor(f"gateway-{_node(ray)}", namespace="sandfleet")
    key = f"{request.team}/{request.batch}/{request.task}#{request.attempt}"
    tally = ray.get(gateway.info.remote())["attempts"].get(key)
    return tally is not None and tally["resource_samples"] >= 2


def _flush(cluster: dict[str, Any]) -> None:
    ray = cluster["ray"]
    gateway = ray.get_actor(f"gateway-{_node(ray)}", namespace="sandfleet")
    ray.get(gateway.flush.remote())
    ray.get(cluster["keeper"].flush_events.remote())
    ray.get(cluster["ledger"].flush.remote())


def _node(ray: Any) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"])


def _query(cluster: dict[str, Any], sql: str, *args: Any) -> list[tuple[Any, ...]]:
    from accounting.views import connect

    con = connect(cluster["data_dir"])
    try:
        return con.execute(sql, list(args)).fetchall()
    finally:
        con.close()


def _assert_nothing_left(cluster: dict[str, Any], docker_client: Any, batch: str) -> None:
    left = docker_client.containers.list(all=True, filters={"label": f"{LABEL_BATCH}={batch}"})
    for c in left:
        c.remove(force=True)
    assert not left, [c.name for c in left]
    assert list(Path(cluster["root"]).iterdir()) == []  # every socket directory removed
    assert not (Path(cluster["data_dir"]) / "workspaces" / batch).exists()


def test_an_llm_call_from_a_hardened_sandbox_is_metered_into_the_ledger_with_its_commands(
    cluster: dict[str, Any], image: str, docker_client: Any, tmp_path: Path, wait_for: Any
) -> None:
    ray = cluster["ray"]
    batch = f"pytest-ngw-{uuid.uuid4().hex[:8]}"
    request = _request(cluster, image, batch, timeout_s=180)
    repo = workspace_root(cluster["data_dir"], batch, "t1", 1) / "repo"
    try:
        running = _start(cluster, request, tmp_path)
        wait_for(lambda: (repo / "ready").exists(), timeout=120, what="the agent's LLM call")
        wait_for(lambda: _sampled(cluster, request), timeout=60, what="resource samples")
        (repo / "release").touch()
        out = ray.get(running, timeout=120)
    finally:
        _assert_nothing_left(cluster, docker_client, batch)
    agent = json.loads((Path(out["archive"]) / "stdout.log").read_text().splitlines()[-1])
    assert agent["status"] == 200 and agent["token_in_env"] is True
    assert agent["body"]["choices"][0]["message"]["content"] == "Hello from the scripted model!"
    assert out["outcome"] == "succeeded", out
    report = out["report"]
    cost = 4 * 400 + 8 * 1600  # 1 + ceil(9 bytes / 4) input tokens, 8 output; scripted prices
    assert (report["llm_calls"], report["tokens_input"], report["tokens_output"]) == (1, 4, 8)
    assert report["cost_llm_nusd"] == cost and report["cost_compute_nusd"] > 0, json.dumps(report)
    assert report["capture_mode"] in {"netlink", "poll"} and report["capture_error"] is None
    assert report["stop_reason"] is None and report["cpu_core_seconds"] > 0

    _flush(cluster)
    calls = _query(cluster, "SELECT json_extract(payload, '$.status')::INT, json_extract("
                   "payload, '$.cost_nusd')::BIGINT FROM events WHERE kind = 'llm_call' AND "
                   "batch = ?", batch)  # fmt: skip
    assert calls == [(200, cost)]
    charges = dict(_query(cluster, "SELECT usage_bucket, sum(cost_nusd)::BIGINT FROM charges "
                          "WHERE batch = ? GROUP BY usage_bucket", batch))  # fmt: skip
    assert charges["input_uncached"] + charges["output"] == cost
    assert charges["cpu"] > 0 and charges["memory"] > 0
    assert charges["cpu"] + charges["memory"] == report["cost_compute_nusd"]
    argvs = [json.loads(a) for (a,) in _query(cluster, "SELECT json_extract(payload, '$.argv') "
             "FROM events WHERE kind = 'command_started' AND batch = ?", batch)]  # fmt: skip
    assert ["/bin/echo", "agent-step"] in argvs
    assert any(a[:2] == ["python3", "/opt/sandfleet/forwarder.py"] for a in argvs)
    kinds = {k for (k,) in _query(cluster, "SELECT DISTINCT kind FROM events WHERE batch = ?",
                                  batch)}  # fmt: skip
    assert {"budget_reserved", "budget_settled", "resource_sample"} <= kinds
    spent = ray.get(cluster["keeper"].spent.remote("task", f"{batch}/t1"))
    assert spent > cost  # the call, and the compute lease settled for the time used


def test_a_task_whose_budget_cannot_pay_a_call_gets_402_and_is_stopped_as_budget_exceeded(
    cluster: dict[str, Any], image: str, docker_client: Any, tmp_path: Path
) -> None:
    ray = cluster["ray"]
    batch = f"pytest-ngw-{uuid.uuid4().hex[:8]}"
    res = load_template("minimal").resources
    lease = math.ceil(compute_rate_nusd_per_s(load_pricing(), res.cpus, res.memory) * LEASE_S)
    cap = lease + 2000  # after the compute lease, less than one call's minimum (3,200)
    ray.get(cluster["keeper"].register_batch.remote(batch, TEAM, None, {"t1": cap}))
    try:
        running = _start(cluster, _request(cluster, image, batch, timeout_s=240), tmp_path)
        out = ray.get(running, timeout=300)
    finally:
        _assert_nothing_left(cluster, docker_client, batch)
    assert out["outcome"] == "budget_exceeded", out
    assert out["report"]["stop_reason"] == "budget_exceeded"
    assert "task" in out["report"]["stop_detail"]
    agent = json.loads((Path(out["archive"]) / "stdout.log").read_text().splitlines()[-1])
    assert agent["status"] == 402
    assert agent["body"]["error"]["code"] == "budget_exceeded"
    assert "cap" in agent["body"]["error"]["message"]

    _flush(cluster)
    statuses = _query(cluster, "SELECT json_extract(payload, '$.status')::INT FROM events "
                      "WHERE kind = 'llm_call' AND batch = ?", batch)  # fmt: skip
    assert statuses == [(402,)]
    refused = _query(cluster, "SELECT json_extract_string(payload, '$.scope') FROM events "
                     "WHERE kind = 'budget_refused' AND batch = ?", batch)  # fmt: skip
    assert refused == [("task",)]
    assert ray.get(cluster["keeper"].spent.remote("task", f"{batch}/t1")) <= cap


NO_GATEWAY_AGENT = textwrap.dedent(
    """
    import json, os, socket
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", 8080))  # where the forwarder would serve the LLM
        reached = True
    except OSError:
        reached = False
    print(json.dumps({"env": sorted(k for k in os.environ if "PROXY" in k or "OPENAI" in k),
                      "gateway_mounted": os.path.exists("/run/sandfleet"),
                      "reached": reached}), flush=True)
    """
)


def test_a_task_with_no_model_and_no_egress_runs_without_a_forwarder(
    cluster: dict[str, Any], image: str, docker_client: Any, tmp_path: Path
) -> None:
    ray = cluster["ray"]
    batch = f"pytest-ngw-{uuid.uuid4().hex[:8]}"
    request = _request(cluster, image, batch, timeout_s=120, model="")
    workspace = tmp_path / "given"
    workspace.mkdir()
    (workspace / "agent.py").write_text(NO_GATEWAY_AGENT)
    task = ray.remote(num_cpus=1, resources={"sandbox_slots": 1}, max_retries=0)(_attempt)
    try:
        out = ray.get(task.remote(request, str(workspace), cluster["options"]), timeout=120)
    finally:
        _assert_nothing_left(cluster, docker_client, batch)
    assert out["outcome"] == "succeeded", out
    agent = json.loads((Path(out["archive"]) / "stdout.log").read_text().splitlines()[-1])
    # nothing to forward: no endpoint in its environment, no socket, nothing listening
    assert agent == {"env": [], "gateway_mounted": False, "reached": False}
    assert out["report"]["capture_mode"] in {"netlink", "poll"}  # still captured
    _flush(cluster)
    argvs = [json.loads(a) for (a,) in _query(cluster, "SELECT json_extract(payload, '$.argv') "
             "FROM events WHERE kind = 'command_started' AND batch = ?", batch)]  # fmt: skip
    assert ["python3", "/workspace/agent.py"] in argvs
    assert not any("/opt/sandfleet/forwarder.py" in a for a in argvs)


def test_a_task_with_nothing_to_forward_and_no_budget_for_a_second_never_starts(
    cluster: dict[str, Any], image: str, docker_client: Any, tmp_path: Path
) -> None:
    # Its open answers while the sandbox is made (no channel to wait for); the refusal
    # must still come before the sandbox starts: the agent never writes its file.
    from accounting.errors import BudgetError

    ray = cluster["ray"]
    batch = f"pytest-ngw-{uuid.uuid4().hex[:8]}"
    ray.get(cluster["keeper"].register_batch.remote(batch, TEAM, None, {"t1": 1}))
    workspace = tmp_path / "given"
    workspace.mkdir()
    (workspace / "agent.py").write_text("print('started', flush=True)\n")
    task = ray.remote(num_cpus=1, resources={"sandbox_slots": 1}, max_retries=0)(_attempt)
    request = _request(cluster, image, batch, timeout_s=60, model="")
    try:
        with pytest.raises(ray.exceptions.RayTaskError) as raised:
            ray.get(task.remote(request, str(workspace), cluster["options"]), timeout=120)
    finally:
        _assert_nothing_left(cluster, docker_client, batch)
    assert isinstance(raised.value.cause, BudgetError), raised.value
    assert "budget cap reached: task" in str(raised.value.cause)
    archive = archive_dir(cluster["data_dir"], batch, "t1", 1)
    result = json.loads((archive / "result.json").read_text())
    assert result["exit_code"] is None and "budget cap reached" in result["error"]
    assert not (archive / "stdout.log").exists()  # never started: no output was followed
    gateway = ray.get_actor(f"gateway-{_node(ray)}", namespace="sandfleet")
    assert f"{TEAM}/{batch}/t1#1" not in ray.get(gateway.info.remote())["attempts"]


def test_the_node_s_rows_are_queued_and_a_refused_batch_fails_the_next_call(
    cluster: dict[str, Any],
) -> None:
    from datetime import UTC, datetime

    from accounting.errors import SchemaError
    from accounting.schemas import Event, EventKind
    from scheduler.fleet_outbox import LedgerSender

    batch = f"pytest-ngw-{uuid.uuid4().hex[:8]}"
    sender = LedgerSender(cluster["ledger"], every_s=0.05)
    try:
        for i in range(3):
            row = Event(
                datetime.now(UTC),
                TEAM,
                batch,
                "t1",
                1,
                "n",
                EventKind.COMMAND_STARTED,
                {"argv": ["echo", str(i)], "pid": i, "ppid": 1, "mode": "netlink"},
            )
            assert sender.append("events", [row]) == 1  # queued: it returns at once
        sender.flush()
        cluster["ray"].get(cluster["ledger"].flush.remote())
        got = _query(cluster, "SELECT json_extract(payload, '$.pid')::INT FROM events "
                     "WHERE batch = ? ORDER BY event_seq", batch)  # fmt: skip
        assert got == [(0,), (1,), (2,)]
        sender.append("events", [{"time": "not a time"}])
        with pytest.raises(SchemaError, match="events"):
            sender.flush()
        with pytest.raises(SchemaError):  # failed closed: later rows are refused too
            sender.append("events", [])
    finally:
        sender._stop.set()
