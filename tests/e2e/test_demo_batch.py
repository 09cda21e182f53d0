"""The demo batch, end to end, judged from the ledger alone.

`sandfleet run configs/batches/demo.yaml` on the embedded default (local Ray, the local
Docker engine, the `scripted` model): every task ends as its `expect` label says; each
succeeded task's archived diff makes its tests pass on a fresh clone; the charges
reconcile with the gateway's per-call costs and the cgroup-measured usage, nothing is
priced twice; the audit verifies; no container or workspace is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from accounting.audit import verify
from accounting.config import repo_root
from accounting.views import connect
from sandbox.container_spec import LABEL_BATCH

ROOT = repo_root()
SANDFLEET = Path(sys.executable).parent / "sandfleet"
DEMO = ROOT / "configs" / "batches" / "demo.yaml"


def _sql(data_dir: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    con = connect(str(data_dir))
    try:
        return con.execute(query, list(params)).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, docker_client: Any) -> dict[str, Any]:
    """Run the demo batch once (about a minute) and hand its data dir to every test."""
    subprocess.run([sys.executable, "-m", "scheduler.demo_repos"], cwd=ROOT, check=True)
    data_dir = tmp_path_factory.mktemp("demo") / "data"
    done = subprocess.run(
        [str(SANDFLEET), "run", str(DEMO), "--again", "--json", "--data-dir", str(data_dir),
         "--no-dashboard"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr  # some tasks fail on purpose
    report = json.loads(done.stdout[done.stdout.index("{") :])
    [(spec,)] = _sql(
        data_dir, "SELECT payload FROM events WHERE kind = 'batch_submitted' AND batch = ?",
        report["batch"],
    )  # fmt: skip
    return {"data_dir": data_dir, "batch": report["batch"], "spec": json.loads(spec)["spec"]}


def test_every_task_ends_as_the_spec_expects(demo_run: dict[str, Any]) -> None:
    expected = {t["id"]: t["labels"]["expect"] for t in demo_run["spec"]["tasks"]}
    rows = _sql(demo_run["data_dir"], "SELECT task, outcome FROM tasks WHERE batch = ?",
                demo_run["batch"])  # fmt: skip
    assert dict(rows) == expected
    # one summary row per attempt, and every task's terminal state recorded exactly once
    assert Counter(task for task, _ in rows) == Counter(list(expected))
    terminal = _sql(
        demo_run["data_dir"],
        "SELECT task, count(*) FROM events WHERE batch = ? AND kind = 'task_state' "
        "AND payload->>'$.state' NOT IN ('queued', 'running') GROUP BY task",
        demo_run["batch"],
    )
    assert dict(terminal) == dict.fromkeys(expected, 1)


def test_each_succeeded_task_passes_its_tests_on_its_archived_diff(
    demo_run: dict[str, Any], tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    succeeded = [t for t in demo_run["spec"]["tasks"] if t["labels"]["expect"] == "succeeded"]
    assert len(succeeded) >= 15
    for task in succeeded:
        archive = demo_run["data_dir"] / "archive" / demo_run["batch"] / task["id"] / "1"
        repo = (DEMO.parent / task["repo"]).resolve()
        clone = tmp_path / task["id"]
        subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
        diff = archive / "diff.patch"
        assert diff.stat().st_size > 0, task["id"]
        subprocess.run(["git", "apply", str(diff)], cwd=clone, check=True)
        check = subprocess.run(["sh", "-c", task["labels"]["verify"]], cwd=clone, env=env,
                               capture_output=True, text=True, check=False)  # fmt: skip
        assert check.returncode == 0, f"{task['id']}:\n{check.stdout}{check.stderr}"


def test_llm_charges_equal_the_gateways_per_call_costs(demo_run: dict[str, Any]) -> None:
    d, b = demo_run["data_dir"], demo_run["batch"]
    [(charged, rows)] = _sql(
        d, "SELECT sum(cost_nusd), count(*) FROM charges WHERE batch = ? AND model <> ''", b
    )
    [(called, calls)] = _sql(
        d, "SELECT sum(CAST(payload->>'$.cost_nusd' AS BIGINT)), count(*) FROM events "
        "WHERE batch = ? AND kind = 'llm_call'", b,
    )  # fmt: skip
    assert calls >= 24 * 3 and rows >= calls
    assert charged == called > 0
    # and each tasks row agrees with its charges, including the attempt the scheduler
    # cancelled (stopped by a rule): its runner never reports back, so its row is built
    # from what the node gateway metered
    differ = _sql(
        d,
        "WITH c AS (SELECT task, sum(cost_nusd) AS usd FROM charges WHERE batch = ? "
        "AND model <> '' GROUP BY task) SELECT t.task, t.outcome, t.cost_llm_nusd, c.usd "
        "FROM tasks t JOIN c USING (task) WHERE t.batch = ? AND t.cost_llm_nusd <> c.usd",
        b,
        b,
    )
    assert differ == []
    stopped = _sql(
        d, "SELECT cost_llm_nusd, llm_calls FROM tasks WHERE batch = ? "
        "AND outcome = 'stopped_by_rule'", b,
    )  # fmt: skip
    assert stopped and all(usd > 0 and calls > 0 for usd, calls in stopped), stopped


def test_compute_charges_match_the_cgroup_measured_usage(demo_run: dict[str, Any]) -> None:
    d, b = demo_run["data_dir"], demo_run["batch"]
    charged = dict(
        _sql(
            d,
            "SELECT task, sum(quantity) FROM charges WHERE batch = ? AND usage_bucket = 'cpu' "
            "GROUP BY task",
            b,
        )
    )
    measured = dict(
        _sql(
            d,
            "SELECT task, max(CAST(payload->>'$.cpu_usage_us' AS BIGINT)) FROM events "
            "WHERE batch = ? AND kind = 'resource_sample' GROUP BY task",
            b,
        )
    )
    assert len(charged) >= 20
    for task, seconds in charged.items():
        # the charge is the cgroup's CPU counter at the end; the last 1 s sample may trail it
        sampled = Decimal(measured[task]) / 1_000_000
        assert sampled <= seconds <= sampled + Decimal("1.5"), (task, seconds, sampled)


def test_nothing_is_priced_twice(demo_run: dict[str, Any]) -> None:
    [(rows, ids)] = _sql(
        demo_run["data_dir"], "SELECT count(*), count(DISTINCT charge_id) FROM charges"
    )
    assert rows == ids > 0


def test_the_audit_verifies_and_nothing_is_left_behind(
    demo_run: dict[str, Any], docker_client: Any
) -> None:
    report = verify(demo_run["data_dir"])
    assert report.ok, report.summary()
    left = docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_BATCH}={demo_run['batch']}"}
    )
    assert left == []
    workspaces = demo_run["data_dir"] / "workspaces" / demo_run["batch"]
    assert not workspaces.exists() or not any(workspaces.rglob("owner.json"))
