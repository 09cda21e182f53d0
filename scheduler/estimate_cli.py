"""`sandfleet estimate BATCH`: what a batch should cost, before anything runs.

A table per task type (template, model, where the LLM figure comes from), the totals,
and the comparison with the batch's cap — the same check `sandfleet run` makes. Exit
status 0 either way (2 on invalid input); `--json` prints one JSON document.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import click

from accounting.paths import resolve_data_dir

__all__ = ["COMMANDS"]


@click.command("estimate")
@click.argument("batch", type=click.Path(dir_okay=False))
@click.option(
    "--data-dir", default=None, help="Ledger whose history prices LLM use (default as `run`)."
)
@click.option(
    "--policies",
    "policies_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Policies file (default configs/policies.yaml).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def estimate_cmd(
    batch: str, data_dir: str | None, policies_path: str | None, as_json: bool
) -> None:
    """Estimate the cost of BATCH (a YAML file): compute, LLM, and its cap."""
    from accounting.policies import load_policies
    from accounting.pricing import load_pricing
    from scheduler.estimate import batch_cap_nusd, estimate_batch, exceeds_cap
    from scheduler.spec import load_batch

    spec = load_batch(batch)
    policies = load_policies(policies_path) if policies_path else load_policies()
    estimate = estimate_batch(spec, load_pricing(), resolve_data_dir(data_dir), policies=policies)
    cap = batch_cap_nusd(spec, policies)
    refusal = exceeds_cap(estimate, spec, policies)
    if as_json:
        doc = {**estimate.to_json(), "cap_nusd": cap, "exceeds_cap": refusal is not None,
               "reason": refusal}  # fmt: skip
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    _print(estimate, cap, refusal)


def format_usd(nusd: int) -> str:
    """Nano-USD for a table cell, to 1/100 of a cent (the JSON keeps the exact figure)."""
    return f"${Decimal(nusd) / 10**9:,.4f}"


def _print(estimate: Any, cap: int | None, refusal: str | None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    title = f"estimate of {estimate.batch_id} (team {estimate.team}), one attempt per task"
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for name in ("type", "template", "model", "source"):
        table.add_column(name)
    for name in ("tasks", "capped", "compute", "LLM", "total"):
        table.add_column(name, justify="right")
    for g in estimate.groups():
        table.add_row(
            g["task_type"], g["template"], g["model"] or "-", g["llm_source"], str(g["tasks"]),
            str(g["capped"]), format_usd(g["compute_nusd"]), format_usd(g["llm_nusd"]),
            format_usd(g["total_nusd"]),
        )  # fmt: skip
    table.add_section()
    table.add_row(
        "all", "", "", "", str(len(estimate.tasks)), str(estimate.capped),
        format_usd(estimate.compute_nusd), format_usd(estimate.llm_nusd),
        format_usd(estimate.total_nusd),
    )  # fmt: skip
    console = Console()
    console.print(table)
    if estimate.unknown:
        console.print(f"[yellow]{estimate.unknown} tasks call models without a price and no "
                      "cap: the total is a lower bound[/]")  # fmt: skip
    if estimate.capped:
        console.print(f"{estimate.capped} tasks reach their own cap (they may end "
                      "budget_exceeded)")  # fmt: skip
    if cap is None:
        console.print("batch cap: none")
    elif refusal is None:
        share = 100 * estimate.total_nusd / cap if cap else 0.0
        console.print(f"[green]within the batch cap[/] {format_usd(cap)} ({share:.1f}% of it)")
    else:
        console.print(f"[red]over the batch cap[/]: {refusal}", soft_wrap=True)


COMMANDS = [estimate_cmd]
