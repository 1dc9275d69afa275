"""MODEL_CARD.md beside a trained network: the repository's template filled with the run's settings,
data, classes and validation numbers. A card travels with a shared network, so it names the data
folder by its name alone and leaves every path out of the settings."""
import datetime
import string
from pathlib import Path

from data import SPLIT_KEYS

from .cli import REPO, settings_json
from .records import write_text

TEMPLATE = REPO / "MODEL_CARD.md"
PHANTOM_WARNING = ("It was trained on the procedural phantom that is this repository's default dataset, not on "
                   "radiographs of patients.")


def _table(pairs: dict) -> str:
    return "\n".join(f"| `{k}` | {v} |" for k, v in pairs.items())


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def fill_model_card(settings, split: dict, classes, fingerprint: str, metrics: dict, *, kind: str,
                    checkpoint: Path, size, code_version: str, method: str, score: str = "dice") -> str:
    """The model card's text: TEMPLATE (the repository's MODEL_CARD.md) with each $name replaced.
    `metrics` are the best validation numbers with their `step`, as a StageState keeps them;
    `classes` a data.Classes; `size` the network input (H, W); `method` one line on how it learnt."""
    args = settings_json(settings)
    data = Path(args.get("data", ""))
    phantom = (data / "phantom.json").exists()
    text = string.Template(TEMPLATE.read_text()).substitute(
        kind=kind, checkpoint=Path(checkpoint).name, code_version=code_version, method=method,
        written=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        data_warning=PHANTOM_WARNING if phantom else "",
        size=" x ".join(map(str, size)),
        classes=", ".join(f"{v} = {n}" for v, n in zip(classes.values, classes.names)),
        settings=_table({k: Path(v).name if isinstance(getattr(settings, k), Path) else v
                         for k, v in args.items() if k not in ("data", "out")}),
        data=data.name, fingerprint=fingerprint,
        split_sizes=", ".join(f"{k} {len(split[k])}" for k in SPLIT_KEYS),
        score_name=score, best_step=metrics.get("step", "?"), n_val=len(split.get("val", [])),
        metrics=_table({k: _number(v) for k, v in metrics.items() if k != "step"}))
    return "".join(line.rstrip() + "\n" for line in text.splitlines())   # an empty field leaves no trailing blank


def write_model_card(logs: Path, *args, **kwargs) -> Path:
    """fill_model_card's text written to `logs`/MODEL_CARD.md; returns its path."""
    path = Path(logs) / "MODEL_CARD.md"
    write_text(path, fill_model_card(*args, **kwargs))
    return path
