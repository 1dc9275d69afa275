"""The four tables of SPEC section 7 from the per-run results of a reproduction, with paired
differences from the control and their 95 % intervals.

A cell is the mean over seeds of a run's mean test metric, followed by "± std": the std over
seeds when there are several, else the std over the scored cases of the one run; the column n
says how many seeds. Each row with a control (the `supervised` student of the same ratio and
seed; for Table 3 the unrefined teacher) also gets its paired difference: per seed, the mean
over the test cases of (row - control) on the same cases, then the mean over the seeds both have
with a t-interval over the seeds (every seed has its own split, initialisation and batches, so
the interval covers all three sources of variation), and how many seeds' differences are above
zero. With one seed the interval is a paired t-interval over the test cases of that seed alone,
which ignores training variation. A contrast (plan.Contrast) is the same with any combination of
rows in place of row - control. Table 1 opens with the claims and the contrasts beside them,
each with a reading by the rule in `verdict`; Table 2 closes with the headroom the oracle upper
bounds show; Table 3 with the refiner of each seed on validation. With several classes each row
is followed by one row per class (`row · class`).
"""
import csv
import io
import math

import numpy as np
from scipy import stats

from engine.metrics import per_class

from .plan import BESIDE, CLAIMS, CONTROL, FULL_LABELS, GATED, HEADROOM, KD_CELLS, REFINER, TABLE1_ROWS, \
    TABLE3_ROWS, TABLE4_METHODS, kd_label, label_parts, percent, shown, table4_label

LOWER_IS_BETTER = {"hd", "hd95", "hd95_pooled", "assd"}
CASE_METRICS = ("dice", "iou", "hd95", "assd", "precision", "recall")
DIFFERENCE_METRICS = ("dice", "hd95", "assd")


def table_specs(profile: dict) -> dict:
    """Title, rows, metrics and each row's control row for the four tables of a profile."""
    r = percent(profile["ratio"])
    t1_control = ("table1", CONTROL)
    # each method's row of Table 4 is compared with the control's at the same labelled ratio
    t4_controls = {table4_label(m, x): ("table4", table4_label(CONTROL, x))
                   for x in profile["table4_ratios"] for m in TABLE4_METHODS if m != CONTROL}
    gated = {table: label for table, label in GATED}
    return {
        "table1": dict(title=f"Table 1: comparison of methods at {r} labels (test split)",
                       rows=list(TABLE1_ROWS), metrics=list(CASE_METRICS),
                       control=lambda row: None if row == CONTROL else t1_control, claims=True),
        "table2": dict(title=f"Table 2: the KD weight and the pseudo labels at {r} labels (test split; "
                             f"`oracle` weight and `true masks` targets read the unlabelled masks: upper bounds)",
                       rows=[kd_label(*cell) for cell in KD_CELLS] + [gated["table2"]],
                       metrics=["dice", "iou", "hd95", "assd"], control=lambda row: t1_control, headroom=True),
        "table3": dict(title=f"Table 3: pseudo-label quality on the unlabelled split at {r} labels",
                       rows=[*TABLE3_ROWS, gated["table3"]], metrics=list(CASE_METRICS),
                       control=lambda row: None if row == "teacher" else ("table3", "teacher"), refiners=r),
        "table4": dict(title="Table 4: label efficiency (test split)",
                       rows=[table4_label(m, x) for x in profile["table4_ratios"] for m in TABLE4_METHODS],
                       metrics=["dice", "hd95"],
                       control=t4_controls.get),
    }


def collect(results: dict) -> dict:
    """{(table, row): {seed: run entry}} of every evaluated run and refiner record in results.json, and
    the gated rows derived from them (plan.GATED)."""
    cells: dict = {}
    for run in results["runs"].values():
        if "metrics" in run or "keep_rule" in run:
            for table, label in run.get("cells", []):
                cells.setdefault((table, label), {})[run["seed"]] = run
    refiners = next((runs for (table, _), runs in cells.items() if table == REFINER), {})
    for row, (refined, plain) in GATED.items():
        cells[row] = {seed: (cells.get(refined) if keep["keep_rule"]["passes"] else cells.get(plain, {}))[seed]
                      for seed, keep in refiners.items()
                      if seed in cells.get(refined if keep["keep_rule"]["passes"] else plain, {})}
    return cells


def class_names(cells: dict) -> list:
    """The classes of a reproduction on several, in order, from its evaluations' per-class metrics."""
    names = []
    for runs in cells.values():
        for run in runs.values():
            for metric in run.get("metrics", ()):
                name = metric.partition("[")[2][:-1]
                if name and name not in names:
                    names.append(name)
    return names


def cell(runs: dict, metric: str) -> tuple:
    """(mean, spread) of one cell: spread over seeds, or over cases when there is one seed."""
    if not runs:
        return math.nan, math.nan
    means = np.array([r["metrics"][metric]["mean"] for r in runs.values()])
    spread = means.std(ddof=1) if len(runs) > 1 else next(iter(runs.values()))["metrics"][metric]["std"]
    return float(means.mean()), float(spread)


def case_values(run: dict, metric: str) -> dict:
    return {i: (math.nan if v is None else v) for i, v in zip(run["cases"]["id"], run["cases"][metric])}


def combination(terms: list, metric: str) -> dict | None:
    """Mean over seeds of the per-case combination sum c x row (terms: [(runs by seed, c)]) on the
    seeds and cases every row has, its 95 % interval, and how it was formed."""
    seeds = sorted(set.intersection(*(set(runs) for runs, _ in terms)))
    per_seed, used = [], []
    for seed in seeds:
        values = [(case_values(runs[seed], metric), c) for runs, c in terms]
        ids = [i for i in values[0][0] if all(i in v and math.isfinite(v[i]) for v, _ in values)]
        if ids:
            per_seed.append(np.array([sum(c * v[i] for v, c in values) for i in ids]))
            used.append(seed)
    if not per_seed:
        return None
    if len(per_seed) > 1:
        values, over = np.array([d.mean() for d in per_seed]), "seeds"
    else:
        values, over = per_seed[0], "cases"
    mean = float(values.mean())
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))) \
        if len(values) > 1 else math.nan
    means = [float(d.mean()) for d in per_seed]
    return dict(mean=mean, low=mean - half, high=mean + half, over=over, n=len(values), per_seed=means, seeds=used,
                above_zero=sum(m > 0 for m in means))


def paired_difference(runs: dict, controls: dict, metric: str) -> dict | None:
    """Mean paired difference of a row from its control, its 95 % interval and how it was formed."""
    return combination([(runs, 1), (controls, -1)], metric)


def contrast_difference(cells: dict, contrast, metric: str) -> dict | None:
    return combination([(cells.get(row, {}), c) for row, c in contrast.terms], metric)


def verdict(d: dict | None, metric: str) -> str:
    """The plain reading of a paired difference, by a rule fixed before any table was read: "helps"
    or "hurts" when the 95 % interval excludes zero (on the side that is better or worse for the
    metric), else "no difference larger than X", X the interval's larger end in absolute value
    (Dice in points, distances in pixels)."""
    if d is None or not math.isfinite(d["low"]):
        return "–"
    sign = -1 if metric in LOWER_IS_BETTER else 1
    if d["low"] > 0 or d["high"] < 0:
        return "helps" if sign * d["mean"] > 0 else "hurts"
    bound = max(abs(d["low"]), abs(d["high"])) * (1 if metric in LOWER_IS_BETTER else 100)
    return f"no difference larger than {bound:.2f}" + (" px" if metric in LOWER_IS_BETTER else " points")


def claims(cells: dict, contrasts=CLAIMS) -> list:
    """[(contrast, {metric: difference})] of `contrasts`, each on the seeds its rows share."""
    return [(c, {m: contrast_difference(cells, c, m) for m in DIFFERENCE_METRICS}) for c in contrasts]


def fmt(value: float, spread: float, metric: str) -> str:
    if math.isnan(value):
        return "–"
    digits = 2 if metric.split()[-1] in LOWER_IS_BETTER else 4
    return f"{value:.{digits}f} ± {spread:.{digits}f}"


def fmt_points(d: dict | None) -> str:
    """A Dice difference in points (x 100)."""
    if d is None:
        return "–"
    scaled = dict(d, mean=100 * d["mean"], low=100 * d["low"], high=100 * d["high"])
    return fmt_difference(scaled, "hd95")


def fmt_difference(d: dict | None, metric: str) -> str:
    """mean [95 % interval], * where it excludes 0, and over several seeds how many are above 0."""
    if d is None:
        return "–"
    digits = 2 if metric in LOWER_IS_BETTER else 4
    excludes_zero = d["low"] > 0 or d["high"] < 0
    signs = f" ({d['above_zero']}/{d['n']} > 0)" if d["over"] == "seeds" else ""
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]" + (" *" if excludes_zero
                                                                                          else "") + signs


def layout(spec: dict, cells: dict, name: str):
    """Row names, column names, {(row, column): (mean, spread)}, {(row, metric): difference} and
    {row: seeds of each of its column groups}."""
    row_names, columns, values, differences, seeds = [], [], {}, {}, {}
    classes = [("", None)] + [(f" · {c}", c) for c in class_names(cells)]
    for label in spec["rows"]:
        group, row = label_parts(label)
        runs = cells.get((name, label), {})
        for suffix, class_name in classes:
            if row + suffix not in row_names:
                row_names.append(row + suffix)
            seeds.setdefault(row + suffix, []).append(len(runs))
            for metric in spec["metrics"]:
                column = f"{group} {metric}".strip()
                if column not in columns:
                    columns.append(column)
                key = metric if class_name is None else per_class(metric, class_name)
                values[row + suffix, column] = cell(runs, key)
        control = spec["control"](label)
        for metric in DIFFERENCE_METRICS:
            if control is not None and metric in spec["metrics"]:
                differences[label, metric] = paired_difference(runs, cells.get(control, {}), metric)
    return row_names, columns, values, differences, seeds


def contrast_lines(cells: dict, contrasts) -> list:
    """Markdown rows of contrasts: the contrast, its seeds, its differences and its readings."""
    lines = []
    for c, d in claims(cells, contrasts):
        lines.append(f"| {c.name} | {c.shown()} | {seed_count(d['dice'])} | {fmt_points(d['dice'])} | "
                     f"{fmt_difference(d['hd95'], 'hd95')} | {fmt_difference(d['assd'], 'assd')} | "
                     f"{verdict(d['dice'], 'dice')}; {verdict(d['hd95'], 'hd95')} |")
    return lines


def headroom_lines(cells: dict) -> list:
    """Markdown of the headroom block: each part's oracle headroom over plain KD, what the part takes
    of it, and that as a share of the headroom on the seeds the oracle has."""
    lines = ["How much of the headroom each part of the method takes: the oracle upper bound over plain KD, "
             "the part over plain KD (Dice in points, mean [95 % interval] (seeds above 0)), and the part's "
             "mean as a share of the headroom's on the oracle's seeds:", "",
             "| part | headroom | seeds | Δ dice, headroom | Δ dice, taken | seeds | share taken |", "|---|---|---|---|---|---|---|"]
    for part, headroom, taken in HEADROOM:
        h, t = contrast_difference(cells, headroom, "dice"), contrast_difference(cells, taken, "dice")
        share = "–"
        if h and t:
            on_oracle_seeds = [v for seed, v in zip(t["seeds"], t["per_seed"]) if seed in h["seeds"]]
            share = f"{100 * np.mean(on_oracle_seeds) / h['mean']:.0f} %" if on_oracle_seeds and h["mean"] else "–"
        lines.append(f"| {part} | {headroom.shown()} | {seed_count(h)} | {fmt_points(h)} | {fmt_points(t)} | "
                     f"{seed_count(t)} | {share} |")
    return lines


def seed_count(d: dict | None) -> int:
    """The number of seeds a difference is over (one where its interval is over the cases of one seed)."""
    return 0 if d is None else d["n"] if d["over"] == "seeds" else 1


def refiner_lines(cells: dict, ratio: str) -> list:
    """Markdown of each seed's refiner on the labelled validation split, as the keep rule judged it."""
    refiners = cells.get((REFINER, ratio), {})
    if not refiners:
        return []
    lines = ["The refiner of each seed on the labelled validation split (the candidate every refined row "
             "applies), and the keep rule's verdict (gain's 95 % lower bound above 0 and HD95 not worse):", "",
             "| seed | step | Dice, teacher | Dice, refined | Δ dice (points) [lower bound] | HD95 teacher -> refined "
             "(px) | keep rule |", "|---|---|---|---|---|---|---|"]
    for seed, run in sorted(refiners.items()):
        k = run["keep_rule"]
        lines.append(f"| {seed} | {k['step']} | {k['teacher_dice']:.4f} | {k['refined_dice']:.4f} | "
                     f"{100 * k['dice_gain']:+.2f} [{100 * k['dice_gain_low']:+.2f}] | {k['teacher_hd95']:.2f} -> "
                     f"{k['refined_hd95']:.2f} | {'passes' if k['passes'] else 'fails'} |")
    gains = [100 * run["keep_rule"]["dice_gain"] for run in refiners.values()]
    lines += ["", f"Passed on {sum(bool(r['keep_rule']['passes']) for r in refiners.values())} of {len(refiners)} "
                  f"seeds; validation Dice change from {min(gains):+.2f} to {max(gains):+.2f} points."]
    return lines


def render(name: str, spec: dict, cells: dict, caption: str) -> tuple[str, str]:
    """(markdown, csv) of one table: the cells, then the paired differences from the control."""
    row_names, columns, values, differences, seeds = layout(spec, cells, name)
    arrows = [c + (" ↓" if c.split()[-1] in LOWER_IS_BETTER else " ↑") for c in columns]
    md = [f"### {spec['title']}", "", caption, ""]
    header = ["| contrast | rows | seeds | Δ dice (points) | Δ hd95 (px) | Δ assd (px) | reading (dice; hd95) |",
              "|---|---|---|---|---|---|---|"]
    if spec.get("claims"):
        md += ["The claims as the paper applies its method, each a paired contrast of rows over the seeds they "
               "share: mean [95 % interval], * where it excludes 0, (seeds above 0 of all), and its reading:", "",
               *header, *contrast_lines(cells, CLAIMS), "", "Beside them:", "", *header,
               *contrast_lines(cells, BESIDE), ""]
    md += ["| | n | " + " | ".join(arrows) + " |", "|---" * (len(columns) + 2) + "|"]
    for r in row_names:
        # one count, or one per column group (Table 4's methods) where they differ
        n = seeds[r][0] if len(set(seeds[r])) == 1 else " / ".join(map(str, seeds[r]))
        md.append(f"| {r} | {n} | " + " | ".join(fmt(*values[r, c], c) for c in columns) + " |")
    labels = [label for label in spec["rows"] if any((label, m) in differences for m in DIFFERENCE_METRICS)]
    metrics = [m for m in DIFFERENCE_METRICS if m in spec["metrics"]]
    if labels:
        control_label = spec["control"](labels[0])[1]
        control = label_parts(control_label)[0] or control_label
        md += ["", f"Paired difference from `{control}` (mean [95 % interval] over the seeds both share; * where "
                   f"the interval excludes 0):", "", "| | seeds | " + " | ".join(f"Δ {m}" for m in metrics) + " |",
               "|---" * (len(metrics) + 2) + "|"]
        for label in labels:
            d0 = next((differences.get((label, m)) for m in metrics if differences.get((label, m))), None)
            md.append(f"| {shown(label)} | {seed_count(d0) or 1} | "
                      + " | ".join(fmt_difference(differences.get((label, m)), m) for m in metrics) + " |")
    if spec.get("headroom"):
        md += ["", *headroom_lines(cells)]
    if spec.get("refiners"):
        md += ["", *refiner_lines(cells, spec["refiners"])]
    buf = io.StringIO()
    writer = csv.writer(buf)        # long format: one line per row and metric
    writer.writerow(["row", "metric", "mean", "spread", "seeds", "delta", "delta_low", "delta_high", "delta_over"])
    names = class_names(cells)
    for label in spec["rows"]:
        runs = cells.get((name, label), {})
        for metric in spec["metrics"] + [per_class(m, c) for c in names for m in spec["metrics"]]:
            d = differences.get((label, metric))
            writer.writerow([shown(label), metric, *(f"{v:.6g}" for v in cell(runs, metric)),
                             len(runs), *((f"{d[k]:.6g}" for k in ("mean", "low", "high")) if d else ("", "", "")),
                             d["over"] if d else ""])
    return "\n".join(md) + "\n", buf.getvalue()
