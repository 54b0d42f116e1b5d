"""Result tables of the benchmark scripts, as Markdown (for notes) and reStructuredText
(for the docs)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["markdown", "rst"]


def markdown(header: Sequence[str], body: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A Markdown table whose first ``text_columns`` columns are left-aligned and the
    others (numbers) right-aligned."""
    rule = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *body])


def rst(header: Sequence[str], body: Sequence[Sequence[str]], caption: str) -> str:
    """A ``list-table`` directive with a header row."""
    lines = [f".. list-table:: {caption}", "   :header-rows: 1", ""]
    for cells in [header, *body]:
        lines.append(f"   * - {cells[0]}")
        lines += [f"     - {c}" for c in cells[1:]]
    return "\n".join(lines) + "\n"
