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


def add_output_args(ap, what: str) -> None:
    """The benchmarks' ``--out`` (folder, default `RESULTS`) and ``--label`` options; ``what``: the files written."""
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"folder for {what}")
    ap.add_argument("--label", help="keep the earlier runs: this run goes on top of the report under '## <label>: "
                    "...' and into the JSON's runs (default: replace both)")  # fmt: skip


def write_results(out: Path, name: str, report: str, data, label: str | None = None) -> None:
    """Write ``out/<name>.md`` (the report) and ``out/<name>.json`` (the raw rows) and say where.

    Without ``label`` both replace what was there. With one, the earlier runs stay: the report (its first
    ``## `` heading prefixed with the label) goes on top of the existing ``.md``, and the JSON becomes
    ``{"runs": [{"label": ..., "data": ...}, ...]}``, newest first (an earlier unlabelled file is kept as a run
    labelled None).
    """
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{name}.md", out / f"{name}.json"
    report = report if report.endswith("\n") else report + "\n"
    if label:
        first, _, rest = report.partition("\n")
        head = f"## {label}: {first[3:]}" if first.startswith("## ") else f"## {label}\n\n{first}"
        report = head + "\n" + rest + ("\n" + md.read_text() if md.is_file() else "")
        runs = []
        if js.is_file():
            old = json.loads(js.read_text())
            runs = old["runs"] if isinstance(old, dict) and list(old) == ["runs"] else [{"label": None, "data": old}]
        data = {"runs": [{"label": label, "data": data}, *runs]}
    md.write_text(report)
    js.write_text(json.dumps(data, indent=2))
    print(f"wrote {md}")
