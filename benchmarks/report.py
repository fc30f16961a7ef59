"""Shared formatting for benchmark tables."""

from __future__ import annotations


def to_markdown(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of ``rows`` over ``cols``; floats with 2 decimals, missing cells empty."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
