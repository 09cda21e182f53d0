from decimal import Decimal

from invoicing import split, to_money


def test_to_money_keeps_two_decimals():
    assert str(to_money("10")) == "10.00"


def test_to_money_rounds_half_up():
    assert to_money("2.675") == Decimal("2.68")
    assert to_money("0.125") == Decimal("0.13")


def test_split_evenly():
    assert split("9.00", 3) == [Decimal("3.00")] * 3


def test_split_gives_leftover_cents_to_the_first_shares():
    shares = split("100.00", 3)
    assert shares == [Decimal("33.34"), Decimal("33.33"), Decimal("33.33")]
    assert sum(shares) == Decimal("100.00")
