"""What `accounting.verify.verify` returns: the verdict, the counts, every problem."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ChainSummary", "VerifyReport"]


@dataclass(frozen=True, slots=True)
class ChainSummary:
    """One writer's chain as verified."""

    chain_id: str
    rows: int
    covered_rows: int
    checkpoints: int
    newest_checkpoint_us: int | None
    final: bool


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `verify` found: `ok` when there is no error (warnings may remain)."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    chains: tuple[ChainSummary, ...]
    rows: int
    segments: int
    checkpoints: int
    compactions: int
    uncovered_rows: int

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """A few lines for a person: the verdict, the counts, then every problem."""
        verdict = (
            "ledger intact" if self.ok else f"ledger NOT intact: {len(self.errors)} problem(s)"
        )
        lines = [
            verdict,
            f"  chains {len(self.chains)}, rows {self.rows}, segments {self.segments}, "
            f"checkpoints {self.checkpoints}, compactions {self.compactions}, "
            f"rows not yet covered by a checkpoint {self.uncovered_rows}",
        ]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "chains": [
                {
                    "chain_id": c.chain_id,
                    "rows": c.rows,
                    "covered_rows": c.covered_rows,
                    "checkpoints": c.checkpoints,
                    "newest_checkpoint_us": c.newest_checkpoint_us,
                    "final": c.final,
                }
                for c in self.chains
            ],
            "rows": self.rows,
            "segments": self.segments,
            "checkpoints": self.checkpoints,
            "compactions": self.compactions,
            "uncovered_rows": self.uncovered_rows,
        }
