"""Checkpoints are opened weights-only: one that carries a pickled object is refused in one line,
and the object's code never runs."""
import os

import pytest
import torch
from conftest import run_main

import predict
import train_student


class Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_checkpoint_carrying_a_pickled_object_is_refused_unopened(tiny_data, tiny_teacher, tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    ckpt = torch.load(tiny_teacher, weights_only=True)
    ckpt["metrics"] = dict(ckpt["metrics"], note=Payload(marker))
    evil = tmp_path / "student.pt"
    torch.save(ckpt, evil)
    proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", evil, "--out", tmp_path / "e")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: --ckpt {evil}: it holds Python objects other than tensors and plain " \
                                  f"values, refused unopened"
    assert not marker.exists() and not (tmp_path / "e").exists()

    # every other entry point opens checkpoints the same way
    for main, argv in [(predict.main, ["--ckpt", evil, "--images", tiny_data / "images", "--out", tmp_path / "p"]),
                       (train_student.main, ["--data", tiny_data, "--teacher", evil, "--method", "kd",
                                             "--out", tmp_path / "s.pt"])]:
        with pytest.raises(SystemExit):
            main([str(a) for a in argv])
        assert "refused unopened" in capsys.readouterr().err and not marker.exists()

    torch.load(evil, weights_only=False)        # the payload is live: an unsafe load runs it
    assert marker.is_dir()
