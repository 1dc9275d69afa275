"""Ahead-of-time compile for sm_90 (no GPU needed): the configurations with the most registers
have no spills and leave at least two CTAs per SM; the committed report covers every
configuration the dispatch can choose, without spills."""
import json
import os
import subprocess
import sys
import pytest

from bench import compile_check
from engine.cli import REPO

needs_ptxas = pytest.mark.skipif(not compile_check.ptxas_available(),
                                 reason="this triton ships no ptxas for the NVIDIA backend")
# The largest window ring, the most classes and the fewest: the register-heaviest choices.
WORST = ["ssim/loss/window=15/C=8/float32/contiguous", "ssim/loss_and_weight/window=15/C=8/bfloat16/channels_last",
         "ssim/weight_map/window=15/C=2/float32/contiguous", "ssim/loss_and_weight/window=7/C=2/float16/contiguous",
         "pixel/agree/loss/t=2/C=8/float32/channels_last", "pixel/agree/loss/t=1/C=2/bfloat16/channels_last",
         "pixel/tensor/grad/t=1/C=8/float16/contiguous"]
SCRIPT = """
import json, sys
from bench import compile_check as cc
wanted = set(json.loads(sys.argv[1]))
out = {name: cc.compile_one(launch, 90) for name, launch, *_ in cc.configurations() if name in wanted}
print(json.dumps(out))
"""


@needs_ptxas
def test_worst_configurations_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(WORST)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(WORST)
    for name, r in results.items():
        assert r["spill_store_bytes"] == r["spill_load_bytes"] == r["stack_bytes"] == 0, (name, r)
        assert r["ctas_per_sm"] >= compile_check.MIN_CTAS_PER_SM, (name, r)


@pytest.mark.parametrize("report", ["kernels_sm90.json", "kernels_sm90_triton3.6.0.json"])
def test_committed_reports_cover_every_configuration_without_spills(report):
    rows = json.loads((REPO / "bench" / report).read_text())["configurations"]
    names = {r["config"] for r in rows if r["arch"] == "sm_90"}
    assert names == {name for name, *_ in compile_check.configurations()}
    assert all(r["spill_store_bytes"] == r["spill_load_bytes"] == r["stack_bytes"] == 0 for r in rows)
    assert min(r["ctas_per_sm"] for r in rows) >= compile_check.MIN_CTAS_PER_SM
    # the instruction targets at the benchmark's C = 2: the plain loss pass (both layouts), the ssim forward
    per_pixel = {r["config"]: r["instructions_per_pixel"] for r in rows if "instructions_per_pixel" in r}
    assert max(v for k, v in per_pixel.items() if k.startswith("pixel/none/loss/") and "/C=2/" in k) <= 70
    assert max(v for k, v in per_pixel.items() if k.startswith("ssim/loss") and "/window=7/C=2/" in k) <= 400
