"""`sandfleet ledger compact`, `sandfleet audit verify`, `sandfleet audit export`."""

from __future__ import annotations

import json

import click

from accounting.paths import resolve_data_dir

__all__ = ["COMMANDS", "audit_group", "ledger_group"]

_DATA_DIR = click.option(
    "--data-dir",
    "data_dir",
    default=None,
    help="Ledger root (default: $SANDFLEET_DATA or ./sandfleet-data); a path or a pyarrow URI.",
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.group("ledger")
def ledger_group() -> None:
    """Maintain the ledger's Parquet segments."""


@ledger_group.command("compact")
@_DATA_DIR
@click.option(
    "--key", "key", default=None, help="Audit signing key (default: $SANDFLEET_AUDIT_KEY)."
)
@click.option(
    "--target-rows", default=4_000_000, show_default=True, help="Rows per merged segment."
)
@_JSON
def compact_command(data_dir: str | None, key: str | None, target_rows: int, as_json: bool) -> None:
    """Merge small segments per partition into large ones; no row changes, the audit stays valid."""
    from accounting.compact import compact

    result = compact(resolve_data_dir(data_dir), signing_key=key, target_rows=target_rows)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "groups": result.groups,
                    "segments_in": result.segments_in,
                    "segments_out": result.segments_out,
                    "rows": result.rows,
                    "leftovers_removed": result.leftovers_removed,
                    "manifests": list(result.manifests),
                }
            )
        )
    else:
        click.echo(result.summary())


@click.group("audit")
def audit_group() -> None:
    """Prove the ledger untouched, and export it to a SIEM."""


@audit_group.command("verify")
@_DATA_DIR
@click.option("--key", "key", default=None, help="The signing key (its public half is used).")
@click.option("--public-key", "public_key", default=None, help="A PEM Ed25519 public key.")
@click.option(
    "--stale-after",
    "stale_after",
    default=600.0,
    show_default=True,
    help="Warn when a chain's newest checkpoint is older than this many seconds and not final.",
)
@_JSON
@click.pass_context
def verify_command(
    ctx: click.Context,
    data_dir: str | None,
    key: str | None,
    public_key: str | None,
    stale_after: float,
    as_json: bool,
) -> None:
    """Check signatures, segment hashes, row hashes and Merkle roots; exit 1 if anything is off."""
    from accounting.audit import resolve_key_path
    from accounting.verify import verify

    if key and public_key:
        raise click.UsageError("give --key or --public-key, not both")
    trusted = public_key or (str(resolve_key_path(key)) if key else None)
    report = verify(resolve_data_dir(data_dir), public_key=trusted, stale_after_s=stale_after)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.summary())
    if not report.ok:
        click.echo(f"error: {report.errors[0]}", err=True)
        ctx.exit(1)


@audit_group.command("export")
@_DATA_DIR
@click.option(
    "--format", "fmt", type=click.Choice(["ocsf", "jsonl"]), default="ocsf", show_default=True
)
@click.option("--since", default=None, help="Only rows at or after this time (ISO 8601).")
@click.option("--out", "out", required=True, help="File to write (one JSON object per line).")
def export_command(data_dir: str | None, fmt: str, since: str | None, out: str) -> None:
    """Write OCSF 1.8 events (process, file, API, network, findings) or every row as JSONL."""
    from accounting.export import export

    n = export(resolve_data_dir(data_dir), format=fmt, since=since, out=out)
    click.echo(f"wrote {n} {fmt} line(s) to {out}")


COMMANDS: list[click.Command] = [ledger_group, audit_group]
