"""What `reproduce.py` runs: the profiles, the rows and contrasts of the four tables of SPEC
section 7, and every stage run they need.

A run is one call of a stage script. Rows that share a run share it: one teacher per labelled
ratio and seed, one refiner per teacher, one student per (ratio, method or KD cell, seed), one
evaluation per trained network (plus the teacher's pseudo labels, plain, post-processed and
refined, for Table 3). Every student of one seed starts from that seed's teacher and sees the
same labelled and unlabelled batches, so the `supervised` student is the paired control of every
other row, and the KD cells differ only in their weight and their targets.

Seeds come in groups, each a number of seeds fixed per profile before any table is read: the
runs of the claims, the 2x2 of KD weight {none, ssim} x targets {plain, refined} (`primary`), the
two oracle upper bounds (`oracle`), the other baselines (`baselines`), the other KD cells
(`ablation`) and the 10 %-and-up label-efficiency runs (`efficiency`). Every row and contrast
is listed here explicitly: registering a new objective or weight changes no reproduction.
"""
from dataclasses import dataclass, field
from pathlib import Path

from data import prepare_dataset
from engine.cli import REPO, setting
from settings import DEFAULT_DATA

CONTROL = "supervised"          # the student every other row is compared with
PAPER_METHOD = "wkd_refine"
FULL_LABELS = "teacher, 100 % labels"
REFINER = "refiner"             # the refiners' keep-rule records, by seed, at the profile's ratio

# Table 1: each row with the seed group whose runs give it.
TABLE1_ROWS = {"teacher": "primary", CONTROL: "primary", "pseudo_label": "baselines", "mean_teacher": "baselines",
               "kd": "primary", "wkd": "primary", "kd_refine": "primary", PAPER_METHOD: "primary",
               "bcp": "baselines", "unimatch": "baselines", FULL_LABELS: "baselines"}
# Table 2: KD cells (weight, targets), each with its seed group. "oracle" weighs a pixel 1 where the
# teacher is right, and "true masks" are oracle targets: both read the unlabelled masks, so they are
# upper bounds, never methods.
KD_CELLS = {("none", "plain"): "primary", ("ssim", "plain"): "primary", ("none", "refined"): "primary",
            ("ssim", "refined"): "primary", ("oracle", "plain"): "oracle", ("none", "true masks"): "oracle",
            ("agree", "plain"): "ablation", ("agree", "refined"): "ablation", ("ssim", "post-processed"): "ablation"}
# The KD cell of each KD method of Table 1; every other cell is `kd` or `kd_refine` with flags.
KD_METHODS = {("none", "plain"): "kd", ("ssim", "plain"): "wkd", ("none", "refined"): "kd_refine",
              ("ssim", "refined"): PAPER_METHOD}
# Table 3's rows, from the teacher's pseudo labels on the unlabelled split.
TABLE3_ROWS = ("teacher", "post-processed", "refined")
# Rows of the gated pipeline, derived from runs that exist anyway: per seed the refined run where
# the refiner passed its keep rule on validation, else the unrefined run (bit for bit what a run
# with `train_student.py --refiner-gate` would give there).
GATED = {("table2", "ssim, refined if kept"): (("table2", "ssim, refined"), ("table2", "ssim, plain")),
         ("table3", "refined if kept"): (("table3", "refined"), ("table3", "teacher"))}
# Table 4's methods, each with the seed group its runs at the profile's own ratio belong to (there
# they are Table 1's runs); at the other ratios every method has the efficiency seeds. Both modern
# baselines are shown: the plan is fixed before any run, so the better of the two could only be
# picked afterwards, from the test split.
TABLE4_METHODS = {CONTROL: "primary", PAPER_METHOD: "primary", "bcp": "baselines", "unimatch": "baselines"}


@dataclass(frozen=True)
class Contrast:
    """A paired combination of rows, sum of coefficient x row, on the same seeds and test cases."""
    name: str
    terms: tuple                # ((table, row), coefficient) pairs

    def shown(self) -> str:
        """`wkd_refine` - `kd_refine`, as the tables print it."""
        text = " ".join(f"{'+' if c > 0 else '-'} `{row}`" for (_, row), c in self.terms)
        return text.removeprefix("+ ")


def rows(*pairs) -> tuple:
    """Contrast terms from (row, coefficient) pairs; a KD cell is (weight, targets), a row of Table 1 its name."""
    return tuple((("table2", kd_label(*row)) if isinstance(row, tuple) else ("table1", row), c) for row, c in pairs)


def kd_label(weight: str, source: str) -> str:
    """Table 2's row of a KD cell."""
    return f"{weight}, {source}"


# The claims as the paper applies its method (the refiner on every seed, the weight on the refined
# targets), each a paired contrast read by the rule in tables.verdict; beside them, the other cells
# of the 2x2 and the gated pipeline; then how much of the headroom an oracle shows each part takes.
CLAIMS = (Contrast("the weight helps KD on refined targets (the paper's use)",
                   rows((PAPER_METHOD, 1), ("kd_refine", -1))),
          Contrast("refinement helps weighted KD (the paper's use)", rows((PAPER_METHOD, 1), ("wkd", -1))),
          Contrast("the method beats the supervised control", rows((PAPER_METHOD, 1), (CONTROL, -1))))
BESIDE = (Contrast("the weight helps KD on the teacher's targets", rows(("wkd", 1), ("kd", -1))),
          Contrast("refinement helps unweighted KD", rows(("kd_refine", 1), ("kd", -1))),
          Contrast("interaction: the weight's effect on refined minus on the teacher's targets",
                   rows((PAPER_METHOD, 1), ("kd_refine", -1), ("wkd", -1), ("kd", 1))),
          Contrast("refinement where its keep rule passed (the gated pipeline) helps weighted KD",
                   (*rows(("wkd", -1)), (("table2", "ssim, refined if kept"), 1))[::-1]))
# (part, its headroom: the oracle minus plain KD, what the part takes of it: the part minus plain KD)
HEADROOM = (("the weight", Contrast("an oracle weight over plain KD", rows((("oracle", "plain"), 1), ("kd", -1))),
             Contrast("the ssim weight over plain KD", rows(("wkd", 1), ("kd", -1)))),
            ("the targets", Contrast("oracle targets over plain KD", rows((("none", "true masks"), 1), ("kd", -1))),
             Contrast("refined targets over plain KD", rows(("kd_refine", 1), ("kd", -1)))))

PROFILES = {
    # End-to-end check of the whole plan in seconds (the test suite runs it on a tiny phantom).
    "micro": dict(size=(32, 64), precision="fp32",
                  seeds=dict(primary=2, oracle=1, baselines=1, ablation=1, efficiency=1),
                  ratio=0.3, table4_ratios=(0.3, 0.6), teacher=dict(width=4, steps=4, batch=2),
                  cyclegan=dict(width=4, blocks=1, disc_width=4, disc_layers=1, steps=4, average=0.9),
                  student=dict(width=4, steps=4, batch=2, ramp=2), val_every=2),
    # CPU, within 20 minutes on 2 cores: small input and networks. Students start from their
    # teacher and train for 150 steps; every student keeps its final weights.
    "quick": dict(size=(48, 96), precision="fp32",
                  seeds=dict(primary=6, oracle=3, baselines=3, ablation=3, efficiency=1),
                  ratio=0.02, table4_ratios=(0.02, 0.1), teacher=dict(width=8, steps=800, batch=4),
                  cyclegan=dict(width=8, blocks=2, disc_width=8, disc_layers=2, steps=200, average=0.99),
                  student=dict(width=8, steps=150, batch=4, ramp=50), val_every=50),
    # One GPU in minutes: the claims' runs alone (Table 1's claim rows and what they read), at half the
    # phantom's resolution with the paper's widths; step counts sized from FLOP estimates: six seeds
    # take about 20 minutes of device time (bench/README.md, "The cost model").
    "claims": dict(size=(128, 256), precision="bf16",
                   seeds=dict(primary=6, oracle=0, baselines=0, ablation=0, efficiency=0),
                   ratio=0.02, table4_ratios=(0.02,), teacher=dict(width=32, steps=3000, batch=8),
                   cyclegan=dict(width=32, blocks=6, disc_width=64, disc_layers=3, steps=600, average=0.99),
                   student=dict(width=32, steps=1500, batch=8, ramp=450), val_every=300),
    # GPU: the phantom's full 256x512 resolution, paper-sized networks, six seeds (three above 2 % labels).
    "paper": dict(size=(256, 512), precision="bf16",
                  seeds=dict(primary=6, oracle=3, baselines=6, ablation=6, efficiency=3),
                  ratio=0.02, table4_ratios=(0.02, 0.05, 0.1, 0.2, 0.5), teacher=dict(width=32, steps=20000, batch=8),
                  cyclegan=dict(width=32, blocks=6, disc_width=64, disc_layers=3, steps=10000, average=0.99),
                  student=dict(width=32, steps=10000, batch=8, ramp=3000), val_every=1000),
}


def method_settings(method: str, steps: int) -> dict:
    """Flags a baseline needs to be scaled to the run as its reference implementation scales it.
    Mean teacher (SSL4MIS): consistency weight 0.1 against a supervised loss of half (CE + Dice),
    so 0.2 against this repo's CE + Dice, ramped up over the whole run; EMA decay 0.99 over 30,000
    iterations is a horizon of 1/300 of the run, which below 10 steps would make the EMA copy the
    student itself, so the horizon is max(steps / 300, 10) steps. BCP (its ACDC code) keeps the
    same EMA decay over the same 30,000 self-training iterations, so the same horizon, and weights
    its mixed loss as its supervised one with no ramp (the consistency weight it computes is only
    logged). UniMatch has no ramp; its weights are in the objective."""
    horizon = max(steps / 300, 10.0)
    if method == "mean_teacher":
        return {"--lambda-max": 0.2, "--ramp-steps": steps, "--ema-decay": round(1 - 1 / horizon, 6)}
    if method == "bcp":
        return {"--lambda-max": 1.0, "--ramp-steps": 1, "--ema-decay": round(1 - 1 / horizon, 6)}
    if method == "unimatch":
        return {"--lambda-max": 1.0, "--ramp-steps": 1}
    return {}


@dataclass
class Run:
    name: str                 # unique, also the run's folder below the output root
    script: str               # stage module: train_teacher, train_cyclegan, train_student, evaluate
    argv: list
    output: Path              # checkpoint (training) or folder (evaluation) this run writes
    seed: int
    steps: int = 0            # 0 for evaluations
    cells: list = field(default_factory=list)   # (table, row label) pairs this run's result feeds
    needs: list = field(default_factory=list)   # names of the runs whose outputs it reads


def ratio_tag(ratio: float) -> str:
    return f"r{round(ratio * 1000):04d}"     # per mille: 0.025 -> r0025


def percent(ratio: float) -> str:
    return f"{ratio * 100:g} %"


def kd_label(weight: str, source: str) -> str:
    """Table 2's row of a KD cell."""
    return f"{weight}, {source}"


def table4_label(method: str, ratio: float) -> str:
    """Table 4's row of a method at a labelled ratio: "method|2 %", as results.json stores it."""
    return f"{method}|{percent(ratio)}"


def label_parts(label: str) -> tuple[str, str]:
    """(method, ratio) of a Table 4 row, ("", label) of any other."""
    method, _, ratio = label.rpartition("|")
    return method, ratio


def shown(label: str) -> str:
    """A row label as the tables and the console print it: "method at 2 %"."""
    method, ratio = label_parts(label)
    return f"{method} at {ratio}" if method else ratio


class Planner:
    def __init__(self, profile: str, data: Path, out: Path, seeds: int | None = None, precision: str | None = None):
        self.p = PROFILES[profile]
        self.data, self.out = data, out
        self.precision = precision or self.p["precision"]
        self.seeds = {group: seeds or n for group, n in self.p["seeds"].items()}
        self.runs: dict[str, Run] = {}

    def _add(self, run: Run, cell=None) -> Run:
        run = self.runs.setdefault(run.name, run)
        if cell and cell not in run.cells:
            run.cells.append(cell)
        return run

    def _common(self, seed: int) -> list:
        return ["--data", self.data, "--seed", seed, "--val-every", self.p["val_every"], "--precision", self.precision]

    def _name(self, output: Path) -> str:
        return str(output.relative_to(self.out))

    def teacher(self, ratio: float, seed: int) -> Run:
        t = self.p["teacher"]
        out = self.out / f"seed{seed}" / ratio_tag(ratio) / "teacher.pt"
        argv = self._common(seed) + ["--out", out, "--labeled-ratio", ratio, "--size", *self.p["size"],
                                     "--width", t["width"], "--steps", t["steps"], "--batch-size", t["batch"]]
        return self._add(Run(self._name(out), "train_teacher", argv, out, seed, t["steps"]))

    def refiner(self, ratio: float, seed: int) -> Run:
        c, teacher = self.p["cyclegan"], self.teacher(ratio, seed)
        out = teacher.output.with_name("cyclegan.pt")
        argv = self._common(seed) + ["--out", out, "--teacher", teacher.output, "--width", c["width"],
                                     "--blocks", c["blocks"], "--disc-width", c["disc_width"],
                                     "--disc-layers", c["disc_layers"], "--steps", c["steps"], "--average",
                                     c["average"], "--batch-size", self.p["student"]["batch"]]
        return self._add(Run(self._name(out), "train_cyclegan", argv, out, seed, c["steps"], needs=[teacher.name]))

    def student(self, ratio: float, seed: int, method: str, cell: tuple | None = None) -> Run:
        """The student of `method` at `ratio` and `seed`, trained on the KD `cell` (weight, targets) if given."""
        s, teacher = self.p["student"], self.teacher(ratio, seed)
        name = method if cell is None else f"kd-{cell[0]}-{cell[1].replace('-', '').replace(' ', '')}"
        out = teacher.output.with_name(f"student-{name}.pt")
        flags = {"--width": s["width"], "--steps": s["steps"], "--batch-size": s["batch"],
                 "--unlabeled-batch-size": s["batch"], "--ramp-steps": s["ramp"], **method_settings(method, s["steps"])}
        argv = self._common(seed) + ["--out", out, "--teacher", teacher.output, "--method", method,
                                     *(x for flag, value in flags.items() for x in (flag, value))]
        needs = [teacher.name]
        if cell is not None:
            weight, source = cell
            argv += ["--oracle", "weight"] if weight == "oracle" else ["--weight", weight]
            if source == "true masks":
                argv += ["--oracle", "targets"]
            elif source == "post-processed":
                argv.append("--postprocess")
        if method in ("kd_refine", PAPER_METHOD):
            refiner = self.refiner(ratio, seed)
            argv += ["--refiner", refiner.output]
            needs.append(refiner.name)
        return self._add(Run(self._name(out), "train_student", argv, out, seed, s["steps"], needs=needs))

    def kd_student(self, ratio: float, seed: int, cell: tuple) -> Run:
        """A KD cell's student: the method of that cell, or `kd` (`kd_refine` for refined targets) with flags."""
        method = KD_METHODS.get(cell) or ("kd_refine" if cell[1] == "refined" else "kd")
        return self.student(ratio, seed, method, cell)

    def method_student(self, ratio: float, seed: int, method: str) -> Run:
        cell = next((c for c, m in KD_METHODS.items() if m == method), None)
        return self.student(ratio, seed, method) if cell is None else self.kd_student(ratio, seed, cell)

    def evaluation(self, trained: Run, cell, split: str = "test", refiner: Run | None = None,
                   postprocess: bool = False) -> Run:
        suffix = f"_{split}" + ("_refined" if refiner else "_postprocessed" if postprocess else "")
        out = trained.output.with_name(trained.output.stem + suffix + "_eval")
        argv = ["--data", self.data, "--ckpt", trained.output, "--split", split, "--out", out, "--no-overlays"]
        needs = [trained.name]
        if refiner:
            argv += ["--refiner", refiner.output]
            needs.append(refiner.name)
        if postprocess:
            argv.append("--postprocess")
        return self._add(Run(self._name(out), "evaluate", argv, out, trained.seed, needs=needs), cell)

    def plan(self) -> list:
        """Every run in an order that satisfies dependencies (each run after the runs it reads)."""
        r, n = self.p["ratio"], self.seeds
        for seed in range(max(n.values())):
            for row, group in TABLE1_ROWS.items():
                if seed < n[group]:
                    trained = self.teacher(r, seed) if row == "teacher" else self.teacher(1.0, seed) \
                        if row == FULL_LABELS else self.method_student(r, seed, row)
                    self.evaluation(trained, ("table1", row))
            for cell, group in KD_CELLS.items():
                if seed < n[group]:
                    self.evaluation(self.kd_student(r, seed, cell), ("table2", kd_label(*cell)))
            if seed < n["primary"]:
                teacher, refiner = self.teacher(r, seed), self.refiner(r, seed)
                self._add(refiner, (REFINER, percent(r)))
                self.evaluation(teacher, ("table3", "teacher"), split="unlabeled")
                self.evaluation(teacher, ("table3", "post-processed"), split="unlabeled", postprocess=True)
                self.evaluation(teacher, ("table3", "refined"), split="unlabeled", refiner=refiner)
            for ratio in self.p["table4_ratios"]:
                for method, group in TABLE4_METHODS.items():
                    if seed < n[group if ratio == r else "efficiency"]:
                        self.evaluation(self.method_student(ratio, seed, method),
                                        ("table4", table4_label(method, ratio)))
        return list(self.runs.values())


@dataclass
class PlanSettings:
    """The flags that choose a plan and where its runs write: reproduce.py's and reproduction.cluster's."""
    profile: str = setting("quick", "quick: CPU minutes; claims: one GPU, minutes, the claims' runs at the paper's "
                                    "widths; paper: GPU, full size, six seeds; micro: a seconds-long check",
                           choices=tuple(PROFILES))
    data: Path = setting(DEFAULT_DATA, "dataset root; the embedded phantom is generated there on first use")
    out: Path | None = setting(None, "output folder; default: results/<profile>")
    seeds: int | None = setting(None, "number of seeds; default: the profile's", within="[1, inf)")
    precision: str | None = setting(None, "arithmetic of every run; default: the profile's (quick: fp32, so that "
                                          "every CPU computes alike); another one writes to results/<profile>-<it>",
                                    choices=("fp32", "bf16"))


def plan_for(s: PlanSettings) -> tuple[list, Path, Path, str]:
    """(every run of the plan in an order that satisfies dependencies, the output folder, the dataset
    root, the precision) of the settings `s`; the embedded phantom is generated on first use."""
    precision = s.precision or PROFILES[s.profile]["precision"]
    default_out = s.profile + ("" if precision == PROFILES[s.profile]["precision"] else f"-{precision}")
    out = (s.out or (REPO / "results" / default_out)).resolve()
    data = prepare_dataset(s.data)
    return Planner(s.profile, data, out, s.seeds, precision=precision).plan(), out, data, precision
