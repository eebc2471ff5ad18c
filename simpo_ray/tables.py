"""Result tables: rows (dicts of one shape) as a CSV file or as aligned text.

The sweep's trial table and the scale ladder's size table are written through these;
benchmarks print markdown tables with ``markdown_table``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional


def write_csv(rows: list, path: Path, fields: Optional[list] = None) -> None:
    """One line per row under a header of ``fields`` (default: the first row's keys).
    A field a row lacks is written empty; keys not in ``fields`` are left out."""
    fields = list(fields) if fields is not None else list(rows[0]) if rows else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def format_table(rows: list, fields: Optional[list] = None) -> str:
    """Columns padded to their widest cell; floats to 4 significant digits, None blank."""
    if not rows:
        return "(no rows)"
    cols = list(fields) if fields is not None else list(rows[0])

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]

    def line(xs):
        return "  ".join(x.ljust(w) for x, w in zip(xs, widths))

    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(x) for x in cells])


def markdown_table(header: list, rows: list, text_columns: tuple = ()) -> str:
    """A markdown table of already formatted cells: numbers right-aligned, the columns
    in ``text_columns`` (indices) left-aligned."""
    rule = ["---" if i in text_columns else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in [header, rule, *rows])
