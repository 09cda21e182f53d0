"""Invoice arithmetic: money in Decimal cents, billing periods, proration."""

from invoicing.invoice import Invoice, Line
from invoicing.money import split, to_money
from invoicing.periods import add_months, billing_periods, days_in_period, prorate

__all__ = [
    "Invoice",
    "Line",
    "add_months",
    "billing_periods",
    "days_in_period",
    "prorate",
    "split",
    "to_money",
]
