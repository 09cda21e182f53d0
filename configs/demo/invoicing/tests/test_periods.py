from datetime import date
from decimal import Decimal

from invoicing import add_months, billing_periods, days_in_period, prorate


def test_days_in_period_counts_both_ends():
    assert days_in_period(date(2024, 4, 1), date(2024, 4, 30)) == 30
    assert days_in_period(date(2024, 4, 1), date(2024, 4, 1)) == 1


def test_add_months_across_a_year_end():
    assert add_months(date(2023, 11, 15), 3) == date(2024, 2, 15)


def test_add_months_clamps_to_the_end_of_a_shorter_month():
    assert add_months(date(2024, 1, 31), 1) == date(2024, 2, 29)
    assert add_months(date(2023, 1, 31), 1) == date(2023, 2, 28)
    assert add_months(date(2024, 3, 31), 1) == date(2024, 4, 30)


def test_billing_periods_from_a_month_end():
    assert billing_periods(date(2024, 1, 31), 2) == [
        (date(2024, 1, 31), date(2024, 2, 28)),
        (date(2024, 2, 29), date(2024, 3, 30)),
    ]


def test_prorate_half_a_month():
    april = (date(2024, 4, 1), date(2024, 4, 30))
    assert prorate("30.00", date(2024, 4, 1), date(2024, 4, 15), *april) == Decimal("15.00")
