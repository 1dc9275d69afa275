"""Export a trained teacher or student to ONNX, for deployment without the training stack.

    python export.py --ckpt student.pt --out student.onnx

Reads the checkpoint --ckpt (of a finished training run); writes --out (an existing file only with
--overwrite), an ONNX graph from images (N, 1, H, W) to logits (N, C, H, W) with free batch,
height and width (multiples of 16), whose metadata states the preprocessing (training input
size, intensity normalisation, resize), the class names and the mask value of each output.
`predict.py --ckpt student.onnx` runs it with onnxruntime and writes what it writes with the
checkpoint. Needs onnx (and onnxruntime to run it): pip install onnx onnxruntime, or
-r requirements-test.txt.
"""
import dataclasses
from pathlib import Path

import torch

from engine.cli import parse, setting, writable_file
from engine.deploy import export_onnx
from engine.networks import load_network
from engine.records import lock_output, write_atomic
from errors import UserError, exit_on_user_error


@dataclasses.dataclass
class ExportSettings:
    ckpt: Path | None = setting(None, "teacher or student checkpoint to export", required=True)
    out: Path | None = setting(None, "ONNX file to write, e.g. student.onnx", required=True)
    overwrite: bool = setting(False, "replace an existing --out")


@exit_on_user_error
def main(argv=None):
    s = parse(ExportSettings, __doc__, argv)
    if s.out.suffix.lower() != ".onnx":
        raise UserError(f"--out {s.out}: name the file <name>.onnx")
    try:
        import onnx  # noqa: F401  (imported here so that a missing package is named before any work)
    except ImportError:
        raise UserError("export.py needs the onnx package: pip install onnx onnxruntime "
                        "(or pip install -r requirements-test.txt)") from None
    out = writable_file(s.out)
    lock_output(out)
    if out.exists() and not s.overwrite:
        raise UserError(f"--out {out}: exists; replace it with --overwrite, or choose another --out")
    model, ckpt = load_network(s.ckpt, ("teacher", "student"), "--ckpt", torch.device("cpu"))
    write_atomic(out, lambda tmp: export_onnx(model, ckpt, tmp))
    h, w = ckpt["size"]
    print(f"{out}: {ckpt['kind']} {s.ckpt.name} as ONNX, input (N, 1, H, W) trained at {h}x{w}, "
          f"{ckpt['config']['num_classes']} outputs; run it with predict.py --ckpt {out.name}")


if __name__ == "__main__":
    main()
