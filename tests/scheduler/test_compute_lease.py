"""Compute leases on a real `BudgetBook` (the keeper's logic, called in-process): renewed
until the cap cannot pay another, then refused; settled for no more than was leased."""

from __future__ import annotations

import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from accounting.errors import BudgetError
from sandbox.credentials import AttemptRef
from scheduler.budget import BudgetBook, CapReached, Caps
from scheduler.compute_lease import ComputeLeases

REF = AttemptRef("team", "batch", "task", 1)
RATE = Decimal(100)  # nano-USD per second


class _Keeper:
    """Each book method as `.remote(...)`, the way `NodeGateway._call` uses the actor."""

    def __init__(self, book: BudgetBook) -> None:
        self.book = book

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.book, name)

        class _Remote:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                return method(*args, **kwargs)

        return _Remote


def _call(book: BudgetBook) -> Callable[[Callable[[Any], Any]], Any]:
    def call(fn: Callable[[Any], Any]) -> Any:
        try:
            return fn(_Keeper(book))
        except CapReached as e:
            raise BudgetError(str(e)) from None

    return call


def test_a_lease_the_cap_cannot_pay_is_refused_up_front() -> None:
    book = BudgetBook(lambda ref: Caps(task=50))
    leases = ComputeLeases(_call(book), 60, lambda ref, why: None)
    with pytest.raises(BudgetError, match="task"):
        leases.open(REF, RATE)  # one second costs 100


def test_leases_are_renewed_until_the_cap_refuses_then_the_node_is_told() -> None:
    book = BudgetBook(lambda ref: Caps(task=350))
    refused: list[str] = []
    told = threading.Event()
    leases = ComputeLeases(_call(book), 1, lambda ref, why: (refused.append(why), told.set()))
    leases.open(REF, RATE)
    leases.start()
    try:
        assert told.wait(60), "the refused renewal was never reported"
    finally:
        leases.stop()
    assert "task" in refused[0]
    assert book.spent("task", "batch/task") == 300  # three whole one-second leases
    assert book.held("task", "batch/task") == 0
    assert leases.settle(REF) == []  # nothing left open to settle


def test_the_last_lease_is_settled_for_no_more_than_it_holds() -> None:
    book = BudgetBook(lambda ref: Caps(task=10**9))
    leases = ComputeLeases(_call(book), 3600, lambda ref, why: None)
    leases.open(REF, RATE)
    assert book.held("task", "batch/task") == 360_000
    assert leases.settle(REF) == []
    assert book.held("task", "batch/task") == 0
    assert 0 <= book.spent("task", "batch/task") <= 360_000
    assert leases.settle(REF) == []  # idempotent
