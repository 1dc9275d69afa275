"""DICOM radiographs, read as a radiologist's viewer shows them.

pydicom decodes the pixel data (JPEG, JPEG-LS and JPEG 2000 through the pylibjpeg plugins); the
stored values then go through the Modality LUT (rescale slope and intercept, or a LUT), the
VOI LUT or window when the header has one, and MONOCHROME1 images (white = low values) are
inverted so that bone is bright as in every other image. A file is one radiograph: colour
images and multi-frame files of more than one frame are refused. The header's pixel spacing
(PixelSpacing, else ImagerPixelSpacing corrected by the estimated magnification when the header
states it) is the case's default spacing for metrics and areas.
"""
from pathlib import Path

import numpy as np

from errors import UserError

DICOM_SUFFIXES = (".dcm", ".dicom")
GRAY = ("MONOCHROME1", "MONOCHROME2")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def has_preamble(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then "DICM"."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _header(path: Path, with_pixels: bool):
    import pydicom   # here: the import costs a quarter of a second that PNG-only runs need not pay
    try:
        # force: a .dcm written without the Part 10 preamble (a raw dataset) is read too
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=not with_pixels)
        reason = None if "SOPClassUID" in ds or "Rows" in ds else "no image elements"
    except Exception as err:   # pydicom raises many types for a damaged header; all mean the same here
        reason = type(err).__name__
    if reason is not None:   # forced reading turns any bytes into some dataset: an image has these
        raise UserError(f"{path}: cannot read its DICOM header ({reason}); the file is damaged or not DICOM, "
                        f"replace or remove it")
    return ds


def _positive_pair(value, path: Path, keyword: str):
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {keyword} {value!r} is not two numbers (row, column mm); fix the header "
                        f"or remove the element") from None
    if not (np.isfinite([row, col]).all() and row > 0 and col > 0):
        raise UserError(f"{path}: {keyword} {row} {col} is not a positive pixel size; fix the header")
    return row, col


def spacing_of(ds, path: Path):
    """(row mm, column mm, where it came from) of a DICOM header, or None when it states none."""
    if ds.get("PixelSpacing"):
        return (*_positive_pair(ds.PixelSpacing, path, "PixelSpacing"), "PixelSpacing")
    if not ds.get("ImagerPixelSpacing"):
        return None
    row, col = _positive_pair(ds.ImagerPixelSpacing, path, "ImagerPixelSpacing")
    # ImagerPixelSpacing is measured at the detector; the patient is smaller by the magnification
    factor = ds.get("EstimatedRadiographicMagnificationFactor")
    if factor is None:
        return row, col, "ImagerPixelSpacing (at the detector)"
    factor = float(factor)
    if not (np.isfinite(factor) and factor > 0):
        raise UserError(f"{path}: EstimatedRadiographicMagnificationFactor {factor} is not positive; fix the header")
    return row / factor, col / factor, f"ImagerPixelSpacing / magnification {factor:g}"


def header_spacing(path: Path):
    """spacing_of the file at `path`, reading its header only."""
    return spacing_of(_header(path, with_pixels=False), path)


def _check_radiograph(ds, path: Path) -> None:
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise UserError(f"{path}: DICOM without pixel data (a report, a DICOMDIR or a structured document?); "
                        f"move it out of the images folder")
    kind = str(ds.get("PhotometricInterpretation", "")).strip()
    if int(ds.get("SamplesPerPixel", 1)) != 1 or kind not in GRAY:
        raise UserError(f"{path}: a colour DICOM image ({kind or 'no PhotometricInterpretation'}, "
                        f"{ds.get('SamplesPerPixel', 1)} samples per pixel); a radiograph is grey (MONOCHROME1 or "
                        f"MONOCHROME2)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UserError(f"{path}: a DICOM of {frames} frames; a panoramic radiograph is one image, so save the "
                        f"frame to use as its own file")


def read_dicom(path: Path):
    """(2-D float64 intensities as displayed, brighter = denser, bits stored) of a DICOM radiograph."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    ds = _header(path, with_pixels=True)
    _check_radiograph(ds, path)
    try:
        stored = ds.pixel_array
    except Exception as err:   # a missing decoder plugin and a corrupt stream both land here
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or "unknown transfer syntax"
        raise UserError(f"{path}: cannot decode its pixel data ({name}: {type(err).__name__}); the compression "
                        f"has no installed decoder (pip install -r requirements.txt) or the data is damaged") from None
    if stored.ndim != 2:
        raise UserError(f"{path}: pixel data of shape {stored.shape}; expected one 2-D grey image")
    values = apply_modality_lut(stored, ds)
    if "VOILUTSequence" in ds and values.dtype.kind == "f":
        values = np.rint(values).astype(np.int64)   # a LUT is indexed by integers (a rescale made them float)
    pixels = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        # about the image's own range: preprocessing rescales by percentiles, so any mirror is the same
        pixels = pixels.max() + pixels.min() - pixels
    return pixels, int(ds.get("BitsStored", stored.dtype.itemsize * 8))
