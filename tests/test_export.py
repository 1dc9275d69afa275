"""export.py: a trained network as ONNX with dynamic batch, height and width and its preprocessing in
the metadata; onnxruntime's logits match torch's and predict.py writes the same outputs from it."""
import csv
import json

import imageio.v3 as iio
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import run_script

import export
import predict
from engine.deploy import load_onnx
from engine.networks import load_network
from errors import UserError


@pytest.fixture(scope="module")
def exported(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "teacher.onnx"
    proc = run_script("export.py", "--ckpt", tiny_teacher, "--out", out)
    assert "as ONNX" in proc.stdout and not out.with_name("teacher.onnx.tmp").exists()
    return out


def test_the_graph_states_its_preprocessing_and_classes(exported):
    graph = onnx.load(str(exported))
    onnx.checker.check_model(graph)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["input_size"] == "32 64" and meta["input_multiple"] == "16"
    assert "1st and 99th intensity percentiles" in meta["intensity_normalisation"]
    assert json.loads(meta["outputs"]) == ["background", "sinus"]
    assert json.loads(meta["mask_values"]) == {"background": 0, "sinus": 255}
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.graph.input,
                                                                                          *graph.graph.output)]
    assert dims == [["batch", 1, "height", "width"], ["batch", 2, "height", "width"]]


def test_onnxruntime_logits_match_torch_at_any_batch_and_size(exported, tiny_teacher):
    model, _ = load_network(tiny_teacher, ("teacher",), "--ckpt", torch.device("cpu"))
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 32, 64), (3, 1, 48, 96), (2, 1, 64, 32)]:
        x = rng.random(shape, dtype=np.float32)
        ours = session.run(["logits"], {"image": x})[0]
        with torch.no_grad():
            theirs = model(torch.from_numpy(x)).numpy()
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-4


def test_predict_writes_the_same_outputs_from_the_export(exported, tiny_teacher, tiny_data, tmp_path):
    images = tiny_data / "images"
    outs = {}
    for name, ckpt in (("pt", tiny_teacher), ("onnx", exported)):
        outs[name] = tmp_path / name
        predict.main([str(a) for a in ("--ckpt", ckpt, "--images", images, "--out", outs[name], "--probabilities",
                                       "--no-overlays")])
    masks = sorted(p.name for p in (outs["pt"] / "masks").iterdir())
    assert len(masks) == 30 and masks == sorted(p.name for p in (outs["onnx"] / "masks").iterdir())
    for name in masks:
        assert (outs["pt"] / "masks" / name).read_bytes() == (outs["onnx"] / "masks" / name).read_bytes(), name
    assert list(csv.DictReader(open(outs["pt"] / "areas.csv"))) == list(csv.DictReader(open(outs["onnx"] / "areas.csv")))
    summaries = [json.loads((outs[n] / "summary.json").read_text()) for n in ("pt", "onnx")]
    assert summaries[1]["kind"] == "teacher" and summaries[0]["classes"] == summaries[1]["classes"]
    for name in sorted(p.name for p in (outs["pt"] / "probabilities").iterdir()):
        ours, theirs = (iio.imread(outs[n] / "probabilities" / name).astype(int) for n in ("pt", "onnx"))
        assert np.abs(ours - theirs).max() <= 1, name       # x 255, rounded: a 1e-6 difference may cross a half


def one_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1
    return lines[0]


def test_bad_export_and_onnx_input_are_one_line(tiny_teacher, tiny_data, tmp_path, capsys):
    assert "name the file <name>.onnx" in one_error(export.main, ["--ckpt", tiny_teacher, "--out",
                                                                  tmp_path / "teacher.pt2"], capsys)
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not a graph")
    assert one_error(predict.main, ["--ckpt", foreign, "--images", tiny_data / "images", "--out", tmp_path / "o"],
                     capsys) == f"error: --ckpt {foreign}: not a readable ONNX graph (InvalidProtobuf)"
    with pytest.raises(UserError, match="missing.onnx: no such file"):
        load_onnx(tmp_path / "missing.onnx", "--ckpt")
    assert not (tmp_path / "o").exists()
