"""DICOM radiographs: written here with pydicom (uncompressed and compressed), read as the same
pixels saved as PNG are read; LUTs, windows, MONOCHROME1, spacing from the header; every bad
file one line naming it, found by the data check; a DICOM folder through every script."""
import csv
import io
import json
import shutil

import imageio.v3 as iio
import numpy as np
import pydicom
import pytest
from conftest import TINY, run_script
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, MPEG2MPML, RLELossless,
                         DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid)

import evaluate
import predict
from data import Dataset, list_images
from data.check import check_folder
from data.check import main as check_main
from data.classes import binary
from data.dataset import preprocess, read_image
from data.dicom import header_spacing
from errors import UserError

SHAPE = (48, 80)   # JPEG 2000 needs 32 pixels a side for its default 6 resolution levels


def radiograph(seed=0, top=4095):
    """A smooth 12-bit test image with fine detail, so that any misread pixel shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:SHAPE[0], :SHAPE[1]]
    image = 0.5 + 0.3 * np.sin(x / 5.0) * np.cos(y / 4.0) + 0.1 * rng.random(SHAPE)
    return np.round(image / image.max() * top).astype(np.uint16)


def dicom(pixels, photometric="MONOCHROME2", bits=12, syntax=ExplicitVRLittleEndian, **header):
    """A digital X-ray DICOM dataset of `pixels`, compressed with `syntax`, with `header` elements."""
    ds = DicomDataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "PX", "test"
    ds.set_pixel_data(pixels, photometric, bits)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    return ds


def save(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_dicom(pixels8):
    """A baseline (lossy) JPEG DICOM as X-ray units write them: Pillow encodes, pydicom encapsulates;
    returns it with the pixels a JPEG decoder gives back."""
    buffer = io.BytesIO()
    Image.fromarray(pixels8).save(buffer, format="JPEG", quality=90)
    ds = dicom(pixels8, bits=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].is_undefined_length = True
    return ds, np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


def read(path):
    """The preprocessed image the data package reads from `path`."""
    return Dataset({"x": path}, {}).read("x")[0]


LOSSLESS = [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless]


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: s.name)
def test_lossless_dicom_reads_as_the_same_pixels_as_png(syntax, tmp_path):
    pixels = radiograph()
    iio.imwrite(tmp_path / "same.png", pixels)
    path = save(dicom(pixels, syntax=syntax), tmp_path / "x.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    raw, bits = read_image(path)
    assert bits == 12 and np.array_equal(raw, pixels)
    assert np.array_equal(read(path), read(tmp_path / "same.png"))


def test_baseline_jpeg_dicom_decodes_as_the_jpeg_does(tmp_path):
    ds, decoded = jpeg_dicom((radiograph(top=255)).astype(np.uint8))
    iio.imwrite(tmp_path / "same.png", decoded)
    path = save(ds, tmp_path / "x.dcm")
    # two JPEG decoders (libjpeg through pylibjpeg, Pillow's) may round a few pixels apart by one level
    assert np.abs(read_image(path)[0] - decoded).max() <= 1
    lo, hi = np.percentile(decoded, [1, 99])
    assert np.abs(read(path) - read(tmp_path / "same.png")).max() <= 2 / (hi - lo)     # two levels, rescaled


def test_modality_lut_voi_window_and_monochrome1_as_a_viewer_shows_them(tmp_path):
    pixels = radiograph()
    iio.imwrite(tmp_path / "same.png", pixels)
    # the stored values map to the displayed ones through the rescale
    stored = ((pixels.astype(np.int64) + 1000) // 2).astype(np.uint16)
    rescaled = save(dicom(stored, RescaleSlope=2, RescaleIntercept=-1000), tmp_path / "rescaled.dcm")
    assert np.array_equal(read_image(rescaled)[0], stored * 2.0 - 1000)
    # MONOCHROME1: low values are white; after inversion the image is the PNG's
    inverted = save(dicom((4095 - pixels).astype(np.uint16), "MONOCHROME1"), tmp_path / "inverted.dcm")
    assert np.allclose(read(inverted), read(tmp_path / "same.png"), atol=1e-6)
    # a window narrower than the data clips it, as the DICOM linear window function does
    centre, width = 2000, 1001
    windowed = save(dicom(pixels, WindowCenter=centre, WindowWidth=width), tmp_path / "windowed.dcm")
    expected = np.clip((pixels - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    assert np.allclose(preprocess(read_image(windowed)[0]), preprocess(expected), atol=1e-5)
    assert not np.allclose(read(windowed), read(tmp_path / "same.png"), atol=0.05)
    # a VOI LUT (here a square root table over the stored range) takes precedence over any window
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)
    with_lut = dicom(pixels, WindowCenter=centre, WindowWidth=width)
    item = DicomDataset()
    item.LUTDescriptor, item.LUTData = [4096, 0, 16], lut.tobytes()   # LUTData is OW: the raw words
    with_lut.VOILUTSequence = [item]
    assert np.array_equal(read_image(save(with_lut, tmp_path / "lut.dcm"))[0], lut[pixels])


def test_spacing_comes_from_the_header_and_says_which(tmp_path):
    pixels = radiograph()
    assert header_spacing(save(dicom(pixels, PixelSpacing=[0.1, 0.12], ImagerPixelSpacing=[0.2, 0.2]),
                               tmp_path / "a.dcm")) == (0.1, 0.12, "PixelSpacing")
    assert header_spacing(save(dicom(pixels, ImagerPixelSpacing=[0.11, 0.11]), tmp_path / "b.dcm")) \
        == (0.11, 0.11, "ImagerPixelSpacing (at the detector)")
    row, col, source = header_spacing(save(dicom(pixels, ImagerPixelSpacing=[0.11, 0.22],
                                                 EstimatedRadiographicMagnificationFactor=1.1), tmp_path / "c.dcm"))
    assert (row, col) == pytest.approx((0.1, 0.2)) and source == "ImagerPixelSpacing / magnification 1.1"
    assert header_spacing(save(dicom(pixels), tmp_path / "d.dcm")) is None
    assert Dataset({"a": tmp_path / "a.dcm", "p": tmp_path / "p.png"}, {}).spacing("p") is None


def test_extension_less_dicom_is_found_by_its_preamble(tmp_path):
    save(dicom(radiograph()), tmp_path / "1.2.826.0.1.3680043.8")       # a UID as the name, as PACS export
    save(dicom(radiograph()), tmp_path / "IM0001")
    (tmp_path / "notes").write_text("not an image")
    problems = []
    images = list_images(tmp_path, problems)
    assert sorted(images) == ["1.2.826.0.1.3680043.8", "IM0001"]
    assert len(problems) == 1 and "notes: not a supported image type" in problems[0]


def bad_dicom_files(folder):
    """{file name: what its one-line error must say} for each kind of DICOM that is not a radiograph."""
    pixels = radiograph()
    no_pixels = dicom(pixels)
    del no_pixels.PixelData
    save(no_pixels, folder / "report.dcm")
    colour = dicom(np.repeat(radiograph(top=255).astype(np.uint8)[..., None], 3, axis=2), "RGB", 8)
    save(colour, folder / "colour.dcm")
    save(dicom(np.stack([pixels, pixels]), NumberOfFrames=2), folder / "frames.dcm")
    video = dicom(pixels)
    video.file_meta.TransferSyntaxUID = MPEG2MPML
    video.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    save(video, folder / "video.dcm")
    (folder / "damaged.dcm").write_text("exported as text by mistake")
    (folder / "truncated.dcm").write_bytes(save(dicom(pixels), folder / "truncated.dcm").read_bytes()[:-100])
    return {"report.dcm": "without pixel data", "colour.dcm": "colour DICOM image (RGB, 3 samples per pixel)", "frames.dcm": "2 frames",
            "video.dcm": "cannot decode its pixel data (MPEG2", "damaged.dcm": "cannot read its DICOM header",
            "truncated.dcm": "cannot decode its pixel data (Explicit VR Little Endian"}


def test_bad_dicom_is_one_line_naming_the_file_and_the_check_lists_them_all(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    expected = bad_dicom_files(images)
    save(dicom(radiograph(), NumberOfFrames=1), images / "single_frame.dcm")     # one frame is one image
    assert read(images / "single_frame.dcm").shape == SHAPE
    for name, words in expected.items():
        with pytest.raises(UserError) as info:
            read(images / name)
        assert "\n" not in str(info.value) and name in str(info.value) and words in str(info.value), str(info.value)
    with pytest.raises(UserError) as info:
        check_folder(tmp_path, binary())
    lines = str(info.value).splitlines()
    assert lines[0].endswith(f"{len(expected)} problems; fix them and run again:")
    assert sorted(line.strip().split(":")[0].rsplit("/", 1)[-1] for line in lines[1:]) == sorted(expected)


@pytest.fixture(scope="module")
def dicom_data(tiny_data, tmp_path_factory):
    """The tiny phantom as a clinic would send it: DICOM images (uncompressed, JPEG 2000, one
    MONOCHROME1, one with a VOI window, one baseline JPEG, one extension-less), each with its
    PixelSpacing; PNG masks; two cases left as PNG."""
    root = tmp_path_factory.mktemp("dicom_data")
    shutil.copytree(tiny_data / "masks", root / "masks")
    (root / "images").mkdir()
    for i, path in enumerate(sorted((tiny_data / "images").glob("*.png"))):
        pixels = iio.imread(path)
        pixels = pixels if pixels.ndim == 2 else pixels[..., 0]
        bits = 16 if pixels.dtype == np.uint16 else 8
        spacing = dict(PixelSpacing=[0.1, 0.1 + i / 1000])
        if i < 2:
            shutil.copy(path, root / "images")
        elif i == 2:
            save(dicom((pixels.max() - pixels).astype(pixels.dtype), "MONOCHROME1", bits, **spacing),
                 root / "images" / f"{path.stem}.dcm")
        elif i == 3:
            top = float(2 ** bits - 1)
            save(dicom(pixels, bits=bits, WindowCenter=top / 2, WindowWidth=top + 1, **spacing),
                 root / "images" / f"{path.stem}.dcm")
        elif i == 4:
            ds, _ = jpeg_dicom((pixels // 257).astype(np.uint8) if bits == 16 else pixels)
            ds.PixelSpacing = spacing["PixelSpacing"]
            save(ds, root / "images" / f"{path.stem}.dcm")
        elif i == 5:
            save(dicom(pixels, bits=bits, **spacing), root / "images" / path.stem)
        else:
            syntax = JPEG2000Lossless if i % 2 else ExplicitVRLittleEndian
            save(dicom(pixels, bits=bits, syntax=syntax, **spacing), root / "images" / f"{path.stem}.dcm")
    return root


def args(*values) -> list:
    return [str(v) for v in values]


def test_a_dicom_folder_goes_through_check_training_evaluation_and_prediction(dicom_data, tmp_path, capsys):
    check_main(["--data", str(dicom_data)])
    summary = capsys.readouterr().out
    assert "30 cases" in summary and "pixel spacing: PixelSpacing (28), none (2)" in summary, summary
    teacher = tmp_path / "teacher.pt"
    run_script("train_teacher.py", "--data", dicom_data, "--out", teacher, "--steps", 4, "--val-every", 4,
               "--width", 4, "--batch-size", 2, "--labeled-ratio", 0.3, *TINY)
    # evaluation and prediction in this process: a fresh one would cost an import of torch each
    evaluate.main(args("--data", dicom_data, "--ckpt", teacher, "--out", tmp_path / "eval", "--split", "val",
                       "--no-overlays"))
    split = json.loads((tmp_path / "teacher_logs" / "split.json").read_text())
    rows = {r["id"]: r for r in csv.DictReader(open(tmp_path / "eval" / "metrics.csv"))}
    assert sorted(rows) == sorted(split["val"])
    for case_id, row in rows.items():
        index = int(case_id.split("_")[1])
        if index < 2:
            assert row["spacing_source"] == "none (pixels)" and row["spacing_row_mm"] == ""
        else:
            assert row["spacing_source"] == "PixelSpacing"
            assert float(row["spacing_col_mm"]) == pytest.approx(0.1 + index / 1000)
            assert float(row["diagonal"]) == pytest.approx(np.hypot(64 * 0.1, 128 * (0.1 + index / 1000)))

    images = tmp_path / "scans"
    shutil.copytree(dicom_data / "images", images)
    predict.main(args("--ckpt", teacher, "--images", images, "--out", tmp_path / "pred", "--no-overlays"))
    areas = {r["id"]: r for r in csv.DictReader(open(tmp_path / "pred" / "areas.csv"))}
    assert len(areas) == 30 and "case_0005" in areas                  # the extension-less file
    row = areas["case_0007"]
    assert row["spacing_source"] == "PixelSpacing"
    assert float(row["area_mm2[sinus]"]) == pytest.approx(int(row["area_px[sinus]"]) * 0.1 * 0.107)
    assert areas["case_0000"]["area_mm2[sinus]"] == ""
    # an explicit --spacing overrides every header
    predict.main(args("--ckpt", teacher, "--images", images, "--out", tmp_path / "pred2", "--no-overlays",
                      "--spacing", 0.2))
    row = next(r for r in csv.DictReader(open(tmp_path / "pred2" / "areas.csv")) if r["id"] == "case_0007")
    assert row["spacing_source"] == "--spacing" and float(row["area_mm2[sinus]"]) == pytest.approx(
        int(row["area_px[sinus]"]) * 0.04)
    # a bad DICOM among them is named in one line, and nothing is left written
    bad_dicom_files(images)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        predict.main(args("--ckpt", teacher, "--images", images, "--out", tmp_path / "pred3"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("error: ") == 1 and "Traceback" not in err
    assert f"error: {images / 'colour.dcm'}: a colour DICOM image (RGB, 3 samples" in err                 # the first bad one, by name
    assert not (tmp_path / "pred3").exists() and not (tmp_path / "pred3.tmp").exists()
