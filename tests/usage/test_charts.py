"""Bar chart geometry (pure): heights and lengths proportional to the values, the highest
filling the plot, zero-safe, inside the viewBox; and how numbers are written."""

from decimal import Decimal

import pytest

from apps.usage import charts, formatting
from apps.usage.charts import Point, column_chart, row_chart, scaled


def points(*values: float | int | Decimal) -> list[Point]:
    return [Point(f"p{i}", value, str(value)) for i, value in enumerate(values)]


def test_column_heights_are_proportional_and_the_highest_fills_the_plot() -> None:
    chart = column_chart(points(10, 40, 20, 0))
    plot = charts.COLUMN_HEIGHT - charts.COLUMN_TOP - charts.COLUMN_BOTTOM
    heights = [bar.height for bar in chart.bars]
    assert heights == [plot / 4, plot, plot / 2, 0]
    assert chart.peak == Point("p1", 40, "40")
    for bar in chart.bars:
        assert bar.y + bar.height == chart.baseline  # every bar stands on the axis
        assert bar.x >= 0 and bar.x + bar.width <= chart.width
        assert bar.y >= 0
    xs = [bar.x for bar in chart.bars]
    assert xs == sorted(xs) and len(set(xs)) == 4


def test_decimal_values_scale_like_numbers() -> None:
    chart = column_chart(points(Decimal("0.25"), Decimal("1.00")))
    assert chart.bars[0].height * 4 == pytest.approx(chart.bars[1].height)


def test_all_zero_or_no_values_draw_nothing_and_do_not_divide_by_zero() -> None:
    for chart in (column_chart(points(0, 0, 0)), row_chart(points(0, 0))):
        assert chart.peak is None
        assert all(bar.height == 0 or bar.width == 0 for bar in chart.bars)
    empty = column_chart([])
    assert empty.bars == [] and empty.labels == [] and empty.peak is None
    assert row_chart([]).height == charts.ROW_HEIGHT


def test_a_tiny_value_is_still_visible_next_to_a_huge_one() -> None:
    chart = column_chart(points(1, 1_000_000))
    assert chart.bars[0].height == charts.MIN_VISIBLE
    assert scaled(0, 10, 100) == 0 and scaled(5, 10, 100) == 50


@pytest.mark.parametrize("days", [7, 30, 90])
def test_day_labels_are_thinned_to_a_readable_few(days: int) -> None:
    chart = column_chart(points(*range(days)))
    assert len(chart.bars) == days
    assert 1 <= len(chart.labels) <= charts.MAX_X_LABELS
    assert chart.labels[0].text == "p0"
    assert all(0 < label.x < chart.width for label in chart.labels)


def test_rows_are_proportional_and_long_names_are_shortened() -> None:
    long_name = "a graph with a really very long name indeed"
    chart = row_chart([Point(long_name, 30, "30"), Point("b", 15, "15")])
    plot = chart.width - charts.LABEL_WIDTH - charts.VALUE_WIDTH
    assert [bar.width for bar in chart.bars] == [plot, plot / 2]
    assert all(bar.x == charts.LABEL_WIDTH for bar in chart.bars)
    assert chart.height == 2 * charts.ROW_HEIGHT
    assert chart.labels[0].text.endswith("…") and len(chart.labels[0].text) == charts.LABEL_CHARS
    assert chart.bars[0].label == long_name  # the bar's own title keeps the whole name
    assert [v.text for v in chart.values] == ["30", "15"]
    assert chart.values[1].x == charts.LABEL_WIDTH + plot / 2 + 6


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("0", "$0.00"),
        ("0.00004", "<$0.0001"),
        ("0.0123", "$0.0123"),
        ("1", "$1.00"),
        ("1234.567", "$1,234.57"),
    ],
)
def test_dollars(value: str, text: str) -> None:
    assert formatting.usd(Decimal(value)) == text


def test_counts_and_seconds() -> None:
    assert formatting.count(1234567) == "1,234,567"
    assert formatting.seconds(12.34) == "12.3 s"
    assert formatting.seconds(90) == "1.5 min"
    assert formatting.seconds(5400) == "1.5 h"
