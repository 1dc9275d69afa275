"""What `reproduce.py` runs: the profiles, and every stage run the four tables of SPEC section 7 need.

A run is one call of a stage script. Rows that share a run share it: one teacher per labelled
ratio and seed, one refiner per teacher, one student per (ratio, method or KD cell, seed), one
evaluation per trained network (plus the teacher's pseudo labels, plain and refined, for Table
3). Every student of one seed starts from the same initialisation and sees the same labelled
batches, so the `supervised` student is the paired control of every other row.
"""
from dataclasses import dataclass, field
from pathlib import Path

from kernels.kd_reference import WEIGHT_MODES
from objectives import OBJECTIVES

CONTROL = "supervised"          # the student every other row is compared with
PAPER_METHOD = "wkd_refine"
# Student methods of Table 1 that are not KD cells; KD cells are (weight, refined) pairs.
BASELINES = tuple(name for name, o in OBJECTIVES.items() if o.weight is None)
KD_METHOD = {(o.weight, o.refine): name for name, o in OBJECTIVES.items() if o.weight is not None}
KD_CELLS = [(w, r) for r in (False, True) for w in WEIGHT_MODES]
TABLE4_METHODS = (CONTROL, PAPER_METHOD)

PROFILES = {
    # End-to-end check of the whole plan in seconds (the test suite runs it on a tiny phantom).
    "micro": dict(size=(32, 64), seeds=1, table2_seeds=1, table4_seeds=1, ratio=0.3, table4_ratios=(0.3, 0.6),
                  teacher=dict(width=4, steps=4, batch=2), cyclegan=dict(width=4, blocks=1, disc_width=4, steps=4),
                  student=dict(width=4, steps=4, batch=2, ramp=2), val_every=2),
    # CPU, under 20 minutes on 2 cores: small input and networks, three seeds for Tables 1 and 3. The
    # teachers train longer than the students because the 100 % teacher was still improving: at
    # 800 steps the 2 %-to-100 % gap on validation is 5.7 Dice points (3 seeds), at 400 only 4.2
    # (results/design/headroom.json); the 2 % teacher peaks early either way.
    "quick": dict(size=(48, 96), seeds=3, table2_seeds=1, table4_seeds=1, ratio=0.02,
                  table4_ratios=(0.02, 0.1), teacher=dict(width=8, steps=800, batch=4),
                  cyclegan=dict(width=8, blocks=3, disc_width=8, steps=200),
                  student=dict(width=8, steps=300, batch=4, ramp=100), val_every=50),
    # GPU: the phantom's full 256x512 resolution, paper-sized networks, three seeds everywhere.
    "paper": dict(size=(256, 512), seeds=3, table2_seeds=3, table4_seeds=3, ratio=0.02,
                  table4_ratios=(0.02, 0.05, 0.1, 0.2, 0.5), teacher=dict(width=32, steps=20000, batch=8),
                  cyclegan=dict(width=32, blocks=6, disc_width=64, steps=10000),
                  student=dict(width=32, steps=20000, batch=8, ramp=4000), val_every=1000),
}


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


def kd_label(weight: str, refined: bool) -> str:
    """Table 2's row of a KD cell."""
    return f"{weight}, {'refined' if refined else 'plain'}"


class Planner:
    def __init__(self, profile: str, data: Path, out: Path, seeds: int | None = None, device: str = "auto"):
        self.p = PROFILES[profile]
        self.data, self.out, self.device = data, out, device
        self.seeds = range(seeds or self.p["seeds"])
        self.runs: dict[str, Run] = {}

    def _add(self, run: Run, cell=None) -> Run:
        run = self.runs.setdefault(run.name, run)
        if cell and cell not in run.cells:
            run.cells.append(cell)
        return run

    def _common(self, seed: int) -> list:
        return ["--data", self.data, "--device", self.device, "--seed", seed, "--val-every", self.p["val_every"]]

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
                                     "--steps", c["steps"], "--batch-size", self.p["student"]["batch"]]
        return self._add(Run(self._name(out), "train_cyclegan", argv, out, seed, c["steps"], needs=[teacher.name]))

    def student(self, ratio: float, seed: int, method: str, weight: str | None = None, refined: bool = False):
        s, teacher = self.p["student"], self.teacher(ratio, seed)
        name = method if weight is None else f"kd-{weight}-{'refined' if refined else 'plain'}"
        out = teacher.output.with_name(f"student-{name}.pt")
        argv = self._common(seed) + ["--out", out, "--teacher", teacher.output, "--method", method,
                                     "--width", s["width"], "--steps", s["steps"], "--batch-size", s["batch"],
                                     "--unlabeled-batch-size", s["batch"], "--ramp-steps", s["ramp"]]
        needs = [teacher.name]
        if weight is not None:
            argv += ["--weight", weight]
        if refined:
            refiner = self.refiner(ratio, seed)
            argv += ["--refiner", refiner.output]
            needs.append(refiner.name)
        return self._add(Run(self._name(out), "train_student", argv, out, seed, s["steps"], needs=needs))

    def kd_student(self, ratio: float, seed: int, weight: str, refined: bool) -> Run:
        return self.student(ratio, seed, KD_METHOD.get((weight, refined), "kd"), weight, refined)

    def method_student(self, ratio: float, seed: int, method: str) -> Run:
        o = OBJECTIVES[method]
        return self.student(ratio, seed, method) if o.weight is None else self.kd_student(ratio, seed, o.weight,
                                                                                          o.refine)

    def evaluation(self, trained: Run, cell, split: str = "test", refiner: Run | None = None) -> Run:
        suffix = f"_{split}" + ("_refined" if refiner else "")
        out = trained.output.with_name(trained.output.stem + suffix + "_eval")
        argv = ["--data", self.data, "--device", self.device, "--ckpt", trained.output, "--split", split,
                "--out", out, "--no-overlays"]
        needs = [trained.name]
        if refiner:
            argv += ["--refiner", refiner.output]
            needs.append(refiner.name)
        return self._add(Run(self._name(out), "evaluate", argv, out, trained.seed, needs=needs), cell)

    def plan(self) -> list:
        """Every run in an order that satisfies dependencies (each run after the runs it reads)."""
        r = self.p["ratio"]
        for seed in self.seeds:
            self.evaluation(self.teacher(r, seed), ("table1", "teacher"))
            for method in OBJECTIVES:
                self.evaluation(self.method_student(r, seed, method), ("table1", method))
            self.evaluation(self.teacher(1.0, seed), ("table1", "supervised (100 % labels)"))
            self.evaluation(self.teacher(r, seed), ("table3", "teacher"), split="unlabeled")
            self.evaluation(self.teacher(r, seed), ("table3", "refined"), split="unlabeled",
                            refiner=self.refiner(r, seed))
            if seed < self.p["table2_seeds"]:
                for weight, refined in KD_CELLS:
                    self.evaluation(self.kd_student(r, seed, weight, refined), ("table2", kd_label(weight, refined)))
            if seed < self.p["table4_seeds"]:
                for ratio in self.p["table4_ratios"]:
                    for method in TABLE4_METHODS:
                        self.evaluation(self.method_student(ratio, seed, method),
                                        ("table4", f"{method}|{percent(ratio)}"))
        return list(self.runs.values())
