"""Image reading: every format to float32 grey, DICOM handling, min-max, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from breastfusion.data import imaging
from breastfusion.data.imaging import image_size, load_normalised, minmax, read_grey
from breastfusion.errors import ImageError

LUMA = np.array([0.299, 0.587, 0.114])


def _rgb(shape=(6, 9)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    bits_stored: int = 12,
) -> Path:
    """A minimal Part-10 file with patient tags that the reader must never pass on."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    ds.PatientBirthDate = "19700101"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


STORED = np.array([[0, 100, 4095], [7, 2048, 1]], dtype=np.uint16)


# --- PNG / JPEG / TIFF ------------------------------------------------------------------------


def test_png_16bit_keeps_full_precision(tmp_path):
    values = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 31 % 65536).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    grey = read_grey(path)
    assert grey.dtype == np.float32 and grey.shape == (40, 50)
    np.testing.assert_array_equal(grey, values.astype(np.float32))
    # Values an 8-bit path would merge stay distinct after normalisation.
    assert len(np.unique(load_normalised(path))) > 256


def test_png_8bit_grey_exact(tmp_path):
    values = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(values).save(tmp_path / "g8.png")
    np.testing.assert_array_equal(read_grey(tmp_path / "g8.png"), values.astype(np.float32))


def test_rgb_is_itu601_luminance(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(read_grey(tmp_path / "rgb.png"), rgb @ LUMA, atol=1e-3)


def test_rgba_drops_alpha(tmp_path):
    rgb = _rgb()
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(read_grey(tmp_path / "rgba.png"), rgb @ LUMA, atol=1e-3)


def test_grey_alpha_keeps_grey(tmp_path):
    grey = _rgb()[:, :, 0]
    alpha = np.full_like(grey, 17)
    Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]).save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_grey(tmp_path / "la.png"), grey.astype(np.float32))


def test_palette_png_uses_palette_colours(tmp_path):
    im = Image.fromarray(_rgb()).quantize(colors=5)
    im.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    expected = np.asarray(im.convert("RGB")) @ LUMA
    np.testing.assert_allclose(read_grey(tmp_path / "p.png"), expected, atol=1e-3)


def test_jpeg_grey_and_colour(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.dstack([ramp] * 3)).save(tmp_path / "c.jpeg", quality=95)
    for name in ("g.jpg", "c.jpeg"):
        grey = read_grey(tmp_path / name)
        assert grey.shape == (16, 32)
        np.testing.assert_allclose(grey, ramp, atol=8)  # lossy


def test_tiff_16bit_and_float(tmp_path):
    u16 = np.array([[0, 300, 65535], [1, 2, 40000]], dtype=np.uint16)
    f32 = np.array([[-1.5, 0.25, 3e4], [7.0, 0.0, 1e-3]], dtype=np.float32)
    Image.fromarray(u16).save(tmp_path / "u16.tif")
    Image.fromarray(f32).save(tmp_path / "f32.tiff")
    np.testing.assert_array_equal(read_grey(tmp_path / "u16.tif"), u16.astype(np.float32))
    np.testing.assert_array_equal(read_grey(tmp_path / "f32.tiff"), f32)


# --- DICOM ------------------------------------------------------------------------------------


def test_dicom_applies_slope_and_intercept(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", STORED, slope=2.0, intercept=-10.0)
    np.testing.assert_array_equal(read_grey(path), STORED * 2.0 - 10.0)


def test_dicom_without_rescale_is_stored_values(tmp_path):
    path = make_dicom(tmp_path / "raw.dcm", STORED)
    np.testing.assert_array_equal(read_grey(path), STORED.astype(np.float32))


def test_dicom_monochrome1_is_inverted_within_bit_range(tmp_path):
    path = make_dicom(
        tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1", slope=2.0, intercept=-10.0
    )
    rescaled = STORED * 2.0 - 10.0
    lo, hi = -10.0, 4095 * 2.0 - 10.0  # the 12-bit stored range, rescaled
    np.testing.assert_array_equal(read_grey(path), (lo + hi) - rescaled)
    # Bright must mean dense: the lowest stored value becomes the brightest pixel.
    assert load_normalised(path)[0, 0] == 1.0


def test_dicom_detected_by_magic_without_suffix(tmp_path):
    path = make_dicom(tmp_path / "image.bin", STORED)
    assert imaging.is_dicom(path)
    np.testing.assert_array_equal(read_grey(path), STORED.astype(np.float32))
    assert image_size(path) == (3, 2)


def test_dicom_multiframe_uses_first_frame(tmp_path, caplog):
    frames = np.stack([STORED, STORED + 1, STORED + 2])
    path = make_dicom(tmp_path / "multi.dcm", frames)
    with caplog.at_level(logging.WARNING, logger="breastfusion.data.imaging"):
        grey = read_grey(path)
    np.testing.assert_array_equal(grey, STORED.astype(np.float32))
    assert "first frame" in caplog.text and "3 frames" in caplog.text


def test_dicom_reader_never_holds_patient_tags(tmp_path):
    path = make_dicom(tmp_path / "p.dcm", STORED)
    assert "PatientName" in pydicom.dcmread(path)  # the file does carry them
    ds = imaging._dcmread_pixels_only(path)
    for tag in ("PatientName", "PatientID", "PatientBirthDate", "SOPInstanceUID"):
        assert tag not in ds
    grey = read_grey(path)
    assert type(grey) is np.ndarray  # a bare array, no dataset attached


def test_dicom_without_pixels_names_file_not_patient(tmp_path):
    path = make_dicom(tmp_path / "nopix.dcm", STORED)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageError, match="no pixel data") as err:
        read_grey(path)
    assert str(path) in str(err.value)
    assert "Doe" not in str(err.value) and "SECRET" not in str(err.value)


def test_dicom_zero_size_is_an_error(tmp_path):
    path = make_dicom(tmp_path / "empty.dcm", np.zeros((0, 0), dtype=np.uint16))
    with pytest.raises(ImageError, match="zero-size") as err:
        image_size(path)
    assert str(path) in str(err.value)


# --- min-max ----------------------------------------------------------------------------------


def test_minmax_maps_to_unit_range():
    out = minmax(np.array([[10.0, 20.0], [30.0, 50.0]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]])


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.full((4, 4), 7.0), "constant image"),
        (np.zeros((0, 5)), "empty image"),
        (np.array([[1.0, np.nan]]), "NaN or infinite"),
        (np.array([[1.0, np.inf]]), "NaN or infinite"),
    ],
)
def test_minmax_refuses_unusable_images(array, reason):
    with pytest.raises(ImageError, match=reason) as err:
        minmax(array, source="scan_17.png")
    assert "scan_17.png" in str(err.value)


def test_constant_image_file_is_an_error(tmp_path):
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((8, 8), 42, dtype=np.uint8)).save(path)
    assert read_grey(path).shape == (8, 8)  # readable, only not normalisable
    with pytest.raises(ImageError, match="constant image") as err:
        load_normalised(path)
    assert str(path) in str(err.value)


# --- failures name the file and the reason ----------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated_png(path: Path) -> Path:
    noise = np.random.default_rng(2).integers(0, 65536, (64, 64), dtype=np.uint16)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "missing.png", "file not found"),
        (lambda d: d, "not a regular file"),
        (lambda d: _write(d / "zero.png", b""), "empty file"),
        (lambda d: _write(d / "text.png", b"hello"), "not an image"),
        (lambda d: _truncated_png(d / "cut.png"), "corrupt or truncated"),
        (lambda d: _write(d / "junk.dcm", b"x" * 10), "DICOM"),
    ],
)
def test_read_errors_name_file_and_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageError, match=reason) as err:
        read_grey(path)
    assert str(path) in str(err.value)


def test_image_size_reads_header_only(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(path)
    assert image_size(path) == (30, 20)
    # A truncated file still has a valid header: cheap checks pass, a full decode fails.
    cut = _truncated_png(tmp_path / "cut.png")
    assert image_size(cut) == (64, 64)
    with pytest.raises(ImageError):
        read_grey(cut)


def test_image_size_errors_name_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    with pytest.raises(ImageError, match="not an image") as err:
        image_size(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(ImageError, match="file not found"):
        image_size(tmp_path / "nope.tif")
