"""What `reproduce.py` runs: the profiles, and every stage run the four tables of SPEC section 7 need.

A run is one call of a stage script. Rows that share a run share it: one teacher per labelled
ratio and seed, one refiner per teacher, one student per (ratio, method or KD cell, seed), one
evaluation per trained network (plus the teacher's pseudo labels, plain, post-processed and
refined, for Table 3). Every student of one seed starts from that seed's teacher and sees the
same labelled batches, so the `supervised` student is the paired control of every other row.

Seeds come in groups, each a number of seeds fixed per profile before any table is read: the
runs of the three claims (`primary`), the other baselines (`baselines`), the other ablation cells
(`ablation`) and the 10 %-and-up label-efficiency runs (`efficiency`).
"""
from dataclasses import dataclass, field
from pathlib import Path

from kernels.kd_reference import WEIGHT_MODES
from objectives import OBJECTIVES

CONTROL = "supervised"          # the student every other row is compared with
PAPER_METHOD = "wkd_refine"
FULL_LABELS = "teacher, 100 % labels"
# KD cells are (weight, pseudo-label source) pairs.
KD_METHOD = {(o.weight, o.refine): name for name, o in OBJECTIVES.items() if o.weight is not None}
SOURCES = ("plain", "refined", "post-processed")
KD_CELLS = [(w, source) for source in SOURCES[:2] for w in WEIGHT_MODES] + [("ssim", "post-processed")]
# Table 4's methods, each with the seed group its runs at the profile's own ratio belong to (there
# they are Table 1's runs); at the other ratios every method has the efficiency seeds. Both modern
# baselines are shown: the plan is fixed before any run, so the better of the two could only be
# picked afterwards, from the test split.
TABLE4_METHODS = {CONTROL: "primary", PAPER_METHOD: "primary", "bcp": "baselines", "unimatch": "baselines"}
# The claims, each a paired contrast (row - control) on the same seeds and test cases.
CLAIMS = (("the structural weight helps KD", "wkd", "kd"),
          ("SinusCycle-GAN refinement helps", PAPER_METHOD, "wkd"),
          ("the method beats the supervised control", PAPER_METHOD, CONTROL))
PRIMARY_METHODS = {CONTROL, *(row for _, row, _ in CLAIMS), *(c for _, _, c in CLAIMS)}

PROFILES = {
    # End-to-end check of the whole plan in seconds (the test suite runs it on a tiny phantom).
    "micro": dict(size=(32, 64), precision="fp32", seeds=dict(primary=2, baselines=1, ablation=1, efficiency=1),
                  ratio=0.3, table4_ratios=(0.3, 0.6), teacher=dict(width=4, steps=4, batch=2),
                  cyclegan=dict(width=4, blocks=1, disc_width=4, disc_layers=1, steps=4),
                  student=dict(width=4, steps=4, batch=2, ramp=2), val_every=2),
    # CPU, within 20 minutes on 2 cores: small input and networks. Students start from their
    # teacher and train for 150 steps; every run keeps its final weights.
    "quick": dict(size=(48, 96), precision="fp32", seeds=dict(primary=7, baselines=3, ablation=3, efficiency=1),
                  ratio=0.02, table4_ratios=(0.02, 0.1), teacher=dict(width=8, steps=800, batch=4),
                  cyclegan=dict(width=8, blocks=2, disc_width=8, disc_layers=1, steps=200),
                  student=dict(width=8, steps=150, batch=4, ramp=50), val_every=50),
    # One GPU in minutes: the claims' runs alone (Table 1's claim rows and what they read), at half the
    # phantom's resolution with the paper's widths; step counts sized from FLOP estimates so that six
    # seeds fit about five minutes with three runs at once (docs/RESULTS.md, "Costs").
    "claims": dict(size=(128, 256), precision="bf16",
                   seeds=dict(primary=6, oracle=0, baselines=0, ablation=0, efficiency=0),
                   ratio=0.02, table4_ratios=(0.02,), teacher=dict(width=32, steps=3000, batch=8),
                   cyclegan=dict(width=32, blocks=6, disc_width=64, disc_layers=3, steps=600),
                   student=dict(width=32, steps=1500, batch=8, ramp=450), val_every=300),
    # GPU: the phantom's full 256x512 resolution, paper-sized networks, six seeds (three above 2 % labels).
    "paper": dict(size=(256, 512), precision="bf16", seeds=dict(primary=6, baselines=6, ablation=6, efficiency=3),
                  ratio=0.02, table4_ratios=(0.02, 0.05, 0.1, 0.2, 0.5), teacher=dict(width=32, steps=20000, batch=8),
                  cyclegan=dict(width=32, blocks=6, disc_width=64, disc_layers=3, steps=10000),
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
                                     "--disc-layers", c["disc_layers"], "--steps", c["steps"],
                                     "--batch-size", self.p["student"]["batch"]]
        return self._add(Run(self._name(out), "train_cyclegan", argv, out, seed, c["steps"], needs=[teacher.name]))

    def student(self, ratio: float, seed: int, method: str, weight: str | None = None, source: str = "plain"):
        s, teacher = self.p["student"], self.teacher(ratio, seed)
        name = method if weight is None else f"kd-{weight}-{source.replace('-', '')}"
        out = teacher.output.with_name(f"student-{name}.pt")
        flags = {"--width": s["width"], "--steps": s["steps"], "--batch-size": s["batch"],
                 "--unlabeled-batch-size": s["batch"], "--ramp-steps": s["ramp"], **method_settings(method, s["steps"])}
        argv = self._common(seed) + ["--out", out, "--teacher", teacher.output, "--method", method,
                                     *(x for flag, value in flags.items() for x in (flag, value))]
        needs = [teacher.name]
        if weight is not None:
            argv += ["--weight", weight]
        if source == "refined":
            refiner = self.refiner(ratio, seed)
            argv += ["--refiner", refiner.output]
            needs.append(refiner.name)
        elif source == "post-processed":
            argv.append("--postprocess")
        return self._add(Run(self._name(out), "train_student", argv, out, seed, s["steps"], needs=needs))

    def kd_student(self, ratio: float, seed: int, weight: str, source: str) -> Run:
        return self.student(ratio, seed, KD_METHOD.get((weight, source == "refined"), "kd"), weight, source)

    def method_student(self, ratio: float, seed: int, method: str) -> Run:
        o = OBJECTIVES[method]
        return self.student(ratio, seed, method) if o.weight is None else self.kd_student(
            ratio, seed, o.weight, "refined" if o.refine else "plain")

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
            if seed < n["primary"]:
                self.evaluation(self.teacher(r, seed), ("table1", "teacher"))
                for method in sorted(PRIMARY_METHODS, key=list(OBJECTIVES).index):
                    self.evaluation(self.method_student(r, seed, method), ("table1", method))
                teacher = self.teacher(r, seed)
                self.evaluation(teacher, ("table3", "teacher"), split="unlabeled")
                self.evaluation(teacher, ("table3", "post-processed"), split="unlabeled", postprocess=True)
                self.evaluation(teacher, ("table3", "refined"), split="unlabeled", refiner=self.refiner(r, seed))
            if seed < n["baselines"]:
                for method in OBJECTIVES:
                    if method not in PRIMARY_METHODS:
                        self.evaluation(self.method_student(r, seed, method), ("table1", method))
                self.evaluation(self.teacher(1.0, seed), ("table1", FULL_LABELS))
            for weight, source in KD_CELLS:
                run_is_primary = KD_METHOD.get((weight, source == "refined")) in PRIMARY_METHODS \
                    and source != "post-processed"
                if seed < n["primary" if run_is_primary else "ablation"]:
                    self.evaluation(self.kd_student(r, seed, weight, source), ("table2", kd_label(weight, source)))
            for ratio in self.p["table4_ratios"]:
                for method, group in TABLE4_METHODS.items():
                    if seed < n[group if ratio == r else "efficiency"]:
                        self.evaluation(self.method_student(ratio, seed, method),
                                        ("table4", table4_label(method, ratio)))
        return list(self.runs.values())
