"""How the usage page writes numbers, for the charts' labels and the tables alike."""

from decimal import Decimal

SMALLEST_CENTS = Decimal("0.0001")


def count(value: int) -> str:
    return f"{value:,}"


def usd(value: Decimal) -> str:
    """Cents from a dollar up; below, four decimals, since model calls cost fractions of one."""
    if value == 0:
        return "$0.00"
    if value >= 1:
        return f"${value:,.2f}"
    if value < SMALLEST_CENTS:
        return "<$0.0001"
    return f"${value:.4f}"


def seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:,.1f} h"
    if value >= 60:
        return f"{value / 60:,.1f} min"
    return f"{value:,.1f} s"
