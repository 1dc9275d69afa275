"""The four tables of SPEC section 7, from the per-run results of a reproduction.

Each table cell is the mean over seeds of a run's mean test metric, followed by "± std": the std
over seeds with several seeds, else the std over the scored cases of the one run (the caption says
which). A row label "group|row" (Table 4) puts the group in the column names instead.
"""
import csv
import io
import math

import numpy as np

from objectives import OBJECTIVES

from .plan import KD_CELLS, TABLE4_METHODS, TABLE4_RATIOS, kd_label, percent

TABLES = {
    "table1": dict(title="Table 1: comparison of methods at 10 % labels (test split)",
                   rows=[*OBJECTIVES, "supervised (100 % labels)"],
                   metrics=["dice", "iou", "hd95", "assd", "precision", "recall"]),
    "table2": dict(title="Table 2: ablation of the KD weight and the refinement at 10 % labels (test split)",
                   rows=[kd_label(w, r) for w, r in KD_CELLS], metrics=["dice", "iou", "hd95", "assd"]),
    "table3": dict(title="Table 3: pseudo-label quality on the unlabelled split at 10 % labels",
                   rows=["teacher", "refined"], metrics=["dice", "iou", "hd95", "assd", "precision", "recall"]),
    "table4": dict(title="Table 4: label efficiency (test split)",
                   rows=[f"{m}|{percent(r)}" for r in TABLE4_RATIOS for m in TABLE4_METHODS],
                   metrics=["dice", "hd95"]),
}
LOWER_IS_BETTER = {"hd", "hd95", "hd95_pooled", "assd"}


def collect(results: dict) -> dict:
    """{table: {row label: {metric: [(mean, case std) per seed]}}} from results.json's runs."""
    tables: dict = {t: {} for t in TABLES}
    for run in results["runs"].values():
        for table, label in run.get("cells", []):
            if "metrics" not in run:
                continue
            row = tables[table].setdefault(label, {})
            for metric, stats in run["metrics"].items():
                row.setdefault(metric, []).append((stats["mean"], stats["std"]))
    return tables


def cell(values) -> tuple:
    """(mean, spread) of one cell: spread over seeds, or over cases when there is one seed."""
    if not values:
        return math.nan, math.nan
    means = np.array([m for m, _ in values])
    spread = means.std(ddof=1) if len(values) > 1 else values[0][1]
    return float(means.mean()), float(spread)


def layout(name: str, rows: dict):
    """Row names, column names and {(row, column): (mean, spread)} of one table."""
    spec = TABLES[name]
    row_names, columns, cells = [], [], {}
    for label in spec["rows"]:
        group, row = label.split("|") if "|" in label else ("", label)
        if row not in row_names:
            row_names.append(row)
        for metric in spec["metrics"]:
            column = f"{group} {metric}".strip()
            if column not in columns:
                columns.append(column)
            cells[row, column] = cell(rows.get(label, {}).get(metric, []))
    return row_names, columns, cells


def fmt(value: float, spread: float, metric: str) -> str:
    if math.isnan(value):
        return "–"
    digits = 2 if metric.split()[-1] in LOWER_IS_BETTER else 4
    return f"{value:.{digits}f} ± {spread:.{digits}f}"


def render(name: str, rows: dict, caption: str) -> tuple[str, str]:
    """(markdown, csv) of one table."""
    row_names, columns, cells = layout(name, rows)
    arrows = [c + (" ↓" if c.split()[-1] in LOWER_IS_BETTER else " ↑") for c in columns]
    md = [f"### {TABLES[name]['title']}", "", caption, "", "| | " + " | ".join(arrows) + " |",
          "|---" * (len(columns) + 1) + "|"]
    for r in row_names:
        md.append(f"| {r} | " + " | ".join(fmt(*cells[r, c], c) for c in columns) + " |")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row"] + [f"{c} {k}" for c in columns for k in ("mean", "spread")])
    for r in row_names:
        writer.writerow([r] + [f"{v:.6g}" for c in columns for v in cells[r, c]])
    return "\n".join(md) + "\n", buf.getvalue()
