from decimal import Decimal

from django import template

from apps.usage import formatting

register = template.Library()


@register.filter
def count(value: int) -> str:
    return formatting.count(value)


@register.filter
def usd(value: Decimal) -> str:
    return formatting.usd(value)


@register.filter
def seconds(value: float) -> str:
    return formatting.seconds(value)
