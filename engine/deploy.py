"""A trained U-Net as an ONNX graph for deployment without the training stack, and that graph run
back through onnxruntime as a torch module, so that predict.py treats it like a checkpoint.

The graph maps images (N, 1, H, W), float32, preprocessed as the metadata says, to logits
(N, C, H, W); N, H and W are free (H and W multiples of the network stride). The metadata holds
everything a deployment needs to reproduce predict.py: the training input size, the intensity
normalisation, the resize, the class names and the mask value of each output, and the
checkpoint record predict.py reads back (`sinus_wkd`).
"""
import json
from pathlib import Path

import torch

from data import from_record
from errors import UserError

OPSET = 17
RECORD_KEY = "sinus_wkd"
NORMALISATION = ("luminance of RGB (0.299, 0.587, 0.114); DICOM: Modality LUT, VOI LUT or window, MONOCHROME1 "
                 "inverted; then clip to the image's 1st and 99th intensity percentiles and scale that range to "
                 "[0, 1] (float32)")
RESIZE = ("bilinear with antialiasing (align_corners=False) to input_size; logits resized bilinearly back to the "
          "image's size; the mask is the argmax over the outputs")


def metadata(ckpt: dict, stride: int) -> dict:
    """The graph's metadata properties (strings) for a teacher or student checkpoint."""
    classes = from_record(ckpt.get("classes"))
    record = {k: ckpt.get(k) for k in ("kind", "size", "config", "code_version", "metrics")}
    record["classes"] = classes.record()
    return dict(
        input_size=" ".join(map(str, ckpt["size"])), input_multiple=str(stride),
        intensity_normalisation=NORMALISATION, resize=RESIZE,
        outputs=json.dumps(["background", *classes.names]),
        mask_values=json.dumps({"background": 0, **dict(zip(classes.names, classes.values))}),
        **{RECORD_KEY: json.dumps(record)})


def export_onnx(model: torch.nn.Module, ckpt: dict, path: Path) -> None:
    """Write `model` (eval mode, CPU, float32) to `path` as ONNX with dynamic batch, height and width."""
    import onnx
    h, w = ckpt["size"]
    model = model.float().cpu().eval()
    axes = {0: "batch", 2: "height", 3: "width"}
    # The TorchScript exporter: no onnxscript needed and under a second for a U-Net; torch is pinned,
    # so its deprecation does not reach this project.
    torch.onnx.export(model, (torch.zeros(1, 1, h, w),), str(path), dynamo=False, opset_version=OPSET,
                      input_names=["image"], output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})
    graph = onnx.load(str(path))
    for key, value in metadata(ckpt, model.stride).items():
        graph.metadata_props.add(key=key, value=value)
    graph.doc_string = f"sinus-wkd {ckpt['kind']}: maxillary sinus segmentation of panoramic radiographs; research " \
                       f"use, not for clinical decisions"
    onnx.save(graph, str(path))


class OnnxNetwork(torch.nn.Module):
    """An onnxruntime session behind the torch module interface engine.loop's inference uses."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(["logits"], {"image": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)


def load_onnx(path: Path, flag: str):
    """(OnnxNetwork, the checkpoint record stored in its metadata) of an exported graph."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"{flag} {path}: running an ONNX network needs onnxruntime; pip install onnxruntime "
                        f"(or -r requirements-test.txt)") from None
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()   # the same cores torch would use
    options.log_severity_level = 3                            # its warnings are about its own internals
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:   # onnxruntime raises its own exception types for foreign or corrupt files
        raise UserError(f"{flag} {path}: not a readable ONNX graph ({type(err).__name__})") from None
    meta = session.get_modelmeta().custom_metadata_map
    try:
        record = json.loads(meta[RECORD_KEY])
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{flag} {path}: an ONNX graph not written by export.py (no {RECORD_KEY} metadata)") from None
    if record.get("kind") not in ("teacher", "student"):
        raise UserError(f"{flag} {path}: holds a {record.get('kind')} network, expected a teacher or student")
    return OnnxNetwork(session), record
