"""The tables as pictures: a forest plot of every paired difference, and the label-efficiency curve.

forest.png: one line per contrast (the claims, the contrasts beside them, the headroom of each
part over plain KD) and per row with a control (Tables 1-3, a row of Table 2 only where Table 1
has not drawn its runs): its mean paired difference with the 95 % interval as a bar and each
seed's own difference as a dot; Dice in points on the left, HD95 in pixels on the right, zero
marked. label_efficiency.png: test Dice of Table 4's methods against the labelled fraction, mean
and seeds.
"""
import matplotlib

matplotlib.use("Agg")       # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from engine.records import write_atomic  # noqa: E402

from .plan import BESIDE, CLAIMS, HEADROOM, TABLE4_METHODS, percent, table4_label  # noqa: E402
from .tables import claims, paired_difference  # noqa: E402

METRICS = (("dice", "Δ Dice (points)", 100.0), ("hd95", "Δ HD95 (px)", 1.0))


def forest_rows(cells: dict, specs: dict) -> list:
    """(label, {metric: difference}) of the claims, the contrasts beside them, the headroom, and every
    row of Tables 1-3 with a control; a contrast or row drawn already (the same runs) is not drawn again."""
    groups = [("claim", CLAIMS), ("beside", BESIDE), ("headroom", [headroom for _, headroom, _ in HEADROOM])]
    rows, drawn = [], set()
    for group, contrasts in groups:
        for c, d in claims(cells, contrasts):
            drawn.add(c.shown())
            rows.append((f"{group}: {c.shown().replace('`', '')}", d))
    for name in ("table1", "table2", "table3"):
        spec = specs[name]
        for label in spec["rows"]:
            control = spec["control"](label)
            runs = cells.get((name, label), {})
            if control is None or any(runs and runs == cells.get(("table1", row)) for row in specs["table1"]["rows"]
                                      if name != "table1"):
                continue
            d = {m: paired_difference(runs, cells.get(control, {}), m) for m, _, _ in METRICS}
            if any(d.values()):
                rows.append((f"T{name[-1]}: {label} - {control[1]}", d))
    return rows


def draw_forest(path, rows: list) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * len(rows) + 1.2), sharey=True)
    y = np.arange(len(rows))[::-1]
    for ax, (metric, title, scale) in zip(axes, METRICS):
        for yi, (_, d) in zip(y, rows):
            diff = d.get(metric)
            if diff is None:
                continue
            if np.isfinite(diff["low"]):
                ax.plot([scale * diff["low"], scale * diff["high"]], [yi, yi], color="tab:blue", lw=2)
            ax.plot([scale * v for v in diff["per_seed"]], [yi] * len(diff["per_seed"]), "o", ms=3,
                    color="tab:gray", alpha=0.7)
            ax.plot(scale * diff["mean"], yi, "D", color="tab:blue", ms=5)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [label for label, _ in rows], fontsize=8)
    fig.suptitle("Paired differences: mean and 95 % interval over seeds (bars), each seed (dots)", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def draw_label_efficiency(path, cells: dict, ratios) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = np.arange(len(ratios))
    colours = ("tab:gray", "tab:orange", "tab:blue", "tab:green")
    offsets = np.linspace(-0.09, 0.09, len(TABLE4_METHODS))
    for offset, colour, method in zip(offsets, colours, TABLE4_METHODS):
        means = []
        for xi, ratio in zip(x, ratios):
            runs = cells.get(("table4", table4_label(method, ratio)), {})
            values = [100 * r["metrics"]["dice"]["mean"] for r in runs.values()]
            ax.plot([xi + offset] * len(values), values, "o", ms=3, alpha=0.6, color=colour)
            means.append(np.mean(values) if values else np.nan)
        ax.plot(x + offset, means, "-D", label=method, ms=5, color=colour)
    ax.set_xticks(x, [percent(r) for r in ratios])
    ax.set_xlabel("labelled fraction of the training images")
    ax.set_ylabel("test Dice (points)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def draw_figures(out, cells: dict, specs: dict, profile: dict) -> None:
    rows = forest_rows(cells, specs)
    if rows:
        draw_forest(out / "forest.png", rows)
    draw_label_efficiency(out / "label_efficiency.png", cells, profile["table4_ratios"])
