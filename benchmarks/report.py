"""Shared formatting for benchmark tables, and where they go: ``results/`` at the checkout's root (the
benchmarks run from a source checkout; they are not in the wheel)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"


def to_markdown(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of ``rows`` over ``cols``; floats with 2 decimals, missing cells empty."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, name: str, report: str, data) -> None:
    """Write ``out/<name>.md`` (the report) and ``out/<name>.json`` (the raw rows) and say where."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(report if report.endswith("\n") else report + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    print(f"wrote {out / f'{name}.md'}")
