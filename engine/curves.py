"""curves.png beside train.log: every number a training stage logs (records.StepLog), over steps.

One panel for the training losses (each step's value faint, its running mean as the progress
bar shows it solid), one for `lambda` when the losses include it (a weight, not a loss), and one
per group of validation numbers sharing their last word (`teacher_dice` and `refined_dice` in
one, `dice_gain` and `gain` in another), so that any stage's keys are plotted without a list.
The figure is redrawn as the run goes (`Curves`), within a share of the run's time.
"""
import math
import time
from pathlib import Path

from .records import write_atomic

SMOOTHING = 0.9     # the running mean of engine.loop's progress bar
PANEL_INCHES = 2.4
DRAWING_SHARE = 0.05   # at most this share of a run's time goes to redrawing its curves along the way


def running_mean(values):
    out, mean = [], None
    for v in values:
        mean = v if mean is None else SMOOTHING * mean + (1 - SMOOTHING) * v
        out.append(mean)
    return out


def series(entries, kind) -> dict:
    """{name: (steps, values)} of the entries of one kind ("train" or "val"), in order of appearance."""
    out: dict = {}
    for entry in entries:
        for name, value in entry.get(kind, {}).items():
            steps, values = out.setdefault(name, ([], []))
            steps.append(entry["step"])
            values.append(value)
    return out


def panels(entries) -> list:
    """[(title, {name: (steps, values)}, smooth)] of the figure, top to bottom."""
    train, val = series(entries, "train"), series(entries, "val")
    weights = {k: v for k, v in train.items() if k == "lambda"}
    losses = {k: v for k, v in train.items() if k != "lambda"}
    groups: dict = {}
    for name, data in val.items():
        groups.setdefault(name.rsplit("_", 1)[-1], {})[name] = data
    out = [("training losses", losses, True)] if losses else []
    out += [("lambda (weight of the unlabelled loss)", weights, False)] if weights else []
    return out + [(f"validation {word}", group, False) for word, group in groups.items()]


def plot_curves(entries, path: Path, title: str) -> None:
    """Write the curves of a run's StepLog entries to `path` (atomically: a viewer never sees half)."""
    # here, not at the top: matplotlib's import costs evaluate.py and predict.py 0.4 s; no pyplot: no
    # global backend or state, safe in any process
    from matplotlib.figure import Figure
    rows = panels(entries)
    if not rows:
        return
    height = PANEL_INCHES * len(rows)
    fig = Figure(figsize=(8, height))
    # fixed margins, in inches: a constrained layout would double the drawing time, which is paid at
    # every validation
    fig.subplots_adjust(left=0.8 / 8, right=1 - 0.2 / 8, bottom=0.5 / height, top=1 - 0.45 / height,
                        hspace=0.45 * len(rows) / (height - 0.95))
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, group, smooth) in zip(axes, rows):
        for key, (steps, values) in group.items():
            if smooth:
                line, = ax.plot(steps, running_mean(values), label=key, linewidth=1.5)
                ax.plot(steps, values, color=line.get_color(), alpha=0.25, linewidth=0.7)
            else:
                ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3)
        finite = [v for _, values in group.values() for v in values if math.isfinite(v)]
        if smooth and finite and min(finite) > 0 and max(finite) > 20 * min(finite):
            ax.set_yscale("log")     # losses of very different sizes (a GAN's) stay readable
        ax.set_title(name, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step")
    fig.suptitle(title, fontsize=11)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", pil_kwargs=dict(compress_level=1)))


class Curves:
    """A run's curves.png, redrawn at each validation unless the last drawing ended less than its own
    cost divided by DRAWING_SHARE ago (on a fast CPU run, where a drawing takes as long as many
    steps, not at every one), and always when asked to `force` (the run's end, a stop)."""

    def __init__(self, path: Path, title: str):
        self.path, self.title, self.ready_at = path, title, 0.0

    def draw(self, entries, force: bool = False) -> None:
        start = time.perf_counter()
        if force or start >= self.ready_at:
            plot_curves(entries, self.path, self.title)
            end = time.perf_counter()
            self.ready_at = end + (end - start) * (1 / DRAWING_SHARE - 1)
