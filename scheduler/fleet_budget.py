"""`BudgetGate`: the scheduler's side of budgets, asked of the `budget` actor.

When a `BudgetKeeper` (`scheduler.budget_keeper`) runs in the namespace under
`BUDGET_NAME`, each batch is registered with it on submit and resume (`register`: a
keeper that does not answer refuses the batch, nothing started), and the scheduler asks
it whether each waiting batch and team is exhausted (`poll`, on every turn of the loop):

- an exhausted batch's queued tasks end `budget_exceeded` ("batch budget reached");
- an exhausted team's queued tasks wait, parked off the queue, until it may spend again.

The question is asked without blocking the loop: `poll` sends it once the last answers
are half of `EVERY_S` old, and applies the answers on a later turn when they are in.
`may_admit` holds admission while the answers in hand are older than `EVERY_S`
(counted from when they were asked), right after a submit or resume (`invalidate`:
the new batch must be asked about first), and while the keeper does not answer (fail
closed). Without a keeper (looked for again every `LOOKUP_EVERY_S`) budgets are not
enforced here.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import ray
from ray.exceptions import GetTimeoutError, RayError

from accounting.errors import BudgetError
from scheduler.book import FleetBook
from scheduler.ledger_actor import NAMESPACE
from scheduler.plan import Plan

__all__ = ["BUDGET_NAME", "EVERY_S", "BudgetGate"]

log = logging.getLogger(__name__)

BUDGET_NAME: Final = "budget"  # the BudgetKeeper actor (scheduler.budget_keeper)
EVERY_S: Final = 0.5  # how stale the keeper's answers may get before admitting
LOOKUP_EVERY_S: Final = 2.0  # while no keeper runs, look for one this often
TIMEOUT_S: Final = 10.0


@dataclass(slots=True)
class _Question:
    refs: list[Any]
    batches: list[str]
    teams: list[str]
    asked_at: float
    waiting: list[Any]  # the refs not seen ready yet


class BudgetGate:
    """Registers batches with the keeper and applies its answers to the book (see the
    module doc). `lock` is the scheduler's: the book is only touched under it."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._keeper: Any = None  # the `budget` actor, once found
        self._looked_at = -LOOKUP_EVERY_S
        self._asked_at = -EVERY_S  # when the answers in hand were asked
        self._ok = True  # False: the keeper did not answer; admit nothing
        self._question: _Question | None = None

    @property
    def has_keeper(self) -> bool:
        return self._keeper is not None

    def refs(self) -> list[Any]:
        """The keeper's answers still awaited (the loop wakes when they come in)."""
        question = self._question
        return list(question.waiting) if question is not None else []

    def may_admit(self) -> bool:
        """Whether admission may go on: the keeper answered, recently enough."""
        if not self._ok:
            return False
        return self._keeper is None or time.monotonic() - self._asked_at < EVERY_S

    def invalidate(self) -> None:
        """A batch arrived: ask about it before admitting anything more (under the lock)."""
        self._asked_at = -EVERY_S
        self._question = None  # its answers do not cover the new batch

    def keeper(self, *, now: bool = False) -> Any:
        """The `budget` actor, or None while none runs (looked for again every few
        seconds, or `now`)."""
        if self._keeper is not None:
            return self._keeper
        at = time.monotonic()
        if not now and at - self._looked_at < LOOKUP_EVERY_S:
            return None
        self._looked_at = at
        try:
            self._keeper = ray.get_actor(BUDGET_NAME, namespace=NAMESPACE)
        except ValueError:
            return None
        return self._keeper

    def register(self, plan: Plan) -> None:
        """Tell the keeper (if one runs) the batch's caps before any of it is admitted."""
        keeper = self.keeper(now=True)
        if keeper is None:
            return
        try:
            from scheduler.budget_keeper import batch_caps
        except ImportError:  # an older keeper module: the policies' default caps apply
            caps: dict[str, Any] = {"batch_id": plan.batch_id, "team": plan.team}
        else:
            caps = batch_caps(plan.spec)
        try:
            ray.get(keeper.register_batch.remote(**caps), timeout=TIMEOUT_S)
        except (GetTimeoutError, RayError) as e:
            self._keeper = None
            raise BudgetError(
                f"batch {plan.batch_id}: the budget keeper did not register it ({e}); nothing "
                f"was started (fix: check the `{BUDGET_NAME}` actor with `ray list actors`, "
                "then run the batch again)"
            ) from None

    def poll(self, book: FleetBook) -> bool:
        """Apply the keeper's answers once in, and ask again when due (never blocks on
        the keeper). Returns whether a batch ended (its rows should then be settled)."""
        with self._lock:
            question = self._question
        if question is not None:
            return self._collect(book, question)
        with self._lock:
            if time.monotonic() - self._asked_at < EVERY_S / 2:
                return False
            if not len(book.queue) and not book.held:
                return False
        keeper = self.keeper()  # may look it up: outside the lock
        with self._lock:
            if keeper is None:
                self._ok = True
                return False
            batches = book.waiting_batches()
            teams = sorted(book.waiting_teams())
            try:
                refs = [keeper.exhausted.remote(batches, teams)]  # one call for all of them
            except RayError as e:
                self._failed(e)
                return False
            self._question = _Question(refs, batches, teams, time.monotonic(), list(refs))
        return False

    def _collect(self, book: FleetBook, question: _Question) -> bool:
        if question.waiting:
            waiting = question.waiting
            _, question.waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0)
        late = time.monotonic() - question.asked_at >= TIMEOUT_S
        if question.waiting and not late:
            return False
        try:
            if question.waiting:
                raise GetTimeoutError(f"no answer in {TIMEOUT_S:.0f}s")
            (answers,) = ray.get(question.refs)
        except (GetTimeoutError, RayError) as e:
            with self._lock:
                if self._question is question:
                    self._failed(e)
            return False
        with self._lock:
            if self._question is not question:  # a batch arrived meanwhile: ask anew
                return False
            self._question = None
            ended = False
            batches, teams = question.batches, question.teams
            for batch_id, exhausted in zip(batches, answers[: len(batches)], strict=True):
                if exhausted:
                    book.exhaust_batch(batch_id)
                    ended = ended or book.done(batch_id)
            for team, exhausted in zip(teams, answers[len(batches) :], strict=True):
                if exhausted and team not in book.held_teams:
                    book.hold_team(team)
                elif not exhausted and team in book.held_teams:
                    book.release_team(team)
            self._ok = True
            self._asked_at = question.asked_at
            return ended

    def _failed(self, e: Exception) -> None:
        """The keeper did not answer: admit nothing until it does (under the lock)."""
        log.warning("the budget keeper did not answer (%s): admitting nothing for now", e)
        self._keeper = None if not isinstance(e, GetTimeoutError) else self._keeper
        self._ok = False
        self._asked_at = time.monotonic()
        self._question = None
