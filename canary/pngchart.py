"""A tiny PNG line-chart renderer for the daily report email: zlib + struct only.

Pure: no Django, no I/O. ``equity_chart(...)`` draws equity (line) over drawdown (area)
with a 3x5 bitmap font for the axis labels, and returns PNG bytes.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime

RGB = tuple[int, int, int]

WHITE: RGB = (255, 255, 255)
INK: RGB = (40, 46, 56)
GRID: RGB = (225, 229, 235)
AXIS: RGB = (150, 158, 170)
BLUE: RGB = (31, 100, 200)
RED: RGB = (196, 48, 48)
RED_FILL: RGB = (246, 205, 205)

# 3x5 glyphs, one string of 3 bits per row.
FONT: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"),
    ",": ("000", "000", "000", "010", "100"),
    "-": ("000", "000", "111", "000", "000"),
    "+": ("000", "010", "111", "010", "000"),
    "%": ("101", "001", "010", "100", "101"),
    ":": ("000", "010", "000", "010", "000"),
    "/": ("001", "001", "010", "100", "100"),
    "(": ("010", "100", "100", "100", "010"),
    ")": ("010", "001", "001", "001", "010"),
    " ": ("000", "000", "000", "000", "000"),
    "A": ("010", "101", "111", "101", "101"),
    "B": ("110", "101", "110", "101", "110"),
    "C": ("011", "100", "100", "100", "011"),
    "D": ("110", "101", "101", "101", "110"),
    "E": ("111", "100", "110", "100", "111"),
    "F": ("111", "100", "110", "100", "100"),
    "G": ("011", "100", "101", "101", "011"),
    "H": ("101", "101", "111", "101", "101"),
    "I": ("111", "010", "010", "010", "111"),
    "K": ("101", "101", "110", "101", "101"),
    "L": ("100", "100", "100", "100", "111"),
    "M": ("101", "111", "111", "101", "101"),
    "N": ("110", "101", "101", "101", "101"),
    "O": ("010", "101", "101", "101", "010"),
    "P": ("110", "101", "110", "100", "100"),
    "Q": ("010", "101", "101", "110", "011"),
    "R": ("110", "101", "110", "101", "101"),
    "S": ("011", "100", "010", "001", "110"),
    "T": ("111", "010", "010", "010", "010"),
    "U": ("101", "101", "101", "101", "111"),
    "W": ("101", "101", "111", "111", "101"),
    "X": ("101", "101", "010", "101", "101"),
    "Y": ("101", "101", "010", "010", "010"),
}


def encode_png(width: int, height: int, pixels: bytes | bytearray) -> bytes:
    """8-bit RGB, no interlace; ``pixels`` is ``width * height * 3`` bytes, row by row."""
    if len(pixels) != width * height * 3:
        raise ValueError("pixels must hold width * height RGB triples")
    stride = width * 3
    raw = b"".join(b"\x00" + bytes(pixels[y * stride : (y + 1) * stride]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


class Canvas:
    def __init__(self, width: int, height: int, background: RGB = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: RGB) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: RGB) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.width - 1, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height - 1, max(y0, y1))
        row = bytes(color) * (x1 - x0 + 1)
        for y in range(y0, y1 + 1):
            i = (y * self.width + x0) * 3
            self.pixels[i : i + len(row)] = row

    def line(self, x0: int, y0: int, x1: int, y1: int, color: RGB, width: int = 1) -> None:
        """Bresenham, thickened by a square pen."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        half = width // 2
        while True:
            self.rect(x0 - half, y0 - half, x0 - half + width - 1, y0 - half + width - 1, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: RGB = INK, scale: int = 2) -> int:
        """Draw upper-cased text; returns the x after it."""
        for ch in text.upper():
            glyph = FONT.get(ch, FONT[" "])
            for row, bits in enumerate(glyph):
                for col, bit in enumerate(bits):
                    if bit == "1":
                        px, py = x + col * scale, y + row * scale
                        self.rect(px, py, px + scale - 1, py + scale - 1, color)
            x += 4 * scale
        return x

    def png(self) -> bytes:
        return encode_png(self.width, self.height, self.pixels)


def text_width(text: str, scale: int = 2) -> int:
    return len(text) * 4 * scale - scale


def fmt_number(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    digits = max(0, 3 - int(math.floor(math.log10(magnitude))))
    return f"{value:.{min(digits, 6)}f}"


def _scale(lo: float, hi: float) -> tuple[float, float]:
    if math.isclose(lo, hi):
        pad = abs(lo) * 0.01 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.06
    return lo - pad, hi + pad


class Panel:
    """A plotting rectangle mapping (t, value) to pixels."""

    def __init__(
        self, box: tuple[int, int, int, int], t: tuple[float, float], v: tuple[float, float]
    ):
        self.x0, self.y0, self.x1, self.y1 = box
        self.t0, self.t1 = t
        self.v0, self.v1 = v

    def x(self, t: float) -> int:
        span = (self.t1 - self.t0) or 1.0
        return self.x0 + round((t - self.t0) / span * (self.x1 - self.x0))

    def y(self, v: float) -> int:
        span = (self.v1 - self.v0) or 1.0
        return self.y1 - round((v - self.v0) / span * (self.y1 - self.y0))

    def frame(self, c: Canvas, rows: int = 4) -> None:
        for i in range(rows + 1):
            y = self.y0 + round(i * (self.y1 - self.y0) / rows)
            c.line(self.x0, y, self.x1, y, GRID)
        c.line(self.x0, self.y0, self.x0, self.y1, AXIS)
        c.line(self.x0, self.y1, self.x1, self.y1, AXIS)

    def y_labels(self, c: Canvas, suffix: str = "") -> None:
        for value in (self.v1, self.v0):
            label = fmt_number(value) + suffix
            c.text(self.x0 - 8 - text_width(label), self.y(value) - 5, label, INK)


def _hhmm(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%H:%M")


def _draw_equity(c: Canvas, p: Panel, t: Sequence[float], equity: Sequence[float]) -> None:
    points = [(p.x(a), p.y(b)) for a, b in zip(t, equity, strict=True)]
    for (xa, ya), (xb, yb) in zip(points, points[1:], strict=False):
        c.line(xa, ya, xb, yb, BLUE, width=2)
    if len(points) == 1:
        c.rect(points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2, BLUE)


def _draw_drawdown(c: Canvas, p: Panel, t: Sequence[float], drawdown: Sequence[float]) -> None:
    zero = p.y(0.0)
    xs = [p.x(a) for a in t]
    ys = [p.y(b) for b in drawdown]
    for i in range(len(xs) - 1):
        for x in range(xs[i], xs[i + 1] + 1):
            frac = (x - xs[i]) / ((xs[i + 1] - xs[i]) or 1)
            y = round(ys[i] + (ys[i + 1] - ys[i]) * frac)
            c.line(x, zero, x, y, RED_FILL)
    for i in range(len(xs) - 1):
        c.line(xs[i], ys[i], xs[i + 1], ys[i + 1], RED, width=2)


def equity_chart(
    t: Sequence[float],
    equity: Sequence[float],
    drawdown: Sequence[float],
    *,
    quote: str = "",
    width: int = 720,
    height: int = 360,
) -> bytes:
    """Equity (top) and drawdown % (bottom, area down from 0) against UTC time."""
    c = Canvas(width, height)
    left, right = 96, width - 20
    top = Panel((left, 30, right, 30 + int(height * 0.5)), (0, 1), (0, 1))
    bottom_y0 = top.y1 + 40
    c.text(left, 10, f"EQUITY ({quote})" if quote else "EQUITY", BLUE)
    c.text(left, top.y1 + 16, "DRAWDOWN FROM PEAK %", RED)
    if not t:
        top.frame(c)
        msg = "NO DATA FOR THIS DAY"
        c.text((left + right - text_width(msg, 3)) // 2, (top.y0 + top.y1) // 2, msg, AXIS, 3)
        return c.png()
    span = (t[0], t[-1] if t[-1] > t[0] else t[0] + 1)
    top = Panel((left, 30, right, top.y1), span, _scale(min(equity), max(equity)))
    low = min(min(drawdown), -0.01)
    bottom = Panel((left, bottom_y0, right, height - 30), span, (low * 1.08, 0.0))
    for panel in (top, bottom):
        panel.frame(c)
    top.y_labels(c)
    bottom.y_labels(c, "%")
    _draw_drawdown(c, bottom, t, drawdown)
    _draw_equity(c, top, t, equity)
    c.text(left, height - 20, _hhmm(t[0]) + " UTC", INK)
    end = _hhmm(t[-1]) + " UTC"
    c.text(right - text_width(end), height - 20, end, INK)
    return c.png()
