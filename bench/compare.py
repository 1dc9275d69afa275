"""The claims of two reproductions side by side: did another arithmetic path change a verdict?

    python reproduce.py --profile quick --precision bf16     # the bf16 twin, into results/quick-bf16
    python -m bench.compare results/quick results/quick-bf16

For each claim and metric: both runs' paired difference with its interval and reading, and how
far the mean moved, in units of the first run's half-width (below 1: inside its own
uncertainty). Prints a markdown table.
"""
import argparse
import json
from pathlib import Path

from reproduction.tables import claims, collect, fmt_difference, fmt_points, verdict

METRICS = ("dice", "hd95")


def describe(results: dict) -> str:
    env = results["environment"]
    return f"{results['precision']}, {env['cpu']}, {results['threads_per_run']} thread(s) per run, torch {env['torch']}"


def side_by_side(first: dict, second: dict) -> str:
    lines = [f"First: {describe(first)}. Second: {describe(second)}.", "",
             "| claim | metric | first | second | moved (first's half-widths) | readings |", "|---|---|---|---|---|---|"]
    for (contrast, a), (_, b) in zip(claims(collect(first)), claims(collect(second))):
        for metric in METRICS:
            da, db = a[metric], b[metric]
            if da is None or db is None:
                continue
            show = fmt_points if metric == "dice" else (lambda d: fmt_difference(d, metric))
            half = (da["high"] - da["low"]) / 2
            moved = abs(db["mean"] - da["mean"]) / half if half > 0 else float("inf")
            readings = verdict(da, metric), verdict(db, metric)
            kinds = [r if r in ("helps", "hurts") else "no difference" for r in readings]
            same = "same" if kinds[0] == kinds[1] else "**differ**"
            lines.append(f"| {contrast.name} ({contrast.shown()}) | {metric} | {show(da)} | {show(db)} | {moved:.2f} | "
                         f"{same}: {readings[0]}; {readings[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path, help="folder with results.json")
    p.add_argument("second", type=Path, help="folder with results.json")
    args = p.parse_args(argv)
    first, second = (json.loads((folder / "results.json").read_text()) for folder in (args.first, args.second))
    print(side_by_side(first, second))


if __name__ == "__main__":
    main()
