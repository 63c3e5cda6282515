"""The plain-text and markdown tables of ``pathgen status``, the factory report and the benchmark summary.

Their own module: the report imports the benchmark summary, so neither can hold the tables the other uses."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Aligned columns (``indent``: to set a table under its heading)."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def render(cells: Sequence[str]) -> str:
        return indent + "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return [render(header), render(["-" * width for width in widths]), *(render(row) for row in rows)]


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table; a ``|`` inside a cell is escaped."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]
