"""The GPU check's driver, run on the CPU through the interpreter at toy sizes with MedPy and MONAI
made unimportable (as on the bare GPU machine): what it writes, that a failing step becomes a row
while the steps after it still run, and that the launches it records compile for sm_90."""
import json
import sys

import pytest

from bench import compile_check, gpu_check, precompile

FILES = ["boundary_bench.jsonl", "check.jsonl", "kd_bench.jsonl", "summary.jsonl"]


def _without_libraries(monkeypatch):
    # None in sys.modules makes an import raise ImportError, as a missing package does
    for name in ("medpy", "medpy.metric", "monai", "monai.metrics"):
        monkeypatch.setitem(sys.modules, name, None)


def _rows(folder):
    return {f.name: [json.loads(line) for line in f.read_text().splitlines()] for f in folder.iterdir()}


def test_driver_writes_every_row_without_medpy(tmp_path, monkeypatch, capsys):
    _without_libraries(monkeypatch)
    assert gpu_check.main(["--out-dir", str(tmp_path), "--size", "tiny"]) == 0
    rows = _rows(tmp_path)
    assert sorted(rows) == FILES
    assert all(f.stat().st_size < 16 << 20 for f in tmp_path.iterdir())
    # every row was also printed as one JSON line
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted(map(json.dumps, printed)) == sorted(json.dumps(r) for file in rows.values() for r in file)

    check = rows["check.jsonl"]
    assert check[0]["step"] == "environment" and check[0]["cpu"]
    assert check[1]["step"] == "precompile" and check[1]["recorded_launches"] > 0
    kd = [r for r in check if r["step"] == "kd"]
    assert len(kd) == len(gpu_check.kd_cases(gpu_check.SIZES["tiny"])) and all(r["ok"] for r in kd)
    assert [r["step"] for r in check[-2:]] == ["sync_and_graph", "boundary"] and check[-1]["ok"]
    assert {r["mode"] for r in rows["kd_bench.jsonl"] if r["step"] == "kd_bench"} == set(gpu_check.MODES)
    assert rows["kd_bench.jsonl"][-1] == dict(step="torch_compile", skipped="not asked for (--torch-compile)")
    boundary = {r.get("path", r["step"]): r for r in rows["boundary_bench.jsonl"]}
    assert boundary["cpu"]["median_ms"] > 0 and boundary["cpu"]["cpu"]
    assert boundary["side_by_side/medpy"]["absent"] and boundary["side_by_side/monai"]["absent"]
    assert boundary["side_by_side/cpu_path"]["median_ms"] > 0
    assert boundary["boundary_ratios"]["ratios"] == {}
    summary, = rows["summary.jsonl"]
    assert summary["ok"] and summary["failures"] == []


def test_a_failing_step_is_reported_at_the_end_and_the_rest_still_runs(tmp_path, monkeypatch):
    _without_libraries(monkeypatch)
    monkeypatch.setattr(gpu_check, "kd_cases", lambda size: [("float32", True, 3, "ssim")])

    def broken(size, device, check=True):
        if check:  # recording its launches for the pre-compile still works
            raise RuntimeError("injected")
    monkeypatch.setattr(gpu_check, "boundary_case", broken)
    assert gpu_check.main(["--out-dir", str(tmp_path), "--size", "tiny"]) == 1
    rows = _rows(tmp_path)
    summary, = rows["summary.jsonl"]
    assert summary["failures"] == [dict(step="boundary", error="RuntimeError: injected")]
    failed = [r for r in rows["check.jsonl"] if r.get("ok") is False]
    assert len(failed) == 1 and "injected" in failed[0]["traceback"]
    assert any(r.get("path") == "cpu" for r in rows["boundary_bench.jsonl"])  # later steps ran


def test_full_size_runs_only_on_a_gpu(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out-dir", str(tmp_path)])


@pytest.mark.skipif(not compile_check.ptxas_available(), reason="this triton ships no ptxas")
def test_recorded_launches_compile_for_sm90_in_worker_processes():
    size = gpu_check.SIZES["tiny"]
    specs = precompile.record_launches(lambda: gpu_check.boundary_case(size, "cpu", check=False))
    assert {s.name for s in specs} == {"_count_kernel", "_compact_kernel", "_nearest_kernel"}
    cost = precompile.warm(precompile.distinct(specs, 90), workers=2, arch=90)
    assert cost["specialisations"] == 3 and cost["workers"] == 2
    assert sum(e["count"] for e in cost["per_kernel"].values()) == 3
