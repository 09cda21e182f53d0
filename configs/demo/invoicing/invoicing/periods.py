"""Billing periods: days, months and proration."""

from datetime import timedelta
from decimal import Decimal

from invoicing.money import to_money


def days_in_period(start, end):
    """Days from `start` to `end`, both included: April 1..30 is 30 days."""
    return (end - start).days


def add_months(day, months):
    """The same day `months` later, clamped to the last day of a shorter month:
    Jan 31 + 1 month = Feb 29 in a leap year, Feb 28 otherwise."""
    month = day.month - 1 + months
    year = day.year + month // 12
    month = month % 12 + 1
    return day.replace(year=year, month=month)


def billing_periods(start, count):
    """`count` consecutive monthly periods from `start`: (first day, last day) each."""
    periods = []
    for i in range(count):
        first = add_months(start, i)
        last = add_months(start, i + 1) - timedelta(days=1)
        periods.append((first, last))
    return periods


def prorate(amount, start, end, period_start, period_end):
    """The share of `amount` (the price of the whole period) for the days start..end."""
    used = days_in_period(start, end)
    total = days_in_period(period_start, period_end)
    return to_money(Decimal(amount) * used / total)
