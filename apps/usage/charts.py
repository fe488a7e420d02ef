"""Geometry of the usage page's bar charts, drawn as inline SVG by the templates. Pure
functions: values in, rectangles and label positions out (in viewBox units)."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

Number = int | float | Decimal

WIDTH = 640
# Columns (one per day): room above for the scale, below for the day labels.
COLUMN_HEIGHT = 180
COLUMN_TOP = 18
COLUMN_BOTTOM = 24
COLUMN_GAP = 0.2  # of each slot
COLUMN_SIDE = 36  # so the first and last day's labels fit
MAX_X_LABELS = 8
# Rows (one per graph): the name on the left, the value after the bar.
ROW_HEIGHT = 24
ROW_BAR = 16
LABEL_WIDTH = 170
VALUE_WIDTH = 96
LABEL_CHARS = 24
# A value above zero is drawn at least this tall, so it never looks like none at all.
MIN_VISIBLE = 1.0


@dataclass(frozen=True)
class Point:
    """One category of a chart: its label, value, and the value as people read it."""

    label: str
    value: Number
    text: str


@dataclass(frozen=True)
class Bar:
    label: str
    text: str
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    labels: list[Label]  # category labels (some days; every graph)
    values: list[Label]  # value labels (rows only)
    baseline: float  # y of the axis (columns) or x where bars start (rows)
    peak: Point | None  # the highest point; None when all are zero or there are none

    @property
    def view_box(self) -> str:
        return f"0 0 {self.width} {self.height}"


def scaled(value: Number, peak: Number, length: float) -> float:
    """`value`'s share of `length`, where `peak` fills it all; 0 when peak is 0."""
    if peak <= 0 or value <= 0:
        return 0.0
    return max(float(value) / float(peak) * length, MIN_VISIBLE)


def _peak(points: Sequence[Point]) -> Point | None:
    best = max(points, key=lambda p: p.value, default=None)
    return best if best is not None and best.value > 0 else None


def column_chart(points: Sequence[Point], *, width: int = WIDTH) -> Chart:
    """Vertical bars left to right, e.g. one per day; a few evenly spaced labels below."""
    plot = COLUMN_HEIGHT - COLUMN_TOP - COLUMN_BOTTOM
    baseline = float(COLUMN_TOP + plot)
    peak = _peak(points)
    slot = (width - 2 * COLUMN_SIDE) / max(len(points), 1)
    bar_width = round(slot * (1 - COLUMN_GAP), 2)
    every = max(1, math.ceil(len(points) / MAX_X_LABELS))
    bars, labels = [], []
    for i, point in enumerate(points):
        height = round(scaled(point.value, peak.value if peak else 0, plot), 2)
        x = round(COLUMN_SIDE + i * slot + (slot - bar_width) / 2, 2)
        bars.append(Bar(point.label, point.text, x, baseline - height, bar_width, height))
        if i % every == 0:
            middle = round(COLUMN_SIDE + i * slot + slot / 2, 2)
            labels.append(Label(middle, COLUMN_HEIGHT - 6, point.label))
    return Chart(width, COLUMN_HEIGHT, bars, labels, [], baseline, peak)


def _short(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def row_chart(points: Sequence[Point], *, width: int = WIDTH) -> Chart:
    """Horizontal bars top to bottom, e.g. one per graph, each named on its left."""
    plot = width - LABEL_WIDTH - VALUE_WIDTH
    peak = _peak(points)
    bars, labels, values = [], [], []
    for i, point in enumerate(points):
        length = round(scaled(point.value, peak.value if peak else 0, plot), 2)
        top = i * ROW_HEIGHT + (ROW_HEIGHT - ROW_BAR) / 2
        middle = i * ROW_HEIGHT + ROW_HEIGHT / 2
        bars.append(Bar(point.label, point.text, LABEL_WIDTH, top, length, ROW_BAR))
        labels.append(Label(LABEL_WIDTH - 8, middle, _short(point.label)))
        values.append(Label(LABEL_WIDTH + length + 6, middle, point.text))
    height = max(len(points), 1) * ROW_HEIGHT
    return Chart(width, height, bars, labels, values, float(LABEL_WIDTH), peak)
