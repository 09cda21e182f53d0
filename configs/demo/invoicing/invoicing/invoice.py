"""Invoices: lines, discount, tax and total."""

from dataclasses import dataclass, field
from decimal import Decimal

from invoicing.money import to_money


@dataclass
class Line:
    description: str
    quantity: int
    unit_price: Decimal

    @property
    def amount(self):
        return to_money(self.unit_price * self.quantity)


@dataclass
class Invoice:
    lines: list = field(default_factory=list)
    tax_rate: Decimal = Decimal("0")  # 0.20 is 20 %
    discount_pct: Decimal = Decimal("0")  # 10 is 10 %

    def subtotal(self):
        return sum((line.amount for line in self.lines), Decimal("0.00"))

    def discount(self):
        return to_money(self.subtotal() * self.discount_pct / 100)

    def tax(self):
        return to_money((self.subtotal() - self.discount()) * self.tax_rate)

    def total(self):
        return self.subtotal() - self.discount() + self.tax()
