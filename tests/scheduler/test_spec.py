"""Batch specs: loading, defaults, stable ids and hashes, and errors a person can act on."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounting.errors import ConfigError
from scheduler.spec import BatchSpec, load_batch, parse_batch

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "batches").glob("*.yaml"))


def write_batch(tmp_path: Path, data: dict[str, Any], name: str = "batch.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def header(**extra: Any) -> dict[str, Any]:
    return {"name": "nightly", "team": "ml", **extra}


TASKS = [
    {"id": "fix-1", "repo": "https://git.example.invalid/app.git", "prompt": "fix the login bug"},
    {"repo": "./app", "prompt": "add tests", "labels": {"area": "tests"}},
    {"repo": "./app", "command": "make lint", "env": {"STRICT": "1"}, "timeout": 60},
]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_batch_yaml_loads(path: Path) -> None:
    spec = load_batch(path)
    assert spec.tasks and all(t.task_id for t in spec.task_specs())


def test_the_example_batch_uses_the_minimal_template() -> None:
    assert REPO / "configs" / "batches" / "example.yaml" in SHIPPED
    spec = load_batch(REPO / "configs" / "batches" / "example.yaml")
    assert {t.template for t in spec.task_specs()} == {"minimal"}


def test_defaults_apply_unless_a_task_overrides_them(tmp_path: Path) -> None:
    defaults = {"template": "python", "timeout": 600, "max_attempts": 2, "model": "m1"}
    path = write_batch(tmp_path, header(defaults={**defaults, "budget": "0.50"}, tasks=TASKS))
    first, _, third = load_batch(path).task_specs()
    assert (first.template, first.timeout_s, first.max_attempts, first.model) == (
        "python",
        600,
        2,
        "m1",
    )
    assert first.budget_usd == Decimal("0.50") and first.budget_nusd == 500_000_000
    assert third.timeout_s == 60


def test_a_task_without_an_id_gets_the_same_id_on_every_run(tmp_path: Path) -> None:
    path = write_batch(tmp_path, header(tasks=TASKS))
    ids = [t.id for t in load_batch(path).tasks]
    assert ids[0] == "fix-1" and ids[1].startswith("t-") and len(ids[1]) == 14
    assert [t.id for t in load_batch(path).tasks] == ids
    reordered = write_batch(tmp_path, header(tasks=[TASKS[2], TASKS[1]]), "other.yaml")
    assert [t.id for t in load_batch(reordered).tasks] == [ids[2], ids[1]]


def test_identical_tasks_without_ids_are_numbered_in_file_order(tmp_path: Path) -> None:
    path = write_batch(tmp_path, header(tasks=[TASKS[1], TASKS[1], TASKS[1]]))
    a, b, c = (t.id for t in load_batch(path).tasks)
    assert (b, c) == (f"{a}-2", f"{a}-3")


def test_duplicate_ids_are_refused_naming_both_tasks(tmp_path: Path) -> None:
    tasks = [{**TASKS[0]}, {**TASKS[1], "id": "other"}, {**TASKS[2], "id": "fix-1"}]
    path = write_batch(tmp_path, header(tasks=tasks))
    with pytest.raises(ConfigError) as err:
        load_batch(path)
    assert str(path) in str(err.value)
    assert "task 0 and task 2 both have id 'fix-1'" in str(err.value)


def test_an_error_names_the_file_the_task_the_field_and_the_fix(tmp_path: Path) -> None:
    tasks = [TASKS[0], {**TASKS[1], "id": "second", "timeout": "soon"}]
    path = write_batch(tmp_path, header(tasks=tasks))
    with pytest.raises(ConfigError) as err:
        load_batch(path)
    assert str(err.value) == (
        f"{path}: task 1 (id 'second'): timeout: Input should be a valid integer "
        "(fix: use a whole number)"
    )


def test_a_misspelt_field_is_refused(tmp_path: Path) -> None:
    path = write_batch(tmp_path, header(tasks=[{**TASKS[0], "promt": "typo"}]))
    with pytest.raises(ConfigError, match=r"task 0 \(id 'fix-1'\): promt: Extra inputs"):
        load_batch(path)


def test_a_task_with_neither_prompt_nor_command_is_refused(tmp_path: Path) -> None:
    path = write_batch(tmp_path, header(tasks=[{"repo": "./app"}]))
    with pytest.raises(
        ConfigError, match=r"task 0: \(the task\): .*neither a prompt nor a command"
    ):
        load_batch(path)


def test_a_bad_header_field_is_named(tmp_path: Path) -> None:
    path = write_batch(tmp_path, header(priority="high", tasks=TASKS))
    with pytest.raises(ConfigError, match=r"batch.yaml: priority: .*\(fix: use a whole number\)"):
        load_batch(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "exactly one of `tasks`"),
        ({"tasks": TASKS, "tasks_from": "t.jsonl"}, "exactly one of `tasks`"),
        ({"tasks": []}, "no tasks"),
        ({"tasks_from": "t.csv"}, "neither JSONL nor Parquet"),
        ({"tasks_from": "missing.jsonl"}, "does not exist"),
    ],
)
def test_where_the_tasks_come_from_must_be_clear(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_batch(write_batch(tmp_path, header(**extra)))


def test_tasks_from_jsonl_and_parquet_give_the_same_batch_as_inline(tmp_path: Path) -> None:
    inline = load_batch(write_batch(tmp_path, header(tasks=TASKS)))
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n\n" for t in TASKS))
    from_jsonl = load_batch(write_batch(tmp_path, header(tasks_from="tasks.jsonl"), "j.yaml"))
    rows = [{**t, "env": list(t.get("env", {}).items()) or None} for t in TASKS]
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("repo", pa.string()),
                ("prompt", pa.string()),
                ("command", pa.string()),
                ("env", pa.map_(pa.string(), pa.string())),
                ("labels", pa.struct([("area", pa.string())])),
                ("timeout", pa.int64()),
            ]
        ),
    )
    pq.write_table(table, tmp_path / "tasks.parquet")
    from_parquet = load_batch(write_batch(tmp_path, header(tasks_from="tasks.parquet"), "p.yaml"))
    assert from_jsonl.content_hash == inline.content_hash == from_parquet.content_hash
    assert from_parquet.task_specs() == inline.task_specs()


def test_a_bad_jsonl_row_is_named_by_its_line(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(
        json.dumps(TASKS[0]) + "\n\n" + json.dumps({"repo": "r", "prompt": "p", "ref": 7}) + "\n"
    )
    with pytest.raises(ConfigError, match=r"t.jsonl: task 1 \[line 3\]: ref: .*valid string"):
        load_batch(write_batch(tmp_path, header(tasks_from="t.jsonl")))
    (tmp_path / "t.jsonl").write_text(json.dumps(TASKS[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"t.jsonl: line 2: not valid JSON"):
        load_batch(write_batch(tmp_path, header(tasks_from="t.jsonl")))


def test_a_command_string_runs_under_sh_and_a_list_is_the_argv(tmp_path: Path) -> None:
    tasks = [{**TASKS[0], "command": ["pytest", "-x"]}, TASKS[2]]
    first, second = load_batch(write_batch(tmp_path, header(tasks=tasks))).task_specs()
    assert first.command == ("pytest", "-x")
    assert second.command == ("sh", "-c", "make lint")


def test_local_repos_resolve_against_the_batch_file_and_urls_stay_as_written(
    tmp_path: Path,
) -> None:
    tasks = [*TASKS[:2], {**TASKS[1], "repo": "git@example.invalid:team/app.git"}]
    specs = load_batch(write_batch(tmp_path, header(tasks=tasks))).task_specs()
    assert [s.repo for s in specs] == [
        "https://git.example.invalid/app.git",
        str(tmp_path / "app"),
        "git@example.invalid:team/app.git",
    ]


def test_the_content_hash_ignores_formatting_but_not_content(tmp_path: Path) -> None:
    base = load_batch(write_batch(tmp_path, header(tasks=TASKS)))
    path = tmp_path / "reformatted.yaml"
    path.write_text("# a comment\n" + yaml.safe_dump(header(tasks=TASKS), default_flow_style=True))
    assert load_batch(path).content_hash == base.content_hash
    changed = [TASKS[0], {**TASKS[1], "env": {"B": "2", "A": "1"}}, TASKS[2]]
    again = [TASKS[0], {**TASKS[1], "env": {"A": "1", "B": "2"}}, TASKS[2]]
    one = load_batch(write_batch(tmp_path, header(tasks=changed), "c.yaml"))
    two = load_batch(write_batch(tmp_path, header(tasks=again), "d.yaml"))
    assert one.content_hash == two.content_hash != base.content_hash
    other_priority = load_batch(write_batch(tmp_path, header(priority=1, tasks=TASKS), "e.yaml"))
    assert other_priority.content_hash != base.content_hash
    assert base.batch_id == f"nightly-{base.content_hash[:10]}"


def test_a_spec_round_trips_through_its_ledger_record(tmp_path: Path) -> None:
    spec = load_batch(write_batch(tmp_path, header(budget="12.5", tasks=TASKS)))
    record = json.loads(json.dumps(spec.to_record()))
    again = BatchSpec.from_record(record)
    assert again.content_hash == spec.content_hash
    assert again.task_specs() == spec.task_specs()
    record["tasks"][0]["prompt"] = "something else"
    with pytest.raises(ConfigError, match="does not match its content hash"):
        BatchSpec.from_record(record)


def test_money_is_decimal_with_at_most_nano_usd_precision(tmp_path: Path) -> None:
    spec = load_batch(write_batch(tmp_path, header(budget=0.1, tasks=TASKS)))
    assert spec.budget == Decimal("0.1")
    path = write_batch(tmp_path, header(budget="0.0000000001", tasks=TASKS))
    with pytest.raises(ConfigError, match=r"budget: .*9 decimal places"):
        load_batch(path)


@pytest.mark.slow
def test_100000_tasks_load_from_parquet(tmp_path: Path) -> None:
    n = 100_000
    table = pa.table(
        {
            "repo": [f"https://git.example.invalid/r{i % 50}.git" for i in range(n)],
            "prompt": [f"fix issue {i}" for i in range(n)],
            "id": [f"task-{i}" if i % 3 else None for i in range(n)],
        }
    )
    pq.write_table(table, tmp_path / "big.parquet")
    spec = load_batch(write_batch(tmp_path, header(tasks_from="big.parquet")))
    specs = spec.task_specs()
    assert len(specs) == n and len({s.task_id for s in specs}) == n


# -- hypothesis: any input gives a batch or a ConfigError, never another exception -----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
TASK_FIELDS = [
    "id",
    "repo",
    "ref",
    "prompt",
    "command",
    "env",
    "labels",
    "task_type",
    "template",
    "timeout",
    "max_attempts",
    "model",
    "budget",
]
FIXTURE_OK = HealthCheck.function_scoped_fixture  # tmp_path is only named in messages
HEADER_FIELDS = ["name", "team", "priority", "budget", "description", "defaults", "tasks"]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=json_values | st.dictionaries(st.sampled_from(HEADER_FIELDS), json_values))
def test_arbitrary_data_gives_a_batch_or_a_config_error(tmp_path: Path, data: Any) -> None:
    try:
        parse_batch(data, source=tmp_path / "h.yaml")
    except ConfigError as e:
        assert str(e).startswith(str(tmp_path))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    field=st.sampled_from(TASK_FIELDS),
    value=json_values,
    index=st.integers(0, 2),
)
def test_an_invalid_task_field_is_named_with_its_task(
    tmp_path: Path, field: str, value: Any, index: int
) -> None:
    tasks = [dict(t) for t in TASKS]
    tasks[index][field] = value
    try:
        spec = parse_batch(header(tasks=tasks), source=tmp_path / "h.yaml")
    except ConfigError as e:
        text = str(e)
        assert text.startswith(f"{tmp_path / 'h.yaml'}: task ")
        assert f"task {index}" in text
        assert field in text or "both have id" in text or "(the task)" in text
        assert "(fix: " in text
    else:
        assert len(spec.tasks) == 3


def test_a_run_tag_gives_the_same_content_a_new_batch_id_that_survives_the_ledger() -> None:
    spec = load_batch(REPO / "configs" / "batches" / "example.yaml")
    again = spec.again("20261130T120000")
    assert again.batch_id == f"{spec.batch_id}-20261130T120000"
    assert {t.batch for t in again.task_specs()} == {again.batch_id}
    assert BatchSpec.from_record(again.to_record()).batch_id == again.batch_id
    assert BatchSpec.from_record(spec.to_record()).batch_id == spec.batch_id
    with pytest.raises(ConfigError, match="run tag 'no way'"):
        spec.again("no way")
